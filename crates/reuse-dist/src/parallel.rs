//! Data parallelism as a [`Technique`] for core's trainer, as PyTorch's
//! `DistributedDataParallel` does it: every rank holds the whole model, takes its share
//! of each batch, and gradients are averaged before the optimizer step, so every rank
//! takes the same step.
//!
//! * At the start of every fit, rank 0's parameters are broadcast (ranks start equal even
//!   if their initialisation differed), and the ranks check they agree on the run's
//!   length and position.
//! * [`DataParallel::shard`] wraps the training data: every rank walks the same global
//!   batches (the trainer's order is a function of seed and epoch) and keeps a
//!   contiguous slice of each. A rank whose slice is empty (a final batch smaller than
//!   the world) trains on one example with weight 0.
//! * After backward, the gradients of the parameters that train (and only those: a LoRA
//!   run sends the adapter, not the base) are flattened into buckets of
//!   [`DataParallel::bucket_bytes`], each weighted by this rank's share of the batch's
//!   examples, summed over ranks, and copied back. With equal shares that is DDP's mean;
//!   with unequal shares (the epoch's last batch) it is still exactly the gradient of the
//!   mean loss over the whole batch, so N processes train the same weights as one
//!   process on the combined batch. With token labels (`[b, t]`, causal LMs) the loss
//!   is a mean over labelled tokens, so the share is this rank's labelled tokens over
//!   the batch's (one scalar all-reduce per step finds the total): ranks whose examples
//!   have longer responses weigh more, exactly as in one process.
//! * A parameter no rank's backward reached keeps no gradient (per-task heads); one some
//!   rank reached gets the summed gradient on every rank.
//! * The reported step loss is the loss over every rank's examples, and only rank 0
//!   writes the run file (every rank reads it on resume).
//!
//! With gradient accumulation, a step's share is the share of all its micro-batches
//! together: exact whenever a step's micro-batches split the same way (all but an
//! epoch's last step).

use std::sync::{Arc, Mutex};

use reuse_core::data::{Batch, BatchSource};
use reuse_core::trainer::{count_correct, StepContext, Technique, Trainable};
use reuse_core::{Params, Result as CoreResult};
use tch::{Device, Kind, Tensor};

use crate::group::{set_grad, ProcessGroup, ReduceOp};
use crate::{Error, Result};

#[derive(Debug, Default)]
struct Counts {
    local: usize,
    global: usize,
    /// Labelled targets of this rank's token-labelled batches (causal LMs), whose
    /// losses are means over targets, not examples.
    local_targets: i64,
    tokens: bool,
}

/// The data-parallel technique. Add it to the trainer's techniques on every rank (after
/// techniques that edit gradients, such as PackNet's masks, or before: the sum is
/// linear), and train on [`DataParallel::shard`] of the training data.
#[derive(Debug)]
pub struct DataParallel {
    group: Arc<ProcessGroup>,
    counts: Arc<Mutex<Counts>>,
    /// Largest all-reduce bucket in bytes (PyTorch DDP's default: 25 MiB).
    pub bucket_bytes: usize,
    /// Broadcast every parameter from rank 0 at the start of each fit (default true).
    pub broadcast_parameters: bool,
    weight: f64,
    gradient_bytes: u64,
}

impl DataParallel {
    /// Data parallelism over `group`.
    pub fn new(group: Arc<ProcessGroup>) -> Self {
        Self {
            group,
            counts: Arc::new(Mutex::new(Counts::default())),
            bucket_bytes: 25 << 20,
            broadcast_parameters: true,
            weight: 1.0,
            gradient_bytes: 0,
        }
    }

    /// The group.
    pub fn group(&self) -> &Arc<ProcessGroup> {
        &self.group
    }

    /// This rank's share of `source`'s batches. Its length is the whole source's, so
    /// every rank's trainer walks the same global batches; give the trainer the global
    /// batch size. Shard only the training data (the shares of its batches weight the
    /// gradients); evaluate with [`DataParallel::accuracy`].
    pub fn shard<'a>(&self, source: &'a dyn BatchSource) -> Shard<'a> {
        Shard {
            inner: source,
            rank: self.group.rank(),
            world: self.group.world_size(),
            counts: Some(self.counts.clone()),
        }
    }

    /// Gradient bytes this rank has all-reduced so far: exactly the trainable
    /// parameters' size per step (the group's [`ProcessGroup::all_reduced_bytes`] adds a
    /// 4-byte flag per trainable tensor and the 4-byte step loss).
    pub fn gradient_bytes(&self) -> u64 {
        self.gradient_bytes
    }

    fn take_weight(&mut self) -> Result<f64> {
        let c = std::mem::take(&mut *self.counts.lock().expect("counts lock"));
        if c.tokens {
            // Every rank takes this branch together: the same global batches, and a
            // source's labels have one shape.
            let t = Tensor::from_slice(&[c.local_targets as f64]);
            self.group.all_reduce(&t, ReduceOp::Sum)?;
            let global = t.double_value(&[0]);
            return Ok(if global > 0.0 {
                c.local_targets as f64 / global
            } else {
                1.0 / self.group.world_size() as f64
            });
        }
        Ok(if c.global > 0 {
            c.local as f64 / c.global as f64
        } else {
            1.0 / self.group.world_size() as f64
        })
    }

    /// Broadcasts every tensor of `params` from rank 0, in buckets.
    pub fn broadcast(&self, params: &Params) -> Result<()> {
        tch::no_grad(|| {
            let entries: Vec<(&str, &Tensor)> = params.iter().collect();
            for bucket in buckets(&entries, self.bucket_bytes) {
                let flat = flatten(
                    &bucket
                        .iter()
                        .map(|(_, t)| (*t).shallow_clone())
                        .collect::<Vec<_>>(),
                );
                self.group.broadcast(&flat, 0)?;
                unflatten_into(&flat, bucket.iter().map(|(_, t)| *t))?;
            }
            Ok(())
        })
    }

    /// Sums `weight x` each trainable parameter's gradient over ranks, in buckets; see
    /// the module docs.
    pub fn all_reduce_gradients(&mut self, trainable: &Params, weight: f64) -> Result<()> {
        tch::no_grad(|| {
            let entries: Vec<(&str, &Tensor)> = trainable.iter().collect();
            if entries.is_empty() {
                return Ok(());
            }
            let grads: Vec<Tensor> = entries.iter().map(|(_, p)| p.grad()).collect();
            let flags = Tensor::from_slice(
                &grads
                    .iter()
                    .map(|g| g.defined() as i32 as f32)
                    .collect::<Vec<f32>>(),
            );
            self.group.all_reduce(&flags, ReduceOp::Sum)?;
            let flags = Vec::<f32>::try_from(&flags)?;
            let mut k = 0;
            for bucket in buckets(&entries, self.bucket_bytes) {
                let parts: Vec<Tensor> = bucket
                    .iter()
                    .enumerate()
                    .map(|(i, (_, p))| {
                        let g = &grads[k + i];
                        if g.defined() {
                            g.shallow_clone()
                        } else {
                            p.zeros_like()
                        }
                    })
                    .collect();
                let mut flat = flatten(&parts);
                let _ = flat.f_mul_scalar_(weight)?;
                self.group.all_reduce(&flat, ReduceOp::Sum)?;
                self.gradient_bytes += (flat.numel() * flat.kind().elt_size_in_bytes()) as u64;
                let mut off = 0i64;
                for (i, (_, p)) in bucket.iter().enumerate() {
                    let n = p.numel() as i64;
                    let g = &grads[k + i];
                    if flags[k + i] > 0.0 {
                        let v = flat.narrow(0, off, n).view(p.size().as_slice());
                        if g.defined() {
                            let mut g = g.shallow_clone();
                            g.f_copy_(&v)?;
                        } else {
                            set_grad(p, &v.copy())?;
                        }
                    }
                    off += n;
                }
                k += bucket.len();
            }
            Ok(())
        })
    }

    /// Accuracy of `model` on `data`: each rank predicts its contiguous share and the
    /// counts are summed, so every rank returns the accuracy over all of `data`.
    pub fn accuracy(
        &self,
        model: &dyn Trainable,
        data: &dyn BatchSource,
        batch_size: usize,
        device: Device,
    ) -> Result<f64> {
        let n = data.len();
        let chunk = n.div_ceil(self.group.world_size());
        let lo = (self.group.rank() * chunk).min(n);
        let hi = (lo + chunk).min(n);
        let (right, total) = if lo < hi {
            let part = Range {
                inner: data,
                start: lo,
                len: hi - lo,
            };
            count_correct(model, &part, batch_size, device)?
        } else {
            (0, 0)
        };
        let t = Tensor::from_slice(&[right as f64, total as f64]);
        self.group.all_reduce(&t, ReduceOp::Sum)?;
        let v = Vec::<f64>::try_from(&t)?;
        Ok(v[0] / v[1].max(1.0))
    }
}

impl Technique for DataParallel {
    fn name(&self) -> &str {
        "data_parallel"
    }

    fn begin_fit(&mut self, params: &Params, ctx: &StepContext) -> CoreResult<()> {
        // Every rank must take the same steps: a different data length or config would
        // otherwise deadlock in a collective, or train on garbage.
        let mine = [
            ctx.total_steps as i64,
            ctx.step as i64,
            params.count() as i64,
        ];
        let hi = Tensor::from_slice(&mine);
        let lo = Tensor::from_slice(&mine);
        self.group.all_reduce(&hi, ReduceOp::Max)?;
        self.group.all_reduce(&lo, ReduceOp::Min)?;
        if Vec::<i64>::try_from(&hi).map_err(Error::from)?
            != Vec::<i64>::try_from(&lo).map_err(Error::from)?
        {
            return Err(Error::Invalid {
                what: "data-parallel run".into(),
                reason: format!(
                    "rank {} has {} total steps, starts at step {} with {} parameter values, \
                     and the ranks do not all agree (max {:?}, min {:?} over ranks): every rank \
                     needs the same data length, batch size, epochs and model",
                    self.group.rank(),
                    mine[0],
                    mine[1],
                    mine[2],
                    Vec::<i64>::try_from(&hi).unwrap_or_default(),
                    Vec::<i64>::try_from(&lo).unwrap_or_default()
                ),
            }
            .into());
        }
        if self.broadcast_parameters {
            self.broadcast(params)?;
        }
        *self.counts.lock().expect("counts lock") = Counts::default();
        Ok(())
    }

    fn after_backward(&mut self, params: &Params, _ctx: &StepContext) -> CoreResult<()> {
        self.weight = self.take_weight()?;
        let w = self.weight;
        self.all_reduce_gradients(params, w)?;
        Ok(())
    }

    fn reduce_step_loss(&mut self, loss: Tensor, _ctx: &StepContext) -> CoreResult<Tensor> {
        let t = (loss.to_kind(Kind::Float) * self.weight)
            .reshape([1])
            .contiguous();
        self.group.all_reduce(&t, ReduceOp::Sum)?;
        Ok(t.squeeze())
    }

    fn writes_run_state(&self) -> bool {
        self.group.is_main()
    }
}

/// One rank's share of a [`BatchSource`]; see [`DataParallel::shard`].
pub struct Shard<'a> {
    inner: &'a dyn BatchSource,
    rank: usize,
    world: usize,
    counts: Option<Arc<Mutex<Counts>>>,
}

impl<'a> Shard<'a> {
    /// Rank `rank` of `world`'s share of `source`'s batches, counted by no technique
    /// (for a user's own loop; [`DataParallel::shard`] is the one to train with).
    pub fn new(source: &'a dyn BatchSource, rank: usize, world: usize) -> Self {
        Self {
            inner: source,
            rank,
            world: world.max(1),
            counts: None,
        }
    }

    /// The part of a global batch of `indices` this rank takes, and how many of its
    /// examples count (0 when the batch has fewer examples than ranks reach).
    pub fn split<'i>(&self, indices: &'i [i64]) -> (&'i [i64], usize) {
        let n = indices.len();
        let chunk = n.div_ceil(self.world);
        let lo = (self.rank * chunk).min(n);
        let hi = (lo + chunk).min(n);
        if lo < hi {
            (&indices[lo..hi], hi - lo)
        } else {
            (&indices[..n.min(1)], 0)
        }
    }
}

impl BatchSource for Shard<'_> {
    fn len(&self) -> usize {
        self.inner.len()
    }

    fn batch(&self, indices: &[i64], device: Device) -> CoreResult<Batch> {
        let (mine, counted) = self.split(indices);
        let b = self.inner.batch(mine, device)?;
        if let Some(c) = &self.counts {
            let mut c = c.lock().expect("counts lock");
            c.local += counted;
            c.global += indices.len();
            if b.labels.dim() == 2 {
                c.tokens = true;
                if counted > 0 {
                    c.local_targets += b.num_targets();
                }
            }
        }
        Ok(b)
    }
}

/// Examples `start..start + len` of a source.
struct Range<'a> {
    inner: &'a dyn BatchSource,
    start: usize,
    len: usize,
}

impl BatchSource for Range<'_> {
    fn len(&self) -> usize {
        self.len
    }

    fn batch(&self, indices: &[i64], device: Device) -> CoreResult<Batch> {
        let shifted: Vec<i64> = indices.iter().map(|i| i + self.start as i64).collect();
        self.inner.batch(&shifted, device)
    }
}

/// Consecutive runs of tensors with one dtype and device, each at most `cap` bytes (a
/// tensor larger than `cap` is a bucket of its own).
fn buckets<'a>(entries: &[(&'a str, &'a Tensor)], cap: usize) -> Vec<Vec<(&'a str, &'a Tensor)>> {
    let mut out: Vec<Vec<(&str, &Tensor)>> = Vec::new();
    let mut bytes = 0usize;
    for &(n, t) in entries {
        let size = t.numel() * t.kind().elt_size_in_bytes();
        let fits = out.last().is_some_and(|b| {
            let (_, first) = b[0];
            first.kind() == t.kind() && first.device() == t.device() && bytes + size <= cap
        });
        if fits {
            out.last_mut().expect("a bucket").push((n, t));
            bytes += size;
        } else {
            out.push(vec![(n, t)]);
            bytes = size;
        }
    }
    out
}

fn flatten(parts: &[Tensor]) -> Tensor {
    let flat: Vec<Tensor> = parts.iter().map(|t| t.reshape([-1])).collect();
    Tensor::cat(&flat, 0).contiguous()
}

fn unflatten_into<'a>(flat: &Tensor, dst: impl Iterator<Item = &'a Tensor>) -> Result<()> {
    let mut off = 0i64;
    for t in dst {
        let n = t.numel() as i64;
        let mut t = t.shallow_clone();
        t.f_copy_(&flat.narrow(0, off, n).view(t.size().as_slice()))?;
        off += n;
    }
    Ok(())
}
