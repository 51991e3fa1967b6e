//! Building a cache: the folder, resumption, the data-parallel parts.

use std::fs::{self};
use std::path::Path;

use reuse_core::data::BatchSource;
use reuse_core::{Error, Result};
use tch::Device;

use super::shard::*;
use super::spec::*;
use super::*;
use crate::teacher::{dataset_fingerprint, Teacher};

/// Progress of [`build_cache_with_progress`], reported once per shard.
#[derive(Debug, Clone)]
pub struct BuildProgress<'a> {
    /// The shard just written or found complete.
    pub shard: &'a ShardInfo,
    /// Its position (0-based).
    pub index: usize,
    /// Number of shards.
    pub total: usize,
    /// True when the shard was already complete on disk and kept.
    pub reused: bool,
}

/// Runs `teacher` over `data` in index order, `batch_size` examples at a time on
/// `device`, and writes a cache to `out` (see the [module docs](self) for the format).
///
/// Resumes an interrupted build: complete shards that the same teacher, data and
/// configuration wrote are kept (each is read and checked; a truncated or corrupt one
/// is rebuilt); the teacher runs over the missing shards only. Batches never straddle
/// a shard, so a resumed cache equals an uninterrupted one. A complete cache of the
/// same spec is verified and returned as it is.
///
/// # Errors
/// An invalid config or empty data; an `out` that is not a folder or holds files that
/// are not this cache's; a cache or partial build in `out` made by another teacher,
/// dataset or configuration (naming each difference: nothing is changed on disk); a
/// teacher whose outputs do not fit the config (per-token logits for a per-example
/// cache, `k` above its class count, no pooled features, a class count that changes);
/// the teacher's own errors. On an error no file is left half-written; shards completed
/// before it stay for the next run.
pub fn build_cache(
    teacher: &dyn Teacher,
    data: &dyn BatchSource,
    out: &Path,
    cfg: &CacheConfig,
    batch_size: usize,
    device: Device,
) -> Result<CacheManifest> {
    build_cache_with_progress(teacher, data, out, cfg, batch_size, device, &mut |_| {})
}

/// [`build_cache`], calling `progress` after each shard.
pub fn build_cache_with_progress(
    teacher: &dyn Teacher,
    data: &dyn BatchSource,
    out: &Path,
    cfg: &CacheConfig,
    batch_size: usize,
    device: Device,
    progress: &mut dyn FnMut(BuildProgress<'_>),
) -> Result<CacheManifest> {
    let m = build(teacher, data, out, cfg, batch_size, device, None, progress)?;
    Ok(m.expect("a whole build writes its manifest"))
}

/// The part of a cache one of several processes builds: shard `s` when
/// `s % world == rank`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuildPart {
    /// This process's rank, `0..world`.
    pub rank: usize,
    /// The number of processes sharing the build.
    pub world: usize,
}

/// One process's share of a cache build, for several processes (data-parallel ranks)
/// running the teacher over disjoint shards into the same folder. Every rank calls it;
/// once all have returned (a barrier), one process calls [`build_cache`], which finds
/// every shard complete, checks each, and writes the manifest; the teacher does not run
/// again. Checks and refusals are [`build_cache`]'s; this call neither writes the
/// manifest nor removes other processes' temporary files, and an error leaves the
/// folder for the others. Returns the number of shards this process wrote.
#[allow(clippy::too_many_arguments)]
pub fn build_cache_part(
    teacher: &dyn Teacher,
    data: &dyn BatchSource,
    out: &Path,
    cfg: &CacheConfig,
    batch_size: usize,
    device: Device,
    part: BuildPart,
    progress: &mut dyn FnMut(BuildProgress<'_>),
) -> Result<usize> {
    if part.world == 0 || part.rank >= part.world {
        return Err(Error::invalid(
            "cache build part",
            format!(
                "expected a rank below the world size, found rank {} of {}",
                part.rank, part.world
            ),
        ));
    }
    let mut written = 0;
    let mut count = |p: BuildProgress<'_>| {
        if !p.reused {
            written += 1;
        }
        progress(p)
    };
    build(
        teacher,
        data,
        out,
        cfg,
        batch_size,
        device,
        Some(part),
        &mut count,
    )?;
    Ok(written)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn build(
    teacher: &dyn Teacher,
    data: &dyn BatchSource,
    out: &Path,
    cfg: &CacheConfig,
    batch_size: usize,
    device: Device,
    part: Option<BuildPart>,
    progress: &mut dyn FnMut(BuildProgress<'_>),
) -> Result<Option<CacheManifest>> {
    cfg.validate()?;
    if batch_size == 0 {
        return Err(Error::invalid("cache batch size", "must be at least 1"));
    }
    let n = data.len();
    if n == 0 {
        return Err(Error::invalid("cache data", "the dataset has no examples"));
    }
    let spec = CacheSpec::new(teacher.fingerprint(), dataset_fingerprint(data)?, n, cfg)?;

    // Everything that can refuse the build is checked before anything is written.
    let existed = out.exists();
    if existed && !out.is_dir() {
        return Err(Error::invalid(
            "cache folder",
            format!("{} exists and is not a folder", out.display()),
        ));
    }
    let old_manifest = if existed {
        check_folder(out, &spec)?
    } else {
        None
    };
    let mut shards: Vec<Option<ShardInfo>> = vec![None; spec.num_shards()];
    let mut num_classes = old_manifest.as_ref().map(|m| m.num_classes);
    let mut pooled_dim = old_manifest.as_ref().and_then(|m| m.pooled_dim);
    if existed {
        for (s, slot) in shards.iter_mut().enumerate() {
            let path = out.join(shard_file_name(s));
            if !path.exists() {
                continue;
            }
            if let Some(found) = check_existing_shard(&path, &spec, s)? {
                agree(&mut num_classes, found.num_classes, "class count", &path)?;
                if let Some(p) = found.pooled_dim {
                    agree_opt(&mut pooled_dim, p, &path)?;
                }
                *slot = Some(found.info);
            }
        }
    }
    if let Some(m) = &old_manifest {
        if shards.iter().all(Option::is_some) {
            let infos: Vec<ShardInfo> = shards.into_iter().map(Option::unwrap).collect();
            if infos == m.shards {
                for (s, info) in infos.iter().enumerate() {
                    progress(BuildProgress {
                        shard: info,
                        index: s,
                        total: infos.len(),
                        reused: true,
                    });
                }
                if part.is_none() {
                    remove_stale_temps(out);
                }
                return Ok(Some(m.clone()));
            }
            shards = infos.into_iter().map(Some).collect();
        }
    }

    fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    if part.is_none() {
        // Another process's temporary file may be a shard in the making.
        remove_stale_temps(out);
    }
    let build_path = out.join(BUILD_FILE);
    let wrote_build = !build_path.exists();
    if wrote_build {
        write_json(&build_path, &spec)?;
    }
    let any_kept = shards.iter().any(Option::is_some);
    let total = shards.len();
    let mut written = 0usize;
    let result = (|| -> Result<Option<CacheManifest>> {
        for (s, slot) in shards.iter_mut().enumerate() {
            if part.is_some_and(|p| s % p.world != p.rank) {
                continue;
            }
            if let Some(info) = slot {
                progress(BuildProgress {
                    shard: info,
                    index: s,
                    total,
                    reused: true,
                });
                continue;
            }
            let built = build_shard(teacher, data, out, &spec, cfg, s, batch_size, device)?;
            let path = out.join(&built.info.file);
            agree(&mut num_classes, built.num_classes, "class count", &path)?;
            if let Some(p) = built.pooled_dim {
                agree_opt(&mut pooled_dim, p, &path)?;
            }
            written += 1;
            progress(BuildProgress {
                shard: &built.info,
                index: s,
                total,
                reused: false,
            });
            *slot = Some(built.info);
        }
        if part.is_some() {
            return Ok(None);
        }
        let manifest = CacheManifest {
            spec: spec.clone(),
            num_classes: num_classes.expect("at least one shard"),
            pooled_dim,
            shards: shards.iter().map(|s| s.clone().expect("built")).collect(),
        };
        write_json(&out.join(MANIFEST_FILE), &manifest)?;
        let _ = fs::remove_file(&build_path);
        Ok(Some(manifest))
    })();
    if result.is_err() && written == 0 && !any_kept && part.is_none() {
        // Nothing of this build is worth keeping: leave the folder as it was found.
        if wrote_build {
            let _ = fs::remove_file(&build_path);
        }
        if !existed {
            let _ = fs::remove_dir(out);
        }
    }
    result
}

/// Checks that `out` holds nothing but this cache's files and that its manifest or
/// progress file, if any, has `spec`. Returns the manifest when there is one.
pub(super) fn check_folder(out: &Path, spec: &CacheSpec) -> Result<Option<CacheManifest>> {
    let entries = fs::read_dir(out).map_err(|e| Error::io(out, e))?;
    for e in entries {
        let e = e.map_err(|e| Error::io(out, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let ours = name == MANIFEST_FILE
            || name == BUILD_FILE
            || is_shard_name(&name)
            || is_temp_name(&name);
        if !ours {
            return Err(Error::invalid(
                "cache folder",
                format!(
                    "{} holds `{name}`, which is not part of a teacher cache; \
                     choose an empty or new folder",
                    out.display()
                ),
            ));
        }
    }
    let mismatch = |file: &Path, found: &CacheSpec| -> Error {
        Error::invalid(
            "teacher cache",
            format!(
                "{} was made by another teacher, dataset or configuration; refusing to \
                 resume or overwrite it ({}). Use another --out folder or remove this one",
                file.display(),
                found.differences(spec).join("; ")
            ),
        )
    };
    let manifest_path = out.join(MANIFEST_FILE);
    let manifest = if manifest_path.exists() {
        let m: CacheManifest = read_json(&manifest_path)?;
        check_format(&m.spec, &manifest_path)?;
        if m.spec != *spec {
            return Err(mismatch(&manifest_path, &m.spec));
        }
        Some(m)
    } else {
        None
    };
    let build_path = out.join(BUILD_FILE);
    if build_path.exists() {
        let b: CacheSpec = read_json(&build_path)?;
        check_format(&b, &build_path)?;
        if b != *spec {
            return Err(mismatch(&build_path, &b));
        }
    }
    Ok(manifest)
}

pub(super) fn is_shard_name(name: &str) -> bool {
    name.strip_prefix("shard-")
        .and_then(|r| r.strip_suffix(".safetensors"))
        .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
}

/// A temporary file of [`write_atomic`] for one of the cache's files.
pub(super) fn is_temp_name(name: &str) -> bool {
    name.strip_prefix('.')
        .and_then(|r| r.split_once(".tmp-"))
        .is_some_and(|(f, _)| f == MANIFEST_FILE || f == BUILD_FILE || is_shard_name(f))
}

/// Removes temporary files a killed writer left behind.
pub(super) fn remove_stale_temps(out: &Path) {
    if let Ok(entries) = fs::read_dir(out) {
        for e in entries.flatten() {
            if is_temp_name(&e.file_name().to_string_lossy()) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}
