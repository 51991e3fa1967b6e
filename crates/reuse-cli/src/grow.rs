//! `reuse grow width|depth`: a bigger model folder from a trained one.

use std::path::PathBuf;

use anyhow::{Context, Result};
use reuse_grow::bert::{DeepenBert, DepthMethod, WidenBert};
use reuse_grow::folder::{grow_folder, FolderGrowth, FolderReport};

/// `reuse grow` subcommands.
#[derive(clap::Subcommand)]
pub enum Command {
    /// Wider: FFN inner size, hidden size (a multiple), attention heads. Exact: the grown
    /// model computes the original's function (hidden states repeated when the hidden
    /// size grows).
    Width(WidthArgs),
    /// Deeper: gated layers (exact, reuse format), or copied / stacked layers (load in
    /// Hugging Face transformers, approximate; the drift is printed).
    Depth(DepthArgs),
}

/// Arguments every growth shares.
#[derive(clap::Args)]
pub struct Common {
    /// A BERT model folder (config.json, model.safetensors, tokenizer and
    /// sentence-transformers files). Only read.
    #[arg(long)]
    model: PathBuf,
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

/// Arguments of `reuse grow width`.
#[derive(clap::Args)]
pub struct WidthArgs {
    #[command(flatten)]
    common: Common,
    /// New FFN inner size (Net2WiderNet; at least the current one).
    #[arg(long)]
    intermediate_size: Option<i64>,
    /// New hidden size: a multiple of the current one (uniform replication keeps
    /// LayerNorm exact).
    #[arg(long)]
    hidden_size: Option<i64>,
    /// New number of attention heads: extra heads start with zero output columns; the
    /// head size must be a multiple of the current one.
    #[arg(long)]
    heads: Option<i64>,
    /// Seed of the units and heads new ones copy.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Relative noise added to grown tensors to break symmetry (the growth is then not
    /// exact).
    #[arg(long, default_value_t = 0.0)]
    noise: f64,
}

/// Arguments of `reuse grow depth`.
#[derive(clap::Args)]
pub struct DepthArgs {
    #[command(flatten)]
    common: Common,
    /// The new number of layers.
    #[arg(long)]
    layers: i64,
    /// gated (exact, reuse format), copy (LLaMA Pro positions) or stack (G_stack).
    #[arg(long, default_value = "gated")]
    method: String,
    /// Insert after every K original layers (gated and copy); spread evenly by default.
    #[arg(long, value_name = "K")]
    every: Option<usize>,
}

/// Runs a `reuse grow` subcommand.
pub fn run(c: Command) -> Result<()> {
    let (common, growth, noise) = match c {
        Command::Width(a) => {
            if a.intermediate_size.is_none() && a.hidden_size.is_none() && a.heads.is_none() {
                anyhow::bail!(
                    "nothing to grow: give --intermediate-size, --hidden-size or --heads"
                );
            }
            let g = FolderGrowth::Width(WidenBert {
                intermediate_size: a.intermediate_size,
                hidden_size: a.hidden_size,
                heads: a.heads,
                seed: a.seed,
            });
            (a.common, g, a.noise)
        }
        Command::Depth(a) => {
            let method: DepthMethod = a.method.parse()?;
            let g = FolderGrowth::Depth(DeepenBert {
                layers: a.layers,
                method,
                every: a.every,
            });
            (a.common, g, 0.0)
        }
    };
    crate::shared::require_encoder(&common.model, "grow")?;
    if noise != 0.0 {
        anyhow::ensure!(
            noise > 0.0 && noise.is_finite(),
            "--noise must be a positive number, found {noise}"
        );
    }
    let report = grow_folder(&common.model, &common.out, &growth, noise, common.overwrite)
        .with_context(|| {
            format!(
                "growing {} into {}",
                common.model.display(),
                common.out.display()
            )
        })?;
    print_report(&report, &common)
}

fn print_report(r: &FolderReport, common: &Common) -> Result<()> {
    let v = &r.verification.random;
    let json = serde_json::json!({
        "out": common.out,
        "hidden_size": r.config.hidden_size,
        "intermediate_size": r.config.intermediate_size,
        "num_attention_heads": r.config.num_attention_heads,
        "num_hidden_layers": r.config.num_hidden_layers,
        "exact": r.exact,
        "gated_layers": r.gated_layers,
        "max_abs_diff": v.max_abs_diff,
        "mean_abs_diff": v.mean_abs_diff,
        "embedding_cosine_mean": v.cosine_mean,
        "embedding_cosine_min": v.cosine_min,
        "grow_seconds": r.grow_seconds,
    });
    if common.json {
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        let c = &r.config;
        println!(
            "wrote {}: {} layers, hidden {}, {} heads, FFN {}",
            common.out.display(),
            c.num_hidden_layers,
            c.hidden_size,
            c.num_attention_heads,
            c.intermediate_size
        );
        println!(
            "{} growth; against the original on random tokens: max |diff| {:.3e}, mean |diff| {:.3e}, embedding cosine mean {:.6} (min {:.6})",
            if r.exact { "function-preserving" } else { "approximate" },
            v.max_abs_diff,
            v.mean_abs_diff,
            v.cosine_mean,
            v.cosine_min
        );
        if !r.gated_layers.is_empty() {
            println!(
                "layers {:?} are gated at 0 (encoder.layer.N.reuse_gate): load this folder with reuse; transformers ignores the gates",
                r.gated_layers
            );
        }
    }
    Ok(())
}
