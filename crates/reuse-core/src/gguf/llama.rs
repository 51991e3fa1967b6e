//! Llama-family GGUF files in Hugging Face's terms: the `config.json` transformers builds
//! from the metadata, tensor names, and weights with llama.cpp's Q/K row permutation
//! undone.
//!
//! llama.cpp's converter (`convert_hf_to_gguf.py`, `LlamaModel.permute`) reorders the rows
//! of `q_proj` and `k_proj` (weights and biases) from Hugging Face's half-split RoPE
//! layout to its interleaved one: `w.reshape(n_head, 2, rows / n_head / 2, ...)
//! .swapaxes(1, 2)`, with `n_head` = `attention.head_count` for Q and
//! `attention.head_count_kv` for K. transformers undoes it when it loads a GGUF
//! (`modeling_gguf_pytorch_utils.py`, `LlamaTensorProcessor`); so does everything here, so
//! that `q_proj` is Hugging Face's `q_proj` and a PEFT adapter on it means the same thing.
//! The permutation moves whole rows, so it applies unchanged to a row-quantized weight's
//! codes, scales and minimums ([`hf_quant_parts`]).
//!
//! Architectures: `llama` (Llama 1-3, SmolLM, Mistral 7B files converted as `llama`),
//! and `qwen2` (the same tensors plus q/k/v biases, with no permutation: llama.cpp runs
//! Qwen2 with NeoX-style RoPE, which is Hugging Face's layout already).

use serde_json::{json, Map, Value as Json};
use tch::{Device, Kind, Tensor};

use super::{quote, CodesStorage, GgufFile, QuantParts, TensorInfo};
use crate::error::{Error, Result};

/// What differs between the architectures handled here.
struct Arch {
    /// `general.architecture`, also the prefix of its metadata keys.
    name: &'static str,
    model_type: &'static str,
    class: &'static str,
    /// Whether llama.cpp permuted Q/K rows.
    permuted: bool,
}

const ARCHS: &[Arch] = &[
    Arch {
        name: "llama",
        model_type: "llama",
        class: "LlamaForCausalLM",
        permuted: true,
    },
    Arch {
        name: "qwen2",
        model_type: "qwen2",
        class: "Qwen2ForCausalLM",
        permuted: false,
    },
];

fn arch(file: &GgufFile) -> Result<&'static Arch> {
    let name = file.architecture()?;
    ARCHS.iter().find(|a| a.name == name).ok_or_else(|| {
        Error::invalid(
            format!("{}: general.architecture", file.path().display()),
            format!(
                "{} is not a supported decoder architecture (supported: {})",
                quote(name),
                ARCHS.iter().map(|a| a.name).collect::<Vec<_>>().join(", ")
            ),
        )
    })
}

/// The Hugging Face name of a GGUF tensor of a Llama-family model, or None for a name
/// outside the mapping: `token_embd.weight` → `model.embed_tokens.weight`,
/// `blk.N.attn_q.weight` → `model.layers.N.self_attn.q_proj.weight` (also `attn_k`,
/// `attn_v`, `attn_output` → `o_proj`), `attn_norm` → `input_layernorm`, `ffn_norm` →
/// `post_attention_layernorm`, `ffn_gate/up/down` → `mlp.{gate,up,down}_proj`,
/// `output_norm` → `model.norm`, `output` → `lm_head`; `.weight` or `.bias`.
pub fn hf_tensor_name(gguf_name: &str) -> Option<String> {
    let (stem, suffix) = gguf_name.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let top = match stem {
        "token_embd" => Some("model.embed_tokens"),
        "output_norm" => Some("model.norm"),
        "output" => Some("lm_head"),
        _ => None,
    };
    if let Some(top) = top {
        return Some(format!("{top}.{suffix}"));
    }
    let rest = stem.strip_prefix("blk.")?;
    let (layer, leaf) = rest.split_once('.')?;
    if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let hf = match leaf {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// Llama 3.1-style RoPE scaling, as per-frequency factors (see [`hf_config`]).
const ROPE_FREQS: &str = "rope_freqs.weight";

/// Tensors a Llama-family GGUF may hold that are not Hugging Face parameters.
const NOT_PARAMETERS: &[&str] = &[ROPE_FREQS];

fn key(a: &Arch, k: &str) -> String {
    format!("{}.{k}", a.name)
}

/// The number of heads to undo llama.cpp's permutation of `gguf_name` with: Some for
/// `attn_q` (`head_count`) and `attn_k` (`head_count_kv`) weights and biases of an
/// architecture that llama.cpp permutes, None for every other tensor.
pub fn permuted_heads(file: &GgufFile, gguf_name: &str) -> Result<Option<i64>> {
    let a = arch(file)?;
    if !a.permuted {
        return Ok(None);
    }
    let leaf = gguf_name
        .strip_prefix("blk.")
        .and_then(|r| r.split_once('.'))
        .map(|(_, leaf)| leaf);
    let heads = match leaf {
        Some("attn_q.weight" | "attn_q.bias") => heads(file, a)?.0,
        Some("attn_k.weight" | "attn_k.bias") => heads(file, a)?.1,
        _ => return Ok(None),
    };
    Ok(Some(heads))
}

/// (head_count, head_count_kv); the KV count defaults to the head count, as in llama.cpp.
fn heads(file: &GgufFile, a: &Arch) -> Result<(i64, i64)> {
    let n = i64::from(file.get_u32(&key(a, "attention.head_count"))?);
    let kv_key = key(a, "attention.head_count_kv");
    let kv = match file.get(&kv_key) {
        Some(_) => i64::from(file.get_u32(&kv_key)?),
        None => n,
    };
    if n == 0 || kv == 0 || n % kv != 0 {
        return Err(Error::invalid(
            format!("{}: {}", file.path().display(), key(a, "attention.head_count")),
            format!("{n} heads and {kv} KV heads: expected positive counts, heads a multiple of KV heads"),
        ));
    }
    Ok((n, kv))
}

/// Undoes llama.cpp's RoPE row permutation on a tensor whose first dimension is the
/// rows of `q_proj` or `k_proj` (a weight, a bias, or row-wise codes/scales).
pub fn unpermute_rows(t: &Tensor, n_head: i64) -> Result<Tensor> {
    reorder_rows(t, n_head, true)
}

/// llama.cpp's permutation itself (Hugging Face layout → GGUF layout): the inverse of
/// [`unpermute_rows`], for writing GGUF files.
pub fn permute_rows(t: &Tensor, n_head: i64) -> Result<Tensor> {
    reorder_rows(t, n_head, false)
}

fn reorder_rows(t: &Tensor, n_head: i64, inverse: bool) -> Result<Tensor> {
    let shape = t.size();
    let rows = shape.first().copied().unwrap_or(0);
    if n_head <= 0 || rows % (2 * n_head) != 0 {
        return Err(Error::invalid(
            "RoPE row permutation",
            format!("{rows} rows cannot be split into {n_head} heads of an even size"),
        ));
    }
    let half = rows / n_head / 2;
    // GGUF rows are (head, half, pair); Hugging Face rows are (head, pair, half).
    let mut split = vec![n_head];
    split.extend(if inverse { [half, 2] } else { [2, half] });
    split.extend_from_slice(&shape[1..]);
    Ok(t.f_reshape(&split)?
        .f_transpose(1, 2)?
        .f_contiguous()?
        .f_reshape(&shape)?)
}

/// The Hugging Face `config.json` for the file's model, as transformers builds it from the
/// metadata (`AutoConfig.from_pretrained(dir, gguf_file=...)`), plus `architectures` and
/// `torch_dtype` (`float32`: the weights [`load_state_dict`] gives). `rope_theta` is given
/// both at the top level (transformers 4) and in `rope_parameters` (transformers 5).
/// `tie_word_embeddings` is true when the file has no `output.weight`.
///
/// RoPE scaling: `linear` from `{arch}.rope.scaling.type` / `.factor`, and Llama 3.1's
/// `llama3` recovered from the `rope_freqs.weight` factors (transformers' loader ignores
/// both). Refused: an architecture other than `llama` / `qwen2`, and scaling this function
/// cannot state exactly (other types, factors that are not Llama 3's), since a config
/// without it would silently compute another RoPE.
pub fn hf_config(file: &GgufFile) -> Result<Json> {
    let a = arch(file)?;
    let u = |k: &str| -> Result<u64> { file.get_u64(&key(a, k)) };
    let (n_head, n_kv) = heads(file, a)?;
    let hidden = u("embedding_length")?;
    let mut c = Map::new();
    c.insert("architectures".into(), json!([a.class]));
    c.insert("model_type".into(), json!(a.model_type));
    c.insert("hidden_size".into(), json!(hidden));
    c.insert("intermediate_size".into(), json!(u("feed_forward_length")?));
    c.insert("num_hidden_layers".into(), json!(u("block_count")?));
    c.insert("num_attention_heads".into(), json!(n_head));
    c.insert("num_key_value_heads".into(), json!(n_kv));
    c.insert(
        "max_position_embeddings".into(),
        json!(u("context_length")?),
    );
    // Widened from the file's f32, as transformers does (1e-5 reads 9.999999747378752e-06).
    let eps = file.get_f32(&key(a, "attention.layer_norm_rms_epsilon"))?;
    c.insert("rms_norm_eps".into(), json!(f64::from(eps)));
    let theta_key = key(a, "rope.freq_base");
    let theta = match file.get(&theta_key) {
        Some(_) => f64::from(file.get_f32(&theta_key)?),
        None => 10000.0, // llama.cpp's and transformers' default
    };
    c.insert("rope_theta".into(), json!(theta));
    let mut rope = json!({"rope_theta": theta, "rope_type": "default"});
    let head_dim = match file.get(&key(a, "rope.dimension_count")) {
        Some(_) => u("rope.dimension_count")?,
        None => hidden / n_head as u64,
    };
    let scaling = match file.find_tensor(ROPE_FREQS) {
        Some(_) => Some(llama3_scaling(file, theta, head_dim)?),
        None => rope_scaling(file, a)?,
    };
    if let Some(scaling) = scaling {
        for (k, v) in scaling.as_object().into_iter().flatten() {
            rope[k] = v.clone();
        }
        c.insert("rope_scaling".into(), scaling);
    }
    c.insert("rope_parameters".into(), rope);
    c.insert("vocab_size".into(), json!(vocab_size(file, a)?));
    let tied = file.find_tensor("output.weight").is_none();
    c.insert("tie_word_embeddings".into(), json!(tied));
    for (hf, gguf) in [
        ("bos_token_id", "bos_token_id"),
        ("eos_token_id", "eos_token_id"),
        ("pad_token_id", "padding_token_id"),
        ("unk_token_id", "unknown_token_id"),
    ] {
        let k = format!("tokenizer.ggml.{gguf}");
        let v = match file.get(&k) {
            Some(_) => json!(file.get_u64(&k)?),
            None => Json::Null,
        };
        c.insert(hf.into(), v);
    }
    c.insert("hidden_act".into(), json!("silu"));
    if a.name == "llama" {
        // transformers maps rope.dimension_count to head_dim for llama.
        c.insert("head_dim".into(), json!(head_dim));
        let has = |leaf: &str| {
            file.tensors()
                .iter()
                .any(|t| t.name().starts_with("blk.") && t.name().ends_with(leaf))
        };
        c.insert("attention_bias".into(), json!(has(".attn_q.bias")));
        c.insert("mlp_bias".into(), json!(has(".ffn_up.bias")));
        c.insert("pretraining_tp".into(), json!(1));
    }
    c.insert("attention_dropout".into(), json!(0.0));
    c.insert("initializer_range".into(), json!(0.02));
    c.insert("use_cache".into(), json!(true));
    c.insert("torch_dtype".into(), json!("float32"));
    Ok(Json::Object(c))
}

fn rope_scaling(file: &GgufFile, a: &Arch) -> Result<Option<Json>> {
    let type_key = key(a, "rope.scaling.type");
    let kind = match file.get(&type_key) {
        None => return Ok(None),
        Some(_) => file.get_str(&type_key)?,
    };
    match kind {
        "none" => Ok(None),
        "linear" => {
            let factor = file.get_f32(&key(a, "rope.scaling.factor"))?;
            Ok(Some(
                json!({"rope_type": "linear", "type": "linear", "factor": f64::from(factor)}),
            ))
        }
        other => Err(Error::invalid(
            format!("{}: {type_key}", file.path().display()),
            format!(
                "RoPE scaling {} is not supported (supported: none, linear)",
                quote(other)
            ),
        )),
    }
}

/// The `llama3` RoPE scaling that `rope_freqs.weight` encodes. llama.cpp's converter
/// writes the factor of each frequency, not the parameters they came from (`factor`,
/// `low_freq_factor`, `high_freq_factor`, `original_max_position_embeddings`), so the
/// parameters are recovered: `factor` is the largest factor, the others are Llama 3.1's
/// (1, 4, 8192, which Llama 3.1, 3.2 and 3.3 all use), and the factors they give must
/// match the file's, or the file is refused rather than run with another RoPE.
fn llama3_scaling(file: &GgufFile, theta: f64, head_dim: u64) -> Result<Json> {
    let what = || format!("{}: tensor `{ROPE_FREQS}`", file.path().display());
    let factors = file.dequantize(ROPE_FREQS, Device::Cpu)?.f_view([-1])?;
    let factors = Vec::<f32>::try_from(&factors)?;
    if head_dim == 0 || factors.len() as u64 != head_dim / 2 {
        return Err(Error::invalid(
            what(),
            format!(
                "{} factors, expected head_dim / 2 = {}",
                factors.len(),
                head_dim / 2
            ),
        ));
    }
    let factor = factors
        .iter()
        .fold(f64::NEG_INFINITY, |m, &f| m.max(f64::from(f)));
    let (low, high, original) = (1.0f64, 4.0f64, 8192.0f64);
    let (low_wavelen, high_wavelen) = (original / low, original / high);
    let expected = (0..factors.len()).map(|i| {
        // In f32 as the converter computes it: base ** (arange(0, dim, 2) / dim).
        let freq = 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32);
        let wavelen = 2.0 * std::f64::consts::PI / f64::from(freq);
        if wavelen < high_wavelen {
            1.0
        } else if wavelen > low_wavelen {
            factor
        } else {
            let smooth = (original / wavelen - low) / (high - low);
            1.0 / ((1.0 - smooth) / factor + smooth)
        }
    });
    for (i, (want, &got)) in expected.zip(&factors).enumerate() {
        if (want - f64::from(got)).abs() > 1e-4 * want.abs().max(1.0) {
            return Err(Error::invalid(
                what(),
                format!(
                    "factor {i} is {got}, but Llama 3 scaling (factor {factor}, low 1, high 4, \
                     original context 8192) gives {want}; reuse cannot state this RoPE in a config"
                ),
            ));
        }
    }
    Ok(json!({
        "rope_type": "llama3", "factor": factor, "low_freq_factor": low,
        "high_freq_factor": high, "original_max_position_embeddings": original as u64,
    }))
}

fn vocab_size(file: &GgufFile, a: &Arch) -> Result<u64> {
    let k = key(a, "vocab_size");
    if file.get(&k).is_some() {
        return file.get_u64(&k);
    }
    if file.get("tokenizer.ggml.tokens").is_some() {
        return Ok(file.get_str_array("tokenizer.ggml.tokens")?.len() as u64);
    }
    let embd = file.tensor("token_embd.weight")?;
    Ok(embd.dims().get(1).copied().unwrap_or(0))
}

fn hf_name_or_error(file: &GgufFile, gguf_name: &str) -> Result<String> {
    hf_tensor_name(gguf_name).ok_or_else(|| {
        Error::invalid(
            format!("{}: tensor {}", file.path().display(), quote(gguf_name)),
            "not a Llama-family tensor name (expected token_embd, output_norm, output, \
             or blk.N.{attn_q,attn_k,attn_v,attn_output,attn_norm,ffn_norm,ffn_gate,ffn_up,ffn_down})",
        )
    })
}

/// Every parameter of the model as f32 on `device`, in file order, under its Hugging Face
/// name and in Hugging Face's layout (Q/K rows unpermuted). A tied model (no
/// `output.weight`) has no `lm_head.weight` entry: the head is `model.embed_tokens.weight`.
/// A tensor name outside the mapping is an error naming it.
pub fn load_state_dict(file: &GgufFile, device: Device) -> Result<Vec<(String, Tensor)>> {
    hf_tensors(file)?
        .into_iter()
        .map(|(hf, info)| Ok((hf, load_tensor(file, info.name(), device)?)))
        .collect()
}

/// The file's parameters by Hugging Face name, in file order, without reading them: what
/// [`load_state_dict`] loads (tensors that are not parameters, such as
/// `rope_freqs.weight`, left out). A tensor name outside the mapping is an error naming
/// it.
pub fn hf_tensors(file: &GgufFile) -> Result<Vec<(String, &TensorInfo)>> {
    arch(file)?;
    file.tensors()
        .iter()
        .filter(|info| !NOT_PARAMETERS.contains(&info.name()))
        .map(|info| Ok((hf_name_or_error(file, info.name())?, info)))
        .collect()
}

/// One tensor as f32 in Hugging Face's layout, by its GGUF name (Q/K rows unpermuted).
pub fn load_tensor(file: &GgufFile, gguf_name: &str, device: Device) -> Result<Tensor> {
    let Some(n) = permuted_heads(file, gguf_name)? else {
        return file.dequantize(gguf_name, device);
    };
    let info = file.tensor(gguf_name)?;
    if info.dims().len() == 2 {
        // A weight: reorder whole rows while dequantizing, no tensor op needed.
        let rows = info.shape()[0];
        let order = hf_row_order(rows, n).map_err(|e| rename(e, file, gguf_name))?;
        file.dequantize_rows(gguf_name, device, Some(&order))
    } else {
        let t = file.dequantize(gguf_name, device)?;
        unpermute_rows(&t, n).map_err(|e| rename(e, file, gguf_name))
    }
}

/// For each Hugging Face row of a permuted Q/K weight, the GGUF row it comes from: HF row
/// (head h, half p, i) is GGUF row (head h, i, pair p).
fn hf_row_order(rows: i64, n_head: i64) -> Result<Vec<usize>> {
    if n_head <= 0 || rows % (2 * n_head) != 0 {
        return Err(Error::invalid(
            "RoPE row permutation",
            format!("{rows} rows cannot be split into {n_head} heads of an even size"),
        ));
    }
    let half = (rows / n_head / 2) as usize;
    let mut order = Vec::with_capacity(rows as usize);
    for h in 0..n_head as usize {
        for p in 0..2 {
            for i in 0..half {
                order.push(h * 2 * half + i * 2 + p);
            }
        }
    }
    Ok(order)
}

/// The Q8_0 / Q4_0 / Q4_1 codes and scales of a weight, rows in Hugging Face's order: the
/// file's own quantization as weight storage, with `parts.dequantize()` equal to
/// [`load_tensor`]'s values.
pub fn hf_quant_parts(file: &GgufFile, gguf_name: &str, device: Device) -> Result<QuantParts> {
    let mut p = file.quant_parts(gguf_name, device)?;
    if let Some(n) = permuted_heads(file, gguf_name)? {
        let un = |t: &Tensor| unpermute_rows(t, n).map_err(|e| rename(e, file, gguf_name));
        p.codes = un(&p.codes)?;
        p.scales = un(&p.scales)?;
        if let Some(m) = &p.mins {
            p.mins = Some(un(m)?);
        }
    }
    Ok(p)
}

/// A Q8_0 / Q4_0 / Q4_1 weight kept in its codes as [`CodesStorage`], rows in Hugging
/// Face's order (Q/K unpermuted), computing in `kind`: its
/// [`dequantize`](crate::linear::WeightStorage::dequantize) in f32 is [`load_tensor`]'s
/// values bit for bit.
pub fn hf_codes(
    file: &GgufFile,
    gguf_name: &str,
    device: Device,
    kind: Kind,
) -> Result<CodesStorage> {
    let Some(n) = permuted_heads(file, gguf_name)? else {
        return CodesStorage::load(file, gguf_name, device, kind);
    };
    let rows = file.tensor(gguf_name)?.shape()[0];
    let order = hf_row_order(rows, n).map_err(|e| rename(e, file, gguf_name))?;
    CodesStorage::load_rows(file, gguf_name, Some(&order), device, kind)
}

fn rename(e: Error, file: &GgufFile, name: &str) -> Error {
    match e {
        Error::Invalid { reason, .. } => Error::invalid(
            format!("{}: tensor {}", file.path().display(), quote(name)),
            reason,
        ),
        e => e,
    }
}
