//! `reuse quantize`: an int8 or int4 model folder from a trained one.

use std::path::PathBuf;

use anyhow::{Context, Result};
use reuse_quant::folder::{quantize_folder, QuantizeFolder};
use reuse_quant::gptq::GptqOptions;
use reuse_quant::QuantSpec;

use crate::shared::read_texts;

/// Arguments of `reuse quantize`.
#[derive(clap::Args)]
pub struct Args {
    /// A BERT model folder (config.json, model.safetensors, tokenizer and
    /// sentence-transformers files). Only read.
    #[arg(long)]
    model: PathBuf,
    /// 8 (per-channel symmetric int8) or 4 (group-wise int4).
    #[arg(long)]
    bits: u32,
    /// Weights per scale along the input dimension (int4: default 64; int8: per
    /// channel unless given).
    #[arg(long)]
    group_size: Option<i64>,
    /// Int4 without zero points (symmetric grids).
    #[arg(long)]
    sym: bool,
    /// Calibration texts (one per line, or the last column of a .tsv[.gz]): GPTQ on
    /// their activations instead of round-to-nearest. A few hundred suffice.
    #[arg(long)]
    calibration: Option<PathBuf>,
    /// Use at most this many calibration texts (the first ones).
    #[arg(long, default_value_t = 256)]
    calibration_count: usize,
    /// GPTQ: quantize columns by descending activation (static groups).
    #[arg(long)]
    act_order: bool,
    /// Quantize the word-embedding table too (per row, same settings).
    #[arg(long)]
    embeddings: bool,
    /// Output folder (must not exist, or be empty, unless --overwrite).
    #[arg(long)]
    out: PathBuf,
    /// Replace a non-empty --out.
    #[arg(long)]
    overwrite: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `reuse quantize`.
pub fn run(a: Args) -> Result<()> {
    crate::shared::require_encoder(&a.model, "quantize")?;
    let spec = match a.bits {
        8 => QuantSpec {
            group_size: a.group_size,
            ..QuantSpec::int8()
        },
        4 => QuantSpec::int4(a.group_size.unwrap_or(64), a.sym),
        b => anyhow::bail!("--bits must be 8 or 4, found {b}"),
    };
    anyhow::ensure!(
        !(a.bits == 8 && a.sym),
        "--sym is for int4 (int8 is always symmetric)"
    );
    let calibration = match &a.calibration {
        None => None,
        Some(p) => {
            let mut t = read_texts(p)?;
            anyhow::ensure!(!t.is_empty(), "{}: no texts", p.display());
            t.truncate(a.calibration_count.max(1));
            Some(t)
        }
    };
    anyhow::ensure!(
        calibration.is_some() || !a.act_order,
        "--act-order is a GPTQ setting: give --calibration"
    );
    let opts = QuantizeFolder {
        spec,
        calibration,
        gptq: GptqOptions {
            act_order: a.act_order,
            ..Default::default()
        },
        embeddings: a.embeddings,
    };
    let r = quantize_folder(&a.model, &a.out, &opts, a.overwrite)
        .with_context(|| format!("quantizing {} into {}", a.model.display(), a.out.display()))?;
    let ratio = r.bytes_after as f64 / r.bytes_before as f64;
    if a.json {
        let v = serde_json::json!({
            "out": a.out,
            "quantization_config": r.config,
            "bytes_before": r.bytes_before,
            "bytes_after": r.bytes_after,
            "size_ratio": ratio,
            "calibration_tokens": r.calibration_tokens,
            "seconds": r.seconds,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let c = &r.config;
        println!(
            "wrote {}: {} linears in int{} ({}{}, {}){}; model.safetensors {:.1} MB -> {:.1} MB ({:.3}x) in {:.1} s",
            a.out.display(),
            c.modules.len(),
            c.bits,
            c.group_size
                .map_or("per channel".to_string(), |g| format!("groups of {g}")),
            if c.sym { ", symmetric" } else { ", zero points" },
            if c.method == "gptq" {
                format!("GPTQ on {} calibration tokens", r.calibration_tokens)
            } else {
                "round to nearest".into()
            },
            if c.embeddings { "; embeddings too" } else { "" },
            r.bytes_before as f64 / 1e6,
            r.bytes_after as f64 / 1e6,
            ratio,
            r.seconds
        );
    }
    Ok(())
}

/// Arguments of `reuse dequantize`.
#[derive(clap::Args)]
pub struct DequantizeArgs {
    /// A model folder written by `reuse quantize`. Only read.
    #[arg(long)]
    model: PathBuf,
    /// Output folder: plain f32 weights that transformers and PEFT load (must not
    /// exist, or be empty, unless --overwrite).
    #[arg(long)]
    out: PathBuf,
    /// Replace a non-empty --out.
    #[arg(long)]
    overwrite: bool,
}

/// Runs `reuse dequantize`.
pub fn run_dequantize(a: DequantizeArgs) -> Result<()> {
    crate::shared::require_encoder(&a.model, "dequantize")?;
    reuse_quant::folder::dequantize_folder(&a.model, &a.out, a.overwrite).with_context(|| {
        format!(
            "dequantizing {} into {}",
            a.model.display(),
            a.out.display()
        )
    })?;
    println!(
        "wrote {}: the quantized weights' values in f32, loadable by transformers and PEFT",
        a.out.display()
    );
    Ok(())
}
