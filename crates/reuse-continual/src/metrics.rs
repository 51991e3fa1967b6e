//! Continual-learning metrics from the accuracy matrix, as Avalanche defines them.
//!
//! `R[i][j]` is the accuracy on task `j`'s test set after training on task `i`
//! (row `i` is written after task `i`). With `T` the last task:
//! - **average accuracy** = mean over `j` of `R[T][j]` (every task, trained or not);
//! - **forgetting** of task `k < T` = `R[k][k] - R[T][k]`; the metric is its mean over
//!   `k < T` (Avalanche's `StreamForgetting`: the last task has not been forgotten yet
//!   and is left out);
//! - **backward transfer** = mean over `k < T` of `R[T][k] - R[k][k]` (= -forgetting);
//! - **forward transfer** = mean over `k >= 1` of `R[k-1][k] - R0[k]`, where `R0` is the
//!   accuracy of the model before any training (only when that row was recorded).
//!
//! Avalanche's "stream accuracy" weights tasks by their test-set size; the average here
//! weights every task equally, as the papers do.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde::{Deserialize, Serialize};

use reuse_core::{Error, Result};

/// Accuracies `R[i][j]` on task `j` after training task `i`, plus an optional row
/// measured before any training (for forward transfer).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AccuracyMatrix {
    /// Row `i`: accuracy on every task's test set after training task `i`.
    pub rows: Vec<Vec<f64>>,
    /// Accuracy on every task before training (the initial model), if measured.
    pub initial: Option<Vec<f64>>,
}

impl AccuracyMatrix {
    /// An empty matrix.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends the row measured after training the next task. Every row must have the
    /// same length, and no more rows than tasks may be added.
    pub fn push_row(&mut self, row: Vec<f64>) -> Result<()> {
        if let Some(first) = self.rows.first() {
            if first.len() != row.len() {
                return Err(Error::invalid(
                    "accuracy matrix row",
                    format!(
                        "row {} has {} tasks, row 0 has {}",
                        self.rows.len(),
                        row.len(),
                        first.len()
                    ),
                ));
            }
        }
        if self.rows.len() >= row.len() {
            return Err(Error::invalid(
                "accuracy matrix row",
                format!(
                    "{} rows already for {} tasks; one row per trained task",
                    self.rows.len(),
                    row.len()
                ),
            ));
        }
        if let Some(bad) = row.iter().find(|a| !(0.0..=1.0).contains(*a)) {
            return Err(Error::invalid(
                "accuracy matrix row",
                format!("accuracies are fractions in [0, 1], found {bad}"),
            ));
        }
        self.rows.push(row);
        Ok(())
    }

    /// A matrix from its rows (checked as [`AccuracyMatrix::push_row`] does).
    pub fn from_rows(rows: Vec<Vec<f64>>) -> Result<Self> {
        let mut m = Self::new();
        for r in rows {
            m.push_row(r)?;
        }
        Ok(m)
    }

    /// Number of tasks (columns).
    pub fn tasks(&self) -> usize {
        self.rows.first().map_or(0, Vec::len)
    }

    fn last(&self) -> Result<&Vec<f64>> {
        self.rows
            .last()
            .ok_or_else(|| Error::invalid("accuracy matrix", "no rows yet"))
    }

    /// Mean accuracy over every task after the last trained task.
    pub fn avg_accuracy(&self) -> Result<f64> {
        let last = self.last()?;
        Ok(last.iter().sum::<f64>() / last.len() as f64)
    }

    /// Forgetting of each task trained before the last: `R[k][k] - R[T][k]`.
    pub fn forgetting_per_task(&self) -> Result<Vec<f64>> {
        let t = self.rows.len() - 1;
        let last = self.last()?;
        Ok((0..t).map(|k| self.rows[k][k] - last[k]).collect())
    }

    /// Mean forgetting over the tasks before the last (0 with one trained task).
    pub fn forgetting(&self) -> Result<f64> {
        let f = self.forgetting_per_task()?;
        Ok(if f.is_empty() {
            0.0
        } else {
            f.iter().sum::<f64>() / f.len() as f64
        })
    }

    /// Backward transfer: mean over `k < T` of `R[T][k] - R[k][k]`.
    pub fn backward_transfer(&self) -> Result<f64> {
        Ok(-self.forgetting()?)
    }

    /// Forward transfer: mean over `k >= 1` of `R[k-1][k] - R0[k]`; `None` without the
    /// initial row or with fewer than two trained tasks.
    pub fn forward_transfer(&self) -> Option<f64> {
        let init = self.initial.as_ref()?;
        let n = self.rows.len();
        if n < 2 {
            return None;
        }
        let v: Vec<f64> = (1..n).map(|k| self.rows[k - 1][k] - init[k]).collect();
        Some(v.iter().sum::<f64>() / v.len() as f64)
    }

    /// The matrix as a Markdown table (rows: after task i; columns: test task j), with
    /// the summary metrics below it.
    pub fn to_markdown(&self) -> String {
        let n = self.tasks();
        let mut s = String::from("| after \\ on |");
        for j in 0..n {
            s.push_str(&format!(" task {j} |"));
        }
        s.push_str("\n|---|");
        s.push_str(&"---:|".repeat(n));
        s.push('\n');
        if let Some(init) = &self.initial {
            s.push_str("| initial |");
            for a in init {
                s.push_str(&format!(" {a:.3} |"));
            }
            s.push('\n');
        }
        for (i, r) in self.rows.iter().enumerate() {
            s.push_str(&format!("| task {i} |"));
            for a in r {
                s.push_str(&format!(" {a:.3} |"));
            }
            s.push('\n');
        }
        if let (Ok(a), Ok(f)) = (self.avg_accuracy(), self.forgetting()) {
            s.push_str(&format!(
                "\naverage accuracy {a:.4}, forgetting {f:.4}, backward transfer {:.4}",
                -f
            ));
            if let Some(fw) = self.forward_transfer() {
                s.push_str(&format!(", forward transfer {fw:.4}"));
            }
            s.push('\n');
        }
        s
    }

    /// The matrix and its metrics as JSON: `{"rows", "initial", "avg_accuracy",
    /// "forgetting", "backward_transfer", "forward_transfer"}`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "rows": self.rows,
            "initial": self.initial,
            "avg_accuracy": self.avg_accuracy().ok(),
            "forgetting": self.forgetting().ok(),
            "backward_transfer": self.backward_transfer().ok(),
            "forward_transfer": self.forward_transfer(),
        })
    }

    /// Writes [`AccuracyMatrix::to_json`] to `path`, atomically.
    pub fn save_json(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(&self.to_json())
            .map_err(|e| Error::invalid("accuracy matrix", e.to_string()))?;
        reuse_core::checkpoint::write_atomic(path, text.as_bytes())
    }

    /// Reads a matrix saved by [`AccuracyMatrix::save_json`]; its rows are checked.
    pub fn load_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        #[derive(Deserialize)]
        struct Saved {
            rows: Vec<Vec<f64>>,
            initial: Option<Vec<f64>>,
        }
        let s: Saved = serde_json::from_str(&text).map_err(|e| Error::Corrupt {
            path: path.to_path_buf(),
            reason: format!("not an accuracy matrix: {e}"),
        })?;
        let mut m = Self::from_rows(s.rows).map_err(|e| Error::Corrupt {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        m.initial = s.initial;
        Ok(m)
    }

    /// Draws the matrix as a heat map (PNG): row `i` after task `i`, column `j` test task
    /// `j`, each cell labelled with its accuracy, with the colour scale beside it. In a
    /// stream's square matrix, cells of tasks not yet trained (`j > i`) are grey and
    /// unlabelled: their accuracy (0 in a class-incremental stream) says nothing about
    /// forgetting. A matrix of another shape (one row after joint training) is drawn
    /// whole. Written atomically.
    pub fn save_heatmap_png(&self, path: &Path, title: &str) -> Result<()> {
        let (w, h) = self.heatmap_size()?;
        let tmp = tmp_path(path);
        let drawn = (|| -> std::result::Result<(), Box<dyn std::error::Error>> {
            let root = BitMapBackend::new(&tmp, (w, h)).into_drawing_area();
            self.draw_heatmap(&root, title)?;
            root.present()?;
            Ok(())
        })();
        drawn.map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::invalid(
                "heat map",
                format!("could not draw {}: {e}", path.display()),
            )
        })?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    }

    /// Pixels (width, height) of the heat map.
    fn heatmap_size(&self) -> Result<(u32, u32)> {
        let n = self.tasks();
        if n == 0 {
            return Err(Error::invalid("accuracy matrix", "no rows to draw"));
        }
        Ok((
            120 + 90 * n as u32 + HEATMAP_SCALE_W,
            100 + 60 * self.rows.len() as u32,
        ))
    }

    /// Draws the heat map of [`Self::save_heatmap_png`] on `root` (of
    /// [`Self::heatmap_size`]).
    fn draw_heatmap(
        &self,
        root: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
        title: &str,
    ) -> std::result::Result<(), Box<dyn std::error::Error>> {
        let n = self.tasks();
        let rows = self.rows.len();
        let w = root.dim_in_pixel().0;
        root.fill(&WHITE)?;
        let (main, scale) = root.split_horizontally(w - HEATMAP_SCALE_W);
        // The colour scale: accuracy 0 at the bottom to 1 at the top.
        let mut bar = ChartBuilder::on(&scale)
            .margin_top(40)
            .margin_bottom(45)
            .margin_left(5)
            .margin_right(10)
            .right_y_label_area_size(45)
            .build_cartesian_2d(0.0..1.0, 0.0..1.0)?;
        bar.configure_mesh()
            .disable_mesh()
            .disable_x_axis()
            .y_labels(6)
            .y_label_style(("sans-serif", 13))
            .y_label_formatter(&|v| format!("{v:.1}"))
            .draw()?;
        bar.draw_series((0..50).map(|k| {
            let (lo, hi) = (k as f64 / 50.0, (k + 1) as f64 / 50.0);
            Rectangle::new(
                [(0.0, lo), (1.0, hi)],
                heat_colour((lo + hi) / 2.0).filled(),
            )
        }))?;
        // Segmented axes: tick labels sit in the middle of each cell.
        let mut chart = ChartBuilder::on(&main)
            .caption(title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(70)
            // plotters' discrete i32 ranges include their end: 0..n-1 is n cells.
            .build_cartesian_2d(
                (0..n as i32 - 1).into_segmented(),
                (0..rows as i32 - 1).into_segmented(),
            )?;
        let label = |v: &SegmentValue<i32>, flip: bool| match v {
            SegmentValue::CenterOf(i) => {
                let i = if flip { rows as i32 - 1 - i } else { *i };
                format!("{i}")
            }
            _ => String::new(),
        };
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc("test task")
            .y_desc("after training task")
            .x_label_formatter(&|v| label(v, false))
            .y_label_formatter(&|v| label(v, true))
            .draw()?;
        for (i, r) in self.rows.iter().enumerate() {
            let y = (rows - 1 - i) as i32;
            for (j, &a) in r.iter().enumerate() {
                let x = j as i32;
                let cell = [
                    (SegmentValue::Exact(x), SegmentValue::Exact(y)),
                    (SegmentValue::Exact(x + 1), SegmentValue::Exact(y + 1)),
                ];
                if rows == n && j > i {
                    // Not trained yet: grey, no figure.
                    chart
                        .draw_series(std::iter::once(Rectangle::new(cell, NOT_TRAINED.filled())))?;
                    continue;
                }
                chart.draw_series(std::iter::once(Rectangle::new(
                    cell,
                    heat_colour(a).filled(),
                )))?;
                let fg = if a > 0.6 { WHITE } else { BLACK };
                let style = ("sans-serif", 16)
                    .into_font()
                    .color(&fg)
                    .pos(Pos::new(HPos::Center, VPos::Center));
                chart.draw_series(std::iter::once(Text::new(
                    format!("{a:.2}"),
                    (SegmentValue::CenterOf(x), SegmentValue::CenterOf(y)),
                    style,
                )))?;
            }
        }
        Ok(())
    }
}

/// Width of the heat map's colour scale, in pixels.
const HEATMAP_SCALE_W: u32 = 90;

/// The fill of a cell whose task was not trained yet.
const NOT_TRAINED: RGBColor = RGBColor(225, 225, 225);

/// A heat map cell's colour: white (accuracy 0) to deep blue (1).
fn heat_colour(a: f64) -> RGBColor {
    let a = a.clamp(0.0, 1.0);
    RGBColor(
        (255.0 * (1.0 - 0.85 * a)) as u8,
        (255.0 * (1.0 - 0.6 * a)) as u8,
        255,
    )
}

fn tmp_path(path: &Path) -> std::path::PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp.{}.png", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hand() -> AccuracyMatrix {
        // Three tasks; computed by hand below.
        let mut m = AccuracyMatrix::from_rows(vec![
            vec![0.9, 0.1, 0.2],
            vec![0.6, 0.8, 0.3],
            vec![0.5, 0.7, 0.95],
        ])
        .unwrap();
        m.initial = Some(vec![0.1, 0.15, 0.1]);
        m
    }

    #[test]
    fn metrics_match_a_hand_computed_matrix() {
        let m = hand();
        // (0.5 + 0.7 + 0.95) / 3
        assert!((m.avg_accuracy().unwrap() - 2.15 / 3.0).abs() < 1e-12);
        // task 0: 0.9 - 0.5 = 0.4; task 1: 0.8 - 0.7 = 0.1; mean 0.25
        let f = m.forgetting_per_task().unwrap();
        assert!((f[0] - 0.4).abs() < 1e-12 && (f[1] - 0.1).abs() < 1e-12);
        assert!((m.forgetting().unwrap() - 0.25).abs() < 1e-12);
        assert!((m.backward_transfer().unwrap() + 0.25).abs() < 1e-12);
        // R[0][1] - R0[1] = 0.1 - 0.15; R[1][2] - R0[2] = 0.3 - 0.1; mean 0.075
        assert!((m.forward_transfer().unwrap() - 0.075).abs() < 1e-12);
        let md = m.to_markdown();
        assert!(md.contains("| task 2 | 0.500 | 0.700 | 0.950 |"), "{md}");
        assert!(md.contains("forgetting 0.2500"), "{md}");
    }

    #[test]
    fn bad_rows_are_refused() {
        let mut m = AccuracyMatrix::new();
        m.push_row(vec![0.5, 0.5]).unwrap();
        assert!(m
            .push_row(vec![0.5])
            .unwrap_err()
            .to_string()
            .contains("row 1 has 1"));
        assert!(m
            .push_row(vec![1.5, 0.0])
            .unwrap_err()
            .to_string()
            .contains("1.5"));
        m.push_row(vec![0.5, 0.5]).unwrap();
        assert!(m.push_row(vec![0.5, 0.5]).is_err());
        assert!(AccuracyMatrix::new().avg_accuracy().is_err());
    }

    /// Grey pixels (cells of tasks not trained yet) in the heat map of `m`.
    fn not_trained_pixels(m: &AccuracyMatrix) -> usize {
        let (w, h) = m.heatmap_size().unwrap();
        let mut buf = vec![0u8; (w * h * 3) as usize];
        {
            let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
            m.draw_heatmap(&root, "t").unwrap();
            root.present().unwrap();
        }
        let g = [NOT_TRAINED.0, NOT_TRAINED.1, NOT_TRAINED.2];
        buf.chunks(3).filter(|p| *p == g).count()
    }

    #[test]
    fn heat_map_greys_out_tasks_not_trained_yet() {
        // A stream: the three cells above the diagonal are grey (each 90 x 60 pixels
        // give or take the axes' rounding), and a cell's accuracy never draws grey.
        let stream = hand();
        let grey = not_trained_pixels(&stream);
        assert!(grey > 3 * 70 * 40 && grey < 3 * 100 * 70, "{grey}");
        // One row after joint training: every cell trained, none grey (a few
        // anti-aliased text pixels may share the colour).
        let joint = AccuracyMatrix::from_rows(vec![vec![0.9, 0.1, 0.2]]).unwrap();
        let grey = not_trained_pixels(&joint);
        assert!(grey < 100, "{grey}");
    }

    #[test]
    fn json_round_trips_and_heat_map_is_a_png() {
        let dir = tempfile::tempdir().unwrap();
        let m = hand();
        let p = dir.path().join("r.json");
        m.save_json(&p).unwrap();
        assert_eq!(AccuracyMatrix::load_json(&p).unwrap(), m);
        std::fs::write(&p, "{\"rows\": [[2.0]]}").unwrap();
        let e = AccuracyMatrix::load_json(&p).unwrap_err().to_string();
        assert!(e.contains("r.json") && e.contains("2"), "{e}");
        let one = AccuracyMatrix::from_rows(vec![vec![0.5]]).unwrap();
        one.save_heatmap_png(&dir.path().join("one.png"), "one cell")
            .unwrap();
        std::fs::remove_file(dir.path().join("one.png")).unwrap();
        let png = dir.path().join("r.png");
        m.save_heatmap_png(&png, "test").unwrap();
        // REUSE_KEEP_HEATMAP=FILE keeps a copy to look at.
        if let Some(keep) = std::env::var_os("REUSE_KEEP_HEATMAP") {
            std::fs::copy(&png, keep).unwrap();
        }
        let bytes = std::fs::read(&png).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            2,
            "no temp files left"
        );
    }
}
