//! The report: JSON for machines, Markdown for people, both written atomically. It
//! records where its figures came from: the commit (and whether the tree had
//! uncommitted changes), the date, the device and the thread count.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde::Serialize;
use tch::Device;

/// One experiment's outcome.
#[derive(Serialize)]
pub struct ExperimentResult {
    pub id: String,
    pub about: String,
    pub seconds: f64,
    /// The size it ran at: `quick`, `cpu` (its CPU size, smaller than full) or `full`.
    pub size: String,
    pub metrics: BTreeMap<String, f64>,
    pub notes: Vec<String>,
}

/// One criterion micro-benchmark's result, read from `target/criterion`.
#[derive(Serialize, Debug, Clone)]
pub struct MicroBench {
    /// `group/function`.
    pub id: String,
    /// Median time per iteration, ns.
    pub median_ns: f64,
    /// Its 95% confidence interval, ns.
    pub low_ns: f64,
    pub high_ns: f64,
    /// Samples criterion took.
    pub samples: usize,
}

/// The micro-benchmarks criterion wrote under `dir` at or after `since` (Unix seconds):
/// the ones `cargo xtask bench` ran just before this run, never older ones.
pub fn micro_benches(dir: &Path, since: u64) -> Vec<MicroBench> {
    let mut out = Vec::new();
    let Ok(groups) = std::fs::read_dir(dir) else {
        return out;
    };
    for g in groups.flatten() {
        let Ok(fns) = std::fs::read_dir(g.path()) else {
            continue;
        };
        for f in fns.flatten() {
            let est = f.path().join("new/estimates.json");
            let fresh = std::fs::metadata(&est)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .is_some_and(|t| t.as_secs() >= since);
            if !fresh {
                continue;
            }
            let read = |p: &Path| -> Option<serde_json::Value> {
                serde_json::from_slice(&std::fs::read(p).ok()?).ok()
            };
            let (Some(e), Some(s)) = (read(&est), read(&f.path().join("new/sample.json"))) else {
                continue;
            };
            let med = &e["median"];
            out.push(MicroBench {
                id: format!(
                    "{}/{}",
                    g.file_name().to_string_lossy(),
                    f.file_name().to_string_lossy()
                ),
                median_ns: med["point_estimate"].as_f64().unwrap_or(f64::NAN),
                low_ns: med["confidence_interval"]["lower_bound"]
                    .as_f64()
                    .unwrap_or(f64::NAN),
                high_ns: med["confidence_interval"]["upper_bound"]
                    .as_f64()
                    .unwrap_or(f64::NAN),
                samples: s["times"].as_array().map_or(0, Vec::len),
            });
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

/// The whole run.
#[derive(Serialize)]
pub struct Report {
    /// `git rev-parse HEAD` of the workspace the bench was built from.
    pub commit: String,
    /// Whether tracked files differed from that commit (`git status --porcelain`).
    pub dirty: bool,
    /// When the run started, UTC, ISO 8601.
    pub date: String,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// libtorch intra-op threads.
    pub threads: i32,
    pub torch: String,
    /// Smoke-test sizes (`--quick`): the figures mean nothing.
    pub quick: bool,
    /// Seeds of the repeated runs (`--seeds`).
    pub seeds: Vec<u64>,
    pub experiments: Vec<ExperimentResult>,
    /// Experiments this run left out, with the reason: nothing of theirs is filled from
    /// an earlier run.
    pub skipped: Vec<(String, String)>,
    /// Criterion micro-benchmarks run just before this run (`cargo xtask bench` runs
    /// them); `None` when none ran.
    pub micro_benchmarks: Option<Vec<MicroBench>>,
    /// When the run started: images in the report folder older than this are not
    /// this run's.
    #[serde(skip)]
    pub started: SystemTime,
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

/// (commit, dirty) of the git tree at `root`; ("unknown", false) outside git.
fn git_source(root: &Path) -> (String, bool) {
    let out = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(root)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match out(&["rev-parse", "HEAD"]) {
        Some(h) => {
            let dirty = out(&["status", "--porcelain", "--untracked-files=no"])
                .is_none_or(|s| !s.is_empty());
            (h, dirty)
        }
        None => ("unknown".into(), false),
    }
}

/// Now as `YYYY-MM-DDTHH:MM:SSZ` (days to civil date after H. Hinnant's algorithm).
fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn human_ns(ns: f64) -> String {
    if ns >= 1e9 {
        format!("{:.3} s", ns / 1e9)
    } else if ns >= 1e6 {
        format!("{:.3} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.3} µs", ns / 1e3)
    } else {
        format!("{ns:.1} ns")
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
    pub fn new(device: Device, root: &Path, quick: bool) -> Self {
        let device = match device {
            Device::Cuda(i) => format!("cuda:{i}"),
            _ => "cpu".into(),
        };
        let (commit, dirty) = git_source(root);
        Self {
            commit,
            dirty,
            date: utc_now(),
            device,
            threads: tch::get_num_threads(),
            torch: torch_version(),
            quick,
            seeds: vec![0, 1, 2],
            experiments: Vec::new(),
            skipped: Vec::new(),
            micro_benchmarks: None,
            started: SystemTime::now(),
        }
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let json = serde_json::to_string_pretty(self)?;
        reuse_core::checkpoint::write_atomic(&dir.join("report.json"), json.as_bytes())?;
        let mut md = format!(
            "# reuse benchmark report\n\ncommit: {}{}  \ndate: {}  \ndevice: {} ({} threads)  \ntorch: {}  \nseeds: {:?}\n",
            self.commit,
            if self.dirty {
                " (with uncommitted changes)"
            } else {
                ""
            },
            self.date,
            self.device,
            self.threads,
            self.torch,
            self.seeds
        );
        if self.quick {
            md.push_str(
                "\n**Quick mode (`--quick`): smoke-test sizes, the figures mean nothing.**\n",
            );
        }
        md.push_str(
            "\n## Claims\n\nEach row is filled from this run's report.json alone; a row whose \
             experiment did not run says so.\n\n",
        );
        md.push_str(&crate::claims::markdown(&crate::claims::rows(
            &serde_json::to_value(self)?,
        )));
        if !self.skipped.is_empty() {
            md.push_str("\nNot run in this run (no figures of theirs appear here):\n");
            for (id, why) in &self.skipped {
                md.push_str(&format!("\n- {id}: {why}"));
            }
            md.push('\n');
        }
        md.push_str("\n## Plots\n\n");
        let (drawn, failed) = crate::plots::draw_all(&serde_json::to_value(self)?, dir);
        let mut made: Vec<String> = Vec::new();
        for (p, caption) in &drawn {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
            let name = name.unwrap_or_default();
            md.push_str(&format!("- [{name}]({name}): {caption}\n"));
            made.push(name);
        }
        // Images the experiments drew themselves in this run (heat maps, loss curves),
        // in the report folder or one folder down.
        let fresh_pngs = |d: &Path, prefix: &str| -> Vec<String> {
            std::fs::read_dir(d)
                .map(|d| {
                    d.flatten()
                        .filter(|e| {
                            e.path().extension().is_some_and(|x| x == "png")
                                && e.metadata()
                                    .and_then(|m| m.modified())
                                    .is_ok_and(|t| t >= self.started)
                        })
                        .map(|e| format!("{prefix}{}", e.file_name().to_string_lossy()))
                        .collect()
                })
                .unwrap_or_default()
        };
        let mut own: Vec<String> = fresh_pngs(dir, "");
        if let Ok(d) = std::fs::read_dir(dir) {
            for sub in d.flatten().filter(|e| e.path().is_dir()) {
                let name = sub.file_name().to_string_lossy().into_owned();
                own.extend(fresh_pngs(&sub.path(), &format!("{name}/")));
            }
        }
        own.retain(|n| !made.contains(n));
        own.sort();
        for name in &own {
            md.push_str(&format!("- [{name}]({name}): drawn by its experiment\n"));
        }
        for f in &failed {
            md.push_str(&format!("- could not be drawn: {f}\n"));
        }
        if drawn.is_empty() && own.is_empty() && failed.is_empty() {
            md.push_str("None: no experiment with a plot ran.\n");
        }
        md.push_str("\n## Micro-benchmarks (criterion)\n\n");
        match &self.micro_benchmarks {
            Some(v) if !v.is_empty() => {
                md.push_str(
                    "`cargo bench --bench hot --bench ewc`, run by `cargo xtask bench` just \
                     before the experiments (benches/benches/*.rs say what each measures).\n\n\
                     | benchmark | median | 95% interval | samples |\n|---|---|---|---|\n",
                );
                for b in v {
                    md.push_str(&format!(
                        "| {} | {} | {} - {} | {} |\n",
                        b.id,
                        human_ns(b.median_ns),
                        human_ns(b.low_ns),
                        human_ns(b.high_ns),
                        b.samples
                    ));
                }
            }
            _ => md.push_str(
                "Not run in this run (`cargo xtask bench` runs them before a full run; \
                 `cargo bench -p reuse-benches` by hand).\n",
            ),
        }
        for e in &self.experiments {
            // What it trains, on which model and data, the budget and how the settings
            // were chosen, and which peer ran beside it: the experiment's own notes, as
            // one paragraph under its one-line summary, then its table.
            let size = match e.size.as_str() {
                "cpu" => " *CPU size: smaller than the full size a CUDA run (or `--full`) runs; the notes say how.*",
                _ => "",
            };
            md.push_str(&format!(
                "\n## {} ({:.1} s)\n\n**{}.**{size} {}\n",
                e.id,
                e.seconds,
                e.about,
                e.notes.join(" ")
            ));
            md.push_str("\n| metric | value |\n|---|---|\n");
            for (k, v) in &e.metrics {
                md.push_str(&format!("| {k} | {} |\n", fmt(*v)));
            }
        }
        reuse_core::checkpoint::write_atomic(&dir.join("REPORT.md"), md.as_bytes())?;
        Ok(())
    }
}
