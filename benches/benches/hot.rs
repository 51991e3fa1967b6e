//! Criterion micro-benchmarks of the hot pieces, each next to the thing it replaces or
//! adds to: `cargo bench --bench hot` (the EWC training step is `--bench ewc`).
//!
//! * `lora_forward`: a MiniLM-sized BERT (random weights, 6 layers, hidden 384) on a
//!   batch of 8 x 64 tokens, no LoRA / LoRA r 8 on query,value unmerged / merged.
//! * `kd_loss`: token-level KD over MiniLM's 30,522-token vocabulary for 512 positions:
//!   full teacher logits against a cached top-8 (renormalised tail).
//! * `fisher`: EWC's diagonal Fisher of the continual digits MLP (64-400-400-10) over
//!   256 examples, exact (per-sample, through captured linears) and empirical (batched).
//! * `quant_matmul`: `x W^T` with x `[512, 384]` and W `[1536, 384]` (MiniLM's FFN
//!   up-projection) in f32, int8 per channel and int4 in groups of 64.
//! * `adamw_step`: one AdamW update of MiniLM's word-embedding table (30,522 x 384)
//!   through libtorch's fused kernel (a contiguous parameter) against the same rule in
//!   tensor ops (the path a non-contiguous parameter takes: the table's transpose).

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use reuse_continual::ewc::{fisher_empirical, fisher_exact};
use reuse_core::data::TensorDataset;
use reuse_core::models::{Bert, BertConfig};
use reuse_core::ForwardOptions;
use reuse_core::{Activation, Mlp, WeightStorage};
use reuse_distill::losses::{kd_loss, topk_kd_loss, KdConfig, TopKTail};
use reuse_peft::{LoraConfig, LoraModel};
use reuse_quant::{QuantSpec, QuantizedWeight};
use tch::{Device, Kind, Tensor};

fn short<'a>(
    c: &'a mut Criterion,
    name: &str,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    g
}

fn lora_forward(c: &mut Criterion) {
    tch::manual_seed(0);
    let mut cfg = BertConfig::tiny(30522, 384, 6);
    cfg.num_attention_heads = 12;
    cfg.intermediate_size = 1536;
    let bert = Bert::random(cfg, Device::Cpu).unwrap();
    let ids = Tensor::randint(30522, [8, 64], (Kind::Int64, Device::Cpu));
    let run = |b: &Bert| {
        tch::no_grad(|| {
            black_box(
                b.forward(&ids, None, None, false, ForwardOptions::default())
                    .unwrap()
                    .last_hidden_state,
            )
        })
    };
    let mut g = short(c, "lora_forward");
    g.bench_function("base", |b| b.iter(|| run(&bert)));
    let mut lm = LoraModel::new(bert);
    let mut lc = LoraConfig::new(8, 16.0, &["query", "value"]);
    lc.init_lora_weights = reuse_peft::config::InitLoraWeights::Bool(false);
    lm.add_adapter("a", lc).unwrap();
    g.bench_function("lora_unmerged", |b| b.iter(|| run(&lm.model)));
    lm.merge_adapter(&["a"]).unwrap();
    g.bench_function("lora_merged", |b| b.iter(|| run(&lm.model)));
    g.finish();
}

fn kd(c: &mut Criterion) {
    tch::manual_seed(0);
    let opts = (Kind::Float, Device::Cpu);
    let student = Tensor::randn([512, 30522], opts).set_requires_grad(true);
    let teacher = Tensor::randn([512, 30522], opts);
    let (vals, idx) = teacher.log_softmax(-1, Kind::Float).topk(8, -1, true, true);
    let vals = vals.to_kind(Kind::Half);
    let cfg = KdConfig::new(2.0);
    let mut g = short(c, "kd_loss");
    g.bench_function("full_logits_fwd_bwd", |b| {
        b.iter(|| {
            let l = kd_loss(&student, &teacher, None, &cfg).unwrap();
            l.backward();
            black_box(l)
        })
    });
    g.bench_function("topk8_fwd_bwd", |b| {
        b.iter(|| {
            let l = topk_kd_loss(&student, &vals, &idx, None, &cfg, TopKTail::Renormalize).unwrap();
            l.backward();
            black_box(l)
        })
    });
    g.finish();
}

fn fisher(c: &mut Criterion) {
    tch::manual_seed(0);
    let net = Mlp::new(&[64, 400, 400, 10], Activation::Relu, Device::Cpu).unwrap();
    let data = TensorDataset::new(
        Tensor::rand([256, 64], (Kind::Float, Device::Cpu)),
        Tensor::randint(10, [256], (Kind::Int64, Device::Cpu)),
    )
    .unwrap();
    let mut g = short(c, "fisher");
    g.bench_function("exact_256", |b| {
        b.iter(|| black_box(fisher_exact(&net, &data, 64, None, Device::Cpu).unwrap()))
    });
    g.bench_function("empirical_256", |b| {
        b.iter(|| black_box(fisher_empirical(&net, &data, 32, None, Device::Cpu).unwrap()))
    });
    g.finish();
}

fn quant(c: &mut Criterion) {
    tch::manual_seed(0);
    let opts = (Kind::Float, Device::Cpu);
    let w = Tensor::randn([1536, 384], opts) * 0.05;
    let x = Tensor::randn([512, 384], opts);
    let q8 = QuantizedWeight::quantize(&w, QuantSpec::int8()).unwrap();
    let q4 = QuantizedWeight::quantize(&w, QuantSpec::int4(64, false)).unwrap();
    let mut g = short(c, "quant_matmul");
    g.bench_function("f32", |b| {
        b.iter(|| tch::no_grad(|| black_box(x.matmul(&w.tr()))))
    });
    g.bench_function("int8", |b| {
        b.iter(|| tch::no_grad(|| black_box(q8.matmul(&x))))
    });
    g.bench_function("int4_g64", |b| {
        b.iter(|| tch::no_grad(|| black_box(q4.matmul(&x))))
    });
    g.finish();
}

fn adamw(c: &mut Criterion) {
    tch::manual_seed(0);
    let table = Tensor::randn([30_522, 384], (Kind::Float, Device::Cpu));
    let fused = table.copy().set_requires_grad(true);
    let strided = table.t_copy().t_().set_requires_grad(true);
    assert!(!strided.is_contiguous());
    let mut g = short(c, "adamw_step");
    for (name, p) in [("fused", &fused), ("tensor_ops", &strided)] {
        let params = reuse_core::Params::new(vec![("w".into(), p.shallow_clone())]);
        (p * 1e-3).sum(Kind::Float).backward();
        let mut opt = reuse_core::Optimizer::new(reuse_core::OptimizerKind::default(), 0.01);
        g.bench_function(name, |b| b.iter(|| opt.step(&params, 1e-4).unwrap()));
    }
    g.finish();
}

criterion_group!(benches, lora_forward, kd, fisher, quant, adamw);
criterion_main!(benches);
