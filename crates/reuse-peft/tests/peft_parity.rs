//! Parity with Hugging Face PEFT, both ways, on all-MiniLM-L6-v2.
//!
//! Python -> Rust: adapters made by PEFT (`fixtures/peft/make_adapters.py`, non-zero B;
//! LoRA, rsLoRA with patterns, DoRA) give PEFT's outputs in Rust.
//! Rust -> Python: adapters saved here load in PEFT (`fixtures/peft/peft_forward.py`,
//! run with the `.venv` python that `cargo xtask setup` makes) with the same outputs.

use std::path::{Path, PathBuf};
use std::process::Command;

use reuse_core::models::Bert;
use reuse_core::ForwardOptions;
use reuse_core::{Checkpoint, Model};
use reuse_peft::config::InitLoraWeights;
use reuse_peft::{LoraConfig, LoraModel, PeftError};
use reuse_testkit::minilm_dir;
use tch::{Device, Kind, Tensor};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/peft")
}

fn reference() -> Checkpoint {
    Checkpoint::load(
        fixtures().join("reference_outputs.safetensors"),
        Device::Cpu,
    )
    .unwrap()
}

fn bert() -> Bert {
    Bert::load(&minilm_dir().unwrap(), Device::Cpu, Kind::Float).unwrap()
}

fn hidden(b: &Bert, r: &Checkpoint) -> Tensor {
    tch::no_grad(|| {
        b.forward(
            r.tensor("input_ids").unwrap(),
            Some(r.tensor("attention_mask").unwrap()),
            None,
            false,
            ForwardOptions::default(),
        )
        .unwrap()
        .last_hidden_state
    })
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn base_model_matches_transformers() {
    let r = reference();
    let d = max_diff(
        &hidden(&bert(), &r),
        r.tensor("base.last_hidden_state").unwrap(),
    );
    assert!(d <= 1e-4, "base max |diff| {d}");
}

#[test]
fn peft_adapters_give_peft_outputs_in_rust() {
    let r = reference();
    let base = r.tensor("base.last_hidden_state").unwrap();
    for name in ["lora_qv", "rslora_mix", "dora_qv"] {
        let mut m = LoraModel::new(bert());
        let modules = m
            .load_adapter(&fixtures().join(name), name)
            .unwrap()
            .modules;
        let expect = r.tensor(&format!("{name}.last_hidden_state")).unwrap();
        assert!(
            max_diff(expect, base) > 1e-2,
            "{name}: fixture adapter does not change the output"
        );
        let d = max_diff(&hidden(&m.model, &r), expect);
        eprintln!(
            "{name}: {} modules, max |diff| vs PEFT {d:.2e}",
            modules.len()
        );
        assert!(d <= 1e-4, "{name}: max |diff| {d}");
        // Merged forward agrees too, and unmerge restores the base weights.
        let w0 = m.model.layers[0].query.weight.detach().copy();
        m.merge_adapter(&[name]).unwrap();
        let dm = max_diff(&hidden(&m.model, &r), expect);
        assert!(dm <= 1e-4, "{name}: merged max |diff| {dm}");
        m.unmerge_adapter().unwrap();
        assert!(max_diff(&m.model.layers[0].query.weight, &w0) < 1e-6);
    }
    // rslora_mix: rank_pattern and layers_to_transform were honoured.
    let mut m = LoraModel::new(bert());
    let modules = m
        .load_adapter(&fixtures().join("rslora_mix"), "x")
        .unwrap()
        .modules;
    assert!(modules.iter().all(
        |p| ["encoder.layer.0.", "encoder.layer.2.", "encoder.layer.5."]
            .iter()
            .any(|l| p.starts_with(l))
    ));
    assert_eq!(modules.len(), 3 * 6);
}

fn python() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    assert!(
        p.exists(),
        "{} missing: run `cargo xtask setup`",
        p.display()
    );
    p
}

fn peft_forward(adapter: &Path, inputs: &Path, out: &Path, merge: bool) -> Tensor {
    let mut cmd = Command::new(python());
    cmd.arg(fixtures().join("peft_forward.py"))
        .arg(minilm_dir().unwrap())
        .arg(adapter)
        .arg(inputs)
        .arg(out)
        .env("HF_HUB_OFFLINE", "1");
    if merge {
        cmd.arg("--merge");
    }
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "peft_forward.py failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Checkpoint::load(out, Device::Cpu)
        .unwrap()
        .tensor("last_hidden_state")
        .unwrap()
        .copy()
}

#[test]
fn rust_adapters_load_in_peft_with_the_same_outputs() {
    let r = reference();
    let dir = tempfile::tempdir().unwrap();
    let inputs = dir.path().join("inputs.safetensors");
    let mut ck = Checkpoint::new();
    ck.insert("input_ids", r.tensor("input_ids").unwrap().copy());
    ck.insert("attention_mask", r.tensor("attention_mask").unwrap().copy());
    ck.save(&inputs).unwrap();
    let mut rs = LoraConfig::new(4, 8.0, &["query", "key", "dense"]);
    rs.use_rslora = true;
    rs.init_lora_weights = InitLoraWeights::Bool(false);
    rs.rank_pattern.insert("intermediate.dense".into(), 2);
    let mut dora = LoraConfig::new(8, 16.0, &["value", "output.dense"]);
    dora.use_dora = true;
    dora.init_lora_weights = InitLoraWeights::Bool(false);
    for (name, cfg) in [("rs", rs), ("dora", dora)] {
        tch::manual_seed(7);
        let mut m = LoraModel::new(bert());
        m.add_adapter(name, cfg).unwrap();
        let ours = hidden(&m.model, &r);
        assert!(max_diff(&ours, r.tensor("base.last_hidden_state").unwrap()) > 1e-2);
        let adir = dir.path().join(name);
        m.save_adapter(name, &adir).unwrap();
        let theirs = peft_forward(
            &adir,
            &inputs,
            &dir.path().join(format!("{name}.out")),
            false,
        );
        let d = max_diff(&ours, &theirs);
        eprintln!("{name}: Rust-saved adapter in PEFT, max |diff| {d:.2e}");
        assert!(d <= 1e-4, "{name}: {d}");
        let merged = peft_forward(
            &adir,
            &inputs,
            &dir.path().join(format!("{name}.m.out")),
            true,
        );
        assert!(max_diff(&ours, &merged) <= 1e-4);
        // And it reads back in Rust to the same outputs.
        let mut back = LoraModel::new(bert());
        back.load_adapter(&adir, name).unwrap();
        assert!(max_diff(&hidden(&back.model, &r), &ours) <= 1e-5);
    }
}

#[test]
fn minimal_config_and_mismatches() {
    let dir = tempfile::tempdir().unwrap();
    // The minimal config PEFT accepts.
    let src = fixtures().join("lora_qv");
    let min = dir.path().join("min");
    std::fs::create_dir(&min).unwrap();
    std::fs::copy(
        src.join("adapter_model.safetensors"),
        min.join("adapter_model.safetensors"),
    )
    .unwrap();
    std::fs::write(
        min.join("adapter_config.json"),
        r#"{"peft_type": "LORA", "target_modules": ["query", "value"], "r": 8, "lora_alpha": 16}"#,
    )
    .unwrap();
    let r = reference();
    let mut m = LoraModel::new(bert());
    m.load_adapter(&min, "min").unwrap();
    assert!(
        max_diff(
            &hidden(&m.model, &r),
            r.tensor("lora_qv.last_hidden_state").unwrap()
        ) <= 1e-4
    );

    // Wrong rank in the config: the shapes do not fit; the model is untouched.
    std::fs::write(
        min.join("adapter_config.json"),
        r#"{"peft_type": "LORA", "target_modules": ["query", "value"], "r": 4}"#,
    )
    .unwrap();
    let mut m = LoraModel::new(bert());
    let before = m.model.params().snapshot();
    let e = m.load_adapter(&min, "x").unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(e, PeftError::Mismatch { .. })
            && msg.contains("adapter_model.safetensors")
            && msg.contains("lora_A.weight")
            && msg.contains("[4, 384]"),
        "{msg}"
    );
    assert!(m.adapter_names().is_empty());
    for (n, t) in m.model.params().iter() {
        assert!(t.equal(before.get(n).unwrap()), "{n} changed");
    }
    assert_eq!(m.model.params().len(), before.names().count());

    // Wrong base: a tiny BERT has neither the modules' shapes.
    std::fs::write(
        min.join("adapter_config.json"),
        r#"{"peft_type": "LORA", "target_modules": ["query", "value"], "r": 8}"#,
    )
    .unwrap();
    let mut tiny = LoraModel::new(
        Bert::random(reuse_core::models::BertConfig::tiny(50, 32, 2), Device::Cpu).unwrap(),
    );
    let e = tiny.load_adapter(&min, "x").unwrap_err().to_string();
    assert!(
        e.contains("encoder.layer.2") || e.contains("[8, 32]"),
        "{e}"
    );
    assert!(tiny.model.linear_paths().len() == 12 && tiny.adapter_names().is_empty());

    // A config whose targets match nothing lists the model's linears.
    let mut m = LoraModel::new(bert());
    let e = m
        .add_adapter("q", LoraConfig::new(8, 8.0, &["q_proj", "v_proj"]))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("q_proj") && e.contains("encoder.layer.0.attention.self.query"),
        "{e}"
    );
}
