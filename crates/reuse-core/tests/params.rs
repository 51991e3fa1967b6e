//! Parameter selection, freezing, counting, snapshots.

use reuse_core::{Activation, Mlp, Model, Optimizer, OptimizerKind};
use tch::{Device, Kind, Tensor};

fn mlp() -> Mlp {
    tch::manual_seed(1);
    Mlp::new(&[4, 8, 3], Activation::Relu, Device::Cpu).unwrap()
}

#[test]
fn select_by_glob_and_regex() {
    let m = mlp();
    let p = m.params();
    assert_eq!(
        p.names(),
        [
            "layers.0.weight",
            "layers.0.bias",
            "layers.1.weight",
            "layers.1.bias"
        ]
    );
    assert_eq!(
        p.select_glob("*.bias").unwrap().names(),
        ["layers.0.bias", "layers.1.bias"]
    );
    assert_eq!(p.select_regex(r"^layers\.1\.").unwrap().len(), 2);
    let e = p.select_glob("encoder.*").unwrap_err().to_string();
    assert!(
        e.contains("encoder.*") && e.contains("layers.0.weight"),
        "{e}"
    );
    assert_eq!(p.count(), 4 * 8 + 8 + 8 * 3 + 3);
}

#[test]
fn frozen_parameters_are_not_updated() {
    let m = mlp();
    let p = m.params();
    p.select_glob("layers.0.*").unwrap().freeze();
    assert_eq!(p.count_trainable(), 8 * 3 + 3);
    let before = p.snapshot();
    let mut opt = Optimizer::new(OptimizerKind::default(), 0.0);
    let x = Tensor::randn([16, 4], (Kind::Float, Device::Cpu));
    m.forward(&x, true)
        .unwrap()
        .square()
        .mean(Kind::Float)
        .backward();
    opt.step(&p.trainable(), 0.1).unwrap();
    for (name, t) in p.iter() {
        let same = t.equal(before.get(name).unwrap());
        assert_eq!(
            same,
            name.starts_with("layers.0"),
            "{name} changed: {}",
            !same
        );
    }
    // Unfreeze: now layer 0 moves too.
    p.unfreeze();
    p.zero_grad();
    m.forward(&x, true)
        .unwrap()
        .square()
        .mean(Kind::Float)
        .backward();
    opt.step(&p.trainable(), 0.1).unwrap();
    assert!(!p
        .get("layers.0.weight")
        .unwrap()
        .equal(before.get("layers.0.weight").unwrap()));
}

#[test]
fn snapshot_restore_and_checkpoint_load() {
    let m = mlp();
    let p = m.params();
    let snap = p.snapshot();
    let ck = p.to_checkpoint();
    tch::no_grad(|| {
        for (_, t) in p.iter() {
            let _ = t.shallow_clone().fill_(0.5);
        }
    });
    assert!(!p
        .get("layers.1.bias")
        .unwrap()
        .equal(snap.get("layers.1.bias").unwrap()));
    p.restore(&snap).unwrap();
    for (n, t) in p.iter() {
        assert!(t.equal(snap.get(n).unwrap()), "{n}");
    }
    tch::no_grad(|| {
        let _ = p.get("layers.0.bias").unwrap().shallow_clone().fill_(0.0);
    });
    p.load_checkpoint(&ck).unwrap();
    assert!(p
        .get("layers.0.bias")
        .unwrap()
        .equal(ck.tensor("layers.0.bias").unwrap()));
    // A checkpoint missing a tensor changes nothing and names the tensor.
    let mut partial = p.to_checkpoint();
    partial.remove("layers.1.bias");
    let e = p.load_checkpoint(&partial).unwrap_err().to_string();
    assert!(e.contains("layers.1.bias"), "{e}");
}

#[test]
fn linear_init_matches_torch_bounds() {
    let l = reuse_core::Linear::new(400, 300, true, Device::Cpu);
    let bound = 1.0 / 20.0;
    let wmax = l.weight.abs().max().double_value(&[]);
    assert!(
        wmax <= bound && wmax > 0.95 * bound,
        "weight max {wmax}, bound {bound}"
    );
    // uniform: variance bound^2/3
    let var = l.weight.var(true).double_value(&[]);
    assert!(
        (var - bound * bound / 3.0).abs() < 0.05 * bound * bound / 3.0,
        "{var}"
    );
    let bmax = l.bias.as_ref().unwrap().abs().max().double_value(&[]);
    assert!(bmax <= bound && bmax > 0.8 * bound);
}
