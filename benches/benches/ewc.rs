//! What EWC's penalty adds to a training step: one optimizer step of the continual
//! digits MLP (64-400-400-10, batch 32, AdamW) without and with the penalty of one
//! consolidated task (separate mode) and of four. `cargo bench --bench ewc`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use reuse_continual::ewc::{ewc_penalty, Ewc, EwcConfig, FisherKind};
use reuse_core::data::TensorDataset;
use reuse_core::trainer::StepContext;
use reuse_core::Model;
use reuse_core::{Activation, Mlp, Optimizer, OptimizerKind, Technique, Trainable};
use tch::{Device, Kind, Tensor};

fn step(c: &mut Criterion) {
    tch::manual_seed(0);
    let net = Mlp::new(&[64, 400, 400, 10], Activation::Relu, Device::Cpu).unwrap();
    let data = TensorDataset::new(
        Tensor::rand([256, 64], (Kind::Float, Device::Cpu)),
        Tensor::randint(10, [256], (Kind::Int64, Device::Cpu)),
    )
    .unwrap();
    let batch =
        reuse_core::data::BatchSource::batch(&data, &(0..32).collect::<Vec<_>>(), Device::Cpu)
            .unwrap();
    let params = net.params();
    let ctx = StepContext {
        step: 0,
        total_steps: 1,
        micro: 0,
        epoch: 0,
        task: 1,
        lr: 1e-3,
        device: Device::Cpu,
    };
    let mut ewcs = Vec::new();
    for anchors in [1, 4] {
        let mut ewc = Ewc::new(EwcConfig::new(10.0, FisherKind::Exact)).unwrap();
        for _ in 0..anchors {
            ewc.consolidate(&net, &data, Device::Cpu).unwrap();
        }
        ewcs.push((anchors, ewc));
    }
    let mut opt = Optimizer::new(OptimizerKind::default(), 0.0);
    let mut g = c.benchmark_group("ewc_training_step");
    g.bench_function("plain", |b| {
        b.iter(|| {
            let out = Trainable::forward(&net, &batch, true, Default::default()).unwrap();
            let loss = net.loss(&out, &batch).unwrap();
            loss.backward();
            opt.step(&params, 1e-3).unwrap();
            params.zero_grad();
            black_box(());
        })
    });
    for (anchors, ewc) in ewcs.iter_mut() {
        // As the technique runs in the trainer: the penalty's gradient added after
        // backward.
        g.bench_function(format!("with_penalty_{anchors}_tasks"), |b| {
            b.iter(|| {
                let out = Trainable::forward(&net, &batch, true, Default::default()).unwrap();
                net.loss(&out, &batch).unwrap().backward();
                ewc.after_backward(&params, &ctx).unwrap();
                opt.step(&params, 1e-3).unwrap();
                params.zero_grad();
                black_box(());
            })
        });
        // The same penalty through autograd (a user's own loop with `ewc_penalty`).
        g.bench_function(format!("with_autograd_penalty_{anchors}_tasks"), |b| {
            b.iter(|| {
                let out = Trainable::forward(&net, &batch, true, Default::default()).unwrap();
                let loss = net.loss(&out, &batch).unwrap();
                let pen = ewc_penalty(&params, ewc.anchors(), 10.0).unwrap().unwrap();
                (loss + pen).backward();
                opt.step(&params, 1e-3).unwrap();
                params.zero_grad();
                black_box(());
            })
        });
    }
    g.finish();
}

criterion_group!(benches, step);
criterion_main!(benches);
