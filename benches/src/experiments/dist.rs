//! `dist.lora_step`: reuse's data-parallel LoRA step on 1 and 2 processes against
//! PyTorch DDP (Gloo) on the same batch, machine and thread counts, rounds interleaved.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::ProgressBar;
use reuse_core::data::{Batch, BatchSource};
use reuse_core::models::{Bert, BertClassifier, SentenceEncoder};
use reuse_core::trainer::{StepContext, Technique};
use reuse_core::{Checkpoint, Model, Params, TrainConfig, Trainer};
use reuse_dist::{DataParallel, Launch, ProcessGroup};
use reuse_peft::{LoraConfig, LoraModel};
use reuse_testkit::minilm_dir;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::peft::fixed_batch;
use super::sections;
use super::{insert_spread, median, say, Counts, Ctx, Knobs, Metrics, OnCuda, Outcome, Sizes};
use crate::claims::Claim;

/// Set in a child process of `dist.lora_step` (the bench binary itself, as one rank).
pub const DIST_CHILD: &str = "REUSE_BENCH_DIST_CHILD";

const BATCH: usize = 32;
const LEN: usize = 64;

/// `dist.lora_step`'s sizes: rounds of each side, timed steps and untimed warm-up steps
/// per run.
pub(super) struct LoraStepSizes {
    rounds: usize,
    steps: usize,
    warmup: usize,
}

pub(super) const LORA_STEP_SIZES: Sizes<LoraStepSizes> = Sizes {
    quick: LoraStepSizes {
        rounds: 1,
        steps: 2,
        warmup: 1,
    },
    cpu: None,
    // Three rounds at every size but quick: with two, the CPU run at a0594ba read 1.19x
    // (rounds 1.06-1.24) where three had read 0.90x an hour before on the same machine.
    full: LoraStepSizes {
        rounds: 3,
        steps: 6,
        warmup: 2,
    },
    cuda: OnCuda::SAME,
};

impl Knobs for LoraStepSizes {
    fn counts(&self) -> Counts {
        vec![
            ("rounds", self.rounds),
            ("steps", self.steps),
            ("warmup", self.warmup),
        ]
    }
}

#[derive(Serialize, Deserialize)]
struct ChildSpec {
    batch: PathBuf,
    out: PathBuf,
    steps: usize,
    warmup: usize,
    threads: i64,
    classes: i64,
}

#[derive(Serialize, Deserialize)]
struct ChildResult {
    step_seconds: Vec<f64>,
    trainable: i64,
    gradient_bytes: u64,
    all_reduced_bytes: u64,
    steps: usize,
}

/// The fixed global batch, any rows of it.
struct Fixed {
    ids: Tensor,
    mask: Tensor,
    labels: Tensor,
}

impl BatchSource for Fixed {
    fn len(&self) -> usize {
        self.ids.size()[0] as usize
    }
    fn batch(&self, indices: &[i64], device: Device) -> reuse_core::Result<Batch> {
        let idx = Tensor::from_slice(indices);
        let mask = self.mask.index_select(0, &idx);
        let padded = mask.min().int64_value(&[]) == 0;
        Ok(Batch {
            inputs: self.ids.index_select(0, &idx).to_device(device),
            mask: Some(mask.to_device(device)),
            padded,
            labels: self.labels.index_select(0, &idx).to_device(device),
            indices: indices.to_vec(),
            task_ids: None,
        })
    }
}

/// Records when each optimizer step ends.
#[derive(Default)]
struct StepClock {
    ends: Vec<Instant>,
}

impl Technique for StepClock {
    fn name(&self) -> &str {
        "step_clock"
    }
    fn after_step(&mut self, _p: &Params, _ctx: &StepContext) -> reuse_core::Result<()> {
        self.ends.push(Instant::now());
        Ok(())
    }
}

/// One rank (or the single process) of reuse's side: MiniLM + LoRA r 8 on query/value +
/// the head, trained by core's trainer on the fixed batch; rank 0 writes step times.
pub fn child(spec: &str) -> Result<()> {
    let s: ChildSpec = serde_json::from_str(spec).context("dist child spec")?;
    tch::set_num_threads(s.threads as i32);
    let group = ProcessGroup::from_env()?.map(Arc::new);
    let ck = Checkpoint::load(&s.batch, Device::Cpu)?;
    let data = Fixed {
        ids: ck.tensor("input_ids")?.shallow_clone(),
        mask: ck.tensor("attention_mask")?.shallow_clone(),
        labels: ck.tensor("labels")?.shallow_clone(),
    };
    tch::manual_seed(0);
    let bert = Bert::load(&minilm_dir()?, Device::Cpu, Kind::Float)?;
    let mut lm = LoraModel::new(BertClassifier::new(bert, s.classes));
    let mut c = LoraConfig::new(8, 16.0, &["query", "value"]);
    c.modules_to_save = Some(vec!["classifier".into()]);
    lm.add_adapter("default", c)?;
    let trainable = lm.params().trainable().count() as i64;
    let mut trainer = Trainer::new(TrainConfig {
        max_steps: Some(s.warmup + s.steps),
        batch_size: BATCH,
        lr: 1e-3,
        weight_decay: 0.01,
        log_every: 1000,
        ..Default::default()
    });
    let mut clock = StepClock::default();
    let start = Instant::now();
    let (gradient_bytes, all_reduced) = match &group {
        Some(g) => {
            let mut dp = DataParallel::new(g.clone());
            let shard = dp.shard(&data);
            trainer.fit(&lm, &shard, None, &mut [&mut dp, &mut clock])?;
            (dp.gradient_bytes(), g.all_reduced_bytes())
        }
        None => {
            trainer.fit(&lm, &data, None, &mut [&mut clock])?;
            (0, 0)
        }
    };
    let mut prev = start;
    let mut secs = Vec::new();
    for (i, t) in clock.ends.iter().enumerate() {
        if i >= s.warmup {
            secs.push(t.duration_since(prev).as_secs_f64());
        }
        prev = *t;
    }
    if group.as_ref().is_none_or(|g| g.is_main()) {
        let r = ChildResult {
            step_seconds: secs,
            trainable,
            gradient_bytes,
            all_reduced_bytes: all_reduced,
            steps: s.warmup + s.steps,
        };
        std::fs::write(&s.out, serde_json::to_string(&r)?)?;
    }
    Ok(())
}

fn read_json<T: for<'de> Deserialize<'de>>(p: &Path) -> Result<T> {
    serde_json::from_slice(&std::fs::read(p).with_context(|| format!("reading {}", p.display()))?)
        .with_context(|| format!("parsing {}", p.display()))
}

#[derive(Deserialize)]
struct TorchResult {
    step_seconds: Vec<f64>,
    trainable: i64,
}

/// reuse on 1 process (2 threads) and 2 processes (1 thread each, 16 examples each)
/// against PyTorch DDP on Gloo, same global batch of 32 x 64 tokens.
pub fn lora_step(ctx: &Ctx, bar: &ProgressBar) -> Result<Outcome> {
    // torchrun is the .venv's, and runs its python.
    if ctx.python().is_none() {
        bail!("no .venv python: run `cargo xtask setup`");
    }
    let torchrun = ctx.root.join(".venv/bin/torchrun");
    if !torchrun.exists() {
        bail!("no {}: run `cargo xtask setup`", torchrun.display());
    }
    let dir = minilm_dir()?;
    let splits = sections()?;
    let enc = SentenceEncoder::load(&dir, Device::Cpu, Kind::Float)?;
    let (ids, mask) = fixed_batch(&enc, &splits, BATCH, LEN)?;
    let labels = Tensor::from_slice(&splits.train.labels[..BATCH]);
    let classes = splits.classes.len() as i64;
    let work = ctx.report_dir().join("dist");
    std::fs::create_dir_all(&work)?;
    let batch = work.join("batch.safetensors");
    let mut ck = Checkpoint::new();
    ck.insert("input_ids", ids)
        .insert("attention_mask", mask)
        .insert("labels", labels);
    ck.save(&batch)?;
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let &LoraStepSizes {
        rounds,
        steps,
        warmup,
    } = ctx.sizes(&LORA_STEP_SIZES);
    let exe = std::env::current_exe()?;
    let out = work.join("result.json");

    let run_reuse = |nproc: usize| -> Result<ChildResult> {
        let _ = std::fs::remove_file(&out);
        let spec = ChildSpec {
            batch: batch.clone(),
            out: out.clone(),
            steps,
            warmup,
            threads: (cores / nproc).max(1) as i64,
            classes,
        };
        let spec = serde_json::to_string(&spec)?;
        if nproc == 1 {
            let st = Command::new(&exe)
                .env(DIST_CHILD, &spec)
                .env("OMP_NUM_THREADS", cores.to_string())
                .status()?;
            if !st.success() {
                bail!("reuse 1-process child failed: {st}");
            }
        } else {
            let mut l = Launch::new(nproc);
            l.threads_per_rank = Some((cores / nproc).max(1));
            l.env.push((DIST_CHILD.into(), spec));
            let code = l.run(&exe.clone().into_os_string(), &[])?;
            if code != 0 {
                bail!("reuse {nproc}-process run failed with exit code {code}");
            }
        }
        read_json(&out)
    };
    let run_torch = |nproc: usize| -> Result<TorchResult> {
        let _ = std::fs::remove_file(&out);
        let o = Command::new(&torchrun)
            .args(["--standalone", "--nproc_per_node", &nproc.to_string()])
            .arg(ctx.root.join("benches/python/ddp_lora.py"))
            .args([
                "--model".as_ref(),
                dir.as_os_str(),
                "--batch".as_ref(),
                batch.as_os_str(),
            ])
            .args(["--threads", &(cores / nproc).max(1).to_string()])
            .args([
                "--steps",
                &steps.to_string(),
                "--warmup",
                &warmup.to_string(),
            ])
            .args(["--classes", &classes.to_string()])
            .arg("--out")
            .arg(&out)
            .env("HF_HUB_OFFLINE", "1")
            .env("OMP_NUM_THREADS", (cores / nproc).max(1).to_string())
            .env("PYTHONPATH", "")
            .output()
            .context("running torchrun benches/python/ddp_lora.py")?;
        if !o.status.success() {
            bail!(
                "PyTorch DDP ({nproc} processes) failed: {}",
                String::from_utf8_lossy(&o.stderr)
                    .lines()
                    .rev()
                    .take(5)
                    .collect::<Vec<_>>()
                    .join(" | ")
            );
        }
        read_json(&out)
    };

    // Four arms per round, in an order that rotates, so every arm sees every position.
    let arms = ["reuse_1p", "reuse_2p", "torch_ddp_1p", "torch_ddp_2p"];
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); 4];
    let mut round_medians: Vec<Vec<f64>> = vec![Vec::new(); 4];
    let mut reuse_2p: Option<ChildResult> = None;
    let mut torch_trainable = 0;
    for round in 0..rounds {
        for k in 0..4 {
            let arm = (k + round) % 4;
            bar.set_message(format!("dist.lora_step round {round} {}", arms[arm]));
            let secs = match arm {
                0 => run_reuse(1)?.step_seconds,
                1 => {
                    let r = run_reuse(2)?;
                    let s = r.step_seconds.clone();
                    reuse_2p = Some(r);
                    s
                }
                2 => run_torch(1)?.step_seconds,
                _ => {
                    let r = run_torch(2)?;
                    torch_trainable = r.trainable;
                    r.step_seconds
                }
            };
            let ms: Vec<f64> = secs.iter().map(|s| s * 1e3).collect();
            round_medians[arm].push(median(&ms));
            samples[arm].extend(ms);
        }
        say(
            bar,
            format!(
                "dist.lora_step round {round}: median ms/step {}",
                arms.iter()
                    .zip(&round_medians)
                    .map(|(a, v)| format!("{a} {:.0}", v.last().copied().unwrap_or(f64::NAN)))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
    }
    let r2 = reuse_2p.context("no 2-process reuse run")?;
    let mut m = Metrics::new();
    for (a, s) in arms.iter().zip(&samples) {
        insert_spread(&mut m, &format!("{a}_step_ms"), s);
    }
    let ratios: Vec<f64> = round_medians[1]
        .iter()
        .zip(&round_medians[3])
        .map(|(a, b)| a / b)
        .collect();
    insert_spread(&mut m, "round_ratio_2p_reuse_over_torch", &ratios);
    m.insert(
        "ratio_2p_reuse_over_torch".into(),
        median(&samples[1]) / median(&samples[3]),
    );
    m.insert(
        "ratio_1p_reuse_over_torch".into(),
        median(&samples[0]) / median(&samples[2]),
    );
    m.insert(
        "speedup_2p_over_1p_reuse".into(),
        median(&samples[0]) / median(&samples[1]),
    );
    m.insert(
        "speedup_2p_over_1p_torch".into(),
        median(&samples[2]) / median(&samples[3]),
    );
    let per_step = r2.gradient_bytes as f64 / r2.steps as f64;
    m.insert("gradient_bytes_per_step".into(), per_step);
    m.insert("trainable_bytes".into(), (r2.trainable * 4) as f64);
    m.insert(
        "allreduce_is_exactly_trainable".into(),
        f64::from(per_step == (r2.trainable * 4) as f64),
    );
    m.insert(
        "all_reduced_bytes_per_step".into(),
        r2.all_reduced_bytes as f64 / r2.steps as f64,
    );
    m.insert("trainable_params".into(), r2.trainable as f64);
    m.insert("torch_trainable_params".into(), torch_trainable as f64);
    m.insert("rounds".into(), rounds as f64);
    m.insert("cores".into(), cores as f64);
    Ok(Outcome {
        metrics: m,
        notes: vec![
            format!(
                "Each sample is one optimizer step of MiniLM + LoRA (r 8, alpha 16 on \
                 query/value) + an {classes}-way head (modules_to_save), AdamW lr 1e-3, on one \
                 global batch of {BATCH} sections texts x {LEN} tokens, after {warmup} warm-up \
                 steps; {steps} steps per run, {rounds} round(s) of four runs (each a fresh \
                 launch) in an order that rotates per round. `reuse_1p`: one process with \
                 {cores} threads, core's trainer. `reuse_2p`: `reuse_dist::Launch` starts 2 \
                 ranks of this binary, {} thread(s) each, DataParallel over c10d Gloo, 16 \
                 examples per rank. `torch_ddp_*`: benches/python/ddp_lora.py under torchrun, \
                 DistributedDataParallel on Gloo, same threads, batch, model and optimizer.",
                (cores / 2).max(1)
            ),
            "reuse's step is timed between the ends of consecutive trainer steps (batch \
             building, forward, backward, gradient all-reduce, AdamW, the reduced loss); \
             PyTorch's from before forward to after the optimizer step and `loss.item()`."
                .into(),
            "What 1 against 2 processes shows on this machine: both arms use the same cores \
             (2 threads in one process, or 1 thread in each of 2), so this is not scaling; \
             it shows the cost of the data-parallel machinery (sharding, one all-reduce of \
             the adapter's gradients per step over loopback) against intra-op threading on \
             the same hardware."
                .into(),
            "`gradient_bytes_per_step` is what DataParallel all-reduced per step (f32 \
             gradients of the trainable parameters only: the frozen base is never sent); \
             `all_reduced_bytes_per_step` adds the 4-byte per-tensor flags and the 4-byte \
             reduced loss; the one-off start-of-run agreement check is spread over the steps."
                .into(),
            "No NCCL run: the c10d shim binds Gloo only (the torch wheel ships \
             ProcessGroupNCCL's header and NCCL's, but this build does not compile that \
             path), and this experiment always runs on the CPU."
                .into(),
        ],
    })
}

/// The claims-table rows this file's experiments measure (see `crate::claims`).
pub const CLAIMS: &[Claim] = &[Claim {
    text: "Peer: data-parallel LoRA step on 2 processes, reuse / PyTorch DDP (Gloo)",
    experiment: "dist.lora_step",
    target: "<= 1 (no slower)",
    keys: &[
        "ratio_2p_reuse_over_torch",
        "round_ratio_2p_reuse_over_torch_min",
        "round_ratio_2p_reuse_over_torch_max",
    ],
    eval: |g| {
        let r = g("ratio_2p_reuse_over_torch");
        (
            format!("{r:.3}"),
            format!(
                "per round {:.2}-{:.2}",
                g("round_ratio_2p_reuse_over_torch_min"),
                g("round_ratio_2p_reuse_over_torch_max")
            ),
            Some(r <= 1.0),
        )
    },
}];
