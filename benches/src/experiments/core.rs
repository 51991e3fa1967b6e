//! reuse-core experiments.

use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::ProgressBar;
use reuse_core::data::{load_digits, load_text_splits};
use reuse_core::models::SentenceEncoder;
use reuse_core::trainer::accuracy;
use reuse_core::{Activation, Mlp, Model, TrainConfig, Trainer};
use reuse_testkit::{fixtures_dir, minilm_dir};
use tch::Kind;

use super::{Ctx, Metrics};

/// An MLP (64-128-10, ReLU) trained with AdamW on the digits fixture.
pub fn digits_mlp(ctx: &Ctx, _bar: &ProgressBar) -> Result<Metrics> {
    let d = load_digits(&fixtures_dir().join("digits/digits.csv.gz"))?;
    tch::manual_seed(0);
    let net = Mlp::new(&[64, 128, 10], Activation::Relu, ctx.device)?;
    let mut t = Trainer::new(TrainConfig {
        epochs: 25,
        lr: 2e-3,
        batch_size: 32,
        device: ctx.device,
        ..Default::default()
    });
    let r = t.fit(&net, &d.train, None, &mut [])?;
    let acc = accuracy(&net, &d.test, 256, ctx.device)?;
    Ok(Metrics::from([
        ("test_accuracy".into(), acc),
        ("train_seconds".into(), r.seconds),
        ("params".into(), net.params().count() as f64),
    ]))
}

const BATCH: usize = 32;

/// Embeddings per second over the Debian fixture's test texts (real short sentences),
/// f32 and bf16, and sentence-transformers on the same texts in the same run.
pub fn minilm_embed(ctx: &Ctx, bar: &ProgressBar) -> Result<Metrics> {
    let dir = minilm_dir()?;
    let splits = load_text_splits(&fixtures_dir().join("debian_sections/sections.tsv.gz"))?;
    let texts: Vec<&str> = splits.test.texts.iter().map(String::as_str).collect();
    let mut m = Metrics::new();
    m.insert("sentences".into(), texts.len() as f64);
    let mut f32_seconds = 0.0;
    for (kind, name) in [(Kind::Float, "f32"), (Kind::BFloat16, "bf16")] {
        bar.set_message(format!("core.minilm_embed {name}"));
        let enc = SentenceEncoder::load(&dir, ctx.device, kind)?;
        let _ = enc.encode(&texts[..BATCH.min(texts.len())], BATCH)?; // warm-up
        let start = Instant::now();
        let e = enc.encode(&texts, BATCH)?;
        let secs = start.elapsed().as_secs_f64();
        anyhow::ensure!(e.size()[0] as usize == texts.len());
        m.insert(
            format!("sentences_per_second_{name}"),
            texts.len() as f64 / secs,
        );
        if kind == Kind::Float {
            f32_seconds = secs;
        }
    }
    match ctx.python() {
        Some(py) => {
            bar.set_message("core.minilm_embed sentence-transformers");
            match sentence_transformers_seconds(ctx, &py, &dir, &texts) {
                Ok(theirs) => {
                    m.insert(
                        "sentence_transformers_sentences_per_second".into(),
                        texts.len() as f64 / theirs,
                    );
                    m.insert(
                        "ratio_vs_sentence_transformers".into(),
                        f32_seconds / theirs,
                    );
                }
                Err(e) => super::say(
                    bar,
                    format!("sentence-transformers comparison skipped: {e:#}"),
                ),
            }
        }
        None => super::say(bar, "sentence-transformers comparison skipped: no .venv"),
    }
    Ok(m)
}

fn sentence_transformers_seconds(
    ctx: &Ctx,
    py: &std::path::Path,
    dir: &std::path::Path,
    texts: &[&str],
) -> Result<f64> {
    let tmp = ctx.root.join("target/reuse-report");
    std::fs::create_dir_all(&tmp)?;
    let input = tmp.join("embed_texts.txt");
    std::fs::write(&input, texts.join("\n"))?;
    let device = if ctx.device.is_cuda() { "cuda" } else { "cpu" };
    let out = Command::new(py)
        .arg(ctx.root.join("benches/python/st_embed.py"))
        .args(["--model".as_ref(), dir.as_os_str()])
        .args(["--texts".as_ref(), input.as_os_str()])
        .args(["--batch-size", &BATCH.to_string(), "--device", device])
        .args(["--threads", &tch::get_num_threads().to_string()])
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .context("running benches/python/st_embed.py")?;
    if !out.status.success() {
        bail!(
            "st_embed.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("st_embed.py output")?;
    v["seconds"]
        .as_f64()
        .context("st_embed.py printed no `seconds`")
}
