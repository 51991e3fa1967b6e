//! GGUF weights kept in their codes (`LoadOptions::keep_codes`, `gguf::CodesStorage`):
//! on the tiny Llama written here, the model with kept codes computes the dequantized
//! model's logits; on the real SmolLM2 GGUF (skipped with a notice when absent), kept
//! codes dequantize to the loader's values bit for bit, multiply as the dense weights do,
//! greedy-decode as transformers does, and hold about the file's bytes.

mod gguf_common;

use gguf_common::*;
use reuse_core::gguf::{llama, CodesStorage, GgmlType, GgufFile};
use reuse_core::linear::WeightStorage;
use reuse_core::models::llama::{CausalLm, GenerateOptions};
use reuse_core::models::lm::LanguageModel;
use reuse_core::models::LoadOptions;
use reuse_core::{ForwardOptions, Model};
use reuse_testkit::{fixtures_dir, smollm2_gguf_or_skip};
use tch::{Device, Kind, Tensor};

fn logits(m: &CausalLm, ids: &Tensor) -> Tensor {
    tch::no_grad(|| {
        let o = m
            .forward(ids, None, None, false, ForwardOptions::default())
            .unwrap();
        m.logits(&o.last_hidden_state, false)
            .unwrap()
            .to_kind(Kind::Float)
    })
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

/// Every stored weight of `m`, by path.
fn storages(m: &mut CausalLm) -> Vec<(String, GgmlType, bool, usize)> {
    let mut v = Vec::new();
    m.visit_linears(&mut |p, l| {
        if let Some(s) = l.storage() {
            let c = s
                .as_any()
                .downcast_ref::<CodesStorage>()
                .expect("a GGUF's stored weights are CodesStorage");
            v.push((
                p.to_string(),
                c.ggml_type(),
                c.uses_int4pack(),
                c.stored_bytes(),
            ));
        }
    });
    v
}

fn bytes(t: &Tensor) -> usize {
    t.numel() * t.kind().elt_size_in_bytes()
}

#[test]
fn tiny_llama_with_kept_codes_computes_the_dequantized_logits() {
    let f = GgufFile::from_bytes(tiny_llama().to_bytes(), "tiny.gguf").unwrap();
    let ids = Tensor::from_slice(&[1i64, 3, 4, 5, 7, 9, 11, 8]).view([1, 8]);
    let f32_opts = LoadOptions::new(Device::Cpu, Kind::Float);
    let dense = CausalLm::from_gguf(&f, &f32_opts).unwrap();
    let mut coded = CausalLm::from_gguf(&f, &f32_opts.keep_codes()).unwrap();
    // Q4_1 q_proj (rows unpermuted), Q4_0 k_proj, Q8_0 gate, Q4_1 up and down; the F16
    // v_proj and BF16 o_proj stay dense, and so does the Q8_0 embedding table.
    let kept: Vec<_> = storages(&mut coded)
        .into_iter()
        .map(|(p, t, _, _)| (p, t))
        .collect();
    let l = |s: &str| format!("model.layers.0.{s}");
    assert_eq!(
        kept,
        [
            (l("self_attn.q_proj"), GgmlType::Q4_1),
            (l("self_attn.k_proj"), GgmlType::Q4_0),
            (l("mlp.gate_proj"), GgmlType::Q8_0),
            (l("mlp.up_proj"), GgmlType::Q4_1),
            (l("mlp.down_proj"), GgmlType::Q4_1),
        ]
    );
    assert_eq!(coded.embed_tokens.kind(), Kind::Float);
    let params: Vec<String> = coded.named_parameters().into_iter().map(|p| p.0).collect();
    assert!(!params.contains(&l("self_attn.q_proj.weight")));
    assert!(params.contains(&l("self_attn.v_proj.weight")));
    let buffers: Vec<String> = coded.named_buffers().into_iter().map(|p| p.0).collect();
    assert!(buffers.contains(&l("self_attn.q_proj.weight_codes")));
    assert!(buffers.contains(&l("self_attn.q_proj.weight_min")));
    assert!(buffers.contains(&l("mlp.gate_proj.weight_scale")));
    // f32: each kept weight dequantizes to the loader's values and goes through the same
    // GEMM, so the logits are the dense model's exactly.
    let want = logits(&dense, &ids);
    assert_eq!(max_diff(&logits(&coded, &ids), &want), 0.0);
    let opts = GenerateOptions {
        max_new_tokens: 6,
        ..Default::default()
    };
    let prompt = vec![vec![1i64, 3, 4]];
    let g = |m: &CausalLm| m.generate(&prompt, &opts, &mut |_, _| {}).unwrap().tokens;
    assert_eq!(g(&coded), g(&dense));

    // bf16: the 4-bit weights go through libtorch's int4 kernel.
    let bf16_opts = LoadOptions::new(Device::Cpu, Kind::BFloat16);
    let dense16 = CausalLm::from_gguf(&f, &bf16_opts).unwrap();
    let mut coded16 = CausalLm::from_gguf(&f, &bf16_opts.keep_codes()).unwrap();
    let kernel: Vec<bool> = storages(&mut coded16).into_iter().map(|s| s.2).collect();
    assert_eq!(kernel, [true, true, false, true, true]);
    let got = logits(&coded16, &ids);
    let d16 = max_diff(&got, &logits(&dense16, &ids));
    let d32 = max_diff(&got, &want);
    let scale = want.abs().max().double_value(&[]);
    eprintln!(
        "tiny llama, bf16 with kept codes: max |logit diff| {d16:.4} vs bf16 dense, {d32:.4} vs f32 (logits up to {scale:.2})"
    );
    // bf16 everywhere: differences of a few bf16 ulps of the largest logit.
    assert!(
        d16 <= 0.05 * scale && d32 <= 0.05 * scale,
        "{d16} {d32} {scale}"
    );
}

fn reference() -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures_dir().join("smollm2_lm/reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

#[test]
fn smollm2_codes_dequantize_exactly_and_multiply_as_dense() {
    let Some(path) = smollm2_gguf_or_skip("smollm2_codes_dequantize_exactly_and_multiply_as_dense")
    else {
        return;
    };
    tch::set_num_threads(2);
    let f = GgufFile::open(&path).unwrap();
    tch::manual_seed(0);
    for name in [
        "blk.0.attn_q.weight",    // Q4_1, rows unpermuted
        "blk.3.attn_k.weight",    // Q4_1, rows unpermuted, 192 rows
        "blk.7.attn_v.weight",    // Q4_1
        "blk.29.ffn_down.weight", // Q4_1, 1536 columns
    ] {
        let want = llama::load_tensor(&f, name, Device::Cpu).unwrap();
        let s = llama::hf_codes(&f, name, Device::Cpu, Kind::Float).unwrap();
        assert_eq!(s.ggml_type(), GgmlType::Q4_1);
        let got = s.dequantize();
        assert!(
            got.equal(&want),
            "{name}: dequantized codes differ from load_tensor"
        );
        // The file's bytes for the tensor, exactly.
        assert_eq!(s.stored_bytes() as u64, f.tensor(name).unwrap().n_bytes());
        let k = want.size()[1];
        let x = Tensor::randn([2, 7, k], (Kind::Float, Device::Cpu));
        let dense = x.linear::<&Tensor>(&want, None);
        // f32: the same dense weight through the same GEMM.
        assert_eq!(max_diff(&s.matmul(&x), &dense), 0.0, "{name}");

        let s16 = llama::hf_codes(&f, name, Device::Cpu, Kind::BFloat16).unwrap();
        assert!(s16.uses_int4pack());
        assert!(
            s16.dequantize().equal(&want.to_kind(Kind::BFloat16)),
            "{name} in bf16"
        );
        let xb = x.to_kind(Kind::BFloat16);
        let exact = xb.to_kind(Kind::Float).linear::<&Tensor>(&want, None);
        let kernel = s16.matmul(&xb).to_kind(Kind::Float);
        let bf16_dense = xb
            .linear::<&Tensor>(&want.to_kind(Kind::BFloat16), None)
            .to_kind(Kind::Float);
        let (ek, ed) = (max_diff(&kernel, &exact), max_diff(&bf16_dense, &exact));
        let scale = exact.abs().max().double_value(&[]);
        eprintln!(
            "{name}: int4 kernel max |err| {ek:.5}, dense bf16 {ed:.5} (outputs up to {scale:.3})"
        );
        // bf16 scales and zeros plus a bf16 output: about what a dense bf16 weight costs.
        assert!(
            ek <= 2.0 * ed.max(scale / 256.0),
            "{name}: {ek} vs dense bf16 {ed}"
        );
    }
    let embd = llama::hf_codes(&f, "token_embd.weight", Device::Cpu, Kind::Float).unwrap();
    assert_eq!(embd.ggml_type(), GgmlType::Q8_0);
    let rows = Tensor::from_slice(&[0i64, 1, 2, 17, 49_151]);
    let want = llama::load_tensor(&f, "token_embd.weight", Device::Cpu).unwrap();
    assert!(embd
        .dequantize()
        .index_select(0, &rows)
        .equal(&want.index_select(0, &rows)));
}

#[test]
fn smollm2_with_kept_codes_generates_as_transformers_and_holds_the_files_bytes() {
    let Some(path) = smollm2_gguf_or_skip(
        "smollm2_with_kept_codes_generates_as_transformers_and_holds_the_files_bytes",
    ) else {
        return;
    };
    tch::set_num_threads(2);
    let file_size = std::fs::metadata(&path).unwrap().len() as usize;
    let r = reference();
    let g = &r["generate"].as_array().unwrap()[0];
    for kind in [Kind::Float, Kind::BFloat16] {
        let opts = LoadOptions::new(Device::Cpu, kind).keep_codes();
        let mut lm = LanguageModel::load(&path, &opts).unwrap();
        let stored = storages(&mut lm.model);
        assert_eq!(
            stored.len(),
            30 * 7,
            "every linear of the 30 blocks is kept"
        );
        assert!(stored
            .iter()
            .all(|s| s.1 == GgmlType::Q4_1 && s.2 == (kind == Kind::BFloat16)));
        let codes: usize = stored.iter().map(|s| s.3).sum();
        let params: usize = lm
            .model
            .named_parameters()
            .iter()
            .map(|(_, t)| bytes(t))
            .sum();
        let table = bytes(&lm.model.embed_tokens);
        let held = codes + params;
        eprintln!(
            "{kind:?} with kept codes: {held} bytes ({codes} codes and scales, {params} parameters of which the embedding table {table}); file {file_size}"
        );
        // Everything but the dequantized embedding table fits in the file's bytes
        // (f32: the Q4_1 bytes exactly; bf16: 24 bytes a group instead of 20).
        let bound = if kind == Kind::Float { 1.0 } else { 1.2 };
        assert!(
            (held - table) as f64 <= bound * file_size as f64,
            "{kind:?}: {} bytes besides the table, file {file_size}",
            held - table
        );
        let p = g["prompt"].as_str().unwrap();
        let prompt = lm
            .prompt_ids(p, g["chat"].as_bool().unwrap(), None)
            .unwrap();
        assert_eq!(prompt, ids(&g["prompt_ids"]));
        let gen = GenerateOptions {
            max_new_tokens: 24,
            stop_tokens: lm.stop_tokens.clone(),
            ..Default::default()
        };
        let out = lm.model.generate(&[prompt], &gen, &mut |_, _| {}).unwrap();
        let want = ids(&g["greedy"]);
        if kind == Kind::Float {
            assert_eq!(out.tokens[0], want, "greedy continuation of {p}");
        } else {
            let same = out.tokens[0]
                .iter()
                .zip(&want)
                .take_while(|(a, b)| a == b)
                .count();
            eprintln!("bf16 with kept codes: the first {same} of {} greedy tokens equal transformers' f32", want.len());
        }
    }
}
