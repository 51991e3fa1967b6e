//! The real model: all-MiniLM-L6-v2 against sentence-transformers' own output, and
//! fine-tuning on real labelled text (Debian package sections).
//!
//! Needs the model unpacked by `cargo xtask setup` (see `REUSE_MINILM_DIR`).

use reuse_core::data::{load_text_splits, majority_baseline};
use reuse_core::models::sentence::tokenize;
use reuse_core::models::{Bert, BertClassifier, SentenceEncoder, TokenizedDataset};
use reuse_core::trainer::accuracy;
use reuse_core::{Checkpoint, Schedule, TrainConfig, Trainer};
use reuse_testkit::{fixtures_dir, minilm_dir};
use tch::{Device, Kind};

fn texts() -> Vec<String> {
    let t = std::fs::read_to_string(fixtures_dir().join("minilm/texts.txt")).unwrap();
    let mut v: Vec<String> = t.split('\n').map(String::from).collect();
    if t.ends_with('\n') {
        v.pop();
    }
    v
}

fn reference() -> Checkpoint {
    Checkpoint::load(
        fixtures_dir().join("minilm/reference_embeddings.safetensors"),
        Device::Cpu,
    )
    .unwrap()
}

#[test]
fn tokenization_matches_sentence_transformers() {
    let enc = SentenceEncoder::load(&minilm_dir().unwrap(), Device::Cpu, Kind::Float).unwrap();
    assert_eq!(enc.max_seq_length, 256);
    assert!(enc.normalize);
    let texts = texts();
    let first: Vec<&str> = texts.iter().take(5).map(String::as_str).collect();
    let (ids, mask, padded) = tokenize(&enc.tokenizer, &first).unwrap();
    assert!(padded, "five texts of different lengths pad");
    let r = reference();
    assert!(
        ids.equal(r.tensor("input_ids_first5").unwrap()),
        "ids differ"
    );
    assert!(
        mask.equal(r.tensor("attention_mask_first5").unwrap()),
        "mask differs"
    );
}

#[test]
fn embeddings_match_sentence_transformers() {
    let enc = SentenceEncoder::load(&minilm_dir().unwrap(), Device::Cpu, Kind::Float).unwrap();
    let texts = texts();
    assert!(
        texts.iter().any(String::is_empty),
        "fixture should include an empty line"
    );
    assert!(
        texts.iter().any(|t| t.split_whitespace().count() > 300),
        "fixture should include a long line"
    );
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let ours = enc.encode(&refs, 8).unwrap();
    let theirs = reference();
    let theirs = theirs.tensor("embeddings").unwrap();
    assert_eq!(ours.size(), theirs.size());
    let d = (&ours - theirs).abs().max().double_value(&[]);
    eprintln!("MiniLM f32 max |diff| vs sentence-transformers: {d:.2e}");
    assert!(d <= 1e-4, "max |diff| {d}");
    // Batch size must not matter.
    let ours1 = enc.encode(&refs, 1).unwrap();
    assert!((&ours1 - theirs).abs().max().double_value(&[]) <= 1e-4);
}

#[test]
fn bf16_embeddings_stay_close() {
    let enc = SentenceEncoder::load(&minilm_dir().unwrap(), Device::Cpu, Kind::BFloat16).unwrap();
    let texts = texts();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let ours = enc.encode(&refs, 8).unwrap();
    let theirs = reference();
    let cos =
        (&ours * theirs.tensor("embeddings").unwrap()).sum_dim_intlist(-1, false, Kind::Float);
    let worst = cos.min().double_value(&[]);
    eprintln!("MiniLM bf16 worst cosine vs f32 reference: {worst:.4}");
    assert!(worst > 0.98, "{worst}");
}

#[test]
fn fine_tuning_on_debian_sections_beats_majority_by_far() {
    let splits = load_text_splits(&fixtures_dir().join("debian_sections/sections.tsv.gz")).unwrap();
    assert_eq!(splits.classes.len(), 8);
    let dir = minilm_dir().unwrap();
    tch::manual_seed(0);
    let enc = SentenceEncoder::load(&dir, Device::Cpu, Kind::Float).unwrap();
    let train = TokenizedDataset::new(&enc.tokenizer, &splits.train, 32).unwrap();
    let test = TokenizedDataset::new(&enc.tokenizer, &splits.test, 32).unwrap();
    let model = BertClassifier::new(Bert::load(&dir, Device::Cpu, Kind::Float).unwrap(), 8);
    let mut t = Trainer::new(TrainConfig {
        max_steps: Some(200),
        batch_size: 16,
        lr: 1e-4,
        weight_decay: 0.01,
        schedule: Schedule::Linear { warmup: 20 },
        ..Default::default()
    });
    let r = t.fit(&model, &train, None, &mut []).unwrap();
    let acc = accuracy(&model, &test, 64, Device::Cpu).unwrap();
    let base = majority_baseline(&splits.train.labels, &splits.test.labels);
    eprintln!(
        "MiniLM fine-tune, 200 steps x 16: test accuracy {acc:.4} (majority {base:.4}), {:.1}s, {:.0} ex/s",
        r.seconds, r.examples_per_second
    );
    assert!(acc > base + 0.5, "accuracy {acc} vs majority {base}");
}

#[test]
fn tokenized_batches_know_their_padding_indices_and_task() {
    let enc = SentenceEncoder::load(&minilm_dir().unwrap(), Device::Cpu, Kind::Float).unwrap();
    let data = reuse_core::data::TextDataset {
        texts: vec!["a b c d e f".into(), "a b".into(), "x y".into()],
        labels: vec![0, 1, 2],
    };
    // The position table holds 512 tokens and the encoder truncates at 256: longer
    // is an error, not a silent truncation or an index error inside the model.
    let e = TokenizedDataset::new(&enc.tokenizer, &data, 600)
        .unwrap_err()
        .to_string();
    assert!(e.contains("600") && e.contains("256"), "{e}");
    let d = TokenizedDataset::new(&enc.tokenizer, &data, 16)
        .unwrap()
        .with_task(4);
    use reuse_core::data::BatchSource;
    let b = d.batch(&[0, 1], Device::Cpu).unwrap();
    assert!(b.padded);
    assert_eq!(b.indices, [0, 1]);
    assert_eq!(
        Vec::<i64>::try_from(b.task_ids.as_ref().unwrap()).unwrap(),
        [4, 4]
    );
    let b = d.batch(&[2, 1], Device::Cpu).unwrap();
    assert!(!b.padded, "two texts of the same length need no padding");
    assert!(d
        .batch(&[3], Device::Cpu)
        .unwrap_err()
        .to_string()
        .contains("out of range"));
}
