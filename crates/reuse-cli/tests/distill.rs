//! `reuse distill cache` end to end on a tiny BERT (MiniLM's tokenizer, random weights)
//! with a LoRA classifier adapter: the cache holds the teacher's top-k; running again
//! keeps it; another teacher, too large a k and a class mismatch are one-line errors that
//! change nothing on disk.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use reuse_core::data::labelled::{load_labelled, LabelledOptions};
use reuse_core::data::BatchSource;
use reuse_core::models::{Bert, BertClassifier, BertConfig, SentenceEncoder, TokenizedDataset};
use reuse_core::trainer::ForwardOptions;
use reuse_distill::{dataset_fingerprint, Teacher, TeacherCache};
use reuse_peft::{LoraConfig, LoraModel};
use tch::{Device, Kind};

mod common;
use common::{ok, reuse};

fn one_line_error(o: &Output, needles: &[&str]) {
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    let last = err.trim_end().lines().last().unwrap_or("");
    assert!(last.starts_with("error: "), "{err}");
    for n in needles {
        assert!(last.contains(n), "`{n}` not in: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
}

/// A tiny random BERT folder that reads MiniLM's tokenizer.
fn tiny_base(dir: &Path) -> PathBuf {
    let base = dir.join("tiny");
    tch::manual_seed(0);
    let bert = Bert::random(BertConfig::tiny(30522, 16, 1), Device::Cpu).unwrap();
    bert.save(&base).unwrap();
    let minilm = reuse_testkit::minilm_dir().unwrap();
    std::fs::copy(minilm.join("tokenizer.json"), base.join("tokenizer.json")).unwrap();
    base
}

/// A LoRA classifier adapter on `base`, as `reuse lora train` writes one.
fn adapter(dir: &Path, base: &Path, seed: i64, classes: &[&str]) -> PathBuf {
    let out = dir.join(format!("adapter-{seed}"));
    tch::manual_seed(seed);
    let bert = Bert::load(base, Device::Cpu, Kind::Float).unwrap();
    let mut cfg = LoraConfig::new(4, 8.0, &["query", "value"]);
    cfg.modules_to_save = Some(vec!["classifier".into()]);
    cfg.base_model_name_or_path = Some(base.display().to_string());
    cfg.extra
        .insert("reuse_classes".into(), serde_json::json!(classes));
    let mut lm = LoraModel::new(BertClassifier::new(bert, classes.len() as i64));
    lm.add_adapter("default", cfg).unwrap();
    lm.save_adapter("default", &out).unwrap();
    out
}

fn csv(dir: &Path, name: &str, classes: &[&str]) -> PathBuf {
    let mut s = String::from("sentence,category\n");
    for i in 0..30 {
        let c = classes[i % classes.len()];
        s.push_str(&format!("\"a {c} thing, number {i}\",{c}\n"));
    }
    let p = dir.join(name);
    std::fs::write(&p, s).unwrap();
    p
}

fn listing(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn distill_cache_stores_the_teachers_top_k_and_refuses_mismatches() {
    let dir = tempfile::tempdir().unwrap();
    let base = tiny_base(dir.path());
    let teacher = adapter(dir.path(), &base, 1, &["fruit", "tool"]);
    let data = csv(dir.path(), "items.csv", &["fruit", "tool"]);
    let out = dir.path().join("cache");
    let (t, d, o) = (
        teacher.to_str().unwrap(),
        data.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    let common = [
        "--data",
        d,
        "--text-column",
        "sentence",
        "--label-column",
        "category",
        "--split",
        "all",
        "--max-len",
        "12",
        "--batch-size",
        "8",
        "--shard-size",
        "16",
        "--device",
        "cpu",
    ];
    let run = |teacher: &str, extra: &[&str]| {
        let mut a = vec!["distill", "cache", "--teacher", teacher, "--out", o];
        a.extend_from_slice(&common);
        a.extend_from_slice(extra);
        reuse(&a)
    };
    let first = run(t, &["--top-k", "2"]);
    ok(&first);
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert!(
        stdout.contains("cached 30 examples in 2 shards") && stdout.contains("bytes per example"),
        "{stdout}"
    );

    // The cache holds the teacher's top-2 log-probs (f16) of the tokenized data and
    // records its fingerprints.
    let enc = SentenceEncoder::load(&base, Device::Cpu, Kind::Float).unwrap();
    let mut live = LoraModel::new(BertClassifier::new(enc.bert, 2));
    live.load_adapter(&teacher, "default").unwrap();
    let opts = LabelledOptions {
        text_column: "sentence".into(),
        label_column: "category".into(),
        ..Default::default()
    };
    let s = load_labelled(&data, &opts).unwrap();
    let mut all = s.train;
    for part in [s.dev, s.test] {
        all.texts.extend(part.texts);
        all.labels.extend(part.labels);
    }
    let tokens = TokenizedDataset::new(&enc.tokenizer, &all, 12).unwrap();
    let cache = TeacherCache::open(
        &out,
        Some(&live.fingerprint()),
        Some(&dataset_fingerprint(&tokens).unwrap()),
    )
    .unwrap();
    cache.verify().unwrap();
    assert_eq!((cache.len(), cache.num_classes()), (30, 2));
    assert_eq!(cache.manifest().spec.dtype, "f16");
    let idx = [29i64, 3, 17, 0];
    let got = cache.lookup(&idx, Device::Cpu).unwrap();
    let logits = live
        .teach(
            &tokens.batch(&idx, Device::Cpu).unwrap(),
            ForwardOptions::default(),
        )
        .unwrap()
        .logits;
    let (v, i) = logits.log_softmax(-1, Kind::Float).topk(2, -1, true, true);
    assert!(got.topk_indices.unwrap().equal(&i));
    assert!(got.topk_logprobs.unwrap().allclose(&v, 1e-3, 1e-3, false));

    // Again with the same arguments: kept as it is.
    let before = listing(&out);
    ok(&run(t, &["--top-k", "2"]));
    assert_eq!(listing(&out), before);

    // Another teacher into the same folder: refused, nothing changed.
    let other = adapter(dir.path(), &base, 2, &["fruit", "tool"]);
    let o2 = run(other.to_str().unwrap(), &["--top-k", "2"]);
    one_line_error(&o2, &["teacher (fingerprint)", "refusing"]);
    assert_eq!(listing(&out), before);
    // Another configuration too.
    one_line_error(&run(t, &[]), &["top_k"]);
    assert_eq!(listing(&out), before);

    // k above the class count, and data with other classes: refused before any file.
    let fresh = dir.path().join("fresh");
    let f = fresh.to_str().unwrap();
    let mut a = vec!["distill", "cache", "--teacher", t];
    a.extend_from_slice(&common);
    a.extend_from_slice(&["--top-k", "3", "--out", f]);
    one_line_error(&reuse(&a), &["--top-k 3", "2 classes"]);
    let three = csv(dir.path(), "three.csv", &["fruit", "tool", "toy"]);
    let mut a = vec!["distill", "cache", "--teacher", t, "--out", f];
    a.extend_from_slice(&[
        "--data",
        three.to_str().unwrap(),
        "--text-column",
        "sentence",
        "--label-column",
        "category",
        "--device",
        "cpu",
    ]);
    one_line_error(&reuse(&a), &["class mismatch", "toy"]);
    assert!(!fresh.exists());

    // Unlabelled text, one per line, with the base model and --adapter.
    let lines = dir.path().join("texts.txt");
    std::fs::write(&lines, "one text\nanother one\na third\n").unwrap();
    let lo = dir.path().join("lines");
    ok(&reuse(&[
        "distill",
        "cache",
        "--teacher",
        base.to_str().unwrap(),
        "--adapter",
        t,
        "--data",
        lines.to_str().unwrap(),
        "--out",
        lo.to_str().unwrap(),
        "--device",
        "cpu",
    ]));
    let c = TeacherCache::open(&lo, Some(&live.fingerprint()), None).unwrap();
    assert_eq!(c.len(), 3);
    assert_eq!(c.manifest().spec.top_k, None);
    assert_eq!(
        c.lookup(&[0, 1, 2], Device::Cpu)
            .unwrap()
            .logits
            .unwrap()
            .size(),
        [3, 2]
    );
}

#[test]
fn distill_cache_help() {
    let o = reuse(&["distill", "cache", "--help"]);
    assert!(o.status.success());
    let h = String::from_utf8_lossy(&o.stdout);
    assert!(h.contains("--top-k") && h.contains("--adapter") && h.contains("lora train"));
}

#[test]
fn distill_cache_on_two_ranks_writes_the_cache_one_process_writes() {
    let dir = tempfile::tempdir().unwrap();
    let base = tiny_base(dir.path());
    let teacher = adapter(dir.path(), &base, 1, &["fruit", "tool"]);
    let data = csv(dir.path(), "items.csv", &["fruit", "tool"]);
    let args = |out: &Path| -> Vec<String> {
        [
            "distill",
            "cache",
            "--teacher",
            teacher.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--text-column",
            "sentence",
            "--label-column",
            "category",
            "--split",
            "all",
            "--max-len",
            "12",
            "--batch-size",
            "4",
            "--shard-size",
            "8",
            "--top-k",
            "2",
            "--device",
            "cpu",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let one = dir.path().join("one");
    let a: Vec<String> = args(&one);
    ok(&reuse(&a.iter().map(String::as_str).collect::<Vec<_>>()));
    let two = dir.path().join("two");
    let o = Command::new(env!("CARGO_BIN_EXE_reuse"))
        .args(["launch", "-n", "2", "--", "reuse"])
        .args(args(&two))
        .output()
        .unwrap();
    ok(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    // 30 examples in shards of 8: rank 0 runs the teacher over shards 1 and 3, rank 1
    // over 2 and 4; rank 0 then keeps all four and writes the manifest.
    for line in [
        "rank 0: shard 1/4 written",
        "rank 1: shard 2/4 written",
        "rank 0: shard 3/4 written",
        "rank 1: shard 4/4 written",
        "shard 4/4 kept",
    ] {
        assert!(err.contains(line), "missing `{line}` in:\n{err}");
    }
    assert!(!err.contains("rank 0: shard 2/4"), "{err}");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout)
            .matches("cached 30 examples")
            .count(),
        1
    );
    // Byte for byte the single process's cache (shards and manifest).
    assert_eq!(listing(&one), listing(&two));
}
