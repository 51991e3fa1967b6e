//! The file layout of a quantized model folder, and its loader.
//!
//! `model.safetensors` holds, for every quantized weight `<path>.weight` (a linear's,
//! or `embeddings.word_embeddings.weight`):
//!
//! | tensor | dtype | shape | meaning |
//! |---|---|---|---|
//! | `<path>.weight` | I8 (int8) / U8 (int4) | `[out, in]` / `[out, in / 2]` | codes; int4: input `2j` in the low nibble of byte `j`, `2j + 1` in the high one |
//! | `<path>.weight_scale` | F32 | `[out]` (int8 per channel) or `[out, in / group]` | step per row or per group |
//! | `<path>.weight_zero` | U8 | `[out, in / group]` | int4 with zero points only |
//!
//! value = (code - zero) * scale, with zero = 0 for int8 and 8 for symmetric int4.
//! Biases, LayerNorms and unquantized tables stay as they were (f32). `config.json`
//! says what the file holds under `quantization_config` ([`QuantizationConfig`]):
//!
//! ```json
//! "quantization_config": {
//!   "quant_method": "reuse", "bits": 4, "group_size": 64, "sym": false,
//!   "method": "gptq", "embeddings": true,
//!   "modules": ["encoder.layer.0.attention.self.query", "..."]
//! }
//! ```
//!
//! `transformers` does not read this layout (it has no `reuse` quantizer); a Hugging
//! Face tool gets the dequantized weights from `reuse` instead. `reuse` loads such a
//! folder wherever it loads a model once [`crate::register`] has run: core's BERT
//! loader finds this crate's loader by `quant_method`.

use std::path::PathBuf;

use reuse_core::{Checkpoint, Error, Result, WeightStorage};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind};

use crate::spec::QuantSpec;
use crate::weight::QuantizedWeight;

/// The `quant_method` of folders this crate writes.
pub const QUANT_METHOD: &str = "reuse";

/// The key of the embedding table that `embeddings: true` quantizes (core's name for it).
pub use reuse_core::models::bert::WORD_EMBEDDINGS;

/// `config.json`'s `quantization_config` for a folder this crate wrote.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuantizationConfig {
    /// Always [`QUANT_METHOD`].
    pub quant_method: String,
    /// 8 or 4.
    pub bits: u32,
    /// Weights per scale along the input dimension; absent: per channel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_size: Option<i64>,
    /// Symmetric (no zero points).
    pub sym: bool,
    /// How the codes were chosen: `rtn` (round to nearest) or `gptq`.
    pub method: String,
    /// Whether the word-embedding table is quantized too (per row, same settings).
    #[serde(default)]
    pub embeddings: bool,
    /// The quantized linears, by dotted path.
    pub modules: Vec<String>,
}

impl QuantizationConfig {
    /// The quantization settings.
    pub fn spec(&self) -> QuantSpec {
        QuantSpec {
            bits: self.bits,
            group_size: self.group_size,
            symmetric: self.sym,
        }
    }

    /// Reads and checks a `quantization_config` value.
    pub fn from_json(v: &serde_json::Value) -> Result<Self> {
        let c: Self = serde_json::from_value(v.clone()).map_err(|e| {
            Error::invalid(
                "config.json quantization_config",
                format!("{e} (found {v})"),
            )
        })?;
        if c.quant_method != QUANT_METHOD {
            return Err(Error::invalid(
                "config.json quantization_config",
                format!(
                    "quant_method `{}` is not this layout (`{QUANT_METHOD}`)",
                    c.quant_method
                ),
            ));
        }
        if c.bits != 8 && c.bits != 4 {
            return Err(Error::invalid(
                "config.json quantization_config",
                format!("bits must be 8 or 4, found {}", c.bits),
            ));
        }
        Ok(c)
    }
}

/// The file an error is about (the checkpoint's source, if it has one).
fn in_file(e: Error, file: Option<PathBuf>) -> Error {
    match e {
        Error::MissingTensor { path: None, tensor } => Error::MissingTensor { path: file, tensor },
        Error::ShapeMismatch {
            path: None,
            tensor,
            expected,
            found,
        } => Error::ShapeMismatch {
            path: file,
            tensor,
            expected,
            found,
        },
        Error::DtypeMismatch {
            path: None,
            tensor,
            expected,
            found,
        } => Error::DtypeMismatch {
            path: file,
            tensor,
            expected,
            found,
        },
        e => e,
    }
}

/// The [`reuse_core::StorageLoader`] for this layout: a weight listed in the config
/// (or the word embeddings, with `embeddings: true`) must have its scale (and, with
/// zero points, its zero points); a weight not listed must not have one.
pub fn load_storage(
    name: &str,
    shape: [i64; 2],
    quantization_config: &serde_json::Value,
    ck: &mut Checkpoint,
    device: Device,
    kind: Kind,
) -> Result<Option<Box<dyn WeightStorage>>> {
    let cfg = QuantizationConfig::from_json(quantization_config)?;
    let module = name.strip_suffix(".weight").unwrap_or(name);
    let listed = if name == WORD_EMBEDDINGS {
        cfg.embeddings
    } else {
        cfg.modules.iter().any(|m| m == module)
    };
    let file = ck.source().map(|p| p.to_path_buf());
    let scale_name = format!("{name}_scale");
    let has_scale = ck.get(&scale_name).is_some();
    match (listed, has_scale) {
        (false, false) => Ok(None),
        (false, true) => Err(Error::invalid(
            format!("tensor `{scale_name}`"),
            format!(
                "present, but `{module}` is not among config.json's quantization_config modules"
            ),
        )),
        (true, false) => Err(Error::MissingTensor {
            path: file,
            tensor: format!("{scale_name} (config.json lists `{module}` as quantized)"),
        }),
        (true, true) => {
            let qweight = ck.remove(name).ok_or_else(|| Error::MissingTensor {
                path: file.clone(),
                tensor: name.to_string(),
            })?;
            let scale = ck.remove(&scale_name).expect("checked above");
            let zero = ck.remove(&format!("{name}_zero"));
            let q = QuantizedWeight::from_buffers(name, cfg.spec(), shape, qweight, scale, zero)
                .map_err(|e| in_file(e, file))?;
            Ok(Some(Box::new(q.to_device(device).with_kind(kind))))
        }
    }
}

/// This crate's storage loader under its `quant_method`, for
/// [`reuse_core::models::LoadOptions::with_storage`]: with it, `Bert::load_with`,
/// `SentenceEncoder::load_with` and `CausalLm::load_with` load quantized folders.
pub const STORAGE: [(&str, reuse_core::StorageLoader); 1] = [(QUANT_METHOD, load_storage)];

/// Load options on `device` in `kind` that read this crate's quantized folders (and
/// dense ones).
pub fn load_options(
    device: tch::Device,
    kind: tch::Kind,
) -> reuse_core::models::LoadOptions<'static> {
    reuse_core::models::LoadOptions::new(device, kind).with_storage(&STORAGE)
}
