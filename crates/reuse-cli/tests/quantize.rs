//! `reuse quantize` on the real MiniLM: the int8 folder is smaller, `reuse embed` loads
//! it like any model folder and its embeddings of real texts stay close to f32's; bad
//! requests are one-line errors that write nothing.

use std::path::{Path, PathBuf};
use std::process::Command;

use reuse_core::Checkpoint;
use reuse_testkit::minilm_dir;
use tch::{Device, Kind, Tensor};

mod common;
use common::{ok, reuse, root};

fn texts() -> PathBuf {
    root().join("fixtures/minilm/texts.txt")
}

fn embed(dir: &Path, out: &Path) -> Tensor {
    embed_texts(dir, &texts(), None, out)
}

/// `reuse embed` of `texts` with the model in `dir` (and an adapter), read back.
fn embed_texts(dir: &Path, texts: &Path, adapter: Option<&Path>, out: &Path) -> Tensor {
    let mut args = vec![
        "embed",
        "--model",
        dir.to_str().unwrap(),
        "--texts",
        texts.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--device",
        "cpu",
    ];
    if let Some(a) = adapter {
        args.extend(["--adapter", a.to_str().unwrap()]);
    }
    ok(&reuse(&args));
    Checkpoint::load(out, Device::Cpu)
        .unwrap()
        .tensor("embeddings")
        .unwrap()
        .shallow_clone()
}

#[test]
fn int8_folder_embeds_like_the_original() {
    let src = minilm_dir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("minilm-int8");
    let stdout = ok(&reuse(&[
        "quantize",
        "--model",
        src.to_str().unwrap(),
        "--bits",
        "8",
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]));
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["quantization_config"]["bits"], 8);
    assert_eq!(report["quantization_config"]["method"], "rtn");
    let ratio = report["size_ratio"].as_f64().unwrap();
    assert!(ratio < 0.68, "size ratio {ratio}");
    let a = embed(&src, &tmp.path().join("f32.safetensors"));
    let b = embed(&out, &tmp.path().join("int8.safetensors"));
    let cos = (&a * &b).sum_dim_intlist(1, false, Kind::Float)
        / (a.norm_scalaropt_dim(2, [1].as_slice(), false)
            * b.norm_scalaropt_dim(2, [1].as_slice(), false));
    let min = cos.min().double_value(&[]);
    assert!(min > 0.995, "int8 embedding cosine min {min}");
    assert!(
        (&a - &b).abs().max().double_value(&[]) > 0.0,
        "int8 changed nothing"
    );
}

#[test]
fn bad_requests_are_one_line_errors_and_write_nothing() {
    let src = minilm_dir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("q");
    for (args, expect) in [
        (vec!["--bits", "3"], "--bits must be 8 or 4, found 3"),
        (
            vec!["--bits", "4", "--group-size", "100"],
            "group size 100 does not divide the input dimension 384",
        ),
        (
            vec!["--bits", "4", "--act-order"],
            "--act-order is a GPTQ setting",
        ),
        (
            vec!["--bits", "4", "--calibration", "/nonexistent/texts.txt"],
            "/nonexistent/texts.txt",
        ),
    ] {
        let mut all = vec![
            "quantize",
            "--model",
            src.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        all.extend(args);
        let o = reuse(&all);
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(expect), "{all:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(!out.exists(), "{all:?} wrote {}", out.display());
    }
}

/// QLoRA: LoRA trained by `reuse lora train` on an int4 base learns the task, saves in
/// PEFT's format, and loads in PEFT on the dequantized base (`reuse dequantize`) with
/// the embeddings `reuse embed --adapter` gives on the quantized base.
#[test]
fn lora_on_an_int4_base_loads_in_peft_on_the_dequantized_base() {
    let src = minilm_dir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let q4 = tmp.path().join("q4");
    ok(&reuse(&[
        "quantize",
        "--model",
        src.to_str().unwrap(),
        "--bits",
        "4",
        "--group-size",
        "64",
        "--out",
        q4.to_str().unwrap(),
    ]));
    let adapter = tmp.path().join("adapter");
    ok(&reuse(&[
        "lora",
        "train",
        "--model",
        q4.to_str().unwrap(),
        "--data",
        root().join("fixtures/debian_sections").to_str().unwrap(),
        "--out",
        adapter.to_str().unwrap(),
        "--max-steps",
        "60",
        "--batch-size",
        "16",
        "--max-len",
        "32",
        "--lr",
        "2e-3",
        "--device",
        "cpu",
    ]));
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(adapter.join("train_metrics.json")).unwrap())
            .unwrap();
    let (acc, base) = (
        m["test_accuracy"].as_f64().unwrap(),
        m["majority_baseline"].as_f64().unwrap(),
    );
    assert!(
        acc > base + 0.3,
        "QLoRA test accuracy {acc} vs majority {base}"
    );
    // Only the adapter and head train: the int4 weights are buffers.
    assert_eq!(m["trainable_params"], 73_728 + 384 * 8 + 8);

    let dense = tmp.path().join("q4-dense");
    ok(&reuse(&[
        "dequantize",
        "--model",
        q4.to_str().unwrap(),
        "--out",
        dense.to_str().unwrap(),
    ]));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dense.join("config.json")).unwrap()).unwrap();
    assert!(cfg.get("quantization_config").is_none());

    let texts = tmp.path().join("texts.txt");
    std::fs::write(
        &texts,
        "network traffic analyzer\nphoto editing program\nchess engine with a GUI\nmail transfer agent\n",
    )
    .unwrap();
    let ours = embed_texts(
        &q4,
        &texts,
        Some(&adapter),
        &tmp.path().join("emb.safetensors"),
    );
    let py_out = tmp.path().join("peft.safetensors");
    let o = Command::new(root().join(".venv/bin/python"))
        .arg(root().join("fixtures/quant/peft_embed.py"))
        .args([
            dense.as_os_str(),
            adapter.as_os_str(),
            texts.as_os_str(),
            py_out.as_os_str(),
        ])
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    ok(&o);
    let theirs = Checkpoint::load(&py_out, Device::Cpu)
        .unwrap()
        .tensor("embeddings")
        .unwrap()
        .shallow_clone();
    let d = (&ours - &theirs).abs().max().double_value(&[]);
    assert!(
        d <= 1e-4,
        "reuse (int4 base) vs PEFT (dequantized base): {d}"
    );
    // And the adapter does something: without it the embeddings differ.
    let plain = embed_texts(&q4, &texts, None, &tmp.path().join("plain.safetensors"));
    let moved = (&plain - &ours).abs().max().double_value(&[]);
    assert!(
        moved > 1e-3,
        "the adapter changed the embeddings by only {moved}"
    );

    // Merged into the int4 base: requantized, still an int4 folder, close to base +
    // adapter, with the added error printed.
    let merged = tmp.path().join("merged");
    let o = reuse(&[
        "lora",
        "merge",
        "--model",
        q4.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ]);
    ok(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("requantizing 12 linears"), "{err}");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(merged.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["quantization_config"]["bits"], 4);
    let m_emb = embed_texts(
        &merged,
        &texts,
        None,
        &tmp.path().join("merged.safetensors"),
    );
    let cos = (&m_emb * &ours).sum_dim_intlist(1, false, Kind::Float);
    // A second int4 rounding (measured: relative weight error about 5%, embedding
    // cosine 0.94-0.96 to base + adapter): the price of a merged int4 model, which the
    // command prints; merging into the dequantized folder is exact.
    let min = cos.min().double_value(&[]);
    assert!(min > 0.9, "merged int4 vs int4 + adapter: cosine min {min}");
    let rel: f64 = err
        .split("relative (Frobenius) ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|r| r.parse().ok())
        .expect("the relative error is printed");
    assert!(rel > 0.0 && rel < 0.1, "relative error {rel}");
}
