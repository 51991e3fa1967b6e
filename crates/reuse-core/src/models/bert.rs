//! BERT encoder, as Hugging Face `transformers` computes `BertModel`
//! (<https://github.com/huggingface/transformers/blob/main/src/transformers/models/bert/modeling_bert.py>;
//! paper: Devlin et al. 2019, <https://arxiv.org/abs/1810.04805>).
//!
//! Loaded by name from a Hugging Face `config.json` + `model.safetensors` with no renaming
//! table: the parameter paths are exactly Hugging Face's
//! (`encoder.layer.0.attention.self.query.weight`). Post-LN layers, exact (erf) GELU for
//! `hidden_act: "gelu"`, padded keys masked with the dtype's minimum.
//!
//! Block-output slots ([`OutputSlots`]) sit where bottleneck adapters go: on the
//! attention output (`encoder.layer.N.attention.output`) and on the FFN output
//! (`encoder.layer.N.output`), after the dense projection and before the residual +
//! LayerNorm.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::checkpoint::write_atomic;
use crate::linear::{storage_loader, StorageLoader};
use crate::model::{prefixed, Activation, Model, OutputSlots};
use crate::{Checkpoint, Error, Linear, Result, WeightStorage};

fn d_gelu() -> String {
    "gelu".into()
}
fn d_drop() -> f64 {
    0.1
}
fn d_pos() -> i64 {
    512
}
fn d_types() -> i64 {
    2
}
fn d_eps() -> f64 {
    1e-12
}

/// A Hugging Face BERT `config.json`. Unknown keys are kept (and written back by
/// [`BertConfig::save`]) but otherwise ignored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BertConfig {
    /// Vocabulary size.
    pub vocab_size: i64,
    /// Hidden size.
    pub hidden_size: i64,
    /// Number of encoder layers.
    pub num_hidden_layers: i64,
    /// Attention heads per layer.
    pub num_attention_heads: i64,
    /// FFN inner size.
    pub intermediate_size: i64,
    /// FFN activation (`gelu` is the exact erf GELU).
    #[serde(default = "d_gelu")]
    pub hidden_act: String,
    /// Dropout on hidden states.
    #[serde(default = "d_drop")]
    pub hidden_dropout_prob: f64,
    /// Dropout on attention probabilities.
    #[serde(default = "d_drop")]
    pub attention_probs_dropout_prob: f64,
    /// Longest sequence the position table covers.
    #[serde(default = "d_pos")]
    pub max_position_embeddings: i64,
    /// Number of token types.
    #[serde(default = "d_types")]
    pub type_vocab_size: i64,
    /// LayerNorm epsilon.
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    /// Padding token id.
    #[serde(default)]
    pub pad_token_id: i64,
    /// Keys this crate does not use, kept for round trips.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl BertConfig {
    /// Reads a `config.json`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let cfg: Self = serde_json::from_str(&text).map_err(|e| Error::Corrupt {
            path: path.to_path_buf(),
            reason: format!("not a BERT config: {e}"),
        })?;
        cfg.validate().map_err(|e| Error::Corrupt {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Ok(cfg)
    }

    /// Writes it as pretty JSON, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| Error::invalid("config", e.to_string()))?;
        write_atomic(path, text.as_bytes())
    }

    fn validate(&self) -> Result<()> {
        if self.num_attention_heads <= 0 || self.hidden_size % self.num_attention_heads != 0 {
            return Err(Error::invalid(
                "config",
                format!(
                    "hidden_size {} is not a multiple of num_attention_heads {}",
                    self.hidden_size, self.num_attention_heads
                ),
            ));
        }
        Activation::from_hf(&self.hidden_act)?;
        Ok(())
    }

    /// A tiny configuration for fast tests: `layers` layers, hidden `hidden`, 4 heads.
    pub fn tiny(vocab_size: i64, hidden: i64, layers: i64) -> Self {
        Self {
            vocab_size,
            hidden_size: hidden,
            num_hidden_layers: layers,
            num_attention_heads: 4,
            intermediate_size: hidden * 4,
            hidden_act: "gelu".into(),
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.1,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            pad_token_id: 0,
            extra: BTreeMap::new(),
        }
    }
}

/// LayerNorm with `weight` / `bias`.
#[derive(Debug)]
pub struct LayerNorm {
    /// Scale.
    pub weight: Tensor,
    /// Shift.
    pub bias: Tensor,
    /// Epsilon.
    pub eps: f64,
}

impl LayerNorm {
    /// Normalises the last dimension of `x`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.layer_norm(
            [self.weight.size()[0]],
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
            true,
        )
    }
    /// `weight` and `bias` (shallow handles).
    pub fn named(&self) -> Vec<(String, Tensor)> {
        vec![
            ("weight".into(), self.weight.shallow_clone()),
            ("bias".into(), self.bias.shallow_clone()),
        ]
    }
}

/// Word + position + token-type embeddings, then LayerNorm.
#[derive(Debug)]
pub struct BertEmbeddings {
    /// `word_embeddings.weight` `[vocab, hidden]`.
    pub word_embeddings: Tensor,
    /// `position_embeddings.weight` `[max_pos, hidden]`.
    pub position_embeddings: Tensor,
    /// `token_type_embeddings.weight` `[types, hidden]`.
    pub token_type_embeddings: Tensor,
    /// `LayerNorm`.
    pub layer_norm: LayerNorm,
}

/// Which dimension a layer's linear reads or writes.
#[derive(Debug, Clone, Copy)]
enum Dim {
    Hidden,
    Inter,
}

/// The linears of one encoder layer, in forward order: path under
/// `encoder.layer.{i}`, input dimension, output dimension. Loading, the tensor list and
/// the visitor all walk this one table (with [`BertLayer::linears`]), so they cannot
/// disagree.
const LAYER_LINEARS: [(&str, Dim, Dim); 6] = [
    ("attention.self.query", Dim::Hidden, Dim::Hidden),
    ("attention.self.key", Dim::Hidden, Dim::Hidden),
    ("attention.self.value", Dim::Hidden, Dim::Hidden),
    ("attention.output.dense", Dim::Hidden, Dim::Hidden),
    ("intermediate.dense", Dim::Hidden, Dim::Inter),
    ("output.dense", Dim::Inter, Dim::Hidden),
];
/// The LayerNorms of one encoder layer, in forward order.
const LAYER_NORMS: [&str; 2] = ["attention.output.LayerNorm", "output.LayerNorm"];
/// The block-output slots of one layer: where bottleneck adapters attach.
const LAYER_SLOTS: [&str; 2] = ["attention.output", "output"];
/// The embedding tables, under `embeddings.`.
const EMBEDDINGS: [&str; 3] = [
    "word_embeddings",
    "position_embeddings",
    "token_type_embeddings",
];
/// A layer's residual gate parameter, under `encoder.layer.{i}.`.
pub const GATE: &str = "reuse_gate";

/// One post-LN encoder layer.
#[derive(Debug)]
pub struct BertLayer {
    /// `attention.self.query`.
    pub query: Linear,
    /// `attention.self.key`.
    pub key: Linear,
    /// `attention.self.value`.
    pub value: Linear,
    /// `attention.output.dense`.
    pub attention_output: Linear,
    /// `attention.output.LayerNorm`.
    pub attention_norm: LayerNorm,
    /// `intermediate.dense`.
    pub intermediate: Linear,
    /// `output.dense`.
    pub output: Linear,
    /// `output.LayerNorm`.
    pub output_norm: LayerNorm,
    /// Slots on the attention output (before residual + LayerNorm).
    pub attention_slots: OutputSlots,
    /// Slots on the FFN output (before residual + LayerNorm).
    pub output_slots: OutputSlots,
    /// Optional residual gate `g` (`[1]`, parameter `encoder.layer.{i}.reuse_gate`): the
    /// layer computes `x + g * (layer(x) - x)`. With `g = 0` the layer is the exact
    /// identity, which no weights of a post-LN BERT layer can achieve; depth growth
    /// inserts layers this way and trains `g` up from 0. Absent by default, and then
    /// free: the forward pass is the plain layer.
    pub gate: Option<Tensor>,
}

impl BertLayer {
    /// The linears in [`LAYER_LINEARS`] order.
    fn linears(&self) -> [&Linear; 6] {
        [
            &self.query,
            &self.key,
            &self.value,
            &self.attention_output,
            &self.intermediate,
            &self.output,
        ]
    }

    /// The linears in [`LAYER_LINEARS`] order, mutably.
    fn linears_mut(&mut self) -> [&mut Linear; 6] {
        [
            &mut self.query,
            &mut self.key,
            &mut self.value,
            &mut self.attention_output,
            &mut self.intermediate,
            &mut self.output,
        ]
    }

    fn norms(&self) -> [&LayerNorm; 2] {
        [&self.attention_norm, &self.output_norm]
    }

    fn slots(&self) -> [&OutputSlots; 2] {
        [&self.attention_slots, &self.output_slots]
    }

    fn slots_mut(&mut self) -> [&mut OutputSlots; 2] {
        [&mut self.attention_slots, &mut self.output_slots]
    }

    /// Builds a layer from the table order: `linears` as [`LAYER_LINEARS`], `norms` as
    /// [`LAYER_NORMS`].
    fn from_parts(linears: [Linear; 6], norms: [LayerNorm; 2], gate: Option<Tensor>) -> Self {
        let [query, key, value, attention_output, intermediate, output] = linears;
        let [attention_norm, output_norm] = norms;
        Self {
            query,
            key,
            value,
            attention_output,
            attention_norm,
            intermediate,
            output,
            output_norm,
            attention_slots: OutputSlots::default(),
            output_slots: OutputSlots::default(),
            gate,
        }
    }
}

/// What [`Bert::forward`] returns.
#[derive(Debug)]
pub struct BertOutput {
    /// `[b, t, hidden]`.
    pub last_hidden_state: Tensor,
    /// Embedding output then each layer's output (layers + 1 tensors), when asked.
    pub hidden_states: Vec<Tensor>,
    /// Each layer's attention probabilities `[b, heads, t, t]`, when asked.
    pub attentions: Vec<Tensor>,
}

/// Which extra outputs [`Bert::forward`] should return.
#[derive(Debug, Clone, Copy, Default)]
pub struct Want {
    /// All hidden states.
    pub hidden_states: bool,
    /// All attention probabilities.
    pub attentions: bool,
}

/// A BERT encoder (`BertModel` without heads; the pooler is kept if the file has one).
#[derive(Debug)]
pub struct Bert {
    /// The configuration.
    pub config: BertConfig,
    /// Embeddings.
    pub embeddings: BertEmbeddings,
    /// Encoder layers, addressed as `encoder.layer.{i}`.
    pub layers: Vec<BertLayer>,
    /// `pooler.dense`, if present in the checkpoint (unused by mean pooling).
    pub pooler: Option<Linear>,
    activation: Activation,
}

struct Loader<'a> {
    ck: &'a mut Checkpoint,
    kind: Kind,
    device: Device,
    /// The storage loader of a quantized folder, with its `quantization_config`.
    quant: Option<(StorageLoader, serde_json::Value)>,
}

impl Loader<'_> {
    fn take(&mut self, name: &str, shape: &[i64]) -> Result<Tensor> {
        let t = self.ck.take_with_shape(name, shape)?;
        let kind = t.kind();
        if !matches!(kind, Kind::Float | Kind::Half | Kind::BFloat16) {
            return Err(Error::DtypeMismatch {
                path: self.ck.source().map(Path::to_path_buf),
                tensor: name.into(),
                expected: "a floating dtype (F32, F16, BF16)".into(),
                found: format!("{kind:?}"),
            });
        }
        Ok(t.to_kind(self.kind)
            .to_device(self.device)
            .set_requires_grad(true))
    }
    /// The storage of a weight a quantized folder holds quantized; `None` when dense.
    fn stored(&mut self, name: &str, shape: [i64; 2]) -> Result<Option<Box<dyn WeightStorage>>> {
        match &self.quant {
            None => Ok(None),
            Some((load, qc)) => load(name, shape, qc, self.ck, self.device, self.kind),
        }
    }
    /// An embedding table: dense, or dequantized once if the folder stores it quantized.
    fn table(&mut self, name: &str, shape: [i64; 2]) -> Result<Tensor> {
        match self.stored(name, shape)? {
            Some(s) => Ok(s
                .dequantize()
                .to_kind(self.kind)
                .to_device(self.device)
                .set_requires_grad(true)),
            None => self.take(name, &shape),
        }
    }
    fn linear(&mut self, path: &str, i: i64, o: i64) -> Result<Linear> {
        if let Some(s) = self.stored(&format!("{path}.weight"), [o, i])? {
            let b = self.take(&format!("{path}.bias"), &[o])?;
            return Linear::from_storage(s, Some(b));
        }
        let w = self.take(&format!("{path}.weight"), &[o, i])?;
        let b = self.take(&format!("{path}.bias"), &[o])?;
        Linear::from_tensors(w, Some(b))
    }
    fn norm(&mut self, path: &str, h: i64, eps: f64) -> Result<LayerNorm> {
        Ok(LayerNorm {
            weight: self.take(&format!("{path}.weight"), &[h])?,
            bias: self.take(&format!("{path}.bias"), &[h])?,
            eps,
        })
    }
    fn layer(&mut self, c: &BertConfig, i: i64) -> Result<BertLayer> {
        let p = format!("encoder.layer.{i}");
        let dim = |d: Dim| match d {
            Dim::Hidden => c.hidden_size,
            Dim::Inter => c.intermediate_size,
        };
        let mut lin = Vec::with_capacity(6);
        for (name, di, dout) in LAYER_LINEARS {
            lin.push(self.linear(&format!("{p}.{name}"), dim(di), dim(dout))?);
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
    /// `kind` (f32, f16, bf16) on `device`. Parameters are trainable, as in PyTorch.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let config = BertConfig::load(&dir.join("config.json"))?;
        let mut ck = Checkpoint::load(dir.join("model.safetensors"), Device::Cpu)?;
        Self::from_checkpoint(config, &mut ck, device, kind)
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
        config.validate()?;
        if ck.get("embeddings.word_embeddings.weight").is_none()
            && ck.get("bert.embeddings.word_embeddings.weight").is_some()
        {
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
        let quant = match c.extra.get("quantization_config") {
            None => None,
            Some(qc) => {
                let method = qc
                    .get("quant_method")
                    .and_then(|m| m.as_str())
                    .ok_or_else(|| {
                        Error::invalid(
                            "config.json quantization_config",
                            format!("expected a `quant_method` string, found {qc}"),
                        )
                    })?;
                let load = storage_loader(method).ok_or_else(|| {
                    Error::invalid(
                        "config.json quantization_config",
                        format!(
                            "no loader is registered for quant_method `{method}` (reuse-quant's \
                             is `reuse`: call reuse_quant::register() first; the reuse CLI does)"
                        ),
                    )
                })?;
                Some((load, qc.clone()))
            }
        };
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
            let dim = |d: Dim| match d {
                Dim::Hidden => h,
                Dim::Inter => f,
            };
            for (name, di, dout) in LAYER_LINEARS {
                let (i_, o) = (dim(di), dim(dout));
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

    /// The base weights by Hugging Face name (no deltas, no slot parameters; buffers of
    /// stored weights and layer gates included): what `model.safetensors` holds.
    pub fn state_dict(&self) -> Checkpoint {
        let mut ck = Checkpoint::new();
        tch::no_grad(|| {
            for (n, t) in self.tensors(false).into_iter().chain(self.named_buffers()) {
                ck.insert(n, t.detach().copy());
            }
        });
        ck.set_metadata("format", "pt");
        ck
    }

    /// Writes `config.json` and `model.safetensors` (base weights) into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        self.state_dict().save(dir.join("model.safetensors"))?;
        self.config.save(&dir.join("config.json"))
    }

    /// Every tensor by Hugging Face path, walking the path tables: base weights, then
    /// (with `with_deltas`) delta and slot parameters, and each layer's gate.
    fn tensors(&self, with_deltas: bool) -> Vec<(String, Tensor)> {
        let lin = |p: &str, l: &Linear| {
            let v = l.named_parameters();
            let v = if with_deltas {
                v
            } else {
                v.into_iter()
                    .filter(|(n, _)| n == "weight" || n == "bias")
                    .collect()
            };
            prefixed(p, v)
        };
        let e = &self.embeddings;
        let mut v: Vec<(String, Tensor)> = EMBEDDINGS
            .iter()
            .zip([
                &e.word_embeddings,
                &e.position_embeddings,
                &e.token_type_embeddings,
            ])
            .map(|(n, t)| (format!("embeddings.{n}.weight"), t.shallow_clone()))
            .collect();
        v.extend(prefixed("embeddings.LayerNorm", e.layer_norm.named()));
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("encoder.layer.{i}");
            let lins = l.linears();
            // Forward order: q, k, v, attention.output.dense, its LayerNorm, FFN in,
            // FFN out, its LayerNorm.
            for (k, (name, _, _)) in LAYER_LINEARS.iter().enumerate() {
                v.extend(lin(&format!("{p}.{name}"), lins[k]));
                if k == 3 {
                    v.extend(prefixed(
                        &format!("{p}.{}", LAYER_NORMS[0]),
                        l.norms()[0].named(),
                    ));
                }
            }
            v.extend(prefixed(
                &format!("{p}.{}", LAYER_NORMS[1]),
                l.norms()[1].named(),
            ));
            if with_deltas {
                for (name, slots) in LAYER_SLOTS.iter().zip(l.slots()) {
                    v.extend(prefixed(&format!("{p}.{name}"), slots.named_parameters()));
                }
            }
            if let Some(g) = &l.gate {
                v.push((format!("{p}.{GATE}"), g.shallow_clone()));
            }
        }
        if let Some(pl) = &self.pooler {
            v.extend(lin("pooler.dense", pl));
        }
        v
    }

    /// Adds (or replaces) layer `layer`'s residual gate with value `g` (trainable), or
    /// removes it with `None`. See [`BertLayer::gate`].
    pub fn set_gate(&mut self, layer: usize, g: Option<f64>) -> Result<()> {
        let n = self.layers.len();
        let device = self.device();
        let l = self.layers.get_mut(layer).ok_or_else(|| {
            Error::invalid(
                "layer gate",
                format!("layer {layer} does not exist ({n} layers)"),
            )
        })?;
        l.gate = g.map(|g| {
            Tensor::from_slice(&[g as f32])
                .to_device(device)
                .set_requires_grad(true)
        });
        Ok(())
    }

    /// Device of the weights.
    pub fn device(&self) -> Device {
        self.embeddings.word_embeddings.device()
    }

    /// Element type of the weights.
    pub fn kind(&self) -> Kind {
        self.embeddings.word_embeddings.kind()
    }

    /// Runs the encoder.
    ///
    /// * `input_ids`: `[b, t]` i64, `t` at most `max_position_embeddings`.
    /// * `attention_mask`: `[b, t]` (1 = token, 0 = padding), or `None` when no example
    ///   is padded (then no mask is built and SDPA may pick its fastest kernel, as
    ///   transformers does). The caller knows whether its batch is padded
    ///   ([`crate::data::Batch::padded`]); nothing is read back from the device.
    /// * `token_type_ids`: `[b, t]`, zeros when `None`.
    /// * `train`: enables dropout.
    ///
    /// Inputs of the wrong shape, dtype or length, and token ids outside the
    /// vocabulary, are errors.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        token_type_ids: Option<&Tensor>,
        train: bool,
        want: Want,
    ) -> Result<BertOutput> {
        let c = &self.config;
        let size = input_ids.size();
        if size.len() != 2 || input_ids.kind() != Kind::Int64 {
            return Err(Error::invalid(
                "input_ids",
                format!(
                    "expected i64 [batch, seq], found {:?} {size:?}",
                    input_ids.kind()
                ),
            ));
        }
        let (b, t) = (size[0], size[1]);
        if t > c.max_position_embeddings {
            return Err(Error::invalid(
                "input_ids",
                format!(
                    "sequence length {t} exceeds max_position_embeddings {}; truncate the input",
                    c.max_position_embeddings
                ),
            ));
        }
        for (what, x) in [
            ("attention_mask", attention_mask),
            ("token_type_ids", token_type_ids),
        ] {
            if let Some(x) = x {
                if x.size() != size {
                    return Err(Error::invalid(
                        what,
                        format!(
                            "expected shape {size:?} like input_ids, found {:?}",
                            x.size()
                        ),
                    ));
                }
            }
        }
        let device = input_ids.device();
        let e = &self.embeddings;
        let pos = Tensor::arange(t, (Kind::Int64, device));
        let words = Tensor::f_embedding(&e.word_embeddings, input_ids, -1, false, false).map_err(
            |err| {
                Error::invalid(
                    "input_ids",
                    format!(
                        "token ids must be in 0..{} (vocab_size): {err}",
                        c.vocab_size
                    ),
                )
            },
        )?;
        let types = match token_type_ids {
            Some(tt) => Tensor::f_embedding(&e.token_type_embeddings, tt, -1, false, false)
                .map_err(|err| {
                    Error::invalid(
                        "token_type_ids",
                        format!(
                            "must be in 0..{} (type_vocab_size): {err}",
                            c.type_vocab_size
                        ),
                    )
                })?,
            // Token type 0 everywhere: one row, broadcast.
            None => e.token_type_embeddings.get(0).view([1, 1, c.hidden_size]),
        };
        let x = words
            + Tensor::embedding(&e.position_embeddings, &pos, -1, false, false).unsqueeze(0)
            + types;
        let mut h = e
            .layer_norm
            .forward(&x)
            .dropout(c.hidden_dropout_prob, train);
        let kind = h.kind();
        let min = match kind {
            Kind::Half => -65504.0,
            Kind::BFloat16 => -3.3895e38,
            _ => f32::MIN as f64,
        };
        // [b, 1, 1, t]: 0 where attended, the dtype's minimum at padding.
        let ext = attention_mask
            .map(|m| (m.to_kind(kind).ones_like() - m.to_kind(kind)).view([b, 1, 1, t]) * min);
        let mut out = BertOutput {
            last_hidden_state: Tensor::new(),
            hidden_states: Vec::new(),
            attentions: Vec::new(),
        };
        if want.hidden_states {
            out.hidden_states.push(h.shallow_clone());
        }
        let nh = c.num_attention_heads;
        let hd = c.hidden_size / nh;
        for l in &self.layers {
            let split = |x: Tensor| x.view([b, t, nh, hd]).transpose(1, 2);
            let q = split(l.query.forward(&h, train)?);
            let k = split(l.key.forward(&h, train)?);
            let v = split(l.value.forward(&h, train)?);
            let p_drop = if train {
                c.attention_probs_dropout_prob
            } else {
                0.0
            };
            let ctx = if want.attentions {
                let mut scores = q.matmul(&k.transpose(-1, -2)) / (hd as f64).sqrt();
                if let Some(m) = &ext {
                    scores = &scores + m;
                }
                let probs = scores.softmax(-1, kind);
                let ctx = probs.dropout(p_drop, train).matmul(&v);
                out.attentions.push(probs);
                ctx
            } else {
                Tensor::scaled_dot_product_attention(
                    &q,
                    &k,
                    &v,
                    ext.as_ref(),
                    p_drop,
                    false,
                    None,
                    false,
                )
            };
            let ctx = ctx.transpose(1, 2).contiguous().view([b, t, c.hidden_size]);
            let a = l
                .attention_output
                .forward(&ctx, train)?
                .dropout(c.hidden_dropout_prob, train);
            let a = l.attention_slots.apply(&ctx, a, train)?;
            let h1 = l.attention_norm.forward(&(a + &h));
            let inter = self.activation.apply(&l.intermediate.forward(&h1, train)?);
            let o = l
                .output
                .forward(&inter, train)?
                .dropout(c.hidden_dropout_prob, train);
            let o = l.output_slots.apply(&h1, o, train)?;
            let y = l.output_norm.forward(&(o + &h1));
            h = match &l.gate {
                Some(g) => &h + (y - &h) * g.to_kind(kind),
                None => y,
            };
            if want.hidden_states {
                out.hidden_states.push(h.shallow_clone());
            }
        }
        out.last_hidden_state = h;
        Ok(out)
    }
}

impl Model for Bert {
    fn visit_linears(&mut self, f: &mut dyn FnMut(&str, &mut Linear)) {
        for (i, l) in self.layers.iter_mut().enumerate() {
            for ((name, _, _), lin) in LAYER_LINEARS.iter().zip(l.linears_mut()) {
                f(&format!("encoder.layer.{i}.{name}"), lin);
            }
        }
        if let Some(p) = &mut self.pooler {
            f("pooler.dense", p);
        }
    }

    fn visit_block_outputs(&mut self, f: &mut dyn FnMut(&str, &mut OutputSlots)) {
        for (i, l) in self.layers.iter_mut().enumerate() {
            for (name, slots) in LAYER_SLOTS.iter().zip(l.slots_mut()) {
                f(&format!("encoder.layer.{i}.{name}"), slots);
            }
        }
    }

    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        self.tensors(true)
    }

    fn named_buffers(&self) -> Vec<(String, Tensor)> {
        let mut v = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            for ((name, _, _), lin) in LAYER_LINEARS.iter().zip(l.linears()) {
                v.extend(prefixed(
                    &format!("encoder.layer.{i}.{name}"),
                    lin.named_buffers(),
                ));
            }
        }
        if let Some(p) = &self.pooler {
            v.extend(prefixed("pooler.dense", p.named_buffers()));
        }
        v
    }
}

/// Mean of `hidden` `[b, t, h]` over positions where `mask` `[b, t]` is 1, in f32, as
/// sentence-transformers' mean pooling does (padding excluded, `[CLS]`/`[SEP]` included).
/// With no mask (no padding) the plain mean over positions.
pub fn mean_pool(hidden: &Tensor, mask: Option<&Tensor>) -> Tensor {
    let Some(mask) = mask else {
        return hidden.to_kind(Kind::Float).mean_dim(1, false, Kind::Float);
    };
    let m = mask.to_kind(Kind::Float).unsqueeze(-1);
    let summed = (hidden.to_kind(Kind::Float) * &m).sum_dim_intlist(1, false, Kind::Float);
    let counts = m.sum_dim_intlist(1, false, Kind::Float).clamp_min(1e-9);
    summed / counts
}

/// Rows divided by their L2 norm (at least 1e-12), as `torch.nn.functional.normalize`.
pub fn l2_normalize(x: &Tensor) -> Tensor {
    let n = x
        .square()
        .sum_dim_intlist(-1, true, Kind::Float)
        .sqrt()
        .clamp_min(1e-12);
    x / n
}
