//! The same training on CUDA as on the CPU: a LoRA classifier trained on the GPU ends
//! where the CPU run ends (up to float rounding), a run saved on the CPU resumes on the
//! GPU, bf16 and autocast train, and merge / mixed batches hold there too.
//!
//! Each test returns at once, saying so on stderr, where libtorch sees no CUDA device
//! (CI has none); they ran on an H200 (see the closing note of issue 7).

use reuse_core::data::{Batch, BatchSource};
use reuse_core::models::{Bert, BertClassifier, BertConfig};
use reuse_core::{
    Checkpoint, Model, Result, RunStateConfig, SaveParams, Schedule, TrainConfig, Trainable,
    Trainer,
};
use reuse_peft::{LoraConfig, LoraModel};
use tch::{Device, Kind, Tensor};

static SEED_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The GPU, if there is one. `REUSE_CUDA_TESTS_ON_CPU=1` runs these tests' "GPU" side on
/// the CPU instead, to check the tests themselves on a machine without one.
fn cuda() -> Option<Device> {
    if std::env::var_os("REUSE_CUDA_TESTS_ON_CPU").is_some() {
        Some(Device::Cpu)
    } else if tch::Cuda::is_available() {
        Some(Device::Cuda(0))
    } else {
        eprintln!("no CUDA device: skipped");
        None
    }
}

/// Token sequences with padding; the label is the first token's id mod 3, so there is
/// something to learn.
struct Tokens {
    ids: Tensor,
    mask: Tensor,
    labels: Tensor,
}

impl Tokens {
    fn new(n: i64, len: i64) -> Self {
        tch::manual_seed(99);
        let ids = Tensor::randint_low(2, 60, [n, len], (Kind::Int64, Device::Cpu));
        let lens = Tensor::randint_low(len / 2, len + 1, [n, 1], (Kind::Int64, Device::Cpu));
        let mask = Tensor::arange(len, (Kind::Int64, Device::Cpu))
            .unsqueeze(0)
            .lt_tensor(&lens)
            .to_kind(Kind::Int64);
        let ids = &ids * &mask;
        let labels = ids.select(1, 0).remainder(3);
        Self { ids, mask, labels }
    }
}

impl BatchSource for Tokens {
    fn len(&self) -> usize {
        self.ids.size()[0] as usize
    }
    fn batch(&self, indices: &[i64], device: Device) -> Result<Batch> {
        let ix = Tensor::from_slice(indices);
        let mut b = Batch::new(
            self.ids.index_select(0, &ix),
            self.labels.index_select(0, &ix),
        )?;
        let mask = self.mask.index_select(0, &ix);
        b.padded = mask.min().int64_value(&[]) == 0;
        b.mask = Some(mask);
        b.indices = indices.to_vec();
        Ok(b.to_device(device))
    }
}

/// A tiny LoRA classifier on `device`, its weights (base, adapter, head) identical on
/// every device: built on the CPU from `seed`, then copied.
fn lora_classifier(seed: i64, device: Device) -> LoraModel<BertClassifier> {
    let build = |d: Device| {
        let mut c = BertConfig::tiny(60, 32, 2);
        c.hidden_dropout_prob = 0.0;
        c.attention_probs_dropout_prob = 0.0;
        let mut m = LoraModel::new(BertClassifier::new(Bert::random(c, d).unwrap(), 3));
        let mut lc = LoraConfig::new(4, 8.0, &["query", "value"]);
        lc.init_lora_weights = reuse_peft::config::InitLoraWeights::Bool(false);
        lc.modules_to_save = Some(vec!["classifier".into()]);
        m.add_adapter("default", lc).unwrap();
        m
    };
    tch::manual_seed(seed);
    let cpu = build(Device::Cpu);
    if device == Device::Cpu {
        return cpu;
    }
    let m = build(device);
    m.params()
        .load_checkpoint(&cpu.params().to_checkpoint())
        .unwrap();
    m
}

fn config(device: Device, steps: usize) -> TrainConfig {
    TrainConfig {
        max_steps: Some(steps),
        batch_size: 8,
        lr: 3e-3,
        weight_decay: 0.01,
        schedule: Schedule::Linear { warmup: 2 },
        clip_grad_norm: Some(1.0),
        device,
        seed: 5,
        ..Default::default()
    }
}

/// Largest |a - b| over the trainable tensors of two models, compared on the CPU.
fn trainable_diff(a: &dyn Trainable, b: &dyn Trainable) -> f64 {
    let (pa, pb) = (a.params().trainable(), b.params().trainable());
    assert_eq!(pa.len(), pb.len());
    pa.iter()
        .map(|(n, t)| {
            let u = pb
                .get(n)
                .unwrap()
                .to_device(Device::Cpu)
                .to_kind(Kind::Float);
            (t.to_device(Device::Cpu).to_kind(Kind::Float) - u)
                .abs()
                .max()
                .double_value(&[])
        })
        .fold(0.0, f64::max)
}

#[test]
fn lora_training_on_cuda_ends_where_the_cpu_run_ends() {
    let Some(gpu) = cuda() else { return };
    let _g = SEED_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let data = Tokens::new(96, 12);
    let cpu = lora_classifier(1, Device::Cpu);
    let dev = lora_classifier(1, gpu);
    assert_eq!(trainable_diff(&cpu, &dev), 0.0, "copies start identical");
    let rc = Trainer::new(config(Device::Cpu, 40))
        .fit(&cpu, &data, None, &mut [])
        .unwrap();
    let rg = Trainer::new(config(gpu, 40))
        .fit(&dev, &data, None, &mut [])
        .unwrap();
    let moved = {
        let fresh = lora_classifier(1, Device::Cpu);
        trainable_diff(&cpu, &fresh)
    };
    let diff = trainable_diff(&cpu, &dev);
    eprintln!(
        "cpu losses {:?}\ngpu losses {:?}\nmax |cpu - gpu| {diff:.2e} (weights moved {moved:.2e})",
        rc.losses, rg.losses
    );
    assert!(moved > 1e-2, "training must move the weights ({moved})");
    assert!(diff < 1e-3, "cuda run drifted from the cpu run by {diff}");
    let (lc, lg) = (rc.losses.last().unwrap(), rg.losses.last().unwrap());
    assert!((lc - lg).abs() < 1e-3, "last losses {lc} vs {lg}");
    assert!(
        lg < &rg.losses[0],
        "loss did not fall on cuda: {:?}",
        rg.losses
    );
}

#[test]
fn a_run_saved_on_the_cpu_resumes_on_cuda() {
    let Some(gpu) = cuda() else { return };
    let _g = SEED_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let data = Tokens::new(96, 12);
    let dir = tempfile::tempdir().unwrap();
    let run_state = |every| {
        Some(RunStateConfig {
            path: dir.path().join("run.safetensors"),
            every,
            params: SaveParams::Trainable,
        })
    };
    // Straight: 30 steps on the CPU.
    let straight = lora_classifier(2, Device::Cpu);
    Trainer::new(config(Device::Cpu, 30))
        .fit(&straight, &data, None, &mut [])
        .unwrap();
    // Split: the same 30-step run on the CPU, stopped after step 13 (the run state was
    // saved after step 12); the rest on the GPU from the saved run.
    let first = lora_classifier(2, Device::Cpu);
    let mut c30 = config(Device::Cpu, 30);
    c30.run_state = run_state(12);
    struct StopAt(usize);
    impl reuse_core::Technique for StopAt {
        fn name(&self) -> &str {
            "stop"
        }
        fn after_step(
            &mut self,
            _p: &reuse_core::Params,
            ctx: &reuse_core::trainer::StepContext,
        ) -> Result<()> {
            if ctx.step + 1 == self.0 {
                return Err(reuse_core::Error::Invalid {
                    what: "test".into(),
                    reason: "stopped on purpose".into(),
                });
            }
            Ok(())
        }
    }
    let stopped = Trainer::new(c30).fit(&first, &data, None, &mut [&mut StopAt(13)]);
    assert!(stopped.is_err(), "the first part must stop at step 13");
    let saved = Checkpoint::load(dir.path().join("run.safetensors"), Device::Cpu).unwrap();
    assert!(!saved.is_empty());

    // Same frozen base; the trainable tensors are zeroed so the run state must restore them.
    let second = lora_classifier(2, gpu);
    for (_, mut t) in second
        .params()
        .trainable()
        .iter()
        .map(|(n, t)| (n, t.shallow_clone()))
    {
        tch::no_grad(|| {
            let _ = t.zero_();
        });
    }
    let mut cg = config(gpu, 30);
    cg.run_state = run_state(100);
    let mut t = Trainer::new(cg);
    let from = t.resume(&second, &mut []).unwrap();
    assert_eq!(from, Some(12), "resumed from the step-12 state");
    t.fit(&second, &data, None, &mut []).unwrap();
    let diff = trainable_diff(&straight, &second);
    eprintln!("cpu 30 steps vs cpu 12 + cuda 18: max diff {diff:.2e}");
    assert!(
        diff < 1e-3,
        "resumed on cuda, the weights end {diff} away from the straight cpu run"
    );
}

#[test]
fn bf16_and_autocast_train_on_cuda() {
    let Some(gpu) = cuda() else { return };
    let _g = SEED_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let data = Tokens::new(96, 12);
    let f32_run = lora_classifier(3, gpu);
    let base = Trainer::new(config(gpu, 60))
        .fit(&f32_run, &data, None, &mut [])
        .unwrap();

    let bf16 = lora_classifier(3, gpu);
    for (_, mut t) in bf16.model.named_parameters() {
        let b = t.to_kind(Kind::BFloat16);
        t.set_data(&b);
    }
    let rb = Trainer::new(config(gpu, 60))
        .fit(&bf16, &data, None, &mut [])
        .unwrap();

    let amp = lora_classifier(3, gpu);
    let mut ca = config(gpu, 60);
    ca.autocast = true;
    let ra = Trainer::new(ca).fit(&amp, &data, None, &mut []).unwrap();
    let last = |v: &[f64]| v[v.len() - 5..].iter().sum::<f64>() / 5.0;
    eprintln!(
        "last-5 mean loss: f32 {:.4}, bf16 {:.4}, f16 autocast {:.4} (first {:.4})",
        last(&base.losses),
        last(&rb.losses),
        last(&ra.losses),
        base.losses[0]
    );
    for (name, r) in [("bf16", &rb), ("autocast", &ra)] {
        assert!(r.losses.iter().all(|l| l.is_finite()), "{name}: {r:?}");
        assert!(
            (last(&r.losses) - last(&base.losses)).abs() < 0.1,
            "{name} ends far from f32: {} vs {}",
            last(&r.losses),
            last(&base.losses)
        );
    }
    // bf16 parameters stayed bf16 (the f32 masters live in the optimizer).
    for (n, t) in bf16.params().trainable().iter() {
        assert_eq!(t.kind(), Kind::BFloat16, "{n}");
        assert_eq!(t.device(), gpu, "{n}");
    }
}

#[test]
fn merge_and_mixed_batches_hold_on_cuda() {
    let Some(gpu) = cuda() else { return };
    let _g = SEED_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let data = Tokens::new(16, 12);
    let b = data.batch(&(0..16).collect::<Vec<_>>(), gpu).unwrap();
    let mut m = lora_classifier(4, gpu);
    let mut second = LoraConfig::new(2, 4.0, &["value"]);
    second.init_lora_weights = reuse_peft::config::InitLoraWeights::Bool(false);
    m.add_adapter("other", second).unwrap();
    let logits = |m: &LoraModel<BertClassifier>| {
        tch::no_grad(|| m.model.logits(&b.inputs, b.mask.as_ref(), false).unwrap())
    };
    m.set_adapter(&["default"]).unwrap();
    let unmerged = logits(&m);
    m.merge_adapter(&["default"]).unwrap();
    let merged = logits(&m);
    m.unmerge_adapter().unwrap();
    let back = logits(&m);
    let d1 = (&unmerged - &merged).abs().max().double_value(&[]);
    let d2 = (&unmerged - &back).abs().max().double_value(&[]);
    assert!(d1 < 1e-4 && d2 < 1e-5, "merge {d1}, round trip {d2}");
    assert_eq!(merged.device(), gpu);

    m.set_adapter(&["other"]).unwrap();
    let other = logits(&m);
    let names: Vec<&str> = (0..16)
        .map(|i| if i % 2 == 0 { "default" } else { "other" })
        .collect();
    let mixed = m
        .with_mixed_batch(&names, gpu, |mm| {
            tch::no_grad(|| mm.logits(&b.inputs, b.mask.as_ref(), false))
        })
        .unwrap();
    let even = Tensor::arange_start_step(0, 16, 2, (Kind::Int64, gpu));
    let odd = Tensor::arange_start_step(1, 16, 2, (Kind::Int64, gpu));
    let de = (mixed.index_select(0, &even) - unmerged.index_select(0, &even))
        .abs()
        .max()
        .double_value(&[]);
    let dodd = (mixed.index_select(0, &odd) - other.index_select(0, &odd))
        .abs()
        .max()
        .double_value(&[]);
    assert!(de < 1e-5 && dodd < 1e-5, "mixed batch: {de}, {dodd}");
}
