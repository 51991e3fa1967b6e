//! Vocabulary trimming on MiniLM's real tokenizer and weights. (Its own test binary:
//! loading MiniLM would widen the window in which the seeded tests of `student.rs`,
//! which share libtorch's global RNG across test threads, can interleave.)

use reuse_core::models::bert::Bert;
use tch::{Device, Kind, Tensor};

/// Vocabulary trimming on MiniLM's real tokenizer: text of the corpus tokenizes to the
/// same pieces under new ids, an ASCII word outside it still avoids `[UNK]`, and a model
/// of another vocabulary is refused.
#[test]
fn vocab_trim_keeps_the_corpus_tokenization_and_refuses_another_model() {
    use reuse_core::models::sentence::load_tokenizer;
    use reuse_distill::vocab::VocabTrim;

    let dir = reuse_testkit::minilm_dir().unwrap();
    let tok = load_tokenizer(&dir.join("tokenizer.json"), 128).unwrap();
    let corpus = [
        "Real-time strategy game of ancient warfare",
        "mail transfer agent",
        "GNU C compiler (cross compiler for ARM64)",
    ];
    let plan = VocabTrim::from_texts(&tok, &corpus).unwrap();
    assert_eq!(plan.old_size(), 30522);
    // Corpus pieces + 5 specials + printable ASCII single characters (with ##).
    assert!(plan.len() > 150 && plan.len() < 400, "kept {}", plan.len());
    let keep = plan.keep();
    assert!(keep.windows(2).all(|w| w[0] < w[1]), "keep is increasing");
    for t in corpus {
        let old: Vec<i64> = tok
            .encode(t, true)
            .unwrap()
            .get_ids()
            .iter()
            .map(|&i| i as i64)
            .collect();
        let new: Vec<i64> = plan
            .tokenizer()
            .encode(t, true)
            .unwrap()
            .get_ids()
            .iter()
            .map(|&i| i as i64)
            .collect();
        let mapped = plan.map_ids(&Tensor::from_slice(&old)).unwrap();
        assert_eq!(Vec::<i64>::try_from(mapped).unwrap(), new, "{t}");
        for (n, o) in new.iter().zip(&old) {
            assert_eq!(keep[*n as usize], *o);
        }
    }
    let unk = plan.tokenizer().token_to_id("[UNK]").unwrap();
    let ids = plan.tokenizer().encode("zebra xylophone", true).unwrap();
    assert!(!ids.get_ids().contains(&unk), "{:?}", ids.get_tokens());
    assert!(
        ids.get_ids().len() > 4,
        "split into kept pieces: {:?}",
        ids.get_tokens()
    );
    // A dropped id cannot be mapped.
    let zebra = tok.token_to_id("zebra").unwrap() as i64;
    let err = plan
        .map_ids(&Tensor::from_slice(&[zebra]))
        .unwrap_err()
        .to_string();
    assert!(err.contains(&zebra.to_string()), "{err}");

    // The embedding table follows the plan; another vocabulary's table (here the
    // trimmed one) is refused.
    let mut bert = Bert::load(&dir, Device::Cpu, Kind::Float).unwrap();
    let before = bert.embeddings.word_embeddings.shallow_clone();
    plan.apply(&mut bert).unwrap();
    assert_eq!(bert.config.vocab_size, plan.len() as i64);
    let rows = before.index_select(0, &Tensor::from_slice(keep));
    assert!(rows.equal(&bert.embeddings.word_embeddings));
    let err = plan.apply(&mut bert).unwrap_err().to_string();
    assert!(
        err.contains(&format!("{} rows", plan.len())) && err.contains("30522"),
        "{err}"
    );
    assert!(VocabTrim::from_texts(&tok, &[]).is_err());
}
