//! Bottleneck adapters (Houlsby et al. 2019, <https://arxiv.org/abs/1902.00751>;
//! Pfeiffer et al. 2020; He et al. 2022 for the parallel form), as AdapterHub's
//! `adapters` library configures them: down-projection, non-linearity, up-projection
//! and a residual, on a block output. The up-projection starts at zero, so a new
//! adapter is exactly the identity.
//!
//! * Houlsby (`DoubleSeqBnConfig`): after the attention output and after the FFN output,
//!   swish, reduction factor 16.
//! * Pfeiffer (`SeqBnConfig`): after the FFN output only, ReLU, reduction factor 16.
//! * Parallel (`ParBnConfig`): beside the FFN (reads the FFN input, adds to its output),
//!   ReLU, reduction factor 2, scaling 4.
//!
//! They sit in core's block-output slots (before each residual + LayerNorm), one
//! adapter per task on one frozen model, switched by name, saved on their own
//! (`bottleneck_config.json` + `adapter_model.safetensors`). Unlike AdapterHub we do
//! not add extra LayerNorms around the adapter.

use std::any::Any;
use std::path::Path;

use reuse_core::checkpoint::write_atomic;
use reuse_core::{Activation, Checkpoint, Linear, Model, OutputDelta};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::error::{config_err, PeftError, Result};

/// Where the adapters go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BottleneckKind {
    /// After attention and after the FFN.
    Houlsby,
    /// After the FFN.
    Pfeiffer,
    /// Beside the FFN.
    Parallel,
}

/// A bottleneck adapter configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BottleneckConfig {
    /// Placement.
    pub kind: BottleneckKind,
    /// hidden / bottleneck width.
    pub reduction_factor: f64,
    /// Non-linearity between the projections.
    pub non_linearity: Activation,
    /// Output scale.
    pub scaling: f64,
    /// The model's hidden size (set when the adapter is added).
    #[serde(default)]
    pub hidden_size: i64,
}

impl BottleneckConfig {
    /// AdapterHub's `DoubleSeqBnConfig` defaults.
    pub fn houlsby() -> Self {
        Self {
            kind: BottleneckKind::Houlsby,
            reduction_factor: 16.0,
            non_linearity: Activation::Silu,
            scaling: 1.0,
            hidden_size: 0,
        }
    }

    /// AdapterHub's `SeqBnConfig` defaults.
    pub fn pfeiffer() -> Self {
        Self {
            kind: BottleneckKind::Pfeiffer,
            reduction_factor: 16.0,
            non_linearity: Activation::Relu,
            scaling: 1.0,
            hidden_size: 0,
        }
    }

    /// AdapterHub's `ParBnConfig` defaults.
    pub fn parallel() -> Self {
        Self {
            kind: BottleneckKind::Parallel,
            reduction_factor: 2.0,
            non_linearity: Activation::Relu,
            scaling: 4.0,
            hidden_size: 0,
        }
    }

    /// Bottleneck width for the hidden size.
    pub fn bottleneck(&self) -> i64 {
        ((self.hidden_size as f64 / self.reduction_factor).floor() as i64).max(1)
    }

    /// Whether the block output at `path` gets an adapter.
    pub fn places(&self, path: &str) -> bool {
        let ffn = path.ends_with(".output") && !path.ends_with("attention.output");
        match self.kind {
            BottleneckKind::Houlsby => true,
            BottleneckKind::Pfeiffer | BottleneckKind::Parallel => ffn,
        }
    }
}

/// One bottleneck adapter on one block output.
#[derive(Debug)]
pub struct Bottleneck {
    /// `adapter_down`, `[bottleneck, hidden]`.
    pub down: Linear,
    /// `adapter_up`, `[hidden, bottleneck]`, zero at first.
    pub up: Linear,
    act: Activation,
    scaling: f64,
    parallel: bool,
}

impl Bottleneck {
    fn new(cfg: &BottleneckConfig, device: Device, kind: Kind) -> Self {
        let (h, b) = (cfg.hidden_size, cfg.bottleneck());
        let down = Linear::new(h, b, true, device);
        let z = |s: &[i64]| {
            Tensor::zeros(s, (Kind::Float, device))
                .to_kind(kind)
                .set_requires_grad(true)
        };
        let up = Linear::from_tensors(z(&[h, b]), Some(z(&[h]))).expect("shapes match");
        let down = Linear::from_tensors(
            down.weight.detach().to_kind(kind).set_requires_grad(true),
            down.bias
                .map(|b| b.detach().to_kind(kind).set_requires_grad(true)),
        )
        .expect("shapes match");
        Self {
            down,
            up,
            act: cfg.non_linearity,
            scaling: cfg.scaling,
            parallel: cfg.kind == BottleneckKind::Parallel,
        }
    }
}

impl OutputDelta for Bottleneck {
    fn forward(&self, input: &Tensor, output: &Tensor, train: bool) -> reuse_core::Result<Tensor> {
        let src = if self.parallel { input } else { output };
        let h = self.act.apply(&self.down.forward(src, train)?);
        Ok(output + self.up.forward(&h, train)? * self.scaling)
    }
    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self
            .down
            .named_parameters()
            .into_iter()
            .map(|(n, t)| (format!("adapter_down.{n}"), t))
            .collect();
        v.extend(
            self.up
                .named_parameters()
                .into_iter()
                .map(|(n, t)| (format!("adapter_up.{n}"), t)),
        );
        v
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Adds bottleneck adapter `name` to every block output `cfg` places it on.
/// `cfg.hidden_size` must be the model's hidden size. Returns the slot paths.
pub fn add_bottleneck(
    model: &mut dyn Model,
    name: &str,
    cfg: &BottleneckConfig,
    device: Device,
) -> Result<Vec<String>> {
    if cfg.hidden_size <= 0 || cfg.reduction_factor <= 0.0 {
        return Err(config_err(
            "bottleneck",
            format!(
                "hidden_size {} and reduction_factor {} must be positive",
                cfg.hidden_size, cfg.reduction_factor
            ),
        ));
    }
    let mut paths = Vec::new();
    let mut err = None;
    let kind = model
        .named_parameters()
        .first()
        .map(|p| p.1.kind())
        .unwrap_or(Kind::Float);
    model.visit_block_outputs(&mut |p, slots| {
        if cfg.places(p) && err.is_none() {
            match slots.add(name, Box::new(Bottleneck::new(cfg, device, kind))) {
                Ok(()) => paths.push(p.to_string()),
                Err(e) => err = Some(e),
            }
        }
    });
    if let Some(e) = err {
        remove_bottleneck(model, name);
        return Err(e.into());
    }
    if paths.is_empty() {
        return Err(PeftError::NoTarget {
            pattern: format!("{:?} bottleneck", cfg.kind),
            available: model.block_output_paths().join(", "),
        });
    }
    Ok(paths)
}

/// Removes bottleneck adapter `name` everywhere.
pub fn remove_bottleneck(model: &mut dyn Model, name: &str) {
    model.visit_block_outputs(&mut |_, s| {
        s.remove(name);
    });
}

/// Makes exactly `names` the active bottleneck adapters, and freezes every parameter
/// but theirs (the per-task switch).
pub fn set_active_bottlenecks(model: &mut dyn Model, names: &[&str]) {
    model.visit_block_outputs(&mut |_, s| s.set_active(names));
    let params = model.params();
    params.freeze();
    for (n, t) in params.iter() {
        if names.iter().any(|a| n.contains(&format!(".{a}.adapter_"))) {
            let _ = t.set_requires_grad(true);
        }
    }
}

/// Saves adapter `name` alone: `bottleneck_config.json` and `adapter_model.safetensors`
/// with keys `<block output path>.adapter_{down,up}.{weight,bias}`.
pub fn save_bottleneck(
    model: &dyn Model,
    name: &str,
    cfg: &BottleneckConfig,
    dir: &Path,
) -> Result<()> {
    let tag = format!(".{name}.adapter_");
    let mut ck = Checkpoint::new();
    for (n, t) in model.named_parameters() {
        if let Some(i) = n.find(&tag) {
            ck.insert(
                format!("{}.{}", &n[..i], &n[i + name.len() + 2..]),
                t.detach().copy(),
            );
        }
    }
    if ck.is_empty() {
        return Err(PeftError::Adapter {
            name: name.into(),
            reason: "no bottleneck adapter of that name".into(),
        });
    }
    ck.set_metadata("format", "pt");
    std::fs::create_dir_all(dir).map_err(|e| PeftError::Io {
        path: dir.into(),
        source: e,
    })?;
    ck.save(dir.join("adapter_model.safetensors"))?;
    let json = serde_json::to_string_pretty(&serde_json::to_value(cfg).expect("serialises"))
        .expect("serialises");
    write_atomic(&dir.join("bottleneck_config.json"), json.as_bytes())?;
    Ok(())
}

/// Loads a bottleneck adapter saved by [`save_bottleneck`] as `name`. Shapes are
/// checked before anything is attached.
pub fn load_bottleneck(model: &mut dyn Model, dir: &Path, name: &str) -> Result<BottleneckConfig> {
    let cpath = dir.join("bottleneck_config.json");
    let text = std::fs::read_to_string(&cpath).map_err(|e| PeftError::Io {
        path: cpath.clone(),
        source: e,
    })?;
    let cfg: BottleneckConfig = serde_json::from_str(&text).map_err(|e| PeftError::Config {
        path: Some(cpath.clone()),
        key: "bottleneck_config.json".into(),
        reason: e.to_string(),
    })?;
    let wpath = dir.join("adapter_model.safetensors");
    let ck = Checkpoint::load(&wpath, Device::Cpu)?;
    let device = model
        .named_parameters()
        .first()
        .map(|p| p.1.device())
        .unwrap_or(Device::Cpu);
    let (h, b) = (cfg.hidden_size, cfg.bottleneck());
    let mut places = Vec::new();
    model.visit_block_outputs(&mut |p, _| {
        if cfg.places(p) {
            places.push(p.to_string())
        }
    });
    for p in &places {
        for (k, shape) in [
            ("adapter_down.weight", vec![b, h]),
            ("adapter_down.bias", vec![b]),
            ("adapter_up.weight", vec![h, b]),
            ("adapter_up.bias", vec![h]),
        ] {
            ck.tensor_with_shape(&format!("{p}.{k}"), &shape)?;
        }
    }
    add_bottleneck(model, name, &cfg, device)?;
    let tag = format!(".{name}.adapter_");
    let params = model.params();
    tch::no_grad(|| -> Result<()> {
        for (n, t) in params.iter() {
            if let Some(i) = n.find(&tag) {
                let key = format!("{}.{}", &n[..i], &n[i + name.len() + 2..]);
                t.shallow_clone().f_copy_(ck.tensor(&key)?)?;
            }
        }
        Ok(())
    })?;
    Ok(cfg)
}
