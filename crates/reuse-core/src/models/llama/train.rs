//! A causal LM as a [`Trainable`]: next-token cross-entropy against `[b, t]` labels,
//! the head and loss computed in chunks of tokens, and mean token NLL as its evaluation.

use tch::{Device, Tensor};

use crate::data::{epoch_batches, Batch, BatchSource};
use crate::loss::{chunked_next_token_cross_entropy, next_token_cross_entropy};
use crate::model::{Evaluation, ForwardOptions, StepOutputs, Trainable};
use crate::{Error, Result};

use super::CausalLm;

/// Tokens per chunk of the head + loss: 1024 tokens of a 49k vocabulary are 200 MB of
/// f32 logits, against 3.2 GB for a batch of 16 x 1024 tokens at once.
pub const LOSS_CHUNK: i64 = 1024;

impl CausalLm {
    /// The head's weight when the head is a plain matrix the chunked loss can read
    /// (tied, or an `lm_head` without deltas or quantized storage); `None` otherwise.
    fn plain_head(&self) -> Option<Tensor> {
        match &self.lm_head {
            None => Some(self.embed_tokens.shallow_clone()),
            Some(h) if h.delta_names().is_empty() && h.storage().is_none() && h.bias.is_none() => {
                Some(h.weight.shallow_clone())
            }
            Some(_) => None,
        }
    }

    /// Sum of next-token NLL over the labelled targets of `batch`, and their count (eval
    /// mode, no gradient).
    pub fn batch_nll(&self, batch: &Batch) -> Result<(f64, usize)> {
        tch::no_grad(|| {
            let out = self.forward_batch(batch, false, ForwardOptions::default())?;
            let n = batch.num_targets();
            let mean = self.loss_of(&out, batch)?.double_value(&[]);
            Ok((mean * n as f64, n as usize))
        })
    }

    fn forward_batch(
        &self,
        batch: &Batch,
        train: bool,
        opts: ForwardOptions,
    ) -> Result<StepOutputs> {
        let mask = if batch.padded {
            batch.mask.as_ref()
        } else {
            None
        };
        let o = self.forward(&batch.inputs, mask, None, train, opts)?;
        let logits = if opts.logits || self.plain_head().is_none() {
            self.logits(&o.last_hidden_state, train)?
        } else {
            Tensor::new()
        };
        Ok(StepOutputs {
            logits,
            last_hidden: Some(o.last_hidden_state),
            hidden_states: o.hidden_states,
            attentions: o.attentions,
            pooled: None,
        })
    }

    fn loss_of(&self, out: &StepOutputs, batch: &Batch) -> Result<Tensor> {
        if batch.labels.dim() != 2 {
            return Err(Error::invalid(
                "causal LM labels",
                format!(
                    "expected token labels [batch, tokens] aligned with the inputs, found {:?}",
                    batch.labels.size()
                ),
            ));
        }
        if out.logits.defined() {
            return next_token_cross_entropy(&out.logits, &batch.labels);
        }
        let (Some(h), Some(w)) = (&out.last_hidden, self.plain_head()) else {
            return Err(Error::invalid(
                "causal LM loss",
                "the forward pass returned neither logits nor the final hidden state",
            ));
        };
        chunked_next_token_cross_entropy(h, &w, &batch.labels, LOSS_CHUNK)
    }
}

impl Trainable for CausalLm {
    /// `batch.inputs` are token ids `[b, t]`; the mask is used when the batch is padded.
    /// Logits are computed only when `opts.logits` asks (or the head cannot be read in
    /// chunks); the loss reads `last_hidden`.
    fn forward(&self, batch: &Batch, train: bool, opts: ForwardOptions) -> Result<StepOutputs> {
        self.forward_batch(batch, train, opts)
    }

    /// Next-token cross-entropy, the mean over labelled targets (`labels[:, 1:]` not
    /// -100), through the head in chunks of [`LOSS_CHUNK`] tokens when no logits were
    /// asked for: the same value and gradients as the plain path.
    fn loss(&self, out: &StepOutputs, batch: &Batch) -> Result<Tensor> {
        self.loss_of(out, batch)
    }

    /// Logits at `j` predict the token at `j + 1`.
    fn predicts_next_token(&self) -> bool {
        true
    }

    /// Mean next-token NLL over every labelled target of `data`.
    fn evaluate(
        &self,
        data: &dyn BatchSource,
        batch_size: usize,
        device: Device,
    ) -> Result<Option<Evaluation>> {
        let (mut sum, mut tokens) = (0.0, 0usize);
        for idx in epoch_batches(data.len(), batch_size, None, 0) {
            let b = data.batch(&idx, device)?;
            let (s, n) = self.batch_nll(&b)?;
            sum += s;
            tokens += n;
        }
        Ok(Some(Evaluation::TokenNll {
            nll: sum / tokens.max(1) as f64,
            tokens,
        }))
    }
}

impl CausalLm {
    /// Next-token NLL of whole token sequences (eval mode, no gradient): for each row,
    /// the sum over its positions 1.. of -log p(token | earlier tokens), and how many
    /// positions that is (its length - 1). Rows run `batch_size` at a time, longest
    /// first, right-padded; the head runs on the batch's real positions only, up to
    /// [`LOSS_CHUNK`] at a time.
    pub fn sequence_nlls(&self, rows: &[Vec<i64>], batch_size: usize) -> Result<Vec<(f64, usize)>> {
        let device = self.device();
        let mut order: Vec<usize> = (0..rows.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(rows[i].len()));
        let mut out = vec![(0.0, 0usize); rows.len()];
        tch::no_grad(|| -> Result<()> {
            for chunk in order.chunks(batch_size.max(1)) {
                let t = chunk.iter().map(|&i| rows[i].len()).max().unwrap_or(0);
                if t < 2 {
                    continue;
                }
                let (mut ids, mut mask) = (Vec::new(), Vec::new());
                for &i in chunk {
                    let r = &rows[i];
                    ids.extend(r.iter().copied().chain(std::iter::repeat_n(0, t - r.len())));
                    mask.extend(
                        std::iter::repeat_n(1i64, r.len())
                            .chain(std::iter::repeat_n(0, t - r.len())),
                    );
                }
                let shape = [chunk.len() as i64, t as i64];
                let ids = Tensor::from_slice(&ids).view(shape).to_device(device);
                let padded = chunk.iter().any(|&i| rows[i].len() < t);
                let mask = padded.then(|| Tensor::from_slice(&mask).view(shape).to_device(device));
                let o =
                    self.forward(&ids, mask.as_ref(), None, false, ForwardOptions::default())?;
                // Position j of row k predicts its token j + 1: the rows' real positions,
                // flattened, through the head a chunk at a time (one read of the head's
                // weight per chunk, never [positions, vocab] whole).
                let steps = t as i64 - 1;
                let mut pos = Vec::new();
                for (k, &i) in chunk.iter().enumerate() {
                    let n = rows[i].len() as i64;
                    pos.extend((0..n - 1).map(|j| k as i64 * steps + j));
                }
                let hidden = o.last_hidden_state.narrow(1, 0, steps);
                let width = hidden.size()[2];
                let hidden = hidden.reshape([-1, width]);
                let targets = ids.narrow(1, 1, steps).reshape([-1]);
                let mut sums = vec![0f64; chunk.len()];
                for part in pos.chunks(LOSS_CHUNK as usize) {
                    let at = Tensor::from_slice(part).to_device(device);
                    let logp = self
                        .logits(&hidden.index_select(0, &at), false)?
                        .to_kind(tch::Kind::Float)
                        .log_softmax(-1, tch::Kind::Float);
                    let nll = logp
                        .gather(1, &targets.index_select(0, &at).unsqueeze(1), false)
                        .squeeze_dim(1)
                        .neg()
                        .to_kind(tch::Kind::Double)
                        .to_device(tch::Device::Cpu);
                    for (&p, v) in part.iter().zip(Vec::<f64>::try_from(nll)?) {
                        sums[(p / steps) as usize] += v;
                    }
                }
                for (k, &i) in chunk.iter().enumerate() {
                    let n = rows[i].len();
                    if n >= 2 {
                        out[i] = (sums[k], n - 1);
                    }
                }
            }
            Ok(())
        })?;
        Ok(out)
    }
}

/// Mean NLL as perplexity.
pub fn perplexity(nll: f64) -> f64 {
    nll.exp()
}
