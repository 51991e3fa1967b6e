//! A model folder in, a quantized model folder out (what `reuse quantize` runs).

use std::path::Path;
use std::time::Instant;

use reuse_core::models::folder::{check_out, write_model_folder};
use reuse_core::models::sentence::tokenize;
use reuse_core::models::SentenceEncoder;
use reuse_core::ForwardOptions;
use reuse_core::{Error, Result};
use tch::{Device, Kind};

use crate::gptq::GptqOptions;
use crate::layout::{QuantizationConfig, QUANT_METHOD, WORD_EMBEDDINGS};
use crate::model::{calibrate, quantize_model, Method};
use crate::spec::QuantSpec;
use crate::weight::QuantizedWeight;
use reuse_core::WeightStorage;

/// How [`quantize_folder`] quantizes.
#[derive(Clone, Debug)]
pub struct QuantizeFolder {
    /// Bits, group size, symmetry.
    pub spec: QuantSpec,
    /// Calibration texts: GPTQ on their activations when given, round-to-nearest when
    /// `None`.
    pub calibration: Option<Vec<String>>,
    /// GPTQ's settings (with calibration).
    pub gptq: GptqOptions,
    /// Quantize the word-embedding table too (per row, same settings; round-to-nearest,
    /// as it has no inputs to calibrate on).
    pub embeddings: bool,
}

/// What [`quantize_folder`] did.
#[derive(Debug)]
pub struct QuantizeReport {
    /// What the new `config.json` says.
    pub config: QuantizationConfig,
    /// Bytes of the source's `model.safetensors`.
    pub bytes_before: u64,
    /// Bytes of the quantized `model.safetensors`.
    pub bytes_after: u64,
    /// Calibration inputs (tokens) GPTQ saw; 0 for round-to-nearest.
    pub calibration_tokens: i64,
    /// Wall time of calibration and quantization.
    pub seconds: f64,
}

/// Quantizes the BERT encoder of the model folder `src` (the six linears of every
/// layer; a pooler stays f32) and writes a complete model folder at `out`: `config.json`
/// with `quantization_config` added, the quantized `model.safetensors` (layout in
/// [`crate::layout`]), tokenizer and sentence-transformers files copied. The folder is
/// built beside `out` and moved into place whole; `src` is only read.
///
/// # Errors
/// `out` not empty (without `overwrite`); `src` not a BERT folder or already quantized;
/// a spec the weights' shapes do not allow (e.g. a group size that does not divide
/// them), each naming the weight; empty calibration texts.
pub fn quantize_folder(
    src: &Path,
    out: &Path,
    opts: &QuantizeFolder,
    overwrite: bool,
) -> Result<QuantizeReport> {
    check_out(out, overwrite)?;
    let t0 = Instant::now();
    // Loaded with this crate's storage so that a quantized source gets the message below.
    let mut enc = SentenceEncoder::load_with(src, &crate::load_options(Device::Cpu, Kind::Float))?;
    if enc.bert.config.extra.contains_key("quantization_config") {
        return Err(Error::invalid(
            format!("{}", src.join("config.json").display()),
            "the model is already quantized (config.json has quantization_config)",
        ));
    }
    // The transformer blocks' linears, as GPTQ tools quantize them; the pooler (unused
    // by mean-pooled sentence embeddings, so calibration never reaches it) stays f32.
    let all = |p: &str| p.starts_with("encoder.layer.");
    let mut calibration_tokens = 0;
    let hessians = match &opts.calibration {
        None => None,
        Some(texts) if texts.is_empty() => {
            return Err(Error::invalid(
                "calibration texts",
                "none given: GPTQ needs real inputs (a few hundred texts)",
            ))
        }
        Some(texts) => {
            let tok = enc.tokenizer.clone();
            let h = calibrate(&mut enc.bert, &all, &mut |bert| {
                // One text per forward: no padding positions in the statistics.
                tch::no_grad(|| -> Result<()> {
                    for t in texts {
                        let (ids, _, _) = tokenize(&tok, &[t.as_str()])?;
                        calibration_tokens += ids.numel() as i64;
                        bert.forward(&ids, None, None, false, ForwardOptions::default())?;
                    }
                    Ok(())
                })
            })?;
            Some(h)
        }
    };
    let method = match &hessians {
        None => Method::Rtn,
        Some(h) => Method::Gptq {
            hessians: h,
            options: opts.gptq,
        },
    };
    let modules = quantize_model(&mut enc.bert, opts.spec, &method, &all)?;
    let mut ck = enc.bert.state_dict();
    if opts.embeddings {
        let table = ck
            .remove(WORD_EMBEDDINGS)
            .ok_or_else(|| Error::MissingTensor {
                path: None,
                tensor: WORD_EMBEDDINGS.into(),
            })?;
        opts.spec.check(WORD_EMBEDDINGS, table.size()[1])?;
        let q = QuantizedWeight::quantize(&table, opts.spec)?;
        for (n, t) in q.named_buffers() {
            ck.insert(format!("embeddings.word_embeddings.{n}"), t);
        }
    }
    let config = QuantizationConfig {
        quant_method: QUANT_METHOD.into(),
        bits: opts.spec.bits,
        group_size: opts.spec.group_size,
        sym: opts.spec.symmetric,
        method: if hessians.is_some() { "gptq" } else { "rtn" }.into(),
        embeddings: opts.embeddings,
        modules,
    };
    let mut updates = serde_json::Map::new();
    updates.insert(
        "quantization_config".into(),
        serde_json::to_value(&config).map_err(|e| Error::invalid("config", e.to_string()))?,
    );
    write_model_folder(src, out, &updates, &ck, overwrite, &mut |_| Ok(()))?;
    let size = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.len())
            .map_err(|e| Error::io(p, e))
    };
    Ok(QuantizeReport {
        config,
        bytes_before: size(&src.join("model.safetensors"))?,
        bytes_after: size(&out.join("model.safetensors"))?,
        calibration_tokens,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Writes the quantized model folder `src` as a plain f32 folder at `out`: every
/// quantized weight (and a quantized embedding table) replaced by the values its codes
/// stand for, `quantization_config` removed, tokenizer and sentence-transformers files
/// copied. Hugging Face `transformers` and PEFT load the result; it computes what the
/// quantized model computes (an adapter trained on the quantized base loads on it).
///
/// # Errors
/// `out` not empty (without `overwrite`); `src` not a quantized BERT folder this crate
/// reads.
pub fn dequantize_folder(src: &Path, out: &Path, overwrite: bool) -> Result<()> {
    check_out(out, overwrite)?;
    let cfg_path = src.join("config.json");
    let config = reuse_core::models::BertConfig::load(&cfg_path)?;
    if !config.extra.contains_key("quantization_config") {
        return Err(Error::invalid(
            format!("{}", cfg_path.display()),
            "not a quantized model (config.json has no quantization_config)",
        ));
    }
    let mut bert =
        reuse_core::models::Bert::load_with(src, &crate::load_options(Device::Cpu, Kind::Float))?;
    reuse_core::Model::visit_linears(&mut bert, &mut |_, l| {
        let _ = l.densify(false);
    });
    let ck = bert.state_dict();
    let mut updates = serde_json::Map::new();
    updates.insert("quantization_config".into(), serde_json::Value::Null);
    write_model_folder(src, out, &updates, &ck, overwrite, &mut |_| Ok(()))
}
