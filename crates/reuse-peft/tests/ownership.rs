//! What an adapter owns: its parameters are found by structure (the linears carrying a
//! delta of its name), names that collide with model paths are refused, a load writes
//! only its own tensors (and `delete_adapter` undoes the biases it wrote), a
//! `modules_to_save` module the model lacks is set aside, and user input never panics.

use std::path::Path;

use reuse_core::models::{Bert, BertClassifier, BertConfig};
use reuse_core::ForwardOptions;
use reuse_core::{Checkpoint, Model};
use reuse_peft::config::InitLoraWeights;
use reuse_peft::io::PREFIX;
use reuse_peft::{LoraConfig, LoraModel, PeftError, BASE};
use tch::{Device, Tensor};

static SEED_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn tiny(seed: i64) -> Bert {
    tch::manual_seed(seed);
    let mut c = BertConfig::tiny(60, 32, 2);
    c.hidden_dropout_prob = 0.0;
    c.attention_probs_dropout_prob = 0.0;
    Bert::random(c, Device::Cpu).unwrap()
}

fn nonzero(r: i64, targets: &[&str]) -> LoraConfig {
    let mut c = LoraConfig::new(r, 2.0 * r as f64, targets);
    c.init_lora_weights = InitLoraWeights::Bool(false);
    c
}

fn run(b: &Bert) -> Tensor {
    let ids = Tensor::from_slice(&[2i64, 7, 9, 4, 3, 2, 5, 3, 0, 0, 2, 11, 12, 13, 3]).view([3, 5]);
    let mask = Tensor::from_slice(&[1i64, 1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1]).view([3, 5]);
    tch::no_grad(|| {
        b.forward(&ids, Some(&mask), None, false, ForwardOptions::default())
            .unwrap()
            .last_hidden_state
    })
}

/// Every parameter value of the model, by name.
fn values<M: Model>(m: &M) -> Vec<(String, Tensor)> {
    m.named_parameters()
        .into_iter()
        .map(|(n, t)| (n, t.detach().copy()))
        .collect()
}

fn assert_same<M: Model>(m: &M, before: &[(String, Tensor)]) {
    let now = m.named_parameters();
    assert_eq!(now.len(), before.len(), "parameter list changed");
    for ((n, t), (bn, bt)) in now.iter().zip(before) {
        assert_eq!(n, bn);
        assert!(t.equal(bt), "{n} changed");
    }
}

/// Saves adapter `name` of `m` and reads its tensors back.
fn saved<M: Model>(m: &mut LoraModel<M>, name: &str, dir: &Path) -> (LoraConfig, Checkpoint) {
    m.save_adapter(name, dir).unwrap();
    (
        LoraConfig::load(&dir.join("adapter_config.json")).unwrap(),
        Checkpoint::load(dir.join("adapter_model.safetensors"), Device::Cpu).unwrap(),
    )
}

#[test]
fn names_that_are_model_path_segments_are_refused() {
    let _g = SEED_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut m = LoraModel::new(BertClassifier::new(tiny(1), 3));
    let before = values(&m.model);
    for name in [
        "query",
        "output",
        "dense",
        "0",
        "weight",
        "bias",
        "classifier",
        "LayerNorm",
    ] {
        let e = m
            .add_adapter(name, nonzero(2, &["query", "value"]))
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(e, PeftError::Adapter { .. })
                && msg.contains(&format!("adapter `{name}`"))
                && msg.contains("path segment"),
            "{name}: {msg}"
        );
    }
    assert!(m.adapter_names().is_empty());
    assert_same(&m.model, &before);

    // A good name works; then the names of its own tensors are segments too.
    m.add_adapter("task", nonzero(2, &["query"])).unwrap();
    assert!(m.add_adapter("lora_A", nonzero(2, &["value"])).is_err());

    // Loading under a colliding name is refused before anything is read into the model.
    let dir = tempfile::tempdir().unwrap();
    let (cfg, ck) = saved(&mut m, "task", dir.path());
    let mut fresh = LoraModel::new(BertClassifier::new(tiny(1), 3));
    let before = values(&fresh.model);
    let e = fresh
        .load_adapter_from(cfg, &ck, Path::new("x.safetensors"), "output")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("adapter `output`") && e.contains("path segment"),
        "{e}"
    );
    assert_same(&fresh.model, &before);
    assert!(fresh.adapter_names().is_empty());
}

#[test]
fn adapter_parameters_are_found_by_structure() {
    let _g = SEED_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut m = LoraModel::new(BertClassifier::new(tiny(2), 3));
    m.add_adapter("a", nonzero(4, &["query", "value"])).unwrap();
    let mut b = nonzero(2, &["key", "intermediate.dense"]);
    b.use_dora = true;
    m.add_adapter("b", b).unwrap();
    // a: 2 layers x 2 modules x (4*32 + 32*4); b (DoRA, r=2): A [2, in], B [out, 2] and
    // a magnitude [out] on each of its linears.
    assert_eq!(m.adapter_parameter_count("a"), 2 * 2 * 256);
    let mut expect_b = 0;
    m.model.visit_linears(&mut |p, l| {
        if p.ends_with(".key") || p.ends_with("intermediate.dense") {
            expect_b += 2 * l.in_features() + l.out_features() * 2 + l.out_features();
        }
    });
    assert_eq!(m.adapter_parameter_count("b") as i64, expect_b);
    assert_eq!(m.adapter_parameter_count("zzz"), 0);
    // Only the active adapter trains: exactly its delta tensors.
    m.set_adapter(&["b"]).unwrap();
    let tr = m.trainable_parameters();
    assert_eq!(tr.count() as i64, expect_b);
    assert!(
        tr.names().iter().all(|n| n.contains(".b.lora_")),
        "{:?}",
        tr.names()
    );
    m.set_adapter(&["a", "b"]).unwrap();
    assert_eq!(
        m.trainable_parameters().count() as i64,
        2 * 2 * 256 + expect_b
    );
    // Deleting `a` leaves `b`'s parameters and count untouched.
    m.delete_adapter("a").unwrap();
    assert_eq!(m.adapter_parameter_count("a"), 0);
    assert_eq!(m.trainable_parameters().count() as i64, expect_b);
}

#[test]
fn a_load_writes_only_its_own_tensors() {
    let _g = SEED_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let mut src = LoraModel::new(tiny(3));
    src.add_adapter("a", nonzero(2, &["query"])).unwrap();
    let (cfg, ck) = saved(&mut src, "a", dir.path());
    let weight = format!("{PREFIX}encoder.layer.0.attention.self.key.weight");
    let qbias = format!("{PREFIX}encoder.layer.1.attention.self.query.bias");
    let kbias = format!("{PREFIX}encoder.layer.1.attention.self.key.bias");
    let with = |extra: &str| {
        let mut c = Checkpoint::new();
        for (n, t) in ck.iter() {
            c.insert(n, t.copy());
        }
        c.insert(extra, Tensor::ones([32], (tch::Kind::Float, Device::Cpu)));
        if extra == weight {
            c.insert(
                extra,
                Tensor::ones([32, 32], (tch::Kind::Float, Device::Cpu)),
            );
        }
        c
    };
    let mut m = LoraModel::new(tiny(3));
    let before = values(&m.model);
    let out_before = run(&m.model);
    // A base weight, or a bias the config does not train: refused by name, nothing attached.
    for (bias, key) in [
        ("none", &weight),
        ("none", &qbias),
        ("all", &weight),
        ("lora_only", &kbias),
    ] {
        let mut c = cfg.clone();
        c.bias = bias.into();
        let e = m
            .load_adapter_from(c, &with(key), Path::new("evil.safetensors"), "x")
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(e, PeftError::Mismatch { .. })
                && msg.contains("evil.safetensors")
                && msg.contains(&format!("`{key}`")),
            "{bias} {key}: {msg}"
        );
        assert!(m.adapter_names().is_empty());
        assert_same(&m.model, &before);
        assert!(run(&m.model).equal(&out_before));
    }
    // A bias the config trains is written, remembered and restored on delete.
    let mut c = cfg.clone();
    c.bias = "lora_only".into();
    let loaded = m
        .load_adapter_from(c, &with(&qbias), Path::new("ok.safetensors"), "x")
        .unwrap();
    let qb = "encoder.layer.1.attention.self.query.bias";
    assert_eq!(loaded.biases, vec![qb.to_string()]);
    let live = |m: &LoraModel<Bert>| {
        m.model
            .named_parameters()
            .into_iter()
            .find(|(n, _)| n == qb)
            .unwrap()
            .1
    };
    assert!(live(&m).equal(&Tensor::ones([32], (tch::Kind::Float, Device::Cpu))));
    m.delete_adapter("x").unwrap();
    assert_same(&m.model, &before);
    assert!(run(&m.model).equal(&out_before));

    // Two adapters that overwrite the same bias: deleting in either order ends at the
    // original values, and while one is left its value is live.
    let mut c = cfg.clone();
    c.bias = "all".into();
    let twos = {
        let mut k = with(&qbias);
        k.insert(
            qbias.clone(),
            Tensor::full([32], 2.0, (tch::Kind::Float, Device::Cpu)),
        );
        k
    };
    for order in [["x", "y"], ["y", "x"]] {
        m.load_adapter_from(c.clone(), &with(&qbias), Path::new("x"), "x")
            .unwrap();
        m.load_adapter_from(c.clone(), &twos, Path::new("y"), "y")
            .unwrap();
        assert_eq!(live(&m).double_value(&[0]), 2.0);
        m.delete_adapter(order[0]).unwrap();
        // Deleting x first keeps y's value live; deleting y first puts back x's.
        let expect = if order[0] == "x" { 2.0 } else { 1.0 };
        assert_eq!(live(&m).double_value(&[0]), expect, "{order:?}");
        m.delete_adapter(order[1]).unwrap();
        assert_same(&m.model, &before);
    }
}

#[test]
fn modules_to_save_the_model_lacks_are_set_aside_and_kept() {
    let _g = SEED_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let mut src = LoraModel::new(BertClassifier::new(tiny(4), 3));
    let mut cfg = nonzero(2, &["query", "value"]);
    cfg.modules_to_save = Some(vec!["classifier".into()]);
    src.add_adapter("a", cfg).unwrap();
    tch::no_grad(|| {
        let _ = src.model.head.classifier.weight.shallow_clone().fill_(0.5);
    });
    let (cfg, ck) = saved(&mut src, "a", dir.path());
    let head = format!("{PREFIX}classifier.weight");
    assert!(ck
        .tensor(&head)
        .unwrap()
        .equal(&src.model.head.classifier.weight));

    // Into a model with the head: loaded into it.
    let mut with_head = LoraModel::new(BertClassifier::new(tiny(4), 3));
    let l = with_head.load_adapter(dir.path(), "a").unwrap();
    assert!(l.set_aside.is_empty());
    assert!(with_head
        .model
        .head
        .classifier
        .weight
        .equal(ck.tensor(&head).unwrap()));

    // Into a bare encoder: set aside, the encoder gets the LoRA, and saving writes the
    // head back unchanged.
    let mut bare = LoraModel::new(tiny(4));
    let l = bare.load_adapter(dir.path(), "a").unwrap();
    assert_eq!(l.set_aside, vec!["classifier".to_string()]);
    assert_eq!(l.modules.len(), 4);
    assert!(run(&bare.model).equal(&run(&with_head.model.bert)));
    let dir2 = tempfile::tempdir().unwrap();
    let (cfg2, ck2) = saved(&mut bare, "a", dir2.path());
    assert_eq!(cfg2.modules_to_save, cfg.modules_to_save);
    let mut names: Vec<&str> = ck.names().collect();
    let mut names2: Vec<&str> = ck2.names().collect();
    names.sort();
    names2.sort();
    assert_eq!(names, names2);
    for n in names {
        assert!(ck.tensor(n).unwrap().equal(ck2.tensor(n).unwrap()), "{n}");
    }

    // A modules_to_save module the model has, with a parameter it lacks: an error.
    let mut odd = Checkpoint::new();
    for (n, t) in ck.iter() {
        odd.insert(n, t.copy());
    }
    odd.insert(
        format!("{PREFIX}classifier.scale"),
        Tensor::ones([3], (tch::Kind::Float, Device::Cpu)),
    );
    let mut m = LoraModel::new(BertClassifier::new(tiny(4), 3));
    let e = m
        .load_adapter_from(cfg, &odd, Path::new("odd.safetensors"), "a")
        .unwrap_err()
        .to_string();
    assert!(e.contains("classifier.scale"), "{e}");
    assert!(m.adapter_names().is_empty());
}

#[test]
fn mixed_batch_errors_are_errors_not_panics() {
    let _g = SEED_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut m = LoraModel::new(tiny(5));
    m.add_adapter("a", nonzero(2, &["query", "value"])).unwrap();
    let plain = run(&m.model);
    let ids = Tensor::from_slice(&[2i64, 7, 9, 4, 3, 2, 5, 3, 0, 0, 2, 11, 12, 13, 3]).view([3, 5]);
    // Four adapter names for a batch of three samples.
    let e = m
        .with_mixed_batch(&["a", BASE, "a", "a"], Device::Cpu, |b| {
            Ok(
                b.forward(&ids, None, None, false, ForwardOptions::default())?
                    .last_hidden_state,
            )
        })
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("4 adapter names") && e.contains("3 samples"),
        "{e}"
    );
    // Routing ended: the model runs as before.
    assert!(run(&m.model).equal(&plain));
    // As many names as samples works.
    let ok = m
        .with_mixed_batch(&["a", BASE, "a"], Device::Cpu, |b| {
            Ok(
                b.forward(&ids, None, None, false, ForwardOptions::default())?
                    .last_hidden_state,
            )
        })
        .unwrap();
    assert_eq!(ok.size(), [3, 5, 32]);
}
