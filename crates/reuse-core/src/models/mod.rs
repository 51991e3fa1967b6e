//! Pretrained architectures loaded from Hugging Face files by their own parameter names.

pub mod arch;
pub mod bert;
pub mod classifier;
pub mod folder;
pub mod llama;
pub mod lm;
pub mod mlm;
pub mod sentence;

pub use bert::{Bert, BertConfig, EncoderOutput};
pub use classifier::BertClassifier;
pub use llama::{CausalLm, LlamaConfig};
pub use mlm::{train_flops, BertForMaskedLm, MaskingSpec, MlmBatch};
pub use sentence::{SentenceEncoder, TokenizedDataset};

use tch::{Device, Kind};

use crate::linear::StorageLoader;

/// Takes tensor `name` of `shape` out of `ck` as a trainable parameter in `kind` on
/// `device`; a tensor that is not F32/F16/BF16 is an error naming it. Every model
/// loader's one way to take a weight.
pub(crate) fn take_float(
    ck: &mut crate::Checkpoint,
    name: &str,
    shape: &[i64],
    device: Device,
    kind: Kind,
) -> crate::Result<tch::Tensor> {
    let t = ck.take_with_shape(name, shape)?;
    let found = t.kind();
    if !matches!(found, Kind::Float | Kind::Half | Kind::BFloat16) {
        return Err(crate::Error::DtypeMismatch {
            path: ck.source().map(std::path::Path::to_path_buf),
            tensor: name.into(),
            expected: "a floating dtype (F32, F16, BF16)".into(),
            found: format!("{found:?}"),
        });
    }
    Ok(t.to_kind(kind).to_device(device).set_requires_grad(true))
}

/// How to load a model folder: where, in what dtype, and which weight-storage loaders
/// to use for a folder whose `config.json` has a `quantization_config` (by its
/// `quant_method`; reuse-quant exports its own as `reuse_quant::STORAGE`). Passed
/// explicitly: nothing global needs priming.
#[derive(Clone, Copy)]
pub struct LoadOptions<'a> {
    /// Device of the loaded weights.
    pub device: Device,
    /// Float dtype of the loaded weights (f32, f16, bf16).
    pub kind: Kind,
    /// `(quant_method, loader)` pairs.
    pub storage: &'a [(&'a str, StorageLoader)],
    /// For a `.gguf` file: keep Q8_0 / Q4_0 / Q4_1 linear weights in the file's codes
    /// ([`crate::gguf::CodesStorage`]) instead of dequantizing them into `kind`, so the
    /// model holds about the file's bytes. The token embedding table is dequantized
    /// either way (lookups read rows; a tied head reads the table). Folders ignore it.
    pub keep_gguf_codes: bool,
}

impl std::fmt::Debug for LoadOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadOptions")
            .field("device", &self.device)
            .field("kind", &self.kind)
            .field(
                "storage",
                &self.storage.iter().map(|s| s.0).collect::<Vec<_>>(),
            )
            .field("keep_gguf_codes", &self.keep_gguf_codes)
            .finish()
    }
}

impl LoadOptions<'static> {
    /// Dense weights only, on `device` in `kind`.
    pub fn new(device: Device, kind: Kind) -> Self {
        Self {
            device,
            kind,
            storage: &[],
            keep_gguf_codes: false,
        }
    }
}

impl<'a> LoadOptions<'a> {
    /// The same with these storage loaders.
    pub fn with_storage(self, storage: &'a [(&'a str, StorageLoader)]) -> Self {
        Self { storage, ..self }
    }

    /// The same, keeping a GGUF file's Q8_0 / Q4_0 / Q4_1 linear weights in their codes
    /// (see [`LoadOptions::keep_gguf_codes`]).
    pub fn keep_codes(self) -> Self {
        Self {
            keep_gguf_codes: true,
            ..self
        }
    }

    /// The loader a folder's `quantization_config` asks for (`None` without one), or an
    /// error naming the `quant_method` nobody passed.
    pub(crate) fn storage_for(
        &self,
        quantization_config: Option<&serde_json::Value>,
    ) -> crate::Result<Option<(StorageLoader, serde_json::Value)>> {
        let Some(qc) = quantization_config else {
            return Ok(None);
        };
        let method = qc
            .get("quant_method")
            .and_then(|m| m.as_str())
            .ok_or_else(|| {
                crate::Error::invalid(
                    "config.json quantization_config",
                    format!("expected a `quant_method` string, found {qc}"),
                )
            })?;
        let load = self
            .storage
            .iter()
            .find(|(m, _)| *m == method)
            .map(|(_, l)| *l)
            .ok_or_else(|| {
                crate::Error::invalid(
                    "config.json quantization_config",
                    format!(
                        "the folder is quantized (quant_method `{method}`) and no loader for it was passed: load it with LoadOptions::with_storage (reuse-quant's is `reuse_quant::STORAGE`, its `load_options` builds the options)"
                    ),
                )
            })?;
        Ok(Some((load, qc.clone())))
    }
}
