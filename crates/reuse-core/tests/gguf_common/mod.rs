//! Small GGUF files for the reader's tests: a valid tiny Llama (with a tokenizer) written
//! by `GgufWriter`, and raw headers assembled field by field for the damaged cases.
#![allow(dead_code)]

use reuse_core::gguf::{llama, Array, GgmlType, GgufWriter, Value};
use tch::{Kind, Tensor};

pub const HIDDEN: i64 = 32;
pub const HEADS: i64 = 2;
pub const KV_HEADS: i64 = 1;
pub const HEAD_DIM: i64 = HIDDEN / HEADS;
pub const FFN: i64 = 64;

/// The tiny tokenizer's tokens: three control tokens, byte-level pieces, a user-defined
/// `<think>`, and `" x"` spelled with a real space (outside GPT-2's byte alphabet).
pub const TOKENS: &[&str] = &[
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "a",
    "b",
    "c",
    "Ġ",
    "ab",
    "abc",
    "Ġa",
    "<think>",
    " x",
    "x",
];
pub const TOKEN_TYPES: &[i32] = &[3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 4, 1, 1];
pub const MERGES: &[&str] = &["a b", "ab c", "Ġ a", "Ġ x"];

/// Deterministic pseudo-random values in [-1, 1).
pub fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// One weight of the tiny Llama: HF name, GGUF name, PyTorch shape, values, stored type.
pub type TinyWeight = (String, String, Vec<i64>, Vec<f32>, GgmlType);

/// The Hugging Face weights of the tiny Llama.
pub fn tiny_weights() -> Vec<TinyWeight> {
    let v = TOKENS.len() as i64;
    let kv = KV_HEADS * HEAD_DIM;
    let spec: Vec<(&str, &str, Vec<i64>, GgmlType)> = vec![
        (
            "model.embed_tokens.weight",
            "token_embd.weight",
            vec![v, HIDDEN],
            GgmlType::Q8_0,
        ),
        (
            "model.layers.0.input_layernorm.weight",
            "blk.0.attn_norm.weight",
            vec![HIDDEN],
            GgmlType::F32,
        ),
        (
            "model.layers.0.self_attn.q_proj.weight",
            "blk.0.attn_q.weight",
            vec![HIDDEN, HIDDEN],
            GgmlType::Q4_1,
        ),
        (
            "model.layers.0.self_attn.k_proj.weight",
            "blk.0.attn_k.weight",
            vec![kv, HIDDEN],
            GgmlType::Q4_0,
        ),
        (
            "model.layers.0.self_attn.v_proj.weight",
            "blk.0.attn_v.weight",
            vec![kv, HIDDEN],
            GgmlType::F16,
        ),
        (
            "model.layers.0.self_attn.o_proj.weight",
            "blk.0.attn_output.weight",
            vec![HIDDEN, HIDDEN],
            GgmlType::BF16,
        ),
        (
            "model.layers.0.post_attention_layernorm.weight",
            "blk.0.ffn_norm.weight",
            vec![HIDDEN],
            GgmlType::F32,
        ),
        (
            "model.layers.0.mlp.gate_proj.weight",
            "blk.0.ffn_gate.weight",
            vec![FFN, HIDDEN],
            GgmlType::Q8_0,
        ),
        (
            "model.layers.0.mlp.up_proj.weight",
            "blk.0.ffn_up.weight",
            vec![FFN, HIDDEN],
            GgmlType::Q4_1,
        ),
        (
            "model.layers.0.mlp.down_proj.weight",
            "blk.0.ffn_down.weight",
            vec![HIDDEN, FFN],
            GgmlType::Q4_1,
        ),
        (
            "model.norm.weight",
            "output_norm.weight",
            vec![HIDDEN],
            GgmlType::F32,
        ),
    ];
    spec.into_iter()
        .enumerate()
        .map(|(i, (hf, g, shape, t))| {
            let n = shape.iter().product::<i64>() as usize;
            (
                hf.to_string(),
                g.to_string(),
                shape,
                values(n, i as u64 + 1),
                t,
            )
        })
        .collect()
}

/// A valid tiny Llama GGUF: llama.cpp's layout (Q/K rows permuted), a `gpt2` tokenizer.
pub fn tiny_llama() -> GgufWriter {
    let mut w = GgufWriter::new();
    let s = |x: &str| Value::String(x.to_string());
    w.metadata("general.architecture", s("llama"))
        .metadata("general.name", s("tiny"))
        .metadata("llama.block_count", Value::U32(1))
        .metadata("llama.context_length", Value::U32(128))
        .metadata("llama.embedding_length", Value::U64(HIDDEN as u64))
        .metadata("llama.feed_forward_length", Value::I32(FFN as i32))
        .metadata("llama.attention.head_count", Value::U32(HEADS as u32))
        .metadata("llama.attention.head_count_kv", Value::U16(KV_HEADS as u16))
        .metadata("llama.rope.freq_base", Value::F32(10000.0))
        .metadata("llama.rope.dimension_count", Value::U32(HEAD_DIM as u32))
        .metadata("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5))
        .metadata("tokenizer.ggml.model", s("gpt2"))
        .metadata("tokenizer.ggml.pre", s("smollm"))
        .metadata(
            "tokenizer.ggml.tokens",
            Value::Array(Array::String(
                TOKENS.iter().map(|t| t.to_string()).collect(),
            )),
        )
        .metadata(
            "tokenizer.ggml.token_type",
            Value::Array(Array::I32(TOKEN_TYPES.to_vec())),
        )
        .metadata(
            "tokenizer.ggml.merges",
            Value::Array(Array::String(
                MERGES.iter().map(|t| t.to_string()).collect(),
            )),
        )
        .metadata("tokenizer.ggml.bos_token_id", Value::U32(1))
        .metadata("tokenizer.ggml.eos_token_id", Value::U32(2))
        .metadata("tokenizer.ggml.padding_token_id", Value::U32(2))
        .metadata("tokenizer.chat_template", s("{{ messages }}"))
        .metadata(
            "test.nested",
            Value::Array(Array::Array(vec![
                Array::U8(vec![1, 2]),
                Array::F64(vec![0.5]),
            ])),
        );
    for (_, g, shape, vals, t) in tiny_weights() {
        let heads = match g.as_str() {
            "blk.0.attn_q.weight" => Some(HEADS),
            "blk.0.attn_k.weight" => Some(KV_HEADS),
            _ => None,
        };
        let vals = match heads {
            Some(h) => {
                let t = Tensor::from_slice(&vals).reshape(&shape);
                let p = llama::permute_rows(&t, h).unwrap().reshape([-1]);
                Vec::<f32>::try_from(&p.to_kind(Kind::Float)).unwrap()
            }
            None => vals,
        };
        w.tensor_f32(g, &shape, &vals, t).unwrap();
    }
    w
}

/// One metadata entry for [`raw`]: key, value type id, the value's bytes.
pub type RawKv<'a> = (&'a str, u32, Vec<u8>);
/// One tensor info for [`raw`]: name, dims (GGUF order), type id, data offset.
pub type RawTensor<'a> = (&'a str, Vec<u64>, u32, u64);

pub fn gguf_str(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}

/// A GGUF assembled field by field (nothing checked): header, metadata, tensor infos,
/// padding to 32, then `data_len` zero bytes.
pub fn raw(version: u32, kvs: &[RawKv], tensors: &[RawTensor], data_len: usize) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(kvs.len() as u64).to_le_bytes());
    for (k, t, v) in kvs {
        out.extend(gguf_str(k));
        out.extend_from_slice(&t.to_le_bytes());
        out.extend_from_slice(v);
    }
    for (name, dims, t, off) in tensors {
        out.extend(gguf_str(name));
        out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in dims {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&t.to_le_bytes());
        out.extend_from_slice(&off.to_le_bytes());
    }
    out.resize(out.len().next_multiple_of(32), 0);
    out.resize(out.len() + data_len, 0);
    out
}
