//! Adapter management on BERT: training only the adapter, several adapters (switch,
//! sum, delete), mixed-adapter batches, merge properties, bottleneck adapters.

use proptest::prelude::*;
use reuse_core::models::{Bert, BertClassifier, BertConfig};
use reuse_core::ForwardOptions;
use reuse_core::{Model, OutputSlots};
use reuse_peft::bottleneck::{
    add_bottleneck, load_bottleneck, save_bottleneck, set_active_bottlenecks,
};
use reuse_peft::config::InitLoraWeights;
use reuse_peft::{BottleneckConfig, LoraConfig, LoraModel, BASE};
use tch::{Device, Kind, Tensor};

static SEED_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn tiny(seed: i64) -> Bert {
    tch::manual_seed(seed);
    let mut c = BertConfig::tiny(60, 32, 2);
    c.hidden_dropout_prob = 0.0;
    c.attention_probs_dropout_prob = 0.0;
    Bert::random(c, Device::Cpu).unwrap()
}

fn inputs() -> (Tensor, Tensor) {
    let ids = Tensor::from_slice(&[2i64, 7, 9, 4, 3, 2, 5, 3, 0, 0, 2, 11, 12, 13, 3]).view([3, 5]);
    let mask = Tensor::from_slice(&[1i64, 1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1]).view([3, 5]);
    (ids, mask)
}

fn run(b: &Bert) -> Tensor {
    let (ids, mask) = inputs();
    tch::no_grad(|| {
        b.forward(&ids, Some(&mask), None, false, ForwardOptions::default())
            .unwrap()
            .last_hidden_state
    })
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn nonzero(r: i64, alpha: f64, targets: &[&str]) -> LoraConfig {
    let mut c = LoraConfig::new(r, alpha, targets);
    c.init_lora_weights = InitLoraWeights::Bool(false);
    c
}

#[test]
fn new_adapter_changes_nothing_and_only_it_trains() {
    let _g = SEED_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let bert = tiny(1);
    let before = run(&bert);
    let mut m = LoraModel::new(BertClassifier::new(bert, 3));
    let mut cfg = LoraConfig::new(4, 8.0, &["query", "value"]);
    cfg.modules_to_save = Some(vec!["classifier".into()]);
    m.add_adapter("a", cfg).unwrap();
    assert!(
        run(&m.model.bert).equal(&before),
        "B = 0 must leave the output unchanged"
    );
    let trainable = m.trainable_parameters();
    // 2 layers x 2 modules x (4*32 + 32*4) + classifier (32*3 + 3)
    assert_eq!(trainable.count(), 2 * 2 * 256 + 99);
    assert!(trainable
        .names()
        .iter()
        .all(|n| n.contains(".a.lora_") || n.starts_with("classifier.")));
    // A few steps move the adapter and the head, never the base.
    let base = m
        .model
        .bert
        .params()
        .select_glob("*.weight")
        .unwrap()
        .snapshot();
    let (ids, mask) = inputs();
    let labels = Tensor::from_slice(&[0i64, 1, 2]);
    let mut opt = reuse_core::Optimizer::new(Default::default(), 0.0);
    for _ in 0..3 {
        let loss = reuse_core::loss::cross_entropy(
            &m.model.logits(&ids, Some(&mask), true).unwrap(),
            &labels,
        )
        .unwrap();
        loss.backward();
        opt.step(&trainable, 1e-2).unwrap();
        trainable.zero_grad();
    }
    for (n, t) in m
        .model
        .bert
        .params()
        .select_glob("*.weight")
        .unwrap()
        .iter()
    {
        let unchanged = t.equal(base.get(n).unwrap());
        assert_eq!(unchanged, !n.contains(".a.lora_"), "{n}");
    }
}

#[test]
fn several_adapters_switch_sum_and_delete() {
    let _g = SEED_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut m = LoraModel::new(tiny(2));
    let base = run(&m.model);
    m.add_adapter("a", nonzero(4, 8.0, &["query", "value"]))
        .unwrap();
    m.add_adapter("b", nonzero(2, 4.0, &["dense"])).unwrap();
    assert_eq!(m.active_adapters(), ["a"]);
    let out_a = run(&m.model);
    m.set_adapter(&["b"]).unwrap();
    let out_b = run(&m.model);
    m.set_adapter(&["a", "b"]).unwrap();
    let out_ab = run(&m.model);
    for (x, y) in [
        (&out_a, &base),
        (&out_b, &base),
        (&out_ab, &out_a),
        (&out_ab, &out_b),
    ] {
        assert!(max_diff(x, y) > 1e-3);
    }
    // Merging both reproduces the summed forward; unmerging restores everything.
    m.merge_adapter(&["a", "b"]).unwrap();
    assert!(max_diff(&run(&m.model), &out_ab) < 1e-4);
    m.unmerge_adapter().unwrap();
    assert!(max_diff(&run(&m.model), &out_ab) < 1e-5);
    m.delete_adapter("b").unwrap();
    assert_eq!(m.active_adapters(), ["a"]);
    assert!(max_diff(&run(&m.model), &out_a) < 1e-6);
    assert!(m.set_adapter(&["b"]).is_err());
    let plain = m.merge_and_unload().unwrap();
    assert!(max_diff(&run(&plain), &out_a) < 1e-4);
    assert_eq!(plain.params().count_trainable(), plain.params().count());
    assert!(plain
        .named_parameters()
        .iter()
        .all(|(n, _)| !n.contains("lora")));
}

#[test]
fn mixed_batch_gives_each_sample_its_adapter() {
    let _g = SEED_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut m = LoraModel::new(tiny(3));
    m.add_adapter("a", nonzero(4, 8.0, &["query", "value", "dense"]))
        .unwrap();
    let mut dora = nonzero(4, 8.0, &["key", "value"]);
    dora.use_dora = true;
    m.add_adapter("b", dora).unwrap();
    let mut single = Vec::new();
    for names in [&[][..], &["a"][..], &["b"][..]] {
        m.set_adapter(names).unwrap();
        single.push(run(&m.model));
    }
    m.set_adapter(&["a", "b"]).unwrap();
    let (ids, mask) = inputs();
    let mixed = m
        .with_mixed_batch(&["b", BASE, "a"], Device::Cpu, |b| {
            tch::no_grad(|| {
                Ok(
                    b.forward(&ids, Some(&mask), None, false, ForwardOptions::default())?
                        .last_hidden_state,
                )
            })
        })
        .unwrap();
    assert!(max_diff(&mixed.get(0), &single[2].get(0)) < 1e-5);
    assert!(max_diff(&mixed.get(1), &single[0].get(1)) < 1e-5);
    assert!(max_diff(&mixed.get(2), &single[1].get(2)) < 1e-5);
    // Routing is cleared afterwards, and refused while merged.
    assert!(max_diff(&run(&m.model), &single[0]) > 1e-3);
    m.merge_adapter(&["a"]).unwrap();
    assert!(m
        .with_mixed_batch(&["a", "b", "a"], Device::Cpu, |_| Ok(()))
        .is_err());
    assert!(m
        .with_mixed_batch(&["zzz"], Device::Cpu, |_| Ok(()))
        .is_err());
}

#[test]
fn modules_to_save_are_per_adapter() {
    let _g = SEED_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut m = LoraModel::new(BertClassifier::new(tiny(4), 3));
    let mut cfg = nonzero(2, 4.0, &["query"]);
    cfg.modules_to_save = Some(vec!["classifier".into()]);
    m.add_adapter("t1", cfg.clone()).unwrap();
    m.add_adapter("t2", cfg).unwrap();
    let w1 = m.model.head.classifier.weight.detach().copy();
    tch::no_grad(|| {
        let _ = m.model.head.classifier.weight.shallow_clone().fill_(0.25);
    });
    m.set_adapter(&["t2"]).unwrap();
    assert!(
        m.model.head.classifier.weight.equal(&w1),
        "t2 starts from the values at creation"
    );
    m.set_adapter(&["t1"]).unwrap();
    assert_eq!(
        m.model.head.classifier.weight.double_value(&[0, 0]),
        0.25,
        "t1 kept its trained head"
    );
    let dir = tempfile::tempdir().unwrap();
    m.save_adapter("t2", dir.path()).unwrap();
    let ck =
        reuse_core::Checkpoint::load(dir.path().join("adapter_model.safetensors"), Device::Cpu)
            .unwrap();
    assert!(ck
        .tensor("base_model.model.classifier.weight")
        .unwrap()
        .equal(&w1));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(8))]
    #[test]
    fn merge_unmerge_restores_and_agrees(seed in 0i64..10_000, r in 1i64..6, dora in any::<bool>(), rslora in any::<bool>()) {
        let _g = SEED_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let mut m = LoraModel::new(tiny(seed));
        let mut cfg = nonzero(r, 2.0 * r as f64, &["query", "key", "value", "dense"]);
        cfg.use_dora = dora;
        cfg.use_rslora = rslora;
        m.add_adapter("p", cfg).unwrap();
        let before = m.model.params().select_glob("*.weight").unwrap().snapshot();
        let unmerged = run(&m.model);
        m.merge_adapter(&["p"]).unwrap();
        prop_assert!(max_diff(&run(&m.model), &unmerged) < 1e-4);
        m.unmerge_adapter().unwrap();
        for (n, t) in m.model.params().select_glob("*.weight").unwrap().iter() {
            prop_assert!(max_diff(t, before.get(n).unwrap()) < 1e-6, "{}", n);
        }
    }
}

#[test]
fn bottleneck_adapters_per_task() {
    let _g = SEED_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut bert = tiny(5);
    let base = run(&bert);
    let mut cfgs = [
        BottleneckConfig::houlsby(),
        BottleneckConfig::pfeiffer(),
        BottleneckConfig::parallel(),
    ];
    let names = ["houlsby", "pfeiffer", "parallel"];
    let mut counts = Vec::new();
    for (cfg, name) in cfgs.iter_mut().zip(names) {
        cfg.hidden_size = 32;
        cfg.reduction_factor = if name == "parallel" { 2.0 } else { 8.0 };
        let places = add_bottleneck(&mut bert, name, cfg, Device::Cpu).unwrap();
        counts.push(places.len());
        set_active_bottlenecks(&mut bert, &[name]);
        assert!(
            run(&bert).equal(&base),
            "{name}: a new adapter must be the identity"
        );
    }
    assert_eq!(counts, [4, 2, 2]);
    // Train each a little on its own task: only its parameters move.
    let (ids, mask) = inputs();
    let mut outs = Vec::new();
    for name in names {
        set_active_bottlenecks(&mut bert, &[name]);
        let p = bert.params().trainable();
        assert!(p
            .names()
            .iter()
            .all(|n| n.contains(&format!(".{name}.adapter_"))));
        let mut opt = reuse_core::Optimizer::new(Default::default(), 0.0);
        for _ in 0..3 {
            bert.forward(&ids, Some(&mask), None, true, ForwardOptions::default())
                .unwrap()
                .last_hidden_state
                .sum(Kind::Float)
                .backward();
            opt.step(&p, 1e-2).unwrap();
            p.zero_grad();
        }
        outs.push(run(&bert));
        assert!(
            max_diff(outs.last().unwrap(), &base) > 1e-4,
            "{name} did not learn"
        );
    }
    set_active_bottlenecks(&mut bert, &[]);
    assert!(run(&bert).equal(&base));
    // Save one alone and load it into a fresh copy of the base model.
    let dir = tempfile::tempdir().unwrap();
    save_bottleneck(&bert, "pfeiffer", &cfgs[1], dir.path()).unwrap();
    let mut fresh = tiny(5);
    assert!(run(&fresh).equal(&base));
    let cfg = load_bottleneck(&mut fresh, dir.path(), "pf").unwrap();
    assert_eq!(cfg, cfgs[1]);
    set_active_bottlenecks(&mut fresh, &["pf"]);
    assert!(max_diff(&run(&fresh), &outs[1]) < 1e-6);
    let mut n = 0;
    fresh.visit_block_outputs(&mut |_, s: &mut OutputSlots| n += s.names().len());
    assert_eq!(n, 2);
}
