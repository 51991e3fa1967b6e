//! The experiment registry, and what experiments share: the context, their outcome
//! (metrics and notes) and summary statistics for repeated measurements.

pub mod continual;
pub mod core;
pub mod dist;
pub mod distill;
pub mod grow;
pub mod peft;
pub mod quant;

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
    /// Smoke-test sizes (few steps, small splits): checks that an experiment runs end
    /// to end; its figures mean nothing and the report says it was quick.
    pub quick: bool,
    /// Seeds of the repeated runs (`--seeds N`: 0..N; default 0, 1, 2).
    pub seeds: Vec<u64>,
    /// Full sizes: on a CUDA device, or `--full` on the CPU. Otherwise an experiment
    /// with a CPU size (`Experiment::cpu_size`) runs that, sized so the whole plain CPU
    /// run fits its budget; the report names the size each experiment ran at.
    pub full: bool,
    /// What one experiment of this run hands a later one (a trained teacher and its
    /// students, say), so the later one need not train them again; never kept across
    /// runs. Keys are the producing experiment's id.
    shared: std::cell::RefCell<BTreeMap<&'static str, Box<dyn std::any::Any>>>,
    /// Whether the experiment running now has a CPU size (`Experiment::cpu_size`; the
    /// runner sets it before each one): without one, `cpu_sized` is false, so an
    /// experiment can only take a CPU-size path its registry entry declares.
    has_cpu_size: std::cell::Cell<bool>,
}

impl Ctx {
    pub fn new(device: Device, quick: bool) -> Result<Self> {
        Self::with_seeds(device, quick, 3)
    }

    pub fn with_seeds(device: Device, quick: bool, seeds: usize) -> Result<Self> {
        if seeds == 0 {
            anyhow::bail!("--seeds must be at least 1");
        }
        let root = reuse_testkit::workspace_dir().canonicalize()?;
        Ok(Self {
            device,
            root,
            quick,
            seeds: (0..seeds as u64).collect(),
            full: device.is_cuda(),
            shared: Default::default(),
            has_cpu_size: std::cell::Cell::new(true),
        })
    }

    /// Declares whether the experiment about to run has a CPU size (the runner's call).
    pub fn set_has_cpu_size(&self, yes: bool) {
        self.has_cpu_size.set(yes);
    }

    /// The CPU size: an experiment that has one, neither `--quick` nor full (CUDA or
    /// `--full`).
    pub fn cpu_sized(&self) -> bool {
        self.has_cpu_size.get() && !self.quick && !self.full
    }

    /// The CPU size or `--quick`, for an experiment that has a CPU size: what the two
    /// share (smaller method sets, committed dev choices).
    pub fn reduced(&self) -> bool {
        self.has_cpu_size.get() && !self.full
    }

    /// `quick`, `cpu` or `full`: the size the running experiment runs at.
    pub fn size_name(&self) -> &'static str {
        if self.quick {
            "quick"
        } else if self.cpu_sized() {
            "cpu"
        } else {
            "full"
        }
    }

    /// Leaves `value` for a later experiment of this run (see `take_shared`).
    pub fn share<T: 'static>(&self, from: &'static str, value: T) {
        self.shared.borrow_mut().insert(from, Box::new(value));
    }

    /// Takes what experiment `from` left in this run, if it ran and left a `T`.
    pub fn take_shared<T: 'static>(&self, from: &'static str) -> Option<T> {
        let b = self.shared.borrow_mut().remove(from)?;
        b.downcast::<T>().ok().map(|b| *b)
    }

    /// The `.venv` python, if set-up made one.
    pub fn python(&self) -> Option<PathBuf> {
        let p = self.root.join(".venv/bin/python");
        p.exists().then_some(p)
    }

    /// Where this run's report goes (`target/reuse-report`, or `-quick`): experiments
    /// write their plots there.
    pub fn report_dir(&self) -> PathBuf {
        self.root.join(if self.quick {
            "target/reuse-report-quick"
        } else {
            "target/reuse-report"
        })
    }

    /// `full` normally, `quick` in quick mode.
    pub fn size(&self, full: usize, quick: usize) -> usize {
        if self.quick {
            quick
        } else {
            full
        }
    }
}

pub type Metrics = BTreeMap<String, f64>;

/// What an experiment returns: its metrics and notes saying how they were obtained
/// (how hyperparameters were chosen, what was timed, which figures are controls).
pub struct Outcome {
    pub metrics: Metrics,
    pub notes: Vec<String>,
}

/// The fixture the MiniLM experiments share: Debian package synopses labelled with their
/// archive section (8 sections; train, dev and test splits).
pub fn sections() -> Result<reuse_core::data::TextSplits> {
    Ok(reuse_core::data::load_text_splits(
        &reuse_testkit::fixtures_dir().join(SECTIONS_FILE),
    )?)
}

/// The sections fixture's path under `fixtures/`.
pub const SECTIONS_FILE: &str = "debian_sections/sections.tsv.gz";

/// A progress line: above the bar on a terminal, to stderr when the bar is hidden
/// (logs, CI), so it is never lost.
pub fn say(bar: &ProgressBar, msg: impl AsRef<str>) {
    if bar.is_hidden() {
        eprintln!("{}", msg.as_ref());
    } else {
        bar.println(msg.as_ref());
    }
}

pub fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// Sample standard deviation (n - 1); 0 for fewer than two values.
pub fn sample_sd(v: &[f64]) -> f64 {
    if v.len() < 2 {
        return 0.0;
    }
    let m = mean(v);
    (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt()
}

pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// A repeated timing (or throughput): `{name}_median`, `{name}_sd` (sample),
/// `{name}_min`, `{name}_max` and `{name}_samples`.
pub fn insert_spread(m: &mut Metrics, name: &str, samples: &[f64]) {
    let min = samples.iter().copied().fold(f64::INFINITY, f64::min);
    let max = samples.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    m.insert(format!("{name}_median"), median(samples));
    m.insert(format!("{name}_sd"), sample_sd(samples));
    m.insert(format!("{name}_min"), min);
    m.insert(format!("{name}_max"), max);
    m.insert(format!("{name}_samples"), samples.len() as f64);
}

/// A named experiment.
pub struct Experiment {
    pub id: &'static str,
    pub about: &'static str,
    pub run: fn(&Ctx, &ProgressBar) -> Result<Outcome>,
    /// Part of a plain `cargo xtask bench`; `false`: only when `--only` names it.
    pub default: bool,
    /// Sized for a GPU: on the CPU, a plain run runs its CPU size when it has one
    /// (`cpu_size`) and skips it otherwise (the report says so); `--full` runs the full
    /// size on the CPU too.
    pub gpu_sized: bool,
    /// Has a smaller CPU size (`Ctx::cpu_sized`), which fills its claim rows in a plain
    /// CPU run; the report notes which size ran.
    pub cpu_size: bool,
    /// Part of `--quick` (at its quick sizes); `false` for experiments whose quick size
    /// would say nothing (`--only` runs them anyway).
    pub quick: bool,
    /// Roughly how long it takes in a plain run on the 2-core development CPU (its CPU
    /// size where it has one), in seconds, measured there: weights for the overall
    /// progress bar's ETA, nothing else.
    pub cpu_seconds: u32,
}

pub const EXPERIMENTS: &[Experiment] = &[
    Experiment {
        id: "core.digits_mlp",
        about: "MLP on scikit-learn digits, 3 seeds by default: test accuracy, training time, parameters",
        run: core::digits_mlp,
        default: true,
        gpu_sized: false,
        cpu_size: false,
        quick: true,
        cpu_seconds: 2,
    },
    Experiment {
        id: "core.minilm_embed",
        about: "all-MiniLM-L6-v2 sentence embeddings/s (f32, bf16) vs sentence-transformers, interleaved rounds",
        run: core::minilm_embed,
        default: true,
        gpu_sized: false,
        cpu_size: false,
        quick: true,
        cpu_seconds: 31,
    },
    Experiment {
        id: "peft.minilm_sections",
        about: "MiniLM on Debian sections, same budget, lr chosen on dev, 3 seeds by default: full fine-tune, head only, LoRA (r=4 q,v,FFN; r=8 q,v), Pfeiffer",
        run: peft::minilm_sections,
        default: true,
        gpu_sized: false,
        cpu_size: true,
        quick: true,
        cpu_seconds: 470,
    },
    Experiment {
        id: "peft.inference_overhead",
        about: "forward time of unmerged LoRA over the base model (batch 32 x 64), merged as a control",
        run: peft::inference_overhead,
        default: true,
        gpu_sized: false,
        cpu_size: false,
        quick: true,
        cpu_seconds: 16,
    },
    Experiment {
        id: "peft.vs_python",
        about: "one LoRA training step, Rust vs PyTorch + PEFT, same model, batch, threads",
        run: peft::vs_python,
        default: true,
        gpu_sized: false,
        cpu_size: false,
        quick: true,
        cpu_seconds: 29,
    },
    Experiment {
        id: "distill.digits_mlp",
        about: "digits: wide MLP teacher, a student of 1.6% its size, hard labels vs KD (T, alpha chosen on dev), 3 seeds by default",
        run: distill::digits_mlp,
        default: true,
        gpu_sized: false,
        cpu_size: false,
        quick: true,
        cpu_seconds: 16,
    },
    Experiment {
        id: "distill.minilm_sections",
        about: "Debian sections: MiniLM teacher, 2-layer student cut from it; hard labels, live KD with unlabelled synopses, top-4 cache; 3 seeds",
        run: distill::minilm_sections,
        default: true,
        gpu_sized: true,
        cpu_size: true,
        quick: true,
        cpu_seconds: 496,
    },
    Experiment {
        id: "distill.minilm_embeddings",
        about: "a 3-layer MiniLM student trained to match the teacher's embeddings on the synopses: cosine in and out of domain, probe accuracy, speed; 3 seeds",
        run: distill::minilm_embeddings,
        default: true,
        gpu_sized: true,
        cpu_size: false,
        quick: true,
        cpu_seconds: 1670,
    },
    Experiment {
        id: "continual.split_digits",
        about: "split digits, class- and task-incremental: naive, EWC (exact, empirical), online EWC, replay, PackNet, joint; Avalanche 0.6 side by side; 3 seeds",
        run: continual::split_digits,
        default: true,
        gpu_sized: false,
        cpu_size: true,
        quick: true,
        cpu_seconds: 87,
    },
    Experiment {
        id: "continual.permuted_digits",
        about: "permuted digits, domain-incremental: naive, EWC (exact, empirical), online EWC, replay, joint; Avalanche 0.6 side by side; 3 seeds",
        run: continual::permuted_digits,
        default: true,
        gpu_sized: false,
        cpu_size: true,
        quick: true,
        cpu_seconds: 123,
    },
    Experiment {
        id: "continual.minilm_sections",
        about: "MiniLM on the Debian sections as 4 class-incremental tasks: per-task LoRA adapters, shared LoRA naive / replay / EWC, joint; PyTorch + PEFT beside; 3 seeds",
        run: continual::minilm_sections,
        default: true,
        gpu_sized: true,
        cpu_size: true,
        quick: true,
        cpu_seconds: 330,
    },
    Experiment {
        id: "grow.minilm_preserve",
        about: "MiniLM grown to FFN 3072, hidden 768, 8/12 gated layers (exact) and 8/12 copied or stacked layers (approximate): max |diff| and embedding cosine on random and real inputs",
        run: grow::minilm_preserve,
        default: true,
        gpu_sized: false,
        cpu_size: false,
        quick: true,
        cpu_seconds: 14,
    },
    Experiment {
        id: "grow.train_faster",
        about: "masked-LM pretraining on the synopses: 2-layer hidden-128 BERT grown exactly to 4 layers / hidden 256 mid-run vs the big model from scratch, same recipe; FLOPs to the scratch loss, 3 seeds by default",
        run: grow::train_faster,
        default: true,
        gpu_sized: true,
        cpu_size: false,
        quick: false,
        cpu_seconds: 4224,
    },
    Experiment {
        id: "grow.train_faster_dev",
        about: "dev sweep behind grow.train_faster: growth after 25/50/75% of the steps, seed 0, dev text (only with --only)",
        run: grow::train_faster_dev,
        default: false,
        gpu_sized: false,
        cpu_size: false,
        quick: true,
        cpu_seconds: 2500,
    },
    Experiment {
        id: "quant.minilm",
        about: "MiniLM in f32, bf16, int8, int4 (round-to-nearest and GPTQ, groups of 32/64/128): size, embedding cosine to f32, probe accuracy drop, embed throughput",
        run: quant::minilm,
        default: true,
        gpu_sized: false,
        cpu_size: false,
        quick: true,
        cpu_seconds: 70,
    },
    Experiment {
        id: "quant.qlora",
        about: "LoRA on int4 MiniLM (GPTQ g64) against LoRA on f32, same budget: test accuracy and peak memory (a process per run); 3 seeds",
        run: quant::qlora,
        default: true,
        gpu_sized: false,
        cpu_size: true,
        quick: true,
        cpu_seconds: 170,
    },
    Experiment {
        id: "quant.distill_plus_quant",
        about: "MiniLM classifier -> 2-layer KD student -> vocabulary trimmed to the synopses -> int4 (GPTQ linears, per-row tables): size against the f32 teacher, accuracy relative to it; 3 seeds",
        run: quant::distill_plus_quant,
        default: true,
        // On its own, 17 min on the 2-core CPU (teacher fine-tuning, KD over 7.4k texts,
        // 3 seeds); after distill.minilm_sections in the same run, seconds (it trims and
        // quantizes that experiment's students).
        gpu_sized: true,
        cpu_size: true,
        quick: true,
        cpu_seconds: 15,
    },
    Experiment {
        id: "dist.lora_step",
        about: "data-parallel LoRA step on MiniLM: reuse on 1 and 2 processes (c10d Gloo) against PyTorch DDP, same batch and threads, interleaved",
        run: dist::lora_step,
        default: true,
        gpu_sized: false,
        cpu_size: false,
        quick: true,
        cpu_seconds: 150,
    },
    Experiment {
        id: "peft.dev_sweep",
        about: "dev-only sweep behind peft.minilm_sections' grids: wide lr grids, LoRA variants, 3 seeds (for a GPU; only with --only)",
        run: peft::dev_sweep,
        default: false,
        gpu_sized: false,
        cpu_size: false,
        quick: true,
        cpu_seconds: 5000,
    },
];
