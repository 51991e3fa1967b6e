//! Building a [`Bert`] from a checkpoint (by Hugging Face names, quantized storage
//! through its loader) or at random.

use std::path::Path;

use tch::{Device, Kind, Tensor};

use crate::linear::StorageLoader;
use crate::model::Activation;
use crate::models::LoadOptions;
use crate::{Checkpoint, Linear, Result, WeightStorage};

use super::layers::*;
use super::{Bert, BertConfig};

/// BERT's dimensions for the architecture table: heads span the hidden size.
fn dims(hidden: i64, inter: i64) -> crate::models::arch::Dims {
    crate::models::arch::Dims {
        hidden,
        inter,
        heads: hidden,
        kv_heads: hidden,
    }
}

struct Loader<'a> {
    ck: &'a mut Checkpoint,
    kind: Kind,
    device: Device,
    /// The storage loader of a quantized folder, with its `quantization_config`.
    quant: Option<(StorageLoader, serde_json::Value)>,
}

impl Loader<'_> {
    pub(crate) fn take(&mut self, name: &str, shape: &[i64]) -> Result<Tensor> {
        crate::models::take_float(self.ck, name, shape, self.device, self.kind)
    }
    /// The storage of a weight a quantized folder holds quantized; `None` when dense.
    pub(crate) fn stored(
        &mut self,
        name: &str,
        shape: [i64; 2],
    ) -> Result<Option<Box<dyn WeightStorage>>> {
        match &self.quant {
            None => Ok(None),
            Some((load, qc)) => load(name, shape, qc, self.ck, self.device, self.kind),
        }
    }
    /// An embedding table: dense, or dequantized once if the folder stores it quantized.
    pub(crate) fn table(&mut self, name: &str, shape: [i64; 2]) -> Result<Tensor> {
        match self.stored(name, shape)? {
            Some(s) => Ok(s
                .dequantize()
                .to_kind(self.kind)
                .to_device(self.device)
                .set_requires_grad(true)),
            None => self.take(name, &shape),
        }
    }
    pub(crate) fn linear(&mut self, path: &str, i: i64, o: i64) -> Result<Linear> {
        if let Some(s) = self.stored(&format!("{path}.weight"), [o, i])? {
            let b = self.take(&format!("{path}.bias"), &[o])?;
            return Linear::from_storage(s, Some(b));
        }
        let w = self.take(&format!("{path}.weight"), &[o, i])?;
        let b = self.take(&format!("{path}.bias"), &[o])?;
        Linear::from_tensors(w, Some(b))
    }
    pub(crate) fn norm(&mut self, path: &str, h: i64, eps: f64) -> Result<LayerNorm> {
        Ok(LayerNorm {
            weight: self.take(&format!("{path}.weight"), &[h])?,
            bias: self.take(&format!("{path}.bias"), &[h])?,
            eps,
        })
    }
    pub(crate) fn layer(&mut self, c: &BertConfig, i: i64) -> Result<BertLayer> {
        let p = format!("encoder.layer.{i}");
        let dims = dims(c.hidden_size, c.intermediate_size);
        let mut lin = Vec::with_capacity(6);
        for spec in LAYER_LINEARS {
            let [o, i] = spec.weight_shape(&dims);
            lin.push(self.linear(&format!("{p}.{}", spec.path), i, o)?);
        }
        let mut norms = Vec::with_capacity(2);
        for name in LAYER_NORMS {
            norms.push(self.norm(&format!("{p}.{name}"), c.hidden_size, c.layer_norm_eps)?);
        }
        let gate_name = format!("{p}.{GATE}");
        let gate = if self.ck.get(&gate_name).is_some() {
            Some(self.take(&gate_name, &[1])?.to_kind(Kind::Float))
        } else {
            None
        };
        Ok(BertLayer::from_parts(
            lin.try_into().expect("six linears"),
            norms.try_into().expect("two norms"),
            gate,
        ))
    }
}

impl Bert {
    /// Loads `config.json` and `model.safetensors` from a Hugging Face model folder, in
    /// `kind` (f32, f16, bf16) on `device`. Parameters are trainable, as in PyTorch. A
    /// quantized folder needs [`Bert::load_with`] and its storage loader.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        Self::load_with(dir, &LoadOptions::new(device, kind))
    }

    /// [`Bert::load`] with options: a quantized folder's weights load through the
    /// storage loader `opts` passes for its `quant_method`.
    pub fn load_with(dir: &Path, opts: &LoadOptions<'_>) -> Result<Self> {
        let config = BertConfig::load(&dir.join("config.json"))?;
        let mut ck = Checkpoint::load_folder(dir, Device::Cpu)?;
        Self::from_checkpoint_with(config, &mut ck, opts)
    }

    /// Builds the model from checkpoint tensors (taken out of `ck`), by Hugging Face name.
    /// A `bert.` prefix (as `BertFor*` models save) is accepted. Tensors the model does
    /// not use (`embeddings.position_ids`, heads) are left in `ck`.
    pub fn from_checkpoint(
        config: BertConfig,
        ck: &mut Checkpoint,
        device: Device,
        kind: Kind,
    ) -> Result<Self> {
        Self::from_checkpoint_with(config, ck, &LoadOptions::new(device, kind))
    }

    /// [`Bert::from_checkpoint`] with options (storage loaders for a quantized folder).
    pub fn from_checkpoint_with(
        config: BertConfig,
        ck: &mut Checkpoint,
        opts: &LoadOptions<'_>,
    ) -> Result<Self> {
        let (device, kind) = (opts.device, opts.kind);
        config.validate()?;
        if checkpoint_prefix(ck) == Some("bert.") {
            let names: Vec<String> = ck
                .names()
                .filter(|n| n.starts_with("bert."))
                .map(String::from)
                .collect();
            for n in names {
                let t = ck.remove(&n).expect("listed");
                ck.insert(n.trim_start_matches("bert.").to_string(), t);
            }
        }
        let c = &config;
        let (h, eps) = (c.hidden_size, c.layer_norm_eps);
        let quant = opts.storage_for(c.extra.get("quantization_config"))?;
        let mut l = Loader {
            ck,
            kind,
            device,
            quant,
        };
        let rows = [c.vocab_size, c.max_position_embeddings, c.type_vocab_size];
        let mut tables = Vec::with_capacity(3);
        for (name, n) in EMBEDDINGS.iter().zip(rows) {
            tables.push(l.table(&format!("embeddings.{name}.weight"), [n, h])?);
        }
        let [word_embeddings, position_embeddings, token_type_embeddings]: [Tensor; 3] =
            tables.try_into().expect("three tables");
        let embeddings = BertEmbeddings {
            word_embeddings,
            position_embeddings,
            token_type_embeddings,
            layer_norm: l.norm("embeddings.LayerNorm", h, eps)?,
        };
        let mut layers = Vec::new();
        for i in 0..c.num_hidden_layers {
            layers.push(l.layer(c, i)?);
        }
        let pooler = if l.ck.get("pooler.dense.weight").is_some() {
            Some(l.linear("pooler.dense", h, h)?)
        } else {
            None
        };
        Ok(Self {
            activation: Activation::from_hf(&config.hidden_act)?,
            config,
            embeddings,
            layers,
            pooler,
        })
    }

    /// A randomly initialised model as `transformers` initialises BERT (N(0, 0.02)
    /// weights, zero biases, unit LayerNorms), for tests and from-scratch training.
    pub fn random(config: BertConfig, device: Device) -> Result<Self> {
        let mut ck = Checkpoint::new();
        let n = |shape: &[i64]| Tensor::randn(shape, (Kind::Float, Device::Cpu)) * 0.02;
        let (h, f) = (config.hidden_size, config.intermediate_size);
        ck.insert(
            "embeddings.word_embeddings.weight",
            n(&[config.vocab_size, h]),
        );
        ck.insert(
            "embeddings.position_embeddings.weight",
            n(&[config.max_position_embeddings, h]),
        );
        ck.insert(
            "embeddings.token_type_embeddings.weight",
            n(&[config.type_vocab_size, h]),
        );
        let norm = |ck: &mut Checkpoint, p: &str| {
            ck.insert(
                format!("{p}.weight"),
                Tensor::ones([h], (Kind::Float, Device::Cpu)),
            );
            ck.insert(
                format!("{p}.bias"),
                Tensor::zeros([h], (Kind::Float, Device::Cpu)),
            );
        };
        norm(&mut ck, "embeddings.LayerNorm");
        for i in 0..config.num_hidden_layers {
            let p = format!("encoder.layer.{i}");
            for spec in LAYER_LINEARS {
                let name = spec.path;
                let [o, i_] = spec.weight_shape(&dims(h, f));
                ck.insert(format!("{p}.{name}.weight"), n(&[o, i_]));
                ck.insert(
                    format!("{p}.{name}.bias"),
                    Tensor::zeros([o], (Kind::Float, Device::Cpu)),
                );
            }
            for name in LAYER_NORMS {
                norm(&mut ck, &format!("{p}.{name}"));
            }
        }
        Self::from_checkpoint(config, &mut ck, device, Kind::Float)
    }
}
