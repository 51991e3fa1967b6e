//! The experiment registry.

mod core;
mod peft;

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Result;
use indicatif::ProgressBar;
use tch::Device;

/// What every experiment gets.
pub struct Ctx {
    /// Device to run on.
    pub device: Device,
    /// Workspace root.
    pub root: PathBuf,
}

impl Ctx {
    pub fn new(device: Device) -> Result<Self> {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .canonicalize()?;
        Ok(Self { device, root })
    }

    /// The `.venv` python, if set-up made one.
    pub fn python(&self) -> Option<PathBuf> {
        let p = self.root.join(".venv/bin/python");
        p.exists().then_some(p)
    }
}

pub type Metrics = BTreeMap<String, f64>;

/// A progress line: above the bar on a terminal, to stderr when the bar is hidden
/// (logs, CI), so it is never lost.
pub fn say(bar: &ProgressBar, msg: impl AsRef<str>) {
    if bar.is_hidden() {
        eprintln!("{}", msg.as_ref());
    } else {
        bar.println(msg.as_ref());
    }
}

/// A named experiment.
pub struct Experiment {
    pub id: &'static str,
    pub about: &'static str,
    pub run: fn(&Ctx, &ProgressBar) -> Result<Metrics>,
}

pub const EXPERIMENTS: &[Experiment] = &[
    Experiment {
        id: "core.digits_mlp",
        about: "MLP on scikit-learn digits: test accuracy, training time, parameters",
        run: core::digits_mlp,
    },
    Experiment {
        id: "core.minilm_embed",
        about: "all-MiniLM-L6-v2 sentence embeddings/s (f32, bf16) vs sentence-transformers",
        run: core::minilm_embed,
    },
    Experiment {
        id: "peft.minilm_sections",
        about: "MiniLM on Debian sections, same budget: full fine-tune, head only, LoRA r=8 q,v, Pfeiffer",
        run: peft::minilm_sections,
    },
    Experiment {
        id: "peft.inference_overhead",
        about: "forward time of merged / unmerged LoRA over the base model (batch 32 x 64)",
        run: peft::inference_overhead,
    },
    Experiment {
        id: "peft.vs_python",
        about: "one LoRA training step, Rust vs PyTorch + PEFT, same model, batch, threads",
        run: peft::vs_python,
    },
];
