//! The report: JSON for machines, Markdown for people, both written atomically.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use serde::Serialize;
use tch::Device;

/// One experiment's outcome.
#[derive(Serialize)]
pub struct ExperimentResult {
    pub id: String,
    pub seconds: f64,
    pub metrics: BTreeMap<String, f64>,
}

/// The whole run.
#[derive(Serialize)]
pub struct Report {
    pub device: String,
    pub torch: String,
    pub git: String,
    pub experiments: Vec<ExperimentResult>,
}

fn torch_version() -> String {
    std::env::var_os("LIBTORCH")
        .and_then(|d| std::fs::read_to_string(Path::new(&d).join("version.py")).ok())
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("__version__ = ")
                    .map(|v| v.trim_matches(['\'', '"']).to_string())
            })
        })
        .unwrap_or_else(|| "unknown".into())
}

fn git_version() -> String {
    let out = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match out(&["rev-parse", "--short", "HEAD"]) {
        Some(h)
            if out(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty()) =>
        {
            format!("{h}-dirty")
        }
        Some(h) => h,
        None => "unknown".into(),
    }
}

/// `k=v` pairs for the progress line.
pub fn summary(m: &BTreeMap<String, f64>) -> String {
    m.iter()
        .map(|(k, v)| format!("{k}={}", fmt(*v)))
        .collect::<Vec<_>>()
        .join(" ")
}

fn fmt(v: f64) -> String {
    if v != 0.0 && (v.abs() >= 1e5 || v.abs() < 1e-3) {
        format!("{v:.3e}")
    } else {
        format!("{v:.4}")
    }
}

impl Report {
    pub fn new(device: Device) -> Self {
        let device = match device {
            Device::Cuda(i) => format!("cuda:{i}"),
            _ => format!("cpu ({} threads)", tch::get_num_threads()),
        };
        Self {
            device,
            torch: torch_version(),
            git: git_version(),
            experiments: Vec::new(),
        }
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let json = serde_json::to_string_pretty(self)?;
        reuse_core::checkpoint::write_atomic(&dir.join("report.json"), json.as_bytes())?;
        let mut md = format!(
            "# reuse benchmark report\n\ndevice: {}  \ntorch: {}  \ngit: {}\n",
            self.device, self.torch, self.git
        );
        for e in &self.experiments {
            md.push_str(&format!(
                "\n## {} ({:.1} s)\n\n| metric | value |\n|---|---|\n",
                e.id, e.seconds
            ));
            for (k, v) in &e.metrics {
                md.push_str(&format!("| {k} | {} |\n", fmt(*v)));
            }
        }
        reuse_core::checkpoint::write_atomic(&dir.join("REPORT.md"), md.as_bytes())?;
        Ok(())
    }
}
