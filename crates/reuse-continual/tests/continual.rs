//! reuse-continual against formulas, hand computations and exactness requirements.

use std::rc::Rc;

use reuse_continual::ewc::{
    ewc_penalty, fisher_empirical, fisher_exact, fisher_exact_per_sample, Anchor, Ewc, EwcConfig,
    EwcMode, FisherKind,
};
use reuse_continual::replay::{BufferPolicy, ReplayBuffer};
use reuse_continual::scenario::{run_stream, stratified_split, Scenario, TaskData};
use reuse_continual::{MultiHead, PackNet, Replay, ReplayConfig};
use reuse_core::data::{load_digits, Batch, BatchSource, TensorDataset};
use reuse_core::{trainer, Activation, Mlp, Model, OptimizerKind, Technique, TrainConfig, Trainer};
use tch::{Device, Kind, Tensor};

const CPU: Device = Device::Cpu;

fn close(a: &Tensor, b: &Tensor, tol: f64) {
    let d = (a - b).abs().max().double_value(&[]);
    let scale = b.abs().max().double_value(&[]).max(1e-12);
    assert!(d <= tol * scale, "max |diff| {d} (scale {scale})");
}

fn toy(n: i64, d: i64, classes: i64, seed: i64) -> TensorDataset {
    tch::manual_seed(seed);
    let x = Tensor::randn([n, d], (Kind::Float, CPU));
    let y = Tensor::randint(classes, [n], (Kind::Int64, CPU));
    TensorDataset::new(x, y).unwrap()
}

#[test]
fn exact_fisher_matches_the_closed_form_of_softmax_regression() {
    // One linear layer: d log p_c / dW = (e_c - p) x^T, d/db = e_c - p.
    tch::manual_seed(3);
    let net = Mlp::new(&[5, 4], Activation::Relu, CPU).unwrap();
    let data = toy(37, 5, 4, 1);
    let f = fisher_exact(&net, &data, 8, None, CPU).unwrap();
    let (w, b) = (&net.layers[0].weight, net.layers[0].bias.as_ref().unwrap());
    let x = &data.x;
    let p = x.linear(w, Some(b)).softmax(-1, Kind::Float).detach();
    let eye = Tensor::eye(4, (Kind::Float, CPU));
    let mut fw = Tensor::zeros([4, 5], (Kind::Float, CPU));
    let mut fb = Tensor::zeros([4], (Kind::Float, CPU));
    for c in 0..4 {
        let g = eye.get(c).unsqueeze(0) - &p; // [n, 4]
        let pc = p.select(1, c).unsqueeze(1);
        fw += (g.square() * &pc).tr().matmul(&x.square());
        fb += (g.square() * &pc).sum_dim_intlist(0, false, Kind::Float);
    }
    close(&f["layers.0.weight"], &(fw / 37.0), 1e-5);
    close(&f["layers.0.bias"], &(fb / 37.0), 1e-5);
}

#[test]
fn batched_exact_fisher_equals_the_per_sample_loop_on_a_deep_mlp_and_multi_head() {
    tch::manual_seed(4);
    let net = Mlp::new(&[6, 9, 7, 3], Activation::Tanh, CPU).unwrap();
    let data = toy(21, 6, 3, 2);
    let fast = fisher_exact(&net, &data, 5, None, CPU).unwrap();
    let slow = fisher_exact_per_sample(&net, &data, None, CPU).unwrap();
    assert_eq!(fast.len(), 6);
    for (n, f) in &fast {
        close(f, &slow[n], 1e-5);
    }
    // Routed heads: the other heads get no gradient from a sample.
    let body = Mlp::new(&[6, 8], Activation::Relu, CPU).unwrap();
    let mh = MultiHead::new(body, 8, 3, 2, CPU).unwrap();
    let mut tagged = toy(12, 6, 3, 5);
    tagged.task = Some(1);
    let fast = fisher_exact(&mh, &tagged, 4, None, CPU).unwrap();
    let slow = fisher_exact_per_sample(&mh, &tagged, None, CPU).unwrap();
    for (n, f) in &fast {
        close(f, &slow[n], 1e-5);
    }
    assert_eq!(
        fast["heads.0.weight"]
            .abs()
            .sum(Kind::Float)
            .double_value(&[]),
        0.0
    );
}

#[test]
fn empirical_fisher_is_the_mean_over_batches_of_the_squared_mean_gradient() {
    tch::manual_seed(5);
    let net = Mlp::new(&[5, 3], Activation::Relu, CPU).unwrap();
    let data = toy(10, 5, 3, 3);
    let f = fisher_empirical(&net, &data, 4, None, CPU).unwrap();
    // Batches [0..4), [4..8), [8..10): grad of mean CE = mean (p - y) x^T.
    let (w, b) = (&net.layers[0].weight, net.layers[0].bias.as_ref().unwrap());
    let mut fw = Tensor::zeros([3, 5], (Kind::Float, CPU));
    let mut fb = Tensor::zeros([3], (Kind::Float, CPU));
    for (s, len) in [(0, 4), (4, 4), (8, 2)] {
        let x = data.x.narrow(0, s, len);
        let y = data.y.narrow(0, s, len).one_hot(3).to_kind(Kind::Float);
        let p = x.linear(w, Some(b)).softmax(-1, Kind::Float).detach();
        let g = (&p - y) / len as f64;
        fw += g.tr().matmul(&x).square();
        fb += g.sum_dim_intlist(0, false, Kind::Float).square();
    }
    close(&f["layers.0.weight"], &(fw / 3.0), 1e-5);
    close(&f["layers.0.bias"], &(fb / 3.0), 1e-5);
}

#[test]
fn ewc_penalty_and_its_gradient_follow_the_formula() {
    tch::manual_seed(6);
    let net = Mlp::new(&[4, 3], Activation::Relu, CPU).unwrap();
    let params = net.params();
    let mut anchors = Vec::new();
    for _ in 0..2 {
        let fisher = params
            .iter()
            .map(|(n, t)| (n.to_string(), t.rand_like()))
            .collect();
        let theta = params
            .iter()
            .map(|(n, t)| (n.to_string(), t.detach().randn_like()))
            .collect();
        anchors.push(Anchor { fisher, theta });
    }
    let lambda = 7.5;
    let pen = ewc_penalty(&params, &anchors, lambda).unwrap().unwrap();
    let mut want = 0.0;
    let mut grads = Vec::new();
    for (n, t) in params.iter() {
        let mut g = t.zeros_like();
        for a in &anchors {
            let d = t.detach() - &a.theta[n];
            want += (&a.fisher[n] * d.square())
                .sum(Kind::Double)
                .double_value(&[]);
            g += &a.fisher[n] * d * (2.0 * lambda);
        }
        grads.push(g);
    }
    assert!((pen.double_value(&[]) - lambda * want).abs() < 1e-4 * want.abs().max(1.0));
    pen.backward();
    for ((_, t), g) in params.iter().zip(&grads) {
        close(&t.grad(), g, 1e-5);
    }
}

#[test]
fn the_technique_adds_exactly_the_penalty_gradient_after_backward() {
    let d = digits();
    tch::manual_seed(8);
    let net = Mlp::new(&[64, 16, 10], Activation::Relu, CPU).unwrap();
    let mut ewc = Ewc::new(EwcConfig::new(3.0, FisherKind::Exact)).unwrap();
    ewc.consolidate(&net, &d.train, CPU).unwrap();
    // Move the weights off the anchor, then consolidate a second task.
    let params = net.params();
    tch::no_grad(|| {
        for (_, t) in params.iter() {
            let mut t = t.shallow_clone();
            let _ = t.f_add_(&(t.randn_like() * 0.1)).unwrap();
        }
    });
    ewc.consolidate(&net, &d.test, CPU).unwrap();
    tch::no_grad(|| {
        for (_, t) in params.iter() {
            let mut t = t.shallow_clone();
            let _ = t.f_add_(&(t.randn_like() * 0.1)).unwrap();
        }
    });
    let ctx = reuse_core::StepContext {
        step: 0,
        total_steps: 1,
        micro: 0,
        epoch: 0,
        task: 2,
        lr: 1e-3,
        device: CPU,
    };
    let b = d.train.batch(&(0..32).collect::<Vec<_>>(), CPU).unwrap();
    let loss = |with_penalty: bool| {
        let out = reuse_core::Trainable::forward(&net, &b, true, Default::default()).unwrap();
        let l = reuse_core::Trainable::loss(&net, &out, &b).unwrap();
        if with_penalty {
            l + ewc_penalty(&params, ewc.anchors(), 3.0).unwrap().unwrap()
        } else {
            l
        }
    };
    loss(true).backward();
    let want: Vec<Tensor> = params.iter().map(|(_, t)| t.grad().copy()).collect();
    params.zero_grad();
    loss(false).backward();
    ewc.after_backward(&params, &ctx).unwrap();
    for ((n, t), w) in params.iter().zip(&want) {
        let g = t.grad();
        let d = (&g - w).abs().max().double_value(&[]);
        assert!(
            d < 1e-4 * w.abs().max().double_value(&[]).max(1.0),
            "{n}: {d}"
        );
    }
    let p = ewc.penalty(&params).unwrap().unwrap().double_value(&[]);
    assert!(p > 0.0);
}

#[test]
fn online_ewc_decays_and_adds_the_fisher_and_keeps_one_anchor() {
    let mk = |v: f64, th: f64| Anchor {
        fisher: [("w".to_string(), Tensor::full([2], v, (Kind::Float, CPU)))].into(),
        theta: [("w".to_string(), Tensor::full([2], th, (Kind::Float, CPU)))].into(),
    };
    let mut cfg = EwcConfig::new(1.0, FisherKind::Exact);
    cfg.mode = EwcMode::Online { gamma: 0.5 };
    let mut ewc = Ewc::new(cfg).unwrap();
    ewc.fold(mk(4.0, 1.0));
    ewc.fold(mk(1.0, 2.0));
    ewc.fold(mk(2.0, 3.0));
    assert_eq!(ewc.anchors().len(), 1);
    // ((4 * 0.5) + 1) * 0.5 + 2 = 3.5, anchored at the latest theta.
    let a = &ewc.anchors()[0];
    assert_eq!(
        Vec::<f64>::try_from(&a.fisher["w"]).unwrap(),
        vec![3.5, 3.5]
    );
    assert_eq!(Vec::<f64>::try_from(&a.theta["w"]).unwrap(), vec![3.0, 3.0]);
    // Separate mode keeps all three.
    let mut sep = Ewc::new(EwcConfig::new(1.0, FisherKind::Exact)).unwrap();
    for i in 0..3 {
        sep.fold(mk(i as f64, 0.0));
    }
    assert_eq!(sep.anchors().len(), 3);
    // State round trip.
    let st = ewc.state().unwrap();
    let mut cfg = EwcConfig::new(1.0, FisherKind::Exact);
    cfg.mode = EwcMode::Online { gamma: 0.5 };
    let mut back = Ewc::new(cfg).unwrap();
    back.load_state(&st).unwrap();
    assert_eq!(
        Vec::<f64>::try_from(&back.anchors()[0].fisher["w"]).unwrap(),
        vec![3.5, 3.5]
    );
}

fn stream_batch(start: i64, n: i64) -> Batch {
    let x = Tensor::arange_start(start, start + n, (Kind::Float, CPU)).unsqueeze(1);
    let y = Tensor::arange_start(start, start + n, (Kind::Int64, CPU));
    let mut b = Batch::new(x, y).unwrap();
    b.indices = (start..start + n).collect();
    b
}

#[test]
fn reservoir_keeps_every_example_with_equal_probability() {
    // 1000 examples in batches of 25 into a memory of 100, over 300 seeds: each example
    // should be kept with probability 0.1. Chi-square over 20 bins of 50 examples
    // (expected 1500 each, 19 degrees of freedom: the 99.9% point is 43.8).
    let (n, cap, seeds) = (1000i64, 100usize, 300u64);
    let mut counts = vec![0f64; n as usize];
    for seed in 0..seeds {
        let mut buf = ReplayBuffer::new(BufferPolicy::Reservoir, cap, seed, 0).unwrap();
        for s in (0..n).step_by(25) {
            buf.observe(&stream_batch(s, 25)).unwrap();
        }
        assert_eq!(buf.len(), cap);
        let kept = Vec::<i64>::try_from(&buf.stored().unwrap().labels).unwrap();
        let mut uniq = kept.clone();
        uniq.sort_unstable();
        uniq.dedup();
        assert_eq!(uniq.len(), cap, "no example is stored twice");
        for k in kept {
            counts[k as usize] += 1.0;
        }
    }
    let expected = 50.0 * seeds as f64 * cap as f64 / n as f64;
    let chi2: f64 = counts
        .chunks(50)
        .map(|c| (c.iter().sum::<f64>() - expected).powi(2) / expected)
        .sum();
    assert!(chi2 < 43.8, "chi-square {chi2} over 20 bins");
    // The first and last quarters are kept about equally often.
    let q = |r: std::ops::Range<usize>| counts[r].iter().sum::<f64>();
    let ratio = q(0..250) / q(750..1000);
    assert!((0.9..1.1).contains(&ratio), "first/last quarter {ratio}");
}

#[test]
fn class_balanced_memory_keeps_equal_shares_and_a_zero_size_is_refused() {
    let mut buf = ReplayBuffer::new(BufferPolicy::ClassBalanced, 30, 7, 0).unwrap();
    // Task 0: classes 0 and 1, 90 of class 0 and 10 of class 1.
    let mk = |labels: Vec<i64>| {
        let n = labels.len() as i64;
        TensorDataset::new(
            Tensor::randn([n, 3], (Kind::Float, CPU)),
            Tensor::from_slice(&labels),
        )
        .unwrap()
    };
    let mut l0 = vec![0i64; 90];
    l0.extend(vec![1i64; 10]);
    buf.update_from_task(&mk(l0), 0, CPU).unwrap();
    let count = |buf: &ReplayBuffer, c: i64| buf.groups().iter().filter(|&&g| g == c).count();
    assert_eq!(
        (count(&buf, 0), count(&buf, 1)),
        (15, 10),
        "class 1 has only 10"
    );
    // Task 1: classes 2 and 3; 30 / 4 = 7 or 8 each (remainder to the first classes).
    let mut l1 = vec![2i64; 40];
    l1.extend(vec![3i64; 40]);
    buf.update_from_task(&mk(l1), 1, CPU).unwrap();
    let got: Vec<usize> = (0..4).map(|c| count(&buf, c)).collect();
    assert_eq!(got, vec![8, 8, 7, 7]);
    let labels = Vec::<i64>::try_from(&buf.stored().unwrap().labels).unwrap();
    assert_eq!(labels, buf.groups().to_vec(), "groups are the labels");
    // Task-balanced: 200 -> 100/100 -> 67/67/66.
    let mut tb = ReplayBuffer::new(BufferPolicy::TaskBalanced, 200, 1, 0).unwrap();
    for t in 0..3 {
        tb.update_from_task(&mk(vec![t; 300]), t as usize, CPU)
            .unwrap();
    }
    let got: Vec<usize> = (0..3)
        .map(|t| tb.groups().iter().filter(|&&g| g == t).count())
        .collect();
    assert_eq!(got, vec![67, 67, 66]);
    // A memory of 0 is an error that says so.
    let e = ReplayBuffer::new(BufferPolicy::Reservoir, 0, 0, 0)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("replay buffer size") && e.contains("at least 1"),
        "{e}"
    );
    assert!(Replay::new(ReplayConfig::new(BufferPolicy::Reservoir, 0)).is_err());
}

#[test]
fn replay_buffer_state_round_trips_and_refuses_other_settings() {
    let mut buf = ReplayBuffer::new(BufferPolicy::Reservoir, 10, 3, 0).unwrap();
    for s in (0..40).step_by(8) {
        buf.observe(&stream_batch(s, 8)).unwrap();
    }
    let st = buf.state();
    let mut back = ReplayBuffer::new(BufferPolicy::Reservoir, 10, 3, 0).unwrap();
    back.load_state(&st, CPU).unwrap();
    // Both continue identically.
    buf.observe(&stream_batch(40, 8)).unwrap();
    back.observe(&stream_batch(40, 8)).unwrap();
    let a = buf.sample(5).unwrap().unwrap();
    let b = back.sample(5).unwrap().unwrap();
    assert_eq!(a.indices, b.indices);
    let mut other = ReplayBuffer::new(BufferPolicy::Reservoir, 11, 3, 0).unwrap();
    let e = other.load_state(&st, CPU).unwrap_err().to_string();
    assert!(e.contains("capacity 10") && e.contains("11"), "{e}");
}

fn digits() -> reuse_core::data::Digits {
    load_digits(&reuse_testkit::fixtures_dir().join("digits/digits.csv.gz")).unwrap()
}

#[test]
fn packnet_keeps_earlier_tasks_bit_for_bit_under_weight_decay_and_momentum() {
    let d = digits();
    let splits: Vec<Vec<i64>> = (0..3).map(|t| vec![2 * t, 2 * t + 1]).collect();
    let s = Scenario::task_incremental(Rc::new(d.train), Rc::new(d.test), &splits).unwrap();
    tch::manual_seed(0);
    let body = Mlp::new(&[64, 32, 32], Activation::Relu, CPU).unwrap();
    let mut model = MultiHead::new(body, 32, 10, 3, CPU).unwrap();
    let mut pack = PackNet::new(0.5, "body.*").unwrap();
    let mut trainer = Trainer::new(TrainConfig {
        epochs: 3,
        lr: 3e-3,
        weight_decay: 0.05,
        optimizer: OptimizerKind::default(),
        ..Default::default()
    });
    let mut snapshots = Vec::new();
    let mut accs = Vec::new();
    for e in &s.tasks {
        // Only this task's head trains (the others would drift under weight decay).
        model.train_only_head(e.task).unwrap();
        trainer
            .begin_task(e.task, &model, &e.train, &mut [&mut pack])
            .unwrap();
        trainer
            .fit(&model, &e.train, None, &mut [&mut pack])
            .unwrap();
        pack.prune(&model.params()).unwrap();
        trainer
            .fit(&model, &e.train, None, &mut [&mut pack])
            .unwrap();
        trainer
            .end_task(e.task, &model, &e.train, &mut [&mut pack])
            .unwrap();
        snapshots.push(model.params().snapshot());
        pack.apply_inference_mask(&mut model, e.task).unwrap();
        accs.push(trainer::accuracy(&model, &e.test, 256, CPU).unwrap());
        pack.clear_inference_mask(&mut model);
    }
    // Every weight owned by task t (and every bias, fixed after task 0) is exactly as it
    // was at the end of task t.
    let fin = model.params();
    for (t, snap) in snapshots.iter().enumerate() {
        for (n, now) in fin.iter() {
            if !n.starts_with("body.") {
                continue;
            }
            let then = snap.get(n).unwrap();
            let same = if now.dim() == 1 {
                now.eq_tensor(then).all().int64_value(&[]) == 1
            } else {
                let own = pack.owners(n).unwrap().eq(t as i64);
                assert!(
                    own.sum(Kind::Int64).int64_value(&[]) > 0,
                    "task {t} owns some of {n}"
                );
                now.masked_select(&own)
                    .eq_tensor(&then.masked_select(&own))
                    .all()
                    .int64_value(&[])
                    == 1
            };
            assert!(same, "{n} changed for task {t}");
        }
    }
    // ... so each task's accuracy under its mask is what it was, exactly.
    for e in &s.tasks {
        pack.apply_inference_mask(&mut model, e.task).unwrap();
        let acc = trainer::accuracy(&model, &e.test, 256, CPU).unwrap();
        pack.clear_inference_mask(&mut model);
        assert_eq!(acc, accs[e.task], "task {}", e.task);
        assert!(acc > 0.9, "task {} accuracy {acc}", e.task);
    }
    // Ownership: half of the free weights per layer go each task (rounded).
    let owners = pack.owners("body.layers.0.weight").unwrap();
    let n = owners.numel() as i64;
    let own0 = owners.eq(0).sum(Kind::Int64).int64_value(&[]);
    assert!((own0 - n / 2).abs() <= 1, "{own0} of {n}");
    // Bad ratios are refused.
    for r in [0.0, 1.0, -0.5, 1.5] {
        let e = PackNet::new(r, "*").unwrap_err().to_string();
        assert!(e.contains("pruning ratio") && e.contains("(0, 1)"), "{e}");
    }
}

#[test]
fn multi_head_routes_by_task_and_refuses_a_task_beyond_its_heads() {
    tch::manual_seed(1);
    let body = Mlp::new(&[4, 6], Activation::Relu, CPU).unwrap();
    let mut mh = MultiHead::new(body, 6, 5, 2, CPU).unwrap();
    mh.limit_classes(1, &[3, 4]).unwrap();
    let x = Tensor::randn([3, 4], (Kind::Float, CPU));
    let mut b = Batch::new(x.shallow_clone(), Tensor::from_slice(&[0i64, 3, 4])).unwrap();
    b.task_ids = Some(Tensor::from_slice(&[0i64, 1, 1]));
    let out = reuse_core::Trainable::forward(&mh, &b, false, Default::default()).unwrap();
    let h = x
        .linear(&mh.body.layers[0].weight, mh.body.layers[0].bias.as_ref())
        .relu();
    let h0 = h
        .get(0)
        .unsqueeze(0)
        .linear(&mh.heads[0].weight, mh.heads[0].bias.as_ref());
    close(&out.logits.get(0).unsqueeze(0), &h0, 1e-6);
    let pred = Vec::<i64>::try_from(out.logits.argmax(-1, false)).unwrap();
    assert!(
        pred[1] >= 3 && pred[2] >= 3,
        "head 1 limited to classes 3, 4: {pred:?}"
    );
    b.task_ids = Some(Tensor::from_slice(&[0i64, 2, 1]));
    let e = reuse_core::Trainable::forward(&mh, &b, false, Default::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("task id 2") && e.contains("2 heads"), "{e}");
    b.task_ids = None;
    let e = reuse_core::Trainable::forward(&mh, &b, false, Default::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("no task ids"), "{e}");
    assert!(mh
        .limit_classes(2, &[0])
        .unwrap_err()
        .to_string()
        .contains("beyond"));
}

#[test]
fn replay_keeps_most_of_what_naive_fine_tuning_forgets_on_split_digits() {
    // A small version of the bench: class-incremental split digits. Naive fine-tuning
    // forgets nearly everything; replay keeps most of it.
    let d = digits();
    let splits: Vec<Vec<i64>> = (0..5).map(|t| vec![2 * t, 2 * t + 1]).collect();
    let s = Scenario::class_incremental(Rc::new(d.train), Rc::new(d.test), &splits).unwrap();
    let cfg = TrainConfig {
        epochs: 5,
        lr: 3e-3,
        ..Default::default()
    };
    let run = |techs: &mut [&mut dyn Technique]| {
        tch::manual_seed(0);
        let net = Mlp::new(&[64, 128, 10], Activation::Relu, CPU).unwrap();
        let mut tr = Trainer::new(cfg.clone());
        run_stream(&s, &net, &mut tr, techs, 256, true).unwrap()
    };
    let naive = run(&mut []);
    let mut replay = Replay::new(ReplayConfig::new(BufferPolicy::TaskBalanced, 200)).unwrap();
    let rep = run(&mut [&mut replay]);
    assert!(naive.forgetting().unwrap() > 0.8, "{}", naive.to_markdown());
    assert!(
        naive.avg_accuracy().unwrap() < 0.3,
        "{}",
        naive.to_markdown()
    );
    assert!(rep.avg_accuracy().unwrap() > 0.7, "{}", rep.to_markdown());
    assert!(rep.forgetting().unwrap() < 0.35, "{}", rep.to_markdown());
    assert_eq!(replay.buffer().len(), 200);
    assert!(naive.initial.is_some() && naive.forward_transfer().is_some());
}

#[test]
fn permuted_tasks_permute_features_and_stratified_splits_keep_proportions() {
    let x = Tensor::arange(12, (Kind::Float, CPU)).view([4, 3]);
    let y = Tensor::from_slice(&[0i64, 1, 0, 1]);
    let src: Rc<dyn BatchSource> = Rc::new(TensorDataset::new(x, y).unwrap());
    let s = Scenario::permuted(src.clone(), src.clone(), &[vec![0, 1, 2], vec![2, 0, 1]]).unwrap();
    let b = s.tasks[1].train.batch(&[1], CPU).unwrap();
    assert_eq!(
        Vec::<f64>::try_from(b.inputs.view([-1])).unwrap(),
        vec![5.0, 3.0, 4.0]
    );
    assert!(Scenario::permuted(src.clone(), src.clone(), &[vec![0, 0, 1]]).is_err());
    let sub = TaskData::subset(src, vec![3, 1]).unwrap().with_task(4);
    let b = sub.batch(&[0, 1], CPU).unwrap();
    assert_eq!(b.indices, vec![0, 1]);
    assert_eq!(
        Vec::<i64>::try_from(b.task_ids.unwrap()).unwrap(),
        vec![4, 4]
    );
    let labels: Vec<i64> = (0..100).map(|i| i64::from(i % 4 == 0)).collect();
    let (a, b) = stratified_split(&labels, 0.2, 0).unwrap();
    assert_eq!((a.len(), b.len()), (80, 20));
    assert_eq!(b.iter().filter(|&&i| labels[i as usize] == 1).count(), 5);
}

/// A test delta: `out + x A^T` (a full-rank adapter), with one trainable matrix.
struct Add {
    a: Tensor,
}

impl reuse_core::LinearDelta for Add {
    fn forward(&self, x: &Tensor, _w: &Tensor, _base: &Tensor, _train: bool) -> Tensor {
        x.matmul(&self.a.tr())
    }
    fn delta_weight(&self, _w: &Tensor) -> Option<Tensor> {
        Some(self.a.shallow_clone())
    }
    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        vec![("a".into(), self.a.shallow_clone())]
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

#[test]
fn task_deltas_route_each_example_and_earlier_tasks_stay_exact() {
    use reuse_continual::TaskDeltas;
    use reuse_core::Trainable;
    tch::manual_seed(2);
    let mut net = Mlp::new(&[6, 8, 4], Activation::Relu, CPU).unwrap();
    for t in 0..3 {
        net.visit_linears(&mut |_, l| {
            let [o, i] = l.shape();
            let a = (Tensor::randn([o, i], (Kind::Float, CPU)) * 0.1).set_requires_grad(true);
            l.add_delta(&format!("task{t}"), Box::new(Add { a }))
                .unwrap();
        });
    }
    let model = TaskDeltas::new(net, (0..3).map(|t| format!("task{t}")).collect()).unwrap();
    let x = Tensor::randn([5, 6], (Kind::Float, CPU));
    let y = Tensor::from_slice(&[0i64, 1, 2, 3, 0]);
    let batch = |tasks: &[i64]| {
        let mut b = Batch::new(x.shallow_clone(), y.shallow_clone()).unwrap();
        b.task_ids = Some(Tensor::from_slice(tasks));
        b
    };
    let logits = |tasks: &[i64]| {
        tch::no_grad(|| {
            model
                .forward(&batch(tasks), false, Default::default())
                .unwrap()
                .logits
        })
    };
    // A mixed batch gives each row what a batch of its own task gives it.
    let mixed = logits(&[0, 2, 1, 2, 0]);
    for (row, t) in [0i64, 2, 1, 2, 0].iter().enumerate() {
        let alone = logits(&[*t; 5]);
        close(&mixed.get(row as i64), &alone.get(row as i64), 1e-6);
    }
    // The task delta changes the output (routing is not a no-op).
    let d = (logits(&[0; 5]) - logits(&[1; 5]))
        .abs()
        .max()
        .double_value(&[]);
    assert!(d > 1e-3, "{d}");
    // Training task 2 alone leaves the base, tasks 0 and 1 and their outputs exact.
    let before0 = logits(&[0; 5]);
    let before1 = logits(&[1; 5]);
    let snap = model.params().snapshot();
    model.train_only(2).unwrap();
    let data = toy(64, 6, 4, 9).with_task(2);
    let mut tr = Trainer::new(TrainConfig {
        epochs: 2,
        weight_decay: 0.1,
        ..Default::default()
    });
    tr.fit(&model, &data, None, &mut []).unwrap();
    let now = model.params();
    let mut moved = 0;
    for (n, t) in now.iter() {
        let same = t.equal(snap.get(n).unwrap());
        if n.contains("task2") {
            moved += usize::from(!same);
        } else {
            assert!(same, "{n} changed while training task 2");
        }
    }
    assert!(moved > 0, "task 2's delta trained");
    assert!(logits(&[0; 5]).equal(&before0) && logits(&[1; 5]).equal(&before1));
    // Bad task ids are refused with the count.
    let e = model
        .forward(&batch(&[0, 3, 0, 0, 0]), false, Default::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("task 3") && e.contains("3 task deltas"), "{e}");
    let e = model.train_only(5).unwrap_err().to_string();
    assert!(e.contains("task 5"), "{e}");
    let mut plain = Batch::new(x.shallow_clone(), y.shallow_clone()).unwrap();
    plain.task_ids = None;
    assert!(model.forward(&plain, false, Default::default()).is_err());
}

#[test]
fn replayed_token_rows_are_cut_to_their_longest_row() {
    // Two texts of 2 and 3 tokens, stored padded to 10.
    let ids = Tensor::from_slice(&[
        5i64, 6, 0, 0, 0, 0, 0, 0, 0, 0, 7, 8, 9, 0, 0, 0, 0, 0, 0, 0,
    ])
    .view([2, 10]);
    let mask = ids.ne(0).to_kind(Kind::Int64);
    let mut b = Batch::new(ids, Tensor::from_slice(&[0i64, 1])).unwrap();
    b.mask = Some(mask);
    b.padded = true;
    let mut buf = ReplayBuffer::new(BufferPolicy::Reservoir, 4, 0, 0).unwrap();
    buf.observe(&b).unwrap();
    let s = buf.sample(2).unwrap().unwrap();
    assert_eq!(s.inputs.size(), vec![2, 3]);
    assert_eq!(
        s.mask.as_ref().unwrap().sum(Kind::Int64).int64_value(&[]),
        5
    );
    assert!(s.padded);
}
