//! Decoding: a caller-owned key/value cache, and generation over a batch of prompts
//! (left-padded), greedy or sampled (temperature, top-k, top-p, seeded), stopping at an
//! end-of-sequence token or a token budget, each token handed to a callback as it comes.

use rand::{Rng, SeedableRng};
use tch::{Kind, Tensor};

use crate::model::ForwardOptions;
use crate::{Error, Result};

use super::CausalLm;

/// Keys and values of the positions decoded so far, per block: `[b, kv_heads, capacity,
/// head_dim]` buffers written in place, so a decoding step allocates no cache memory.
/// Owned by the caller: one cache per running batch.
#[derive(Debug)]
pub struct KvCache {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    len: i64,
    batch: i64,
    capacity: i64,
}

impl KvCache {
    /// An empty cache for `batch` rows and up to `capacity` positions of `model`, in its
    /// dtype and on its device.
    pub fn new(model: &CausalLm, batch: i64, capacity: i64) -> Self {
        let c = &model.config;
        let shape = [batch, c.kv_heads(), capacity, c.head_size()];
        let opts = (model.kind(), model.device());
        let n = model.layers.len();
        Self {
            keys: (0..n).map(|_| Tensor::zeros(shape, opts)).collect(),
            values: (0..n).map(|_| Tensor::zeros(shape, opts)).collect(),
            len: 0,
            batch,
            capacity,
        }
    }

    /// Positions held.
    pub fn len(&self) -> i64 {
        self.len
    }

    /// Whether no position is held yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions it can hold.
    pub fn capacity(&self) -> i64 {
        self.capacity
    }

    pub(crate) fn check(&self, model: &CausalLm, b: i64, t: i64) -> Result<()> {
        if self.keys.len() != model.layers.len() || b != self.batch {
            return Err(Error::invalid(
                "kv cache",
                format!(
                    "made for {} blocks and batch {}, used with {} blocks and batch {b}",
                    self.keys.len(),
                    self.batch,
                    model.layers.len()
                ),
            ));
        }
        if self.len + t > self.capacity {
            return Err(Error::invalid(
                "kv cache",
                format!(
                    "holds {} of {} positions; {t} more do not fit",
                    self.len, self.capacity
                ),
            ));
        }
        Ok(())
    }

    /// Writes block `layer`'s new keys and values `[b, kv, t, d]` after the held ones and
    /// returns all of them (views, no copy).
    pub(crate) fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> (Tensor, Tensor) {
        let t = k.size()[2];
        let end = self.len + t;
        self.keys[layer].narrow(2, self.len, t).copy_(k);
        self.values[layer].narrow(2, self.len, t).copy_(v);
        (
            self.keys[layer].narrow(2, 0, end),
            self.values[layer].narrow(2, 0, end),
        )
    }

    pub(crate) fn advance(&mut self, t: i64) {
        self.len += t;
    }
}

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq)]
pub enum Sampling {
    /// The most likely token.
    Greedy,
    /// A draw from the softmax of `logits / temperature`, restricted to the `top_k` most
    /// likely tokens and then to the smallest set whose probability reaches `top_p` (as
    /// transformers' warpers do, in that order), from a generator seeded with `seed`.
    Sample {
        /// Temperature (> 0).
        temperature: f64,
        /// Keep the k most likely tokens (`None`: all).
        top_k: Option<usize>,
        /// Nucleus: keep the most likely tokens up to this total probability (`None`: 1).
        top_p: Option<f64>,
        /// The generator's seed.
        seed: u64,
    },
}

/// What [`CausalLm::generate`] is asked to do.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Stop a row after this many new tokens.
    pub max_new_tokens: usize,
    /// Greedy or sampled.
    pub sampling: Sampling,
    /// Tokens that end a row (included in its output, as transformers includes EOS).
    /// The config's `eos_token_id`s are added.
    pub stop_tokens: Vec<i64>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            sampling: Sampling::Greedy,
            stop_tokens: Vec::new(),
        }
    }
}

/// Why a row stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// It produced a stop token.
    StopToken,
    /// It reached `max_new_tokens`.
    Length,
}

/// What [`CausalLm::generate`] returns, per prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    /// The new tokens of each row, its stop token included.
    pub tokens: Vec<Vec<i64>>,
    /// Why each row stopped.
    pub stop: Vec<StopReason>,
}

impl CausalLm {
    /// Continues each prompt (token ids, BOS included if the model wants one) with up to
    /// `max_new_tokens` new tokens. The prompts run as one batch, left-padded; each new
    /// token is handed to `on_token(row, token)` as soon as it is chosen. Rows stop
    /// independently; the batch stops when every row has.
    pub fn generate(
        &self,
        prompts: &[Vec<i64>],
        opts: &GenerateOptions,
        on_token: &mut dyn FnMut(usize, i64),
    ) -> Result<Generated> {
        let b = prompts.len();
        if b == 0 {
            return Ok(Generated {
                tokens: Vec::new(),
                stop: Vec::new(),
            });
        }
        if let Some(i) = prompts.iter().position(Vec::is_empty) {
            return Err(Error::invalid(
                "prompt",
                format!("prompt {i} has no tokens (give at least BOS)"),
            ));
        }
        if let Sampling::Sample {
            temperature, top_p, ..
        } = &opts.sampling
        {
            if temperature.is_nan() || *temperature <= 0.0 {
                return Err(Error::invalid(
                    "temperature",
                    format!("must be > 0, found {temperature}"),
                ));
            }
            if let Some(p) = top_p {
                if p.is_nan() || *p <= 0.0 || *p > 1.0 {
                    return Err(Error::invalid(
                        "top_p",
                        format!("must be in (0, 1], found {p}"),
                    ));
                }
            }
        }
        let mut stops = opts.stop_tokens.clone();
        stops.extend(self.config.token_ids("eos_token_id"));
        let pad = self
            .config
            .token_ids("pad_token_id")
            .first()
            .copied()
            .or_else(|| stops.first().copied())
            .unwrap_or(0);
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let device = self.device();
        let mut ids = Vec::with_capacity(b * longest);
        let mut mask = Vec::with_capacity(b * longest);
        for p in prompts {
            let padding = longest - p.len();
            ids.extend(std::iter::repeat_n(pad, padding).chain(p.iter().copied()));
            mask.extend(std::iter::repeat_n(0i64, padding).chain(std::iter::repeat_n(1, p.len())));
        }
        let padded = prompts.iter().any(|p| p.len() < longest);
        let (b_, t) = (b as i64, longest as i64);
        let ids = Tensor::from_slice(&ids).view([b_, t]).to_device(device);
        let mut mask_t = padded.then(|| Tensor::from_slice(&mask).view([b_, t]).to_device(device));
        let capacity = t + opts.max_new_tokens as i64;
        let mut cache = KvCache::new(self, b_, capacity);
        let mut rng = match &opts.sampling {
            Sampling::Sample { seed, .. } => Some(rand::rngs::StdRng::seed_from_u64(*seed)),
            Sampling::Greedy => None,
        };
        let mut out = Generated {
            tokens: vec![Vec::new(); b],
            stop: vec![StopReason::Length; b],
        };
        let mut done = vec![false; b];
        let mut input = ids;
        tch::no_grad(|| -> Result<()> {
            for _ in 0..opts.max_new_tokens {
                let o = self.forward(
                    &input,
                    mask_t.as_ref(),
                    Some(&mut cache),
                    false,
                    ForwardOptions::default(),
                )?;
                let steps = input.size()[1];
                let last = o.last_hidden_state.narrow(1, steps - 1, 1).squeeze_dim(1);
                let logits = self.logits(&last, false)?.to_kind(Kind::Float);
                let next: Vec<i64> = match (&opts.sampling, rng.as_mut()) {
                    (
                        Sampling::Sample {
                            temperature,
                            top_k,
                            top_p,
                            ..
                        },
                        Some(rng),
                    ) => sample(&logits, *temperature, *top_k, *top_p, rng)?,
                    _ => {
                        Vec::<i64>::try_from(logits.argmax(-1, false).to_device(tch::Device::Cpu))?
                    }
                };
                let mut feed = Vec::with_capacity(b);
                for (row, &tok) in next.iter().enumerate() {
                    if done[row] {
                        feed.push(pad);
                        continue;
                    }
                    out.tokens[row].push(tok);
                    on_token(row, tok);
                    if stops.contains(&tok) {
                        done[row] = true;
                        out.stop[row] = StopReason::StopToken;
                    }
                    feed.push(tok);
                }
                if done.iter().all(|d| *d) {
                    break;
                }
                input = Tensor::from_slice(&feed).view([b_, 1]).to_device(device);
                mask_t = mask_t
                    .take()
                    .map(|m| Tensor::cat(&[m, Tensor::ones([b_, 1], (Kind::Int64, device))], 1));
            }
            Ok(())
        })?;
        Ok(out)
    }
}

/// Draws one token per row of `logits` `[b, vocab]` (f32).
fn sample(
    logits: &Tensor,
    temperature: f64,
    top_k: Option<usize>,
    top_p: Option<f64>,
    rng: &mut rand::rngs::StdRng,
) -> Result<Vec<i64>> {
    let rows = logits.size()[0];
    let vocab = logits.size()[1] as usize;
    let all = Vec::<f32>::try_from(
        (logits / temperature)
            .to_device(tch::Device::Cpu)
            .view([-1]),
    )?;
    let mut out = Vec::with_capacity(rows as usize);
    for row in all.chunks(vocab) {
        // Candidates, most likely first.
        let mut idx: Vec<usize> = (0..vocab).collect();
        idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        if let Some(k) = top_k {
            idx.truncate(k.max(1));
        }
        let max = row[idx[0]];
        let mut probs: Vec<f64> = idx.iter().map(|&i| ((row[i] - max) as f64).exp()).collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if let Some(p) = top_p {
            // Keep the smallest prefix whose mass reaches p (at least one token).
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (n, q) in probs.iter().enumerate() {
                acc += q;
                if acc >= p {
                    keep = n + 1;
                    break;
                }
            }
            probs.truncate(keep);
            idx.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut u = rng.random::<f64>() * total;
        let mut pick = idx[idx.len() - 1];
        for (i, q) in idx.iter().zip(&probs) {
            if u < *q {
                pick = *i;
                break;
            }
            u -= q;
        }
        out.push(pick as i64);
    }
    Ok(out)
}
