//! Parity with Hugging Face PEFT on a causal LM, both ways, on the real SmolLM2-135M
//! GGUF (dequantized to f32, as transformers loads it).
//!
//! Python -> Rust: an adapter PEFT trained (`fixtures/peft_llm/make_reference.py`) gives
//! PEFT's logits in reuse. Rust -> Python: an adapter made here (non-zero B on every
//! linear) loads in PEFT (`fixtures/peft_llm/peft_logits.py`, run with the `.venv`
//! python) with reuse's logits. Both to 1e-4 of the logits' scale.

use std::path::{Path, PathBuf};
use std::process::Command;

use reuse_core::data::lm::encode;
use reuse_core::models::lm::LanguageModel;
use reuse_core::models::LoadOptions;
use reuse_core::Checkpoint;
use reuse_peft::config::{InitLoraWeights, TargetModules};
use reuse_peft::{LoraConfig, LoraModel};
use tch::{Device, Kind, Tensor};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/peft_llm")
}

fn texts() -> Vec<String> {
    std::fs::read_to_string(fixtures().join("texts.txt"))
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(String::from)
        .collect()
}

fn load(gguf: &Path) -> LanguageModel {
    LanguageModel::load(gguf, &LoadOptions::new(Device::Cpu, Kind::Float)).unwrap()
}

/// Per text: the ids, the logits of the first 256 vocabulary entries, and each next
/// token's NLL, as `peft_logits.py` writes them.
fn ours(lm: &LanguageModel, texts: &[String]) -> Vec<(Vec<i64>, Tensor, Tensor)> {
    texts
        .iter()
        .map(|t| {
            let ids = encode(&lm.tokenizer, t, true).unwrap();
            let x = Tensor::from_slice(&ids).unsqueeze(0);
            let logits = tch::no_grad(|| {
                let o = lm
                    .model
                    .forward(&x, None, None, false, Default::default())
                    .unwrap();
                lm.model.logits(&o.last_hidden_state, false).unwrap()
            })
            .squeeze_dim(0)
            .to_kind(Kind::Float);
            let n = ids.len() as i64;
            let nll = logits
                .narrow(0, 0, n - 1)
                .log_softmax(-1, Kind::Float)
                .gather(1, &x.squeeze_dim(0).narrow(0, 1, n - 1).unsqueeze(1), false)
                .squeeze_dim(1)
                .neg();
            (ids, logits.narrow(1, 0, 256), nll)
        })
        .collect()
}

/// Compares with a `peft_logits.py` file; returns the largest logit difference.
fn compare(got: &[(Vec<i64>, Tensor, Tensor)], want: &Checkpoint, what: &str) -> f64 {
    let mut worst: f64 = 0.0;
    for (i, (ids, slice, nll)) in got.iter().enumerate() {
        let w_ids = Vec::<i64>::try_from(want.tensor(&format!("text{i}.ids")).unwrap()).unwrap();
        assert_eq!(ids, &w_ids, "{what}: text {i} token ids");
        let w = want.tensor(&format!("text{i}.logits_slice")).unwrap();
        let scale = w.abs().max().double_value(&[]);
        let d = (slice - w).abs().max().double_value(&[]);
        assert!(
            d <= 1e-4 * scale.max(1.0),
            "{what}: text {i} logits differ by {d} (scale {scale})"
        );
        let wn = want.tensor(&format!("text{i}.nll")).unwrap();
        let dn = (nll - wn).abs().max().double_value(&[]);
        assert!(dn <= 1e-4, "{what}: text {i} token NLLs differ by {dn}");
        worst = worst.max(d);
    }
    worst
}

fn largest_change(a: &[(Vec<i64>, Tensor, Tensor)], b: &Checkpoint) -> f64 {
    a.iter()
        .enumerate()
        .map(|(i, (_, s, _))| {
            (s - b.tensor(&format!("text{i}.logits_slice")).unwrap())
                .abs()
                .max()
                .double_value(&[])
        })
        .fold(0.0, f64::max)
}

#[test]
fn an_adapter_peft_trained_gives_peft_logits() {
    let Some(gguf) =
        reuse_testkit::smollm2_gguf_or_skip("an_adapter_peft_trained_gives_peft_logits")
    else {
        return;
    };
    let texts = texts();
    let lm = load(&gguf);
    let base = Checkpoint::load(fixtures().join("base.safetensors"), Device::Cpu).unwrap();
    let got = ours(&lm, &texts);
    compare(&got, &base, "base model");
    let lm = lm
        .map_model(|model| {
            let mut peft = LoraModel::new(model);
            let loaded = peft.load_adapter(&fixtures().join("adapter"), "peft")?;
            // q/k/v/o/gate/up/down of blocks 0 and 29.
            assert_eq!(loaded.modules.len(), 14, "{:?}", loaded.modules);
            assert!(loaded
                .modules
                .contains(&"model.layers.29.mlp.down_proj".to_string()));
            Ok::<_, reuse_peft::PeftError>(peft.into_inner())
        })
        .unwrap();
    let got = ours(&lm, &texts);
    let want = Checkpoint::load(fixtures().join("reference.safetensors"), Device::Cpu).unwrap();
    compare(&got, &want, "with PEFT's adapter");
    // The adapter matters: the logits moved far beyond the tolerance.
    assert!(largest_change(&got, &base) > 1e-2);
}

#[test]
fn an_adapter_made_here_gives_peft_our_logits() {
    let Some(gguf) =
        reuse_testkit::smollm2_gguf_or_skip("an_adapter_made_here_gives_peft_our_logits")
    else {
        return;
    };
    let py = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    assert!(
        py.is_file(),
        "{} is missing: run `cargo xtask setup`",
        py.display()
    );
    let texts = texts();
    let lm = load(&gguf);
    let dir = tempfile::tempdir().unwrap();
    let lm = lm
        .map_model(|model| {
            let mut peft = LoraModel::new(model);
            tch::manual_seed(3);
            let mut cfg = LoraConfig::new(2, 4.0, &[]);
            cfg.target_modules = Some(TargetModules::Regex("all-linear".into()));
            cfg.task_type = Some("CAUSAL_LM".into());
            // Non-zero B, as PEFT's init_lora_weights=False: the adapter changes every
            // output.
            cfg.init_lora_weights = InitLoraWeights::Bool(false);
            let modules = peft.add_adapter("mine", cfg)?;
            assert_eq!(
                modules.len(),
                30 * 7,
                "all-linear: 7 linears in each of 30 blocks"
            );
            assert_eq!(
                peft.config("mine")?.target_modules,
                Some(TargetModules::List(
                    [
                        "down_proj",
                        "gate_proj",
                        "k_proj",
                        "o_proj",
                        "q_proj",
                        "up_proj",
                        "v_proj"
                    ]
                    .map(String::from)
                    .to_vec()
                )),
                "all-linear is written expanded, without the head, as PEFT writes it"
            );
            peft.save_adapter("mine", dir.path())?;
            Ok::<_, reuse_peft::PeftError>(peft.into_inner())
        })
        .unwrap();
    let got = ours(&lm, &texts);
    let out = dir.path().join("peft.safetensors");
    let o = Command::new(&py)
        .arg(fixtures().join("peft_logits.py"))
        .arg(&gguf)
        .arg(dir.path())
        .arg(fixtures().join("texts.txt"))
        .arg(&out)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "peft_logits.py failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let want = Checkpoint::load(&out, Device::Cpu).unwrap();
    compare(&got, &want, "our adapter in PEFT");
    let base = Checkpoint::load(fixtures().join("base.safetensors"), Device::Cpu).unwrap();
    assert!(largest_change(&got, &base) > 1e-2);
}

#[test]
fn all_linear_leaves_out_an_untied_head() {
    use reuse_core::models::llama::{CausalLm, LlamaConfig};
    let model = CausalLm::random(LlamaConfig::tiny(64, 32, 2), Device::Cpu).unwrap();
    let mut peft = LoraModel::new(model);
    let mut cfg = LoraConfig::new(2, 4.0, &[]);
    cfg.target_modules = Some(TargetModules::List(vec!["all-linear".into()]));
    cfg.task_type = Some("CAUSAL_LM".into());
    let modules = peft.add_adapter("a", cfg).unwrap();
    assert_eq!(modules.len(), 2 * 7);
    use reuse_core::Model;
    assert!(
        peft.linear_paths().iter().any(|p| p == "lm_head"),
        "an untied head is a linear"
    );
    assert!(
        !modules.iter().any(|m| m.ends_with("lm_head")),
        "{modules:?}"
    );
}

#[test]
fn routed_rows_decode_as_each_row_alone_with_its_adapter() {
    use reuse_core::models::llama::{CausalLm, GenerateOptions, LlamaConfig, Sampling};
    use reuse_core::Model;
    tch::manual_seed(0);
    let model = CausalLm::random(LlamaConfig::tiny(64, 32, 2), Device::Cpu).unwrap();
    let mut peft = LoraModel::new(model);
    for (k, n) in ["x", "y"].iter().enumerate() {
        tch::manual_seed(10 + k as i64);
        let mut cfg = LoraConfig::new(2, 8.0, &[]);
        cfg.target_modules = Some(TargetModules::List(vec!["all-linear".into()]));
        cfg.init_lora_weights = InitLoraWeights::Bool(false);
        peft.add_adapter(n, cfg).unwrap();
    }
    peft.set_adapter(&[]).unwrap();
    let mut model = peft.into_inner();
    let prompts = vec![vec![1, 5, 9, 3], vec![1, 7], vec![1, 4, 4]];
    let opts = GenerateOptions {
        max_new_tokens: 6,
        sampling: Sampling::Greedy,
        stop_tokens: Vec::new(),
    };
    let names = ["x", reuse_peft::BASE, "y"];
    let mixed = reuse_peft::model::route_samples(&mut model, &names, Device::Cpu, |m| {
        m.generate(&prompts, &opts, &mut |_, _| {})
    })
    .unwrap();
    let mut differ = 0;
    for (i, name) in names.iter().enumerate() {
        let active: Vec<&str> = if *name == reuse_peft::BASE {
            vec![]
        } else {
            vec![*name]
        };
        model.visit_linears(&mut |_, l| l.set_active(&active));
        let alone = model
            .generate(&prompts[i..i + 1], &opts, &mut |_, _| {})
            .unwrap();
        assert_eq!(mixed.tokens[i], alone.tokens[0], "row {i} ({name})");
        model.visit_linears(&mut |_, l| l.set_active(&[]));
        let base = model
            .generate(&prompts[i..i + 1], &opts, &mut |_, _| {})
            .unwrap();
        differ += usize::from(base.tokens[0] != alone.tokens[0]);
    }
    assert!(differ >= 1, "the adapters change some continuation");
    // A name no linear carries is an error naming it, and routing is left off.
    let e = reuse_peft::model::route_samples(&mut model, &["z"], Device::Cpu, |_| Ok(()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("`z`") && e.contains("no linear"), "{e}");
}
