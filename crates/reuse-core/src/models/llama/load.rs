//! Building a [`CausalLm`] from a checkpoint by Hugging Face names (walking the
//! family's architecture table), or at random.

use std::collections::HashMap;
use std::path::Path;

use tch::{Device, Kind, Tensor};

use crate::gguf::{self, GgufFile};
use crate::linear::WeightStorage;
use crate::model::OutputSlots;
use crate::models::arch::NormKind;
use crate::models::LoadOptions;
use crate::{Checkpoint, Error, Linear, Result};

use super::{inv_freq, CausalLm, DecoderLayer, LlamaConfig, RmsNorm};

use crate::models::take_float as take;

/// The storage a caller provides for a weight, by name and logical shape (`Ok(None)`: not
/// this one).
type ProvidedStorage<'a> = dyn FnMut(&str, [i64; 2]) -> Result<Option<Box<dyn WeightStorage>>> + 'a;

impl CausalLm {
    /// Loads `config.json` and the weights (`model.safetensors`, or the shards of
    /// `model.safetensors.index.json`) of a Hugging Face Llama-family folder, in `kind`
    /// (f32, f16, bf16) on `device`. Parameters are trainable, as in PyTorch.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        Self::load_with(dir, &LoadOptions::new(device, kind))
    }

    /// [`CausalLm::load`] with options: a quantized folder's weights load through the
    /// storage loader `opts` passes for its `quant_method`.
    pub fn load_with(dir: &Path, opts: &LoadOptions<'_>) -> Result<Self> {
        let config = LlamaConfig::load(&dir.join("config.json"))?;
        let mut ck = Checkpoint::load_folder(dir, Device::Cpu)?;
        Self::from_checkpoint_with(config, &mut ck, opts)
    }

    /// Builds the model from checkpoint tensors (taken out of `ck`) by Hugging Face name.
    /// With `tie_word_embeddings`, a `lm_head.weight` in the checkpoint must equal the
    /// embedding table (transformers saves it either way) and is dropped; without it,
    /// `lm_head.weight` is required. Tensors the model does not use are left in `ck`.
    pub fn from_checkpoint(
        config: LlamaConfig,
        ck: &mut Checkpoint,
        device: Device,
        kind: Kind,
    ) -> Result<Self> {
        Self::from_checkpoint_with(config, ck, &LoadOptions::new(device, kind))
    }

    /// [`CausalLm::from_checkpoint`] with options (storage loaders for a quantized
    /// folder: a linear whose weight the loader finds stored keeps it that way).
    pub fn from_checkpoint_with(
        config: LlamaConfig,
        ck: &mut Checkpoint,
        opts: &LoadOptions<'_>,
    ) -> Result<Self> {
        Self::build(config, ck, opts, &mut |_, _| Ok(None))
    }

    /// Loads a Llama-family GGUF file: the config transformers builds from its metadata
    /// ([`gguf::llama::hf_config`]), and its weights in Hugging Face's names and layout,
    /// in `opts.kind` on `opts.device`. With [`LoadOptions::keep_gguf_codes`], each 2-D
    /// Q8_0 / Q4_0 / Q4_1 weight but the token embedding table stays in the file's codes
    /// ([`gguf::CodesStorage`], rows unpermuted); every other tensor is dequantized.
    pub fn from_gguf(file: &GgufFile, opts: &LoadOptions<'_>) -> Result<Self> {
        let json = gguf::llama::hf_config(file)?;
        let config = LlamaConfig::from_json_str(&json.to_string()).map_err(|e| Error::Corrupt {
            path: file.path().to_path_buf(),
            reason: e.to_string(),
        })?;
        let embedding = config.architecture().embedding;
        let (device, kind) = (opts.device, opts.kind);
        let mut ck = Checkpoint::new();
        // Hugging Face name -> GGUF name of the weights kept in their codes.
        let mut coded = HashMap::new();
        for (hf, info) in gguf::llama::hf_tensors(file)? {
            let keep = opts.keep_gguf_codes
                && info.ggml_type().has_parts()
                && info.dims().len() == 2
                && hf != embedding;
            if keep {
                coded.insert(hf, info.name().to_string());
            } else {
                // Into the model's dtype at once: one f32 copy at a time, not all of them.
                let t = gguf::llama::load_tensor(file, info.name(), Device::Cpu)?;
                ck.insert(hf, t.f_to_kind(kind)?);
            }
        }
        Self::build(config, &mut ck, opts, &mut |name, shape| {
            let Some(g) = coded.remove(name) else {
                return Ok(None);
            };
            let s = gguf::llama::hf_codes(file, &g, device, kind)?;
            if s.shape() != shape {
                return Err(Error::ShapeMismatch {
                    path: Some(file.path().to_path_buf()),
                    tensor: g,
                    expected: shape.to_vec(),
                    found: s.shape().to_vec(),
                });
            }
            Ok(Some(Box::new(s)))
        })
    }

    /// Builds the model from `ck`; `provided` gives the storage of a weight by name and
    /// logical shape before the folder's storage loader or the checkpoint is asked.
    fn build(
        config: LlamaConfig,
        ck: &mut Checkpoint,
        opts: &LoadOptions<'_>,
        provided: &mut ProvidedStorage<'_>,
    ) -> Result<Self> {
        let (device, kind) = (opts.device, opts.kind);
        config.validate()?;
        let quant = opts.storage_for(config.extra.get("quantization_config"))?;
        let mut stored = |ck: &mut Checkpoint, name: &str, shape: [i64; 2]| {
            if let Some(s) = provided(name, shape)? {
                return Ok(Some(s));
            }
            match &quant {
                None => Ok(None),
                Some((load, qc)) => load(name, shape, qc, ck, device, kind),
            }
        };
        let a = config.architecture();
        debug_assert_eq!(a.norm, NormKind::RmsNorm);
        let dims = config.dims();
        let json = config.to_json();
        let h = config.hidden_size;
        let eps = config.rms_norm_eps;
        let embed_shape = [config.vocab_size, h];
        let embed_tokens = match stored(ck, a.embedding, embed_shape)? {
            // A quantized table is dequantized once: lookups need rows, not a matmul.
            Some(s) => s
                .dequantize()
                .to_kind(kind)
                .to_device(device)
                .set_requires_grad(true),
            None => take(ck, a.embedding, &embed_shape, device, kind)?,
        };
        let mut layers = Vec::with_capacity(config.num_hidden_layers as usize);
        for i in 0..config.num_hidden_layers as usize {
            let mut linears = Vec::with_capacity(a.linears.len());
            for spec in a.linears {
                let p = a.layer_path(i, spec.path);
                let shape = spec.weight_shape(&dims);
                let b = if spec.has_bias(&json) {
                    Some(take(ck, &format!("{p}.bias"), &[shape[0]], device, kind)?)
                } else {
                    None
                };
                linears.push(match stored(ck, &format!("{p}.weight"), shape)? {
                    Some(s) => Linear::from_storage(s, b)?,
                    None => {
                        let w = take(ck, &format!("{p}.weight"), &shape, device, kind)?;
                        Linear::from_tensors(w, b)?
                    }
                });
            }
            let mut norms = Vec::with_capacity(2);
            for n in a.norms {
                let w = take(
                    ck,
                    &a.layer_path(i, &format!("{n}.weight")),
                    &[h],
                    device,
                    kind,
                )?;
                norms.push(RmsNorm { weight: w, eps });
            }
            let [input_layernorm, post_attention_layernorm]: [RmsNorm; 2] =
                norms.try_into().expect("two norms");
            layers.push(DecoderLayer {
                linears,
                input_layernorm,
                post_attention_layernorm,
                attention_slots: OutputSlots::default(),
                mlp_slots: OutputSlots::default(),
            });
        }
        let final_norm = a.final_norm.expect("a decoder has a final norm");
        let norm = RmsNorm {
            weight: take(ck, &format!("{final_norm}.weight"), &[h], device, kind)?,
            eps,
        };
        let head = a.head.expect("a causal LM has a head");
        let head_name = format!("{head}.weight");
        let lm_head = if config.tie_word_embeddings {
            if let Some(w) = ck.remove(&head_name) {
                let same = w.size() == embed_tokens.size()
                    && w.to_kind(Kind::Float).to_device(device).allclose(
                        &embed_tokens.to_kind(Kind::Float),
                        0.0,
                        0.0,
                        false,
                    );
                if !same {
                    return Err(Error::invalid(
                        head_name,
                        "config.json says tie_word_embeddings but the checkpoint's lm_head differs from the embedding table",
                    ));
                }
            }
            None
        } else {
            let shape = [config.vocab_size, h];
            Some(match stored(ck, &head_name, shape)? {
                Some(s) => Linear::from_storage(s, None)?,
                None => Linear::from_tensors(take(ck, &head_name, &shape, device, kind)?, None)?,
            })
        };
        Ok(Self {
            inv_freq: inv_freq(&config, device)?,
            arch: a,
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
        })
    }

    /// A randomly initialised model as transformers initialises the family (N(0, 0.02)
    /// weights, zero biases, unit norms), in f32, for tests and from-scratch training.
    pub fn random(config: LlamaConfig, device: Device) -> Result<Self> {
        config.validate()?;
        let a = config.architecture();
        let dims = config.dims();
        let json = config.to_json();
        let h = config.hidden_size;
        let mut ck = Checkpoint::new();
        let f = (Kind::Float, Device::Cpu);
        let n = |shape: &[i64]| Tensor::randn(shape, f) * 0.02;
        ck.insert(a.embedding, n(&[config.vocab_size, h]));
        for i in 0..config.num_hidden_layers as usize {
            for spec in a.linears {
                let p = a.layer_path(i, spec.path);
                let shape = spec.weight_shape(&dims);
                ck.insert(format!("{p}.weight"), n(&shape));
                if spec.has_bias(&json) {
                    ck.insert(format!("{p}.bias"), Tensor::zeros([shape[0]], f));
                }
            }
            for name in a.norms {
                ck.insert(
                    a.layer_path(i, &format!("{name}.weight")),
                    Tensor::ones([h], f),
                );
            }
        }
        let final_norm = a.final_norm.expect("a decoder has a final norm");
        ck.insert(format!("{final_norm}.weight"), Tensor::ones([h], f));
        if !config.tie_word_embeddings {
            let head = a.head.expect("a causal LM has a head");
            ck.insert(format!("{head}.weight"), n(&[config.vocab_size, h]));
        }
        Self::from_checkpoint(config, &mut ck, device, Kind::Float)
    }
}
