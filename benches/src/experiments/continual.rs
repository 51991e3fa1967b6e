//! reuse-continual experiments on scikit-learn's digits, on one fixed protocol shared with
//! Avalanche 0.6 (run side by side through `benches/python/avalanche_digits.py`):
//! values / 16, a stratified 75/25 train/test split with seed 0, MLP 64-400-400-10 with
//! ReLU, Adam lr 1e-3, batch 32, 5 epochs per task, replay memory 200.
//!
//! Hyperparameters (EWC lambda, online gamma, replay mixing, PackNet pruning ratio) are
//! chosen at seed 0 on a dev split cut from the training rows (stratified 20%), for both
//! sides; the test rows are only used for the reported figures.

use std::collections::BTreeMap;
use std::process::Command;
use std::rc::Rc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::ProgressBar;
use reuse_continual::ewc::{Ewc, EwcConfig, EwcMode, FisherKind};
use reuse_continual::scenario::{
    permutations, run_stream, stratified_split, Concat, Scenario, ScenarioKind,
};
use reuse_continual::{
    AccuracyMatrix, BufferPolicy, MultiHead, PackNet, PerBatch, Replay, ReplayConfig,
};
use reuse_core::data::{load_digits_rows, BatchSource, TensorDataset};
use reuse_core::{Activation, Mlp, Model, Technique, TrainConfig, Trainable, Trainer};
use reuse_testkit::fixtures_dir;
use tch::{Device, Tensor};

use super::{mean, sample_sd, say, Counts, Ctx, Knobs, Metrics, OnCuda, Outcome, Seeds, Sizes};
use crate::claims::{at_least, pm, Claim, Get};
use crate::peer::Peer;

const MEMORY: usize = 200;

/// The sizes of the digits scenarios (`continual.split_digits`, `.permuted_digits`).
pub(super) struct ScenariosSizes {
    /// Epochs per task (the protocol's).
    epochs: usize,
    seeds: Seeds,
    /// The dev grids that choose the hyperparameters; `None`: the choices they made at
    /// the full size on the CPU (`chosen_at_full_size`), not run again.
    grids: Option<&'static DevGrids>,
}

/// `choose`'s dev grids: ours, and Avalanche's (its EWC lambdas are `empirical`'s, with
/// `gammas` for its online EWC).
struct DevGrids {
    exact: &'static [f64],
    empirical: &'static [f64],
    gammas: &'static [f64],
    replay: &'static [PerBatch],
    packnet_ratios: &'static [f64],
}

const FULL_GRIDS: DevGrids = DevGrids {
    exact: &[1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0],
    // Half-decade grids: lambda matters within a factor of three.
    empirical: &[1e2, 3e2, 1e3, 3e3, 1e4, 3e4, 1e5],
    gammas: &[0.9, 1.0],
    replay: &[PerBatch::Same, PerBatch::Ratio(0.5)],
    packnet_ratios: &[0.5, 0.75],
};

/// One point of each grid.
const QUICK_GRIDS: DevGrids = DevGrids {
    exact: &[10.0],
    empirical: &[1e3],
    gammas: &[0.9],
    replay: &[PerBatch::Same],
    packnet_ratios: &[0.5],
};

const SCENARIOS_FULL: ScenariosSizes = ScenariosSizes {
    epochs: 5,
    seeds: Seeds::All,
    grids: Some(&FULL_GRIDS),
};

/// The CPU size: the protocol unchanged, the grids' full-size choices.
const SCENARIOS_CPU: ScenariosSizes = ScenariosSizes {
    grids: None,
    ..SCENARIOS_FULL
};

/// Quick on the CPU builds on the CPU size (no grids), on CUDA on the full size (the
/// grids cut to one point each).
const SCENARIOS_QUICK: ScenariosSizes = ScenariosSizes {
    epochs: 1,
    seeds: Seeds::First(1),
    grids: None,
};

const SCENARIOS_QUICK_CUDA: ScenariosSizes = ScenariosSizes {
    grids: Some(&QUICK_GRIDS),
    ..SCENARIOS_QUICK
};

pub(super) const PERMUTED_DIGITS_SIZES: Sizes<ScenariosSizes> = Sizes {
    quick: SCENARIOS_QUICK,
    cpu: Some(SCENARIOS_CPU),
    full: SCENARIOS_FULL,
    cuda: OnCuda {
        quick: Some(SCENARIOS_QUICK_CUDA),
        full: None,
    },
};

/// `continual.split_digits`' sizes: the scenarios', and the EWC step-overhead timing's.
pub(super) struct SplitDigitsSizes {
    scenarios: ScenariosSizes,
    /// Steps of each side per round.
    overhead_steps: usize,
    overhead_rounds: usize,
}

pub(super) const SPLIT_DIGITS_SIZES: Sizes<SplitDigitsSizes> = Sizes {
    quick: SplitDigitsSizes {
        scenarios: SCENARIOS_QUICK,
        overhead_steps: 5,
        overhead_rounds: 2,
    },
    cpu: Some(SplitDigitsSizes {
        scenarios: SCENARIOS_CPU,
        overhead_steps: 50,
        overhead_rounds: 15,
    }),
    full: SplitDigitsSizes {
        scenarios: SCENARIOS_FULL,
        overhead_steps: 50,
        overhead_rounds: 15,
    },
    cuda: OnCuda {
        quick: Some(SplitDigitsSizes {
            scenarios: SCENARIOS_QUICK_CUDA,
            overhead_steps: 5,
            overhead_rounds: 2,
        }),
        full: None,
    },
};

impl Knobs for ScenariosSizes {
    fn counts(&self) -> Counts {
        let grid_points = self.grids.map_or(0, |g| {
            g.exact.len()
                + g.empirical.len()
                + g.gammas.len()
                + g.replay.len()
                + g.packnet_ratios.len()
        });
        vec![
            ("epochs", self.epochs),
            ("seeds", self.seeds.count()),
            ("grid_points", grid_points),
        ]
    }
}

impl Knobs for SplitDigitsSizes {
    fn counts(&self) -> Counts {
        let mut c = self.scenarios.counts();
        c.extend([
            ("overhead_steps", self.overhead_steps),
            ("overhead_rounds", self.overhead_rounds),
        ]);
        c
    }
}

/// A method and its hyperparameters.
#[derive(Debug, Clone, PartialEq)]
enum Method {
    Naive,
    Ewc { lambda: f64, kind: FisherKind },
    OnlineEwc { lambda: f64, gamma: f64 },
    Replay { per_batch: PerBatch },
    PackNet { ratio: f64, retrain_epochs: usize },
    Joint,
}

impl Method {
    fn id(&self) -> &'static str {
        match self {
            Method::Naive => "naive",
            Method::Ewc {
                kind: FisherKind::Exact,
                ..
            } => "ewc",
            Method::Ewc {
                kind: FisherKind::Empirical,
                ..
            } => "ewc_empirical",
            Method::OnlineEwc { .. } => "online_ewc",
            Method::Replay { .. } => "replay",
            Method::PackNet { .. } => "packnet",
            Method::Joint => "joint",
        }
    }

    fn describe(&self) -> String {
        match self {
            Method::Naive | Method::Joint => self.id().to_string(),
            Method::Ewc { lambda, .. } => format!("{} (lambda {lambda})", self.id()),
            Method::OnlineEwc { lambda, gamma } => {
                format!("online_ewc (lambda {lambda}, gamma {gamma})")
            }
            Method::Replay { per_batch } => format!("replay ({per_batch:?} per batch)"),
            Method::PackNet {
                ratio,
                retrain_epochs,
            } => format!("packnet (ratio {ratio}, {retrain_epochs} retraining epochs)"),
        }
    }
}

struct Protocol {
    epochs: usize,
    device: Device,
}

impl Protocol {
    fn config(&self, seed: u64) -> TrainConfig {
        TrainConfig {
            epochs: self.epochs,
            lr: 1e-3,
            batch_size: 32,
            seed,
            device: self.device,
            ..Default::default()
        }
    }
}

/// One run: the accuracy matrix and the wall time (model construction, training and the
/// evaluations after each task).
struct RunResult {
    r: AccuracyMatrix,
    seconds: f64,
}

/// The techniques of a method (EWC or replay; none for the others).
struct Techs {
    ewc: Option<Ewc>,
    replay: Option<Replay>,
}

impl Techs {
    fn new(method: &Method, seed: u64) -> Result<Self> {
        let mut t = Techs {
            ewc: None,
            replay: None,
        };
        match method {
            Method::Ewc { lambda, kind } => {
                t.ewc = Some(Ewc::new(EwcConfig::new(*lambda, *kind))?);
            }
            Method::OnlineEwc { lambda, gamma } => {
                let mut c = EwcConfig::new(*lambda, FisherKind::Exact);
                c.mode = EwcMode::Online { gamma: *gamma };
                t.ewc = Some(Ewc::new(c)?);
            }
            Method::Replay { per_batch } => {
                let mut c = ReplayConfig::new(BufferPolicy::TaskBalanced, MEMORY);
                c.per_batch = *per_batch;
                c.seed = seed;
                t.replay = Some(Replay::new(c)?);
            }
            _ => {}
        }
        Ok(t)
    }

    fn refs(&mut self) -> Vec<&mut dyn Technique> {
        let mut v: Vec<&mut dyn Technique> = Vec::new();
        if let Some(e) = self.ewc.as_mut() {
            v.push(e);
        }
        if let Some(r) = self.replay.as_mut() {
            v.push(r);
        }
        v
    }
}

fn joint(scn: &Scenario, model: &dyn Trainable, p: &Protocol, seed: u64) -> Result<AccuracyMatrix> {
    let all = Concat::joint_train(scn, 0);
    Trainer::new(p.config(seed)).fit(model, &all, None, &mut [])?;
    let mut r = AccuracyMatrix::new();
    r.push_row(scn.evaluate(model, 512, p.device)?)?;
    Ok(r)
}

/// Class- and domain-incremental: one 10-way head.
fn run_single_head(scn: &Scenario, method: &Method, p: &Protocol, seed: u64) -> Result<RunResult> {
    let start = Instant::now();
    tch::manual_seed(seed as i64);
    let net = Mlp::new(&[64, 400, 400, 10], Activation::Relu, p.device)?;
    let r = if *method == Method::Joint {
        joint(scn, &net, p, seed)?
    } else {
        let mut techs = Techs::new(method, seed)?;
        let mut refs = techs.refs();
        let mut trainer = Trainer::new(p.config(seed));
        run_stream(scn, &net, &mut trainer, &mut refs, 512, false)?
    };
    Ok(RunResult {
        r,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Task-incremental: a 64-400-400 body and one head per task, limited to its classes
/// (as Avalanche's MultiHeadClassifier); only the current task's head trains.
fn run_multi_head(scn: &Scenario, method: &Method, p: &Protocol, seed: u64) -> Result<RunResult> {
    let start = Instant::now();
    tch::manual_seed(seed as i64);
    let body = Mlp::new(&[64, 400, 400], Activation::Relu, p.device)?;
    let mut model = MultiHead::new(body, 400, 10, scn.tasks.len(), p.device)?;
    for e in &scn.tasks {
        model.limit_classes(e.task, &e.classes)?;
    }
    let mut r = AccuracyMatrix::new();
    match method {
        Method::Joint => {
            r = joint(scn, &model, p, seed)?;
        }
        Method::PackNet {
            ratio,
            retrain_epochs,
        } => {
            let mut pack = PackNet::new(*ratio, "body.*")?;
            let mut trainer = Trainer::new(p.config(seed));
            for e in &scn.tasks {
                model.train_only_head(e.task)?;
                trainer.begin_task(e.task, &model, &e.train, &mut [&mut pack])?;
                trainer.config.epochs = p.epochs;
                trainer.fit(&model, &e.train, None, &mut [&mut pack])?;
                pack.prune(&model.params())?;
                trainer.config.epochs = *retrain_epochs;
                trainer.fit(&model, &e.train, None, &mut [&mut pack])?;
                trainer.end_task(e.task, &model, &e.train, &mut [&mut pack])?;
                // Each test task under its own inference mask.
                let mut row = Vec::new();
                for t in &scn.tasks {
                    pack.apply_inference_mask(&mut model, t.task.min(e.task))?;
                    row.push(reuse_core::trainer::accuracy(
                        &model, &t.test, 512, p.device,
                    )?);
                }
                pack.clear_inference_mask(&mut model);
                r.push_row(row)?;
            }
        }
        _ => {
            let mut techs = Techs::new(method, seed)?;
            let mut refs = techs.refs();
            let mut trainer = Trainer::new(p.config(seed));
            for e in &scn.tasks {
                model.train_only_head(e.task)?;
                trainer.begin_task(e.task, &model, &e.train, &mut refs)?;
                trainer.fit(&model, &e.train, None, &mut refs)?;
                trainer.end_task(e.task, &model, &e.train, &mut refs)?;
                r.push_row(scn.evaluate(&model, 512, p.device)?)?;
            }
        }
    }
    Ok(RunResult {
        r,
        seconds: start.elapsed().as_secs_f64(),
    })
}

fn run(scn: &Scenario, method: &Method, p: &Protocol, seed: u64) -> Result<RunResult> {
    match scn.kind {
        ScenarioKind::TaskIncremental => run_multi_head(scn, method, p, seed),
        _ => run_single_head(scn, method, p, seed),
    }
}

/// The data in file order, the stratified 75/25 split (seed 0) and, inside the training
/// rows, a stratified 80/20 fit/dev split (seed 1).
struct Split {
    all: TensorDataset,
    train: Vec<i64>,
    test: Vec<i64>,
    fit: Vec<i64>,
    dev: Vec<i64>,
}

fn split() -> Result<Split> {
    let all = load_digits_rows(&fixtures_dir().join("digits/digits.csv.gz"))?;
    let labels = Vec::<i64>::try_from(&all.y)?;
    let (train, test) = stratified_split(&labels, 0.25, 0)?;
    let train_labels: Vec<i64> = train.iter().map(|&i| labels[i as usize]).collect();
    let (fit_pos, dev_pos) = stratified_split(&train_labels, 0.2, 1)?;
    let fit = fit_pos.iter().map(|&i| train[i as usize]).collect();
    let dev = dev_pos.iter().map(|&i| train[i as usize]).collect();
    Ok(Split {
        all,
        train,
        test,
        fit,
        dev,
    })
}

fn rows(all: &TensorDataset, idx: &[i64]) -> Result<Rc<dyn BatchSource>> {
    let i = Tensor::from_slice(idx);
    Ok(Rc::new(TensorDataset::new(
        all.x.index_select(0, &i),
        all.y.index_select(0, &i),
    )?))
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    ClassIl,
    TaskIl,
    Permuted,
}

impl Kind {
    fn id(self) -> &'static str {
        match self {
            Kind::ClassIl => "class_il",
            Kind::TaskIl => "task_il",
            Kind::Permuted => "permuted",
        }
    }
}

fn splits() -> Vec<Vec<i64>> {
    (0..5).map(|t| vec![2 * t, 2 * t + 1]).collect()
}

fn scenario(kind: Kind, train: Rc<dyn BatchSource>, test: Rc<dyn BatchSource>) -> Result<Scenario> {
    Ok(match kind {
        Kind::ClassIl => Scenario::class_incremental(train, test, &splits())?,
        Kind::TaskIl => Scenario::task_incremental(train, test, &splits())?,
        Kind::Permuted => Scenario::permuted(train, test, &permutations(5, 64, 0))?,
    })
}

/// The command that runs `benches/python/avalanche_digits.py` on these train/test rows
/// under the protocol, with `extra` spec fields (`runs`, `warmup`); the spec is written
/// to `target/reuse-bench-tmp/<spec_name>`. The caller adds the mode's arguments.
fn avalanche_command(
    ctx: &Ctx,
    spec_name: &str,
    train: &[i64],
    test: &[i64],
    epochs: usize,
    extra: serde_json::Value,
) -> Result<Command> {
    let py = ctx
        .python()
        .context("no .venv python: run `cargo xtask setup` (the Avalanche side needs it)")?;
    let dir = ctx.root.join("target/reuse-bench-tmp");
    std::fs::create_dir_all(&dir)?;
    let spec_path = dir.join(spec_name);
    let mut spec = serde_json::json!({
        "train": train, "test": test, "tasks": splits(),
        "permutations": permutations(5, 64, 0),
        "runs": [], "epochs": epochs, "batch_size": 32, "lr": 1e-3,
        "threads": tch::get_num_threads(),
    });
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        s.extend(e.clone());
    }
    std::fs::write(&spec_path, serde_json::to_vec(&spec)?)?;
    let mut c = Command::new(&py);
    c.arg(ctx.root.join("benches/python/avalanche_digits.py"))
        .arg("--spec")
        .arg(&spec_path)
        .arg("--data")
        .arg(fixtures_dir().join("digits/digits.csv.gz"));
    Ok(c)
}

/// Runs Avalanche on `runs` (each `{"scenario", "method", "seed", ...}`) over the given
/// train/test rows; returns the script's per-run results.
fn avalanche(
    ctx: &Ctx,
    train: &[i64],
    test: &[i64],
    runs: Vec<serde_json::Value>,
    epochs: usize,
) -> Result<Vec<serde_json::Value>> {
    let out_path = ctx.root.join("target/reuse-bench-tmp/avalanche_out.json");
    let mut cmd = avalanche_command(
        ctx,
        "avalanche_spec.json",
        train,
        test,
        epochs,
        serde_json::json!({ "runs": runs }),
    )?;
    let status = cmd
        .arg("--out")
        .arg(&out_path)
        .status()
        .context("running benches/python/avalanche_digits.py")?;
    if !status.success() {
        bail!("benches/python/avalanche_digits.py failed ({status})");
    }
    let out: serde_json::Value = serde_json::from_slice(&std::fs::read(&out_path)?)?;
    Ok(out["runs"]
        .as_array()
        .context("avalanche output has no runs")?
        .clone())
}

/// One Avalanche process kept for many runs (`avalanche_digits.py --serve`, a [`Peer`]),
/// so that its runs can alternate with ours one by one: the two sides of a time ratio then
/// run back to back, under the same load on a shared machine.
struct AvalancheServer(Peer);

impl AvalancheServer {
    /// Starts the script on these train/test rows; it makes `warmup` (untimed) before it
    /// answers that it is ready.
    fn start(
        ctx: &Ctx,
        train: &[i64],
        test: &[i64],
        epochs: usize,
        warmup: serde_json::Value,
    ) -> Result<Self> {
        let (peer, ready) = Peer::start(
            "avalanche_digits",
            &ctx.report_dir(),
            avalanche_command(
                ctx,
                "avalanche_serve_spec.json",
                train,
                test,
                epochs,
                serde_json::json!({ "warmup": warmup }),
            )?
            .arg("--serve"),
        )?;
        if ready["ready"] != true {
            bail!("avalanche_digits.py --serve: expected its ready line, found {ready}");
        }
        Ok(Self(peer))
    }

    /// One run; its result object as the batch mode writes it.
    fn run(&mut self, run: &serde_json::Value) -> Result<serde_json::Value> {
        self.0.ask(&serde_json::to_string(run)?)
    }
}

fn av_run(kind: Kind, method: &str, seed: u64, lambda: f64, gamma: f64) -> serde_json::Value {
    serde_json::json!({"scenario": kind.id(), "method": method, "seed": seed,
                       "ewc_lambda": lambda, "decay_factor": gamma, "mem_size": MEMORY})
}

fn f(v: &serde_json::Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(f64::NAN)
}

/// Dev-split choices: ours (per method id) and Avalanche's (lambda, gamma) per method.
struct Chosen {
    ours: BTreeMap<&'static str, Method>,
    avalanche: BTreeMap<&'static str, (f64, f64)>,
    notes: Vec<String>,
}

/// The choices `choose` made on the dev split at the full size on the 2-core CPU
/// (benches/reports/2026-12-05-cpu-continual-digits-full.json, its notes list every grid
/// point): the sizes without grids (`ScenariosSizes::grids`) reuse them rather than run
/// the grids again. The protocol is the same at both sizes; only the grids are left out.
fn chosen_at_full_size(kind: Kind, p: &Protocol) -> Chosen {
    let ewc = |lambda| Method::Ewc {
        lambda,
        kind: FisherKind::Exact,
    };
    let emp = |lambda| Method::Ewc {
        lambda,
        kind: FisherKind::Empirical,
    };
    let mut ours = BTreeMap::new();
    ours.insert("naive", Method::Naive);
    ours.insert("joint", Method::Joint);
    ours.insert(
        "replay",
        Method::Replay {
            per_batch: PerBatch::Same,
        },
    );
    let mut avalanche = BTreeMap::new();
    for m in ["naive", "replay", "joint"] {
        avalanche.insert(m, (0.0, 0.0));
    }
    // Single-head scenarios: (exact lambda, empirical lambda, online (lambda, gamma),
    // Avalanche's EWC lambda, Avalanche's online (lambda, gamma)).
    let mut single_head = |exact: f64, empirical: f64, online: (f64, f64), av: f64, av_online| {
        ours.insert("ewc", ewc(exact));
        ours.insert("ewc_empirical", emp(empirical));
        let (lambda, gamma) = online;
        ours.insert("online_ewc", Method::OnlineEwc { lambda, gamma });
        avalanche.insert("ewc", (av, 0.9));
        avalanche.insert("online_ewc", av_online);
    };
    match kind {
        Kind::ClassIl => single_head(1e3, 1e5, (1e3, 0.9), 3e4, (1e5, 1.0)),
        Kind::Permuted => single_head(100.0, 1e4, (100.0, 1.0), 1e4, (1e4, 0.9)),
        Kind::TaskIl => {
            ours.insert("ewc", ewc(100.0));
            ours.insert(
                "replay",
                Method::Replay {
                    per_batch: PerBatch::Ratio(0.5),
                },
            );
            ours.insert(
                "packnet",
                Method::PackNet {
                    ratio: 0.75,
                    retrain_epochs: 2.min(p.epochs),
                },
            );
            avalanche.insert("ewc", (100.0, 0.9));
        }
    }
    let list = ours
        .values()
        .map(Method::describe)
        .chain(
            avalanche
                .iter()
                .filter(|(_, (l, _))| *l > 0.0)
                .map(|(m, (l, g))| format!("Avalanche {m} (lambda {l}, gamma {g})")),
        )
        .collect::<Vec<_>>()
        .join(", ");
    Chosen {
        ours,
        avalanche,
        notes: vec![format!(
            "CPU size, to fit the plain CPU bench: no dev grid runs here; the choices are \
             those the full size's grids made on the dev split on this machine \
             (benches/reports/2026-12-05-cpu-continual-digits-full.json lists every \
             grid point): {list}. The protocol is the same; a CUDA run or `--full` runs the grids."
        )],
    }
}

fn choose(
    ctx: &Ctx,
    grids: Option<&DevGrids>,
    kind: Kind,
    s: &Split,
    p: &Protocol,
    bar: &ProgressBar,
) -> Result<Chosen> {
    let Some(g) = grids else {
        return Ok(chosen_at_full_size(kind, p));
    };
    let scn = scenario(kind, rows(&s.all, &s.fit)?, rows(&s.all, &s.dev)?)?;
    let (exact_grid, emp_grid, gammas) = (g.exact, g.empirical, g.gammas);
    let mut notes = Vec::new();
    let mut ours = BTreeMap::new();
    let best = |cands: Vec<Method>, notes: &mut Vec<String>| -> Result<Method> {
        let mut seen = Vec::new();
        let mut top = (f64::MIN, cands[0].clone());
        for m in cands {
            let a = run(&scn, &m, p, 0)?.r.avg_accuracy()?;
            seen.push(format!("{} {a:.3}", m.describe()));
            if a > top.0 {
                top = (a, m);
            }
        }
        notes.push(format!("{}: {}", top.1.id(), seen.join(", ")));
        Ok(top.1)
    };
    ours.insert("naive", Method::Naive);
    ours.insert("joint", Method::Joint);
    let ewc = best(
        exact_grid
            .iter()
            .map(|&lambda| Method::Ewc {
                lambda,
                kind: FisherKind::Exact,
            })
            .collect(),
        &mut notes,
    )?;
    ours.insert("ewc", ewc);
    if kind != Kind::TaskIl {
        let emp = best(
            emp_grid
                .iter()
                .map(|&lambda| Method::Ewc {
                    lambda,
                    kind: FisherKind::Empirical,
                })
                .collect(),
            &mut notes,
        )?;
        ours.insert("ewc_empirical", emp);
        let mut c = Vec::new();
        for &lambda in exact_grid {
            for &gamma in gammas {
                c.push(Method::OnlineEwc { lambda, gamma });
            }
        }
        ours.insert("online_ewc", best(c, &mut notes)?);
    }
    let replay_grid: Vec<Method> = g
        .replay
        .iter()
        .map(|&per_batch| Method::Replay { per_batch })
        .collect();
    ours.insert("replay", best(replay_grid, &mut notes)?);
    if kind == Kind::TaskIl {
        let pack = best(
            g.packnet_ratios
                .iter()
                .map(|&ratio| Method::PackNet {
                    ratio,
                    retrain_epochs: 2.min(p.epochs),
                })
                .collect(),
            &mut notes,
        )?;
        ours.insert("packnet", pack);
    }
    // Avalanche's EWC lambda (and online gamma) on the same dev split, its own scale.
    let mut av_choice = BTreeMap::new();
    av_choice.insert("naive", (0.0, 0.0));
    av_choice.insert("replay", (0.0, 0.0));
    av_choice.insert("joint", (0.0, 0.0));
    let mut runs = Vec::new();
    for &l in emp_grid {
        runs.push(av_run(kind, "ewc", 0, l, 0.9));
        if kind != Kind::TaskIl {
            for &g in gammas {
                runs.push(av_run(kind, "online_ewc", 0, l, g));
            }
        }
    }
    say(
        bar,
        format!("  {}: Avalanche dev grid, {} runs", kind.id(), runs.len()),
    );
    let res = avalanche(ctx, &s.fit, &s.dev, runs, p.epochs)?;
    for m in ["ewc", "online_ewc"] {
        let mut top: Option<(f64, f64, f64)> = None;
        let mut seen = Vec::new();
        for v in res.iter().filter(|v| v["method"] == m) {
            let a = f(v, "avg_accuracy");
            let (l, g) = (f(v, "ewc_lambda"), f(v, "decay_factor"));
            seen.push(format!("lambda {l} gamma {g}: {a:.3}"));
            if top.is_none_or(|t| a > t.0) {
                top = Some((a, l, g));
            }
        }
        if let Some((_, l, g)) = top {
            av_choice.insert(m, (l, g));
            notes.push(format!("Avalanche {m}: {}", seen.join(", ")));
        }
    }
    Ok(Chosen {
        ours,
        avalanche: av_choice,
        notes,
    })
}

fn scenarios_experiment(
    ctx: &Ctx,
    bar: &ProgressBar,
    kinds: &[Kind],
    name: &str,
    sizes: &ScenariosSizes,
) -> Result<Outcome> {
    let s = split()?;
    let p = Protocol {
        epochs: sizes.epochs,
        device: ctx.device,
    };
    let seeds = sizes.seeds.of(&ctx.seeds);
    let mut m = Metrics::new();
    let mut notes = vec![format!(
        "Protocol (shared with Avalanche): digits values / 16; stratified 75/25 train/test \
         split, seed 0 ({} / {} rows); MLP 64-400-400-10 ReLU (task-incremental: the same \
         body and one head per task limited to its classes, only the current task's head \
         training); Adam lr 1e-3 (moments kept across tasks, as Avalanche keeps them), \
         batch 32, {} epochs per task; replay memory {MEMORY}, task-balanced as \
         Avalanche's default storage policy. Seeds {seeds:?}; figures are means and sample \
         sds over seeds, times are wall seconds per run (model construction, training, \
         the evaluation after each task) on {} threads. Timing: Avalanche runs in one \
         process kept for the whole scenario (`avalanche_digits.py --serve`); each of its \
         runs goes back to back with ours of the same method and seed, the side going \
         first alternating pair by pair, after one untimed warm-up run on each side; \
         `<method>.time_ratio` is the median over seeds of ours / Avalanche's seconds of \
         a pair (`_min`, `_max` the range), so that a slow spell of this shared machine \
         hits both sides of a ratio.",
        s.train.len(),
        s.test.len(),
        p.epochs,
        tch::get_num_threads()
    )];
    let report_dir = ctx.report_dir().join("continual");
    std::fs::create_dir_all(&report_dir)?;
    for &kind in kinds {
        say(bar, format!("  {name} {}: choosing on dev", kind.id()));
        let chosen = choose(ctx, sizes.grids, kind, &s, &p, bar)?;
        notes.push(format!(
            "{} hyperparameters, chosen at seed 0 by average accuracy on the dev split \
             (20% of the training rows, stratified, seed 1; trained on the other 80%): {}",
            kind.id(),
            chosen.notes.join("; ")
        ));
        let scn = scenario(kind, rows(&s.all, &s.train)?, rows(&s.all, &s.test)?)?;
        let mut ours: BTreeMap<&str, Vec<RunResult>> = BTreeMap::new();
        let mut theirs: BTreeMap<String, Vec<serde_json::Value>> = BTreeMap::new();
        // Per method, ours / Avalanche's seconds of each seed's pair of runs.
        let mut pair_ratios: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        let av_methods: &[&str] = match kind {
            Kind::TaskIl => &["naive", "ewc", "replay"],
            _ => &["naive", "ewc", "online_ewc", "replay", "joint"],
        };
        bar.set_message(format!("{name} {} starting Avalanche", kind.id()));
        let mut server = AvalancheServer::start(
            ctx,
            &s.train,
            &s.test,
            p.epochs,
            av_run(kind, "naive", 0, 0.0, 0.0),
        )?;
        // Our warm-up, untimed, as the server's.
        run(&scn, &Method::Naive, &p, 0)?;
        let mut pair = 0usize;
        for &seed in seeds {
            for (id, method) in &chosen.ours {
                bar.set_message(format!("{name} {} {id} seed {seed}", kind.id()));
                let spec = av_methods.contains(id).then(|| {
                    let (l, g) = chosen.avalanche.get(id).copied().unwrap_or((0.0, 0.0));
                    av_run(kind, id, seed, l, g)
                });
                // Back to back, alternating which side goes first.
                let ours_first = pair % 2 == 0;
                let mut av = None;
                if let (false, Some(spec)) = (ours_first, &spec) {
                    av = Some(server.run(spec)?);
                }
                let r = run(&scn, method, &p, seed)?;
                if let (true, Some(spec)) = (ours_first, &spec) {
                    av = Some(server.run(spec)?);
                }
                if let Some(v) = av {
                    pair += 1;
                    pair_ratios
                        .entry(id)
                        .or_default()
                        .push(r.seconds / f(&v, "seconds"));
                    theirs.entry(id.to_string()).or_default().push(v);
                }
                if seed == 0 {
                    r.r.save_heatmap_png(
                        &report_dir.join(format!("{}_{id}.png", kind.id())),
                        &format!("{} {id} (seed 0)", kind.id()),
                    )?;
                    r.r.save_json(&report_dir.join(format!("{}_{id}.json", kind.id())))?;
                }
                ours.entry(id).or_default().push(r);
            }
        }
        drop(server);
        let sc = kind.id();
        for (id, runs) in &ours {
            let acc: Vec<f64> = runs
                .iter()
                .map(|r| r.r.avg_accuracy().unwrap_or(f64::NAN))
                .collect();
            let secs: Vec<f64> = runs.iter().map(|r| r.seconds).collect();
            m.insert(format!("{sc}.{id}.avg_accuracy"), mean(&acc));
            m.insert(format!("{sc}.{id}.avg_accuracy_sd"), sample_sd(&acc));
            m.insert(format!("{sc}.{id}.seconds"), mean(&secs));
            if *id != "joint" {
                let fg: Vec<f64> = runs
                    .iter()
                    .map(|r| r.r.forgetting().unwrap_or(f64::NAN))
                    .collect();
                m.insert(format!("{sc}.{id}.forgetting"), mean(&fg));
                m.insert(format!("{sc}.{id}.forgetting_sd"), sample_sd(&fg));
            }
        }
        for (mm, runs) in &theirs {
            let acc: Vec<f64> = runs.iter().map(|v| f(v, "avg_accuracy")).collect();
            let secs: Vec<f64> = runs.iter().map(|v| f(v, "seconds")).collect();
            m.insert(format!("avalanche.{sc}.{mm}.avg_accuracy"), mean(&acc));
            m.insert(
                format!("avalanche.{sc}.{mm}.avg_accuracy_sd"),
                sample_sd(&acc),
            );
            m.insert(format!("avalanche.{sc}.{mm}.seconds"), mean(&secs));
            if mm != "joint" {
                let fg: Vec<f64> = runs.iter().map(|v| f(v, "forgetting")).collect();
                m.insert(format!("avalanche.{sc}.{mm}.forgetting"), mean(&fg));
            }
            if let Some(r) = pair_ratios.get(mm.as_str()) {
                m.insert(format!("{sc}.{mm}.time_ratio"), super::median(r));
                let lo = r.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = r.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                m.insert(format!("{sc}.{mm}.time_ratio_min"), lo);
                m.insert(format!("{sc}.{mm}.time_ratio_max"), hi);
            }
        }
        notes.push(format!(
            "{sc}: accuracy matrices of seed 0 as heat maps and JSON in {} ({sc}_<method>.png); \
             ours: {}.",
            report_dir.display(),
            chosen
                .ours
                .values()
                .map(Method::describe)
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    Ok(Outcome { metrics: m, notes })
}

pub fn split_digits(ctx: &Ctx, bar: &ProgressBar) -> Result<Outcome> {
    let sizes = ctx.sizes(&SPLIT_DIGITS_SIZES);
    let mut out = scenarios_experiment(
        ctx,
        bar,
        &[Kind::ClassIl, Kind::TaskIl],
        "split_digits",
        &sizes.scenarios,
    )?;
    bar.set_message("split_digits EWC step overhead");
    let (ratios, steps) = ewc_overhead(ctx, sizes.overhead_steps, sizes.overhead_rounds)?;
    super::insert_spread(&mut out.metrics, "ewc_step_overhead", &ratios);
    out.notes.push(format!(
        "ewc_step_overhead: time of a training step with EWC's penalty (4 consolidated \
         tasks, exact Fisher, as the technique applies it: its gradient added after \
         backward) over a plain step, for the protocol's MLP at batch 32; {} rounds of \
         {steps} plain then {steps} penalised steps, interleaved; the median of the \
         per-round ratios and their spread. Criterion has the same comparison, and the \
         penalty through autograd, in `cargo bench --bench ewc`.",
        ratios.len()
    ));
    Ok(out)
}

/// Per-round ratios (penalised / plain step time) over `rounds` rounds of `steps` steps
/// each side, and the steps per round.
fn ewc_overhead(ctx: &Ctx, steps: usize, rounds: usize) -> Result<(Vec<f64>, usize)> {
    let s = split()?;
    let data = rows(&s.all, &s.train)?;
    tch::manual_seed(0);
    let net = Mlp::new(&[64, 400, 400, 10], Activation::Relu, ctx.device)?;
    let mut ewc = Ewc::new(EwcConfig::new(10.0, FisherKind::Exact))?;
    for _ in 0..4 {
        ewc.consolidate(&net, data.as_ref(), ctx.device)?;
    }
    let batch = data.batch(&(0..32).collect::<Vec<_>>(), ctx.device)?;
    let params = net.params();
    let mut opt = reuse_core::Optimizer::new(reuse_core::OptimizerKind::default(), 0.0);
    let sctx = reuse_core::StepContext {
        step: 0,
        total_steps: 1,
        micro: 0,
        epoch: 0,
        task: 4,
        lr: 1e-3,
        device: ctx.device,
    };
    let mut step = |penalty: bool| -> Result<()> {
        let out = Trainable::forward(&net, &batch, true, Default::default())?;
        net.loss(&out, &batch)?.f_backward()?;
        if penalty {
            ewc.after_backward(&params, &sctx)?;
        }
        opt.step(&params, 1e-3)?;
        params.zero_grad();
        Ok(())
    };
    for _ in 0..steps {
        step(false)?;
        step(true)?;
    }
    let mut ratios = Vec::new();
    for _ in 0..rounds {
        let t = Instant::now();
        for _ in 0..steps {
            step(false)?;
        }
        let plain = t.elapsed().as_secs_f64();
        let t = Instant::now();
        for _ in 0..steps {
            step(true)?;
        }
        ratios.push(t.elapsed().as_secs_f64() / plain);
    }
    Ok((ratios, steps))
}

pub fn permuted_digits(ctx: &Ctx, bar: &ProgressBar) -> Result<Outcome> {
    let sizes = ctx.sizes(&PERMUTED_DIGITS_SIZES);
    scenarios_experiment(ctx, bar, &[Kind::Permuted], "permuted_digits", sizes)
}

// ---------------------------------------------------------------------------------------
// continual.minilm_sections: the real model.

const LM_BATCH: usize = 16;
const LM_MAX_LEN: usize = 32;
const LM_MEMORY: usize = 200;
const LM_REPLAY_PER_BATCH: usize = 8;

/// `continual.minilm_sections`' sizes.
pub(super) struct LmSizes {
    /// Every n-th text of each split (1: all; more keeps some of every class).
    every: usize,
    /// Epochs per task (the protocol's 2), both sides.
    epochs: usize,
    seeds: Seeds,
    /// EWC's lambda grid on dev at seed 0; empty: no EWC, and no joint either.
    ewc_grid: &'static [f64],
    /// The methods PyTorch + PEFT runs beside ours (ids).
    peers: &'static [&'static str],
    /// PyTorch + PEFT's training texts per task, at most (`None`: all).
    max_train_per_task: Option<usize>,
    /// What the report's notes say of this size.
    note: Option<&'static str>,
}

const LM_FULL: LmSizes = LmSizes {
    every: 1,
    epochs: 2,
    seeds: Seeds::All,
    ewc_grid: &[1e2, 1e3, 1e4, 1e5],
    peers: &["naive", "replay", "joint", "ewc"],
    max_train_per_task: None,
    note: None,
};

const LM_CPU: LmSizes = LmSizes {
    epochs: 1,
    ewc_grid: &[],
    peers: &["replay"],
    note: Some(
        "CPU size, to fit the plain CPU bench: 1 epoch per task instead of the \
         protocol's 2 (both sides), and only per-task adapters, naive and replay (with \
         PyTorch + PEFT's replay beside); EWC (and its lambda grid on dev), joint and \
         the other PyTorch runs are at the full size only (a CUDA run, or `--full`).",
    ),
    ..LM_FULL
};

/// Quick: every 8th text, one seed, PyTorch + PEFT on 48 texts a task; on the CPU on
/// top of the CPU size (1 epoch, no EWC or joint, replay's peer only), on CUDA on top
/// of the full size.
const LM_QUICK_CUDA: LmSizes = LmSizes {
    every: 8,
    seeds: Seeds::First(1),
    max_train_per_task: Some(48),
    ..LM_FULL
};

pub(super) const MINILM_SECTIONS_SIZES: Sizes<LmSizes> = Sizes {
    quick: LmSizes {
        every: 8,
        seeds: Seeds::First(1),
        max_train_per_task: Some(48),
        note: None,
        ..LM_CPU
    },
    cpu: Some(LM_CPU),
    full: LM_FULL,
    cuda: OnCuda {
        quick: Some(LM_QUICK_CUDA),
        full: None,
    },
};

impl Knobs for LmSizes {
    fn counts(&self) -> Counts {
        vec![
            ("texts", usize::MAX / self.every),
            ("epochs", self.epochs),
            ("seeds", self.seeds.count()),
            ("ewc_grid", self.ewc_grid.len()),
            ("peers", self.peers.len()),
            (
                "peer_train_per_task",
                self.max_train_per_task.unwrap_or(usize::MAX),
            ),
        ]
    }
}

/// Methods on MiniLM; all train LoRA r 8, alpha 16 on query and value plus the head.
#[derive(Debug, Clone, Copy, PartialEq)]
enum LmMethod {
    /// One adapter (and head) per task, chosen by task id; task ids at test time.
    PerTaskAdapters,
    /// One shared adapter and 8-way head, fine-tuned task after task.
    Naive,
    /// Shared, with a reservoir memory of 200 and 8 stored examples per batch.
    Replay,
    /// Shared, with EWC (Avalanche's batched empirical Fisher) on the adapter and head.
    Ewc(f64),
    /// Shared, on every task's data at once.
    Joint,
}

impl LmMethod {
    fn id(self) -> &'static str {
        match self {
            LmMethod::PerTaskAdapters => "per_task_adapters",
            LmMethod::Naive => "naive",
            LmMethod::Replay => "replay",
            LmMethod::Ewc(_) => "ewc",
            LmMethod::Joint => "joint",
        }
    }
}

struct LmData {
    train: Rc<dyn BatchSource>,
    dev: Rc<dyn BatchSource>,
    test: Rc<dyn BatchSource>,
    classes: i64,
}

/// The sections splits, every `every`-th text of each.
fn lm_data(ctx: &Ctx, every: usize) -> Result<LmData> {
    use reuse_core::models::{SentenceEncoder, TokenizedDataset};
    let mut s = super::sections()?;
    for d in [&mut s.train, &mut s.dev, &mut s.test] {
        let keep: Vec<usize> = (0..d.texts.len()).step_by(every).collect();
        d.texts = keep.iter().map(|&i| d.texts[i].clone()).collect();
        d.labels = keep.iter().map(|&i| d.labels[i]).collect();
    }
    let enc = SentenceEncoder::load(&reuse_testkit::minilm_dir()?, ctx.device, tch::Kind::Float)?;
    let tok = |d| -> Result<Rc<dyn BatchSource>> {
        Ok(Rc::new(TokenizedDataset::new(
            &enc.tokenizer,
            d,
            LM_MAX_LEN,
        )?))
    };
    Ok(LmData {
        train: tok(&s.train)?,
        dev: tok(&s.dev)?,
        test: tok(&s.test)?,
        classes: s.classes.len() as i64,
    })
}

fn lm_cfg(ctx: &Ctx, epochs: usize, seed: u64) -> TrainConfig {
    TrainConfig {
        epochs,
        batch_size: LM_BATCH,
        lr: 1e-3,
        weight_decay: 0.01,
        seed,
        device: ctx.device,
        ..Default::default()
    }
}

/// One run of `epochs` per task: the accuracy matrix, wall seconds (model load,
/// training, evaluations) and the trainable parameters (of one task's adapter and head
/// for per-task adapters).
fn lm_run(
    ctx: &Ctx,
    d: &LmData,
    test: &Rc<dyn BatchSource>,
    method: LmMethod,
    seed: u64,
    epochs: usize,
) -> Result<(AccuracyMatrix, f64, usize)> {
    use reuse_continual::TaskDeltas;
    use reuse_core::models::{Bert, BertClassifier};
    use reuse_peft::{LoraConfig, LoraModel};
    let start = Instant::now();
    tch::manual_seed(seed as i64);
    let dir = reuse_testkit::minilm_dir()?;
    let base = BertClassifier::new(Bert::load(&dir, ctx.device, tch::Kind::Float)?, d.classes);
    let mut lm = LoraModel::new(base);
    let splits: Vec<Vec<i64>> = (0..4).map(|t| vec![2 * t, 2 * t + 1]).collect();
    let eval_batch = 64;
    if method == LmMethod::PerTaskAdapters {
        // One LoRA per task on query, value and the head (r 8 on the 384 -> 8 head is
        // full rank: a head of its own), the base head frozen.
        for t in 0..4 {
            lm.add_adapter(
                &format!("task{t}"),
                LoraConfig::new(8, 16.0, &["query", "value", "classifier"]),
            )?;
        }
        let model = TaskDeltas::new(lm, (0..4).map(|t| format!("task{t}")).collect())?;
        let scn = Scenario::task_incremental(d.train.clone(), test.clone(), &splits)?;
        let mut trainer = Trainer::new(lm_cfg(ctx, epochs, seed));
        let mut r = AccuracyMatrix::new();
        let mut trainable = 0;
        for e in &scn.tasks {
            model.train_only(e.task)?;
            trainable = model.params().count_trainable();
            trainer.begin_task(e.task, &model, &e.train, &mut [])?;
            trainer.fit(&model, &e.train, None, &mut [])?;
            trainer.end_task(e.task, &model, &e.train, &mut [])?;
            r.push_row(scn.evaluate(&model, eval_batch, ctx.device)?)?;
        }
        return Ok((r, start.elapsed().as_secs_f64(), trainable));
    }
    let mut c = LoraConfig::new(8, 16.0, &["query", "value"]);
    c.modules_to_save = Some(vec!["classifier".into()]);
    lm.add_adapter("shared", c)?;
    let trainable = lm.params().count_trainable();
    let scn = Scenario::class_incremental(d.train.clone(), test.clone(), &splits)?;
    let r = match method {
        LmMethod::Joint => {
            let all = Concat::joint_train(&scn, 0);
            Trainer::new(lm_cfg(ctx, epochs, seed)).fit(&lm, &all, None, &mut [])?;
            let mut r = AccuracyMatrix::new();
            r.push_row(scn.evaluate(&lm, eval_batch, ctx.device)?)?;
            r
        }
        LmMethod::Replay => {
            let mut rc = ReplayConfig::new(BufferPolicy::Reservoir, LM_MEMORY);
            rc.per_batch = PerBatch::Count(LM_REPLAY_PER_BATCH);
            rc.seed = seed;
            let mut replay = Replay::new(rc)?;
            let mut trainer = Trainer::new(lm_cfg(ctx, epochs, seed));
            run_stream(
                &scn,
                &lm,
                &mut trainer,
                &mut [&mut replay],
                eval_batch,
                false,
            )?
        }
        LmMethod::Ewc(lambda) => {
            let mut ec = EwcConfig::new(lambda, FisherKind::Empirical);
            ec.batch_size = LM_BATCH;
            let mut ewc = Ewc::new(ec)?;
            let mut trainer = Trainer::new(lm_cfg(ctx, epochs, seed));
            run_stream(&scn, &lm, &mut trainer, &mut [&mut ewc], eval_batch, false)?
        }
        _ => {
            let mut trainer = Trainer::new(lm_cfg(ctx, epochs, seed));
            run_stream(&scn, &lm, &mut trainer, &mut [], eval_batch, false)?
        }
    };
    Ok((r, start.elapsed().as_secs_f64(), trainable))
}

/// PyTorch + PEFT on the same protocol (benches/python/peft_continual.py): one call per
/// method, right after ours.
fn peft_reference(
    ctx: &Ctx,
    sizes: &LmSizes,
    method: &str,
    seed: u64,
    lambda: f64,
) -> Result<serde_json::Value> {
    let py = ctx
        .python()
        .context("no .venv python: run `cargo xtask setup` (the PyTorch side needs it)")?;
    let dir = ctx.root.join("target/reuse-bench-tmp");
    std::fs::create_dir_all(&dir)?;
    let spec_path = dir.join("peft_continual_spec.json");
    let out_path = dir.join("peft_continual_out.json");
    let spec = serde_json::json!({
        "runs": [{"method": method, "seed": seed, "ewc_lambda": lambda}],
        "threads": tch::get_num_threads(), "epochs": sizes.epochs,
        // PEFT's default, and ours (LoraConfig::new): no dropout on the LoRA input.
        "lora_dropout": 0.0,
        "max_train_per_task": sizes.max_train_per_task,
    });
    std::fs::write(&spec_path, serde_json::to_vec(&spec)?)?;
    let status = Command::new(&py)
        .arg(ctx.root.join("benches/python/peft_continual.py"))
        .arg("--model")
        .arg(reuse_testkit::minilm_dir()?)
        .arg("--data")
        .arg(fixtures_dir().join(super::SECTIONS_FILE))
        .arg("--spec")
        .arg(&spec_path)
        .arg("--out")
        .arg(&out_path)
        .env("HF_HUB_OFFLINE", "1")
        .status()
        .context("running benches/python/peft_continual.py")?;
    if !status.success() {
        bail!("benches/python/peft_continual.py failed ({status})");
    }
    let out: serde_json::Value = serde_json::from_slice(&std::fs::read(&out_path)?)?;
    Ok(out["runs"][0].clone())
}

pub fn minilm_sections(ctx: &Ctx, bar: &ProgressBar) -> Result<Outcome> {
    let sizes = ctx.sizes(&MINILM_SECTIONS_SIZES);
    let d = lm_data(ctx, sizes.every)?;
    let seeds = sizes.seeds.of(&ctx.seeds);
    let mut m = Metrics::new();
    let mut notes = vec![format!(
        "all-MiniLM-L6-v2 with mean pooling and an 8-way head on the Debian sections task as \
         4 class-incremental tasks ({{admin, games}}, {{graphics, mail}}, {{net, science}}, \
         {{sound, text}}), {} train / {} test texts; LoRA r 8, alpha 16 on query and value \
         (plus the head) for every method; AdamW lr 1e-3, weight decay 0.01, batch \
         {LM_BATCH}, length {LM_MAX_LEN}, {} epoch(s) per task, the optimizer kept across \
         tasks; one head and no task id at test time, except per_task_adapters (one LoRA \
         per task on query, value and the head, chosen by task id: task-incremental). \
         replay: a reservoir of {LM_MEMORY} texts, {LM_REPLAY_PER_BATCH} added to each \
         batch. Seeds {seeds:?}; times are wall seconds per run (model load, training, \
         the evaluation after each task) on {} threads.",
        d.train.len(),
        d.test.len(),
        sizes.epochs,
        tch::get_num_threads()
    )];
    notes.extend(sizes.note.map(String::from));
    // EWC's lambda on dev (seed 0), as the other choices are fixed by the protocol.
    let grid = sizes.ewc_grid;
    let mut best = (f64::MIN, grid.first().copied().unwrap_or(0.0));
    let mut seen = Vec::new();
    for &l in grid {
        bar.set_message(format!("continual.minilm_sections dev ewc lambda {l}"));
        let (r, _, _) = lm_run(ctx, &d, &d.dev, LmMethod::Ewc(l), 0, sizes.epochs)?;
        let a = r.avg_accuracy()?;
        seen.push(format!("lambda {l}: {a:.3}"));
        if a > best.0 {
            best = (a, l);
        }
    }
    let mut methods = vec![LmMethod::PerTaskAdapters, LmMethod::Naive, LmMethod::Replay];
    let lambda = best.1;
    if !grid.is_empty() {
        notes.push(format!(
            "EWC lambda chosen at seed 0 by average accuracy on the dev split: {}; chose {lambda}.",
            seen.join(", ")
        ));
        methods.extend([LmMethod::Ewc(lambda), LmMethod::Joint]);
    }
    let mut peer_notes = Vec::new();
    for method in methods {
        let id = method.id();
        let (mut acc, mut fg, mut secs) = (Vec::new(), Vec::new(), Vec::new());
        let mut trainable = 0;
        for &seed in seeds {
            bar.set_message(format!("continual.minilm_sections {id} seed {seed}"));
            let (r, s, t) = lm_run(ctx, &d, &d.test, method, seed, sizes.epochs)?;
            say(
                bar,
                format!(
                    "  minilm {id:18} seed {seed}: avg {:.3} forgetting {:.3} {s:.1}s",
                    r.avg_accuracy()?,
                    r.forgetting()?
                ),
            );
            if seed == 0 {
                let dir = ctx.report_dir().join("continual");
                std::fs::create_dir_all(&dir)?;
                r.save_heatmap_png(
                    &dir.join(format!("minilm_{id}.png")),
                    &format!("MiniLM {id} (seed 0)"),
                )?;
                r.save_json(&dir.join(format!("minilm_{id}.json")))?;
                // The PyTorch + PEFT run of the same method, right after ours.
                if sizes.peers.contains(&id) {
                    bar.set_message(format!("continual.minilm_sections PyTorch {id}"));
                    let v = peft_reference(ctx, sizes, id, 0, lambda)?;
                    let ps = f(&v, "seconds");
                    m.insert(
                        format!("pytorch.{id}.avg_accuracy_seed0"),
                        f(&v, "avg_accuracy"),
                    );
                    m.insert(format!("pytorch.{id}.seconds"), ps);
                    m.insert(format!("{id}.time_ratio"), s / ps);
                    peer_notes.push(format!("{id} {:.3} in {ps:.1} s", f(&v, "avg_accuracy")));
                }
            }
            acc.push(r.avg_accuracy()?);
            if method != LmMethod::Joint {
                fg.push(r.forgetting()?);
            }
            secs.push(s);
            trainable = t;
        }
        m.insert(format!("{id}.avg_accuracy"), mean(&acc));
        m.insert(format!("{id}.avg_accuracy_sd"), sample_sd(&acc));
        if !fg.is_empty() {
            m.insert(format!("{id}.forgetting"), mean(&fg));
            m.insert(format!("{id}.forgetting_sd"), sample_sd(&fg));
        }
        m.insert(format!("{id}.seconds"), mean(&secs));
        m.insert(format!("{id}.trainable_params"), trainable as f64);
    }
    notes.push(format!(
        "PyTorch + PEFT (benches/python/peft_continual.py, the same protocol, seed 0, run \
         right after our seed-0 run of each method; `<method>.time_ratio` = ours / theirs \
         for that seed): {}.",
        peer_notes.join(", ")
    ));
    Ok(Outcome { metrics: m, notes })
}

/// The claims-table rows this file's experiments measure (see `crate::claims`).
pub const CLAIMS: &[Claim] = &[
    Claim {
        text: "Replay avoids catastrophic forgetting (split digits, class-incremental)",
        experiment: "continual.split_digits",
        target: "forgetting below naive's",
        keys: &[
            "class_il.replay.forgetting",
            "class_il.replay.forgetting_sd",
            "class_il.naive.forgetting",
        ],
        eval: |g| forgetting_below_naive(g, "class_il.replay"),
    },
    Claim {
        text: "... at least as well as Avalanche on the same protocol",
        experiment: "continual.split_digits",
        target: ">= Avalanche's average accuracy (within 1 sd)",
        keys: &[
            "class_il.replay.avg_accuracy",
            "class_il.replay.avg_accuracy_sd",
            "avalanche.class_il.replay.avg_accuracy",
            "avalanche.class_il.replay.avg_accuracy_sd",
        ],
        eval: |g| at_least_avalanche(g, "class_il.replay"),
    },
    Claim {
        text: "... in <= 0.25x Avalanche's time",
        experiment: "continual.split_digits",
        target: "<= 0.25x",
        keys: &["class_il.replay.time_ratio"],
        eval: |g| quarter_of_avalanche_time(g, "class_il.replay"),
    },
    Claim {
        text: "EWC avoids catastrophic forgetting (permuted digits, domain-incremental)",
        experiment: "continual.permuted_digits",
        target: "forgetting below naive's",
        keys: &[
            "permuted.ewc.forgetting",
            "permuted.ewc.forgetting_sd",
            "permuted.naive.forgetting",
        ],
        eval: |g| forgetting_below_naive(g, "permuted.ewc"),
    },
    Claim {
        text: "... at least as well as Avalanche on the same protocol",
        experiment: "continual.permuted_digits",
        target: ">= Avalanche's average accuracy (within 1 sd)",
        keys: &[
            "permuted.ewc.avg_accuracy",
            "permuted.ewc.avg_accuracy_sd",
            "avalanche.permuted.ewc.avg_accuracy",
            "avalanche.permuted.ewc.avg_accuracy_sd",
        ],
        eval: |g| at_least_avalanche(g, "permuted.ewc"),
    },
    Claim {
        text: "... in <= 0.25x Avalanche's time",
        experiment: "continual.permuted_digits",
        target: "<= 0.25x",
        keys: &["permuted.ewc.time_ratio"],
        eval: |g| quarter_of_avalanche_time(g, "permuted.ewc"),
    },
    Claim {
        text: "Peer: continual MiniLM + LoRA with replay, reuse / PyTorch + PEFT time",
        experiment: "continual.minilm_sections",
        target: "ratio (< 1: reuse faster)",
        keys: &["replay.time_ratio"],
        eval: |g| {
            (
                format!("{:.3}", g("replay.time_ratio")),
                "seed 0, same settings".into(),
                None,
            )
        },
    },
];

/// Forgetting of method `m` (`scenario.method`) below the naive baseline's.
fn forgetting_below_naive(g: &Get, m: &str) -> (String, String, Option<bool>) {
    let scenario = m.split('.').next().unwrap_or(m);
    let f = g(&format!("{m}.forgetting"));
    let n = g(&format!("{scenario}.naive.forgetting"));
    (
        format!("{f:.3}"),
        format!(
            "sd {:.3}; naive forgets {n:.3}",
            g(&format!("{m}.forgetting_sd"))
        ),
        Some(f < n),
    )
}

/// Average accuracy of `m` at least Avalanche's for the same method and scenario.
fn at_least_avalanche(g: &Get, m: &str) -> (String, String, Option<bool>) {
    let (a, sa) = (
        g(&format!("{m}.avg_accuracy")),
        g(&format!("{m}.avg_accuracy_sd")),
    );
    let (b, sb) = (
        g(&format!("avalanche.{m}.avg_accuracy")),
        g(&format!("avalanche.{m}.avg_accuracy_sd")),
    );
    (
        format!("{a:.4}"),
        format!("sd {sa:.4}; Avalanche {}", pm(b, sb)),
        Some(at_least(a, sa, b, sb)),
    )
}

/// `m`'s time over Avalanche's, at most a quarter.
pub(crate) fn quarter_of_avalanche_time(g: &Get, m: &str) -> (String, String, Option<bool>) {
    let r = g(&format!("{m}.time_ratio"));
    let (lo, hi) = (
        g(&format!("{m}.time_ratio_min")),
        g(&format!("{m}.time_ratio_max")),
    );
    // Reports made before the runs were interleaved pair by pair have no range: their
    // ratio is of the mean seconds over seeds.
    let spread = if lo.is_nan() || hi.is_nan() {
        "mean seconds over seeds, both sides".to_string()
    } else {
        format!("median over seeds of back-to-back pairs, range {lo:.2}-{hi:.2}")
    };
    (format!("{r:.2}x"), spread, Some(r <= 0.25))
}
