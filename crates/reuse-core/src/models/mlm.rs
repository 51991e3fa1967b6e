//! BERT with its masked-language-model head, as Hugging Face `BertForMaskedLM` computes
//! and names it: the encoder under `bert.`, then `cls.predictions.transform.dense` →
//! activation (`hidden_act`) → `cls.predictions.transform.LayerNorm` → a decoder tied to
//! the word embeddings plus `cls.predictions.bias`. Masking follows BERT (Devlin et al.
//! 2019): 15% of the non-special tokens are chosen; of those 80% become `[MASK]`, 10% a
//! random token, 10% stay; the loss is cross-entropy on the chosen positions only.
//!
//! The decoder runs on the chosen positions only (`[n_chosen, vocab]`, not
//! `[batch, seq, vocab]`), which is where most of an MLM step's compute would otherwise go.

use tch::{Device, Kind, Tensor};

use crate::model::ForwardOptions;
use crate::model::{prefixed, Activation, Model, OutputSlots};
use crate::models::bert::{Bert, BertConfig, LayerNorm};
use crate::{Checkpoint, Error, Linear, Result};

/// `BertForMaskedLM`: encoder + tied MLM head.
#[derive(Debug)]
pub struct BertForMaskedLm {
    /// The encoder (`bert.` in checkpoints).
    pub bert: Bert,
    /// `cls.predictions.transform.dense`.
    pub transform: Linear,
    /// `cls.predictions.transform.LayerNorm`.
    pub norm: LayerNorm,
    /// `cls.predictions.bias` `[vocab]`.
    pub bias: Tensor,
}

/// One masked-LM batch.
#[derive(Debug)]
pub struct MlmBatch {
    /// Token ids after masking `[b, t]`.
    pub input_ids: Tensor,
    /// Flat positions (`row * t + col`) the loss reads `[n]`.
    pub positions: Tensor,
    /// The original tokens at those positions `[n]`.
    pub labels: Tensor,
}

/// Which token ids masking must not choose or draw (`[CLS]`, `[SEP]`, `[PAD]`, ...), the
/// `[MASK]` id, and the vocabulary random replacements are drawn from.
#[derive(Debug, Clone)]
pub struct MaskingSpec {
    /// The `[MASK]` token id.
    pub mask_id: i64,
    /// Ids never chosen.
    pub special_ids: Vec<i64>,
    /// Random replacements are drawn from `0..vocab_size` minus the special ids.
    pub vocab_size: i64,
    /// Share of eligible tokens chosen (0.15 in BERT).
    pub probability: f64,
}

impl MaskingSpec {
    /// Chooses and corrupts tokens of `ids` `[b, t]` (unpadded, on any device) with
    /// libtorch's generator (seed it for a fixed masking). At least one token per batch
    /// is chosen.
    pub fn apply(&self, ids: &Tensor) -> Result<MlmBatch> {
        let device = ids.device();
        let mut eligible = ids.ones_like().to_kind(Kind::Bool);
        for &s in &self.special_ids {
            eligible = eligible.logical_and(&ids.ne(s));
        }
        let draw = Tensor::rand(ids.size(), (Kind::Float, device));
        let mut chosen = draw.lt(self.probability).logical_and(&eligible);
        if chosen.sum(Kind::Int64).int64_value(&[]) == 0 {
            // Tiny batches: choose the first eligible token so the loss is defined.
            let first = eligible
                .flatten(0, -1)
                .to_kind(Kind::Int64)
                .argmax(0, false);
            let mut flat = chosen.flatten(0, -1).copy();
            let _ = flat.index_fill_(0, &first.unsqueeze(0), 1);
            chosen = flat.view(ids.size().as_slice());
        }
        let action = Tensor::rand(ids.size(), (Kind::Float, device));
        let to_mask = chosen.logical_and(&action.lt(0.8));
        let to_random = chosen.logical_and(&action.ge(0.8).logical_and(&action.lt(0.9)));
        let mut random = Tensor::randint(self.vocab_size, ids.size(), (Kind::Int64, device));
        // A random draw that lands on a special id becomes the mask id instead.
        for &s in &self.special_ids {
            random =
                random.where_self(&random.ne(s), &Tensor::from(self.mask_id).to_device(device));
        }
        let input = ids
            .where_self(
                &to_mask.logical_not(),
                &Tensor::from(self.mask_id).to_device(device),
            )
            .where_self(&to_random.logical_not(), &random);
        let positions = chosen.flatten(0, -1).nonzero().squeeze_dim(1);
        let labels = ids.flatten(0, -1).index_select(0, &positions);
        Ok(MlmBatch {
            input_ids: input,
            positions,
            labels,
        })
    }
}

impl BertForMaskedLm {
    /// A randomly initialised model as `transformers` initialises `BertForMaskedLM`
    /// (N(0, 0.02) weights, zero biases, unit LayerNorms).
    pub fn random(config: BertConfig, device: Device) -> Result<Self> {
        let h = config.hidden_size;
        let v = config.vocab_size;
        let eps = config.layer_norm_eps;
        let bert = Bert::random(config, device)?;
        let opts = (Kind::Float, device);
        let transform = Linear::from_tensors(
            (Tensor::randn([h, h], opts) * 0.02).set_requires_grad(true),
            Some(Tensor::zeros([h], opts).set_requires_grad(true)),
        )?;
        Ok(Self {
            bert,
            transform,
            norm: LayerNorm {
                weight: Tensor::ones([h], opts).set_requires_grad(true),
                bias: Tensor::zeros([h], opts).set_requires_grad(true),
                eps,
            },
            bias: Tensor::zeros([v], opts).set_requires_grad(true),
        })
    }

    /// Builds the model from a `BertForMaskedLM` checkpoint (tensors taken out of `ck`):
    /// `bert.*` and `cls.predictions.*`; a `cls.predictions.decoder.weight` must equal the
    /// word embeddings (the decoder is tied).
    pub fn from_checkpoint(
        config: BertConfig,
        ck: &mut Checkpoint,
        device: Device,
        kind: Kind,
    ) -> Result<Self> {
        let (h, v, eps) = (config.hidden_size, config.vocab_size, config.layer_norm_eps);
        let mut take = |name: &str, shape: &[i64]| -> Result<Tensor> {
            Ok(ck
                .take_with_shape(name, shape)?
                .to_kind(kind)
                .to_device(device)
                .set_requires_grad(true))
        };
        let transform = Linear::from_tensors(
            take("cls.predictions.transform.dense.weight", &[h, h])?,
            Some(take("cls.predictions.transform.dense.bias", &[h])?),
        )?;
        let norm = LayerNorm {
            weight: take("cls.predictions.transform.LayerNorm.weight", &[h])?,
            bias: take("cls.predictions.transform.LayerNorm.bias", &[h])?,
            eps,
        };
        let bias = take("cls.predictions.bias", &[v])?;
        let decoder = ck.remove("cls.predictions.decoder.weight");
        let _ = ck.remove("cls.predictions.decoder.bias");
        let bert = Bert::from_checkpoint(config, ck, device, kind)?;
        if let Some(d) = decoder {
            let same = d.size() == bert.embeddings.word_embeddings.size()
                && d.to_kind(kind)
                    .to_device(device)
                    .equal(&bert.embeddings.word_embeddings.detach());
            if !same {
                return Err(Error::invalid(
                    "checkpoint",
                    "`cls.predictions.decoder.weight` differs from the word embeddings; this model's decoder is tied",
                ));
            }
        }
        Ok(Self {
            bert,
            transform,
            norm,
            bias,
        })
    }

    /// Every tensor by `BertForMaskedLM` name (the tied decoder weight is not repeated).
    pub fn state_dict(&self) -> Checkpoint {
        let mut ck = Checkpoint::new();
        tch::no_grad(|| {
            for (n, t) in self.bert.state_dict().iter() {
                ck.insert(format!("bert.{n}"), t.shallow_clone());
            }
            for (n, t) in self.head_tensors() {
                ck.insert(n, t.detach().copy());
            }
        });
        ck.set_metadata("format", "pt");
        ck
    }

    fn head_tensors(&self) -> Vec<(String, Tensor)> {
        let mut v = prefixed(
            "cls.predictions.transform.dense",
            self.transform.named_parameters(),
        );
        v.extend(prefixed(
            "cls.predictions.transform.LayerNorm",
            self.norm.named(),
        ));
        v.push(("cls.predictions.bias".into(), self.bias.shallow_clone()));
        v
    }

    /// MLM logits `[n, vocab]` at the flat `positions` of `input_ids` `[b, t]`
    /// (unpadded: the masked-LM corpus is packed).
    pub fn logits(&self, input_ids: &Tensor, positions: &Tensor, train: bool) -> Result<Tensor> {
        let h = self
            .bert
            .forward(input_ids, None, None, train, ForwardOptions::default())?
            .last_hidden_state;
        let h = h.flatten(0, 1).index_select(0, positions);
        let act = Activation::from_hf(&self.bert.config.hidden_act)?;
        let x = self
            .norm
            .forward(&act.apply(&self.transform.forward(&h, train)?));
        Ok(x.matmul(&self.bert.embeddings.word_embeddings.transpose(0, 1)) + &self.bias)
    }

    /// Mean cross-entropy over the batch's chosen positions.
    pub fn loss(&self, batch: &MlmBatch, train: bool) -> Result<Tensor> {
        let logits = self.logits(&batch.input_ids, &batch.positions, train)?;
        crate::loss::cross_entropy(&logits, &batch.labels)
    }
}

impl Model for BertForMaskedLm {
    fn visit_linears(&mut self, f: &mut dyn FnMut(&str, &mut Linear)) {
        self.bert
            .visit_linears(&mut |p, l| f(&format!("bert.{p}"), l));
        f("cls.predictions.transform.dense", &mut self.transform);
    }

    fn visit_block_outputs(&mut self, f: &mut dyn FnMut(&str, &mut OutputSlots)) {
        self.bert
            .visit_block_outputs(&mut |p, s| f(&format!("bert.{p}"), s));
    }

    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut v = prefixed("bert", self.bert.named_parameters());
        v.extend(self.head_tensors());
        v
    }

    fn named_buffers(&self) -> Vec<(String, Tensor)> {
        prefixed("bert", self.bert.named_buffers())
    }
}

/// Training FLOPs of one masked-LM step, counted from the shapes (REFERENCE.md's
/// convention): `6 · N · tokens` for the encoder's non-embedding parameters `N` (every
/// weight, bias and LayerNorm of the layers), `12 · layers · seq_len · hidden` per token
/// for attention (QKᵀ and the weighted sum of V, forward and backward), and, per
/// predicted position, `6 ·` the head's transform parameters plus `6 · hidden · vocab`
/// for the tied decoder. Embedding lookups, softmax, activations and layer gates are not
/// counted (element-wise, a small share).
pub fn train_flops(config: &BertConfig, sequences: i64, seq_len: i64, predicted: i64) -> f64 {
    let (h, i, l, v) = (
        config.hidden_size as f64,
        config.intermediate_size as f64,
        config.num_hidden_layers as f64,
        config.vocab_size as f64,
    );
    let per_layer = 4.0 * (h * h + h) + (h * i + i) + (i * h + h) + 4.0 * h;
    let tokens = (sequences * seq_len) as f64;
    let encoder = 6.0 * l * per_layer * tokens;
    let attention = 12.0 * l * seq_len as f64 * h * tokens;
    let head = 6.0 * ((h * h + h) + 2.0 * h + h * v) * predicted as f64;
    encoder + attention + head
}
