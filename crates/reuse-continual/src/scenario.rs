//! Task streams built from any labelled [`BatchSource`]: class-incremental (each task a
//! set of classes, one label space, no task id at test time), task-incremental (the same
//! split, every example tagged with its task id) and domain-incremental (the same classes
//! in a different input distribution per task, e.g. permuted pixels).

use std::rc::Rc;

use tch::{Device, Tensor};

use reuse_core::data::{Batch, BatchSource};
use reuse_core::{trainer, Error, Result, Trainable};

use crate::metrics::AccuracyMatrix;
use crate::replay::labels_of;

/// Which kind of stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScenarioKind {
    /// New classes per task; the model is never told the task.
    ClassIncremental,
    /// New classes per task; every example carries its task id.
    TaskIncremental,
    /// The same classes in a new input distribution per task.
    DomainIncremental,
}

/// A view of a source: some of its examples, optionally tagged with a task id and with
/// a permutation applied to the input features. Cloning is shallow.
pub struct TaskData {
    source: Rc<dyn BatchSource>,
    indices: Vec<i64>,
    task: Option<i64>,
    permutation: Option<Tensor>,
}

impl Clone for TaskData {
    fn clone(&self) -> Self {
        Self {
            source: self.source.clone(),
            indices: self.indices.clone(),
            task: self.task,
            permutation: self.permutation.as_ref().map(Tensor::shallow_clone),
        }
    }
}

impl std::fmt::Debug for TaskData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskData")
            .field("examples", &self.indices.len())
            .field("task", &self.task)
            .field("permuted", &self.permutation.is_some())
            .finish()
    }
}

impl TaskData {
    /// Every example of `source`.
    pub fn all(source: Rc<dyn BatchSource>) -> Self {
        let n = source.len() as i64;
        Self {
            source,
            indices: (0..n).collect(),
            task: None,
            permutation: None,
        }
    }

    /// The examples of `source` at `indices` (checked against its size).
    pub fn subset(source: Rc<dyn BatchSource>, indices: Vec<i64>) -> Result<Self> {
        let n = source.len() as i64;
        if let Some(bad) = indices.iter().find(|&&i| i < 0 || i >= n) {
            return Err(Error::invalid(
                "task subset",
                format!("index {bad} is out of range for a source of {n} examples"),
            ));
        }
        Ok(Self {
            source,
            indices,
            task: None,
            permutation: None,
        })
    }

    /// Tags every example with task id `task`.
    pub fn with_task(mut self, task: i64) -> Self {
        self.task = Some(task);
        self
    }

    /// Permutes the input features of every example (`x'[..., i] = x[..., perm[i]]`).
    pub fn with_permutation(mut self, perm: &[i64]) -> Self {
        self.permutation = Some(Tensor::from_slice(perm));
        self
    }

    /// The source indices of this view's examples.
    pub fn indices(&self) -> &[i64] {
        &self.indices
    }
}

impl BatchSource for TaskData {
    fn len(&self) -> usize {
        self.indices.len()
    }

    fn batch(&self, indices: &[i64], device: Device) -> Result<Batch> {
        let n = self.indices.len() as i64;
        let mapped = indices
            .iter()
            .map(|&i| {
                if i < 0 || i >= n {
                    Err(Error::invalid(
                        "example index",
                        format!("{i} is out of range for a task of {n} examples"),
                    ))
                } else {
                    Ok(self.indices[i as usize])
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let mut b = self.source.batch(&mapped, device)?;
        b.indices = indices.to_vec();
        if let Some(p) = &self.permutation {
            let d = b.inputs.size().last().copied().unwrap_or(0);
            if d != p.size()[0] {
                return Err(Error::invalid(
                    "permuted task",
                    format!(
                        "the permutation has {} entries, the inputs {d} features",
                        p.size()[0]
                    ),
                ));
            }
            b.inputs = b.inputs.index_select(-1, &p.to_device(device));
        }
        Ok(match self.task {
            Some(t) => b.with_task(t),
            None => b,
        })
    }
}

/// One task of a stream: its training and test data and its classes.
#[derive(Debug, Clone)]
pub struct Experience {
    /// Task index in the stream.
    pub task: usize,
    /// Training examples.
    pub train: TaskData,
    /// Test examples.
    pub test: TaskData,
    /// The classes it contains.
    pub classes: Vec<i64>,
}

/// An ordered stream of tasks.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Its kind.
    pub kind: ScenarioKind,
    /// The tasks, in training order.
    pub tasks: Vec<Experience>,
}

fn split_by_classes(
    source: &Rc<dyn BatchSource>,
    splits: &[Vec<i64>],
    what: &str,
) -> Result<Vec<TaskData>> {
    let labels = labels_of(source.as_ref())?;
    splits
        .iter()
        .enumerate()
        .map(|(t, classes)| {
            let idx: Vec<i64> = labels
                .iter()
                .enumerate()
                .filter(|(_, y)| classes.contains(y))
                .map(|(i, _)| i as i64)
                .collect();
            if idx.is_empty() {
                return Err(Error::invalid(
                    "scenario",
                    format!("task {t} (classes {classes:?}) has no {what} examples"),
                ));
            }
            TaskData::subset(source.clone(), idx)
        })
        .collect()
}

fn check_splits(splits: &[Vec<i64>]) -> Result<()> {
    if splits.is_empty() {
        return Err(Error::invalid("scenario", "no tasks given"));
    }
    let mut seen = std::collections::BTreeSet::new();
    for (t, s) in splits.iter().enumerate() {
        if s.is_empty() {
            return Err(Error::invalid(
                "scenario",
                format!("task {t} has no classes"),
            ));
        }
        for c in s {
            if !seen.insert(*c) {
                return Err(Error::invalid(
                    "scenario",
                    format!("class {c} is in more than one task (again in task {t})"),
                ));
            }
        }
    }
    Ok(())
}

impl Scenario {
    /// Class-incremental: task `t` holds the classes `splits[t]` of `train` and `test`;
    /// labels stay global and no task id is attached. A class in two tasks, or a task
    /// with no examples, is an error.
    pub fn class_incremental(
        train: Rc<dyn BatchSource>,
        test: Rc<dyn BatchSource>,
        splits: &[Vec<i64>],
    ) -> Result<Self> {
        check_splits(splits)?;
        let tr = split_by_classes(&train, splits, "training")?;
        let te = split_by_classes(&test, splits, "test")?;
        Ok(Self {
            kind: ScenarioKind::ClassIncremental,
            tasks: tr
                .into_iter()
                .zip(te)
                .enumerate()
                .map(|(t, (train, test))| Experience {
                    task: t,
                    train,
                    test,
                    classes: splits[t].clone(),
                })
                .collect(),
        })
    }

    /// Task-incremental: as class-incremental, every example tagged with its task id.
    pub fn task_incremental(
        train: Rc<dyn BatchSource>,
        test: Rc<dyn BatchSource>,
        splits: &[Vec<i64>],
    ) -> Result<Self> {
        let mut s = Self::class_incremental(train, test, splits)?;
        s.kind = ScenarioKind::TaskIncremental;
        for e in &mut s.tasks {
            e.train = e.train.clone().with_task(e.task as i64);
            e.test = e.test.clone().with_task(e.task as i64);
        }
        Ok(s)
    }

    /// Domain-incremental from one (train, test) pair per task (same label space).
    pub fn domain_incremental(pairs: Vec<(TaskData, TaskData)>) -> Result<Self> {
        if pairs.is_empty() {
            return Err(Error::invalid("scenario", "no tasks given"));
        }
        let mut tasks = Vec::new();
        for (t, (train, test)) in pairs.into_iter().enumerate() {
            let mut classes = labels_of(&train)?;
            classes.sort_unstable();
            classes.dedup();
            tasks.push(Experience {
                task: t,
                train,
                test,
                classes,
            });
        }
        Ok(Self {
            kind: ScenarioKind::DomainIncremental,
            tasks,
        })
    }

    /// Domain-incremental by input permutation: task `t` is all of `train`/`test` with
    /// `perms[t]` applied to the features (permuted MNIST's construction; make the first
    /// the identity to start from the original data). Every permutation must be a
    /// permutation of `0..d`.
    pub fn permuted(
        train: Rc<dyn BatchSource>,
        test: Rc<dyn BatchSource>,
        perms: &[Vec<i64>],
    ) -> Result<Self> {
        let mut pairs = Vec::new();
        for (t, p) in perms.iter().enumerate() {
            let mut sorted = p.clone();
            sorted.sort_unstable();
            if sorted.iter().enumerate().any(|(i, &v)| v != i as i64) {
                return Err(Error::invalid(
                    "permutation",
                    format!(
                        "task {t}'s permutation is not a permutation of 0..{}",
                        p.len()
                    ),
                ));
            }
            pairs.push((
                TaskData::all(train.clone()).with_permutation(p),
                TaskData::all(test.clone()).with_permutation(p),
            ));
        }
        Self::domain_incremental(pairs)
    }

    /// Accuracy of `model` on every task's test set (one row of the accuracy matrix).
    pub fn evaluate(
        &self,
        model: &dyn Trainable,
        batch_size: usize,
        device: Device,
    ) -> Result<Vec<f64>> {
        self.tasks
            .iter()
            .map(|e| trainer::accuracy(model, &e.test, batch_size, device))
            .collect()
    }
}

/// `n` seeded permutations of `0..d`, the first the identity (permuted tasks).
pub fn permutations(n: usize, d: usize, seed: u64) -> Vec<Vec<i64>> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|t| {
            let mut p: Vec<i64> = (0..d as i64).collect();
            if t > 0 {
                p.shuffle(&mut rng);
            }
            p
        })
        .collect()
}

/// A stratified split of example indices by label: from each class, `fraction` of its
/// examples (rounded) go to the second part, chosen by a seeded shuffle; both parts are
/// sorted. Used for train/test and train/dev splits that keep class proportions.
pub fn stratified_split(labels: &[i64], fraction: f64, seed: u64) -> Result<(Vec<i64>, Vec<i64>)> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    if !(fraction > 0.0 && fraction < 1.0) {
        return Err(Error::invalid(
            "stratified split",
            format!("the held-out fraction must be in (0, 1), found {fraction}"),
        ));
    }
    let mut classes: Vec<i64> = labels.to_vec();
    classes.sort_unstable();
    classes.dedup();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for c in classes {
        let mut idx: Vec<i64> = labels
            .iter()
            .enumerate()
            .filter(|(_, y)| **y == c)
            .map(|(i, _)| i as i64)
            .collect();
        idx.shuffle(&mut rng);
        let k = ((idx.len() as f64) * fraction).round() as usize;
        b.extend_from_slice(&idx[..k]);
        a.extend_from_slice(&idx[k..]);
    }
    a.sort_unstable();
    b.sort_unstable();
    Ok((a, b))
}

/// Trains `model` on each task of `scenario` in turn with `trainer` and `techniques`
/// (`begin_task`, `fit`, `end_task`) and evaluates it on every task after each one:
/// the accuracy matrix. `initial` also records the row before any training (forward
/// transfer). For PackNet, whose tasks need a prune between two fits, write the loop
/// by hand (the bench shows how).
pub fn run_stream(
    scenario: &Scenario,
    model: &dyn Trainable,
    trainer: &mut reuse_core::Trainer,
    techniques: &mut [&mut dyn reuse_core::Technique],
    eval_batch: usize,
    initial: bool,
) -> Result<AccuracyMatrix> {
    let device = trainer.config.device;
    let mut m = AccuracyMatrix::new();
    if initial {
        m.initial = Some(scenario.evaluate(model, eval_batch, device)?);
    }
    for e in &scenario.tasks {
        trainer.begin_task(e.task, model, &e.train, techniques)?;
        trainer.fit(model, &e.train, None, techniques)?;
        trainer.end_task(e.task, model, &e.train, techniques)?;
        m.push_row(scenario.evaluate(model, eval_batch, device)?)?;
    }
    Ok(m)
}

/// Several sources one after another, as one source (joint training on every task: the
/// upper bound of a stream). A batch spanning parts is joined with [`Batch::concat`].
pub struct Concat {
    parts: Vec<TaskData>,
    starts: Vec<usize>,
    pad_id: i64,
}

impl Concat {
    /// The examples of `parts`, in order; token batches are padded with `pad_id`.
    pub fn new(parts: Vec<TaskData>, pad_id: i64) -> Self {
        let mut starts = Vec::with_capacity(parts.len());
        let mut n = 0;
        for p in &parts {
            starts.push(n);
            n += p.len();
        }
        Self {
            parts,
            starts,
            pad_id,
        }
    }

    /// Every task's training data of `scenario`, as one source.
    pub fn joint_train(scenario: &Scenario, pad_id: i64) -> Self {
        Self::new(
            scenario.tasks.iter().map(|e| e.train.clone()).collect(),
            pad_id,
        )
    }
}

impl BatchSource for Concat {
    fn len(&self) -> usize {
        self.parts.iter().map(BatchSource::len).sum()
    }

    fn batch(&self, indices: &[i64], device: Device) -> Result<Batch> {
        let n = self.len() as i64;
        // Group by part, keeping the requested order within the joined batch.
        let mut per_part: Vec<Vec<i64>> = vec![Vec::new(); self.parts.len()];
        let mut order = Vec::with_capacity(indices.len());
        for &i in indices {
            if i < 0 || i >= n {
                return Err(Error::invalid(
                    "example index",
                    format!("{i} is out of range for {n} joined examples"),
                ));
            }
            let p = self.starts.partition_point(|&s| s as i64 <= i) - 1;
            order.push((p, per_part[p].len()));
            per_part[p].push(i - self.starts[p] as i64);
        }
        let mut batches = Vec::new();
        let mut offset = vec![0usize; self.parts.len()];
        let mut acc = 0usize;
        for (p, idx) in per_part.iter().enumerate() {
            offset[p] = acc;
            if !idx.is_empty() {
                batches.push(self.parts[p].batch(idx, device)?);
                acc += idx.len();
            }
        }
        let joined = Batch::concat(&batches, self.pad_id)?;
        let rows: Vec<i64> = order.iter().map(|&(p, k)| (offset[p] + k) as i64).collect();
        let mut b = joined.select(&rows)?;
        b.indices = indices.to_vec();
        Ok(b)
    }
}

/// [`run_stream`] that survives being killed: with `trainer.config.run_state` set (the
/// run file of the task in progress, written every `every` steps), the stream's own
/// progress goes to `stream_file` (one atomic safetensors after each task: every model
/// parameter, the optimizer state, every technique's state, the tasks done and the
/// accuracy rows so far). Called again after a kill, it loads the stream file, resumes
/// the task in progress from the run file when that file belongs to it, and ends with the
/// weights and matrix an uninterrupted run ends with. A run file of an earlier task
/// (killed after the stream file was written) is ignored.
pub fn run_stream_resumable(
    scenario: &Scenario,
    model: &dyn Trainable,
    trainer: &mut reuse_core::Trainer,
    techniques: &mut [&mut dyn reuse_core::Technique],
    eval_batch: usize,
    stream_file: &std::path::Path,
) -> Result<AccuracyMatrix> {
    use reuse_core::Checkpoint;
    let run_file = trainer
        .config
        .run_state
        .as_ref()
        .map(|r| r.path.clone())
        .ok_or_else(|| {
            Error::invalid(
                "resumable stream",
                "TrainConfig::run_state is not set: the task in progress needs a run file",
            )
        })?;
    let device = trainer.config.device;
    let mut m = AccuracyMatrix::new();
    let mut done = 0usize;
    if stream_file.exists() {
        let ck = Checkpoint::load(stream_file, Device::Cpu)?;
        let corrupt = |reason: String| Error::Corrupt {
            path: stream_file.to_path_buf(),
            reason,
        };
        let meta = ck.metadata();
        done = meta
            .get("tasks_done")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| corrupt("metadata `tasks_done` missing or not a number".into()))?;
        let rows: Vec<Vec<f64>> = serde_json::from_str(
            meta.get("rows")
                .ok_or_else(|| corrupt("metadata `rows` missing".into()))?,
        )
        .map_err(|e| corrupt(format!("metadata `rows`: {e}")))?;
        m = AccuracyMatrix::from_rows(rows).map_err(|e| corrupt(e.to_string()))?;
        if m.rows.len() != done || done > scenario.tasks.len() {
            return Err(corrupt(format!(
                "{} accuracy rows for {done} tasks done of {}",
                m.rows.len(),
                scenario.tasks.len()
            )));
        }
        let params = model.params();
        let mut values = Checkpoint::new();
        let mut optim = Checkpoint::new();
        let mut tech: std::collections::BTreeMap<String, Checkpoint> = Default::default();
        for (n, t) in ck.iter() {
            if let Some(p) = n.strip_prefix("param.") {
                values.insert(p, t.shallow_clone());
            } else if let Some(k) = n.strip_prefix("optim.") {
                optim.insert(k, t.shallow_clone());
            } else if let Some(rest) = n.strip_prefix("technique.") {
                let (name, k) = rest
                    .split_once('.')
                    .ok_or_else(|| corrupt(format!("tensor `{n}` names no technique")))?;
                tech.entry(name.to_string())
                    .or_default()
                    .insert(k, t.shallow_clone());
            }
        }
        for (k, v) in meta {
            if let Some(k) = k.strip_prefix("optim.") {
                optim.set_metadata(k, v.clone());
            } else if let Some(rest) = k.strip_prefix("technique.") {
                if let Some((name, k)) = rest.split_once('.') {
                    tech.entry(name.to_string())
                        .or_default()
                        .set_metadata(k, v.clone());
                }
            }
        }
        params.load_checkpoint(&values)?;
        trainer.optimizer_mut().load_state(&optim, &params)?;
        for t in techniques.iter_mut() {
            let st = tech.remove(t.name()).unwrap_or_default();
            t.load_state(&st)?;
        }
    }
    for e in scenario.tasks.iter().skip(done) {
        trainer.begin_task(e.task, model, &e.train, techniques)?;
        let mine = run_file.exists()
            && Checkpoint::load(&run_file, Device::Cpu)?
                .metadata()
                .get("task")
                .is_some_and(|t| *t == e.task.to_string());
        if mine {
            trainer.resume(model, techniques)?;
        }
        trainer.fit(model, &e.train, None, techniques)?;
        trainer.end_task(e.task, model, &e.train, techniques)?;
        m.push_row(scenario.evaluate(model, eval_batch, device)?)?;
        // The stream file: everything the next task starts from.
        let mut ck = Checkpoint::new();
        tch::no_grad(|| {
            for (n, t) in model.params().iter() {
                ck.insert(
                    format!("param.{n}"),
                    t.detach().to_device(Device::Cpu).copy(),
                );
            }
        });
        let opt = trainer.optimizer().state();
        for (n, t) in opt.iter() {
            ck.insert(format!("optim.{n}"), t.to_device(Device::Cpu));
        }
        for (k, v) in opt.metadata() {
            ck.set_metadata(format!("optim.{k}"), v.clone());
        }
        for t in techniques.iter() {
            let st = t.state()?;
            for (n, v) in st.iter() {
                ck.insert(
                    format!("technique.{}.{n}", t.name()),
                    v.to_device(Device::Cpu).copy(),
                );
            }
            for (k, v) in st.metadata() {
                ck.set_metadata(format!("technique.{}.{k}", t.name()), v.clone());
            }
        }
        ck.set_metadata("tasks_done", (e.task + 1).to_string());
        ck.set_metadata(
            "rows",
            serde_json::to_string(&m.rows).map_err(|e| Error::invalid("rows", e.to_string()))?,
        );
        ck.set_metadata("format", "reuse-stream-1");
        ck.save(stream_file)?;
    }
    Ok(m)
}
