//! The trainer on real data (scikit-learn digits), composed techniques, determinism,
//! resumable optimizer state.

use reuse_core::data::{fixtures_dir, load_digits, Batch, Digits};
use reuse_core::trainer::{accuracy, StepOutputs, Trainable};
use reuse_core::{
    Activation, Checkpoint, Mlp, Model, Params, Result, Snapshot, Technique, TrainConfig, Trainer,
};
use tch::{Device, Kind, Tensor};

struct Net(Mlp);

impl Trainable for Net {
    fn parameters(&self) -> Params {
        self.0.params()
    }
    fn forward(&self, b: &Batch, train: bool) -> Result<StepOutputs> {
        Ok(StepOutputs::logits(self.0.forward(&b.inputs, train)))
    }
}

/// libtorch's random generator is global and the test harness runs tests on several
/// threads: every test here holds this lock so that seeding gives the same numbers.
static SEED_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn seeded() -> std::sync::MutexGuard<'static, ()> {
    SEED_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn digits() -> Digits {
    load_digits(&fixtures_dir().join("digits/digits.csv.gz")).unwrap()
}

fn net(seed: i64) -> Net {
    tch::manual_seed(seed);
    Net(Mlp::new(&[64, 128, 10], Activation::Relu, Device::Cpu).unwrap())
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
    fn after_backward(&mut self, params: &Params) -> Result<()> {
        self.calls += 1;
        let g = params.get("layers.0.weight").unwrap().grad();
        tch::no_grad(|| {
            let _ = g.shallow_clone().f_mul_(&self.mask);
        });
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
    let start_a = a.parameters().snapshot();
    let mut m1 = GradMask {
        mask: mask.copy(),
        calls: 0,
    };
    Trainer::new(cfg.clone())
        .fit(&a, &d.train, None, &mut [&mut m1])
        .unwrap();
    // Mask + L2 anchor, same seed and data order.
    let b = net(3);
    let start_b = b.parameters().snapshot();
    let mut m2 = GradMask {
        mask: mask.copy(),
        calls: 0,
    };
    let mut l2 = L2Anchor {
        anchor: b.parameters().snapshot(),
        lambda: 0.05,
        calls: 0,
    };
    Trainer::new(cfg)
        .fit(&b, &d.train, None, &mut [&mut l2, &mut m2])
        .unwrap();

    assert_eq!((m1.calls, m2.calls, l2.calls), (150, 150, 150));
    for (net, start) in [(&a, &start_a), (&b, &start_b)] {
        let w = net
            .parameters()
            .get("layers.0.weight")
            .unwrap()
            .shallow_clone();
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
    let (da, db) = (
        drift(&a.parameters(), &start_a),
        drift(&b.parameters(), &start_b),
    );
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
    let run = |n: &Net, t: &mut Trainer| t.fit(n, &d.train, None, &mut []).unwrap().losses;
    let (a, b) = (net(5), net(5));
    let (mut ta, mut tb) = (Trainer::new(cfg.clone()), Trainer::new(cfg.clone()));
    assert_eq!(run(&a, &mut ta), run(&b, &mut tb));
    // Save a (params + optimizer) to disk, train on: reload into b, train on: equal.
    let dir = tempfile::tempdir().unwrap();
    a.parameters()
        .to_checkpoint()
        .save(dir.path().join("p.safetensors"))
        .unwrap();
    ta.optimizer()
        .state()
        .save(dir.path().join("o.safetensors"))
        .unwrap();
    let la = run(&a, &mut ta);
    let c = net(99);
    c.parameters()
        .load_checkpoint(&Checkpoint::load(dir.path().join("p.safetensors"), Device::Cpu).unwrap())
        .unwrap();
    let mut tc = Trainer::new(cfg);
    tc.optimizer_mut()
        .load_state(&Checkpoint::load(dir.path().join("o.safetensors"), Device::Cpu).unwrap())
        .unwrap();
    assert_eq!(run(&c, &mut tc), la);
    for (n, t) in a.parameters().iter() {
        assert!(t.equal(c.parameters().get(n).unwrap()), "{n}");
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
    for (n, t) in a.parameters().iter() {
        let diff = (t - b.parameters().get(n).unwrap())
            .abs()
            .max()
            .double_value(&[]);
        assert!(diff < 1e-5, "{n}: {diff}");
    }
    // Clipping the global norm to a tiny value holds the weights back.
    let (c, e) = (net(9), net(9));
    let start = c.parameters().snapshot();
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
    assert!(drift(&e.parameters(), &start) < 0.1 * drift(&c.parameters(), &start));
    assert_eq!(r.evals.iter().map(|e| e.0).collect::<Vec<_>>(), [2, 4, 5]);
}
