//! Experience replay: a fixed-size memory of past examples mixed into every batch.
//!
//! Three memory policies, all seeded and resumable (the random draws are functions of
//! `(seed, counter)`, so a restored buffer continues exactly):
//! - [`BufferPolicy::Reservoir`]: reservoir sampling over the stream of training
//!   examples (Vitter's algorithm R): after `n` examples every one of them is in the
//!   memory with probability `capacity / n`. Updated as batches arrive.
//! - [`BufferPolicy::ClassBalanced`]: at the end of each task the memory is split equally
//!   over the classes seen so far; a new class's share is a uniform random subset of its
//!   examples, older classes keep the first part of theirs (Avalanche's
//!   `ClassBalancedBuffer` with `adaptive_size`).
//! - [`BufferPolicy::TaskBalanced`]: the same over tasks (Avalanche's default,
//!   `ExperienceBalancedBuffer`: 200 → 100/100 → 67/67/66 → 50 x 4; the remainder goes
//!   to the first groups).
//!
//! [`Replay`] is the technique: from the second task on it appends
//! [`ReplayConfig::per_batch`] stored examples (with their task ids) to each training
//! batch — Avalanche's `ReplayPlugin` appends as many as the batch has (32 + 32) and
//! takes one mean loss over both; so does this by default.

use std::collections::BTreeMap;

use tch::{Device, Kind, Tensor};

use reuse_core::data::{epoch_batches, Batch, BatchSource};
use reuse_core::{Checkpoint, Error, Result, StepContext, TaskContext, Technique};

/// How the memory chooses what to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BufferPolicy {
    /// Uniform over every example seen (reservoir sampling), updated per batch.
    Reservoir,
    /// Equal shares per class seen, updated at the end of each task.
    ClassBalanced,
    /// Equal shares per task seen, updated at the end of each task.
    TaskBalanced,
}

impl BufferPolicy {
    fn code(self) -> i64 {
        match self {
            BufferPolicy::Reservoir => 0,
            BufferPolicy::ClassBalanced => 1,
            BufferPolicy::TaskBalanced => 2,
        }
    }
}

/// A 64-bit draw that is a pure function of `(seed, counter)` (splitmix64), so the
/// buffer's random state is two integers that a run file holds.
fn draw(seed: u64, counter: u64) -> u64 {
    let mut z = seed ^ counter.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A uniform integer in `0..n` from `(seed, counter)`.
fn below(seed: u64, counter: u64, n: u64) -> u64 {
    // Multiply-shift: unbiased enough for n far below 2^64 (bias < n / 2^64).
    ((draw(seed, counter) as u128 * n as u128) >> 64) as u64
}

/// A seeded permutation of `0..n` (Fisher-Yates from `(seed, counter + i)` draws).
fn permutation(n: usize, seed: u64, counter: u64) -> Vec<i64> {
    let mut v: Vec<i64> = (0..n as i64).collect();
    for i in (1..n).rev() {
        let j = below(seed, counter.wrapping_add(i as u64), i as u64 + 1) as usize;
        v.swap(i, j);
    }
    v
}

/// A fixed-size memory of examples, kept as one batch on a device (so sampling is one
/// `index_select` per tensor) with a group key per row (class or task).
#[derive(Debug)]
pub struct ReplayBuffer {
    policy: BufferPolicy,
    capacity: usize,
    seed: u64,
    pad_id: i64,
    /// Examples offered so far (reservoir) or tasks consolidated (balanced).
    seen: u64,
    /// Draws used by `sample`.
    draws: u64,
    stored: Option<Batch>,
    /// Group key of each stored row (class or task; 0 for reservoir).
    groups: Vec<i64>,
}

impl ReplayBuffer {
    /// An empty memory of `capacity` examples; token batches are padded with `pad_id`
    /// when rows of different lengths are joined. A capacity of 0 is an error.
    pub fn new(policy: BufferPolicy, capacity: usize, seed: u64, pad_id: i64) -> Result<Self> {
        if capacity == 0 {
            return Err(Error::invalid(
                "replay buffer size",
                "must be at least 1 (a memory of 0 examples replays nothing)",
            ));
        }
        Ok(Self {
            policy,
            capacity,
            seed,
            pad_id,
            seen: 0,
            draws: 0,
            stored: None,
            groups: Vec::new(),
        })
    }

    /// The policy.
    pub fn policy(&self) -> BufferPolicy {
        self.policy
    }

    /// The most examples it holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Examples held now.
    pub fn len(&self) -> usize {
        self.groups.len()
    }

    /// True when nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// The stored examples as one batch (`indices` are the examples' indices in their
    /// source), if any.
    pub fn stored(&self) -> Option<&Batch> {
        self.stored.as_ref()
    }

    /// Group key of each stored row: its class (class-balanced), task (task-balanced)
    /// or 0 (reservoir).
    pub fn groups(&self) -> &[i64] {
        &self.groups
    }

    fn detach(b: &Batch, device: Device) -> Batch {
        let mut b = b.to_device(device);
        b.inputs = b.inputs.detach();
        b
    }

    /// Offers a batch to a reservoir memory: each example replaces a random slot with
    /// probability `capacity / n` (n = examples offered so far, this one included).
    /// Other policies ignore it (they update per task).
    pub fn observe(&mut self, batch: &Batch) -> Result<()> {
        if self.policy != BufferPolicy::Reservoir || batch.is_empty() {
            return Ok(());
        }
        let device = batch.labels.device();
        let have = self.len();
        // Rows of `concat(stored, batch)` that end up in the memory, slot by slot.
        let mut slots: Vec<i64> = (0..have as i64).collect();
        for r in 0..batch.len() {
            let n = self.seen + 1;
            self.seen = n;
            let row = (have + r) as i64;
            if slots.len() < self.capacity {
                slots.push(row);
            } else {
                let j = below(self.seed, n, n);
                if (j as usize) < self.capacity {
                    slots[j as usize] = row;
                }
            }
        }
        if slots.len() == have && slots.iter().enumerate().all(|(i, &s)| s == i as i64) {
            return Ok(());
        }
        let incoming = Self::detach(batch, device);
        let joined = match &self.stored {
            Some(s) => Batch::concat(&[s.clone(), incoming], self.pad_id)?,
            None => incoming,
        };
        self.stored = Some(joined.select(&slots)?);
        self.groups = vec![0; slots.len()];
        Ok(())
    }

    /// Ends task `task` for a balanced memory: re-splits the capacity over the groups
    /// seen (classes or tasks, this task's included) and fills the new groups' shares
    /// with a uniform random subset of `data`. A reservoir memory ignores it.
    pub fn update_from_task(
        &mut self,
        data: &dyn BatchSource,
        task: usize,
        device: Device,
    ) -> Result<()> {
        if self.policy == BufferPolicy::Reservoir || data.is_empty() {
            return Ok(());
        }
        self.seen += 1;
        let all: Vec<i64> = (0..data.len() as i64).collect();
        let order = permutation(all.len(), self.seed, self.seen.wrapping_mul(1 << 32));
        // Group key of each example of the new task.
        let new_keys: Vec<i64> = match self.policy {
            BufferPolicy::TaskBalanced => vec![task as i64; all.len()],
            _ => {
                let mut keys = Vec::with_capacity(all.len());
                for idx in epoch_batches(all.len(), 4096, None, 0) {
                    let b = data.batch(&idx, Device::Cpu)?;
                    keys.extend(Vec::<i64>::try_from(&b.labels)?);
                }
                keys
            }
        };
        // Candidates per group: stored rows first (in memory order), then the new
        // task's examples in random order.
        let mut per_group: BTreeMap<i64, Vec<(bool, i64)>> = BTreeMap::new();
        for (row, &g) in self.groups.iter().enumerate() {
            per_group.entry(g).or_default().push((false, row as i64));
        }
        for &i in &order {
            per_group
                .entry(new_keys[i as usize])
                .or_default()
                .push((true, i));
        }
        let k = per_group.len();
        let base = self.capacity / k;
        let extra = self.capacity % k;
        let mut keep_old = Vec::new();
        let mut keep_new = Vec::new();
        let mut groups_old = Vec::new();
        let mut groups_new = Vec::new();
        for (gi, (g, cands)) in per_group.iter().enumerate() {
            let quota = base + usize::from(gi < extra);
            for &(is_new, i) in cands.iter().take(quota) {
                if is_new {
                    keep_new.push(i);
                    groups_new.push(*g);
                } else {
                    keep_old.push(i);
                    groups_old.push(*g);
                }
            }
        }
        let mut parts = Vec::new();
        if let (Some(s), false) = (&self.stored, keep_old.is_empty()) {
            parts.push(s.select(&keep_old)?);
        }
        if !keep_new.is_empty() {
            parts.push(Self::detach(&data.batch(&keep_new, device)?, device));
        }
        self.stored = if parts.is_empty() {
            None
        } else {
            Some(Batch::concat(&parts, self.pad_id)?)
        };
        groups_old.extend(groups_new);
        self.groups = groups_old;
        Ok(())
    }

    /// `k` stored examples without replacement (all of them when fewer are stored),
    /// seeded by the buffer's seed and a draw counter; `None` when empty.
    pub fn sample(&mut self, k: usize) -> Result<Option<Batch>> {
        let Some(s) = &self.stored else {
            return Ok(None);
        };
        let n = self.groups.len();
        self.draws += 1;
        let mut rows = permutation(n, self.seed ^ 0x5EED, self.draws.wrapping_mul(1 << 20));
        rows.truncate(k.min(n));
        let mut b = s.select(&rows)?;
        // Stored token rows are padded to the longest row ever stored; cut the sample
        // back to its own longest row so replay costs what its tokens cost.
        if let Some(m) = &b.mask {
            let longest = m
                .sum_dim_intlist(1, false, Kind::Int64)
                .max()
                .int64_value(&[]);
            let width = b.inputs.size()[1];
            if longest < width {
                b.inputs = b.inputs.narrow(1, 0, longest);
                let m = m.narrow(1, 0, longest);
                b.padded = m.numel() > 0 && m.min().int64_value(&[]) == 0;
                b.mask = Some(m);
            }
        }
        Ok(Some(b))
    }

    /// The memory as a checkpoint (tensors and counters).
    pub fn state(&self) -> Checkpoint {
        let mut ck = Checkpoint::new();
        ck.set_metadata("policy", self.policy.code().to_string());
        ck.set_metadata("capacity", self.capacity.to_string());
        ck.set_metadata("seed", self.seed.to_string());
        ck.set_metadata("seen", self.seen.to_string());
        ck.set_metadata("draws", self.draws.to_string());
        if let Some(s) = &self.stored {
            ck.insert("inputs", s.inputs.shallow_clone());
            ck.insert("labels", s.labels.shallow_clone());
            ck.insert("indices", Tensor::from_slice(&s.indices));
            ck.insert("groups", Tensor::from_slice(&self.groups));
            if let Some(m) = &s.mask {
                ck.insert("mask", m.shallow_clone());
            }
            if let Some(t) = &s.task_ids {
                ck.insert("task_ids", t.shallow_clone());
            }
        }
        ck
    }

    /// Restores [`ReplayBuffer::state`]; the policy, capacity and seed must match this
    /// buffer's (a run resumed with other settings is an error naming the setting).
    pub fn load_state(&mut self, ck: &Checkpoint, device: Device) -> Result<()> {
        let get = |k: &str| -> Result<u64> {
            let v = ck.metadata().get(k).ok_or_else(|| {
                Error::invalid("replay state", format!("metadata `{k}` is missing"))
            })?;
            v.parse().map_err(|_| {
                Error::invalid("replay state", format!("`{k}` = `{v}` is not a number"))
            })
        };
        for (k, want) in [
            ("policy", self.policy.code() as u64),
            ("capacity", self.capacity as u64),
            ("seed", self.seed),
        ] {
            let found = get(k)?;
            if found != want {
                return Err(Error::invalid(
                    "replay state",
                    format!("saved with {k} {found}, this buffer has {want}"),
                ));
            }
        }
        self.seen = get("seen")?;
        self.draws = get("draws")?;
        if ck.get("labels").is_none() {
            self.stored = None;
            self.groups.clear();
            return Ok(());
        }
        let t = |k: &str| -> Result<Tensor> { Ok(ck.tensor(k)?.to_device(device)) };
        let labels = t("labels")?;
        let n = labels.size()[0];
        let groups = Vec::<i64>::try_from(ck.tensor_with_shape("groups", &[n])?)?;
        let indices = Vec::<i64>::try_from(ck.tensor_with_shape("indices", &[n])?)?;
        let mask = ck.get("mask").map(|m| m.to_device(device));
        let padded = mask
            .as_ref()
            .is_some_and(|m| m.numel() > 0 && m.min().int64_value(&[]) == 0);
        self.stored = Some(Batch {
            inputs: t("inputs")?,
            mask,
            padded,
            labels,
            indices,
            task_ids: ck.get("task_ids").map(|x| x.to_device(device)),
        });
        self.groups = groups;
        Ok(())
    }
}

/// How many stored examples go into each batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PerBatch {
    /// As many as the batch has (Avalanche's default: 32 current + 32 stored).
    Same,
    /// A fixed number.
    Count(usize),
    /// This fraction of the batch size, rounded (at least 1).
    Ratio(f64),
}

/// Settings of [`Replay`].
#[derive(Debug, Clone)]
pub struct ReplayConfig {
    /// Memory policy.
    pub policy: BufferPolicy,
    /// Memory size in examples (> 0).
    pub capacity: usize,
    /// Stored examples per batch.
    pub per_batch: PerBatch,
    /// Seed of every draw.
    pub seed: u64,
    /// Padding id for token batches.
    pub pad_id: i64,
}

impl ReplayConfig {
    /// A memory of `capacity` with `policy`, `PerBatch::Same`, seed 0, pad id 0.
    pub fn new(policy: BufferPolicy, capacity: usize) -> Self {
        Self {
            policy,
            capacity,
            per_batch: PerBatch::Same,
            seed: 0,
            pad_id: 0,
        }
    }
}

/// Replay as a technique: mixes stored examples into each batch (from the second task
/// on, or as soon as a reservoir holds something) and keeps the memory up to date.
/// The memory is saved and restored with the run.
#[derive(Debug)]
pub struct Replay {
    config: ReplayConfig,
    buffer: ReplayBuffer,
    /// The first task trained with this technique; stored examples are mixed in only
    /// on later tasks.
    first_task: Option<usize>,
}

impl Replay {
    /// Replay with `config`: a capacity of 0 or a ratio outside (0, 10] is an error.
    pub fn new(config: ReplayConfig) -> Result<Self> {
        if let PerBatch::Ratio(r) = config.per_batch {
            if !(r > 0.0 && r <= 10.0) {
                return Err(Error::invalid(
                    "replay ratio",
                    format!("must be in (0, 10], found {r}"),
                ));
            }
        }
        let buffer = ReplayBuffer::new(config.policy, config.capacity, config.seed, config.pad_id)?;
        Ok(Self {
            config,
            buffer,
            first_task: None,
        })
    }

    /// The memory.
    pub fn buffer(&self) -> &ReplayBuffer {
        &self.buffer
    }

    fn count(&self, batch: usize) -> usize {
        match self.config.per_batch {
            PerBatch::Same => batch,
            PerBatch::Count(k) => k,
            PerBatch::Ratio(r) => ((batch as f64 * r).round() as usize).max(1),
        }
    }
}

impl Technique for Replay {
    fn name(&self) -> &str {
        "replay"
    }

    fn rewrite_batch(&mut self, batch: Batch, ctx: &StepContext) -> Result<Batch> {
        let first = *self.first_task.get_or_insert(ctx.task);
        let k = if ctx.task > first {
            self.count(batch.len())
        } else {
            0
        };
        let memory = if k > 0 { self.buffer.sample(k)? } else { None };
        self.buffer.observe(&batch)?;
        match memory {
            None => Ok(batch),
            Some(m) => {
                if m.task_ids.is_some() != batch.task_ids.is_some() {
                    return Err(Error::invalid(
                        "replay batch",
                        "the stored examples and the current batch disagree on having task ids; \
                         tag every task's data with its task id, or none",
                    ));
                }
                Batch::concat(&[batch, m], self.config.pad_id)
            }
        }
    }

    fn end_task(&mut self, ctx: &TaskContext<'_>) -> Result<()> {
        self.buffer.update_from_task(ctx.data, ctx.task, ctx.device)
    }

    fn state(&self) -> Result<Checkpoint> {
        let mut ck = self.buffer.state();
        if let Some(t) = self.first_task {
            ck.set_metadata("first_task", t.to_string());
        }
        Ok(ck)
    }

    fn load_state(&mut self, state: &Checkpoint) -> Result<()> {
        let device = state.get("labels").map_or(Device::Cpu, |t| t.device());
        self.first_task = match state.metadata().get("first_task") {
            Some(v) => Some(v.parse().map_err(|_| {
                Error::invalid(
                    "replay state",
                    format!("`first_task` = `{v}` is not a task"),
                )
            })?),
            None => None,
        };
        self.buffer.load_state(state, device)
    }
}

/// Labels of every example of `source`, in order (read in chunks on the CPU).
pub fn labels_of(source: &dyn BatchSource) -> Result<Vec<i64>> {
    let mut v = Vec::with_capacity(source.len());
    for idx in epoch_batches(source.len(), 4096, None, 0) {
        let b = source.batch(&idx, Device::Cpu)?;
        v.extend(Vec::<i64>::try_from(b.labels.to_kind(Kind::Int64))?);
    }
    Ok(v)
}
