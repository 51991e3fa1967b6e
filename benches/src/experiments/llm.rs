//! Causal-LM experiments on SmolLM2-135M-Instruct's GGUF: decoding speed and perplexity
//! against transformers on the same file, interleaved in one run.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use indicatif::ProgressBar;
use reuse_core::data::lm::encode;
use reuse_core::models::llama::{GenerateOptions, Sampling};
use reuse_core::models::lm::LanguageModel;
use reuse_core::models::LoadOptions;
use reuse_core::Model;
use tch::{Device, Kind, Tensor};

use super::{insert_spread, median, Counts, Ctx, Knobs, Metrics, OnCuda, Outcome, Sizes};
use crate::claims::Claim;
use crate::peer::Peer;

/// transformers loading the same GGUF in f32, as a [`Peer`] (benches/python/hf_causal_lm.py).
struct HfLm(Peer);

impl HfLm {
    fn start(ctx: &Ctx, py: &Path, gguf: &Path, pad: i64) -> Result<Self> {
        let device = if ctx.device.is_cuda() { "cuda" } else { "cpu" };
        let (peer, ready) = Peer::start(
            "hf_causal_lm",
            &ctx.report_dir(),
            Command::new(py)
                .arg(ctx.root.join("benches/python/hf_causal_lm.py"))
                .args(["--gguf".as_ref(), gguf.as_os_str()])
                .args(["--device", device, "--pad", &pad.to_string()])
                .args(["--threads", &tch::get_num_threads().to_string()]),
        )?;
        ensure!(
            ready["parameters"].as_u64().is_some(),
            "hf_causal_lm.py did not report its parameters: {ready}"
        );
        Ok(Self(peer.quit_with("quit")))
    }

    /// Seconds and new tokens of a greedy batch.
    fn generate(&mut self, prompts: &[Vec<i64>], n: usize) -> Result<(f64, Vec<Vec<i64>>)> {
        let req = serde_json::json!({"op": "generate", "prompts": prompts, "max_new_tokens": n});
        let a = self.0.ask(&req.to_string())?;
        let tokens: Vec<Vec<i64>> =
            serde_json::from_value(a["tokens"].clone()).context("hf_causal_lm.py: tokens")?;
        Ok((a["seconds"].as_f64().context("seconds")?, tokens))
    }

    /// Seconds, NLL sum and scored tokens of the rows.
    fn score(&mut self, rows: &[Vec<i64>], batch: usize) -> Result<(f64, f64, usize)> {
        let req = serde_json::json!({"op": "score", "rows": rows, "batch_size": batch});
        let a = self.0.ask(&req.to_string())?;
        Ok((
            a["seconds"].as_f64().context("seconds")?,
            a["nll_sum"].as_f64().context("nll_sum")?,
            a["tokens"].as_u64().context("tokens")? as usize,
        ))
    }
}

/// The model and the prompts both experiments use: the first test synopses of the
/// sections fixture, each asked about through the chat template.
pub(super) fn setup(ctx: &Ctx, kind: Kind) -> Result<LanguageModel> {
    load(ctx, kind, false)
}

/// [`setup`], with the GGUF's Q8_0 / Q4_0 / Q4_1 linears kept in their codes when
/// `keep_codes`.
fn load(ctx: &Ctx, kind: Kind, keep_codes: bool) -> Result<LanguageModel> {
    let path = reuse_testkit::smollm2_gguf();
    ensure!(
        path.is_file(),
        "{} is absent: run `cargo xtask setup` (or set REUSE_SMOLLM2_GGUF)",
        path.display()
    );
    let mut opts = LoadOptions::new(ctx.device, kind);
    if keep_codes {
        opts = opts.keep_codes();
    }
    let mut lm = LanguageModel::load(&path, &opts)?;
    // Timed runs decode exactly their budget: no row stops early on either side.
    lm.model.config.extra.remove("eos_token_id");
    Ok(lm)
}

pub(super) fn prompts(lm: &LanguageModel, n: usize) -> Result<Vec<Vec<i64>>> {
    let splits = super::sections()?;
    splits
        .test
        .texts
        .iter()
        .take(n)
        .map(|t| {
            Ok(lm.prompt_ids(
                &format!("In two sentences, what does this software do? {t}"),
                true,
                None,
            )?)
        })
        .collect()
}

/// Main-memory read bandwidth in bytes/s: the median of 5 sums over a 512 MiB f32 tensor
/// (far larger than any cache), the way a batch-1 decode step reads its weights.
fn read_bandwidth(device: Device) -> f64 {
    let n = 128 << 20; // 128 Mi f32 = 512 MiB
    let t = Tensor::ones([n], (Kind::Float, device));
    let mut v = Vec::new();
    for _ in 0..5 {
        let start = Instant::now();
        let s = t.sum(Kind::Float).double_value(&[]);
        v.push((n as f64 * 4.0) / start.elapsed().as_secs_f64());
        assert!(s > 0.0);
    }
    median(&v)
}

/// `core.smollm2_generate`'s sizes.
pub(super) struct GenerateSizes {
    new_tokens: usize,
    rounds: usize,
}

impl Knobs for GenerateSizes {
    fn counts(&self) -> Counts {
        vec![("new_tokens", self.new_tokens), ("rounds", self.rounds)]
    }
}

pub(super) const GENERATE_SIZES: Sizes<GenerateSizes> = Sizes {
    quick: GenerateSizes {
        new_tokens: 8,
        rounds: 1,
    },
    cpu: None,
    full: GenerateSizes {
        new_tokens: 128,
        rounds: 3,
    },
    cuda: OnCuda {
        quick: None,
        full: Some(GenerateSizes {
            new_tokens: 128,
            rounds: 5,
        }),
    },
};

/// Batch sizes timed.
const BATCHES: [usize; 2] = [1, 8];

/// Greedy decoding tokens/s at batch 1 and 8: reuse in f32 and bf16, transformers in
/// f32, interleaved per round; agreement of the greedy tokens; memory bandwidth and the
/// bytes each side reads per token.
pub fn smollm2_generate(ctx: &Ctx, bar: &ProgressBar) -> Result<Outcome> {
    let s = ctx.sizes(&GENERATE_SIZES);
    let f32_lm = setup(ctx, Kind::Float)?;
    let bf16_lm = setup(ctx, Kind::BFloat16)?;
    let codes_lm = load(ctx, Kind::BFloat16, true)?;
    let ps = prompts(&f32_lm, 8)?;
    let pad = f32_lm.model.config.pad_token_id().unwrap_or(2);
    let opts = GenerateOptions {
        max_new_tokens: s.new_tokens,
        sampling: Sampling::Greedy,
        stop_tokens: Vec::new(),
    };
    let mut notes = Vec::new();
    let mut hf = match ctx.python() {
        Some(py) => {
            bar.set_message("core.smollm2_generate: starting transformers");
            Some(HfLm::start(ctx, &py, &reuse_testkit::smollm2_gguf(), pad)?)
        }
        None => {
            notes.push("transformers comparison skipped: no .venv".into());
            None
        }
    };
    // Warm-up: one short batch per side.
    let lms = [&f32_lm, &bf16_lm, &codes_lm];
    for lm in lms {
        let w = GenerateOptions {
            max_new_tokens: 2,
            ..opts.clone()
        };
        lm.model.generate(&ps[..1], &w, &mut |_, _| {})?;
    }
    if let Some(h) = hf.as_mut() {
        h.generate(&ps[..1], 2)?;
    }
    let sides = [
        "reuse_f32",
        "reuse_bf16",
        "reuse_bf16_codes",
        "transformers_f32",
    ];
    let peer = sides.len() - 1;
    // secs[side][batch index] per round, and the batch-1 tokens of each side.
    let mut secs = vec![vec![Vec::new(); BATCHES.len()]; sides.len()];
    let mut tokens: Vec<Option<Vec<Vec<i64>>>> = vec![None; sides.len()];
    for round in 0..s.rounds {
        for k in 0..sides.len() {
            let side = (round + k) % sides.len();
            for (bi, &b) in BATCHES.iter().enumerate() {
                bar.set_message(format!(
                    "core.smollm2_generate round {}/{}: {} batch {b}",
                    round + 1,
                    s.rounds,
                    sides[side]
                ));
                let batch = &ps[..b];
                let (t, toks) = match lms.get(side) {
                    Some(lm) => {
                        let start = Instant::now();
                        let g = lm.model.generate(batch, &opts, &mut |_, _| {})?;
                        if ctx.device.is_cuda() {
                            tch::Cuda::synchronize(0);
                        }
                        (start.elapsed().as_secs_f64(), g.tokens)
                    }
                    None => match hf.as_mut() {
                        Some(h) => h.generate(batch, s.new_tokens)?,
                        None => continue,
                    },
                };
                ensure!(
                    toks.iter().all(|t| t.len() == s.new_tokens),
                    "{}: a row stopped before {} tokens",
                    sides[side],
                    s.new_tokens
                );
                secs[side][bi].push(t);
                if b == 1 {
                    tokens[side] = Some(toks);
                }
            }
        }
    }
    drop(hf);
    let mut m = Metrics::from([
        ("new_tokens".into(), s.new_tokens as f64),
        ("rounds".into(), s.rounds as f64),
        ("prompt_tokens_batch1".into(), ps[0].len() as f64),
    ]);
    for (side, name) in sides.iter().enumerate() {
        for (bi, &b) in BATCHES.iter().enumerate() {
            let v = &secs[side][bi];
            if v.is_empty() {
                continue;
            }
            let tps: Vec<f64> = v.iter().map(|t| (b * s.new_tokens) as f64 / t).collect();
            insert_spread(&mut m, &format!("{name}.batch{b}.tokens_per_second"), &tps);
        }
    }
    // Ratios of time per token, per round, against transformers f32.
    if !secs[peer][0].is_empty() {
        for (side, name) in sides.iter().enumerate().take(peer) {
            for (bi, &b) in BATCHES.iter().enumerate() {
                let r: Vec<f64> = secs[side][bi]
                    .iter()
                    .zip(&secs[peer][bi])
                    .map(|(a, t)| a / t)
                    .collect();
                insert_spread(&mut m, &format!("{name}.batch{b}.time_ratio"), &r);
            }
        }
        // Greedy agreement at batch 1: tokens equal before the first difference.
        if let Some(hf_t) = &tokens[peer] {
            let same = |a: &[i64], b: &[i64]| a.iter().zip(b).take_while(|(x, y)| x == y).count();
            for (side, name) in sides.iter().enumerate().take(peer) {
                if let Some(t) = &tokens[side] {
                    m.insert(
                        format!("{name}.greedy_tokens_equal"),
                        same(&t[0], &hf_t[0]) as f64,
                    );
                }
            }
        }
    }
    // Bandwidth and bytes read per decoded token (every linear's weight, and the head's:
    // the tied embedding table is read whole by the head).
    let bw = read_bandwidth(ctx.device);
    let weight_elems: i64 = f32_lm
        .model
        .named_parameters()
        .iter()
        .filter(|(n, _)| !n.contains("norm"))
        .map(|(_, t)| t.numel() as i64)
        .sum();
    let embed_elems = f32_lm
        .model
        .named_parameters()
        .iter()
        .filter(|(n, _)| n.contains("embed_tokens"))
        .map(|(_, t)| t.numel() as i64)
        .sum::<i64>();
    m.insert("read_bandwidth_gb_per_s".into(), bw / 1e9);
    // Kept codes: Q4_1 linears packed for the int4 kernel hold 16 bytes of nibbles and
    // 4 of bf16 (scale, zero) per 32 weights; the embedding table (the head) is bf16.
    let codes_bytes = (weight_elems - embed_elems) as f64 * 20.0 / 32.0 + embed_elems as f64 * 2.0;
    for (name, per_token) in [
        ("f32", weight_elems as f64 * 4.0),
        ("bf16", weight_elems as f64 * 2.0),
        ("bf16_codes", codes_bytes),
    ] {
        m.insert(format!("bytes_per_token_{name}_mb"), per_token / 1e6);
        m.insert(
            format!("bandwidth_limit_{name}_tokens_per_second"),
            bw / per_token,
        );
    }
    notes.push(format!(
        "Greedy decoding of exactly {} new tokens (EOS does not stop either side) after \
         chat-template prompts built from the sections fixture's test synopses (batch 1: \
         the first, {} tokens; batch 8: the first 8, left-padded). {} rounds; each round \
         runs reuse f32, reuse bf16, reuse bf16 with the GGUF's Q4_1 codes kept (libtorch's \
         int4 kernel) and transformers f32 (a Python child process loading \
         the same GGUF, dequantized to f32, same threads) in an order that rotates per \
         round; each sample is one whole generate call (prefill included), after one \
         warm-up call per side.",
        s.new_tokens,
        ps[0].len(),
        s.rounds
    ));
    notes.push(
        "`*.time_ratio_*`: per-round ratios of reuse's time to transformers' \
         f32 time for the same batch (below 1: reuse faster). `*.greedy_tokens_equal`: \
         tokens of the batch-1 continuation equal to transformers' before the first \
         difference (bf16 is expected to drift where two logits are within its precision)."
            .into(),
    );
    notes.push(
        "`read_bandwidth_gb_per_s`: median of 5 sums over a 512 MiB f32 tensor. \
         `bytes_per_token_*`: every linear weight and the tied head's table (read whole \
         each step), without norms (for `bf16_codes`: 20 bytes per 32 weights of the \
         packed Q4_1 linears, the head's table in bf16); `bandwidth_limit_*`: tokens/s if a batch-1 step did \
         nothing but read those bytes at that bandwidth."
            .into(),
    );
    Ok(Outcome { metrics: m, notes })
}

/// `core.smollm2_score`'s sizes.
pub(super) struct ScoreSizes {
    texts: usize,
    rounds: usize,
}

impl Knobs for ScoreSizes {
    fn counts(&self) -> Counts {
        vec![("texts", self.texts), ("rounds", self.rounds)]
    }
}

pub(super) const SCORE_SIZES: Sizes<ScoreSizes> = Sizes {
    quick: ScoreSizes {
        texts: 16,
        rounds: 1,
    },
    cpu: None,
    full: ScoreSizes {
        texts: 256,
        rounds: 3,
    },
    cuda: OnCuda::SAME,
};

const SCORE_BATCH: usize = 8;

/// Perplexity of held-out text (the sections fixture's test synopses, with BOS as the
/// tokenizer adds it), reuse against transformers on the same GGUF: equal NLL, and time.
pub fn smollm2_score(ctx: &Ctx, bar: &ProgressBar) -> Result<Outcome> {
    let s = ctx.sizes(&SCORE_SIZES);
    let lm = setup(ctx, Kind::Float)?;
    let splits = super::sections()?;
    let rows = splits
        .test
        .texts
        .iter()
        .take(s.texts)
        .map(|t| Ok(encode(&lm.tokenizer, t, true)?))
        .collect::<Result<Vec<_>>>()?;
    let pad = lm.model.config.pad_token_id().unwrap_or(2);
    let mut hf = match ctx.python() {
        Some(py) => Some(HfLm::start(ctx, &py, &reuse_testkit::smollm2_gguf(), pad)?),
        None => None,
    };
    let ours = |rows: &[Vec<i64>]| -> Result<(f64, f64, usize)> {
        let start = Instant::now();
        let v = lm.model.sequence_nlls(rows, SCORE_BATCH)?;
        let secs = start.elapsed().as_secs_f64();
        let (sum, n) = v.iter().fold((0.0, 0), |(s, c), (x, k)| (s + x, c + k));
        Ok((secs, sum, n))
    };
    ours(&rows[..SCORE_BATCH.min(rows.len())])?; // warm-up
    if let Some(h) = hf.as_mut() {
        h.score(&rows[..SCORE_BATCH.min(rows.len())], SCORE_BATCH)?;
    }
    let (mut t_ours, mut t_hf) = (Vec::new(), Vec::new());
    let (mut nll_ours, mut nll_hf, mut tokens) = (0.0, f64::NAN, 0);
    for round in 0..s.rounds {
        bar.set_message(format!(
            "core.smollm2_score round {}/{}",
            round + 1,
            s.rounds
        ));
        for k in 0..2 {
            if (round + k) % 2 == 0 {
                let (t, sum, n) = ours(&rows)?;
                t_ours.push(t);
                nll_ours = sum / n as f64;
                tokens = n;
            } else if let Some(h) = hf.as_mut() {
                let (t, sum, n) = h.score(&rows, SCORE_BATCH)?;
                ensure!(n == tokens || tokens == 0, "transformers scored {n} tokens");
                t_hf.push(t);
                nll_hf = sum / n as f64;
            }
        }
    }
    drop(hf);
    let mut m = Metrics::from([
        ("texts".into(), rows.len() as f64),
        ("tokens".into(), tokens as f64),
        ("rounds".into(), s.rounds as f64),
        ("reuse.nll".into(), nll_ours),
        ("reuse.perplexity".into(), nll_ours.exp()),
    ]);
    insert_spread(&mut m, "reuse.seconds", &t_ours);
    if !t_hf.is_empty() {
        m.insert("transformers.nll".into(), nll_hf);
        m.insert("transformers.perplexity".into(), nll_hf.exp());
        m.insert(
            "nll_relative_difference".into(),
            ((nll_ours - nll_hf) / nll_hf).abs(),
        );
        insert_spread(&mut m, "transformers.seconds", &t_hf);
        let r: Vec<f64> = t_ours.iter().zip(&t_hf).map(|(a, b)| a / b).collect();
        insert_spread(&mut m, "time_ratio", &r);
    }
    Ok(Outcome {
        metrics: m,
        notes: vec![format!(
            "Next-token NLL (nats) over {} test synopses of the sections fixture ({tokens} \
             scored tokens: every position after the first, the first being BOS when the \
             tokenizer adds one), f32, batches of {SCORE_BATCH} right-padded, longest \
             first, on both sides (transformers: labels -100 on padding). {} rounds, the \
             side that goes first alternating; each sample is one pass over all texts. \
             `time_ratio_*`: per-round ratio of reuse's time to transformers' \
             (below 1: reuse faster).",
            rows.len(),
            s.rounds
        )],
    })
}

/// The environment variable that makes the bench binary one `core.smollm2_loss_memory`
/// child run (a process per run, so each peak RSS is its own).
pub const LOSS_CHILD: &str = "REUSE_BENCH_LM_LOSS_CHILD";

/// One child run of [`smollm2_loss_memory`].
#[derive(serde::Serialize, serde::Deserialize)]
struct LossRun {
    chunked: bool,
    batch: usize,
    block: usize,
    steps: usize,
    cuda: bool,
}

/// What a child run prints on its last stdout line.
#[derive(serde::Serialize, serde::Deserialize)]
struct LossResult {
    load_rss_mb: f64,
    peak_rss_mb: f64,
    step_ms: f64,
    loss: f64,
}

/// The child side: SmolLM2 in f32, every weight trainable, `steps` forward + backward
/// passes of next-token loss on packed synopses (`batch` blocks of `block` tokens),
/// with the head + loss chunked or on full logits.
pub fn loss_child(spec: &str) -> Result<()> {
    let run: LossRun = serde_json::from_str(spec).context("core.smollm2_loss_memory child spec")?;
    let device = if run.cuda {
        Device::Cuda(0)
    } else {
        Device::Cpu
    };
    let lm = LanguageModel::load(
        &reuse_testkit::smollm2_gguf(),
        &LoadOptions::new(device, Kind::Float),
    )?;
    let splits = super::sections()?;
    let eos = lm.stop_tokens.first().copied().unwrap_or(2);
    let docs = splits
        .train
        .texts
        .iter()
        .take(run.batch * run.block / 8)
        .map(|t| Ok(encode(&lm.tokenizer, t, true)?))
        .collect::<Result<Vec<_>>>()?;
    let data = reuse_core::data::lm::PackedText::from_ids(&docs, eos, run.block)?;
    ensure!(
        data_len(&data) >= run.batch,
        "too little text for one batch"
    );
    let idx: Vec<i64> = (0..run.batch as i64).collect();
    let batch = reuse_core::data::BatchSource::batch(&data, &idx, device)?;
    let load_rss_mb = super::peft::peak_rss_mb();
    let opts = reuse_core::ForwardOptions {
        logits: !run.chunked,
        ..Default::default()
    };
    let params = lm.model.params();
    let (mut ms, mut loss) = (Vec::new(), 0.0);
    for _ in 0..run.steps {
        params.zero_grad();
        let start = Instant::now();
        let out = reuse_core::Trainable::forward(&lm.model, &batch, true, opts)?;
        let l = reuse_core::Trainable::loss(&lm.model, &out, &batch)?;
        l.backward();
        loss = l.double_value(&[]);
        ms.push(start.elapsed().as_secs_f64() * 1e3);
    }
    let r = LossResult {
        load_rss_mb,
        peak_rss_mb: super::peft::peak_rss_mb(),
        step_ms: median(&ms),
        loss,
    };
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}

fn data_len(d: &reuse_core::data::lm::PackedText) -> usize {
    reuse_core::data::BatchSource::len(d)
}

/// `core.smollm2_loss_memory`'s sizes.
pub(super) struct LossSizes {
    batch: usize,
    block: usize,
    steps: usize,
}

impl Knobs for LossSizes {
    fn counts(&self) -> Counts {
        vec![
            ("batch", self.batch),
            ("block", self.block),
            ("steps", self.steps),
        ]
    }
}

pub(super) const LOSS_SIZES: Sizes<LossSizes> = Sizes {
    quick: LossSizes {
        batch: 2,
        block: 64,
        steps: 1,
    },
    cpu: None,
    full: LossSizes {
        batch: 4,
        block: 256,
        steps: 1,
    },
    cuda: OnCuda::SAME,
};

/// Peak memory of a training step (forward + backward, every weight trainable) with the
/// head + loss on full `[tokens, vocab]` logits against the chunked path, a process per
/// run; the two losses must agree.
pub fn smollm2_loss_memory(ctx: &Ctx, bar: &ProgressBar) -> Result<Outcome> {
    let s = ctx.sizes(&LOSS_SIZES);
    let exe = std::env::current_exe()?;
    let mut res = Vec::new();
    for chunked in [false, true] {
        bar.set_message(format!(
            "core.smollm2_loss_memory: {}",
            if chunked { "chunked" } else { "full logits" }
        ));
        let spec = serde_json::to_string(&LossRun {
            chunked,
            batch: s.batch,
            block: s.block,
            steps: s.steps,
            cuda: ctx.device.is_cuda(),
        })?;
        let o = Command::new(&exe)
            .env(LOSS_CHILD, spec)
            .output()
            .context("starting a core.smollm2_loss_memory child run")?;
        ensure!(
            o.status.success(),
            "core.smollm2_loss_memory child run failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let stdout = String::from_utf8_lossy(&o.stdout);
        let r: LossResult = serde_json::from_str(stdout.lines().last().unwrap_or_default())
            .with_context(|| format!("child output: {stdout}"))?;
        res.push(r);
    }
    let (full, chunk) = (&res[0], &res[1]);
    ensure!(
        ((full.loss - chunk.loss) / full.loss).abs() < 1e-4,
        "the chunked loss {} differs from the full-logits loss {}",
        chunk.loss,
        full.loss
    );
    let tokens = s.batch * s.block;
    let logits_mb = (tokens * 49_152 * 4) as f64 / 1e6;
    let m = Metrics::from([
        ("tokens".into(), tokens as f64),
        ("full_logits.peak_rss_mb".into(), full.peak_rss_mb),
        ("full_logits.load_rss_mb".into(), full.load_rss_mb),
        ("full_logits.step_ms".into(), full.step_ms),
        ("chunked.peak_rss_mb".into(), chunk.peak_rss_mb),
        ("chunked.load_rss_mb".into(), chunk.load_rss_mb),
        ("chunked.step_ms".into(), chunk.step_ms),
        (
            "step_peak_over_load_ratio".into(),
            (chunk.peak_rss_mb - chunk.load_rss_mb) / (full.peak_rss_mb - full.load_rss_mb),
        ),
        ("loss".into(), full.loss),
        ("one_logits_tensor_mb".into(), logits_mb),
    ]);
    Ok(Outcome {
        metrics: m,
        notes: vec![format!(
            "One process per run (peak RSS from VmHWM): SmolLM2-135M-Instruct from its GGUF in \
             f32, every weight trainable, {} forward + backward passes of next-token loss on \
             {} blocks of {} tokens of packed training synopses ({tokens} tokens; one f32 \
             [tokens, vocab] tensor is {logits_mb:.0} MB). `full_logits`: the head's logits \
             materialised and the loss on them; `chunked`: the head and loss {} labelled \
             tokens at a time, gradients carried by the loss. `step_peak_over_load_ratio`: \
             chunked's peak above its loaded size over full logits' (below 1: less memory). \
             `step_ms`: median step time. The two losses agree to 1e-4.",
            s.steps,
            s.batch,
            s.block,
            reuse_core::models::llama::LOSS_CHUNK
        )],
    })
}

/// The claims-table rows this file's experiments measure (see `crate::claims`).
pub const CLAIMS: &[Claim] = &[
    Claim {
        text: "SmolLM2 decoding, batch 1: time per token, reuse f32 / transformers f32",
        experiment: "core.smollm2_generate",
        target: "<= 0.9",
        keys: &[
            "reuse_f32.batch1.time_ratio_median",
            "reuse_f32.batch1.time_ratio_sd",
        ],
        eval: |g| {
            let r = g("reuse_f32.batch1.time_ratio_median");
            (
                format!("{r:.3}"),
                format!("sd {:.3} over rounds", g("reuse_f32.batch1.time_ratio_sd")),
                Some(r <= 0.9),
            )
        },
    },
    Claim {
        text: "SmolLM2 decoding, batch 8: time per token, reuse f32 / transformers f32",
        experiment: "core.smollm2_generate",
        target: "<= 0.9",
        keys: &[
            "reuse_f32.batch8.time_ratio_median",
            "reuse_f32.batch8.time_ratio_sd",
        ],
        eval: |g| {
            let r = g("reuse_f32.batch8.time_ratio_median");
            (
                format!("{r:.3}"),
                format!("sd {:.3} over rounds", g("reuse_f32.batch8.time_ratio_sd")),
                Some(r <= 0.9),
            )
        },
    },
    Claim {
        text: "SmolLM2 decoding, batch 1: reuse bf16 tokens/s over transformers f32",
        experiment: "core.smollm2_generate",
        target: ">= 2",
        keys: &[
            "reuse_bf16.batch1.time_ratio_median",
            "reuse_bf16.greedy_tokens_equal",
        ],
        eval: |g| {
            let speedup = 1.0 / g("reuse_bf16.batch1.time_ratio_median");
            (
                format!("{speedup:.2}x"),
                format!(
                    "greedy tokens equal to transformers' for the first {:.0}",
                    g("reuse_bf16.greedy_tokens_equal")
                ),
                Some(speedup >= 2.0),
            )
        },
    },
    Claim {
        text: "SmolLM2 decoding, batch 1: reuse bf16 on the GGUF's kept Q4_1 codes, tokens/s over transformers f32",
        experiment: "core.smollm2_generate",
        target: ">= 2",
        keys: &[
            "reuse_bf16_codes.batch1.time_ratio_median",
            "reuse_bf16_codes.greedy_tokens_equal",
        ],
        eval: |g| {
            let speedup = 1.0 / g("reuse_bf16_codes.batch1.time_ratio_median");
            (
                format!("{speedup:.2}x"),
                format!(
                    "greedy tokens equal to transformers' for the first {:.0}",
                    g("reuse_bf16_codes.greedy_tokens_equal")
                ),
                Some(speedup >= 2.0),
            )
        },
    },
    Claim {
        text: "SmolLM2 perplexity: reuse vs transformers (NLL relative difference; time ratio)",
        experiment: "core.smollm2_score",
        target: "NLL <= 1e-4 rel; time <= 0.9",
        keys: &["nll_relative_difference", "time_ratio_median"],
        eval: |g| {
            let d = g("nll_relative_difference");
            let r = g("time_ratio_median");
            (
                format!("{d:.1e}; {r:.3}"),
                format!("perplexity {:.3}", g("reuse.perplexity")),
                Some(d <= 1e-4 && r <= 0.9),
            )
        },
    },
    Claim {
        text: "Causal-LM training step: peak memory above the loaded model, chunked head + loss / full logits",
        experiment: "core.smollm2_loss_memory",
        target: "ratio (< 1: less memory)",
        keys: &["step_peak_over_load_ratio", "chunked.peak_rss_mb", "full_logits.peak_rss_mb"],
        eval: |g| {
            (
                format!("{:.3}", g("step_peak_over_load_ratio")),
                format!(
                    "peak RSS {:.0} MB vs {:.0} MB",
                    g("chunked.peak_rss_mb"),
                    g("full_logits.peak_rss_mb")
                ),
                None,
            )
        },
    },
];
