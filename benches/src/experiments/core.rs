//! reuse-core experiments.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use indicatif::ProgressBar;
use reuse_core::data::load_digits;
use reuse_core::models::SentenceEncoder;
use reuse_core::trainer::accuracy;
use reuse_core::{Activation, Mlp, Model, TrainConfig, Trainer};
use reuse_testkit::{fixtures_dir, minilm_dir};
use tch::Kind;

use super::{insert_spread, mean, sample_sd, Counts, Ctx, Knobs, Metrics, OnCuda, Outcome, Sizes};
use crate::claims::Claim;
use crate::peer::Peer;

/// `core.digits_mlp`'s sizes: its epochs.
pub(super) const DIGITS_MLP_SIZES: Sizes<usize> = Sizes {
    quick: 2,
    cpu: None,
    full: 25,
    cuda: OnCuda::SAME,
};

/// An MLP (64-128-10, ReLU) trained with AdamW on the digits fixture, seeds 0, 1, 2.
pub fn digits_mlp(ctx: &Ctx, _bar: &ProgressBar) -> Result<Outcome> {
    let seeds = &ctx.seeds;
    let d = load_digits(&fixtures_dir().join("digits/digits.csv.gz"))?;
    let epochs = *ctx.sizes(&DIGITS_MLP_SIZES);
    let (mut accs, mut secs) = (Vec::new(), Vec::new());
    let mut params = 0;
    for seed in seeds.iter().copied() {
        tch::manual_seed(seed as i64);
        let net = Mlp::new(&[64, 128, 10], Activation::Relu, ctx.device)?;
        let mut t = Trainer::new(TrainConfig {
            epochs,
            lr: 2e-3,
            batch_size: 32,
            device: ctx.device,
            seed,
            ..Default::default()
        });
        let r = t.fit(&net, &d.train, None, &mut [])?;
        accs.push(accuracy(&net, &d.test, 256, ctx.device)?);
        secs.push(r.seconds);
        params = net.params().count();
    }
    let mut m = Metrics::from([
        ("test_accuracy".into(), mean(&accs)),
        ("test_accuracy_sd".into(), sample_sd(&accs)),
        ("seeds".into(), seeds.len() as f64),
        ("epochs".into(), epochs as f64),
        ("params".into(), params as f64),
    ]);
    insert_spread(&mut m, "train_seconds", &secs);
    Ok(Outcome {
        metrics: m,
        notes: vec![
            format!(
                "Seeds {seeds:?} (initialisation and data order); `test_accuracy` is \
                 their mean, `test_accuracy_sd` the sample sd; `train_seconds_*` is one whole fit \
                 per seed ({epochs} epochs)."
            ),
            "Hyperparameters (AdamW, lr 2e-3, batch 32) are fixed in the code, not \
             searched by this bench; the digits fixture has no dev split to choose them on."
                .into(),
        ],
    })
}

const BATCH: usize = 32;

/// sentence-transformers as a [`Peer`] (benches/python/st_embed.py) that embeds the
/// texts file once per `run` line and answers with the seconds it took.
struct StChild(Peer);

impl StChild {
    fn start(ctx: &Ctx, py: &Path, model: &Path, texts: &[&str]) -> Result<Self> {
        let tmp = ctx.report_dir();
        std::fs::create_dir_all(&tmp)?;
        let input = tmp.join("embed_texts.txt");
        std::fs::write(&input, texts.join("\n"))?;
        let device = if ctx.device.is_cuda() { "cuda" } else { "cpu" };
        let (peer, ready) = Peer::start(
            "st_embed",
            &tmp,
            Command::new(py)
                .arg(ctx.root.join("benches/python/st_embed.py"))
                .args(["--model".as_ref(), model.as_os_str()])
                .args(["--texts".as_ref(), input.as_os_str()])
                .args(["--batch-size", &BATCH.to_string(), "--device", device])
                .args(["--threads", &tch::get_num_threads().to_string()]),
        )?;
        ensure!(
            ready["sentences"].as_u64() == Some(texts.len() as u64),
            "st_embed.py read {} texts, expected {}",
            ready["sentences"],
            texts.len()
        );
        Ok(Self(peer.quit_with("quit")))
    }

    /// Seconds for one pass over the texts.
    fn run(&mut self) -> Result<f64> {
        self.0.ask("run")?["seconds"]
            .as_f64()
            .context("st_embed.py printed no `seconds`")
    }
}

/// `core.minilm_embed`'s sizes.
pub(super) struct MinilmEmbedSizes {
    /// Of the sections' test texts, the first this many (`usize::MAX`: all).
    texts: usize,
    rounds: usize,
}

const MINILM_EMBED_FULL: MinilmEmbedSizes = MinilmEmbedSizes {
    texts: usize::MAX,
    rounds: 5,
};

pub(super) const MINILM_EMBED_SIZES: Sizes<MinilmEmbedSizes> = Sizes {
    quick: MinilmEmbedSizes {
        texts: 96,
        rounds: 2,
    },
    cpu: None,
    full: MINILM_EMBED_FULL,
    cuda: OnCuda {
        quick: None,
        full: Some(MinilmEmbedSizes {
            rounds: 10,
            ..MINILM_EMBED_FULL
        }),
    },
};

impl Knobs for MinilmEmbedSizes {
    fn counts(&self) -> Counts {
        vec![("texts", self.texts), ("rounds", self.rounds)]
    }
}

/// Embeddings per second over the Debian fixture's test texts (real short sentences):
/// Rust f32, Rust bf16 and sentence-transformers, in interleaved rounds.
pub fn minilm_embed(ctx: &Ctx, bar: &ProgressBar) -> Result<Outcome> {
    let s = ctx.sizes(&MINILM_EMBED_SIZES);
    let dir = minilm_dir()?;
    let splits = super::sections()?;
    let mut texts: Vec<&str> = splits.test.texts.iter().map(String::as_str).collect();
    texts.truncate(s.texts);
    let rounds = s.rounds;
    let n = texts.len() as f64;

    let f32_enc = SentenceEncoder::load(&dir, ctx.device, Kind::Float)?;
    let bf16_enc = SentenceEncoder::load(&dir, ctx.device, Kind::BFloat16)?;
    for enc in [&f32_enc, &bf16_enc] {
        let _ = enc.encode(&texts[..BATCH.min(texts.len())], BATCH)?; // warm-up
    }
    let mut notes = Vec::new();
    let mut st = match ctx.python() {
        Some(py) => {
            bar.set_message("core.minilm_embed starting sentence-transformers");
            match StChild::start(ctx, &py, &dir, &texts) {
                Ok(c) => Some(c),
                Err(e) => {
                    let msg = format!("sentence-transformers comparison skipped: {e:#}");
                    super::say(bar, &msg);
                    notes.push(msg);
                    None
                }
            }
        }
        None => {
            let msg = "sentence-transformers comparison skipped: no .venv";
            super::say(bar, msg);
            notes.push(msg.into());
            None
        }
    };
    let rust = |enc: &SentenceEncoder| -> Result<f64> {
        let start = Instant::now();
        let e = enc.encode(&texts, BATCH)?;
        if ctx.device.is_cuda() {
            tch::Cuda::synchronize(0);
        }
        let secs = start.elapsed().as_secs_f64();
        ensure!(e.size()[0] as usize == texts.len());
        Ok(secs)
    };
    // Seconds per pass: [rust f32, rust bf16, sentence-transformers] per round; the
    // order rotates from round to round so no side always runs first.
    let mut secs: [Vec<f64>; 3] = Default::default();
    for round in 0..rounds {
        bar.set_message(format!("core.minilm_embed round {}/{rounds}", round + 1));
        for k in 0..3 {
            let side = (round + k) % 3;
            match side {
                0 => secs[0].push(rust(&f32_enc)?),
                1 => secs[1].push(rust(&bf16_enc)?),
                _ => {
                    if let Some(c) = st.as_mut() {
                        secs[2].push(c.run()?);
                    }
                }
            }
        }
    }
    drop(st);
    let per_s = |v: &[f64]| v.iter().map(|s| n / s).collect::<Vec<_>>();
    let mut m = Metrics::from([
        ("sentences".into(), n),
        ("rounds".into(), rounds as f64),
        ("batch_size".into(), BATCH as f64),
    ]);
    insert_spread(&mut m, "rust_f32.sentences_per_second", &per_s(&secs[0]));
    insert_spread(&mut m, "rust_bf16.sentences_per_second", &per_s(&secs[1]));
    if !secs[2].is_empty() {
        insert_spread(
            &mut m,
            "sentence_transformers.sentences_per_second",
            &per_s(&secs[2]),
        );
        for (i, name) in [(0, "rust_f32"), (1, "rust_bf16")] {
            let ratios: Vec<f64> = secs[i].iter().zip(&secs[2]).map(|(a, b)| a / b).collect();
            insert_spread(&mut m, &format!("{name}_time_over_st"), &ratios);
        }
    }
    notes.push(format!(
        "Each sample is one pass over the same {n} texts (the Debian fixture's test \
         synopses) in batches of {BATCH}, after one warm-up batch per side; {rounds} \
         rounds, each running Rust f32, Rust bf16 and sentence-transformers (a Python child \
         process embedding on request, same threads) in an order that rotates per round."
    ));
    notes.push(
        "`*_time_over_st_*` are per-round ratios of Rust's pass time to sentence-transformers' \
         in the same round (below 1: Rust is faster)."
            .into(),
    );
    Ok(Outcome { metrics: m, notes })
}

/// The claims-table rows this file's experiments measure (see `crate::claims`).
pub const CLAIMS: &[Claim] = &[Claim {
    text: "Peer: sentence embedding time, reuse f32 / sentence-transformers",
    experiment: "core.minilm_embed",
    target: "ratio (< 1: reuse faster)",
    keys: &["rust_f32_time_over_st_median", "rust_f32_time_over_st_sd"],
    eval: |g| {
        (
            format!("{:.3}", g("rust_f32_time_over_st_median")),
            format!("sd {:.3} over rounds", g("rust_f32_time_over_st_sd")),
            None,
        )
    },
}];
