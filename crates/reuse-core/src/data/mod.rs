//! Data: batches that know where they came from, seeded shuffling, and loaders for the
//! file formats of the data sets used throughout (scikit-learn's handwritten digits, a
//! `split<TAB>label<TAB>text` file such as the Debian package-sections set) and, in
//! [`labelled`], users' own labelled text as TSV, CSV or JSON Lines.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use tch::{Device, Tensor};

use crate::{Error, Result};

pub mod labelled;
pub mod lm;

/// One training or evaluation batch.
///
/// Besides inputs and labels a batch carries where it came from: the example indices it
/// was drawn from (a teacher cache looks outputs up by them) and, for multi-task and
/// continual learning, one task id per example (replay mixes tasks in one batch;
/// multi-head models route by them). Cloning is shallow (tensors share storage).
#[derive(Debug)]
pub struct Batch {
    /// Model inputs: features `[b, d]` or token ids `[b, t]`.
    pub inputs: Tensor,
    /// Attention mask `[b, t]` (1 = token, 0 = padding) for token inputs.
    pub mask: Option<Tensor>,
    /// Whether any example is padded (some mask entry is 0). Known by the source on the
    /// host, so models need not read the mask back from the device to find out.
    pub padded: bool,
    /// Labels (i64, -100 = no label): one class per example `[b]`, or one target token
    /// per position `[b, t]` for causal LMs (aligned with `inputs`, as transformers
    /// takes them: the model shifts them by one).
    pub labels: Tensor,
    /// Index of each example in the source it was drawn from.
    pub indices: Vec<i64>,
    /// Task id of each example `[b]` (i64), when the source has one.
    pub task_ids: Option<Tensor>,
}

impl Clone for Batch {
    fn clone(&self) -> Self {
        Batch {
            inputs: self.inputs.shallow_clone(),
            mask: self.mask.as_ref().map(Tensor::shallow_clone),
            padded: self.padded,
            labels: self.labels.shallow_clone(),
            indices: self.indices.clone(),
            task_ids: self.task_ids.as_ref().map(Tensor::shallow_clone),
        }
    }
}

impl Batch {
    /// A batch of dense features and labels (no mask, no task ids); `indices` default to
    /// `0..b`.
    pub fn new(inputs: Tensor, labels: Tensor) -> Result<Batch> {
        let n = check_labels("batch labels", &labels)?;
        if inputs.size().first() != Some(&n) {
            return Err(Error::invalid(
                "batch",
                format!(
                    "inputs have shape {:?} but there are {n} labels",
                    inputs.size()
                ),
            ));
        }
        Ok(Batch {
            inputs,
            mask: None,
            padded: false,
            labels,
            indices: (0..n).collect(),
            task_ids: None,
        })
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.labels.size().first().copied().unwrap_or(0) as usize
    }

    /// True for an empty batch.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Labelled targets: examples with a label for `[b]` labels; for `[b, t]` token
    /// labels, positions 1.. with a label (the first position of a row has no earlier
    /// token to predict it from). What a loss averages over, and what data-parallel
    /// runs weight their gradients by. Reads the labels back from the device.
    pub fn num_targets(&self) -> i64 {
        let l = if self.labels.dim() == 2 {
            let t = self.labels.size()[1];
            self.labels.narrow(1, 1, (t - 1).max(0))
        } else {
            self.labels.shallow_clone()
        };
        l.ne(-100).sum(tch::Kind::Int64).int64_value(&[])
    }

    /// The batch on another device.
    pub fn to_device(&self, device: Device) -> Batch {
        Batch {
            inputs: self.inputs.to_device(device),
            mask: self.mask.as_ref().map(|m| m.to_device(device)),
            padded: self.padded,
            labels: self.labels.to_device(device),
            indices: self.indices.clone(),
            task_ids: self.task_ids.as_ref().map(|t| t.to_device(device)),
        }
    }

    /// Sets every example's task id to `task`.
    pub fn with_task(mut self, task: i64) -> Batch {
        self.task_ids = Some(Tensor::full(
            [self.len() as i64],
            task,
            (tch::Kind::Int64, self.labels.device()),
        ));
        self
    }

    /// The examples at positions `rows` of this batch (positions, not source indices).
    pub fn select(&self, rows: &[i64]) -> Result<Batch> {
        let n = self.len() as i64;
        if let Some(bad) = rows.iter().find(|&&r| r < 0 || r >= n) {
            return Err(Error::invalid(
                "batch rows",
                format!("row {bad} is out of range for a batch of {n}"),
            ));
        }
        let dev = self.labels.device();
        let idx = Tensor::from_slice(rows).to_device(dev);
        let mask = self.mask.as_ref().map(|m| m.index_select(0, &idx));
        let padded = match &mask {
            Some(m) if self.padded => m.numel() > 0 && m.min().int64_value(&[]) == 0,
            _ => false,
        };
        Ok(Batch {
            inputs: self.inputs.index_select(0, &idx),
            mask,
            padded,
            labels: self.labels.index_select(0, &idx),
            indices: rows.iter().map(|&r| self.indices[r as usize]).collect(),
            task_ids: self.task_ids.as_ref().map(|t| t.index_select(0, &idx)),
        })
    }

    /// Concatenates batches along the batch dimension. Token batches of different
    /// lengths are right-padded to the longest with `pad_id` (mask 0). Either every batch
    /// has task ids or none has; all must be on one device.
    pub fn concat(batches: &[Batch], pad_id: i64) -> Result<Batch> {
        let Some(first) = batches.first() else {
            return Err(Error::invalid("batch concat", "no batches given"));
        };
        let masked = first.mask.is_some();
        let tasks = first.task_ids.is_some();
        for (i, b) in batches.iter().enumerate() {
            if b.mask.is_some() != masked {
                return Err(Error::invalid(
                    "batch concat",
                    format!("batch {i} has a mask and batch 0 has not, or the reverse"),
                ));
            }
            if b.task_ids.is_some() != tasks {
                return Err(Error::invalid(
                    "batch concat",
                    format!("batch {i} has task ids and batch 0 has not, or the reverse"),
                ));
            }
            if b.inputs.size()[1..] != first.inputs.size()[1..] && !masked {
                return Err(Error::invalid(
                    "batch concat",
                    format!(
                        "batch {i} has inputs {:?}, batch 0 {:?}",
                        b.inputs.size(),
                        first.inputs.size()
                    ),
                ));
            }
        }
        let (inputs, mask, padded) = if masked {
            let t = batches
                .iter()
                .map(|b| b.inputs.size()[1])
                .max()
                .unwrap_or(0);
            let pad = |x: &Tensor, v: i64| -> Tensor {
                let have = x.size()[1];
                if have == t {
                    x.shallow_clone()
                } else {
                    x.pad([0, t - have], "constant", Some(v as f64))
                }
            };
            let ids: Vec<Tensor> = batches.iter().map(|b| pad(&b.inputs, pad_id)).collect();
            let masks: Vec<Tensor> = batches
                .iter()
                .map(|b| pad(b.mask.as_ref().expect("checked"), 0))
                .collect();
            let padded = batches.iter().any(|b| b.padded || b.inputs.size()[1] < t);
            (Tensor::cat(&ids, 0), Some(Tensor::cat(&masks, 0)), padded)
        } else {
            let xs: Vec<&Tensor> = batches.iter().map(|b| &b.inputs).collect();
            (Tensor::cat(&xs, 0), None, false)
        };
        let token_labels = first.labels.dim() == 2;
        if let Some(i) = batches
            .iter()
            .position(|b| (b.labels.dim() == 2) != token_labels)
        {
            return Err(Error::invalid(
                "batch concat",
                format!("batch {i} has labels {:?}, batch 0 {:?}: one class per example and one token per position do not mix", batches[i].labels.size(), first.labels.size()),
            ));
        }
        // Token labels are padded like the inputs, with -100 (no label).
        let labels: Vec<Tensor> = batches
            .iter()
            .map(|b| {
                let t = inputs.size()[1];
                let have = b.labels.size().get(1).copied().unwrap_or(t);
                if token_labels && have < t {
                    b.labels.pad([0, t - have], "constant", Some(-100.0))
                } else {
                    b.labels.shallow_clone()
                }
            })
            .collect();
        let task_ids = tasks.then(|| {
            let t: Vec<&Tensor> = batches
                .iter()
                .map(|b| b.task_ids.as_ref().expect("checked"))
                .collect();
            Tensor::cat(&t, 0)
        });
        Ok(Batch {
            inputs,
            mask,
            padded,
            labels: Tensor::cat(&labels, 0),
            indices: batches.iter().flat_map(|b| b.indices.clone()).collect(),
            task_ids,
        })
    }
}

/// Labels must be an i64 tensor `[n]` (classes) or `[n, t]` (tokens); returns `n`.
pub(crate) fn check_labels(what: &str, labels: &Tensor) -> Result<i64> {
    if labels.dim() != 1 && labels.dim() != 2 {
        return Err(Error::invalid(
            what,
            format!(
                "expected class labels [n] or token labels [n, t], found shape {:?}",
                labels.size()
            ),
        ));
    }
    if labels.kind() != tch::Kind::Int64 {
        return Err(Error::invalid(
            what,
            format!("expected i64 class labels, found {:?}", labels.kind()),
        ));
    }
    Ok(labels.size()[0])
}

/// Anything the trainer can draw batches from by example index.
pub trait BatchSource {
    /// Number of examples.
    fn len(&self) -> usize;
    /// True when there are no examples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The examples at `indices`, as one batch on `device`, carrying those indices.
    fn batch(&self, indices: &[i64], device: Device) -> Result<Batch>;
}

/// The index batches of one epoch: shuffled with a generator seeded by
/// `(seed, epoch)` when `seed` is given, in order otherwise. The last batch may be short.
pub fn epoch_batches(n: usize, batch_size: usize, seed: Option<u64>, epoch: u64) -> Vec<Vec<i64>> {
    let mut idx: Vec<i64> = (0..n as i64).collect();
    if let Some(seed) = seed {
        let mut rng = StdRng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        idx.shuffle(&mut rng);
    }
    idx.chunks(batch_size.max(1)).map(<[i64]>::to_vec).collect()
}

/// Dense features with integer labels, kept on the CPU.
#[derive(Debug)]
pub struct TensorDataset {
    /// Features `[n, ...]`.
    pub x: Tensor,
    /// Labels `[n]`, i64.
    pub y: Tensor,
    /// Task id given to every example's batch row (`Batch::task_ids`).
    pub task: Option<i64>,
}

impl TensorDataset {
    /// A dataset of `x` and `y`: `y` must be 1-D i64 and the first dimensions agree.
    pub fn new(x: Tensor, y: Tensor) -> Result<Self> {
        let n = check_labels("dataset labels", &y)?;
        if x.size().first() != Some(&n) {
            return Err(Error::invalid(
                "dataset",
                format!(
                    "features have shape {:?} but there are {n} labels",
                    x.size()
                ),
            ));
        }
        Ok(Self { x, y, task: None })
    }

    /// The same data, every example tagged with task id `task`.
    pub fn with_task(mut self, task: i64) -> Self {
        self.task = Some(task);
        self
    }

    /// The examples whose label is in `classes` (for split tasks).
    pub fn filter_classes(&self, classes: &[i64]) -> TensorDataset {
        let keep = Tensor::from_slice(classes);
        let mask = Tensor::isin(&self.y, &keep, false, false);
        let idx = mask.nonzero().squeeze_dim(1);
        TensorDataset {
            x: self.x.index_select(0, &idx),
            y: self.y.index_select(0, &idx),
            task: self.task,
        }
    }
}

/// Checks `indices` against a source of `n` examples.
pub(crate) fn check_indices(indices: &[i64], n: usize) -> Result<()> {
    if let Some(bad) = indices.iter().find(|&&i| i < 0 || i >= n as i64) {
        return Err(Error::invalid(
            "example index",
            format!("{bad} is out of range for a dataset of {n} examples"),
        ));
    }
    Ok(())
}

impl BatchSource for TensorDataset {
    fn len(&self) -> usize {
        self.y.size()[0] as usize
    }

    fn batch(&self, indices: &[i64], device: Device) -> Result<Batch> {
        check_indices(indices, self.len())?;
        let idx = Tensor::from_slice(indices);
        let b = Batch {
            inputs: self.x.index_select(0, &idx).to_device(device),
            mask: None,
            padded: false,
            labels: self.y.index_select(0, &idx).to_device(device),
            indices: indices.to_vec(),
            task_ids: None,
        };
        Ok(match self.task {
            Some(t) => b.with_task(t),
            None => b,
        })
    }
}

fn open_gz(path: &Path) -> Result<String> {
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut s = String::new();
    flate2::read::GzDecoder::new(f)
        .read_to_string(&mut s)
        .map_err(|e| Error::Corrupt {
            path: path.to_path_buf(),
            reason: format!("not a readable gzip text file: {e}"),
        })?;
    Ok(s)
}

/// The scikit-learn digits set split once: train and test.
#[derive(Debug)]
pub struct Digits {
    /// 1437 images, features scaled to [0, 1] `[n, 64]` f32.
    pub train: TensorDataset,
    /// 360 images.
    pub test: TensorDataset,
}

/// Loads `digits.csv.gz` (1797 rows of 64 pixel values 0-16 and a label) in file order,
/// pixels divided by 16 (for protocols that make their own split, e.g. continual
/// learning's stratified 75/25).
pub fn load_digits_rows(path: &Path) -> Result<TensorDataset> {
    let text = open_gz(path)?;
    let mut xs = Vec::with_capacity(1797 * 64);
    let mut ys = Vec::with_capacity(1797);
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let vals: Vec<f32> = line
            .split(',')
            .map(|v| v.trim().parse::<f32>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| Error::Corrupt {
                path: path.to_path_buf(),
                reason: format!("line {}: {e}", i + 1),
            })?;
        if vals.len() != 65 {
            return Err(Error::Corrupt {
                path: path.to_path_buf(),
                reason: format!(
                    "line {}: expected 65 values (64 pixels + label), found {}",
                    i + 1,
                    vals.len()
                ),
            });
        }
        xs.extend(vals[..64].iter().map(|v| v / 16.0));
        ys.push(vals[64] as i64);
    }
    let n = ys.len();
    TensorDataset::new(
        Tensor::from_slice(&xs).view([n as i64, 64]),
        Tensor::from_slice(&ys),
    )
}

/// Loads `digits.csv.gz` (1797 rows of 64 pixel values 0-16 and a label) and splits it
/// with a fixed permutation (seed 0): 80% train, 20% test. Pixels are divided by 16.
pub fn load_digits(path: &Path) -> Result<Digits> {
    let all = load_digits_rows(path)?;
    let n = all.len();
    let order = epoch_batches(n, n, Some(0), 0).remove(0);
    let n_train = n * 4 / 5;
    let take = |ix: &[i64]| -> Result<TensorDataset> {
        let idx = Tensor::from_slice(ix);
        TensorDataset::new(all.x.index_select(0, &idx), all.y.index_select(0, &idx))
    };
    Ok(Digits {
        train: take(&order[..n_train])?,
        test: take(&order[n_train..])?,
    })
}

/// Labelled sentences.
#[derive(Debug, Clone, Default)]
pub struct TextDataset {
    /// The texts.
    pub texts: Vec<String>,
    /// Class index of each text.
    pub labels: Vec<i64>,
}

/// The Debian package-sections text classification set.
#[derive(Debug, Clone)]
pub struct TextSplits {
    /// Class names, index = label.
    pub classes: Vec<String>,
    /// Training split.
    pub train: TextDataset,
    /// Development split.
    pub dev: TextDataset,
    /// Test split.
    pub test: TextDataset,
}

/// Loads a `split \t label \t text` gzip TSV (the Debian sections fixture). Classes
/// are numbered in sorted order of their names.
pub fn load_text_splits(path: &Path) -> Result<TextSplits> {
    parse_split_label_text(path, &open_gz(path)?)
}

/// [`load_text_splits`] on text already read; `path` is named in errors.
pub(crate) fn parse_split_label_text(path: &Path, text: &str) -> Result<TextSplits> {
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.is_empty() {
            continue;
        }
        let mut parts = line.splitn(3, '\t');
        let (Some(split), Some(label), Some(t)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(Error::Corrupt {
                path: path.to_path_buf(),
                reason: format!("line {}: expected `split<TAB>label<TAB>text`", i + 1),
            });
        };
        rows.push((split.to_string(), label.to_string(), t.to_string()));
    }
    let mut classes: Vec<String> = rows.iter().map(|r| r.1.clone()).collect();
    classes.sort();
    classes.dedup();
    let mut splits = [
        TextDataset::default(),
        TextDataset::default(),
        TextDataset::default(),
    ];
    for (i, (split, label, t)) in rows.into_iter().enumerate() {
        let k = match split.as_str() {
            "train" => 0,
            "dev" => 1,
            "test" => 2,
            other => {
                return Err(Error::Corrupt {
                    path: path.to_path_buf(),
                    reason: format!(
                        "row {}: split `{other}`, expected train, dev or test",
                        i + 1
                    ),
                })
            }
        };
        let y = classes.binary_search(&label).expect("collected above") as i64;
        splits[k].texts.push(t);
        splits[k].labels.push(y);
    }
    let [train, dev, test] = splits;
    Ok(TextSplits {
        classes,
        train,
        dev,
        test,
    })
}

/// Fraction of `labels` equal to the most frequent label of `train_labels`: the
/// majority-class baseline.
pub fn majority_baseline(train_labels: &[i64], labels: &[i64]) -> f64 {
    let mut counts = std::collections::BTreeMap::new();
    for y in train_labels {
        *counts.entry(*y).or_insert(0usize) += 1;
    }
    let Some((&major, _)) = counts.iter().max_by_key(|(_, c)| **c) else {
        return 0.0;
    };
    labels.iter().filter(|&&y| y == major).count() as f64 / labels.len().max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_batches_are_seeded_permutations() {
        let a = epoch_batches(103, 10, Some(7), 0);
        let b = epoch_batches(103, 10, Some(7), 0);
        let c = epoch_batches(103, 10, Some(7), 1);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.len(), 11);
        assert_eq!(a.last().unwrap().len(), 3);
        let mut all: Vec<i64> = a.concat();
        all.sort();
        assert_eq!(all, (0..103).collect::<Vec<_>>());
        assert_eq!(
            epoch_batches(5, 2, None, 0),
            vec![vec![0, 1], vec![2, 3], vec![4]]
        );
    }

    fn fixtures_dir() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
    }

    #[test]
    fn digits_fixture_loads_with_fixed_split() {
        let d = load_digits(&fixtures_dir().join("digits/digits.csv.gz")).unwrap();
        assert_eq!(d.train.len() + d.test.len(), 1797);
        assert_eq!(d.train.x.size(), [1437, 64]);
        let max = d.train.x.max().double_value(&[]);
        assert!((max - 1.0).abs() < 1e-6);
        let d2 = load_digits(&fixtures_dir().join("digits/digits.csv.gz")).unwrap();
        assert!(d.test.y.equal(&d2.test.y));
        // all ten classes in the test split
        assert_eq!(d.test.y.unique_dim(0, true, false, false).0.size()[0], 10);
    }

    #[test]
    fn bad_digits_file_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.csv.gz");
        std::fs::write(&p, b"not gzip").unwrap();
        let e = load_digits(&p).unwrap_err().to_string();
        assert!(e.contains("d.csv.gz"), "{e}");
    }

    fn token_batch(ids: &[&[i64]], first_index: i64) -> Batch {
        let t = ids.iter().map(|r| r.len()).max().unwrap();
        let mut flat = Vec::new();
        let mut mask = Vec::new();
        for r in ids {
            for j in 0..t {
                flat.push(*r.get(j).unwrap_or(&0));
                mask.push(i64::from(j < r.len()));
            }
        }
        let n = ids.len() as i64;
        Batch {
            inputs: Tensor::from_slice(&flat).view([n, t as i64]),
            mask: Some(Tensor::from_slice(&mask).view([n, t as i64])),
            padded: ids.iter().any(|r| r.len() < t),
            labels: Tensor::arange(n, (tch::Kind::Int64, Device::Cpu)),
            indices: (first_index..first_index + n).collect(),
            task_ids: None,
        }
    }

    #[test]
    fn token_batches_concatenate_padded_to_the_longer() {
        let a = token_batch(&[&[5, 6, 7], &[8, 9, 10]], 0).with_task(0);
        let b = token_batch(&[&[11, 12, 13, 14, 15]], 40).with_task(3);
        assert!(!a.padded);
        let c = Batch::concat(&[a.clone(), b], 99).unwrap();
        assert_eq!(c.inputs.size(), [3, 5]);
        assert_eq!(
            Vec::<i64>::try_from(c.inputs.get(0)).unwrap(),
            [5, 6, 7, 99, 99]
        );
        assert_eq!(
            Vec::<i64>::try_from(c.mask.as_ref().unwrap().get(1)).unwrap(),
            [1, 1, 1, 0, 0]
        );
        assert!(c.padded);
        assert_eq!(c.indices, [0, 1, 40]);
        assert_eq!(
            Vec::<i64>::try_from(c.task_ids.as_ref().unwrap()).unwrap(),
            [0, 0, 3]
        );
        // select picks rows and keeps their source indices and task ids
        let s = c.select(&[2, 0]).unwrap();
        assert_eq!(s.indices, [40, 0]);
        assert_eq!(Vec::<i64>::try_from(&s.labels).unwrap(), [0, 0]);
        assert!(s.padded, "row 0 is padded to 5 in the concatenated batch");
        assert!(c.select(&[3]).is_err());
        // a batch without task ids does not mix with one that has them
        let plain = token_batch(&[&[1]], 0);
        assert!(Batch::concat(&[a, plain], 0).is_err());
        assert!(Batch::concat(&[], 0).is_err());
    }

    #[test]
    fn dense_batches_and_labels_are_checked() {
        let x = Tensor::zeros([4, 3], (tch::Kind::Float, Device::Cpu));
        let scalar = Tensor::from(2i64);
        let e = TensorDataset::new(x.shallow_clone(), scalar.shallow_clone())
            .unwrap_err()
            .to_string();
        assert!(e.contains("[n]") && e.contains("[]"), "{e}");
        let e = Batch::new(x.shallow_clone(), scalar)
            .unwrap_err()
            .to_string();
        assert!(e.contains("[n]"), "{e}");
        let floats = Tensor::zeros([4], (tch::Kind::Float, Device::Cpu));
        assert!(TensorDataset::new(x.shallow_clone(), floats).is_err());
        let y = Tensor::from_slice(&[0i64, 1, 2, 3]);
        let d = TensorDataset::new(x.shallow_clone(), y)
            .unwrap()
            .with_task(7);
        let b = d.batch(&[3, 1], Device::Cpu).unwrap();
        assert_eq!(b.indices, [3, 1]);
        assert_eq!(
            Vec::<i64>::try_from(b.task_ids.as_ref().unwrap()).unwrap(),
            [7, 7]
        );
        assert!(d.batch(&[4], Device::Cpu).is_err());
        let two = Batch::concat(&[b.clone(), b], 0).unwrap();
        assert_eq!(two.inputs.size(), [4, 3]);
    }
}
