//! ROUGE-L F1 at the word level, as Google's `rouge_score` package computes it with its
//! default tokenizer and no stemming: text lowercased, every run of characters outside
//! `[a-z0-9]` a separator, the longest common subsequence of the two token lists,
//! F1 = 2PR / (P + R) (0 when either side has no token or nothing is shared).

/// `rouge_score`'s default tokenization (no stemmer): lowercase, non-`[a-z0-9]` runs
/// split tokens.
pub fn tokens(text: &str) -> Vec<String> {
    text.to_lowercase()
        .split(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit()))
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

/// Length of the longest common subsequence of `a` and `b` (two rows of the table).
fn lcs(a: &[String], b: &[String]) -> usize {
    let mut prev = vec![0usize; b.len() + 1];
    let mut cur = vec![0usize; b.len() + 1];
    for x in a {
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = if x == y {
                prev[j] + 1
            } else {
                cur[j].max(prev[j + 1])
            };
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// ROUGE-L F1 of `prediction` against `reference`.
pub fn rouge_l(reference: &str, prediction: &str) -> f64 {
    let (r, p) = (tokens(reference), tokens(prediction));
    if r.is_empty() || p.is_empty() {
        return 0.0;
    }
    let l = lcs(&r, &p) as f64;
    if l == 0.0 {
        return 0.0;
    }
    let (precision, recall) = (l / p.len() as f64, l / r.len() as f64);
    2.0 * precision * recall / (precision + recall)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizes_as_rouge_score() {
        assert_eq!(
            tokens("GTK+ front-end for the X11 clipboard (v2.0)!"),
            [
                "gtk",
                "front",
                "end",
                "for",
                "the",
                "x11",
                "clipboard",
                "v2",
                "0"
            ]
        );
        // Non-ASCII letters are separators in rouge_score's tokenizer too.
        assert_eq!(tokens("café au lait"), ["caf", "au", "lait"]);
    }

    #[test]
    fn f1_of_the_longest_common_subsequence() {
        // LCS of "the cat sat on the mat" and "the cat lay on a mat" = the cat on mat (4).
        let f = rouge_l("The cat sat on the mat", "the cat lay on a mat");
        let (p, r) = (4.0 / 6.0, 4.0 / 6.0);
        assert!((f - 2.0 * p * r / (p + r)).abs() < 1e-12);
        // Order matters: a reversed sentence shares only one word in order.
        let f = rouge_l("a b c d", "d c b a");
        assert!((f - 0.25).abs() < 1e-12, "{f}");
        // Different lengths: |r| = 4, |p| = 6, LCS "police killed the gunman" (4):
        // p = 4/6, r = 1.
        let f = rouge_l(
            "police killed the gunman",
            "the gunman police killed the gunman",
        );
        assert!(
            (f - 2.0 * (4.0 / 6.0) / (4.0 / 6.0 + 1.0)).abs() < 1e-12,
            "{f}"
        );
        assert_eq!(rouge_l("same words", "Same, words."), 1.0);
        assert_eq!(rouge_l("nothing shared", "at all"), 0.0);
        assert_eq!(rouge_l("", "anything"), 0.0);
    }
}
