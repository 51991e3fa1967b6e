//! The `reuse` binary end to end: inspect, embed, and one-line errors.

use std::path::PathBuf;
use std::process::Output;

use reuse_core::Checkpoint;
use tch::{Device, Kind, Tensor};

mod common;
use common::reuse;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn minilm() -> String {
    reuse_testkit::minilm_dir().unwrap().display().to_string()
}

fn assert_one_line_error(o: &Output, needle: &str) {
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    assert!(err.starts_with("error: ") && err.contains(needle), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn help_on_every_command() {
    for args in [
        vec!["--help"],
        vec!["inspect", "--help"],
        vec!["embed", "--help"],
    ] {
        let o = reuse(&args);
        assert!(o.status.success());
        assert!(String::from_utf8_lossy(&o.stdout).contains("Usage"));
    }
}

#[test]
fn inspect_lists_tensors_and_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.safetensors");
    let mut ck = Checkpoint::new();
    ck.insert("w", Tensor::zeros([3, 4], (Kind::BFloat16, Device::Cpu)));
    ck.insert("b", Tensor::zeros([4], (Kind::Int64, Device::Cpu)));
    ck.set_metadata("format", "pt");
    ck.save(&p).unwrap();
    let o = reuse(&["inspect", p.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["parameters"], 16);
    assert_eq!(v["metadata"]["format"], "pt");
    assert_eq!(v["tensors"][1]["name"], "w");
    assert_eq!(v["tensors"][1]["dtype"], "BF16");
    assert_eq!(v["tensors"][1]["shape"], serde_json::json!([3, 4]));
    let o = reuse(&["inspect", p.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("2 tensors, 16 parameters") && text.contains("metadata format = pt"),
        "{text}"
    );
    // Truncated file: one clear line naming it.
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 3]).unwrap();
    assert_one_line_error(&reuse(&["inspect", p.to_str().unwrap()]), "x.safetensors");
    assert_one_line_error(
        &reuse(&["inspect", "/no/such.safetensors"]),
        "/no/such.safetensors",
    );
}

#[test]
fn embed_matches_sentence_transformers_reference() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("e.safetensors");
    let texts = fixtures().join("minilm/texts.txt");
    let o = reuse(&[
        "embed",
        "--model",
        &minilm(),
        "--texts",
        texts.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--device",
        "cpu",
        "--batch-size",
        "4",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ours = Checkpoint::load(&out, Device::Cpu).unwrap();
    let r = Checkpoint::load(
        fixtures().join("minilm/reference_embeddings.safetensors"),
        Device::Cpu,
    )
    .unwrap();
    let (a, b) = (
        ours.tensor("embeddings").unwrap(),
        r.tensor("embeddings").unwrap(),
    );
    assert_eq!(a.kind(), Kind::Float);
    assert_eq!(a.size(), b.size());
    let d = (a - b).abs().max().double_value(&[]);
    assert!(d <= 1e-4, "max |diff| {d}");
}

#[test]
fn embed_writes_json_lines_without_out() {
    let dir = tempfile::tempdir().unwrap();
    let texts = dir.path().join("t.txt");
    std::fs::write(&texts, "a cat\n\nthe longest line here\n").unwrap();
    let o = reuse(&[
        "embed",
        "--model",
        &minilm(),
        "--texts",
        texts.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[1]["index"], 1);
    let e = lines[2]["embedding"].as_array().unwrap();
    assert_eq!(e.len(), 384);
    let norm: f64 = e
        .iter()
        .map(|x| x.as_f64().unwrap().powi(2))
        .sum::<f64>()
        .sqrt();
    assert!((norm - 1.0).abs() < 1e-4, "{norm}");
}

#[test]
fn embed_errors_are_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let texts = dir.path().join("t.txt");
    std::fs::write(&texts, "hello\n").unwrap();
    let t = texts.to_str().unwrap();
    assert_one_line_error(
        &reuse(&[
            "embed",
            "--model",
            "/no/model",
            "--texts",
            t,
            "--device",
            "cpu",
        ]),
        "/no/model",
    );
    assert_one_line_error(
        &reuse(&[
            "embed",
            "--model",
            &minilm(),
            "--texts",
            "/no/texts.txt",
            "--device",
            "cpu",
        ]),
        "/no/texts.txt",
    );
    assert_one_line_error(
        &reuse(&[
            "embed",
            "--model",
            &minilm(),
            "--texts",
            t,
            "--dtype",
            "f64",
            "--device",
            "cpu",
        ]),
        "--dtype",
    );
    // A model folder with a broken tokenizer.json.
    let bad = dir.path().join("model");
    std::fs::create_dir(&bad).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(PathBuf::from(minilm()).join(f), bad.join(f)).unwrap();
    }
    std::fs::write(bad.join("tokenizer.json"), "{ not json").unwrap();
    assert_one_line_error(
        &reuse(&[
            "embed",
            "--model",
            bad.to_str().unwrap(),
            "--texts",
            t,
            "--device",
            "cpu",
        ]),
        "tokenizer.json",
    );
}
