//! File helpers: hashing, atomic writes, and replacing a folder in one rename.

use std::fs;
use std::io::{Read, Write};
use std::path::Path;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

/// Lowercase hex SHA-256 of a file's bytes.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file =
        fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// Lowercase hex SHA-256 of bytes.
pub fn sha256_bytes(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `bytes` to `path` atomically: a temp file in the same folder, fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .with_context(|| format!("{} has no parent folder", path.display()))?;
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a temp file in {}", dir.display()))?;
    // tempfile makes 0600 files; give the result the usual 0644.
    set_mode(tmp.path(), 0o644)?;
    tmp.write_all(bytes)
        .and_then(|()| tmp.as_file().sync_all())
        .with_context(|| format!("cannot write a temp file for {}", path.display()))?;
    tmp.persist(path)
        .with_context(|| format!("cannot rename a temp file to {}", path.display()))?;
    Ok(())
}

/// Sets Unix permission bits (no-op elsewhere).
pub fn set_mode(path: &Path, mode: u32) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .with_context(|| format!("cannot set permissions of {}", path.display()))?;
    }
    #[cfg(not(unix))]
    let _ = (path, mode);
    Ok(())
}

/// Puts the finished folder `staged` at `target` (same parent folder), replacing what
/// was there. The old folder is renamed away first and removed after.
pub fn replace_dir(staged: &Path, target: &Path) -> Result<()> {
    if target.exists() {
        let old = target.with_file_name(format!(
            ".{}.old-{}",
            target.file_name().unwrap_or_default().to_string_lossy(),
            std::process::id()
        ));
        fs::rename(target, &old)
            .with_context(|| format!("cannot move {} aside", target.display()))?;
        fs::rename(staged, target).with_context(|| {
            format!("cannot rename {} to {}", staged.display(), target.display())
        })?;
        fs::remove_dir_all(&old).with_context(|| format!("cannot remove {}", old.display()))?;
    } else {
        fs::rename(staged, target).with_context(|| {
            format!("cannot rename {} to {}", staged.display(), target.display())
        })?;
    }
    Ok(())
}
