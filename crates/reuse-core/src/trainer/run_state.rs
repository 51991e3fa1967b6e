//! The run file: [`Trainer`]'s save (every `every` steps and at the end) and
//! [`Trainer::resume`].

use tch::{Device, Kind, Tensor};

use super::{Position, RunStateConfig, SaveParams, Technique, TrainReport, Trainer};
use crate::model::Trainable;
use crate::optim::Optimizer;
use crate::{Checkpoint, Error, Params, Result};

const META_KEYS: [&str; 6] = [
    "step",
    "epoch",
    "batch_in_epoch",
    "total_steps",
    "batch_size",
    "seed",
];

impl Trainer {
    pub(super) fn save_run(
        &self,
        rs: &RunStateConfig,
        model: &dyn Trainable,
        techniques: &[&mut dyn Technique],
        pos: Position,
        total: usize,
        report: &TrainReport,
    ) -> Result<()> {
        if techniques.iter().any(|t| !t.writes_run_state()) {
            return Ok(());
        }
        let c = &self.config;
        let mut ck = Checkpoint::new();
        let params = match rs.params {
            SaveParams::Trainable => model.params().trainable(),
            SaveParams::All => model.params(),
        };
        tch::no_grad(|| {
            for (n, t) in params.iter() {
                ck.insert(
                    format!("param.{n}"),
                    t.detach().to_device(Device::Cpu).copy(),
                );
            }
        });
        let opt = self.optimizer.state();
        for (n, t) in opt.iter() {
            ck.insert(format!("optim.{n}"), t.to_device(Device::Cpu));
        }
        for (k, v) in opt.metadata() {
            ck.set_metadata(format!("optim.{k}"), v.clone());
        }
        for t in techniques {
            let st = t.state()?;
            let name = t.name();
            for (n, v) in st.iter() {
                ck.insert(
                    format!("technique.{name}.{n}"),
                    v.to_device(Device::Cpu).copy(),
                );
            }
            for (k, v) in st.metadata() {
                ck.set_metadata(format!("technique.{name}.{k}"), v.clone());
            }
        }
        ck.insert("report.losses", Tensor::from_slice(&report.losses));
        let evals: Vec<f64> = report
            .evals
            .iter()
            .flat_map(|&(s, a)| [s as f64, a])
            .collect();
        ck.insert(
            "report.evals",
            Tensor::from_slice(&evals).view([report.evals.len() as i64, 2]),
        );
        for (k, v) in META_KEYS.iter().zip([
            pos.step,
            pos.epoch,
            pos.batch_in_epoch,
            total,
            c.batch_size,
            c.seed as usize,
        ]) {
            ck.set_metadata(*k, v.to_string());
        }
        ck.set_metadata("task", self.task.to_string());
        ck.set_metadata("format", "reuse-run-1");
        ck.save(&rs.path)
    }

    /// Loads the run file named by [`TrainConfig::run_state`] if it exists: parameters
    /// into `model`, the optimizer state, every technique's state and the position; the
    /// next [`Trainer::fit`] continues from there. Returns the step resumed from, or
    /// `None` when there is no file (a fresh run). A file written with another batch
    /// size or seed, a parameter missing or of another shape, or a technique's state
    /// missing is an error naming it, and nothing is changed.
    pub fn resume(
        &mut self,
        model: &dyn Trainable,
        techniques: &mut [&mut dyn Technique],
    ) -> Result<Option<usize>> {
        let Some(rs) = self.config.run_state.clone() else {
            return Err(Error::invalid(
                "resume",
                "TrainConfig::run_state is not set, so there is no run file to resume from",
            ));
        };
        if !rs.path.exists() {
            return Ok(None);
        }
        let ck = Checkpoint::load(&rs.path, Device::Cpu)?;
        let corrupt = |reason: String| Error::Corrupt {
            path: rs.path.clone(),
            reason,
        };
        if ck.metadata().get("format").map(String::as_str) != Some("reuse-run-1") {
            return Err(corrupt(
                "not a reuse run file (metadata `format` is not `reuse-run-1`)".into(),
            ));
        }
        let meta = |k: &str| -> Result<usize> {
            ck.metadata()
                .get(k)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| corrupt(format!("metadata `{k}` missing or not a number")))
        };
        let c = &self.config;
        for (k, want) in [("batch_size", c.batch_size), ("seed", c.seed as usize)] {
            let found = meta(k)?;
            if found != want {
                return Err(Error::invalid(
                    "resume",
                    format!(
                        "{}: the run was saved with {k} {found}, this trainer has {want}",
                        rs.path.display()
                    ),
                ));
            }
        }
        let pos = Position {
            step: meta("step")?,
            epoch: meta("epoch")?,
            batch_in_epoch: meta("batch_in_epoch")?,
        };
        // Validate everything before changing anything.
        let all = model.params();
        let mut targets = Vec::new();
        let mut values = Checkpoint::new();
        for (n, t) in ck.iter() {
            if let Some(p) = n.strip_prefix("param.") {
                let dst = all.get(p).ok_or_else(|| {
                    corrupt(format!("tensor `{n}`: the model has no parameter `{p}`"))
                })?;
                if dst.size() != t.size() {
                    return Err(Error::ShapeMismatch {
                        path: Some(rs.path.clone()),
                        tensor: n.to_string(),
                        expected: dst.size(),
                        found: t.size(),
                    });
                }
                targets.push((p.to_string(), dst.shallow_clone()));
                values.insert(p, t.shallow_clone());
            }
        }
        let mut opt_ck = Checkpoint::new();
        for (n, t) in ck.iter() {
            if let Some(k) = n.strip_prefix("optim.") {
                opt_ck.insert(k, t.shallow_clone());
            }
        }
        for (k, v) in ck.metadata() {
            if let Some(k) = k.strip_prefix("optim.") {
                opt_ck.set_metadata(k, v.clone());
            }
        }
        let mut optimizer = Optimizer::new(c.optimizer, c.weight_decay);
        optimizer.load_state(&opt_ck, &all)?;
        let mut states = Vec::new();
        for t in techniques.iter() {
            let prefix = format!("technique.{}.", t.name());
            let mut st = Checkpoint::new();
            for (n, v) in ck.iter() {
                if let Some(k) = n.strip_prefix(&prefix) {
                    st.insert(k, v.shallow_clone());
                }
            }
            for (k, v) in ck.metadata() {
                if let Some(k) = k.strip_prefix(&prefix) {
                    st.set_metadata(k, v.clone());
                }
            }
            states.push(st);
        }
        let losses: Vec<f64> = match ck.get("report.losses") {
            Some(t) => Vec::<f64>::try_from(&t.to_kind(Kind::Double))?,
            None => Vec::new(),
        };
        let evals: Vec<(usize, f64)> = match ck.get("report.evals") {
            Some(t) if t.numel() > 0 => {
                Vec::<f64>::try_from(&t.to_kind(Kind::Double).flatten(0, -1))?
                    .chunks(2)
                    .map(|p| (p[0] as usize, p[1]))
                    .collect()
            }
            _ => Vec::new(),
        };
        Params::new(targets).load_checkpoint(&values)?;
        for (t, st) in techniques.iter_mut().zip(&states) {
            t.load_state(st)?;
        }
        self.optimizer = optimizer;
        self.task = meta("task")?;
        self.resume = Some((
            pos,
            TrainReport {
                steps: pos.step,
                losses,
                evals,
                ..Default::default()
            },
        ));
        Ok(Some(pos.step))
    }
}
