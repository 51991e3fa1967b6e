//! A growth as data: for every tensor of the grown model, where its values come from.
//!
//! A grown tensor is either a source tensor gathered and scaled along each of its axes
//! (`W'[i, j] = W[rows[i], cols[j]] * row_scale[i] * col_scale[j]`), or a fresh tensor
//! (a layer gate starting at 0). Every operator in this crate only builds a [`Growth`];
//! [`Growth::apply`] turns a checkpoint into the grown one and
//! [`Growth::apply_optimizer_state`] carries the optimizer state of a run in progress
//! into the grown parameters, so training continues without a restart.
//!
//! Each axis also carries a *gradient* scale: at the growth point, the gradient of a
//! function-preserving growth is the source gradient gathered the same way and scaled
//! by it (a unit replicated `c` times whose copies are summed downstream gets `1/c` of
//! the gradient). Adam's first moment and SGD's momentum (averages of gradients) are
//! mapped with it and the second moment with its square, so the moments of inherited
//! weights describe the grown model's gradients; a growth test checks the relation
//! against real backward passes. Entries with a gradient scale of 0 (new heads, the
//! weights of a gated layer at g = 0, fresh layers) start with zero moments.

use std::collections::BTreeMap;

use reuse_core::{Checkpoint, Error, Result};
use tch::{Kind, Tensor};

/// How one axis of a grown tensor is read from the source tensor's axis.
#[derive(Debug, Clone, PartialEq)]
pub struct Axis {
    /// For each grown index, the source index it copies.
    pub index: Vec<i64>,
    /// For each grown index, the factor its weights are multiplied by.
    pub scale: Vec<f64>,
    /// For each grown index, the factor the source gradient (and optimizer moments)
    /// are multiplied by; 0 starts the moments at zero.
    pub grad_scale: Vec<f64>,
}

impl Axis {
    /// Every index copied unchanged (`0..n`).
    pub fn identity(n: i64) -> Self {
        Self::gather((0..n).collect())
    }

    /// Copies `index` with unit weight and gradient scales.
    pub fn gather(index: Vec<i64>) -> Self {
        let n = index.len();
        Self {
            index,
            scale: vec![1.0; n],
            grad_scale: vec![1.0; n],
        }
    }

    /// The grown length.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether the axis is empty.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Replica counts: how many grown indices copy each source index `0..n`.
    pub fn counts(&self, n: i64) -> Vec<f64> {
        let mut c = vec![0.0; n as usize];
        for &i in &self.index {
            c[i as usize] += 1.0;
        }
        c
    }

    /// Whether this axis changes nothing for a source axis of length `n`, with the
    /// weight scales (`grad` false) or the gradient scales (`grad` true).
    fn is_identity(&self, n: i64, grad: bool) -> bool {
        let scales = if grad { &self.grad_scale } else { &self.scale };
        self.index.len() as i64 == n
            && self.index.iter().enumerate().all(|(k, &i)| k as i64 == i)
            && scales.iter().all(|&s| s == 1.0)
    }
}

/// Where a grown tensor comes from.
#[derive(Debug)]
pub enum Source {
    /// Source tensor `name`, each axis gathered and scaled by its [`Axis`] (`None`: kept).
    Tensor {
        /// The source tensor's name.
        name: String,
        /// One entry per axis of the source tensor.
        axes: Vec<Option<Axis>>,
    },
    /// A new tensor with this value (kept in f32, as BERT keeps its layer gates). Its optimizer
    /// state starts empty.
    Fresh(Tensor),
}

/// A growth: every tensor of the grown model by name, and where it comes from.
#[derive(Debug, Default)]
pub struct Growth {
    /// Grown tensor name → its source, in the grown model's order.
    pub tensors: Vec<(String, Source)>,
    /// Relative noise added to the inherited values of tensors whose shape grew (0: the
    /// growth is exact). See [`Growth::with_noise`].
    pub noise: f64,
    /// Seed of the noise.
    pub noise_seed: u64,
}

fn axis_tensor(v: &[f64], dim: usize, ndim: usize) -> Tensor {
    let mut shape = vec![1i64; ndim];
    shape[dim] = v.len() as i64;
    Tensor::from_slice(v)
        .to_kind(Kind::Float)
        .view(shape.as_slice())
}

impl Growth {
    /// Adds `noise * std(W)` Gaussian noise (seeded) to the values a grown tensor
    /// inherits when its shape changed, to break the symmetry between replicated units
    /// (Net2WiderNet's option). The growth is then no longer function-preserving.
    pub fn with_noise(mut self, noise: f64, seed: u64) -> Self {
        self.noise = noise;
        self.noise_seed = seed;
        self
    }

    /// Names of the source tensors this growth reads.
    pub fn sources(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self
            .tensors
            .iter()
            .filter_map(|(_, s)| match s {
                Source::Tensor { name, .. } => Some(name.as_str()),
                Source::Fresh(_) => None,
            })
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    fn gather(
        &self,
        out_name: &str,
        name: &str,
        axes: &[Option<Axis>],
        t: &Tensor,
        grad: Option<bool>,
        path: Option<&std::path::Path>,
    ) -> Result<Tensor> {
        let size = t.size();
        if axes.len() != size.len() {
            return Err(Error::ShapeMismatch {
                path: path.map(|p| p.to_path_buf()),
                tensor: name.into(),
                expected: vec![-1; axes.len()],
                found: size,
            });
        }
        let kind = t.kind();
        let floating = matches!(
            kind,
            Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
        );
        let mut x = if floating {
            t.to_kind(Kind::Float)
        } else {
            t.shallow_clone()
        };
        let mut grew = false;
        for (d, a) in axes.iter().enumerate() {
            let Some(a) = a else { continue };
            if let Some(&bad) = a.index.iter().find(|&&i| i < 0 || i >= size[d]) {
                return Err(Error::invalid(
                    "growth",
                    format!(
                        "`{out_name}` reads index {bad} of axis {d} of `{name}`, which has {} entries",
                        size[d]
                    ),
                ));
            }
            if a.is_identity(size[d], grad.is_some()) {
                continue;
            }
            grew |= a.len() as i64 != size[d];
            if !floating {
                return Err(Error::invalid(
                    "growth",
                    format!("`{name}` is {kind:?}; only floating tensors can be grown"),
                ));
            }
            let idx = Tensor::from_slice(&a.index).to_device(x.device());
            x = x.index_select(d as i64, &idx);
            let s = match grad {
                None => axis_tensor(&a.scale, d, size.len()),
                Some(false) => axis_tensor(&a.grad_scale, d, size.len()),
                Some(true) => axis_tensor(
                    &a.grad_scale.iter().map(|g| g * g).collect::<Vec<_>>(),
                    d,
                    size.len(),
                ),
            };
            let dev = x.device();
            // Never in place: `x` may still share storage with the source tensor.
            x = x.multiply(&s.to_device(dev));
        }
        if grad.is_none() && grew && self.noise > 0.0 {
            let std = x.std(false).double_value(&[]);
            // Seeded per tensor so the noise does not depend on the order of growth,
            // and drawn from a generator of its own: libtorch's global generator is
            // shared with every other thread of the process.
            let n = gaussian(self.noise_seed ^ fnv(out_name), &x.size()).to_device(x.device());
            let noisy = &x + n * (self.noise * std);
            x = noisy;
        }
        Ok(if floating { x.to_kind(kind) } else { x })
    }

    /// The grown checkpoint. Every source tensor must be in `ck`; tensors of `ck` the
    /// growth does not read are not carried over (the operators list every tensor of
    /// the model they grow). Metadata is kept.
    ///
    /// # Errors
    /// A missing source tensor (named), a source whose rank differs from its axes, an
    /// index past a source axis.
    pub fn apply(&self, ck: &Checkpoint) -> Result<Checkpoint> {
        let mut out = Checkpoint::new();
        for (k, v) in ck.metadata() {
            out.set_metadata(k.clone(), v.clone());
        }
        tch::no_grad(|| -> Result<()> {
            for (new, src) in &self.tensors {
                let t = match src {
                    Source::Fresh(t) => t.to_kind(Kind::Float),
                    Source::Tensor { name, axes } => {
                        let t = ck.get(name).ok_or_else(|| Error::MissingTensor {
                            path: ck.source().map(|p| p.to_path_buf()),
                            tensor: name.clone(),
                        })?;
                        self.gather(new, name, axes, t, None, ck.source())?
                    }
                };
                out.insert(new.clone(), t);
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// Carries an optimizer state ([`reuse_core::Optimizer::state`]) into the grown
    /// parameters: `exp_avg` and `momentum_buffer` gathered with the gradient scales,
    /// `exp_avg_sq` with their squares, `master` (f32 weights of half-precision
    /// parameters) as the weights are, step counts copied. Fresh tensors, and
    /// parameters whose gradient scales are all 0 (a gated layer's weights), get no
    /// state: they start as new parameters. State of parameters the growth does not
    /// read is dropped. Load the result with [`reuse_core::Optimizer::load_state`]
    /// against the grown model's parameters.
    ///
    /// # Errors
    /// A state tensor whose name is not `<slot>.<parameter>`.
    pub fn apply_optimizer_state(&self, state: &Checkpoint) -> Result<Checkpoint> {
        let mut by_param: BTreeMap<&str, Vec<(&str, &Tensor)>> = BTreeMap::new();
        for (n, t) in state.iter() {
            let (slot, p) = n.split_once('.').ok_or_else(|| {
                Error::invalid(
                    "optimizer state",
                    format!("tensor `{n}` is not `<slot>.<parameter>`"),
                )
            })?;
            by_param.entry(p).or_default().push((slot, t));
        }
        let mut out = Checkpoint::new();
        for (k, v) in state.metadata() {
            out.set_metadata(k.clone(), v.clone());
        }
        tch::no_grad(|| -> Result<()> {
            for (new, src) in &self.tensors {
                let Source::Tensor { name, axes } = src else {
                    continue;
                };
                let Some(slots) = by_param.get(name.as_str()) else {
                    continue;
                };
                let dead = axes
                    .iter()
                    .flatten()
                    .any(|a| a.grad_scale.iter().all(|&g| g == 0.0));
                if dead {
                    continue;
                }
                for (slot, t) in slots {
                    let grown = match *slot {
                        "step" => t.copy(),
                        "exp_avg" | "momentum_buffer" => {
                            self.gather(new, name, axes, t, Some(false), None)?
                        }
                        "exp_avg_sq" => self.gather(new, name, axes, t, Some(true), None)?,
                        _ => {
                            let plain = Growth {
                                tensors: Vec::new(),
                                noise: 0.0,
                                noise_seed: 0,
                            };
                            plain.gather(new, name, axes, t, None, None)?
                        }
                    };
                    out.insert(format!("{slot}.{new}"), grown);
                }
            }
            Ok(())
        })?;
        Ok(out)
    }
}

/// FNV-1a of a name: a per-tensor seed offset.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

/// A seeded map of `n_new` grown units onto `n_old` source units: `0..n_old` first (each
/// unit keeps its place), then seeded draws (splitmix64) for the extra units, or, with
/// `uniform`, `0..n_old` repeated (every unit copied the same number of times, which
/// LayerNorm over the grown axis needs to stay exact).
pub fn unit_map(n_old: i64, n_new: i64, seed: u64, uniform: bool) -> Vec<i64> {
    let mut state = seed;
    (0..n_new)
        .map(|j| {
            if j < n_old || uniform {
                j % n_old
            } else {
                state = state.wrapping_add(0x9e3779b97f4a7c15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
                z ^= z >> 31;
                (z % n_old as u64) as i64
            }
        })
        .collect()
}

/// Standard normal samples of the given shape from a generator seeded with `seed`
/// (Box-Muller on a ChaCha stream), independent of libtorch's global generator.
fn gaussian(seed: u64, shape: &[i64]) -> Tensor {
    use rand::{Rng, SeedableRng};
    let n: i64 = shape.iter().product();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = Vec::with_capacity(n as usize);
    while (v.len() as i64) < n {
        // 1 - u lies in (0, 1], so its log is finite.
        let u1: f64 = 1.0 - rng.random::<f64>();
        let u2: f64 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        let t = std::f64::consts::TAU * u2;
        v.push((r * t.cos()) as f32);
        if (v.len() as i64) < n {
            v.push((r * t.sin()) as f32);
        }
    }
    Tensor::from_slice(&v).reshape(shape)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Weights, moments and masters follow their own scales, by hand.
    #[test]
    fn weights_and_optimizer_slots_use_their_own_scales() {
        let w = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]).view([3, 2]);
        let rows = Axis {
            index: vec![0, 1, 2, 2],
            scale: vec![1.0, 1.0, 0.5, 0.5],
            grad_scale: vec![1.0, 0.0, 2.0, 2.0],
        };
        let g = Growth {
            tensors: vec![(
                "w".into(),
                Source::Tensor {
                    name: "w".into(),
                    axes: vec![Some(rows), None],
                },
            )],
            ..Default::default()
        };
        let mut ck = Checkpoint::new();
        ck.insert("w", w.copy());
        let grown = g.apply(&ck).unwrap();
        let want = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 2.5, 3.0, 2.5, 3.0]).view([4, 2]);
        assert!(grown.tensor("w").unwrap().equal(&want));
        let mut st = Checkpoint::new();
        st.insert("exp_avg.w", w.copy());
        st.insert("exp_avg_sq.w", w.copy());
        st.insert("master.w", w.copy());
        st.insert("step.w", Tensor::from(7i64));
        st.set_metadata("optimizer_step", "7");
        let s = g.apply_optimizer_state(&st).unwrap();
        let m = Tensor::from_slice(&[1.0f32, 2.0, 0.0, 0.0, 10.0, 12.0, 10.0, 12.0]).view([4, 2]);
        let v = Tensor::from_slice(&[1.0f32, 2.0, 0.0, 0.0, 20.0, 24.0, 20.0, 24.0]).view([4, 2]);
        assert!(s.tensor("exp_avg.w").unwrap().equal(&m));
        assert!(s.tensor("exp_avg_sq.w").unwrap().equal(&v));
        assert!(s.tensor("master.w").unwrap().equal(&want));
        assert_eq!(s.tensor("step.w").unwrap().int64_value(&[]), 7);
        assert_eq!(s.metadata()["optimizer_step"], "7");
        // The source is untouched.
        assert!(ck.tensor("w").unwrap().equal(&w));
    }

    #[test]
    fn a_missing_source_or_a_bad_index_is_named() {
        let g = Growth {
            tensors: vec![(
                "b".into(),
                Source::Tensor {
                    name: "a".into(),
                    axes: vec![Some(Axis::gather(vec![0, 5]))],
                },
            )],
            ..Default::default()
        };
        let e = g.apply(&Checkpoint::new()).unwrap_err().to_string();
        assert!(e.contains("`a`"), "{e}");
        let mut ck = Checkpoint::new();
        ck.insert("a", Tensor::zeros([3], (Kind::Float, tch::Device::Cpu)));
        let e = g.apply(&ck).unwrap_err().to_string();
        assert!(e.contains("index 5") && e.contains("3 entries"), "{e}");
    }

    #[test]
    fn unit_maps_keep_old_units_and_replicate_uniformly_on_request() {
        assert_eq!(unit_map(3, 7, 0, true), vec![0, 1, 2, 0, 1, 2, 0]);
        let m = unit_map(4, 10, 42, false);
        assert_eq!(&m[..4], &[0, 1, 2, 3]);
        assert!(m.iter().all(|&u| (0..4).contains(&u)));
        assert_eq!(m, unit_map(4, 10, 42, false));
        assert_ne!(m, unit_map(4, 10, 43, false));
    }
}
