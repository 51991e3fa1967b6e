//! `reuse embed`: sentence embeddings of one text per line.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use reuse_core::models::SentenceEncoder;
use reuse_core::Checkpoint;
use reuse_peft::LoraModel;
use tch::{Device, Kind};

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

/// Parses `cpu` / `cuda` / `cuda:N`; `None` picks CUDA when present.
pub fn parse_device(s: Option<&str>) -> Result<Device> {
    let d = match s {
        None => return Ok(Device::cuda_if_available()),
        Some("cpu") => Device::Cpu,
        Some("cuda") => Device::Cuda(0),
        Some(s) if s.starts_with("cuda:") => Device::Cuda(
            s[5..]
                .parse()
                .with_context(|| format!("bad device `{s}`"))?,
        ),
        Some(s) => bail!("--device: expected cpu or cuda, found `{s}`"),
    };
    if d.is_cuda() && !tch::Cuda::is_available() {
        bail!("--device cuda: libtorch sees no CUDA device on this machine");
    }
    Ok(d)
}

/// Parses `f32` / `f16` / `bf16`.
pub fn parse_dtype(s: &str) -> Result<Kind> {
    Ok(match s {
        "f32" | "float32" => Kind::Float,
        "f16" | "float16" => Kind::Half,
        "bf16" | "bfloat16" => Kind::BFloat16,
        other => bail!("--dtype: expected f32, f16 or bf16, found `{other}`"),
    })
}

/// One text per line; a final newline does not add an empty text; `\r\n` accepted.
pub fn read_lines(path: &PathBuf) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read texts file {}", path.display()))?;
    let mut lines: Vec<String> = text
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l).to_string())
        .collect();
    if text.ends_with('\n') || text.is_empty() {
        lines.pop();
    }
    Ok(lines)
}

pub fn run(a: Args) -> Result<()> {
    let device = parse_device(a.device.as_deref())?;
    let kind = parse_dtype(&a.dtype)?;
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let texts = read_lines(&a.texts)?;
    let mut enc = SentenceEncoder::load(&a.model, device, kind)
        .with_context(|| format!("cannot load model from {}", a.model.display()))?;
    if !a.adapters.is_empty() {
        let mut lm = LoraModel::new(enc.bert);
        let mut names = Vec::new();
        for (i, dir) in a.adapters.iter().enumerate() {
            let name = format!("adapter{i}");
            let loaded = lm
                .load_adapter(dir, &name)
                .with_context(|| format!("cannot apply adapter {}", dir.display()))?;
            crate::lora::note_set_aside(dir, &loaded.set_aside);
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
