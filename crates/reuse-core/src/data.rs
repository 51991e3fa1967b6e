//! Data: seeded shuffling and batching, and loaders for the committed fixtures
//! (scikit-learn's handwritten digits, the Debian package-sections text set).

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use tch::{Device, Tensor};

use crate::{Error, Result};

/// One training or evaluation batch.
#[derive(Debug)]
pub struct Batch {
    /// Model inputs: features `[b, d]` or token ids `[b, t]`.
    pub inputs: Tensor,
    /// Attention mask `[b, t]` (1 = token, 0 = padding) for token inputs.
    pub mask: Option<Tensor>,
    /// Class labels `[b]` (i64).
    pub labels: Tensor,
    /// Task id, for multi-task and continual learning.
    pub task: Option<usize>,
}

impl Batch {
    /// Number of examples.
    pub fn len(&self) -> usize {
        self.labels.size()[0] as usize
    }

    /// True for an empty batch.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The batch on another device.
    pub fn to_device(&self, device: Device) -> Batch {
        Batch {
            inputs: self.inputs.to_device(device),
            mask: self.mask.as_ref().map(|m| m.to_device(device)),
            labels: self.labels.to_device(device),
            task: self.task,
        }
    }
}

/// Anything the trainer can draw batches from by example index.
pub trait BatchSource {
    /// Number of examples.
    fn len(&self) -> usize;
    /// True when there are no examples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The examples at `indices`, as one batch on `device`.
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
    /// Task id attached to every batch.
    pub task: Option<usize>,
}

impl TensorDataset {
    /// A dataset of `x` and `y`; their first dimensions must agree.
    pub fn new(x: Tensor, y: Tensor) -> Result<Self> {
        if x.size().first() != y.size().first() {
            return Err(Error::invalid(
                "dataset",
                format!(
                    "features have {:?} rows but labels {:?}",
                    x.size().first(),
                    y.size().first()
                ),
            ));
        }
        Ok(Self { x, y, task: None })
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

impl BatchSource for TensorDataset {
    fn len(&self) -> usize {
        self.y.size()[0] as usize
    }

    fn batch(&self, indices: &[i64], device: Device) -> Result<Batch> {
        let idx = Tensor::from_slice(indices);
        Ok(Batch {
            inputs: self.x.index_select(0, &idx).to_device(device),
            mask: None,
            labels: self.y.index_select(0, &idx).to_device(device),
            task: self.task,
        })
    }
}

/// The workspace's `fixtures/` folder (for tests, benches and examples).
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
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

/// Loads `digits.csv.gz` (1797 rows of 64 pixel values 0-16 and a label) and splits it
/// with a fixed permutation (seed 0): 80% train, 20% test. Pixels are divided by 16.
pub fn load_digits(path: &Path) -> Result<Digits> {
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
    let x = Tensor::from_slice(&xs).view([n as i64, 64]);
    let y = Tensor::from_slice(&ys);
    let order = epoch_batches(n, n, Some(0), 0).remove(0);
    let n_train = n * 4 / 5;
    let take = |ix: &[i64]| -> Result<TensorDataset> {
        let idx = Tensor::from_slice(ix);
        TensorDataset::new(x.index_select(0, &idx), y.index_select(0, &idx))
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
    let text = open_gz(path)?;
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
}
