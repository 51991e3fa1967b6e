//! `reuse embed`: sentence embeddings of one text per line.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use reuse_core::models::SentenceEncoder;
use reuse_core::Checkpoint;
use reuse_peft::LoraModel;

use crate::shared::{note_set_aside, parse_device, parse_dtype, read_lines};

/// Arguments of `reuse embed`.
#[derive(clap::Args)]
pub struct Args {
    /// Model folder (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// Text file: one text per line (empty lines are empty texts).
    #[arg(long)]
    texts: PathBuf,
    /// Write embeddings here as safetensors (tensor `embeddings`, f32 [n, hidden]);
    /// without it, JSON lines go to stdout.
    #[arg(long)]
    out: Option<PathBuf>,
    /// cpu or cuda (default: cuda if available).
    #[arg(long)]
    device: Option<String>,
    /// Texts per forward pass.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Compute in f32, f16 or bf16 (embeddings are written as f32).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// A PEFT LoRA adapter folder to apply; repeat to apply several (their outputs sum).
    #[arg(long = "adapter", value_name = "DIR")]
    adapters: Vec<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    crate::shared::require_encoder(&a.model, "embed")?;
    let device = parse_device(a.device.as_deref())?;
    let kind = parse_dtype(&a.dtype)?;
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let texts = read_lines(&a.texts)?;
    let mut enc = SentenceEncoder::load_with(&a.model, &reuse_quant::load_options(device, kind))
        .with_context(|| format!("cannot load model from {}", a.model.display()))?;
    if !a.adapters.is_empty() {
        let mut lm = LoraModel::new(enc.bert);
        let mut names = Vec::new();
        for (i, dir) in a.adapters.iter().enumerate() {
            let name = format!("adapter{i}");
            let loaded = lm
                .load_adapter(dir, &name)
                .with_context(|| format!("cannot apply adapter {}", dir.display()))?;
            note_set_aside(dir, &loaded.set_aside);
            names.push(name);
        }
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        lm.set_adapter(&refs)?;
        enc.bert = lm.into_inner();
    }
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let emb = enc.encode(&refs, a.batch_size)?;
    match a.out {
        Some(out) => {
            let mut ck = Checkpoint::new();
            ck.insert("embeddings", emb);
            ck.set_metadata("model", a.model.display().to_string());
            ck.set_metadata("dtype", a.dtype.clone());
            ck.set_metadata("texts", a.texts.display().to_string());
            ck.save(&out)?;
            eprintln!("wrote {} embeddings to {}", texts.len(), out.display());
        }
        None => {
            let stdout = std::io::stdout();
            let mut w = std::io::BufWriter::new(stdout.lock());
            let rows = Vec::<Vec<f32>>::try_from(&emb).context("embeddings to rows")?;
            for (i, r) in rows.iter().enumerate() {
                writeln!(w, "{}", serde_json::json!({"index": i, "embedding": r}))?;
            }
        }
    }
    Ok(())
}
