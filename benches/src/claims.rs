//! The claims table at the top of REPORT.md: one row per claim of the field, each filled
//! from this run's `report.json` alone (never from an earlier run), with its spread
//! over seeds or rounds, the target, and whether the figure meets it. A row whose
//! experiment did not run says so and why.

use serde_json::Value;

/// Reads a metric of the row's experiment.
pub type Get<'a> = dyn Fn(&str) -> f64 + 'a;

/// A claim and how its row is computed from one experiment's metrics.
pub struct Claim {
    /// What the field claims.
    pub text: &'static str,
    /// The experiment that measures it.
    pub experiment: &'static str,
    /// The target, as the issue states it.
    pub target: &'static str,
    /// Every metric the row reads (all must be present).
    pub keys: &'static [&'static str],
    /// (figure, spread, met) from the metrics; `met` is `None` for a ratio shown
    /// without a target.
    pub eval: fn(&Get) -> (String, String, Option<bool>),
}

/// What a row says.
#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    /// Filled from this run: the figure meets the target.
    Met,
    /// Filled from this run: the figure misses the target.
    Missed,
    /// Filled from this run, no target (a peer ratio).
    Shown,
    /// The experiment did not run in this run (the reason).
    NotRun(String),
    /// The experiment ran but did not report a metric the row needs.
    MissingMetric(String),
}

/// One row of the table.
#[derive(Debug, Clone)]
pub struct Row {
    pub text: &'static str,
    pub experiment: &'static str,
    pub figure: String,
    pub spread: String,
    pub target: &'static str,
    pub status: Status,
    /// The size its experiment ran at (`cpu`, `full`, `quick`; empty when it did not run).
    pub size: String,
}

pub(crate) fn pm(v: f64, sd: f64) -> String {
    format!("{v:.4} ± {sd:.4}")
}

/// `a` is at least as good as `b` when their means are within one of the larger sd, or
/// `a` is above.
pub(crate) fn at_least(a: f64, sa: f64, b: f64, sb: f64) -> bool {
    a >= b - sa.max(sb)
}

/// Every claim, in the table's order: each experiment file declares the rows it
/// measures (its `CLAIMS`), next to the code that measures them.
pub fn all() -> Vec<&'static Claim> {
    use crate::experiments::{
        continual, core, dist, distill, grow, llm, llm_adapters, llm_distill, llm_sft, peft, quant,
    };
    [
        peft::CLAIMS,
        distill::CLAIMS,
        continual::CLAIMS,
        grow::CLAIMS,
        quant::CLAIMS,
        core::CLAIMS,
        llm::CLAIMS,
        llm_adapters::CLAIMS,
        llm_sft::CLAIMS,
        llm_distill::CLAIMS,
        dist::CLAIMS,
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// Every claim's row, filled from `report` (the contents of one `report.json`).
pub fn rows(report: &Value) -> Vec<Row> {
    let experiments = report["experiments"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let skipped: Vec<(String, String)> = report["skipped"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| Some((p[0].as_str()?.to_string(), p[1].as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default();
    all()
        .into_iter()
        .map(|c| {
            let row = |figure: String, spread: String, status: Status| Row {
                text: c.text,
                experiment: c.experiment,
                figure,
                spread,
                target: c.target,
                status,
                size: String::new(),
            };
            let Some(e) = experiments
                .iter()
                .find(|e| e["id"].as_str() == Some(c.experiment))
            else {
                let why = skipped
                    .iter()
                    .find(|(id, _)| id == c.experiment)
                    .map(|(_, why)| why.clone())
                    .unwrap_or_else(|| "not selected in this run".into());
                return row("—".into(), "—".into(), Status::NotRun(why));
            };
            let metrics = &e["metrics"];
            if let Some(k) = c.keys.iter().find(|k| !metrics[**k].is_number()) {
                return row("—".into(), "—".into(), Status::MissingMetric(k.to_string()));
            }
            let get = |k: &str| metrics[k].as_f64().unwrap_or(f64::NAN);
            let (figure, spread, met) = (c.eval)(&get);
            let status = match met {
                Some(true) => Status::Met,
                Some(false) => Status::Missed,
                None => Status::Shown,
            };
            Row {
                size: e["size"].as_str().unwrap_or("").to_string(),
                ..row(figure, spread, status)
            }
        })
        .collect()
}

/// The rows as a Markdown table.
pub fn markdown(rows: &[Row]) -> String {
    let mut md = String::from(
        "| claim | measured | spread | target | result | experiment |\n|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let result = match &r.status {
            Status::Met => "met".to_string(),
            Status::Missed => "**missed**".to_string(),
            Status::Shown => "ratio".to_string(),
            Status::NotRun(why) => format!("not run: {why}"),
            Status::MissingMetric(k) => format!("no figure: `{k}` missing"),
        };
        let size = if r.size == "cpu" { " (CPU size)" } else { "" };
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | `{}`{size} |\n",
            r.text, r.figure, r.spread, r.target, result, r.experiment
        ));
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A report in which every experiment the claims read ran and reported every metric
    /// they need, each set to `value(key)`.
    fn full_report(value: impl Fn(&str) -> f64) -> Value {
        let claims = all();
        let mut ids: Vec<&str> = claims.iter().map(|c| c.experiment).collect();
        ids.dedup();
        let experiments: Vec<Value> = ids
            .iter()
            .map(|id| {
                let mut m = serde_json::Map::new();
                for c in claims.iter().filter(|c| c.experiment == *id) {
                    for k in c.keys {
                        m.insert(k.to_string(), json!(value(k)));
                    }
                }
                if *id == "grow.train_faster" {
                    // Reported only when every grown run reached scratch's loss.
                    for k in ["flops_saving", "flops_saving_sd"] {
                        m.insert(k.to_string(), json!(value(k)));
                    }
                }
                if *id == "distill.minilm_sections" {
                    // Read when present (reports older than the row lack them).
                    for k in [
                        "cached_kd_over_hard_step_median",
                        "cached_kd_over_hard_step_sd",
                    ] {
                        m.insert(k.to_string(), json!(value(k)));
                    }
                }
                json!({"id": id, "about": "", "seconds": 1.0, "metrics": m, "notes": []})
            })
            .collect();
        json!({"commit": "x", "experiments": experiments, "skipped": []})
    }

    #[test]
    fn every_row_is_filled_from_the_report() {
        // Values that meet every target: small ratios and fractions, large speedups.
        let good = |k: &str| -> f64 {
            if k.contains("naive.forgetting") {
                0.9
            } else if k.contains("relative_difference") {
                1e-6
            } else if k.contains("forgetting") || k.contains("time_ratio") {
                0.1
            } else if k.contains("speedup") || k == "flops_saving" {
                3.0
            } else if k.contains("fraction") || k.ends_with("trainable_share") {
                0.005
            } else if k.contains("_over_") && (k.contains("step_time") || k.contains("peak_rss")) {
                0.5
            } else if k.ends_with(".ce.test_ppl_mean") {
                20.0
            } else if k.ends_with("test_ppl_mean") {
                10.0
            } else if k.starts_with("scratch.final_loss") && !k.ends_with("_sd") {
                6.1
            } else if k.starts_with("grown.final_loss") && !k.ends_with("_sd") {
                6.0
            } else if k.contains("_over_") {
                0.99
            } else if k.ends_with("_sd") || k.contains("ratio") {
                0.5
            } else {
                0.96
            }
        };
        let rows = rows(&full_report(good));
        assert_eq!(rows.len(), all().len());
        for r in &rows {
            assert!(
                matches!(r.status, Status::Met | Status::Shown),
                "{}: {:?} ({} {})",
                r.text,
                r.status,
                r.figure,
                r.spread
            );
            assert_ne!(r.figure, "—", "{}", r.text);
        }
        // The figures are the report's: 0.99 shows as 0.990x, 0.005 as 0.500%.
        assert_eq!(rows[0].figure, "0.500%");
        assert_eq!(rows[1].figure, "0.990x");
        // A figure that misses its target is marked so.
        let bad = full_report(|k| {
            if k == "lora.trainable_fraction" {
                0.02
            } else {
                good(k)
            }
        });
        assert_eq!(super::rows(&bad)[0].status, Status::Missed);
        let md = markdown(&super::rows(&bad));
        assert!(
            md.contains("| 2.000% |") && md.contains("**missed**"),
            "{md}"
        );
    }

    #[test]
    fn rows_name_the_size_their_experiment_ran_at() {
        let mut r = full_report(|_| 0.5);
        for e in r["experiments"].as_array_mut().unwrap() {
            let size = if e["id"] == "grow.train_faster" {
                "cpu"
            } else {
                "full"
            };
            e["size"] = json!(size);
        }
        let rows = rows(&r);
        for row in &rows {
            let want = if row.experiment == "grow.train_faster" {
                "cpu"
            } else {
                "full"
            };
            assert_eq!(row.size, want, "{}", row.text);
        }
        let md = markdown(&rows);
        let lines: Vec<&str> = md.lines().filter(|l| l.contains("(CPU size)")).collect();
        assert_eq!(
            lines.len(),
            rows.iter()
                .filter(|r| r.experiment == "grow.train_faster")
                .count()
        );
        assert!(lines.iter().all(|l| l.contains("`grow.train_faster`")));
    }

    #[test]
    fn experiments_that_did_not_run_are_marked_not_run() {
        let mut r = full_report(|_| 0.5);
        r["skipped"] = json!([[
            "grow.train_faster",
            "sized for a GPU: left out of a plain CPU run"
        ]]);
        let exps = r["experiments"].as_array_mut().unwrap();
        exps.retain(|e| e["id"] != "grow.train_faster" && e["id"] != "dist.lora_step");
        // A metric the row needs, missing from an experiment that ran.
        let peft = exps
            .iter_mut()
            .find(|e| e["id"] == "peft.vs_python")
            .unwrap();
        peft["metrics"]
            .as_object_mut()
            .unwrap()
            .remove("step_ratio_rust_over_python");
        let rows = rows(&r);
        for row in &rows {
            match row.experiment {
                "grow.train_faster" => assert_eq!(
                    row.status,
                    Status::NotRun("sized for a GPU: left out of a plain CPU run".into())
                ),
                "dist.lora_step" => {
                    assert_eq!(
                        row.status,
                        Status::NotRun("not selected in this run".into())
                    )
                }
                "peft.vs_python" => assert_eq!(
                    row.status,
                    Status::MissingMetric("step_ratio_rust_over_python".into())
                ),
                _ => assert!(!matches!(
                    row.status,
                    Status::NotRun(_) | Status::MissingMetric(_)
                )),
            }
            if matches!(row.status, Status::NotRun(_) | Status::MissingMetric(_)) {
                assert_eq!(row.figure, "—", "nothing filled for {}", row.text);
            }
        }
        assert!(markdown(&rows).contains("not run: sized for a GPU"));
    }

    #[test]
    fn time_ratio_rows_give_the_pairs_range_when_the_report_has_it() {
        let with = |k: &str| match k {
            "class_il.replay.time_ratio" => 0.3,
            "class_il.replay.time_ratio_min" => 0.2,
            "class_il.replay.time_ratio_max" => 0.4,
            _ => f64::NAN,
        };
        let (fig, spread, met) =
            crate::experiments::continual::quarter_of_avalanche_time(&with, "class_il.replay");
        assert_eq!(fig, "0.30x");
        assert!(spread.contains("range 0.20-0.40"), "{spread}");
        assert_eq!(met, Some(false));
        let older = |k: &str| {
            if k.ends_with("time_ratio") {
                0.2
            } else {
                f64::NAN
            }
        };
        let (_, spread, met) =
            crate::experiments::continual::quarter_of_avalanche_time(&older, "class_il.replay");
        assert_eq!(spread, "mean seconds over seeds, both sides");
        assert_eq!(met, Some(true));
    }

    #[test]
    fn every_kept_report_has_the_metrics_its_rows_read() {
        // The metric names the rows read are the experiments' real ones: every report
        // kept in benches/reports fills the rows of the experiments it holds.
        let dir = reuse_testkit::workspace_dir().join("benches/reports");
        let mut checked = std::collections::BTreeSet::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let r: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
            if r["experiments"].is_null() {
                continue; // a reference script's output, not a bench report
            }
            for row in rows(&r) {
                if let Status::MissingMetric(k) = &row.status {
                    panic!("{}: {}: `{k}` missing", p.display(), row.text);
                }
                assert!(!row.figure.contains("NaN"), "{}: {}", p.display(), row.text);
                if !matches!(row.status, Status::NotRun(_)) {
                    checked.insert(row.experiment);
                }
            }
        }
        // The kept reports cover most of the claims' experiments.
        for id in [
            "continual.split_digits",
            "continual.permuted_digits",
            "continual.minilm_sections",
            "distill.minilm_sections",
            "distill.digits_mlp",
            "grow.train_faster",
            "quant.distill_plus_quant",
            "dist.lora_step",
        ] {
            assert!(checked.contains(id), "{id}");
        }
    }

    #[test]
    fn a_grown_run_that_never_reached_scratch_is_a_missed_claim() {
        let p = reuse_testkit::workspace_dir()
            .join("benches/reports/2026-11-28-h200-grow-train-faster.json");
        let r: Value = serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
        let rows = rows(&r);
        let grow: Vec<&Row> = rows
            .iter()
            .filter(|r| r.experiment == "grow.train_faster")
            .collect();
        assert_eq!(grow[0].figure, "not reached");
        assert!(grow[0].spread.contains("in 1 run"), "{}", grow[0].spread);
        assert_eq!(grow[0].status, Status::Missed);
        assert_eq!(grow[1].status, Status::Missed); // 4.496 against scratch's 4.290
    }

    #[test]
    fn kept_reports_fill_their_rows() {
        // A real report: the CPU grow.train_faster run kept in benches/reports.
        let p = reuse_testkit::workspace_dir()
            .join("benches/reports/2026-11-28-cpu-grow-train-faster.json");
        let r: Value = serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
        let rows = rows(&r);
        let grow: Vec<&Row> = rows
            .iter()
            .filter(|r| r.experiment == "grow.train_faster")
            .collect();
        assert_eq!(grow.len(), 2);
        assert_eq!(grow[0].figure, "0.403");
        assert_eq!(grow[0].status, Status::Met);
        assert_eq!(grow[1].figure, "6.041");
        assert_eq!(grow[1].status, Status::Met);
        // Everything else did not run in that report.
        assert!(rows
            .iter()
            .filter(|r| r.experiment != "grow.train_faster")
            .all(|r| matches!(r.status, Status::NotRun(_))));
    }
}
