//! `cargo xtask readme-figures`: rewrites the README's figures block (between
//! `<!-- bench:begin -->` and `<!-- bench:end -->`) from a bench report, so that every
//! figure the README quotes comes from `report.json` and names its commit.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use serde_json::Value;

use crate::fsutil;

const BEGIN: &str = "<!-- bench:begin -->";
const END: &str = "<!-- bench:end -->";
const WIDTH: usize = 88;
/// The plot the README shows, and where its copy is committed.
const PLOT: &str = "plot_peft_methods.png";
const PLOT_DEST: &str = "docs/bench/plot_peft_methods.png";

/// The body of the Markdown section whose heading line is `heading`, up to the next
/// heading of the same level.
fn section<'a>(md: &'a str, heading: &str) -> Option<&'a str> {
    let start = md.find(&format!("{heading}\n"))? + heading.len() + 1;
    let rest = &md[start..];
    let end = rest.find("\n## ").map_or(rest.len(), |i| i + 1);
    Some(&rest[..end])
}

#[derive(Args)]
pub struct FiguresArgs {
    /// The bench report to read (default: <target>/reuse-report/report.json).
    #[arg(long)]
    report: Option<PathBuf>,
    /// The file whose block to rewrite.
    #[arg(long, default_value = "README.md")]
    readme: PathBuf,
    /// Accept a report made from a tree with uncommitted changes (the block says so).
    #[arg(long)]
    allow_dirty: bool,
    /// Accept a `--quick` report (smoke-test sizes; for testing this command only).
    #[arg(long)]
    allow_quick: bool,
    /// Print the block instead of writing the file.
    #[arg(long)]
    print: bool,
}

pub fn run(root: &Path, target: &Path, args: &FiguresArgs) -> Result<()> {
    let report_path = args
        .report
        .clone()
        .unwrap_or_else(|| target.join("reuse-report/report.json"));
    let report: Value =
        serde_json::from_slice(&std::fs::read(&report_path).with_context(|| {
            format!(
                "cannot read {} (run `cargo xtask bench`)",
                report_path.display()
            )
        })?)
        .with_context(|| format!("{} is not JSON", report_path.display()))?;
    let r = Report(&report);
    if r.flag("quick")? && !args.allow_quick {
        bail!(
            "{} comes from a `--quick` run (smoke-test sizes); run the full `cargo xtask bench`",
            report_path.display()
        );
    }
    if r.flag("dirty")? && !args.allow_dirty {
        bail!(
            "{} was made from a tree with uncommitted changes; commit and rerun the bench, \
             or pass --allow-dirty (the README then says so)",
            report_path.display()
        );
    }
    let mut block = block(&r)?;
    // The report's claims table, and one of its plots, as the run wrote them.
    let md_path = report_path.with_file_name("REPORT.md");
    let md = std::fs::read_to_string(&md_path).with_context(|| {
        format!(
            "cannot read {} (written with report.json)",
            md_path.display()
        )
    })?;
    let claims = section(&md, "## Claims")
        .with_context(|| format!("{} has no `## Claims` section", md_path.display()))?;
    block.push_str(&format!(
        "\n\nThe claims table of that run (its REPORT.md):\n\n{}",
        claims.trim()
    ));
    let plot = report_path.with_file_name(PLOT);
    if plot.exists() {
        block.push_str(&format!(
            "\n\n![PEFT methods on MiniLM: test accuracy and trainable share]({PLOT_DEST})"
        ));
    }
    if args.print {
        println!("{block}");
        return Ok(());
    }
    if plot.exists() {
        let dest = root.join(PLOT_DEST);
        std::fs::create_dir_all(dest.parent().expect("a folder"))?;
        let bytes =
            std::fs::read(&plot).with_context(|| format!("cannot read {}", plot.display()))?;
        fsutil::write_atomic(&dest, &bytes)?;
    }
    let readme = root.join(&args.readme);
    let text = std::fs::read_to_string(&readme)
        .with_context(|| format!("cannot read {}", readme.display()))?;
    let new = replace_block(&text, &block).with_context(|| format!("in {}", readme.display()))?;
    if new == text {
        println!("{}: figures already up to date", readme.display());
    } else {
        fsutil::write_atomic(&readme, new.as_bytes())?;
        println!(
            "{}: figures rewritten from {}",
            readme.display(),
            report_path.display()
        );
    }
    Ok(())
}

/// `text` with the lines strictly between the markers replaced by `block`.
fn replace_block(text: &str, block: &str) -> Result<String> {
    let (Some(b), Some(e)) = (text.find(BEGIN), text.find(END)) else {
        bail!("no `{BEGIN}` ... `{END}` block");
    };
    ensure!(b < e, "`{END}` comes before `{BEGIN}`");
    ensure!(
        text[e + END.len()..].find(BEGIN).is_none(),
        "more than one figures block"
    );
    let start = b + BEGIN.len();
    Ok(format!(
        "{}\n{}\n{}",
        &text[..start],
        block.trim_end(),
        &text[e..]
    ))
}

struct Report<'a>(&'a Value);

impl Report<'_> {
    fn flag(&self, key: &str) -> Result<bool> {
        self.0[key]
            .as_bool()
            .with_context(|| format!("report has no boolean `{key}`"))
    }

    fn str(&self, key: &str) -> Result<&str> {
        self.0[key]
            .as_str()
            .with_context(|| format!("report has no string `{key}`"))
    }

    /// Metric `name` of experiment `id`; an error names both when missing.
    fn get(&self, id: &str, name: &str) -> Result<f64> {
        let e = self.0["experiments"]
            .as_array()
            .context("report has no `experiments`")?
            .iter()
            .find(|e| e["id"] == id)
            .with_context(|| format!("report has no experiment `{id}` (run the whole bench)"))?;
        e["metrics"][name]
            .as_f64()
            .with_context(|| format!("experiment `{id}` has no metric `{name}`"))
    }
}

/// The paragraph, wrapped at WIDTH, every number read from the report.
fn block(r: &Report) -> Result<String> {
    let commit = r.str("commit")?;
    let short = &commit[..commit.len().min(12)];
    let dirty = if r.flag("dirty")? {
        " with uncommitted changes"
    } else {
        ""
    };
    let device = r.str("device")?;
    let threads = r.0["threads"].as_i64().context("report has no `threads`")?;
    let date = r.str("date")?;
    let day = &date[..date.len().min(10)];

    let e = "core.minilm_embed";
    let embed = format!(
        "MiniLM embeddings at {:.0} sentences/s in f32 (median of {:.0} rounds, sd {:.0}), \
         {:.2}x sentence-transformers' time on the same texts (median per-round ratio, range \
         {:.2}-{:.2}, the two interleaved in one run)",
        r.get(e, "rust_f32.sentences_per_second_median")?,
        r.get(e, "rust_f32.sentences_per_second_samples")?,
        r.get(e, "rust_f32.sentences_per_second_sd")?,
        r.get(e, "rust_f32_time_over_st_median")?,
        r.get(e, "rust_f32_time_over_st_min")?,
        r.get(e, "rust_f32_time_over_st_max")?,
    );

    let s = "peft.minilm_sections";
    let acc = |m: &str| -> Result<String> {
        Ok(format!(
            "{:.3} ± {:.3}",
            r.get(s, &format!("{m}.test_accuracy"))?,
            r.get(s, &format!("{m}.test_accuracy_sd"))?
        ))
    };
    let pct = |m: &str| -> Result<String> {
        Ok(format!(
            "{:.2}%",
            100.0 * r.get(s, &format!("{m}.trainable_fraction"))?
        ))
    };
    let sections = format!(
        "on the Debian sections task with the same budget ({:.0} steps), each method's \
         learning rate chosen on the dev split, test accuracy (mean ± sd over {:.0} seeds): \
         full fine-tuning {}, LoRA r=4 on query, value and the FFN {} ({:.3}x full; {} of \
         the weights trained, head included; {:.0} vs {:.0} ms/step, medians of {:.0} runs), \
         {}Pfeiffer adapter {} ({}), head only {} ({})",
        r.get(s, "steps")?,
        r.get(s, "seeds")?,
        acc("full")?,
        acc("lora")?,
        r.get(s, "lora_over_full_accuracy")?,
        pct("lora")?,
        r.get(s, "lora.step_ms_median")?,
        r.get(s, "full.step_ms_median")?,
        r.get(s, "lora.step_ms_samples")?,
        // Not trained at the CPU size.
        match (acc("lora_qv_r8"), pct("lora_qv_r8")) {
            (Ok(a), Ok(p)) => format!("LoRA r=8 on query and value {a} ({p}), "),
            _ => String::new(),
        },
        acc("pfeiffer")?,
        pct("pfeiffer")?,
        acc("head")?,
        pct("head")?,
    );

    let i = "peft.inference_overhead";
    let overhead = format!(
        "unmerged LoRA forward {:.2}x the base (median per-round ratio over {:.0} interleaved \
         rounds, range {:.2}-{:.2}; merged, a control that runs the base's own operations, \
         {:.2}x)",
        r.get(i, "unmerged_over_base_median")?,
        r.get(i, "unmerged_over_base_samples")?,
        r.get(i, "unmerged_over_base_min")?,
        r.get(i, "unmerged_over_base_max")?,
        r.get(i, "control_merged_over_base_median")?,
    );

    let p = "peft.vs_python";
    let step = format!(
        "one LoRA training step {:.2}x the time of PyTorch + PEFT (medians of {:.0} steps \
         each, {:.0} vs {:.0} ms, interleaved in the same run)",
        r.get(p, "step_ratio_rust_over_python")?,
        r.get(p, "rust_step_ms_samples")?,
        r.get(p, "rust_step_ms_median")?,
        r.get(p, "python_step_ms_median")?,
    );

    let text = format!(
        "Figures from one `cargo xtask bench` run on {device} ({threads} threads), commit \
         `{short}`{dirty}, {day}: {embed}; {sections}; {overhead}; {step}. How each was \
         measured is in the run's `target/reuse-report/REPORT.md`."
    );
    Ok(format!(
        "<!-- written by `cargo xtask readme-figures` from target/reuse-report/report.json; \
         edits here are overwritten -->\n{}",
        wrap(&text, WIDTH)
    ))
}

/// Greedy word wrap (words longer than `width` stay whole).
fn wrap(text: &str, width: usize) -> String {
    let mut out = String::new();
    let mut line_len = 0;
    for word in text.split_whitespace() {
        let n = word.chars().count();
        if line_len > 0 && line_len + 1 + n > width {
            out.push('\n');
            line_len = 0;
        } else if line_len > 0 {
            out.push(' ');
            line_len += 1;
        }
        out.push_str(word);
        line_len += n;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_only_between_markers() {
        let text = format!("a\n{BEGIN}\nold\nlines\n{END}\nb\n");
        let new = replace_block(&text, "new").unwrap();
        assert_eq!(new, format!("a\n{BEGIN}\nnew\n{END}\nb\n"));
        assert_eq!(replace_block(&new, "new").unwrap(), new);
    }

    #[test]
    fn refuses_missing_or_doubled_markers() {
        assert!(replace_block("no markers", "x").is_err());
        let two = format!("{BEGIN}\n{END}\n{BEGIN}\n{END}\n");
        assert!(replace_block(&two, "x").is_err());
    }

    #[test]
    fn finds_a_section_up_to_the_next_heading() {
        let md = "# r\n\n## Claims\n\n| a |\n|---|\n\n## Plots\n\n- x\n";
        assert_eq!(section(md, "## Claims").unwrap().trim(), "| a |\n|---|");
        assert_eq!(section(md, "## Plots").unwrap().trim(), "- x");
        assert!(section(md, "## Other").is_none());
    }

    #[test]
    fn wraps_at_width() {
        let w = wrap("aaa bbb ccc ddd", 7);
        assert_eq!(w, "aaa bbb\nccc ddd");
    }
}
