//! `reuse lm score`: the standard perplexity evaluation of a causal LM on texts.

use std::path::PathBuf;

use anyhow::{bail, Result};
use reuse_core::data::lm::encode;

use crate::adapters::{attach, AdapterArg};
use crate::shared::{load_lm, parse_device, parse_dtype, read_lines};

/// Causal language models.
#[derive(clap::Subcommand)]
pub enum Command {
    /// Per-text token count and mean next-token NLL (nats), and the total perplexity,
    /// as transformers computes them (the first token conditioned on BOS when the
    /// tokenizer adds one, unscored otherwise).
    Score(ScoreArgs),
}

/// Arguments of `reuse lm score`.
#[derive(clap::Args)]
pub struct ScoreArgs {
    /// A `.gguf` file or a Hugging Face causal-LM folder.
    #[arg(long)]
    model: PathBuf,
    /// Texts, one per line.
    #[arg(long)]
    texts: PathBuf,
    /// Write the scores here as JSON; without it, to stdout.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Texts per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Tokens per text at most (longer texts are an error naming them).
    #[arg(long, default_value_t = 2048)]
    max_length: usize,
    /// Compute in f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// cpu or cuda (default: cuda if available).
    #[arg(long)]
    device: Option<String>,
    /// For a .gguf model: keep its Q8_0/Q4_0/Q4_1 linear weights in their 8- or 4-bit
    /// codes (about the file's size in memory) instead of dequantizing them to --dtype.
    /// With --dtype bf16 on the CPU, the 4-bit weights multiply through libtorch's int4
    /// kernel (fast); in f32 each matmul dequantizes its weight exactly (same results
    /// as without the flag, slower). The token embedding table is dequantized either way.
    #[arg(long)]
    keep_codes: bool,
    /// A PEFT LoRA adapter folder to apply; repeat to apply several (their outputs sum).
    #[arg(long = "adapter", value_name = "DIR")]
    adapters: Vec<AdapterArg>,
}

pub fn run(c: Command) -> Result<()> {
    match c {
        Command::Score(a) => score(a),
    }
}

fn score(a: ScoreArgs) -> Result<()> {
    let device = parse_device(a.device.as_deref())?;
    let kind = parse_dtype(&a.dtype)?;
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let texts = read_lines(&a.texts)?;
    let lm = load_lm(&a.model, device, kind, a.keep_codes)?;
    let (lm, attached) = attach(lm, &a.adapters)?;
    if attached.routed {
        bail!("`lm score` applies every --adapter to every text: give them as DIR, not NAME=DIR");
    }
    let mut rows = Vec::with_capacity(texts.len());
    for (i, t) in texts.iter().enumerate() {
        let ids = encode(&lm.tokenizer, t, true)?;
        if ids.len() > a.max_length {
            bail!(
                "{} line {}: {} tokens, more than --max-length {}",
                a.texts.display(),
                i + 1,
                ids.len(),
                a.max_length
            );
        }
        rows.push(ids);
    }
    let nlls = lm.model.sequence_nlls(&rows, a.batch_size)?;
    let (sum, count) = nlls
        .iter()
        .fold((0.0, 0usize), |(s, c), (x, n)| (s + x, c + n));
    let per_text: Vec<serde_json::Value> = nlls
        .iter()
        .map(|(s, n)| {
            serde_json::json!({
                "tokens": n,
                "nll": if *n > 0 { serde_json::json!(s / *n as f64) } else { serde_json::Value::Null },
            })
        })
        .collect();
    let mean = sum / count.max(1) as f64;
    let report = serde_json::json!({
        "model": a.model.display().to_string(),
        "adapters": a.adapters.iter().map(|x| x.dir.display().to_string()).collect::<Vec<_>>(),
        "texts": texts.len(),
        "tokens": count,
        "nll": mean,
        "perplexity": mean.exp(),
        "per_text": per_text,
    });
    let text = serde_json::to_string_pretty(&report)?;
    match &a.out {
        Some(out) => {
            reuse_core::checkpoint::write_atomic(out, text.as_bytes())?;
            eprintln!(
                "{} texts, {count} scored tokens: NLL {mean:.4} nats, perplexity {:.3}; wrote {}",
                texts.len(),
                mean.exp(),
                out.display()
            );
        }
        None => println!("{text}"),
    }
    Ok(())
}
