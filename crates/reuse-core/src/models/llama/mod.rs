//! The Llama decoder family (`LlamaForCausalLM`, `MistralForCausalLM`,
//! `Qwen2ForCausalLM`), as Hugging Face `transformers` computes it
//! (<https://github.com/huggingface/transformers/blob/main/src/transformers/models/llama/modeling_llama.py>):
//! pre-norm blocks with RMSNorm (in f32, scaled in the model's dtype), rotary position
//! embeddings (`rope_theta`; `rope_type` `llama3`), grouped-query attention, a SwiGLU
//! FFN and an output head that may share the embedding table.
//!
//! Parameters carry exactly Hugging Face's names (`model.layers.3.self_attn.q_proj.weight`);
//! the layout of a block comes from the family's [`Architecture`] table, which loading,
//! the tensor list and the visitor all walk. A tied head is one parameter, listed once as
//! `model.embed_tokens.weight`.
//!
//! Positions follow the attention mask: a token's position is the number of real tokens
//! before it, so a left-padded row computes what the same row unpadded computes (as
//! `generate` in transformers does); without a mask, positions are `past..past + t`.
//! Generation keeps keys and values in a caller-owned [`KvCache`].
//!
//! Files: `config.rs` (the `config.json`), `load.rs` (from a checkpoint or at random),
//! `generate.rs` (the cache and decoding); this file holds the model and its forward pass.

use tch::{Device, Kind, Tensor};

use crate::model::{prefixed, ForwardOptions, Model, OutputSlots};
use crate::models::arch::Architecture;
use crate::{Checkpoint, Error, Linear, Result};

mod config;
pub mod generate;
mod load;
mod train;

pub use config::{LlamaConfig, RopeScaling};
pub use generate::{GenerateOptions, Generated, KvCache, Sampling, StopReason};
pub use train::{perplexity, LOSS_CHUNK};

/// RMSNorm: `weight * x / sqrt(mean(x^2) + eps)`, the statistics in f32.
#[derive(Debug)]
pub struct RmsNorm {
    /// Scale `[hidden]`.
    pub weight: Tensor,
    /// Epsilon.
    pub eps: f64,
}

impl RmsNorm {
    /// Normalises the last dimension of `x` as transformers' `LlamaRMSNorm` does: in f32,
    /// cast back to `x`'s dtype, then scaled.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let h = x.to_kind(Kind::Float);
        let var = h.square().mean_dim(-1, true, Kind::Float);
        let h = h * (var + self.eps).rsqrt();
        &self.weight * h.to_kind(kind)
    }
}

/// One pre-norm decoder block.
#[derive(Debug)]
pub struct DecoderLayer {
    /// The block's linears in the architecture table's order (`q_proj`, `k_proj`,
    /// `v_proj`, `o_proj`, `gate_proj`, `up_proj`, `down_proj`).
    pub linears: Vec<Linear>,
    /// `input_layernorm`.
    pub input_layernorm: RmsNorm,
    /// `post_attention_layernorm`.
    pub post_attention_layernorm: RmsNorm,
    /// Slots on the attention output (after `o_proj`, before the residual add).
    pub attention_slots: OutputSlots,
    /// Slots on the FFN output (after `down_proj`, before the residual add).
    pub mlp_slots: OutputSlots,
}

impl DecoderLayer {
    fn slots(&self) -> [&OutputSlots; 2] {
        [&self.attention_slots, &self.mlp_slots]
    }
    fn slots_mut(&mut self) -> [&mut OutputSlots; 2] {
        [&mut self.attention_slots, &mut self.mlp_slots]
    }
}

/// What [`CausalLm::forward`] returns.
#[derive(Debug)]
pub struct DecoderOutput {
    /// The final norm's output `[b, t, hidden]`.
    pub last_hidden_state: Tensor,
    /// The embedding output, then each block's output (blocks + 1 tensors; the last
    /// one after the final norm, as transformers reports it), when asked.
    pub hidden_states: Vec<Tensor>,
    /// Each block's attention probabilities `[b, heads, t, past + t]`, when asked.
    pub attentions: Vec<Tensor>,
}

/// A Llama-family causal language model (`LlamaForCausalLM` and relatives).
#[derive(Debug)]
pub struct CausalLm {
    /// The configuration.
    pub config: LlamaConfig,
    /// The family's description (from `config.model_type`).
    pub arch: &'static Architecture,
    /// `model.embed_tokens.weight` `[vocab, hidden]`.
    pub embed_tokens: Tensor,
    /// The blocks, `model.layers.{i}`.
    pub layers: Vec<DecoderLayer>,
    /// `model.norm`.
    pub norm: RmsNorm,
    /// `lm_head`; `None` when tied to `embed_tokens`.
    pub lm_head: Option<Linear>,
    /// RoPE inverse frequencies `[head_dim / 2]`, f32, on the model's device.
    inv_freq: Tensor,
}

impl CausalLm {
    /// Device of the weights.
    pub fn device(&self) -> Device {
        self.embed_tokens.device()
    }

    /// Element type of the weights.
    pub fn kind(&self) -> Kind {
        self.embed_tokens.kind()
    }

    /// The base weights by Hugging Face name (no deltas or slot parameters; buffers of
    /// stored weights included): what `model.safetensors` holds.
    pub fn state_dict(&self) -> Checkpoint {
        crate::model::state_dict_of(self.tensors(false), self.named_buffers())
    }

    /// Writes `config.json` and `model.safetensors` (base weights) into `dir`.
    pub fn save(&self, dir: &std::path::Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        self.state_dict().save(dir.join("model.safetensors"))?;
        let mut config = self.config.clone();
        if let Some(class) = self.arch.hf_class {
            config
                .extra
                .insert("architectures".into(), serde_json::json!([class]));
        }
        config.save(&dir.join("config.json"))
    }

    /// Every tensor by Hugging Face path, in forward order: base weights, then (with
    /// `with_deltas`) delta and slot parameters.
    fn tensors(&self, with_deltas: bool) -> Vec<(String, Tensor)> {
        let lin = |p: &str, l: &Linear| crate::model::linear_tensors(p, l, with_deltas);
        let a = self.arch;
        let mut v = vec![(a.embedding.to_string(), self.embed_tokens.shallow_clone())];
        for (i, l) in self.layers.iter().enumerate() {
            let p = |tail: &str| a.layer_path(i, tail);
            // Forward order: input norm, attention linears, post-attention norm, FFN.
            v.push((
                p(&format!("{}.weight", a.norms[0])),
                l.input_layernorm.weight.shallow_clone(),
            ));
            for (k, (spec, lin_)) in a.linears.iter().zip(&l.linears).enumerate() {
                if k == 4 {
                    v.push((
                        p(&format!("{}.weight", a.norms[1])),
                        l.post_attention_layernorm.weight.shallow_clone(),
                    ));
                }
                v.extend(lin(&p(spec.path), lin_));
            }
            if with_deltas {
                for (name, slots) in a.slots.iter().zip(l.slots()) {
                    v.extend(prefixed(&p(name), slots.named_parameters()));
                }
            }
        }
        let final_norm = a.final_norm.expect("a decoder has a final norm");
        v.push((
            format!("{final_norm}.weight"),
            self.norm.weight.shallow_clone(),
        ));
        if let (Some(h), Some(head)) = (&self.lm_head, a.head) {
            v.extend(lin(head, h));
        }
        v
    }

    /// Runs the decoder.
    ///
    /// * `input_ids`: `[b, t]` i64 token ids in `0..vocab_size`.
    /// * `attention_mask`: `[b, past + t]` (1 = token, 0 = padding, either side), or
    ///   `None` when no row is padded.
    /// * `cache`: keys and values of earlier positions, extended by this call (then
    ///   `past` is its length); `None` for a plain forward pass.
    /// * `train`: enables attention dropout (`attention_dropout`, 0 by default).
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
        train: bool,
        want: ForwardOptions,
    ) -> Result<DecoderOutput> {
        let c = &self.config;
        let (b, t) = crate::model::check_input_ids(input_ids)?;
        let past = cache.as_ref().map_or(0, |c| c.len());
        if let Some(cache) = &cache {
            cache.check(self, b, t)?;
        }
        if let Some(m) = attention_mask {
            if m.size() != [b, past + t] {
                return Err(Error::invalid(
                    "attention_mask",
                    format!(
                        "expected shape [{b}, {}] (the cached {past} positions and the {t} new ones), found {:?}",
                        past + t,
                        m.size()
                    ),
                ));
            }
        }
        let device = input_ids.device();
        let mut h = Tensor::f_embedding(&self.embed_tokens, input_ids, -1, false, false).map_err(
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
        let kind = h.kind();
        // Positions: real tokens before each one (left padding shifts nothing), or
        // past..past+t.
        let positions = match attention_mask {
            Some(m) => (m.to_kind(Kind::Int64).cumsum(-1, Kind::Int64) - 1)
                .clamp_min(0)
                .narrow(1, past, t),
            None => Tensor::arange_start(past, past + t, (Kind::Int64, device))
                .unsqueeze(0)
                .expand([b, t], false),
        };
        let (cos, sin) = self.rope(&positions, kind);
        // The attention mask, when one is needed: [b, 1, t, past + t], true = attend.
        // Causal, padded keys left out, and each position always sees itself (a padded
        // query row would otherwise see nothing and give NaN; its output is unused).
        let mask = match attention_mask {
            None if past == 0 || t == 1 => None,
            m => {
                let s = past + t;
                let q_pos = Tensor::arange_start(past, s, (Kind::Int64, device)).view([t, 1]);
                let k_pos = Tensor::arange(s, (Kind::Int64, device)).view([1, s]);
                let causal = k_pos.le_tensor(&q_pos).view([1, 1, t, s]);
                Some(match m {
                    None => causal,
                    Some(m) => {
                        let keys = m.to_kind(Kind::Bool).view([b, 1, 1, s]);
                        let diag = k_pos.eq_tensor(&q_pos).view([1, 1, t, s]);
                        causal.logical_and(&keys).logical_or(&diag)
                    }
                })
            }
        };
        // No mask and no cache: SDPA's own causal mask.
        let is_causal = mask.is_none() && past == 0 && t > 1;
        let nh = c.num_attention_heads;
        let nkv = c.kv_heads();
        let hd = c.head_size();
        let p_drop = if train {
            c.extra
                .get("attention_dropout")
                .and_then(|v| v.as_f64())
                .unwrap_or(0.0)
        } else {
            0.0
        };
        let mut out = DecoderOutput {
            last_hidden_state: Tensor::new(),
            hidden_states: Vec::new(),
            attentions: Vec::new(),
        };
        if want.hidden_states {
            out.hidden_states.push(h.shallow_clone());
        }
        for (i, l) in self.layers.iter().enumerate() {
            let [q_proj, k_proj, v_proj, o_proj, gate, up, down] = &l.linears[..] else {
                unreachable!("seven linears")
            };
            let x = l.input_layernorm.forward(&h);
            let split = |y: Tensor, heads: i64| y.view([b, t, heads, hd]).transpose(1, 2);
            let q = split(q_proj.forward(&x, train)?, nh);
            let k = split(k_proj.forward(&x, train)?, nkv);
            let v = split(v_proj.forward(&x, train)?, nkv);
            let q = apply_rope(&q, &cos, &sin);
            let k = apply_rope(&k, &cos, &sin);
            let (k, v) = match cache.as_deref_mut() {
                Some(cache) => cache.append(i, &k, &v),
                None => (k, v),
            };
            let ctx = if want.attentions {
                let rep = nh / nkv;
                let k = k.repeat_interleave_self_int(rep, 1, None);
                let v = v.repeat_interleave_self_int(rep, 1, None);
                let mut scores = q.matmul(&k.transpose(-1, -2)) / (hd as f64).sqrt();
                if let Some(m) = &mask {
                    scores = scores.masked_fill(&m.logical_not(), f64::NEG_INFINITY);
                } else if is_causal {
                    let causal = Tensor::ones([t, t], (Kind::Bool, device)).tril(0);
                    scores = scores.masked_fill(&causal.logical_not(), f64::NEG_INFINITY);
                }
                let probs = scores.softmax(-1, Kind::Float).to_kind(kind);
                let ctx = probs.dropout(p_drop, train).matmul(&v);
                out.attentions.push(probs);
                ctx
            } else {
                Tensor::f_scaled_dot_product_attention(
                    &q,
                    &k,
                    &v,
                    mask.as_ref(),
                    p_drop,
                    is_causal,
                    None,
                    nkv != nh,
                )?
            };
            let ctx = ctx.transpose(1, 2).contiguous().view([b, t, nh * hd]);
            let a = o_proj.forward(&ctx, train)?;
            let a = l.attention_slots.apply(&ctx, a, train)?;
            h = &h + a;
            let x = l.post_attention_layernorm.forward(&h);
            let f = gate.forward(&x, train)?.silu() * up.forward(&x, train)?;
            let f = down.forward(&f, train)?;
            let f = l.mlp_slots.apply(&x, f, train)?;
            h = &h + f;
            if want.hidden_states {
                out.hidden_states.push(h.shallow_clone());
            }
        }
        if let Some(cache) = cache {
            cache.advance(t);
        }
        let h = self.norm.forward(&h);
        if want.hidden_states {
            // transformers reports the final norm's output as the last hidden state.
            if let Some(last) = out.hidden_states.last_mut() {
                *last = h.shallow_clone();
            }
        }
        out.last_hidden_state = h;
        Ok(out)
    }

    /// The output head: `[..., hidden]` to `[..., vocab]` logits (the embedding table
    /// when tied).
    pub fn logits(&self, hidden: &Tensor, train: bool) -> Result<Tensor> {
        match &self.lm_head {
            Some(h) => h.forward(hidden, train),
            None => Ok(hidden.linear::<&Tensor>(&self.embed_tokens, None)),
        }
    }

    /// cos and sin `[b, 1, t, head_dim]` for `positions` `[b, t]`, computed in f32 and
    /// cast to `kind`, as transformers does.
    fn rope(&self, positions: &Tensor, kind: Kind) -> (Tensor, Tensor) {
        let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * &self.inv_freq;
        let emb = Tensor::cat(&[&freqs, &freqs], -1).unsqueeze(1);
        (emb.cos().to_kind(kind), emb.sin().to_kind(kind))
    }
}

/// `x cos + rotate_half(x) sin` for `x` `[b, heads, t, d]`.
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let d = x.size()[3];
    let x1 = x.narrow(3, 0, d / 2);
    let x2 = x.narrow(3, d / 2, d / 2);
    let rotated = Tensor::cat(&[&x2.neg(), &x1], 3);
    x * cos + rotated * sin
}

/// RoPE inverse frequencies `[d / 2]` (f32) for head size `d`, as transformers computes
/// them (`default` and `llama3`).
pub(crate) fn inv_freq(config: &LlamaConfig, device: Device) -> Result<Tensor> {
    let d = config.head_size();
    let base = config.rope_theta();
    let exps = Tensor::arange_start_step(0, d, 2, (Kind::Int64, Device::Cpu)).to_kind(Kind::Float)
        / d as f64;
    let inv = Tensor::from(base)
        .to_kind(Kind::Float)
        .pow(&exps)
        .reciprocal();
    let inv = match config.rope_scaling()? {
        RopeScaling::Default => inv,
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old,
        } => {
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            let wavelen = inv.reciprocal() * (2.0 * std::f64::consts::PI);
            let scaled = inv.where_self(&wavelen.le(low_wavelen), &(&inv / factor));
            let smooth = (wavelen.reciprocal() * old - low_freq_factor)
                / (high_freq_factor - low_freq_factor);
            let smoothed = (smooth.ones_like() - &smooth) * &scaled / factor + &smooth * &scaled;
            let medium = wavelen
                .ge(high_wavelen)
                .logical_and(&wavelen.le(low_wavelen));
            smoothed.where_self(&medium, &scaled)
        }
    };
    Ok(inv.to_device(device))
}

impl Model for CausalLm {
    fn visit_linears(&mut self, f: &mut dyn FnMut(&str, &mut Linear)) {
        let a = self.arch;
        for (i, l) in self.layers.iter_mut().enumerate() {
            for (spec, lin) in a.linears.iter().zip(l.linears.iter_mut()) {
                f(&a.layer_path(i, spec.path), lin);
            }
        }
        if let (Some(h), Some(head)) = (&mut self.lm_head, a.head) {
            f(head, h);
        }
    }

    fn visit_block_outputs(&mut self, f: &mut dyn FnMut(&str, &mut OutputSlots)) {
        let a = self.arch;
        for (i, l) in self.layers.iter_mut().enumerate() {
            for (name, slots) in a.slots.iter().zip(l.slots_mut()) {
                f(&a.layer_path(i, name), slots);
            }
        }
    }

    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        self.tensors(true)
    }

    fn named_buffers(&self) -> Vec<(String, Tensor)> {
        let a = self.arch;
        let mut v = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            for (spec, lin) in a.linears.iter().zip(&l.linears) {
                v.extend(prefixed(&a.layer_path(i, spec.path), lin.named_buffers()));
            }
        }
        if let (Some(h), Some(head)) = (&self.lm_head, a.head) {
            v.extend(prefixed(head, h.named_buffers()));
        }
        v
    }
}

#[cfg(test)]
mod tests;
