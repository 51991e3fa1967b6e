//! `reuse inspect`: the header of any safetensors file, validated; or a GGUF file's
//! metadata and tensors.

use std::path::PathBuf;

use anyhow::{Context, Result};
use safetensors::SafeTensors;
use serde_json::json;

/// Arguments of `reuse inspect`.
#[derive(clap::Args)]
pub struct Args {
    /// The safetensors or `.gguf` file.
    file: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    if reuse_core::models::lm::is_gguf(&a.file) {
        return gguf(&a);
    }
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

/// A GGUF file: version, metadata (long arrays summarised) and tensors (name, ggml type,
/// PyTorch shape, bytes).
fn gguf(a: &Args) -> Result<()> {
    let f = reuse_core::gguf::GgufFile::open(&a.file)?;
    let total: u64 = f.tensors().iter().map(|t| t.n_elements()).sum();
    if a.json {
        let v = json!({
            "file": a.file.display().to_string(),
            "format": "gguf",
            "version": f.version(),
            "parameters": total,
            "metadata": f.metadata().iter().map(|(k, v)| (k.clone(), json!(v.describe()))).collect::<serde_json::Map<_, _>>(),
            "tensors": f.tensors().iter().map(|t| json!({
                "name": t.name(),
                "type": t.ggml_type().name(),
                "shape": t.shape(),
                "bytes": t.n_bytes(),
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("GGUF v{} ({} bytes)", f.version(), f.file_size());
    for (k, v) in f.metadata() {
        println!("metadata {k} = {}", v.describe());
    }
    let width = f
        .tensors()
        .iter()
        .map(|t| t.name().len())
        .max()
        .unwrap_or(4)
        .max(4);
    println!("\n{:width$}  {:5}  shape", "name", "type");
    for t in f.tensors() {
        println!(
            "{:width$}  {:5}  {:?}",
            t.name(),
            t.ggml_type().name(),
            t.shape()
        );
    }
    println!("\n{} tensors, {total} parameters", f.tensors().len());
    Ok(())
}
