//! Supervised fine-tuning of SmolLM2-135M-Instruct on the AppStream summaries fixture
//! (`peft.smollm2_summaries`): zero-shot, LoRA, full fine-tuning and QLoRA on the GGUF's
//! Q4_1 codes in reuse, and LoRA in PyTorch + PEFT on the same batches, each run in a
//! process of its own (so each peak RSS is its own), arms rotating per seed. Scored by
//! test response NLL and ROUGE-L F1 of greedy summaries.
//!
//! `peft.smollm2_summaries_dev` is the dev-only sweep that chose the learning rates.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use indicatif::ProgressBar;
use reuse_core::data::labelled::{load_records, RecordOptions};
use reuse_core::data::lm::PromptResponse;
use reuse_core::data::{epoch_batches, Batch};
use reuse_core::models::llama::{GenerateOptions, Sampling};
use reuse_core::models::lm::LanguageModel;
use reuse_core::models::LoadOptions;
use reuse_core::params::Params;
use reuse_core::trainer::{evaluate, StepContext, Technique};
use reuse_core::{Evaluation, Model, Schedule, TrainConfig, Trainer};
use reuse_peft::config::TargetModules;
use reuse_peft::{LoraConfig, LoraModel};
use tch::{Device, Kind};

use super::{insert_spread, mean, median, sample_sd, say, Counts, Ctx, Knobs, Metrics};
use super::{OnCuda, Outcome, Sizes};
use crate::claims::Claim;

/// The issue's instruction, rendered through the model's chat template as the user turn.
pub const INSTRUCTION: &str = "Write a one-line summary, under 12 words, of this software:\n\n";
/// The fixture, under `fixtures/`.
const FIXTURE: &str = "appstream_summaries/summaries.jsonl.gz";
/// Longest reference summary kept, in tokens (the issue's reference run: answer ≤ 40).
const MAX_ANSWER: usize = 40;
/// LoRA's rank, alpha and dropout: r 4 on every linear of the blocks is 0.91% of the
/// weights (r 8, the issue's reference peer, is 1.8%).
const R: i64 = 4;
const ALPHA: f64 = 8.0;
const DROPOUT: f64 = 0.05;
/// Greedy summaries: at most this many new tokens (the issue's 24).
const NEW_TOKENS: usize = 24;
/// Batch of the NLL evaluation and of generation.
const EVAL_BATCH: usize = 16;
/// Learning rates chosen on dev by `peft.smollm2_summaries_dev` (see
/// benches/sweeps/smollm2_summaries_dev.md): LoRA (reuse's, PEFT's and QLoRA's) and
/// full fine-tuning.
const LORA_LR: f64 = 4e-3;
const FULL_LR: f64 = 1e-4;

/// `peft.smollm2_summaries`' sizes.
pub(super) struct SumSizes {
    /// Optimizer steps of every trained arm.
    steps: usize,
    batch: usize,
    /// Examples whose chat-rendered prompt is longer are left out of every split.
    max_prompt: usize,
    /// Test examples scored and summarised (the first of the test split, file order).
    test: usize,
}

impl Knobs for SumSizes {
    fn counts(&self) -> Counts {
        vec![
            ("steps", self.steps),
            ("batch", self.batch),
            ("max_prompt", self.max_prompt),
            ("test", self.test),
        ]
    }
}

pub(super) const SUMMARIES_SIZES: Sizes<SumSizes> = Sizes {
    quick: SumSizes {
        steps: 2,
        batch: 2,
        max_prompt: 96,
        test: 4,
    },
    cpu: Some(SumSizes {
        steps: 8,
        batch: 4,
        max_prompt: 128,
        test: 32,
    }),
    full: SumSizes {
        steps: 100,
        batch: 8,
        max_prompt: 200,
        test: 96,
    },
    cuda: OnCuda {
        quick: None,
        full: Some(SumSizes {
            steps: 300,
            batch: 8,
            max_prompt: 200,
            test: 154,
        }),
    },
};

/// The environment variable that makes the bench binary one arm's child run.
pub const SFT_CHILD: &str = "REUSE_BENCH_SFT_CHILD";

/// Examples as `(ids, prompt_len)`.
type Rows = Vec<(Vec<i64>, usize)>;

/// The token ids both sides train and score on (written once per run as JSON).
#[derive(serde::Serialize, serde::Deserialize)]
struct SftData {
    /// `(ids, prompt_len)` per example.
    train: Vec<(Vec<i64>, usize)>,
    dev: Vec<(Vec<i64>, usize)>,
    test: Vec<(Vec<i64>, usize)>,
    pad: i64,
    stop: Vec<i64>,
}

/// One arm's child run.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
struct ArmRun {
    /// `zero_shot`, `lora`, `full`, `qlora` (reuse) or `peft` (Python).
    arm: String,
    data: PathBuf,
    seed: u64,
    steps: usize,
    batch: usize,
    lr: f64,
    /// `test` or `dev`: which split is scored and summarised.
    split: String,
    /// Examples of that split scored (NLL) and, when `generate`, summarised.
    eval: usize,
    generate: bool,
    /// The batches the trainer draws (`epoch_batches`), for the Python side to replay.
    order: Vec<Vec<i64>>,
    cuda: bool,
}

/// What a child prints on its last stdout line.
#[derive(serde::Serialize, serde::Deserialize)]
struct ArmResult {
    load_rss_mb: f64,
    peak_rss_mb: f64,
    step_ms: Vec<f64>,
    nll: f64,
    /// New tokens of each summary (stop token included where one came).
    tokens: Vec<Vec<i64>>,
    trainable: i64,
    parameters: i64,
    losses: Vec<f64>,
}

/// Records each step's start (after its batch is built) and end, and the batch drawn.
#[derive(Default)]
pub(super) struct Clock {
    pub(super) starts: Vec<Instant>,
    pub(super) ends: Vec<Instant>,
    pub(super) batches: Vec<Vec<i64>>,
}

impl Clock {
    /// Milliseconds of each step, from its batch on the device to the end of its update.
    pub(super) fn step_ms(&self) -> Vec<f64> {
        self.starts
            .iter()
            .zip(&self.ends)
            .map(|(s, e)| e.duration_since(*s).as_secs_f64() * 1e3)
            .collect()
    }
}

impl Technique for Clock {
    fn name(&self) -> &str {
        "clock"
    }
    fn rewrite_batch(&mut self, batch: Batch, _ctx: &StepContext) -> reuse_core::Result<Batch> {
        self.batches.push(batch.indices.clone());
        self.starts.push(Instant::now());
        Ok(batch)
    }
    fn after_step(&mut self, _p: &Params, _ctx: &StepContext) -> reuse_core::Result<()> {
        self.ends.push(Instant::now());
        Ok(())
    }
}

/// The batches `Trainer::fit` draws for `steps` steps of `batch` from `n` examples.
fn order(n: usize, batch: usize, steps: usize, seed: u64) -> Result<Vec<Vec<i64>>> {
    ensure!(n > 0 && batch > 0, "no training examples");
    let mut out = Vec::with_capacity(steps);
    let mut epoch = 0;
    while out.len() < steps {
        let b = epoch_batches(n, batch, Some(seed), epoch);
        out.extend(b.into_iter().take(steps - out.len()));
        epoch += 1;
    }
    Ok(out)
}

fn nll(model: &dyn reuse_core::Trainable, data: &PromptResponse, device: Device) -> Result<f64> {
    match evaluate(model, data, EVAL_BATCH, device)? {
        Evaluation::TokenNll { nll, .. } => Ok(nll),
        other => bail!("expected a token NLL, got {other:?}"),
    }
}

/// The child side (reuse's arms): load the GGUF (f32, or its codes kept for QLoRA),
/// train `steps` steps with core's trainer, score and summarise the chosen split.
pub fn child(spec: &str) -> Result<()> {
    let run: ArmRun = serde_json::from_str(spec).context("peft.smollm2_summaries child spec")?;
    let device = if run.cuda {
        Device::Cuda(0)
    } else {
        Device::Cpu
    };
    let data: SftData = serde_json::from_slice(&std::fs::read(&run.data)?)
        .with_context(|| format!("reading {}", run.data.display()))?;
    let mut opts = LoadOptions::new(device, Kind::Float);
    if run.arm == "qlora" {
        opts = opts.keep_codes();
    }
    let lm = LanguageModel::load(&reuse_testkit::smollm2_gguf(), &opts)?;
    let parameters = lm.model.params().count() as i64;
    let split = match run.split.as_str() {
        "test" => &data.test,
        "dev" => &data.dev,
        s => bail!("unknown split {s}"),
    };
    let eval_rows: Vec<(Vec<i64>, usize)> = split.iter().take(run.eval).cloned().collect();
    let prompts: Vec<Vec<i64>> = eval_rows
        .iter()
        .map(|(ids, p)| ids[..*p].to_vec())
        .collect();
    let eval_data = PromptResponse::from_ids(eval_rows, data.pad, usize::MAX)?;
    let train = PromptResponse::from_ids(data.train.clone(), data.pad, usize::MAX)?;
    let load_rss_mb = super::peft::peak_rss_mb();
    let LanguageModel { model, .. } = lm;
    let config = |steps: usize| TrainConfig {
        max_steps: Some(steps),
        batch_size: run.batch,
        lr: run.lr,
        weight_decay: 0.0,
        schedule: Schedule::Linear { warmup: steps / 10 },
        seed: run.seed,
        device,
        progress: false,
        ..Default::default()
    };
    tch::manual_seed(run.seed as i64);
    let mut clock = Clock::default();
    let mut losses = Vec::new();
    let (model, trainable, score) = match run.arm.as_str() {
        "zero_shot" => {
            let s = nll(&model, &eval_data, device)?;
            (model, 0, s)
        }
        "full" => {
            let trainable = parameters;
            let mut t = Trainer::new(config(run.steps));
            let r = t.fit(&model, &train, None, &mut [&mut clock])?;
            losses = r.losses;
            let s = nll(&model, &eval_data, device)?;
            (model, trainable, s)
        }
        "lora" | "qlora" => {
            let mut cfg = LoraConfig::new(R, ALPHA, &[]);
            cfg.target_modules = Some(TargetModules::List(vec!["all-linear".into()]));
            cfg.lora_dropout = DROPOUT;
            cfg.task_type = Some("CAUSAL_LM".into());
            let mut peft = LoraModel::new(model);
            peft.add_adapter("default", cfg)?;
            let trainable = peft.trainable_parameters().count() as i64;
            let mut t = Trainer::new(config(run.steps));
            let r = t.fit(&peft, &train, None, &mut [&mut clock])?;
            losses = r.losses;
            let s = nll(&peft, &eval_data, device)?;
            (peft.into_inner(), trainable, s)
        }
        a => bail!("unknown arm {a}"),
    };
    ensure!(
        clock.batches == run.order,
        "the trainer drew other batches than the order given to the Python side"
    );
    let step_ms = clock.step_ms();
    let mut tokens = Vec::new();
    if run.generate {
        let g = GenerateOptions {
            max_new_tokens: NEW_TOKENS,
            sampling: Sampling::Greedy,
            stop_tokens: data.stop.clone(),
        };
        for chunk in prompts.chunks(EVAL_BATCH) {
            tokens.extend(model.generate(chunk, &g, &mut |_, _| {})?.tokens);
        }
    }
    let r = ArmResult {
        load_rss_mb,
        peak_rss_mb: super::peft::peak_rss_mb(),
        step_ms,
        nll: score,
        tokens,
        trainable,
        parameters,
        losses,
    };
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}

/// The fixture's pairs as chat exchanges of the model's template, the instruction in
/// the user turn; examples with a prompt over `max_prompt` tokens or an answer over
/// [`MAX_ANSWER`] left out. Also the kept test and dev references, in order.
fn build_data(
    lm: &LanguageModel,
    max_prompt: usize,
) -> Result<(SftData, Vec<String>, Vec<String>)> {
    let path = reuse_testkit::fixtures_dir().join(FIXTURE);
    let mut opts = RecordOptions::new(&["description", "summary"]);
    opts.split_column = Some("split".into());
    let splits =
        load_records(&path, &opts).with_context(|| format!("reading {}", path.display()))?;
    let chat = lm
        .chat
        .as_ref()
        .context("SmolLM2's GGUF has no chat template")?;
    let make = |rows: &[Vec<String>]| -> Result<(Rows, Vec<String>)> {
        let mut out = (Vec::new(), Vec::new());
        for r in rows {
            let (ids, p) = chat.exchange(
                &lm.tokenizer,
                None,
                &format!("{INSTRUCTION}{}", r[0]),
                &r[1],
            )?;
            if p <= max_prompt && ids.len() - p <= MAX_ANSWER {
                out.0.push((ids, p));
                out.1.push(r[1].clone());
            }
        }
        Ok(out)
    };
    let (train, _) = make(&splits.train)?;
    let (dev, dev_refs) = make(&splits.dev)?;
    let (test, test_refs) = make(&splits.test)?;
    let eos = lm.stop_tokens.first().copied().unwrap_or(2);
    let pad = lm.model.config.pad_token_id().unwrap_or(eos);
    Ok((
        SftData {
            train,
            dev,
            test,
            pad,
            stop: lm.stop_tokens.clone(),
        },
        test_refs,
        dev_refs,
    ))
}

/// Runs one arm in a process of its own: the bench binary for reuse's arms,
/// benches/python/peft_sft.py for PEFT's.
fn run_arm(ctx: &Ctx, run: &ArmRun) -> Result<ArmResult> {
    let spec = serde_json::to_string(run)?;
    let o = if run.arm == "peft" {
        let py = ctx
            .python()
            .context("the PEFT arm needs .venv (run `cargo xtask setup`)")?;
        let spec_file = ctx.report_dir().join("smollm2_summaries_peft_spec.json");
        std::fs::write(&spec_file, &spec)?;
        Command::new(py)
            .arg(ctx.root.join("benches/python/peft_sft.py"))
            .args(["--model".as_ref(), hf_folder(ctx).as_os_str()])
            .args(["--spec".as_ref(), spec_file.as_os_str()])
            .args(["--threads", &tch::get_num_threads().to_string()])
            .args(["--r", &R.to_string(), "--alpha", &ALPHA.to_string()])
            .args(["--dropout", &DROPOUT.to_string()])
            .args(["--new-tokens", &NEW_TOKENS.to_string()])
            .args(["--eval-batch", &EVAL_BATCH.to_string()])
            .output()
            .context("starting benches/python/peft_sft.py")?
    } else {
        Command::new(std::env::current_exe()?)
            .env(SFT_CHILD, spec)
            .output()
            .context("starting a peft.smollm2_summaries child run")?
    };
    let stdout = String::from_utf8_lossy(&o.stdout);
    ensure!(
        o.status.success(),
        "peft.smollm2_summaries arm {} (seed {}) failed: {}",
        run.arm,
        run.seed,
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .with_context(|| format!("arm {} output: {stdout}", run.arm))
}

/// Summaries as text (up to the first stop token, special tokens dropped) and their
/// mean ROUGE-L F1 against the references.
fn rouge(
    lm: &LanguageModel,
    stop: &[i64],
    tokens: &[Vec<i64>],
    refs: &[String],
) -> Result<(f64, Vec<String>)> {
    let mut texts = Vec::with_capacity(tokens.len());
    for t in tokens {
        let end = t.iter().position(|x| stop.contains(x)).unwrap_or(t.len());
        let ids: Vec<u32> = t[..end].iter().map(|&x| x as u32).collect();
        let text = lm
            .tokenizer
            .decode(&ids, true)
            .map_err(|e| anyhow::anyhow!("decoding a summary: {e}"))?;
        texts.push(text.trim().to_string());
    }
    let scores: Vec<f64> = texts
        .iter()
        .zip(refs)
        .map(|(p, r)| super::rouge::rouge_l(r, p))
        .collect();
    Ok((mean(&scores), texts))
}

/// Where the parent writes the GGUF as a Hugging Face folder (f32, dequantized as reuse
/// loads it) for the PEFT arm: transformers loads that folder with the GGUF's logits
/// (`crates/reuse-cli/tests/lm.rs`), in seconds rather than the half minute its own
/// GGUF dequantization takes.
fn hf_folder(ctx: &Ctx) -> PathBuf {
    ctx.report_dir().join("smollm2_summaries_hf")
}

fn data_file(ctx: &Ctx, data: &SftData) -> Result<PathBuf> {
    let dir = ctx.report_dir();
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("smollm2_summaries_data.json");
    std::fs::write(&path, serde_json::to_vec(data)?)?;
    Ok(path)
}

/// The model on the parent's side: its tokenizer and chat template build the data and
/// decode every arm's summaries.
fn load_tokenizer_side() -> Result<LanguageModel> {
    let path = reuse_testkit::smollm2_gguf();
    ensure!(
        path.is_file(),
        "{} is absent: run `cargo xtask setup` (or set REUSE_SMOLLM2_GGUF)",
        path.display()
    );
    Ok(LanguageModel::load(
        &path,
        &LoadOptions::new(Device::Cpu, Kind::Float),
    )?)
}

/// The arms of one seed, rotated by the seed so no arm always runs first.
const TRAINED: [&str; 4] = ["lora", "peft", "qlora", "full"];

/// The experiment: zero-shot once, then per seed the four trained arms in rotation;
/// test NLL, ROUGE-L, step time and peak RSS per arm.
pub fn smollm2_summaries(ctx: &Ctx, bar: &ProgressBar) -> Result<Outcome> {
    let s = ctx.sizes(&SUMMARIES_SIZES);
    let lm = load_tokenizer_side()?;
    let (data, test_refs, _) = build_data(&lm, s.max_prompt)?;
    let n_test = s.test.min(data.test.len());
    let refs = &test_refs[..n_test];
    let file = data_file(ctx, &data)?;
    lm.save_folder(&hf_folder(ctx), true)
        .context("writing the model folder for the PEFT arm")?;
    let base = |arm: &str, seed: u64, lr: f64| -> Result<ArmRun> {
        Ok(ArmRun {
            arm: arm.into(),
            data: file.clone(),
            seed,
            steps: if arm == "zero_shot" { 0 } else { s.steps },
            batch: s.batch,
            lr,
            split: "test".into(),
            eval: n_test,
            generate: true,
            order: if arm == "zero_shot" {
                Vec::new()
            } else {
                order(data.train.len(), s.batch, s.steps, seed)?
            },
            cuda: ctx.device.is_cuda(),
        })
    };
    let mut results: BTreeMap<String, Vec<ArmResult>> = BTreeMap::new();
    let mut samples: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut rouges: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    bar.set_message("peft.smollm2_summaries: zero-shot");
    let z = run_arm(ctx, &base("zero_shot", 0, 0.0)?)?;
    let (rz, texts) = rouge(&lm, &data.stop, &z.tokens, refs)?;
    rouges.entry("zero_shot".into()).or_default().push(rz);
    samples.insert("zero_shot".into(), texts);
    results.entry("zero_shot".into()).or_default().push(z);
    for (k, &seed) in ctx.seeds.iter().enumerate() {
        for j in 0..TRAINED.len() {
            let arm = TRAINED[(j + k) % TRAINED.len()];
            bar.set_message(format!("peft.smollm2_summaries seed {seed}: {arm}"));
            let lr = if arm == "full" { FULL_LR } else { LORA_LR };
            let start = Instant::now();
            let r = run_arm(ctx, &base(arm, seed, lr)?)?;
            let (rl, texts) = rouge(&lm, &data.stop, &r.tokens, refs)?;
            say(
                bar,
                format!(
                    "peft.smollm2_summaries seed {seed} {arm}: ROUGE-L {rl:.4}, test NLL {:.4}, {:.0} ms/step, peak RSS {:.0} MB ({:.0} s)",
                    r.nll,
                    median(&r.step_ms),
                    r.peak_rss_mb,
                    start.elapsed().as_secs_f64()
                ),
            );
            rouges.entry(arm.into()).or_default().push(rl);
            samples.entry(arm.into()).or_insert(texts);
            results.entry(arm.into()).or_default().push(r);
        }
    }
    let mut m = Metrics::from([
        ("train_examples".into(), data.train.len() as f64),
        ("test_examples".into(), n_test as f64),
        ("steps".into(), s.steps as f64),
        ("batch".into(), s.batch as f64),
        ("lora_lr".into(), LORA_LR),
        ("full_lr".into(), FULL_LR),
    ]);
    let parameters = results["zero_shot"][0].parameters as f64;
    for (arm, rs) in &results {
        let rl = &rouges[arm];
        m.insert(format!("{arm}.rouge_l_mean"), mean(rl));
        m.insert(format!("{arm}.rouge_l_sd"), sample_sd(rl));
        let nlls: Vec<f64> = rs.iter().map(|r| r.nll).collect();
        m.insert(format!("{arm}.test_nll_mean"), mean(&nlls));
        m.insert(format!("{arm}.test_nll_sd"), sample_sd(&nlls));
        let peaks: Vec<f64> = rs.iter().map(|r| r.peak_rss_mb).collect();
        m.insert(format!("{arm}.peak_rss_mb_mean"), mean(&peaks));
        let loads: Vec<f64> = rs.iter().map(|r| r.load_rss_mb).collect();
        m.insert(format!("{arm}.load_rss_mb_mean"), mean(&loads));
        m.insert(format!("{arm}.trainable"), rs[0].trainable as f64);
        m.insert(
            format!("{arm}.trainable_share"),
            rs[0].trainable as f64 / parameters,
        );
        if arm != "zero_shot" {
            // Steps after the first (warm-up: first-touch allocation) of every seed.
            let steps: Vec<f64> = rs
                .iter()
                .flat_map(|r| r.step_ms.iter().skip(1).copied())
                .collect();
            insert_spread(&mut m, &format!("{arm}.step_ms"), &steps);
            let last: Vec<f64> = rs.iter().filter_map(|r| r.losses.last().copied()).collect();
            m.insert(format!("{arm}.final_train_loss_mean"), mean(&last));
        }
    }
    let per_seed = |a: &str, b: &str, f: &dyn Fn(&ArmResult) -> f64| -> Vec<f64> {
        results[a]
            .iter()
            .zip(&results[b])
            .map(|(x, y)| f(x) / f(y))
            .collect()
    };
    let step = |r: &ArmResult| median(&r.step_ms[1.min(r.step_ms.len())..]);
    insert_spread(
        &mut m,
        "lora_over_peft_step_time",
        &per_seed("lora", "peft", &step),
    );
    insert_spread(
        &mut m,
        "qlora_over_lora_peak_rss",
        &per_seed("qlora", "lora", &|r| r.peak_rss_mb),
    );
    let ratio: Vec<f64> = rouges["lora"]
        .iter()
        .zip(&rouges["full"])
        .map(|(a, b)| a / b)
        .collect();
    insert_spread(&mut m, "lora_over_full_rouge_l", &ratio);
    let show: Vec<String> = samples
        .iter()
        .map(|(arm, t)| {
            format!(
                "{arm}: {}",
                t.iter()
                    .take(3)
                    .map(|x| format!("\"{x}\""))
                    .collect::<Vec<_>>()
                    .join(" | ")
            )
        })
        .collect();
    Ok(Outcome {
        metrics: m,
        notes: vec![
            format!(
                "SmolLM2-135M-Instruct from its GGUF. Data: the appstream_summaries fixture, each pair \
                 rendered through the model's chat template with the user message \"{}<description>\" \
                 and the summary as the assistant's reply (loss on the reply's tokens only); examples \
                 whose prompt is over {} tokens or whose reply is over {MAX_ANSWER} are left out: {} \
                 train; the first {n_test} test examples (file order) scored and summarised. Arms, \
                 each a process of its own (peak RSS = its VmHWM / ru_maxrss): `zero_shot` (the \
                 instruct model as it is); `lora` (reuse, r {R}, alpha {ALPHA}, dropout {DROPOUT}, \
                 all-linear, f32 base dequantized from the GGUF); `qlora` (the same LoRA on the \
                 GGUF's Q4_1 codes kept as weight storage, f32 activations, the weight rebuilt in \
                 backward); `full` (every weight, f32); `peft` (PyTorch + PEFT {R}/{ALPHA}/{DROPOUT} \
                 all-linear on transformers' f32 load of the same weights, the GGUF written once as a \
                 Hugging Face folder by reuse's `convert` path, the same batches in the same \
                 order, benches/python/peft_sft.py). Each trained arm: {} steps of batch {}, AdamW \
                 (betas 0.9/0.999, eps 1e-8, no weight decay), linear schedule with 10% warmup, lr \
                 {LORA_LR} for the LoRA arms and {FULL_LR} for full fine-tuning (chosen on dev by \
                 peft.smollm2_summaries_dev, seed 0), per seed {:?}, the arms' order rotating per \
                 seed. Summaries: greedy, at most {NEW_TOKENS} new tokens, stopped at <|im_end|>, \
                 in batches of {EVAL_BATCH}. ROUGE-L: F1 of the word-level LCS after \
                 rouge_score's default tokenizer (lowercased, runs outside [a-z0-9] separate \
                 words, no stemming), reimplemented in benches/src/experiments/rouge.rs, the same \
                 code scoring every arm; mean over the test examples, then mean and sd over seeds. \
                 `step_ms`: every step after each run's first, from the batch on the device to the \
                 optimizer step's end.",
                INSTRUCTION.replace('\n', "\\n"),
                s.max_prompt,
                data.train.len(),
                s.steps,
                s.batch,
                ctx.seeds
            ),
            format!("First summaries per arm (seed {}): {}", ctx.seeds[0], show.join("; ")),
        ],
    })
}

/// Learning rates the dev sweep tries.
const DEV_LORA_LRS: &[f64] = &[5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2];
const DEV_FULL_LRS: &[f64] = &[3e-5, 1e-4, 3e-4];

/// The dev-only sweep behind `peft.smollm2_summaries`' learning rates: reuse's LoRA and
/// full fine-tuning at the CPU size's steps, seed 0, scored by dev response NLL (and dev
/// ROUGE-L); the rule: the lowest dev NLL.
pub fn smollm2_summaries_dev(ctx: &Ctx, bar: &ProgressBar) -> Result<Outcome> {
    let s = ctx.sizes(&SUMMARIES_SIZES);
    let lm = load_tokenizer_side()?;
    let (data, _, dev_refs) = build_data(&lm, s.max_prompt)?;
    let n_dev = s.test.min(data.dev.len());
    let file = data_file(ctx, &data)?;
    let mut m = Metrics::new();
    for (arm, lrs) in [("lora", DEV_LORA_LRS), ("full", DEV_FULL_LRS)] {
        for &lr in lrs {
            bar.set_message(format!("peft.smollm2_summaries_dev: {arm} lr {lr}"));
            let run = ArmRun {
                arm: arm.into(),
                data: file.clone(),
                seed: 0,
                steps: s.steps,
                batch: s.batch,
                lr,
                split: "dev".into(),
                eval: n_dev,
                generate: true,
                order: order(data.train.len(), s.batch, s.steps, 0)?,
                cuda: ctx.device.is_cuda(),
            };
            let r = run_arm(ctx, &run)?;
            let (rl, _) = rouge(&lm, &data.stop, &r.tokens, &dev_refs[..n_dev])?;
            say(
                bar,
                format!(
                    "peft.smollm2_summaries_dev {arm} lr {lr}: dev NLL {:.4}, dev ROUGE-L {rl:.4}",
                    r.nll
                ),
            );
            m.insert(format!("{arm}.lr_{lr:e}.dev_nll"), r.nll);
            m.insert(format!("{arm}.lr_{lr:e}.dev_rouge_l"), rl);
        }
    }
    Ok(Outcome {
        metrics: m,
        notes: vec![format!(
            "Dev sweep (seed 0, the first {n_dev} dev examples) of peft.smollm2_summaries' \
             learning rates at its size ({} steps of batch {}): reuse's LoRA (r {R}, \
             all-linear) and full fine-tuning. Rule fixed before the run: the lowest dev \
             response NLL; PEFT and QLoRA take LoRA's.",
            s.steps, s.batch
        )],
    })
}

/// The claims-table rows of `peft.smollm2_summaries`.
pub const CLAIMS: &[Claim] = &[
    Claim {
        text: "LoRA on SmolLM2 (r 4, all-linear): share of weights trained; ROUGE-L over full fine-tuning's",
        experiment: "peft.smollm2_summaries",
        target: "<= 1%; >= 0.98x",
        keys: &[
            "lora.trainable_share",
            "lora.rouge_l_mean",
            "lora.rouge_l_sd",
            "full.rouge_l_mean",
            "full.rouge_l_sd",
        ],
        eval: |g| {
            let share = g("lora.trainable_share");
            let r = g("lora.rouge_l_mean") / g("full.rouge_l_mean");
            (
                format!("{:.2}%; {r:.3}x", 100.0 * share),
                format!(
                    "ROUGE-L {:.3} ± {:.3} vs {:.3} ± {:.3}",
                    g("lora.rouge_l_mean"),
                    g("lora.rouge_l_sd"),
                    g("full.rouge_l_mean"),
                    g("full.rouge_l_sd")
                ),
                Some(share <= 0.01 && r >= 0.98),
            )
        },
    },
    Claim {
        text: "LoRA on SmolLM2, reuse vs PyTorch + PEFT on the same batches: ROUGE-L; step time ratio",
        experiment: "peft.smollm2_summaries",
        target: ">= PEFT's - 1 sd; <= 0.9",
        keys: &[
            "lora.rouge_l_mean",
            "peft.rouge_l_mean",
            "peft.rouge_l_sd",
            "lora_over_peft_step_time_median",
            "lora_over_peft_step_time_sd",
        ],
        eval: |g| {
            let (a, b, sd) = (
                g("lora.rouge_l_mean"),
                g("peft.rouge_l_mean"),
                g("peft.rouge_l_sd"),
            );
            let t = g("lora_over_peft_step_time_median");
            (
                format!("{a:.3} vs {b:.3}; {t:.3}"),
                format!(
                    "PEFT sd {sd:.3}; time ratio sd {:.3} over seeds",
                    g("lora_over_peft_step_time_sd")
                ),
                Some(a >= b - sd && t <= 0.9),
            )
        },
    },
    Claim {
        text: "QLoRA on SmolLM2's Q4_1 codes: ROUGE-L against LoRA on the dequantized base; peak RSS ratio",
        experiment: "peft.smollm2_summaries",
        target: "within 0.01; <= 0.75x",
        keys: &[
            "qlora.rouge_l_mean",
            "lora.rouge_l_mean",
            "qlora_over_lora_peak_rss_median",
        ],
        eval: |g| {
            let d = g("qlora.rouge_l_mean") - g("lora.rouge_l_mean");
            let r = g("qlora_over_lora_peak_rss_median");
            (
                format!("{d:+.3}; {r:.3}x"),
                format!(
                    "ROUGE-L {:.3} vs {:.3}",
                    g("qlora.rouge_l_mean"),
                    g("lora.rouge_l_mean")
                ),
                Some(d.abs() <= 0.01 && r <= 0.75),
            )
        },
    },
];
