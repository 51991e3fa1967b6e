//! One LoRA / rsLoRA / DoRA adapter on one linear layer, as PEFT's `lora.Linear`
//! computes it (`peft/tuners/lora/layer.py`, `dora.py`).
//!
//! * LoRA: `scaling * B(A(dropout(x)))`, `A` `[r, in]`, `B` `[out, r]`.
//! * DoRA (Liu et al. 2024, <https://arxiv.org/abs/2402.09353>): a magnitude `m` per
//!   output row; with `n` the row norm of `W + scaling * B A`, **detached**, the layer
//!   adds `(m/n - 1) * (x W^T) + (m/n) * scaling * B(A(x))`; merging writes
//!   `W' = (m/n) * (W + scaling * B A)`.

use std::any::Any;

use reuse_core::LinearDelta;
use tch::{Kind, Tensor};

use crate::config::InitLoraWeights;
use crate::error::{config_err, Result};

/// LoRA weights for one linear.
#[derive(Debug)]
pub struct LoraLayer {
    /// `lora_A.weight`, `[r, in]`.
    pub a: Tensor,
    /// `lora_B.weight`, `[out, r]`.
    pub b: Tensor,
    /// alpha / r (or alpha / sqrt(r)).
    pub scaling: f64,
    /// Dropout probability on the input (training only).
    pub dropout: f64,
    /// DoRA magnitude `lora_magnitude_vector`, `[out]`.
    pub magnitude: Option<Tensor>,
}

fn kaiming_uniform_a_sqrt5(rows: i64, fan_in: i64, like: &Tensor) -> Tensor {
    // kaiming_uniform_(a=sqrt(5)) has bound sqrt(6 / ((1 + 5) * fan_in)) = 1/sqrt(fan_in).
    let bound = 1.0 / (fan_in as f64).sqrt();
    Tensor::empty([rows, fan_in], (Kind::Float, like.device())).uniform_(-bound, bound)
}

impl LoraLayer {
    /// A new adapter for `weight` (`[out, in]`), initialised as PEFT does for `init`.
    pub fn new(
        weight: &Tensor,
        r: i64,
        scaling: f64,
        dropout: f64,
        init: &InitLoraWeights,
        dora: bool,
    ) -> Result<Self> {
        let (out, inp) = (weight.size()[0], weight.size()[1]);
        let (a, b) = match init {
            InitLoraWeights::Bool(true) => (
                kaiming_uniform_a_sqrt5(r, inp, weight),
                Tensor::zeros([out, r], (Kind::Float, weight.device())),
            ),
            // Both as nn.Linear's default: B is non-zero too.
            InitLoraWeights::Bool(false) => (
                kaiming_uniform_a_sqrt5(r, inp, weight),
                kaiming_uniform_a_sqrt5(out, r, weight),
            ),
            InitLoraWeights::Named(n) if n == "gaussian" => (
                Tensor::randn([r, inp], (Kind::Float, weight.device())) / r as f64,
                Tensor::zeros([out, r], (Kind::Float, weight.device())),
            ),
            InitLoraWeights::Named(n) => {
                return Err(config_err(
                    "init_lora_weights",
                    format!(
                        "{n:?} is not supported for new adapters (use true, false or \"gaussian\")"
                    ),
                ))
            }
        };
        let kind = weight.kind();
        let mut l = Self {
            a: a.to_kind(kind).set_requires_grad(true),
            b: b.to_kind(kind).set_requires_grad(true),
            scaling,
            dropout,
            magnitude: None,
        };
        if dora {
            let m = tch::no_grad(|| l.weight_norm(weight));
            l.magnitude = Some(m.to_kind(kind).set_requires_grad(true));
        }
        Ok(l)
    }

    /// `scaling * B A`, `[out, in]`.
    pub fn lora_weight(&self) -> Tensor {
        self.b.matmul(&self.a) * self.scaling
    }

    /// Row norms of `W + scaling * B A` (what DoRA divides by).
    fn weight_norm(&self, weight: &Tensor) -> Tensor {
        let w = weight.to_kind(Kind::Float) + self.lora_weight().to_kind(Kind::Float);
        w.square().sum_dim_intlist(1, false, Kind::Float).sqrt()
    }
}

impl LinearDelta for LoraLayer {
    fn forward(&self, x: &Tensor, base_weight: &Tensor, base_out: &Tensor, train: bool) -> Tensor {
        let dropping = train && self.dropout > 0.0;
        let xd = if dropping {
            x.dropout(self.dropout, true)
        } else {
            x.shallow_clone()
        };
        let lora = xd
            .linear::<&Tensor>(&self.a, None)
            .linear::<&Tensor>(&self.b, None);
        match &self.magnitude {
            None => lora * self.scaling,
            Some(m) => {
                let n = tch::no_grad(|| self.weight_norm(base_weight)).detach();
                let scale = (m.to_kind(Kind::Float) / n).to_kind(x.kind());
                // With dropout on, PEFT recomputes the base output on the dropped input.
                let base = if dropping {
                    xd.linear::<&Tensor>(base_weight, None)
                } else {
                    base_out.shallow_clone()
                };
                (&scale - 1.0) * base + &scale * lora * self.scaling
            }
        }
    }

    fn needs_base_weight(&self) -> bool {
        self.magnitude.is_some()
    }
    fn needs_base_out(&self) -> bool {
        self.magnitude.is_some()
    }

    fn add_to(
        &self,
        out: Tensor,
        x: &Tensor,
        base_weight: &Tensor,
        base_out: &Tensor,
        train: bool,
    ) -> Tensor {
        if self.magnitude.is_some() {
            return out + self.forward(x, base_weight, base_out, train);
        }
        // Scale the rank-r intermediate (cheap) and let the up-projection GEMM
        // accumulate into the layer output: no full-size temporary, one pass fewer.
        let xd = if train && self.dropout > 0.0 {
            x.dropout(self.dropout, true)
        } else {
            x.shallow_clone()
        };
        let mid = xd.linear::<&Tensor>(&self.a, None) * self.scaling;
        let shape = out.size();
        let (o, r) = (self.b.size()[0], self.b.size()[1]);
        Tensor::addmm(&out.reshape([-1, o]), &mid.reshape([-1, r]), &self.b.tr()).reshape(shape)
    }

    fn delta_weight(&self, base_weight: &Tensor) -> Option<Tensor> {
        let lw = self.lora_weight();
        Some(match &self.magnitude {
            None => lw,
            Some(m) => {
                let n = self.weight_norm(base_weight);
                let scale = (m.to_kind(Kind::Float) / n).unsqueeze(1);
                let merged = (base_weight.to_kind(Kind::Float) + lw.to_kind(Kind::Float)) * scale;
                merged - base_weight.to_kind(Kind::Float)
            }
        })
    }

    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut v = vec![
            ("lora_A.weight".to_string(), self.a.shallow_clone()),
            ("lora_B.weight".to_string(), self.b.shallow_clone()),
        ];
        if let Some(m) = &self.magnitude {
            v.push(("lora_magnitude_vector".to_string(), m.shallow_clone()));
        }
        v
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}
