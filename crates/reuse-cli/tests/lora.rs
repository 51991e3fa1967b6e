//! `reuse embed --adapter`, `reuse lora merge` (checked by loading the result in
//! transformers and sentence-transformers) and `reuse lora train`.

use std::path::PathBuf;
use std::process::{Command, Output};

use reuse_core::models::bert::{l2_normalize, mean_pool};
use reuse_core::Checkpoint;
use reuse_testkit::minilm_dir;
use tch::{Device, Tensor};

fn reuse(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_reuse"))
        .args(args)
        .output()
        .unwrap()
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn peft_ref() -> Checkpoint {
    Checkpoint::load(
        root().join("fixtures/peft/reference_outputs.safetensors"),
        Device::Cpu,
    )
    .unwrap()
}

fn texts(r: &Checkpoint) -> Vec<String> {
    r.metadata()["texts"]
        .split('\n')
        .map(String::from)
        .collect()
}

fn ok(o: &Output) {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn embed_with_a_peft_adapter_matches_peft() {
    let r = peft_ref();
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("t.txt");
    std::fs::write(&t, texts(&r).join("\n") + "\n").unwrap();
    let out = dir.path().join("e.safetensors");
    let model = minilm_dir().unwrap();
    let adapter = root().join("fixtures/peft/lora_qv");
    ok(&reuse(&[
        "embed",
        "--model",
        model.to_str().unwrap(),
        "--texts",
        t.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--device",
        "cpu",
        "--adapter",
        adapter.to_str().unwrap(),
    ]));
    let ours = Checkpoint::load(&out, Device::Cpu).unwrap();
    let expect = l2_normalize(&mean_pool(
        r.tensor("lora_qv.last_hidden_state").unwrap(),
        Some(r.tensor("attention_mask").unwrap()),
    ));
    let d = max_diff(ours.tensor("embeddings").unwrap(), &expect);
    assert!(d <= 1e-4, "{d}");
    // Two adapters: different from either alone.
    let out2 = dir.path().join("e2.safetensors");
    let dora = root().join("fixtures/peft/dora_qv");
    ok(&reuse(&[
        "embed",
        "--model",
        model.to_str().unwrap(),
        "--texts",
        t.to_str().unwrap(),
        "--out",
        out2.to_str().unwrap(),
        "--device",
        "cpu",
        "--adapter",
        adapter.to_str().unwrap(),
        "--adapter",
        dora.to_str().unwrap(),
    ]));
    let two = Checkpoint::load(&out2, Device::Cpu).unwrap();
    assert!(max_diff(two.tensor("embeddings").unwrap(), &expect) > 1e-3);
    // A missing adapter folder is one clear line.
    let o = reuse(&[
        "embed",
        "--model",
        model.to_str().unwrap(),
        "--texts",
        t.to_str().unwrap(),
        "--adapter",
        "/no/adapter",
        "--device",
        "cpu",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("/no/adapter") && err.trim_end().lines().count() == 1,
        "{err}"
    );
}

#[test]
fn merged_model_loads_in_transformers_and_sentence_transformers() {
    let r = peft_ref();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merged");
    let model = minilm_dir().unwrap();
    for name in ["lora_qv", "dora_qv"] {
        let out = out.with_file_name(format!("merged_{name}"));
        let adapter = root().join("fixtures/peft").join(name);
        ok(&reuse(&[
            "lora",
            "merge",
            "--model",
            model.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]));
        for f in [
            "config.json",
            "tokenizer.json",
            "modules.json",
            "sentence_bert_config.json",
            "1_Pooling/config.json",
            "model.safetensors",
        ] {
            assert!(out.join(f).exists(), "{f} missing");
        }
        let merged = Checkpoint::load(out.join("model.safetensors"), Device::Cpu).unwrap();
        let base = Checkpoint::load(model.join("model.safetensors"), Device::Cpu).unwrap();
        let mut names: Vec<&str> = base
            .names()
            .filter(|n| *n != "embeddings.position_ids")
            .collect();
        names.sort();
        assert_eq!(
            merged.names().collect::<Vec<_>>(),
            names,
            "key names differ from the base's"
        );
        // Python loads it: transformers gives PEFT's adapted output; sentence-transformers
        // gives its pooled, normalised form.
        let inputs = dir.path().join("in.safetensors");
        let mut ck = Checkpoint::new();
        ck.insert("input_ids", r.tensor("input_ids").unwrap().copy());
        ck.insert("attention_mask", r.tensor("attention_mask").unwrap().copy());
        ck.set_metadata("texts", texts(&r).join("\n"));
        ck.save(&inputs).unwrap();
        let res = dir.path().join(format!("{name}.out.safetensors"));
        let o = Command::new(root().join(".venv/bin/python"))
            .arg(root().join("fixtures/peft/hf_forward.py"))
            .args([out.as_os_str(), inputs.as_os_str(), res.as_os_str()])
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap();
        ok(&o);
        let py = Checkpoint::load(&res, Device::Cpu).unwrap();
        let expect = r.tensor(&format!("{name}.last_hidden_state")).unwrap();
        let d = max_diff(py.tensor("last_hidden_state").unwrap(), expect);
        assert!(
            d <= 1e-4,
            "{name}: transformers on the merged model vs PEFT: {d}"
        );
        let emb = l2_normalize(&mean_pool(
            expect,
            Some(r.tensor("attention_mask").unwrap()),
        ));
        let d = max_diff(py.tensor("st_embeddings").unwrap(), &emb);
        assert!(
            d <= 1e-4,
            "{name}: sentence-transformers on the merged model: {d}"
        );
    }
    // The output folder is never overwritten.
    let again = dir.path().join("merged_lora_qv");
    let o = reuse(&[
        "lora",
        "merge",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        root().join("fixtures/peft/lora_qv").to_str().unwrap(),
        "--out",
        again.to_str().unwrap(),
    ]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("already exists"));
}

#[test]
fn lora_train_writes_a_peft_adapter_that_beats_majority() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("adapter");
    let model = minilm_dir().unwrap();
    let data = root().join("fixtures/debian_sections");
    let o = reuse(&[
        "lora",
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
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
    ]);
    ok(&o);
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("train_metrics.json")).unwrap()).unwrap();
    let acc = m["test_accuracy"].as_f64().unwrap();
    let base = m["majority_baseline"].as_f64().unwrap();
    eprintln!("reuse lora train, 60 steps: test accuracy {acc:.4} (majority {base:.4})");
    assert!(acc > base + 0.3, "{acc} vs {base}");
    assert_eq!(m["trainable_params"], 73_728 + 384 * 8 + 8);
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["modules_to_save"], serde_json::json!(["classifier"]));
    let ck = Checkpoint::load(out.join("adapter_model.safetensors"), Device::Cpu).unwrap();
    assert!(ck.get("base_model.model.classifier.weight").is_some());
    assert!(ck
        .get("base_model.model.encoder.layer.5.attention.self.value.lora_B.weight")
        .is_some());
}
