//! The real GGUF (SmolLM2-135M-Instruct, Q4_1 with Q8_0 embeddings) against transformers'
//! reading of it, from `fixtures/smollm2` (made by `fixtures/smollm2/make_reference.py`,
//! `cargo xtask fixtures --only smollm2`). Each test skips with a notice when the file is
//! absent (`cargo xtask setup` unpacks it).

use std::collections::BTreeMap;
use std::time::Instant;

use reuse_core::gguf::{self, llama, GgmlType, GgufFile};
use reuse_core::Checkpoint;
use reuse_testkit::{fixtures_dir, smollm2_gguf_or_skip};
use serde_json::Value as Json;
use tch::{Device, Kind, Tensor};

fn reference() -> Checkpoint {
    Checkpoint::load(
        fixtures_dir().join("smollm2/reference.safetensors"),
        Device::Cpu,
    )
    .unwrap()
}

fn json(name: &str) -> Json {
    let text = std::fs::read_to_string(fixtures_dir().join("smollm2").join(name)).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

fn rows(t: &Tensor, index: &Tensor) -> Tensor {
    t.index_select(0, index)
}

#[test]
fn smollm2_header_and_config_match_transformers() {
    let Some(path) = smollm2_gguf_or_skip("smollm2_header_and_config_match_transformers") else {
        return;
    };
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.file_size(), 98_362_432);
    assert_eq!(f.architecture().unwrap(), "llama");
    assert_eq!(f.tensors().len(), 272);
    assert_eq!(
        f.tensor("token_embd.weight").unwrap().ggml_type(),
        GgmlType::Q8_0
    );
    assert_eq!(
        f.tensor("blk.0.ffn_down.weight").unwrap().ggml_type(),
        GgmlType::Q4_1
    );
    assert_eq!(
        f.tensor("blk.29.attn_norm.weight").unwrap().ggml_type(),
        GgmlType::F32
    );
    assert!(f.find_tensor("output.weight").is_none(), "tied embeddings");
    assert_eq!(
        f.get_str_array("tokenizer.ggml.merges").unwrap().len(),
        48_900
    );

    let ours = llama::hf_config(&f).unwrap();
    let theirs = json("hf_config.json");
    let theirs = theirs.as_object().unwrap();
    for (k, v) in theirs {
        if k == "_model_name_or_path" || k == "transformers_version" {
            continue;
        }
        assert_eq!(ours.get(k), Some(v), "config key `{k}`");
    }
    assert_eq!(ours["rope_theta"], 100000.0);
    assert_eq!(ours["architectures"][0], "LlamaForCausalLM");
    assert_eq!(ours["torch_dtype"], "float32");
}

#[test]
fn smollm2_weights_match_transformers() {
    let Some(path) = smollm2_gguf_or_skip("smollm2_weights_match_transformers") else {
        return;
    };
    let f = GgufFile::open(&path).unwrap();
    let start = Instant::now();
    let sd = llama::load_state_dict(&f, Device::Cpu).unwrap();
    eprintln!(
        "load_state_dict: {} tensors in {:.2} s (this build profile)",
        sd.len(),
        start.elapsed().as_secs_f64()
    );
    let sd: BTreeMap<String, Tensor> = sd.into_iter().collect();
    assert_eq!(sd.len(), 272);
    let params: i64 = sd.values().map(|t| t.numel() as i64).sum();
    assert_eq!(params, 134_515_008);

    let r = reference();
    let t = |name: &str| r.tensor(name).unwrap();
    let get = |name: &str| &sd[name];
    let cases: [(&str, Tensor); 8] = [
        (
            "embed_tokens.rows",
            rows(get("model.embed_tokens.weight"), t("embed_tokens.index")),
        ),
        (
            "q_proj.cols",
            get("model.layers.0.self_attn.q_proj.weight").narrow(1, 0, 16),
        ),
        (
            "q_proj.rows",
            rows(
                get("model.layers.0.self_attn.q_proj.weight"),
                t("q_proj.index"),
            ),
        ),
        (
            "k_proj.cols",
            get("model.layers.0.self_attn.k_proj.weight").narrow(1, 0, 16),
        ),
        (
            "k_proj.rows",
            rows(
                get("model.layers.0.self_attn.k_proj.weight"),
                t("k_proj.index"),
            ),
        ),
        (
            "down_proj.rows",
            rows(
                get("model.layers.0.mlp.down_proj.weight"),
                t("down_proj.index"),
            ),
        ),
        (
            "input_layernorm",
            get("model.layers.0.input_layernorm.weight").shallow_clone(),
        ),
        ("norm", get("model.norm.weight").shallow_clone()),
    ];
    for (name, ours) in cases {
        let d = max_diff(&ours, t(name));
        assert!(d <= 1e-6, "{name}: max |diff| {d}");
    }

    // Every tensor: shape, sum and a position-weighted sum (a row permutation changes it).
    let sums = json("checksums.json");
    let sums = sums["tensors"].as_object().unwrap();
    let mut checked = 0;
    for (name, want) in sums {
        let Some(ours) = sd.get(name) else {
            assert_eq!(name, "lm_head.weight", "only the tied head is absent");
            continue;
        };
        let shape: Vec<i64> = serde_json::from_value(want["shape"].clone()).unwrap();
        assert_eq!(ours.size(), shape, "{name}");
        let w = ours.to_kind(Kind::Double);
        let w2 = if w.dim() == 1 {
            w.unsqueeze(0)
        } else {
            w.shallow_clone()
        };
        let (n_rows, n_cols) = w2.size2().unwrap();
        let i = Tensor::arange(n_rows, (Kind::Int64, Device::Cpu)).unsqueeze(1);
        let j = Tensor::arange(n_cols, (Kind::Int64, Device::Cpu)).unsqueeze(0);
        let c = ((i * 31 + j * 17).remainder(101)).to_kind(Kind::Double);
        let weighted = (&w2 * &c).sum(Kind::Double).double_value(&[]);
        let sum = w.sum(Kind::Double).double_value(&[]);
        let scale = w.abs().sum(Kind::Double).double_value(&[]).max(1.0);
        let (ws, ww) = (
            want["sum"].as_f64().unwrap(),
            want["weighted"].as_f64().unwrap(),
        );
        assert!(
            (sum - ws).abs() <= 1e-9 * scale,
            "{name}: sum {sum} vs {ws}"
        );
        assert!(
            (weighted - ww).abs() <= 1e-9 * 101.0 * scale,
            "{name}: weighted {weighted} vs {ww}"
        );
        checked += 1;
    }
    assert_eq!(checked, 272);
}

#[test]
fn smollm2_raw_dequantization_and_parts() {
    let Some(path) = smollm2_gguf_or_skip("smollm2_raw_dequantization_and_parts") else {
        return;
    };
    let f = GgufFile::open(&path).unwrap();
    let r = reference();
    // gguf-py's dequantization, before any unpermutation.
    let raw = f.dequantize("blk.0.attn_q.weight", Device::Cpu).unwrap();
    let d = max_diff(
        &rows(&raw, r.tensor("q_proj.index").unwrap()),
        r.tensor("gguf.attn_q.rows").unwrap(),
    );
    assert!(d <= 1e-6, "raw attn_q: {d}");
    // The file's own codes, in HF row order, stand for the same weights bit for bit.
    for name in [
        "blk.0.attn_q.weight",
        "blk.0.attn_k.weight",
        "blk.7.ffn_down.weight",
        "token_embd.weight",
    ] {
        let p = llama::hf_quant_parts(&f, name, Device::Cpu).unwrap();
        let w = llama::load_tensor(&f, name, Device::Cpu).unwrap();
        assert!(p.dequantize().unwrap().equal(&w), "{name}");
    }
}

#[test]
fn smollm2_tokenizer_matches_transformers() {
    let Some(path) = smollm2_gguf_or_skip("smollm2_tokenizer_matches_transformers") else {
        return;
    };
    let f = GgufFile::open(&path).unwrap();
    let tok = gguf::tokenizer(&f).unwrap();
    let reference = json("tokenization.json");
    assert_eq!(tok.get_vocab_size(true), 49_152);
    let cases = reference["cases"].as_array().unwrap();
    assert!(cases.len() >= 20);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        let ids = tok.encode(text, true).unwrap().get_ids().to_vec();
        assert_eq!(ids, want, "ids of {text:?}");
        let decoded = tok.decode(&ids, false).unwrap();
        assert_eq!(
            decoded,
            case["decoded"].as_str().unwrap(),
            "decoding of {text:?}"
        );
    }
    let chat = &reference["chat"];
    let want: Vec<u32> = serde_json::from_value(chat["ids"].clone()).unwrap();
    let ids = tok
        .encode(chat["rendered"].as_str().unwrap(), true)
        .unwrap();
    assert_eq!(ids.get_ids(), want.as_slice(), "the rendered chat");
    assert_eq!(
        gguf::chat_template(&f).as_deref(),
        reference["chat_template"].as_str(),
        "tokenizer.chat_template"
    );
    for (key, id) in [
        ("bos_token", 1),
        ("eos_token", 2),
        ("pad_token", 2),
        ("unk_token", 0),
    ] {
        assert_eq!(
            tok.token_to_id(reference[key].as_str().unwrap()),
            Some(id),
            "{key}"
        );
    }
    assert_eq!(reference["add_bos_token"], false);
}
