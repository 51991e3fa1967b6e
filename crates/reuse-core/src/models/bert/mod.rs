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
//!
//! Files: `config.rs` (the `config.json`), `layers.rs` (embeddings, layers and the
//! path tables), `load.rs` (from a checkpoint or at random), `pooling.rs` (mean pooling,
//! normalisation); this file holds the model, its forward pass and its walk by path.

use std::path::Path;

use tch::{Device, Kind, Tensor};

use crate::model::ForwardOptions;
use crate::model::{prefixed, Activation, Model, OutputSlots};
use crate::{Checkpoint, Error, Linear, Result};

mod config;
mod layers;
mod load;
mod pooling;

pub use config::BertConfig;
use layers::*;
pub use layers::{
    checkpoint_prefix, layer_of, layer_path, BertEmbeddings, BertLayer, EncoderOutput, LayerNorm,
    GATE, GATES_CONFIG_KEY, WORD_EMBEDDINGS,
};
pub use pooling::{l2_normalize, mean_pool};

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

impl Bert {
    /// The base weights by Hugging Face name (no deltas, no slot parameters; buffers of
    /// stored weights and layer gates included): what `model.safetensors` holds.
    pub fn state_dict(&self) -> Checkpoint {
        crate::model::state_dict_of(self.tensors(false), self.named_buffers())
    }

    /// Writes `config.json` and `model.safetensors` (base weights) into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        self.state_dict().save(dir.join("model.safetensors"))?;
        self.config.save(&dir.join("config.json"))
    }

    /// Every tensor by Hugging Face path, walking the path tables: base weights, then
    /// (with `with_deltas`) delta and slot parameters, and each layer's gate.
    pub(crate) fn tensors(&self, with_deltas: bool) -> Vec<(String, Tensor)> {
        let lin = |p: &str, l: &Linear| crate::model::linear_tensors(p, l, with_deltas);
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
            for (k, spec) in LAYER_LINEARS.iter().enumerate() {
                v.extend(lin(&format!("{p}.{}", spec.path), lins[k]));
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
        want: ForwardOptions,
    ) -> Result<EncoderOutput> {
        let c = &self.config;
        let (b, t) = crate::model::check_input_ids(input_ids)?;
        let size = input_ids.size();
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
        let mut out = EncoderOutput {
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
            for (spec, lin) in LAYER_LINEARS.iter().zip(l.linears_mut()) {
                f(&layer_path(i, spec.path), lin);
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
            for (spec, lin) in LAYER_LINEARS.iter().zip(l.linears()) {
                v.extend(prefixed(&layer_path(i, spec.path), lin.named_buffers()));
            }
        }
        if let Some(p) = &self.pooler {
            v.extend(prefixed("pooler.dense", p.named_buffers()));
        }
        v
    }
}
