//! The trainer on real data (scikit-learn digits): composed techniques and their hooks,
//! determinism, optimizer state, and whole runs saved and resumed.

use reuse_core::data::{load_digits, Batch, Digits};
use reuse_core::trainer::{accuracy, StepContext, StepOutputs, TaskContext};
use reuse_core::ForwardOptions;
use reuse_core::{
    Activation, Checkpoint, Mlp, Model, Params, Result, RunStateConfig, SaveParams, Snapshot,
    Technique, TrainConfig, Trainer,
};
use reuse_testkit::fixtures_dir;
use tch::{Device, Kind, Tensor};

/// libtorch's random generator is global and the test harness runs tests on several
/// threads: every test here holds this lock so that seeding gives the same numbers.
static SEED_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn seeded() -> std::sync::MutexGuard<'static, ()> {
    SEED_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn digits() -> Digits {
    load_digits(&fixtures_dir().join("digits/digits.csv.gz")).unwrap()
}

fn net(seed: i64) -> Mlp {
    tch::manual_seed(seed);
    Mlp::new(&[64, 128, 10], Activation::Relu, Device::Cpu).unwrap()
}

#[test]
fn digits_mlp_reaches_95_percent() {
    let _guard = seeded();
    let d = digits();
    let n = net(0);
    let mut t = Trainer::new(TrainConfig {
        epochs: 25,
        lr: 2e-3,
        batch_size: 32,
        ..Default::default()
    });
    let r = t.fit(&n, &d.train, Some(&d.test), &mut []).unwrap();
    let acc = accuracy(&n, &d.test, 256, Device::Cpu).unwrap();
    eprintln!(
        "digits MLP: test accuracy {acc:.4} in {:.2}s, {} steps",
        r.seconds, r.steps
    );
    assert!(acc >= 0.95, "test accuracy {acc}");
    assert_eq!(r.evals.last().unwrap().1, acc);
    assert!(r.losses.last().unwrap() < &r.losses[0]);
}

/// L2 pull towards the starting weights (an EWC penalty with unit Fisher).
struct L2Anchor {
    anchor: Snapshot,
    lambda: f64,
    calls: usize,
}

impl Technique for L2Anchor {
    fn name(&self) -> &str {
        "l2"
    }
    fn extra_loss(
        &mut self,
        _b: &Batch,
        _o: &StepOutputs,
        params: &Params,
        _ctx: &StepContext,
    ) -> Result<Option<Tensor>> {
        self.calls += 1;
        let mut total = Tensor::zeros([], (Kind::Float, Device::Cpu));
        for (n, p) in params.iter() {
            total = &total + (p - self.anchor.get(n).unwrap()).square().sum(Kind::Float);
        }
        Ok(Some(total * self.lambda))
    }
}

/// Zeroes the gradient of the first half of layer 0's output units (PackNet-like).
struct GradMask {
    mask: Tensor,
    calls: usize,
}

impl Technique for GradMask {
    fn name(&self) -> &str {
        "mask"
    }
    fn after_backward(&mut self, params: &Params, _ctx: &StepContext) -> Result<()> {
        self.calls += 1;
        let g = params.get("layers.0.weight").unwrap().grad();
        tch::no_grad(|| g.shallow_clone().f_mul_(&self.mask).map(drop))?;
        Ok(())
    }
}

fn drift(p: &Params, s: &Snapshot) -> f64 {
    p.iter()
        .map(|(n, t)| {
            (t - s.get(n).unwrap())
                .square()
                .sum(Kind::Float)
                .double_value(&[])
        })
        .sum::<f64>()
        .sqrt()
}

#[test]
fn two_techniques_compose_and_each_has_its_effect() {
    let _guard = seeded();
    let d = digits();
    let cfg = TrainConfig {
        max_steps: Some(150),
        lr: 3e-3,
        ..Default::default()
    };
    let mask = Tensor::cat(
        &[
            Tensor::zeros([64, 64], (Kind::Float, Device::Cpu)),
            Tensor::ones([64, 64], (Kind::Float, Device::Cpu)),
        ],
        0,
    );
    // Mask alone.
    let a = net(3);
    let start_a = a.params().snapshot();
    let mut m1 = GradMask {
        mask: mask.copy(),
        calls: 0,
    };
    Trainer::new(cfg.clone())
        .fit(&a, &d.train, None, &mut [&mut m1])
        .unwrap();
    // Mask + L2 anchor, same seed and data order.
    let b = net(3);
    let start_b = b.params().snapshot();
    let mut m2 = GradMask {
        mask: mask.copy(),
        calls: 0,
    };
    let mut l2 = L2Anchor {
        anchor: b.params().snapshot(),
        lambda: 0.05,
        calls: 0,
    };
    Trainer::new(cfg)
        .fit(&b, &d.train, None, &mut [&mut l2, &mut m2])
        .unwrap();

    assert_eq!((m1.calls, m2.calls, l2.calls), (150, 150, 150));
    for (net, start) in [(&a, &start_a), (&b, &start_b)] {
        let w = net.params().get("layers.0.weight").unwrap().shallow_clone();
        let w0 = start.get("layers.0.weight").unwrap();
        assert!(
            w.narrow(0, 0, 64).equal(&w0.narrow(0, 0, 64)),
            "masked rows moved"
        );
        assert!(
            !w.narrow(0, 64, 64).equal(&w0.narrow(0, 64, 64)),
            "free rows did not move"
        );
    }
    let (da, db) = (drift(&a.params(), &start_a), drift(&b.params(), &start_b));
    eprintln!("drift without L2 {da:.4}, with {db:.4}");
    assert!(
        db < 0.7 * da,
        "L2 anchor did not hold weights back: {db} vs {da}"
    );
}

#[test]
fn same_seed_same_result_and_optimizer_state_resumes() {
    let _guard = seeded();
    let d = digits();
    let cfg = TrainConfig {
        max_steps: Some(20),
        ..Default::default()
    };
    let run = |n: &Mlp, t: &mut Trainer| t.fit(n, &d.train, None, &mut []).unwrap().losses;
    let (a, b) = (net(5), net(5));
    let (mut ta, mut tb) = (Trainer::new(cfg.clone()), Trainer::new(cfg.clone()));
    assert_eq!(run(&a, &mut ta), run(&b, &mut tb));
    // Save a (params + optimizer) to disk, train on: reload into b, train on: equal.
    let dir = tempfile::tempdir().unwrap();
    a.params()
        .to_checkpoint()
        .save(dir.path().join("p.safetensors"))
        .unwrap();
    ta.optimizer()
        .state()
        .save(dir.path().join("o.safetensors"))
        .unwrap();
    let la = run(&a, &mut ta);
    let c = net(99);
    c.params()
        .load_checkpoint(&Checkpoint::load(dir.path().join("p.safetensors"), Device::Cpu).unwrap())
        .unwrap();
    let mut tc = Trainer::new(cfg);
    tc.optimizer_mut()
        .load_state(
            &Checkpoint::load(dir.path().join("o.safetensors"), Device::Cpu).unwrap(),
            &c.params(),
        )
        .unwrap();
    assert_eq!(run(&c, &mut tc), la);
    for (n, t) in a.params().iter() {
        assert!(t.equal(c.params().get(n).unwrap()), "{n}");
    }
}

#[test]
fn grad_accumulation_equals_the_big_batch_and_clipping_and_eval_work() {
    let _guard = seeded();
    let d = digits();
    let sgd = TrainConfig {
        max_steps: Some(5),
        optimizer: reuse_core::OptimizerKind::Sgd { momentum: 0.9 },
        lr: 0.1,
        ..Default::default()
    };
    let (a, b) = (net(8), net(8));
    Trainer::new(TrainConfig {
        batch_size: 32,
        ..sgd.clone()
    })
    .fit(&a, &d.train, None, &mut [])
    .unwrap();
    Trainer::new(TrainConfig {
        batch_size: 16,
        grad_accum: 2,
        ..sgd.clone()
    })
    .fit(&b, &d.train, None, &mut [])
    .unwrap();
    for (n, t) in a.params().iter() {
        let diff = (t - b.params().get(n).unwrap())
            .abs()
            .max()
            .double_value(&[]);
        assert!(diff < 1e-5, "{n}: {diff}");
    }
    // Clipping the global norm to a tiny value holds the weights back.
    let (c, e) = (net(9), net(9));
    let start = c.params().snapshot();
    Trainer::new(sgd.clone())
        .fit(&c, &d.train, None, &mut [])
        .unwrap();
    let r = Trainer::new(TrainConfig {
        clip_grad_norm: Some(1e-3),
        eval_every: Some(2),
        ..sgd
    })
    .fit(&e, &d.train, Some(&d.test), &mut [])
    .unwrap();
    assert!(drift(&e.params(), &start) < 0.1 * drift(&c.params(), &start));
    assert_eq!(r.evals.iter().map(|e| e.0).collect::<Vec<_>>(), [2, 4, 5]);
}

/// Records every hook call with the context it saw; weights the task loss; asks for
/// hidden states.
#[derive(Default)]
struct Recorder {
    weight: f64,
    want_hidden: bool,
    events: Vec<String>,
    steps: Vec<(usize, usize, usize, f64)>,
    hidden_seen: Vec<usize>,
}

impl Technique for Recorder {
    fn name(&self) -> &str {
        "recorder"
    }
    fn forward_options(&self) -> ForwardOptions {
        ForwardOptions {
            hidden_states: self.want_hidden,
            ..Default::default()
        }
    }
    fn begin_task(&mut self, ctx: &TaskContext<'_>) -> Result<()> {
        self.events
            .push(format!("begin {} ({} examples)", ctx.task, ctx.data.len()));
        Ok(())
    }
    fn task_loss_weight(&self, _ctx: &StepContext) -> f64 {
        self.weight
    }
    fn extra_loss(
        &mut self,
        _b: &Batch,
        out: &StepOutputs,
        _p: &Params,
        _ctx: &StepContext,
    ) -> Result<Option<Tensor>> {
        self.hidden_seen.push(out.hidden_states.len());
        Ok(None)
    }
    fn after_step(&mut self, _p: &Params, ctx: &StepContext) -> Result<()> {
        self.steps.push((ctx.step, ctx.epoch, ctx.task, ctx.lr));
        Ok(())
    }
    fn end_task(&mut self, ctx: &TaskContext<'_>) -> Result<()> {
        self.events.push(format!("end {}", ctx.task));
        Ok(())
    }
}

#[test]
fn hooks_see_the_step_context_weight_the_task_loss_and_get_extra_outputs() {
    let _guard = seeded();
    let d = digits();
    let cfg = TrainConfig {
        max_steps: Some(50),
        batch_size: 64,
        lr: 1e-2,
        log_every: 7,
        schedule: reuse_core::Schedule::Linear { warmup: 10 },
        ..Default::default()
    };
    let (a, b) = (net(1), net(1));
    let mut plain = Recorder {
        weight: 1.0,
        ..Default::default()
    };
    let mut half = Recorder {
        weight: 0.5,
        want_hidden: true,
        ..Default::default()
    };
    let mut ta = Trainer::new(cfg.clone());
    ta.begin_task(2, &a, &d.train, &mut [&mut plain]).unwrap();
    let ra = ta.fit(&a, &d.train, None, &mut [&mut plain]).unwrap();
    ta.end_task(2, &a, &d.train, &mut [&mut plain]).unwrap();
    // The same task, so the same batch order (a task mixes into the data order's seed).
    let mut tb = Trainer::new(cfg);
    tb.begin_task(2, &b, &d.train, &mut [&mut half]).unwrap();
    let rb = tb.fit(&b, &d.train, None, &mut [&mut half]).unwrap();
    assert_eq!(plain.events, ["begin 2 (1437 examples)", "end 2"]);
    // 1437 / 64 = 23 batches per epoch: step 23 is the first of epoch 1.
    assert_eq!(plain.steps.len(), 50);
    assert_eq!(plain.steps[22].0..plain.steps[23].0, 22..23);
    assert_eq!((plain.steps[22].1, plain.steps[23].1), (0, 1));
    assert!(plain.steps.iter().all(|s| s.2 == 2));
    assert_eq!(plain.steps[0].3, 0.0); // warmup starts at 0
    assert!((plain.steps[5].3 - 5e-3).abs() < 1e-12);
    // Losses were read every 7 steps and at the end, none lost.
    assert_eq!(ra.losses.len(), 50);
    // Same weights and batch at step 0: a task-loss weight of 0.5 halves the loss.
    assert!(
        (rb.losses[0] - 0.5 * ra.losses[0]).abs() < 1e-6,
        "{} vs {}",
        rb.losses[0],
        ra.losses[0]
    );
    // Hidden states only when a technique asks: input + one hidden layer.
    assert!(plain.hidden_seen.iter().all(|&n| n == 0));
    assert!(half.hidden_seen.iter().all(|&n| n == 2));
}

/// PackNet's problem: a pruned weight is zero and its gradient is masked, yet AdamW's
/// momentum and weight decay still move it. Re-zeroing after the step keeps it at 0.
struct Pruned {
    keep: Tensor,
    rezero: bool,
}

impl Technique for Pruned {
    fn name(&self) -> &str {
        "pruned"
    }
    fn after_backward(&mut self, params: &Params, _ctx: &StepContext) -> Result<()> {
        let g = params.get("layers.0.weight").unwrap().grad();
        tch::no_grad(|| g.shallow_clone().f_mul_(&self.keep).map(drop))?;
        Ok(())
    }
    fn after_step(&mut self, params: &Params, _ctx: &StepContext) -> Result<()> {
        if self.rezero {
            let w = params.get("layers.0.weight").unwrap();
            tch::no_grad(|| w.shallow_clone().f_mul_(&self.keep).map(drop))?;
        }
        Ok(())
    }
}

#[test]
fn after_step_keeps_pruned_weights_at_zero_under_decay_and_momentum() {
    let _guard = seeded();
    let d = digits();
    let keep = Tensor::rand([128, 64], (Kind::Float, Device::Cpu))
        .ge(0.5)
        .to_kind(Kind::Float);
    for rezero in [false, true] {
        let m = net(2);
        // Train unpruned first, so AdamW has momentum everywhere; then prune.
        let mut t = Trainer::new(TrainConfig {
            max_steps: Some(20),
            weight_decay: 0.01,
            ..Default::default()
        });
        t.fit(&m, &d.train, None, &mut []).unwrap();
        let w = m.params().get("layers.0.weight").unwrap().shallow_clone();
        tch::no_grad(|| w.shallow_clone().f_mul_(&keep).map(drop)).unwrap();
        let mut p = Pruned {
            keep: keep.copy(),
            rezero,
        };
        t.fit(&m, &d.train, None, &mut [&mut p]).unwrap();
        let pruned_max = (&w * (keep.ones_like() - &keep))
            .abs()
            .max()
            .double_value(&[]);
        if rezero {
            assert_eq!(pruned_max, 0.0, "pruned weights moved");
        } else {
            assert!(
                pruned_max > 0.0,
                "without after_step the optimizer moves them"
            );
        }
    }
}

/// Fails at a given step, as a crash would.
struct CrashAt(usize);

impl Technique for CrashAt {
    fn name(&self) -> &str {
        "crash"
    }
    fn after_step(&mut self, _p: &Params, ctx: &StepContext) -> Result<()> {
        if ctx.step + 1 == self.0 {
            return Err(reuse_core::Error::Invalid {
                what: "test".into(),
                reason: "crash".into(),
            });
        }
        Ok(())
    }
}

/// Counts steps, and saves the count with the run.
#[derive(Default)]
struct Counter(i64);

impl Technique for Counter {
    fn name(&self) -> &str {
        "counter"
    }
    fn after_step(&mut self, _p: &Params, _ctx: &StepContext) -> Result<()> {
        self.0 += 1;
        Ok(())
    }
    fn state(&self) -> Result<Checkpoint> {
        let mut c = Checkpoint::new();
        c.insert("count", Tensor::from(self.0));
        Ok(c)
    }
    fn load_state(&mut self, s: &Checkpoint) -> Result<()> {
        self.0 = s.tensor("count")?.int64_value(&[]);
        Ok(())
    }
}

fn dropout_net(seed: i64) -> Mlp {
    tch::manual_seed(seed);
    Mlp::new(&[64, 96, 10], Activation::Relu, Device::Cpu)
        .unwrap()
        .with_dropout(0.2)
}

#[test]
fn a_crashed_run_resumes_to_the_same_weights() {
    let _guard = seeded();
    let d = digits();
    let dir = tempfile::tempdir().unwrap();
    let cfg = |path: &str| TrainConfig {
        max_steps: Some(60),
        lr: 3e-3,
        weight_decay: 0.01,
        schedule: reuse_core::Schedule::Cosine { warmup: 5 },
        clip_grad_norm: Some(1.0),
        run_state: Some(RunStateConfig {
            path: dir.path().join(path),
            every: 7,
            params: SaveParams::Trainable,
        }),
        ..Default::default()
    };
    // Uninterrupted.
    let a = dropout_net(3);
    let mut ca = Counter::default();
    let ra = Trainer::new(cfg("a.safetensors"))
        .fit(&a, &d.train, None, &mut [&mut ca])
        .unwrap();
    // Crashes at step 40 (after the save at 35), then resumes in a fresh trainer.
    let b = dropout_net(3);
    let mut cb = Counter::default();
    let e = Trainer::new(cfg("b.safetensors"))
        .fit(&b, &d.train, None, &mut [&mut cb, &mut CrashAt(40)])
        .unwrap_err();
    assert!(e.to_string().contains("crash"));
    let b2 = dropout_net(77); // other init: everything must come from the run file
    let mut cb2 = Counter::default();
    let mut tb = Trainer::new(cfg("b.safetensors"));
    assert_eq!(tb.resume(&b2, &mut [&mut cb2]).unwrap(), Some(35));
    assert_eq!(cb2.0, 35);
    let rb = tb.fit(&b2, &d.train, None, &mut [&mut cb2]).unwrap();
    assert_eq!(rb.resumed_from, Some(35));
    assert_eq!(cb2.0, 60);
    assert_eq!(rb.losses, ra.losses);
    for (n, t) in a.params().iter() {
        assert!(
            t.equal(b2.params().get(n).unwrap()),
            "{n} differs after resume"
        );
    }
    // A trainer with another batch size refuses the file and changes nothing.
    let c = dropout_net(5);
    let before = c.params().snapshot();
    let mut other = cfg("b.safetensors");
    other.batch_size = 16;
    let e = Trainer::new(other)
        .resume(&c, &mut [])
        .unwrap_err()
        .to_string();
    assert!(e.contains("batch_size 32") && e.contains("16"), "{e}");
    assert_eq!(drift(&c.params(), &before), 0.0);
    // No file: a fresh run.
    assert_eq!(
        Trainer::new(cfg("none.safetensors"))
            .resume(&c, &mut [])
            .unwrap(),
        None
    );
}

/// Records the example indices of every batch the trainer draws.
#[derive(Default)]
struct Orders(Vec<Vec<i64>>);

impl Technique for Orders {
    fn name(&self) -> &str {
        "orders"
    }
    fn rewrite_batch(&mut self, batch: Batch, _ctx: &StepContext) -> Result<Batch> {
        self.0.push(batch.indices.clone());
        Ok(batch)
    }
}

#[test]
fn each_task_of_a_stream_draws_its_own_batch_orders() {
    let _g = seeded();
    let d = digits();
    let m = net(0);
    let config = TrainConfig {
        epochs: 1,
        batch_size: 100,
        ..Default::default()
    };
    let orders = |task: usize| {
        let mut t = Trainer::new(config.clone());
        let mut rec = Orders::default();
        t.begin_task(task, &m, &d.train, &mut [&mut rec]).unwrap();
        t.fit(&m, &d.train, None, &mut [&mut rec]).unwrap();
        rec.0
    };
    let (a, b, a_again) = (orders(1), orders(2), orders(1));
    // The same data, the same seed: each task its own order, and the same task again
    // the same order.
    assert_ne!(a, b);
    assert_eq!(a, a_again);
    // Task 0 keeps the configured seed's order, as a single-task run has always had.
    let first = orders(0);
    assert_eq!(
        first,
        reuse_core::data::epoch_batches(
            reuse_core::data::BatchSource::len(&d.train),
            100,
            Some(0),
            0
        )
    );
}
