//! Hugging Face model folders written whole: `config.json`, `model.safetensors` and the
//! source folder's tokenizer and sentence-transformers files, built beside the target and
//! renamed into place at the end, so a failure leaves nothing half-written.
//!
//! Used by every transform that turns one model folder into another (a student cut
//! from its teacher, a grown model, a quantized one): the source's `config.json` is
//! kept key for key except the keys the transform changes, so fields `reuse` does not
//! read survive.

use std::path::{Path, PathBuf};

use crate::{Checkpoint, Error, Result};

/// Files of a sentence-transformers model folder that a derived model shares with its
/// source, copied when the source has them. Module folders named in `modules.json`
/// (`1_Pooling`, `2_Normalize`, ...) are copied too.
pub const SHARED_FILES: [&str; 7] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
];

/// Writes a complete model folder at `out`: `src_dir`'s `config.json` with the keys of
/// `config_updates` replaced (or added; a `null` value removes the key), `weights` as `model.safetensors`, and the
/// source's [`SHARED_FILES`] and module folders copied. `finish` runs on the temporary
/// folder before it is moved into place (to edit a copied file, add one).
///
/// An `out` that exists and is not empty is refused unless `overwrite` is set; then it
/// is replaced as a whole, and only once the new folder is complete.
///
/// # Errors
/// `out` not empty (without `overwrite`) or not a folder; a source without a readable
/// JSON-object `config.json`; any I/O failure (naming the file); whatever `finish`
/// returns. The source folder is only read.
pub fn write_model_folder(
    src_dir: &Path,
    out: &Path,
    config_updates: &serde_json::Map<String, serde_json::Value>,
    weights: &Checkpoint,
    overwrite: bool,
    finish: &mut dyn FnMut(&Path) -> Result<()>,
) -> Result<()> {
    check_out(out, overwrite)?;
    let cfg_path = src_dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let mut json: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Corrupt {
        path: cfg_path.clone(),
        reason: format!("not JSON: {e}"),
    })?;
    let Some(obj) = json.as_object_mut() else {
        return Err(Error::Corrupt {
            path: cfg_path,
            reason: "expected a JSON object".into(),
        });
    };
    for (k, v) in config_updates {
        if v.is_null() {
            obj.remove(k);
        } else {
            obj.insert(k.clone(), v.clone());
        }
    }
    let config_text =
        serde_json::to_string_pretty(&json).map_err(|e| Error::invalid("config", e.to_string()))?;

    write_folder_whole(out, overwrite, &mut |tmp: &Path| {
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |e| Error::io(p, e)
        };
        let cfg_out = tmp.join("config.json");
        std::fs::write(&cfg_out, &config_text).map_err(io(&cfg_out))?;
        weights.save(tmp.join("model.safetensors"))?;
        for f in SHARED_FILES {
            let src = src_dir.join(f);
            if src.is_file() {
                std::fs::copy(&src, tmp.join(f)).map_err(io(&src))?;
            }
        }
        for m in module_folders(src_dir)? {
            let src = src_dir.join(&m);
            if src.is_dir() {
                copy_dir(&src, &tmp.join(&m))?;
            }
        }
        finish(tmp)
    })
}

/// Builds a folder whole or not at all: `fill` writes its files into a fresh folder
/// beside `out`, which then replaces `out` by a rename (an empty `out` is removed first;
/// a non-empty one, allowed by `overwrite`, is moved aside and removed only once the new
/// folder is in place). On any error nothing is left where a user would take it for a
/// complete folder, and a previous `out` is intact.
pub fn write_folder_whole(
    out: &Path,
    overwrite: bool,
    fill: &mut dyn FnMut(&Path) -> Result<()>,
) -> Result<()> {
    check_out(out, overwrite)?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let name = out
        .file_name()
        .ok_or_else(|| Error::invalid("out", format!("{} has no folder name", out.display())))?
        .to_string_lossy()
        .into_owned();
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let result = (|| -> Result<()> {
        std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |e| Error::io(p, e)
        };
        fill(&tmp)?;
        // Move into place: an empty `out` is removed first; a non-empty one (allowed by
        // `overwrite`) is moved aside and removed only once the new folder is in place.
        let replaced = if out.exists() {
            if is_empty_dir(out)? {
                std::fs::remove_dir(out).map_err(io(out))?;
                false
            } else {
                std::fs::rename(out, &old).map_err(io(out))?;
                true
            }
        } else {
            false
        };
        if let Err(e) = std::fs::rename(&tmp, out) {
            if replaced {
                let _ = std::fs::rename(&old, out);
            }
            return Err(Error::io(out, e));
        }
        if replaced {
            std::fs::remove_dir_all(&old).map_err(io(&old))?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// Refuses an `out` that is a file, or a non-empty folder unless `overwrite`.
pub fn check_out(out: &Path, overwrite: bool) -> Result<()> {
    if !out.exists() {
        return Ok(());
    }
    if !out.is_dir() {
        return Err(Error::invalid(
            "out",
            format!("{} exists and is not a folder", out.display()),
        ));
    }
    if !overwrite && !is_empty_dir(out)? {
        return Err(Error::invalid(
            "out",
            format!(
                "{} already exists and is not empty (ask to overwrite it)",
                out.display()
            ),
        ));
    }
    Ok(())
}

fn is_empty_dir(dir: &Path) -> Result<bool> {
    Ok(std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .next()
        .is_none())
}

/// The module folders a sentence-transformers `modules.json` names (`1_Pooling`, ...);
/// none when the file is absent.
pub fn module_folders(dir: &Path) -> Result<Vec<String>> {
    let path = dir.join("modules.json");
    if !path.is_file() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Corrupt {
        path: path.clone(),
        reason: format!("not JSON: {e}"),
    })?;
    Ok(v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|m| m.get("path").and_then(|p| p.as_str()))
                // Only plain sub-folder names: never a path out of the teacher's folder.
                .filter(|p| !p.is_empty() && !p.contains(['/', '\\']) && *p != "." && *p != "..")
                .map(String::from)
                .collect()
        })
        .unwrap_or_default())
}

fn copy_dir(src: &Path, dst: &Path) -> Result<()> {
    std::fs::create_dir_all(dst).map_err(|e| Error::io(dst, e))?;
    for e in std::fs::read_dir(src).map_err(|e| Error::io(src, e))? {
        let e = e.map_err(|e| Error::io(src, e))?;
        let (from, to) = (e.path(), dst.join(e.file_name()));
        let ft = e.file_type().map_err(|e| Error::io(&from, e))?;
        if ft.is_dir() {
            copy_dir(&from, &to)?;
        } else {
            std::fs::copy(&from, &to).map_err(|e| Error::io(&from, e))?;
        }
    }
    Ok(())
}
