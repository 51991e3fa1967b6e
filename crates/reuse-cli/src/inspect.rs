//! `reuse inspect`: the header of any safetensors file, validated.

use std::path::PathBuf;

use anyhow::{Context, Result};
use safetensors::SafeTensors;
use serde_json::json;

/// Arguments of `reuse inspect`.
#[derive(clap::Args)]
pub struct Args {
    /// The safetensors file.
    file: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let bytes =
        std::fs::read(&a.file).with_context(|| format!("cannot read {}", a.file.display()))?;
    let (_, meta) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file: {e}", a.file.display()))?;
    // Full validation: offsets, sizes, truncation.
    SafeTensors::deserialize(&bytes).map_err(|e| {
        anyhow::anyhow!(
            "{}: corrupt or truncated safetensors file: {e}",
            a.file.display()
        )
    })?;
    let mut tensors: Vec<_> = meta.tensors().into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let total: usize = tensors
        .iter()
        .map(|(_, i)| i.shape.iter().product::<usize>())
        .sum();
    let mut metadata: Vec<_> = meta
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    metadata.sort();
    if a.json {
        let v = json!({
            "file": a.file.display().to_string(),
            "parameters": total,
            "metadata": metadata.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
            "tensors": tensors.iter().map(|(n, i)| json!({
                "name": n,
                "dtype": format!("{:?}", i.dtype),
                "shape": i.shape,
                "numel": i.shape.iter().product::<usize>(),
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let width = tensors
        .iter()
        .map(|(n, _)| n.len())
        .max()
        .unwrap_or(4)
        .max(4);
    println!("{:width$}  {:5}  shape", "name", "dtype");
    for (n, i) in &tensors {
        println!("{n:width$}  {:5}  {:?}", format!("{:?}", i.dtype), i.shape);
    }
    println!("\n{} tensors, {} parameters", tensors.len(), total);
    for (k, v) in &metadata {
        println!("metadata {k} = {v}");
    }
    Ok(())
}
