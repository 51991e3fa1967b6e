//! reuse-peft experiments on all-MiniLM-L6-v2 and the Debian sections fixture.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::ProgressBar;
use reuse_core::data::{load_text_splits, TextSplits};
use reuse_core::models::sentence::tokenize;
use reuse_core::models::{Bert, BertClassifier, SentenceEncoder, TokenizedDataset, Want};
use reuse_core::optim::cross_entropy;
use reuse_core::trainer::accuracy;
use reuse_core::{Checkpoint, Model, Optimizer, Schedule, TrainConfig, Trainer};
use reuse_peft::bottleneck::{add_bottleneck, set_active_bottlenecks};
use reuse_peft::config::InitLoraWeights;
use reuse_peft::{BottleneckConfig, LoraConfig, LoraModel};
use reuse_testkit::{fixtures_dir, minilm_dir};
use tch::{Kind, Tensor};

use super::{Ctx, Metrics};

/// Training budget shared by every method.
const STEPS: usize = 300;
const BATCH: usize = 16;
const MAX_LEN: usize = 32;

/// Resets the kernel's peak-RSS counter (VmHWM) so each method's peak is its own.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmHWM:")
                    .map(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            })
        })
        .flatten()
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn sections() -> Result<TextSplits> {
    Ok(load_text_splits(
        &fixtures_dir().join("debian_sections/sections.tsv.gz"),
    )?)
}

/// Same steps, batch, sequence length, schedule and seed for every method; each
/// method's learning rate is the usual one for it.
pub fn minilm_sections(ctx: &Ctx, bar: &ProgressBar) -> Result<Metrics> {
    let dir = minilm_dir()?;
    let splits = sections()?;
    let enc = SentenceEncoder::load(&dir, ctx.device, Kind::Float)?;
    let train = TokenizedDataset::new(&enc.tokenizer, &splits.train, MAX_LEN)?;
    let test = TokenizedDataset::new(&enc.tokenizer, &splits.test, MAX_LEN)?;
    let base_params = enc.bert.params().count() as f64;
    drop(enc);
    let n_classes = splits.classes.len() as i64;
    let mut m = Metrics::new();
    for method in ["full", "head", "lora", "pfeiffer"] {
        bar.set_message(format!("peft.minilm_sections {method}"));
        reset_peak_rss();
        tch::manual_seed(0);
        let mut model = BertClassifier::new(Bert::load(&dir, ctx.device, Kind::Float)?, n_classes);
        let cfg = |lr: f64| TrainConfig {
            max_steps: Some(STEPS),
            batch_size: BATCH,
            lr,
            weight_decay: 0.01,
            schedule: Schedule::Linear { warmup: STEPS / 10 },
            device: ctx.device,
            seed: 0,
            ..Default::default()
        };
        let (acc, trainable, report) = match method {
            "lora" => {
                let mut lm = LoraModel::new(model);
                let mut c = LoraConfig::new(8, 16.0, &["query", "value"]);
                c.modules_to_save = Some(vec!["classifier".into()]);
                lm.add_adapter("default", c)?;
                let trainable = lm.trainable_parameters().select_glob("*lora_*")?.count();
                let r = Trainer::new(cfg(3e-3)).fit(&lm, &train, None, &mut [])?;
                (accuracy(&lm, &test, 64, ctx.device)?, trainable, r)
            }
            _ => {
                let lr = match method {
                    "full" => 1e-4,
                    "head" => 5e-3,
                    _ => 3e-3,
                };
                if method == "head" {
                    model.bert.params().freeze();
                }
                if method == "pfeiffer" {
                    let mut bc = BottleneckConfig::pfeiffer();
                    bc.hidden_size = model.bert.config.hidden_size;
                    add_bottleneck(&mut model.bert, "task", &bc, ctx.device)?;
                    set_active_bottlenecks(&mut model, &["task"]);
                    model
                        .head
                        .classifier
                        .named_parameters()
                        .iter()
                        .for_each(|(_, t)| {
                            let _ = t.set_requires_grad(true);
                        });
                }
                let trainable = model.bert.params().count_trainable();
                let r = Trainer::new(cfg(lr)).fit(&model, &train, None, &mut [])?;
                (accuracy(&model, &test, 64, ctx.device)?, trainable, r)
            }
        };
        m.insert(format!("{method}.test_accuracy"), acc);
        m.insert(format!("{method}.trainable_params"), trainable as f64);
        m.insert(
            format!("{method}.trainable_fraction"),
            trainable as f64 / base_params,
        );
        m.insert(
            format!("{method}.step_ms"),
            1000.0 * report.seconds / report.steps as f64,
        );
        m.insert(format!("{method}.peak_rss_mb"), peak_rss_mb());
        super::say(
            bar,
            format!(
                "  {method:9} acc {acc:.4}  trainable {trainable:>9}  {:.0} ms/step",
                1000.0 * report.seconds / report.steps as f64
            ),
        );
    }
    m.insert(
        "lora_over_full_accuracy".into(),
        m["lora.test_accuracy"] / m["full.test_accuracy"],
    );
    m.insert("steps".into(), STEPS as f64);
    m.insert("batch_size".into(), BATCH as f64);
    m.insert("max_len".into(), MAX_LEN as f64);
    Ok(m)
}

/// A fixed batch of real texts: `[n, len]` ids and mask, padded / truncated to `len`.
fn fixed_batch(
    enc: &SentenceEncoder,
    splits: &TextSplits,
    n: usize,
    len: usize,
) -> Result<(Tensor, Tensor)> {
    let mut tok = enc.tokenizer.clone();
    tok.with_truncation(Some(tokenizers::TruncationParams {
        max_length: len,
        ..Default::default()
    }))
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    tok.with_padding(Some(tokenizers::PaddingParams {
        strategy: tokenizers::PaddingStrategy::Fixed(len),
        ..Default::default()
    }));
    // Long descriptions, so that most rows are real tokens to the end.
    let mut texts: Vec<&str> = splits.train.texts.iter().map(String::as_str).collect();
    texts.sort_by_key(|t| std::cmp::Reverse(t.len()));
    let texts: Vec<String> = texts.chunks(2).take(n).map(|c| c.join(" ")).collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let (ids, mask, _) = tokenize(&tok, &refs)?;
    Ok((ids, mask))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Base, unmerged-LoRA and merged-LoRA forwards on the same batch, interleaved.
pub fn inference_overhead(ctx: &Ctx, bar: &ProgressBar) -> Result<Metrics> {
    let dir = minilm_dir()?;
    let splits = sections()?;
    let enc = SentenceEncoder::load(&dir, ctx.device, Kind::Float)?;
    let (ids, mask) = fixed_batch(&enc, &splits, 32, 64)?;
    // Read once on the host: whether the fixed-length batch has padding at all.
    let padded = mask.min().int64_value(&[]) == 0;
    let (ids, mask) = (ids.to_device(ctx.device), mask.to_device(ctx.device));
    let mask = padded.then_some(&mask);
    let mut lm = LoraModel::new(enc.bert);
    let mut c = LoraConfig::new(8, 16.0, &["query", "value"]);
    c.init_lora_weights = InitLoraWeights::Bool(false);
    lm.add_adapter("default", c)?;
    let time = |b: &Bert| -> f64 {
        let start = Instant::now();
        let h = tch::no_grad(|| {
            b.forward(&ids, mask, None, false, Want::default())
                .expect("valid batch")
                .last_hidden_state
        });
        if ctx.device.is_cuda() {
            tch::Cuda::synchronize(0);
        }
        let _ = h.sum(Kind::Float).double_value(&[]);
        start.elapsed().as_secs_f64()
    };
    // Rounds of (base, unmerged, merged) in rotating order, so no variant always runs
    // first or after a merge; medians over rounds.
    let mut times: [Vec<f64>; 3] = Default::default();
    let rounds = if ctx.device.is_cuda() { 60 } else { 18 };
    for round in 0..rounds + 3 {
        bar.set_message(format!("peft.inference_overhead round {round}"));
        for k in 0..3 {
            let variant = (round + k) % 3;
            match variant {
                0 => lm.set_adapter(&[])?,
                1 => lm.set_adapter(&["default"])?,
                _ => {
                    lm.set_adapter(&["default"])?;
                    lm.merge_adapter(&["default"])?;
                }
            }
            let t = time(&lm.model);
            lm.unmerge_adapter()?;
            if round >= 3 {
                times[variant].push(t);
            }
        }
    }
    let [base, unmerged, merged] = times;
    let (b, u, mm) = (median(base), median(unmerged), median(merged));
    Ok(Metrics::from([
        ("base_ms".into(), b * 1000.0),
        ("unmerged_ms".into(), u * 1000.0),
        ("merged_ms".into(), mm * 1000.0),
        ("merged_over_base".into(), mm / b),
        ("unmerged_over_base".into(), u / b),
    ]))
}

const STEP_BATCH: usize = 32;
const STEP_LEN: usize = 64;
const STEP_ROUNDS: usize = 5;
const STEPS_PER_ROUND: usize = 2;

/// One LoRA training step (forward, mean-pool head, cross-entropy, backward, AdamW) in
/// Rust and in PyTorch + PEFT, same model, batch, sequence length and threads.
pub fn vs_python(ctx: &Ctx, bar: &ProgressBar) -> Result<Metrics> {
    let Some(py) = ctx.python() else {
        bail!("no .venv python: run `cargo xtask setup`");
    };
    let dir = minilm_dir()?;
    let splits = sections()?;
    let enc = SentenceEncoder::load(&dir, ctx.device, Kind::Float)?;
    let (ids, mask) = fixed_batch(&enc, &splits, STEP_BATCH, STEP_LEN)?;
    let labels = Tensor::from_slice(&splits.train.labels[..STEP_BATCH]);
    // The same batch goes to Python through a file.
    let report_dir = ctx.root.join("target/reuse-report");
    std::fs::create_dir_all(&report_dir)?;
    let batch_file = report_dir.join("lora_step_batch.safetensors");
    let mut ck = Checkpoint::new();
    ck.insert("input_ids", ids.copy())
        .insert("attention_mask", mask.copy())
        .insert("labels", labels.copy());
    ck.save(&batch_file)?;

    bar.set_message("peft.vs_python rust");
    tch::manual_seed(0);
    let padded = mask.min().int64_value(&[]) == 0;
    let (ids, mask, labels) = (
        ids.to_device(ctx.device),
        mask.to_device(ctx.device),
        labels.to_device(ctx.device),
    );
    let mut lm = LoraModel::new(BertClassifier::new(enc.bert, splits.classes.len() as i64));
    let mut c = LoraConfig::new(8, 16.0, &["query", "value"]);
    c.modules_to_save = Some(vec!["classifier".into()]);
    lm.add_adapter("default", c)?;
    let params = lm.trainable_parameters();
    let mut opt = Optimizer::new(Default::default(), 0.01);
    let mut step = || -> f64 {
        let start = Instant::now();
        let logits = lm
            .model
            .logits(&ids, padded.then_some(&mask), true)
            .expect("valid batch");
        let loss = cross_entropy(&logits, &labels).expect("labels match");
        loss.backward();
        opt.step(&params, 1e-3).expect("optimizer step");
        params.zero_grad();
        let _ = loss.double_value(&[]);
        if ctx.device.is_cuda() {
            tch::Cuda::synchronize(0);
        }
        start.elapsed().as_secs_f64()
    };
    step();
    step();

    // PyTorch + PEFT in a child process that answers "run N"; rounds alternate between
    // the two sides so that both see the same machine load.
    bar.set_message("peft.vs_python starting python");
    let device = if ctx.device.is_cuda() { "cuda" } else { "cpu" };
    let mut child = Command::new(&py)
        .arg(ctx.root.join("benches/python/peft_step.py"))
        .args([
            "--model".as_ref(),
            dir.as_os_str(),
            "--batch".as_ref(),
            batch_file.as_os_str(),
        ])
        .args([
            "--device",
            device,
            "--threads",
            &tch::get_num_threads().to_string(),
            "--serve",
        ])
        .args(["--classes", &splits.classes.len().to_string()])
        .env("HF_HUB_OFFLINE", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("running benches/python/peft_step.py")?;
    let mut to_py = child.stdin.take().context("python stdin")?;
    let mut from_py = BufReader::new(child.stdout.take().context("python stdout")?);
    let mut read = || -> Result<serde_json::Value> {
        let mut line = String::new();
        if from_py.read_line(&mut line)? == 0 {
            bail!("peft_step.py exited early");
        }
        Ok(serde_json::from_str(&line)?)
    };
    read()?; // ready
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for round in 0..STEP_ROUNDS {
        bar.set_message(format!("peft.vs_python round {round}"));
        for _ in 0..STEPS_PER_ROUND {
            ours.push(step());
        }
        writeln!(to_py, "run {STEPS_PER_ROUND}")?;
        let v = read()?;
        theirs.extend(
            v["seconds"]
                .as_array()
                .context("no seconds")?
                .iter()
                .filter_map(|x| x.as_f64()),
        );
    }
    writeln!(to_py, "quit")?;
    let _ = child.wait();
    let (ours, theirs) = (median(ours), median(theirs));
    Ok(Metrics::from([
        ("rust_step_ms".into(), ours * 1000.0),
        ("python_step_ms".into(), theirs * 1000.0),
        ("step_ratio_rust_over_python".into(), ours / theirs),
        ("batch_size".into(), STEP_BATCH as f64),
        ("seq_len".into(), STEP_LEN as f64),
    ]))
}
