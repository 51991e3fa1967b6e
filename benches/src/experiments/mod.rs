//! The experiment registry, and what experiments share: the context, their outcome
//! (metrics and notes) and summary statistics for repeated measurements.

pub mod continual;
pub mod core;
pub mod dist;
pub mod distill;
pub mod grow;
pub mod llm;
pub mod llm_adapters;
pub mod llm_distill;
pub mod llm_sft;
pub mod peft;
pub mod quant;
pub mod rouge;

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
    /// with a CPU size (`Sizes::cpu`) runs that, sized so the whole plain CPU run fits
    /// its budget; the report names the size each experiment ran at.
    pub full: bool,
    /// What one experiment of this run hands a later one (a trained teacher and its
    /// students, say), so the later one need not train them again; never kept across
    /// runs. Keys are the producing experiment's id.
    shared: std::cell::RefCell<BTreeMap<&'static str, Box<dyn std::any::Any>>>,
}

impl Ctx {
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
        })
    }

    /// The size an experiment with (`has_cpu`) or without a CPU size runs at in this run.
    pub fn size(&self, has_cpu: bool) -> Size {
        Size::of(self.quick, self.full, has_cpu)
    }

    /// The running experiment's numbers: its `sizes` at the size this run gives it, on
    /// this run's device.
    pub fn sizes<'a, T>(&self, sizes: &'a Sizes<T>) -> &'a T {
        sizes.at(self.size(sizes.cpu.is_some()), self.device.is_cuda())
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
}

/// The size an experiment runs at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Size {
    /// `--quick`: smoke-test numbers.
    Quick,
    /// Its CPU size: a plain CPU run of an experiment that has one.
    Cpu,
    /// Full: a CUDA run, `--full`, or a plain CPU run of an experiment without a CPU size.
    Full,
}

impl Size {
    /// The size a run gives an experiment: `--quick` (`quick`) wins; else its CPU size
    /// if it has one (`has_cpu`) and the run is not full-sized (`full`: CUDA or `--full`).
    pub fn of(quick: bool, full: bool, has_cpu: bool) -> Self {
        if quick {
            Size::Quick
        } else if has_cpu && !full {
            Size::Cpu
        } else {
            Size::Full
        }
    }

    /// As report.json's `size` names it.
    pub fn name(self) -> &'static str {
        match self {
            Size::Quick => "quick",
            Size::Cpu => "cpu",
            Size::Full => "full",
        }
    }
}

/// An experiment's sizes as data: the numbers and grids it varies (epochs, steps,
/// rounds, texts, which grid, which seeds, which methods...) at each size, a `T` its
/// file declares as one `const` beside its code and reads once (`Ctx::sizes`). Its
/// registry entry points at it too, so whether it has a CPU size is said once, here.
pub struct Sizes<T> {
    /// `--quick`.
    pub quick: T,
    /// Its CPU size, if it has one: what a plain CPU run gives it (`None`: a plain CPU
    /// run gives it `full`, or leaves it out if it is `gpu_sized`).
    pub cpu: Option<T>,
    /// On a CUDA device, or `--full` on the CPU; also a plain CPU run's, without `cpu`.
    pub full: T,
    /// What a CUDA device runs instead, at the sizes where it differs.
    pub cuda: OnCuda<T>,
}

/// The sizes a CUDA device runs instead of the CPU's (`None`: the same).
pub struct OnCuda<T> {
    /// `--quick` on a CUDA device.
    pub quick: Option<T>,
    /// The full size on a CUDA device (`--full` on the CPU runs `Sizes::full`).
    pub full: Option<T>,
}

impl<T> OnCuda<T> {
    /// The same sizes on every device.
    pub const SAME: Self = OnCuda {
        quick: None,
        full: None,
    };
}

impl<T> Sizes<T> {
    /// The numbers at `size` on a CUDA device (`cuda`) or the CPU. The CPU size falls
    /// back to full where there is none (`Size::of` never picks it then).
    pub fn at(&self, size: Size, cuda: bool) -> &T {
        let (on_cpu, on_cuda) = match size {
            Size::Quick => (&self.quick, &self.cuda.quick),
            Size::Cpu => return self.cpu.as_ref().unwrap_or(&self.full),
            Size::Full => (&self.full, &self.cuda.full),
        };
        match on_cuda {
            Some(t) if cuda => t,
            _ => on_cpu,
        }
    }
}

/// Which of the run's seeds (`--seeds`) an experiment runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seeds {
    All,
    /// The first n (at least one seed is always given).
    First(usize),
}

impl Seeds {
    pub fn of(self, seeds: &[u64]) -> &[u64] {
        match self {
            Seeds::All => seeds,
            Seeds::First(n) => &seeds[..n],
        }
    }

    /// As a count for `Knobs::counts` (all: unbounded).
    #[cfg_attr(not(test), allow(dead_code))] // read by the tests only
    pub fn count(self) -> usize {
        match self {
            Seeds::All => usize::MAX,
            Seeds::First(n) => n,
        }
    }
}

/// Named counts of a size: `(knob, value)`.
#[cfg_attr(not(test), allow(dead_code))] // read by the tests only
pub type Counts = Vec<(&'static str, usize)>;

/// An experiment's size struct, as the harness's checks read it.
pub trait Knobs {
    /// Its numbers that can only grow from a smaller size to the full one (epochs,
    /// steps, rounds, texts, seeds, grid points, methods; `usize::MAX` for "all"), by
    /// name: the tests check that no quick or CPU count exceeds the full size's on the
    /// same device, and that quick is smaller somewhere.
    #[cfg_attr(not(test), allow(dead_code))] // read by the tests only
    fn counts(&self) -> Counts;
}

/// One number, for an experiment that varies only that.
impl Knobs for usize {
    fn counts(&self) -> Counts {
        vec![("value", *self)]
    }
}

/// What the runner and the tests read of an experiment's [`Sizes`], whatever its `T`.
pub trait SizeTable {
    /// Whether it has a CPU size.
    fn has_cpu(&self) -> bool;
    /// Its counts at `size` on a CUDA device (`cuda`) or the CPU.
    #[cfg_attr(not(test), allow(dead_code))] // read by the tests only
    fn counts_at(&self, size: Size, cuda: bool) -> Counts;
}

impl<T: Knobs> SizeTable for Sizes<T> {
    fn has_cpu(&self) -> bool {
        self.cpu.is_some()
    }

    fn counts_at(&self, size: Size, cuda: bool) -> Counts {
        self.at(size, cuda).counts()
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
    /// (`Sizes::cpu`) and skips it otherwise (the report says so); `--full` runs the full
    /// size on the CPU too.
    pub gpu_sized: bool,
    /// Its sizes, the `const` its file declares and its `run` reads: whether it has a
    /// CPU size (which fills its claim rows in a plain CPU run; the report notes which
    /// size ran) is read from there.
    pub sizes: &'static dyn SizeTable,
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
        sizes: &core::DIGITS_MLP_SIZES,
        quick: true,
        cpu_seconds: 2,
    },
    Experiment {
        id: "core.minilm_embed",
        about: "all-MiniLM-L6-v2 sentence embeddings/s (f32, bf16) vs sentence-transformers, interleaved rounds",
        run: core::minilm_embed,
        default: true,
        gpu_sized: false,
        sizes: &core::MINILM_EMBED_SIZES,
        quick: true,
        cpu_seconds: 31,
    },
    Experiment {
        id: "peft.minilm_sections",
        about: "MiniLM on Debian sections, same budget, lr chosen on dev, 3 seeds by default: full fine-tune, head only, LoRA (r=4 q,v,FFN; r=8 q,v), Pfeiffer",
        run: peft::minilm_sections,
        default: true,
        gpu_sized: false,
        sizes: &peft::MINILM_SECTIONS_SIZES,
        quick: true,
        cpu_seconds: 470,
    },
    Experiment {
        id: "peft.inference_overhead",
        about: "forward time of unmerged LoRA over the base model (batch 32 x 64), merged as a control",
        run: peft::inference_overhead,
        default: true,
        gpu_sized: false,
        sizes: &peft::INFERENCE_OVERHEAD_SIZES,
        quick: true,
        cpu_seconds: 16,
    },
    Experiment {
        id: "peft.vs_python",
        about: "one LoRA training step, Rust vs PyTorch + PEFT, same model, batch, threads",
        run: peft::vs_python,
        default: true,
        gpu_sized: false,
        sizes: &peft::VS_PYTHON_SIZES,
        quick: true,
        cpu_seconds: 29,
    },
    Experiment {
        id: "distill.digits_mlp",
        about: "digits: wide MLP teacher, a student of 1.6% its size, hard labels vs KD (T, alpha chosen on dev), 3 seeds by default",
        run: distill::digits_mlp,
        default: true,
        gpu_sized: false,
        sizes: &distill::DIGITS_MLP_SIZES,
        quick: true,
        cpu_seconds: 16,
    },
    Experiment {
        id: "distill.minilm_sections",
        about: "Debian sections: MiniLM teacher, 2-layer student cut from it; hard labels, live KD with unlabelled synopses, top-4 cache; 3 seeds",
        run: distill::minilm_sections,
        default: true,
        gpu_sized: true,
        sizes: &distill::MINILM_SECTIONS_SIZES,
        quick: true,
        cpu_seconds: 496,
    },
    Experiment {
        id: "distill.minilm_embeddings",
        about: "a 3-layer MiniLM student trained to match the teacher's embeddings on the synopses: cosine in and out of domain, probe accuracy, speed; 3 seeds",
        run: distill::minilm_embeddings,
        default: true,
        gpu_sized: true,
        sizes: &distill::MINILM_EMBEDDINGS_SIZES,
        quick: true,
        cpu_seconds: 1670,
    },
    Experiment {
        id: "continual.split_digits",
        about: "split digits, class- and task-incremental: naive, EWC (exact, empirical), online EWC, replay, PackNet, joint; Avalanche 0.6 side by side; 3 seeds",
        run: continual::split_digits,
        default: true,
        gpu_sized: false,
        sizes: &continual::SPLIT_DIGITS_SIZES,
        quick: true,
        cpu_seconds: 87,
    },
    Experiment {
        id: "continual.permuted_digits",
        about: "permuted digits, domain-incremental: naive, EWC (exact, empirical), online EWC, replay, joint; Avalanche 0.6 side by side; 3 seeds",
        run: continual::permuted_digits,
        default: true,
        gpu_sized: false,
        sizes: &continual::PERMUTED_DIGITS_SIZES,
        quick: true,
        cpu_seconds: 123,
    },
    Experiment {
        id: "continual.minilm_sections",
        about: "MiniLM on the Debian sections as 4 class-incremental tasks: per-task LoRA adapters, shared LoRA naive / replay / EWC, joint; PyTorch + PEFT beside; 3 seeds",
        run: continual::minilm_sections,
        default: true,
        gpu_sized: true,
        sizes: &continual::MINILM_SECTIONS_SIZES,
        quick: true,
        cpu_seconds: 330,
    },
    Experiment {
        id: "grow.minilm_preserve",
        about: "MiniLM grown to FFN 3072, hidden 768, 8/12 gated layers (exact) and 8/12 copied or stacked layers (approximate): max |diff| and embedding cosine on random and real inputs",
        run: grow::minilm_preserve,
        default: true,
        gpu_sized: false,
        sizes: &grow::MINILM_PRESERVE_SIZES,
        quick: true,
        cpu_seconds: 14,
    },
    Experiment {
        id: "grow.train_faster",
        about: "masked-LM pretraining on the synopses: 2-layer hidden-128 BERT grown exactly to 4 layers / hidden 256 mid-run vs the big model from scratch, same recipe; FLOPs to the scratch loss, 3 seeds by default",
        run: grow::train_faster,
        default: true,
        gpu_sized: true,
        sizes: &grow::TRAIN_FASTER_SIZES,
        quick: false,
        cpu_seconds: 4224,
    },
    Experiment {
        id: "grow.train_faster_dev",
        about: "dev sweep behind grow.train_faster: growth after 25/50/75% of the steps, seed 0, dev text (only with --only)",
        run: grow::train_faster_dev,
        default: false,
        gpu_sized: false,
        sizes: &grow::TRAIN_FASTER_SIZES,
        quick: true,
        cpu_seconds: 2500,
    },
    Experiment {
        id: "quant.minilm",
        about: "MiniLM in f32, bf16, int8, int4 (round-to-nearest and GPTQ, groups of 32/64/128): size, embedding cosine to f32, probe accuracy drop, embed throughput",
        run: quant::minilm,
        default: true,
        gpu_sized: false,
        sizes: &quant::MINILM_SIZES,
        quick: true,
        cpu_seconds: 70,
    },
    Experiment {
        id: "quant.qlora",
        about: "LoRA on int4 MiniLM (GPTQ g64) against LoRA on f32, same budget: test accuracy and peak memory (a process per run); 3 seeds",
        run: quant::qlora,
        default: true,
        gpu_sized: false,
        sizes: &quant::QLORA_SIZES,
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
        sizes: &quant::DISTILL_PLUS_QUANT_SIZES,
        quick: true,
        cpu_seconds: 15,
    },
    Experiment {
        id: "core.smollm2_generate",
        about: "SmolLM2-135M-Instruct (its GGUF): greedy decoding tokens/s at batch 1 and 8, reuse f32 and bf16 against transformers f32 on the same file, interleaved rounds; greedy agreement; memory bandwidth and bytes per token",
        run: llm::smollm2_generate,
        default: true,
        gpu_sized: false,
        sizes: &llm::GENERATE_SIZES,
        quick: true,
        cpu_seconds: 300,
    },
    Experiment {
        id: "core.smollm2_score",
        about: "SmolLM2-135M-Instruct perplexity of held-out synopses, reuse against transformers on the same GGUF: NLL and time, interleaved rounds",
        run: llm::smollm2_score,
        default: true,
        gpu_sized: false,
        sizes: &llm::SCORE_SIZES,
        quick: true,
        cpu_seconds: 120,
    },
    Experiment {
        id: "core.smollm2_loss_memory",
        about: "SmolLM2 training step (forward + backward, all weights): peak memory with the head + loss on full logits against the chunked path (a process per run)",
        run: llm::smollm2_loss_memory,
        default: true,
        gpu_sized: false,
        sizes: &llm::LOSS_SIZES,
        quick: true,
        cpu_seconds: 120,
    },
    Experiment {
        id: "peft.smollm2_mixed_adapters",
        about: "SmolLM2 with 4 LoRA adapters: one greedy batch whose rows use different adapters against each adapter's rows in turn (and the base batch), interleaved rounds; rows equal to each row alone",
        run: llm_adapters::smollm2_mixed_adapters,
        default: true,
        gpu_sized: false,
        sizes: &llm_adapters::MIXED_SIZES,
        quick: true,
        cpu_seconds: 150,
    },
    Experiment {
        id: "peft.smollm2_summaries",
        about: "SmolLM2 SFT on the AppStream summaries: zero-shot, LoRA (r 4 all-linear, 0.91%), full fine-tuning and QLoRA on the Q4_1 codes against PyTorch + PEFT LoRA on the same batches; test ROUGE-L and NLL, ms/step, peak RSS per arm (a process each); 3 seeds",
        run: llm_sft::smollm2_summaries,
        default: true,
        gpu_sized: false,
        sizes: &llm_sft::SUMMARIES_SIZES,
        quick: true,
        cpu_seconds: 900,
    },
    Experiment {
        id: "peft.smollm2_summaries_dev",
        about: "dev-only sweep behind peft.smollm2_summaries' learning rates: LoRA and full fine-tuning, seed 0, dev NLL (only with --only)",
        run: llm_sft::smollm2_summaries_dev,
        default: false,
        gpu_sized: false,
        sizes: &llm_sft::SUMMARIES_SIZES,
        quick: true,
        cpu_seconds: 600,
    },
    Experiment {
        id: "distill.smollm2_text",
        about: "SmolLM2 distilled into students of 10 and 15 of its 30 blocks (10 only at the CPU size; which blocks: chosen on dev): cross-entropy vs KD from the live teacher vs KD from its per-token top-k cache at the same token budget; held-out Debian and general-English perplexity, ms/step, decoding speed against the teacher; 3 seeds",
        run: llm_distill::smollm2_text,
        // Not in a plain run yet: the plain CPU run is at its 60-minute budget without it
        // (its CPU size takes 12 minutes); `--only distill.smollm2_text` runs it.
        default: false,
        gpu_sized: false,
        sizes: &llm_distill::TEXT_SIZES,
        quick: true,
        cpu_seconds: 700,
    },
    Experiment {
        id: "distill.smollm2_text_dev",
        about: "dev-only sweep behind distill.smollm2_text's learning rates: cross-entropy and live KD on the 10-block cut, seed 0, dev NLL (only with --only)",
        run: llm_distill::smollm2_text_dev,
        default: false,
        gpu_sized: false,
        sizes: &llm_distill::TEXT_SIZES,
        quick: true,
        cpu_seconds: 400,
    },
    Experiment {
        id: "dist.lora_step",
        about: "data-parallel LoRA step on MiniLM: reuse on 1 and 2 processes (c10d Gloo) against PyTorch DDP, same batch and threads, interleaved",
        run: dist::lora_step,
        default: true,
        gpu_sized: false,
        sizes: &dist::LORA_STEP_SIZES,
        quick: true,
        cpu_seconds: 150,
    },
    Experiment {
        id: "peft.dev_sweep",
        about: "dev-only sweep behind peft.minilm_sections' grids: wide lr grids, LoRA variants, 3 seeds (for a GPU; only with --only)",
        run: peft::dev_sweep,
        default: false,
        gpu_sized: false,
        sizes: &peft::DEV_SWEEP_SIZES,
        quick: true,
        cpu_seconds: 5000,
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    /// Every experiment's declared sizes, on each device: no quick or CPU count above
    /// the full size's, and quick smaller somewhere (else `--quick` would run it whole).
    #[test]
    fn sizes_shrink_from_full() {
        for e in EXPERIMENTS {
            for cuda in [false, true] {
                let full = e.sizes.counts_at(Size::Full, cuda);
                let mut smaller = vec![(Size::Quick, e.sizes.counts_at(Size::Quick, cuda))];
                // A CPU size only ever runs on the CPU (`Size::of`: CUDA is full-sized).
                if e.sizes.has_cpu() && !cuda {
                    smaller.push((Size::Cpu, e.sizes.counts_at(Size::Cpu, cuda)));
                }
                for (size, counts) in smaller {
                    let names = |c: &Counts| c.iter().map(|(n, _)| *n).collect::<Vec<_>>();
                    assert_eq!(names(&counts), names(&full), "{}", e.id);
                    for ((name, v), (_, f)) in counts.iter().zip(&full) {
                        assert!(
                            v <= f,
                            "{} (cuda {cuda}): {} {name} {v} above full's {f}",
                            e.id,
                            size.name()
                        );
                    }
                    if size == Size::Quick {
                        assert!(
                            counts.iter().zip(&full).any(|((_, v), (_, f))| v < f),
                            "{} (cuda {cuda}): quick is no smaller than full",
                            e.id
                        );
                    }
                }
            }
        }
    }

    /// The CPU sizes: a CPU size smaller than full somewhere (else it is the full size
    /// under another name in the report), and the experiments that have one, as the
    /// registry's `cpu_size` flags declared them before the sizes were data.
    #[test]
    fn cpu_sizes_are_smaller() {
        // Its CPU size is the full size's numbers: a plain CPU run has it follow
        // distill.minilm_sections and quantize that experiment's CPU-size students.
        let same_as_full = ["quant.distill_plus_quant"];
        let mut with_cpu = Vec::new();
        for e in EXPERIMENTS.iter().filter(|e| e.sizes.has_cpu()) {
            with_cpu.push(e.id);
            let cpu = e.sizes.counts_at(Size::Cpu, false);
            let full = e.sizes.counts_at(Size::Full, false);
            assert_eq!(cpu == full, same_as_full.contains(&e.id), "{}", e.id);
        }
        assert_eq!(
            with_cpu,
            [
                "peft.minilm_sections",
                "distill.minilm_sections",
                "continual.split_digits",
                "continual.permuted_digits",
                "continual.minilm_sections",
                "quant.qlora",
                "quant.distill_plus_quant",
                "peft.smollm2_mixed_adapters",
                "peft.smollm2_summaries",
                "peft.smollm2_summaries_dev",
                "distill.smollm2_text",
                "distill.smollm2_text_dev",
            ]
        );
    }

    /// The size a run gives an experiment, and the numbers it reads there.
    #[test]
    fn sizes_are_chosen_by_run_and_device() {
        // (quick, full, has_cpu) -> size; `--quick --full` is refused by the runner, and
        // a CUDA run is full-sized.
        assert_eq!(Size::of(true, false, true), Size::Quick);
        assert_eq!(Size::of(true, true, true), Size::Quick);
        assert_eq!(Size::of(false, false, true), Size::Cpu);
        assert_eq!(Size::of(false, false, false), Size::Full);
        assert_eq!(Size::of(false, true, true), Size::Full);
        let s = Sizes {
            quick: 1,
            cpu: Some(2),
            full: 3,
            cuda: OnCuda {
                quick: Some(4),
                full: Some(5),
            },
        };
        assert_eq!(*s.at(Size::Quick, false), 1);
        assert_eq!(*s.at(Size::Quick, true), 4);
        assert_eq!(*s.at(Size::Cpu, false), 2);
        assert_eq!(*s.at(Size::Full, false), 3);
        assert_eq!(*s.at(Size::Full, true), 5);
        let plain = Sizes {
            quick: 1,
            cpu: None,
            full: 3,
            cuda: OnCuda::SAME,
        };
        assert_eq!(*plain.at(Size::Quick, true), 1);
        assert_eq!(*plain.at(Size::Full, true), 3);
        assert_eq!(Seeds::First(1).of(&[0, 1, 2]), &[0]);
        assert_eq!(Seeds::All.of(&[0, 1, 2]), &[0, 1, 2]);
    }
}
