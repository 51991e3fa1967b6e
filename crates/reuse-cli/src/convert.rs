//! `reuse convert`: a `.gguf` causal LM (or a model folder) as a Hugging Face folder
//! that transformers loads with the same logits.

use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::shared::{load_lm, parse_dtype};

/// Arguments of `reuse convert`.
#[derive(clap::Args)]
pub struct Args {
    /// A `.gguf` file (or a causal-LM folder).
    #[arg(long)]
    model: PathBuf,
    /// The Hugging Face folder to write (config.json, model.safetensors, tokenizer.json,
    /// tokenizer_config.json with the chat template, generation_config.json).
    #[arg(long)]
    out: PathBuf,
    /// Weights' dtype in the folder: f32 (the GGUF's codes dequantized exactly), bf16
    /// or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Replace `--out` if it exists and is not empty.
    #[arg(long)]
    overwrite: bool,
}

pub fn run(a: Args) -> Result<()> {
    let kind = parse_dtype(&a.dtype)?;
    // Refuse a full output folder before the (slow) load.
    reuse_core::models::folder::check_out(&a.out, a.overwrite)?;
    let lm = load_lm(&a.model, tch::Device::Cpu, kind, false)?;
    lm.save_folder(&a.out, a.overwrite)
        .with_context(|| format!("cannot write {}", a.out.display()))?;
    let params: i64 = reuse_core::Model::named_parameters(&lm.model)
        .iter()
        .map(|(_, t)| t.numel() as i64)
        .sum();
    eprintln!(
        "wrote {} ({} blocks, {params} parameters, {})",
        a.out.display(),
        lm.model.layers.len(),
        a.dtype
    );
    Ok(())
}
