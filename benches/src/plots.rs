//! The report's plots, drawn from report.json's metrics (so, like the claims table, they
//! show this run and nothing else): PEFT methods' accuracy and trainable share,
//! distillation accuracy against size, continual learning against Avalanche, and
//! quantized sizes against embedding cosine and probe accuracy. Experiments that plot
//! their own data (heat maps, loss curves) write those beside the report themselves.

use std::path::{Path, PathBuf};

use anyhow::Result;
use plotters::prelude::*;
use serde_json::Value;

/// A bar with an error bar (mean, sd), or no bar.
type Bar = Option<(f64, f64)>;

fn metric(e: &Value, k: &str) -> Option<f64> {
    e["metrics"][k].as_f64().filter(|v| v.is_finite())
}

fn experiment<'a>(report: &'a Value, id: &str) -> Option<&'a Value> {
    report["experiments"]
        .as_array()?
        .iter()
        .find(|e| e["id"].as_str() == Some(id))
}

/// Bars per category, one per series, with sd whiskers.
fn grouped_bars(
    path: &Path,
    title: &str,
    y_desc: &str,
    categories: &[String],
    series: &[(&str, Vec<Bar>)],
) -> Result<()> {
    let hi = series
        .iter()
        .flat_map(|(_, v)| v.iter().flatten().map(|(m, s)| m + s))
        .fold(0.0, f64::max)
        .max(1e-9);
    let n = categories.len();
    let k = series.len().max(1) as f64;
    let root = BitMapBackend::new(path, (1200, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(70)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..n as f64, 0.0..hi * 1.1)?;
    let cats = categories.to_vec();
    chart
        .configure_mesh()
        .disable_x_mesh()
        // Nice steps of 0.5 over 0..n put a label at every bar group's centre.
        .x_labels(2 * n + 1)
        .x_label_style(("sans-serif", 12))
        .x_label_formatter(&move |x| {
            let i = x.floor() as usize;
            if (x - i as f64 - 0.5).abs() < 0.26 {
                cats.get(i).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc(y_desc)
        .draw()?;
    let colors = [BLUE, RED, GREEN, MAGENTA, CYAN];
    for (j, (name, vals)) in series.iter().enumerate() {
        let color = colors[j % colors.len()];
        let w = 0.8 / k;
        let x0 = |i: usize| i as f64 + 0.1 + j as f64 * w;
        chart
            .draw_series(vals.iter().enumerate().filter_map(|(i, v)| {
                v.map(|(m, _)| {
                    Rectangle::new(
                        [(x0(i), 0.0), (x0(i) + w * 0.9, m)],
                        color.mix(0.6).filled(),
                    )
                })
            }))?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
        chart.draw_series(vals.iter().enumerate().filter_map(|(i, v)| {
            v.filter(|(_, s)| *s > 0.0).map(|(m, s)| {
                let xc = x0(i) + w * 0.45;
                PathElement::new(vec![(xc, m - s), (xc, m + s)], BLACK.stroke_width(2))
            })
        }))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Points named in a legend (one colour each), so points at the same place (students
/// of one size) stay readable.
fn scatter(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    points: &[(String, f64, f64)],
) -> Result<()> {
    let (xl, xh) = points
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
            (a.min(p.1), b.max(p.1))
        });
    let (yl, yh) = points
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
            (a.min(p.2), b.max(p.2))
        });
    let (xpad, ypad) = (((xh - xl) * 0.1).max(1e-3), ((yh - yl) * 0.15).max(1e-3));
    let root = BitMapBackend::new(path, (1000, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(20)
        .x_label_area_size(45)
        .y_label_area_size(70)
        // Room below the lowest point for the legend.
        // (never below 0 when every point is at or above it: accuracies).
        .build_cartesian_2d(
            (xl - xpad)..(xh + xpad),
            {
                let lo = yl - ypad - (yh - yl).max(1e-3) * 0.9;
                if yl >= 0.0 {
                    lo.max(0.0)
                } else {
                    lo
                }
            }..(yh + ypad),
        )?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .draw()?;
    for (i, (label, x, y)) in points.iter().enumerate() {
        let colour = Palette99::pick(i).to_rgba();
        // Points at the same place are nudged apart by a few pixels so each stays visible.
        let nudge = 7 * points[..i]
            .iter()
            .filter(|q| (q.1 - x).abs() < 1e-9 && (q.2 - y).abs() < 0.002)
            .count() as i32;
        chart
            .draw_series(std::iter::once(
                EmptyElement::at((*x, *y)) + Circle::new((nudge, 0), 6, colour.filled()),
            ))?
            .label(label.clone())
            .legend(move |(lx, ly)| Circle::new((lx + 8, ly), 6, colour.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;
    root.present()?;
    Ok(())
}

/// Draws every plot whose experiment ran into `dir`; returns (file, caption) of each,
/// and a line for each plot that could not be drawn.
pub fn draw_all(report: &Value, dir: &Path) -> (Vec<(PathBuf, String)>, Vec<String>) {
    let mut done = Vec::new();
    let mut failed = Vec::new();
    let mut attempt = |file: &str, caption: &str, f: &dyn Fn(&Path) -> Result<bool>| {
        let path = dir.join(file);
        match f(&path) {
            Ok(true) => done.push((path, caption.to_string())),
            Ok(false) => {}
            Err(e) => failed.push(format!("{file}: {e:#}")),
        }
    };
    attempt(
        "plot_peft_methods.png",
        "PEFT on MiniLM (Debian sections): test accuracy (mean ± sd over seeds) per method, \
         with its trainable share of the weights in the label",
        &|p| {
            let Some(e) = experiment(report, "peft.minilm_sections") else {
                return Ok(false);
            };
            // Methods this run trained (the CPU size leaves out `lora_qv_r8`).
            let methods: Vec<&str> = ["full", "head", "lora", "lora_qv_r8", "pfeiffer"]
                .into_iter()
                .filter(|m| metric(e, &format!("{m}.test_accuracy")).is_some())
                .collect();
            let cats: Vec<String> = methods
                .iter()
                .map(|m| {
                    let f = metric(e, &format!("{m}.trainable_fraction")).unwrap_or(f64::NAN);
                    format!("{m} ({:.2}%)", 100.0 * f)
                })
                .collect();
            let acc: Vec<Bar> = methods
                .iter()
                .map(|m| {
                    Some((
                        metric(e, &format!("{m}.test_accuracy"))?,
                        metric(e, &format!("{m}.test_accuracy_sd")).unwrap_or(0.0),
                    ))
                })
                .collect();
            grouped_bars(
                p,
                "PEFT methods: test accuracy and trainable share",
                "test accuracy",
                &cats,
                &[("test accuracy", acc)],
            )?;
            Ok(true)
        },
    );
    attempt(
        "plot_distill.png",
        "Distillation: test accuracy against the share of the teacher's parameters, \
         teachers and students of distill.minilm_sections and distill.digits_mlp",
        &|p| {
            let mut pts = Vec::new();
            if let Some(e) = experiment(report, "distill.minilm_sections") {
                let r = metric(e, "params_ratio").unwrap_or(f64::NAN);
                let sp = metric(e, "inference_speedup_median").unwrap_or(f64::NAN);
                if let Some(t) = metric(e, "teacher.test_accuracy") {
                    pts.push(("MiniLM teacher".to_string(), 1.0, t));
                }
                for (k, name) in [
                    ("student_hard", "hard labels"),
                    ("student_kd", "KD"),
                    ("student_cached", "KD, top-4 cache"),
                ] {
                    if let Some(a) = metric(e, &format!("{k}.test_accuracy")) {
                        pts.push((format!("MiniLM 2-layer, {name} ({sp:.1}x faster)"), r, a));
                    }
                }
            }
            if let Some(e) = experiment(report, "distill.digits_mlp") {
                let r = metric(e, "params_ratio").unwrap_or(f64::NAN);
                if let Some(t) = metric(e, "teacher.test_accuracy") {
                    pts.push(("digits teacher".to_string(), 1.0, t));
                }
                for (k, name) in [("student_hard", "hard labels"), ("student_kd", "KD")] {
                    if let Some(a) = metric(e, &format!("{k}.test_accuracy")) {
                        pts.push((format!("digits student, {name}"), r, a));
                    }
                }
            }
            pts.retain(|p| p.1.is_finite());
            if pts.is_empty() {
                return Ok(false);
            }
            scatter(
                p,
                "Distillation: accuracy against size",
                "parameters / teacher's",
                "test accuracy",
                &pts,
            )?;
            Ok(true)
        },
    );
    for (id, scenarios) in [
        ("continual.split_digits", &["class_il", "task_il"][..]),
        ("continual.permuted_digits", &["permuted"][..]),
    ] {
        let file = format!("plot_{}.png", id.replace('.', "_"));
        let caption = format!(
            "{id}: average accuracy after the last task (mean ± sd over seeds), reuse beside \
             Avalanche 0.6 on the same protocol"
        );
        attempt(&file, &caption, &|p| {
            let Some(e) = experiment(report, id) else {
                return Ok(false);
            };
            let methods = [
                "naive",
                "ewc",
                "ewc_empirical",
                "online_ewc",
                "replay",
                "packnet",
                "joint",
            ];
            let mut cats = Vec::new();
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            for sc in scenarios {
                for m in methods {
                    let Some(a) = metric(e, &format!("{sc}.{m}.avg_accuracy")) else {
                        continue;
                    };
                    cats.push(format!("{sc} {m}"));
                    ours.push(Some((
                        a,
                        metric(e, &format!("{sc}.{m}.avg_accuracy_sd")).unwrap_or(0.0),
                    )));
                    theirs.push(
                        metric(e, &format!("avalanche.{sc}.{m}.avg_accuracy")).map(|b| {
                            (
                                b,
                                metric(e, &format!("avalanche.{sc}.{m}.avg_accuracy_sd"))
                                    .unwrap_or(0.0),
                            )
                        }),
                    );
                }
            }
            if cats.is_empty() {
                return Ok(false);
            }
            grouped_bars(
                p,
                &format!("{id}: average accuracy"),
                "average accuracy",
                &cats,
                &[("reuse", ours), ("Avalanche", theirs)],
            )?;
            Ok(true)
        });
    }
    for (file, y, key, caption) in [
        (
            "plot_quant_cosine.png",
            "embedding cosine to f32",
            "cosine_mean",
            "quant.minilm: model file size against mean embedding cosine to f32 (sections test texts)",
        ),
        (
            "plot_quant_accuracy.png",
            "probe test accuracy",
            "accuracy",
            "quant.minilm: model file size against linear-probe accuracy (mean over seeds)",
        ),
    ] {
        attempt(file, caption, &|p| {
            let Some(e) = experiment(report, "quant.minilm") else {
                return Ok(false);
            };
            let mut pts = Vec::new();
            for f in [
                "f32", "bf16", "int8", "int4_rtn_g32", "int4_rtn_g64", "int4_rtn_g128",
                "int4_gptq_g32", "int4_gptq_g64", "int4_gptq_g128",
            ] {
                let value = if f == "f32" && key == "cosine_mean" {
                    Some(1.0)
                } else {
                    metric(e, &format!("{key}_{f}"))
                };
                if let (Some(mb), Some(v)) = (metric(e, &format!("size_mb_{f}")), value) {
                    pts.push((f.to_string(), mb, v));
                }
            }
            if pts.is_empty() {
                return Ok(false);
            }
            scatter(p, &format!("quantized MiniLM: size against {y}"), "model file (MB)", y, &pts)?;
            Ok(true)
        });
    }
    (done, failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_reports_draw_their_plots() {
        let root = reuse_testkit::workspace_dir();
        // REUSE_KEEP_PLOTS=DIR keeps the images for a look.
        let tmp = tempfile::tempdir().unwrap();
        let keep = std::env::var_os("REUSE_KEEP_PLOTS").map(PathBuf::from);
        let dir = keep.as_deref().unwrap_or(tmp.path());
        let mut drawn = Vec::new();
        for f in [
            "2026-11-28-cpu-continual-digits.json",
            "2026-11-28-cpu-quant-minilm.json",
            "2026-11-28-h200-distill-sections.json",
        ] {
            let r: Value = serde_json::from_slice(
                &std::fs::read(root.join("benches/reports").join(f)).unwrap(),
            )
            .unwrap();
            let (done, failed) = draw_all(&r, dir);
            assert!(failed.is_empty(), "{failed:?}");
            drawn.extend(done.into_iter().map(|(p, _)| p));
        }
        let names: Vec<String> = drawn
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        for want in [
            "plot_continual_split_digits.png",
            "plot_continual_permuted_digits.png",
            "plot_quant_cosine.png",
            "plot_quant_accuracy.png",
            "plot_distill.png",
        ] {
            assert!(
                names.iter().any(|n| n == want),
                "{want} not drawn: {names:?}"
            );
        }
        for p in &drawn {
            let bytes = std::fs::read(p).unwrap();
            assert!(
                bytes.starts_with(b"\x89PNG") && bytes.len() > 10_000,
                "{}",
                p.display()
            );
        }
        // A report without those experiments draws nothing.
        let (done, failed) = draw_all(&serde_json::json!({"experiments": []}), tmp.path());
        assert!(done.is_empty() && failed.is_empty());
    }
}
