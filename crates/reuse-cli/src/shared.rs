//! What several commands share: device and dtype options, text files, notes on stderr.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tch::{Device, Kind};

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

/// Texts of `path`: one per line, or the last tab-separated column of a `.tsv` /
/// `.tsv.gz`; `.gz` is decompressed. Empty (all-blank) texts are left out.
pub fn read_texts(path: &Path) -> Result<Vec<String>> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read texts file {}", path.display()))?;
    let (text, name) = match name.strip_suffix(".gz") {
        Some(inner) => {
            let mut s = String::new();
            flate2::read::GzDecoder::new(&bytes[..])
                .read_to_string(&mut s)
                .with_context(|| format!("{}: not a readable gzip text file", path.display()))?;
            (s, inner.to_string())
        }
        None => (
            String::from_utf8(bytes)
                .with_context(|| format!("{}: not UTF-8 text", path.display()))?,
            name,
        ),
    };
    let tsv = name.ends_with(".tsv");
    Ok(text
        .lines()
        .map(|l| {
            let l = l.strip_suffix('\r').unwrap_or(l);
            if tsv {
                l.rsplit('\t').next().unwrap_or(l)
            } else {
                l
            }
        })
        .filter(|t| !t.trim().is_empty())
        .map(String::from)
        .collect())
}

/// One line on stderr per `modules_to_save` module the model lacks.
pub fn note_set_aside(adapter: &Path, set_aside: &[String]) {
    for m in set_aside {
        eprintln!(
            "note: the adapter's {m} (modules_to_save) in {} was set aside: this model has no `{m}`",
            adapter.display()
        );
    }
}

/// A causal LM with its tokenizer from a `.gguf` file or a model folder, quantized
/// folders included; an error that names the path otherwise.
pub fn load_lm(
    path: &Path,
    device: Device,
    kind: Kind,
    keep_codes: bool,
) -> Result<reuse_core::models::lm::LanguageModel> {
    let mut opts = reuse_quant::load_options(device, kind);
    if keep_codes {
        if !reuse_core::models::lm::is_gguf(path) {
            bail!(
                "--keep-codes keeps a GGUF file's quantized weights, and {} is not a .gguf file",
                path.display()
            );
        }
        opts = opts.keep_codes();
    }
    reuse_core::models::lm::LanguageModel::load(path, &opts)
        .with_context(|| format!("cannot load a causal LM from {}", path.display()))
}

/// Whether `path` is a causal LM: a `.gguf` file, or a folder whose `config.json` names
/// a decoder family.
pub fn is_causal_lm(path: &Path) -> bool {
    reuse_core::models::lm::is_gguf(path)
        || std::fs::read_to_string(path.join("config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v.get("model_type")?.as_str().map(String::from))
            .is_some_and(|t| {
                reuse_core::models::arch::for_model_type(&t).is_ok_and(|a| a.head.is_some())
            })
}

/// Refuses a causal LM (a `.gguf` file, or a folder whose `config.json` names a decoder
/// family) given to a command that works on BERT-family encoders, with what to use
/// instead; anything else passes (the command's own loader reports other problems).
pub fn require_encoder(path: &Path, command: &str) -> Result<()> {
    let decoder = if reuse_core::models::lm::is_gguf(path) {
        Some("a GGUF causal LM".to_string())
    } else {
        std::fs::read_to_string(path.join("config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v.get("model_type")?.as_str().map(String::from))
            .filter(|t| reuse_core::models::arch::for_model_type(t).is_ok_and(|a| a.head.is_some()))
            .map(|t| format!("a causal LM (model_type `{t}`)"))
    };
    match decoder {
        Some(what) => bail!(
            "`reuse {command}` works on BERT-family encoder folders, and {} is {what}: for causal LMs use `reuse generate`, `reuse lm score` or `reuse convert`",
            path.display()
        ),
        None => Ok(()),
    }
}
