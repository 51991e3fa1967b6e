//! Distilling SmolLM2-135M-Instruct into students cut from its own blocks
//! (`distill.smollm2_text`): for students of 10 and 15 of its 30 blocks (which blocks:
//! the candidate cut with the lowest dev NLL before training), the same token budget of
//! Debian text trained three ways: next-token cross-entropy alone, token-level KD from
//! the live teacher, and KD from the teacher's per-token top-k cache. Held-out perplexity
//! on Debian text and on general English (the license texts, never trained on), time per
//! step, decoding speed against the teacher, sizes and the cache's bytes per token.

use std::time::Instant;

use anyhow::{ensure, Context, Result};
use indicatif::ProgressBar;
use reuse_core::data::lm::{encode, PackedText};
use reuse_core::data::BatchSource;
use reuse_core::models::llama::{CausalLm, GenerateOptions, Sampling};
use reuse_core::models::lm::LanguageModel;
use reuse_core::models::LoadOptions;
use reuse_core::trainer::{evaluate, Technique};
use reuse_core::{Evaluation, Model, Schedule, TrainConfig, Trainer};
use reuse_distill::lm::cut_causal_lm;
use reuse_distill::losses::{KdConfig, TopKTail};
use reuse_distill::{build_cache, CacheConfig, Distiller, Teacher, TeacherCache, TeacherSource};
use tch::{Device, Kind};

use super::llm_sft::Clock;
use super::{insert_spread, mean, median, sample_sd, say, Counts, Ctx, Knobs, Metrics};
use super::{OnCuda, Outcome, Sizes};
use crate::claims::Claim;

/// The arms, in the order seed 0 runs them (later seeds rotate it).
const ARMS: [&str; 3] = ["ce", "kd_live", "kd_cache"];
/// KD settings: forward KL at T = 1, half KD and half cross-entropy on the text
/// (DistillKit's defaults; not tuned).
const TEMPERATURE: f64 = 1.0;
const ALPHA: f64 = 0.5;
/// AdamW learning rates (linear schedule, 10% warmup), chosen on dev by
/// `distill.smollm2_text_dev` (benches/sweeps/smollm2_text_dev.md): cross-entropy alone,
/// and the KD arms (live and cached alike).
const LR_CE: f64 = 1e-3;
const LR_KD: f64 = 1e-3;
/// The dev sweep's learning rates.
const LR_GRID: [f64; 3] = [3e-4, 1e-3, 3e-3];

fn lr_of(arm: &str) -> f64 {
    if arm == "ce" {
        LR_CE
    } else {
        LR_KD
    }
}
/// Batch of the NLL evaluations and of the decoding-speed comparison.
const EVAL_BATCH: usize = 8;
/// Weights of the teacher and its students: f32 (a bf16 student trained with f32 master
/// weights ran 11x slower per step on the development CPU, so f32 is the fair setting
/// there for now).
const KIND: Kind = Kind::Float;
/// Rounds of the decoding-speed comparison (teacher and students interleaved).
const DECODE_ROUNDS: usize = 3;

/// `distill.smollm2_text`'s sizes.
pub(super) struct TextSizes {
    /// Student depths (blocks kept of the teacher's 30); the claims read the 10-block one.
    depths: &'static [usize],
    /// Optimizer steps of every arm (one pass over exactly steps x batch blocks).
    steps: usize,
    batch: usize,
    /// Tokens per packed block.
    block: usize,
    /// Blocks of dev (layer choice), test and general text scored.
    eval_blocks: usize,
    /// Top-k of the cache.
    top_k: usize,
    /// New tokens per row in the decoding-speed comparison.
    new_tokens: usize,
}

impl Knobs for TextSizes {
    fn counts(&self) -> Counts {
        vec![
            ("steps", self.steps),
            ("batch", self.batch),
            ("block", self.block),
            ("eval_blocks", self.eval_blocks),
            ("new_tokens", self.new_tokens),
            ("depths", self.depths.len()),
        ]
    }
}

pub(super) const TEXT_SIZES: Sizes<TextSizes> = Sizes {
    quick: TextSizes {
        depths: &[10, 15],
        steps: 2,
        batch: 2,
        block: 32,
        eval_blocks: 2,
        top_k: 16,
        new_tokens: 4,
    },
    cpu: Some(TextSizes {
        depths: &[10],
        steps: 16,
        batch: 4,
        block: 128,
        eval_blocks: 16,
        top_k: 64,
        new_tokens: 16,
    }),
    full: TextSizes {
        depths: &[10, 15],
        steps: 200,
        batch: 8,
        block: 256,
        eval_blocks: 64,
        top_k: 64,
        new_tokens: 32,
    },
    cuda: OnCuda {
        quick: None,
        full: Some(TextSizes {
            depths: &[10, 15],
            steps: 1000,
            batch: 16,
            block: 256,
            eval_blocks: 128,
            top_k: 64,
            new_tokens: 64,
        }),
    },
};

/// FNV-1a of a text: the fixed split of the Debian texts that have no split of their own.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Debian text: the synopses fixture (split 80/10/10 by a hash of the text) and the
/// AppStream summaries fixture's descriptions (its own train / dev / test split).
struct DebianText {
    train: Vec<String>,
    dev: Vec<String>,
    test: Vec<String>,
}

fn read_gz(path: &std::path::Path) -> Result<String> {
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut text = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(f), &mut text)
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(text)
}

fn debian_text() -> Result<DebianText> {
    let fx = reuse_testkit::fixtures_dir();
    let mut d = DebianText {
        train: Vec::new(),
        dev: Vec::new(),
        test: Vec::new(),
    };
    for line in read_gz(&fx.join("debian_synopses/synopses.tsv.gz"))?.lines() {
        let Some((_, text)) = line.split_once('\t') else {
            continue;
        };
        let text = text.to_string();
        match fnv(&text) % 10 {
            8 => d.dev.push(text),
            9 => d.test.push(text),
            _ => d.train.push(text),
        }
    }
    for line in read_gz(&fx.join("appstream_summaries/summaries.jsonl.gz"))?.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let text = v["description"]
            .as_str()
            .context("description")?
            .to_string();
        match v["split"].as_str().context("split")? {
            "dev" => d.dev.push(text),
            "test" => d.test.push(text),
            _ => d.train.push(text),
        }
    }
    Ok(d)
}

/// The license texts fixture's paragraphs (general English, never trained on).
fn license_text() -> Result<Vec<String>> {
    let text = read_gz(&reuse_testkit::fixtures_dir().join("license_texts/licenses.tsv.gz"))?;
    Ok(text
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once('\t').map(|(_, t)| t.to_string()))
        .collect())
}

/// Exactly `blocks` blocks of `block` tokens packed from `texts` taken in the order
/// `order` gives (each document cut to `block - 1` tokens, so the last one taken never
/// spills a block over).
fn pack(
    lm: &LanguageModel,
    texts: &[String],
    order: impl Iterator<Item = usize>,
    blocks: usize,
    block: usize,
) -> Result<PackedText> {
    let eos = *lm
        .model
        .config
        .token_ids("eos_token_id")
        .first()
        .context("no eos_token_id")?;
    let want = blocks * block;
    let (mut docs, mut total) = (Vec::new(), 0usize);
    for i in order {
        if total >= want {
            break;
        }
        let mut ids = encode(&lm.tokenizer, &texts[i], true)?;
        ids.truncate(block - 1);
        total += ids.len() + 1;
        docs.push(ids);
    }
    ensure!(
        total >= want,
        "not enough text for {blocks} blocks of {block} tokens"
    );
    let p = PackedText::from_ids(&docs, eos, block)?;
    ensure!(
        p.len() == blocks,
        "packed {} blocks, expected {blocks}",
        p.len()
    );
    Ok(p)
}

/// Seed `seed`'s training sample: exactly `steps x batch` blocks packed from the Debian
/// training texts in the seed's own order.
fn train_sample(
    lm: &LanguageModel,
    text: &DebianText,
    seed: u64,
    s: &TextSizes,
) -> Result<PackedText> {
    let order = shuffled(text.train.len(), seed);
    pack(
        lm,
        &text.train,
        order.into_iter(),
        s.steps * s.batch,
        s.block,
    )
}

/// The training texts in a seeded order (a seed trains on its own sample).
fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let mut v: Vec<usize> = (0..n).collect();
    v.shuffle(&mut rand::rngs::StdRng::seed_from_u64(0xd15_7111 ^ seed));
    v
}

fn nll(model: &dyn reuse_core::Trainable, data: &dyn BatchSource, device: Device) -> Result<f64> {
    match evaluate(model, data, EVAL_BATCH, device)? {
        Evaluation::TokenNll { nll, .. } => Ok(nll),
        other => anyhow::bail!("expected a token NLL, got {other:?}"),
    }
}

/// Candidate cuts of `k` of `depth` blocks: evenly spread (first and last included),
/// the first `k - 1` and the last, and the first `k`.
fn candidates(k: usize, depth: usize) -> Vec<(&'static str, Vec<usize>)> {
    let spread = (0..k)
        .map(|i| ((i * (depth - 1)) as f64 / (k - 1) as f64).round() as usize)
        .collect();
    let first_last = (0..k - 1).chain([depth - 1]).collect();
    let first = (0..k).collect();
    vec![
        ("spread", spread),
        ("first_last", first_last),
        ("first", first),
    ]
}

/// Parameters a decoding step multiplies by, per token: every linear of the blocks and
/// the head (the embedding lookup is free): the FLOPs-per-token ratio's terms.
fn matmul_params(m: &CausalLm) -> f64 {
    let blocks: f64 = m
        .layers
        .iter()
        .flat_map(|l| l.linears.iter())
        .map(|l| l.weight.numel() as f64)
        .sum();
    blocks + (m.config.vocab_size * m.config.hidden_size) as f64
}

/// One trained arm's figures.
struct ArmResult {
    test_nll: f64,
    general_nll: f64,
    step_ms: Vec<f64>,
    seconds: f64,
}

#[allow(clippy::too_many_arguments)]
fn train_arm(
    ctx: &Ctx,
    teacher: &LanguageModel,
    layers: &[usize],
    arm: &str,
    train: &PackedText,
    cache: Option<&TeacherCache>,
    evals: (&PackedText, &PackedText),
    seed: u64,
    lr: f64,
) -> Result<ArmResult> {
    let s = ctx.sizes(&TEXT_SIZES);
    let student = cut_causal_lm(&teacher.model, layers)?;
    let mut clock = Clock::default();
    let mut t = Trainer::new(TrainConfig {
        max_steps: Some(s.steps),
        batch_size: s.batch,
        lr,
        weight_decay: 0.0,
        schedule: Schedule::Linear {
            warmup: s.steps / 10,
        },
        seed,
        device: ctx.device,
        ..Default::default()
    });
    let kd = KdConfig::new(TEMPERATURE);
    let source = match arm {
        "kd_live" => Some(TeacherSource::Live(&teacher.model)),
        "kd_cache" => Some(TeacherSource::Cached(
            cache.context("kd_cache without a cache")?,
        )),
        _ => None,
    };
    let mut distiller = source
        .map(|src| Distiller::new(src, kd, ALPHA))
        .transpose()?;
    if let Some(d) = distiller.as_mut() {
        d.tail = TopKTail::Renormalize;
    }
    let start = Instant::now();
    {
        let mut techniques: Vec<&mut dyn Technique> = vec![&mut clock];
        if let Some(d) = distiller.as_mut() {
            techniques.push(d);
        }
        t.begin_task(0, &student, train, &mut techniques)?;
        let r = t.fit(&student, train, None, &mut techniques)?;
        ensure!(
            r.steps == s.steps,
            "{arm}: {} steps of {}",
            r.steps,
            s.steps
        );
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(ArmResult {
        test_nll: nll(&student, evals.0, ctx.device)?,
        general_nll: nll(&student, evals.1, ctx.device)?,
        step_ms: clock.step_ms(),
        seconds,
    })
}

/// Seconds to decode `new_tokens` greedily for `prompts` with `m` (no early stop).
fn decode_seconds(m: &CausalLm, prompts: &[Vec<i64>], new_tokens: usize) -> Result<f64> {
    let opts = GenerateOptions {
        max_new_tokens: new_tokens,
        sampling: Sampling::Greedy,
        stop_tokens: Vec::new(),
    };
    let start = Instant::now();
    let g = m.generate(prompts, &opts, &mut |_, _| {})?;
    if m.device().is_cuda() {
        tch::Cuda::synchronize(0);
    }
    let t = start.elapsed().as_secs_f64();
    ensure!(
        g.tokens.iter().all(|r| r.len() == new_tokens),
        "a row stopped before {new_tokens} tokens"
    );
    Ok(t)
}

/// The `k`-block cut of `teacher` with the lowest NLL on `dev` before training (each
/// candidate's NLL into `m` as `s{k}.cut_{name}.dev_nll`).
fn choose_cut(
    teacher: &LanguageModel,
    k: usize,
    dev: &PackedText,
    m: &mut Metrics,
    bar: &ProgressBar,
) -> Result<(&'static str, Vec<usize>)> {
    let depth = teacher.model.layers.len();
    let mut best: Option<(f64, &'static str, Vec<usize>)> = None;
    for (name, layers) in candidates(k, depth) {
        bar.set_message(format!(
            "distill.smollm2_text: dev NLL of the {k}-block cut `{name}`"
        ));
        let student = cut_causal_lm(&teacher.model, &layers)?;
        let v = nll(&student, dev, teacher.model.device())?;
        m.insert(format!("s{k}.cut_{name}.dev_nll"), v);
        if best.as_ref().is_none_or(|(b, _, _)| v < *b) {
            best = Some((v, name, layers));
        }
    }
    let (v, name, layers) = best.expect("candidates");
    say(
        bar,
        format!("distill.smollm2_text: {k} blocks: `{name}` {layers:?} (dev NLL {v:.3} before training)"),
    );
    Ok((name, layers))
}

/// The teacher (f32 from the GGUF), the Debian text and the packed dev, test and general
/// sets every run of the experiment and its sweep read.
struct Setup {
    teacher: LanguageModel,
    text: DebianText,
    dev: PackedText,
    test: PackedText,
    general: PackedText,
}

fn setup(ctx: &Ctx) -> Result<Setup> {
    let s = ctx.sizes(&TEXT_SIZES);
    let path = reuse_testkit::smollm2_gguf();
    ensure!(
        path.is_file(),
        "{} is absent: run `cargo xtask setup`",
        path.display()
    );
    let teacher = LanguageModel::load(&path, &LoadOptions::new(ctx.device, KIND))?;
    let text = debian_text()?;
    let general = license_text()?;
    let eval_pack =
        |texts: &[String]| pack(&teacher, texts, 0..texts.len(), s.eval_blocks, s.block);
    let dev = eval_pack(&text.dev)?;
    let test = eval_pack(&text.test)?;
    let general = eval_pack(&general)?;
    Ok(Setup {
        teacher,
        text,
        dev,
        test,
        general,
    })
}

/// The dev sweep behind the learning rates: the 10-block cut, seed 0's training sample,
/// cross-entropy and live KD at each rate of [`LR_GRID`], scored by dev NLL.
pub fn smollm2_text_dev(ctx: &Ctx, bar: &ProgressBar) -> Result<Outcome> {
    let s = ctx.sizes(&TEXT_SIZES);
    let Setup {
        teacher, text, dev, ..
    } = setup(ctx)?;
    let mut m = Metrics::new();
    let (_, layers) = choose_cut(&teacher, 10, &dev, &mut m, bar)?;
    let seed = ctx.seeds[0];
    let train = train_sample(&teacher, &text, seed, s)?;
    let mut notes = Vec::new();
    for arm in ["ce", "kd_live"] {
        let mut best = (f64::INFINITY, 0.0);
        for lr in LR_GRID {
            bar.set_message(format!("distill.smollm2_text_dev: {arm} at lr {lr}"));
            let r = train_arm(
                ctx,
                &teacher,
                &layers,
                arm,
                &train,
                None,
                (&dev, &dev),
                seed,
                lr,
            )?;
            say(
                bar,
                format!(
                    "distill.smollm2_text_dev: {arm} lr {lr}: dev NLL {:.4}",
                    r.test_nll
                ),
            );
            m.insert(format!("{arm}.lr{lr}.dev_nll"), r.test_nll);
            if r.test_nll < best.0 {
                best = (r.test_nll, lr);
            }
        }
        m.insert(format!("{arm}.best_lr"), best.1);
        notes.push(format!(
            "{arm}: lowest dev NLL {:.4} at lr {}",
            best.0, best.1
        ));
    }
    notes.push(format!(
        "Seed {seed}'s training sample, {} steps of {} blocks of {} tokens, the 10-block cut {layers:?}; dev NLL on {} blocks of the Debian dev texts. The rule: the lowest dev NLL per arm; kd_cache takes kd_live's rate.",
        s.steps, s.batch, s.block, s.eval_blocks
    ));
    Ok(Outcome { metrics: m, notes })
}

pub fn smollm2_text(ctx: &Ctx, bar: &ProgressBar) -> Result<Outcome> {
    let s = ctx.sizes(&TEXT_SIZES);
    let Setup {
        mut teacher,
        text,
        dev,
        test,
        general,
    } = setup(ctx)?;
    let mut m = Metrics::new();
    let mut notes = Vec::new();
    let device = ctx.device;
    say(bar, "distill.smollm2_text: the teacher's held-out NLL");
    let t_test = nll(&teacher.model, &test, device)?;
    let t_general = nll(&teacher.model, &general, device)?;
    m.insert("teacher.test_nll".into(), t_test);
    m.insert("teacher.test_ppl".into(), t_test.exp());
    m.insert("teacher.general_nll".into(), t_general);
    m.insert("teacher.general_ppl".into(), t_general.exp());
    let t_params = teacher.model.params().count() as f64;
    let t_bytes = teacher.model.state_dict().to_bytes()?.len() as f64;
    m.insert("teacher.params".into(), t_params);
    m.insert("teacher.bytes".into(), t_bytes);

    // Which blocks: the candidate with the lowest dev NLL before training.
    let mut chosen: Vec<Vec<usize>> = Vec::new();
    for &k in s.depths {
        let (name, layers) = choose_cut(&teacher, k, &dev, &mut m, bar)?;
        notes.push(format!(
            "{k}-block student: blocks {layers:?} (`{name}`), the lowest dev NLL before training of the candidates spread / first k-1 and last / first k (`s{k}.cut_*.dev_nll`)"
        ));
        let student = cut_causal_lm(&teacher.model, &layers)?;
        m.insert(format!("s{k}.params"), student.params().count() as f64);
        m.insert(
            format!("s{k}.bytes"),
            student.state_dict().to_bytes()?.len() as f64,
        );
        m.insert(
            format!("s{k}.flops_ratio"),
            matmul_params(&teacher.model) / matmul_params(&student),
        );
        chosen.push(layers);
    }

    // Per seed: its own sample of training text, its cache, then every arm of both
    // depths, the arms' order rotating.
    let blocks = s.steps * s.batch;
    let teacher_fp = Teacher::fingerprint(&teacher.model);
    let mut results: Vec<Vec<Vec<ArmResult>>> = s
        .depths
        .iter()
        .map(|_| ARMS.iter().map(|_| Vec::new()).collect())
        .collect();
    let (mut cache_secs, mut cache_bpt) = (Vec::new(), Vec::new());
    let cache_root = ctx.report_dir().join("distill-smollm2-cache");
    for &seed in &ctx.seeds {
        let train = train_sample(&teacher, &text, seed, s)?;
        bar.set_message(format!(
            "distill.smollm2_text seed {seed}: the teacher's top-{} cache",
            s.top_k
        ));
        let dir = cache_root.join(format!("seed{seed}"));
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        let start = Instant::now();
        let cfg = CacheConfig::top_k(s.top_k).with_per_token(true);
        let manifest = build_cache(&teacher.model, &train, &dir, &cfg, EVAL_BATCH, device)?;
        cache_secs.push(start.elapsed().as_secs_f64());
        cache_bpt.push(manifest.total_bytes() as f64 / (blocks * s.block) as f64);
        let cache = TeacherCache::open(&dir, Some(&teacher_fp), None)?;
        for (di, k) in s.depths.iter().enumerate() {
            for j in 0..ARMS.len() {
                let ai = (j + seed as usize) % ARMS.len();
                let arm = ARMS[ai];
                bar.set_message(format!(
                    "distill.smollm2_text seed {seed}: {k} blocks, {arm}"
                ));
                let r = train_arm(
                    ctx,
                    &teacher,
                    &chosen[di],
                    arm,
                    &train,
                    Some(&cache),
                    (&test, &general),
                    seed,
                    lr_of(arm),
                )?;
                say(
                    bar,
                    format!(
                        "distill.smollm2_text seed {seed} {k} blocks {arm}: test NLL {:.3}, general {:.3}, {:.0} ms/step",
                        r.test_nll,
                        r.general_nll,
                        median(&r.step_ms[1.min(r.step_ms.len())..])
                    ),
                );
                results[di][ai].push(r);
            }
        }
        drop(cache);
        std::fs::remove_dir_all(&dir)?;
    }
    insert_spread(&mut m, "cache_build_seconds", &cache_secs);
    m.insert("cache_bytes_per_token".into(), mean(&cache_bpt));
    m.insert("train_tokens".into(), (blocks * s.block) as f64);
    for (di, k) in s.depths.iter().enumerate() {
        for (ai, arm) in ARMS.iter().enumerate() {
            let rs = &results[di][ai];
            let key = |n: &str| format!("s{k}.{arm}.{n}");
            for (name, f) in [
                (
                    "test_nll",
                    (|r: &ArmResult| r.test_nll) as fn(&ArmResult) -> f64,
                ),
                ("test_ppl", |r| r.test_nll.exp()),
                ("general_nll", |r| r.general_nll),
                ("general_ppl", |r| r.general_nll.exp()),
                ("train_seconds", |r| r.seconds),
            ] {
                let v: Vec<f64> = rs.iter().map(f).collect();
                m.insert(key(&format!("{name}_mean")), mean(&v));
                m.insert(key(&format!("{name}_sd")), sample_sd(&v));
            }
            let steps: Vec<f64> = rs
                .iter()
                .flat_map(|r| r.step_ms.iter().skip(1).copied())
                .collect();
            insert_spread(&mut m, &key("step_ms"), &steps);
        }
        // Step-time ratios within each seed (the arms of a seed run back to back).
        let ratio = |a: usize, b: usize| -> Vec<f64> {
            results[di][a]
                .iter()
                .zip(&results[di][b])
                .map(|(x, y)| median(&x.step_ms[1..]) / median(&y.step_ms[1..]))
                .collect()
        };
        insert_spread(&mut m, &format!("s{k}.cache_over_ce_step"), &ratio(2, 0));
        insert_spread(&mut m, &format!("s{k}.live_over_ce_step"), &ratio(1, 0));
    }

    // Decoding speed: the teacher and each student on the same prompts, interleaved.
    teacher.model.config.extra.remove("eos_token_id");
    let mut students: Vec<CausalLm> = chosen
        .iter()
        .map(|l| cut_causal_lm(&teacher.model, l))
        .collect::<reuse_core::Result<_>>()?;
    for st in &mut students {
        st.config.extra.remove("eos_token_id");
    }
    let prompts: Vec<Vec<i64>> = text
        .test
        .iter()
        .take(EVAL_BATCH)
        .map(|t| {
            let mut ids = encode(&teacher.tokenizer, t, true)?;
            ids.truncate(32);
            Ok(ids)
        })
        .collect::<Result<_>>()?;
    let models: Vec<&CausalLm> = std::iter::once(&teacher.model)
        .chain(students.iter())
        .collect();
    for mdl in &models {
        decode_seconds(mdl, &prompts[..1], 2)?; // warm-up
    }
    let mut secs = vec![Vec::new(); models.len()];
    for round in 0..DECODE_ROUNDS {
        bar.set_message(format!(
            "distill.smollm2_text: decoding round {}/{DECODE_ROUNDS}",
            round + 1
        ));
        for j in 0..models.len() {
            let i = (j + round) % models.len();
            secs[i].push(decode_seconds(models[i], &prompts, s.new_tokens)?);
        }
    }
    let toks = (prompts.len() * s.new_tokens) as f64;
    let tps = |v: &[f64]| v.iter().map(|t| toks / t).collect::<Vec<f64>>();
    insert_spread(&mut m, "teacher.decode_tokens_per_s", &tps(&secs[0]));
    for (di, k) in s.depths.iter().enumerate() {
        insert_spread(
            &mut m,
            &format!("s{k}.decode_tokens_per_s"),
            &tps(&secs[di + 1]),
        );
        let speedup: Vec<f64> = secs[0]
            .iter()
            .zip(&secs[di + 1])
            .map(|(t, st)| t / st)
            .collect();
        insert_spread(&mut m, &format!("s{k}.decode_speedup"), &speedup);
    }
    notes.push(format!(
        "Each arm trains a fresh cut of the teacher for {} steps of {} blocks of {} tokens ({} tokens, one pass; each seed draws its own sample of the Debian training text: synopses hashed into train 80% / dev 10% / test 10%, plus the AppStream summaries fixture's train descriptions). AdamW lr {LR_CE} (ce) and {LR_KD} (KD), chosen on dev by `distill.smollm2_text_dev`, linear schedule with 10% warmup. `ce`: next-token cross-entropy alone; `kd_live`: {ALPHA} x CE + {} x forward KL (T = {TEMPERATURE}) to the live teacher at every token; `kd_cache`: the same against the teacher's top-{} log-probabilities per token (f16, the rest dropped and the top-k renormalised), built once per seed (`cache_build_seconds`).",
        s.steps, s.batch, s.block, blocks * s.block, 1.0 - ALPHA, s.top_k
    ));
    notes.push(format!(
        "Held-out NLL on {} blocks of {} tokens: `test` from the Debian test texts (hashed synopses and the AppStream test descriptions), `general` from the license_texts fixture (never trained on). Means ± sample sd over seeds {:?}. Step times: every step after each run's first, from the batch on the device to the end of the update; `*_over_ce_step` are per-seed ratios of medians.",
        s.eval_blocks, s.block, ctx.seeds
    ));
    notes.push(format!(
        "Decoding: greedy, {} new tokens for a batch of {} prompts (the first test texts, cut to 32 tokens), no early stop; the teacher and the students (untrained cuts: speed does not depend on the weights) interleaved over {DECODE_ROUNDS} rounds after a warm-up. `s*.flops_ratio` is the ceiling: the teacher's matmul parameters per token (blocks and head) over the student's.",
        s.new_tokens,
        prompts.len()
    ));
    Ok(Outcome { metrics: m, notes })
}

pub const CLAIMS: &[Claim] = &[
    Claim {
        text: "LLM distillation (SmolLM2 -> 10 of its 30 blocks): held-out Debian perplexity, KD from the live teacher vs cross-entropy alone",
        experiment: "distill.smollm2_text",
        target: "KD below CE by more than the spread",
        keys: &[
            "s10.kd_live.test_ppl_mean",
            "s10.kd_live.test_ppl_sd",
            "s10.ce.test_ppl_mean",
            "s10.ce.test_ppl_sd",
        ],
        eval: |g| {
            let (kd, kds, ce, ces) = (
                g("s10.kd_live.test_ppl_mean"),
                g("s10.kd_live.test_ppl_sd"),
                g("s10.ce.test_ppl_mean"),
                g("s10.ce.test_ppl_sd"),
            );
            (
                format!("{kd:.2} vs {ce:.2}"),
                format!("sd {kds:.2} / {ces:.2}"),
                Some(kd + kds.max(ces) < ce),
            )
        },
    },
    Claim {
        text: "LLM distillation from a per-token top-k cache: step time over cross-entropy's; perplexity over live KD's",
        experiment: "distill.smollm2_text",
        target: "<= 1.15x; within 2%",
        keys: &[
            "s10.cache_over_ce_step_median",
            "s10.cache_over_ce_step_sd",
            "s10.kd_cache.test_ppl_mean",
            "s10.kd_live.test_ppl_mean",
        ],
        eval: |g| {
            let t = g("s10.cache_over_ce_step_median");
            let p = g("s10.kd_cache.test_ppl_mean") / g("s10.kd_live.test_ppl_mean");
            (
                format!("{t:.3}x; {p:.3}x"),
                format!("step ratio sd {:.3} over seeds", g("s10.cache_over_ce_step_sd")),
                Some(t <= 1.15 && (p - 1.0).abs() <= 0.02),
            )
        },
    },
    Claim {
        text: "A 10-block SmolLM2 student decodes faster than its teacher (same batch); FLOPs-per-token ratio as the ceiling",
        experiment: "distill.smollm2_text",
        target: ">= 2x",
        keys: &[
            "s10.decode_speedup_median",
            "s10.decode_speedup_sd",
            "s10.flops_ratio",
        ],
        eval: |g| {
            let v = g("s10.decode_speedup_median");
            (
                format!("{v:.2}x (ceiling {:.2}x)", g("s10.flops_ratio")),
                format!("sd {:.2}", g("s10.decode_speedup_sd")),
                Some(v >= 2.0),
            )
        },
    },
];
