//! Linear delta slots: forward, merge / unmerge, activation, removal.

use std::any::Any;

use proptest::prelude::*;
use reuse_core::{Linear, LinearDelta};
use tch::{Device, Kind, Tensor};

/// A fixed low-rank change `B A` (LoRA without scaling), for testing the slot mechanics.
struct LowRank {
    a: Tensor,
    b: Tensor,
}

impl LinearDelta for LowRank {
    fn forward(&self, x: &Tensor, _w: &Tensor, _base: &Tensor, _train: bool) -> Tensor {
        x.matmul(&self.a.tr()).matmul(&self.b.tr())
    }
    fn delta_weight(&self, _w: &Tensor) -> Option<Tensor> {
        Some(self.b.matmul(&self.a))
    }
    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        vec![
            ("A".into(), self.a.shallow_clone()),
            ("B".into(), self.b.shallow_clone()),
        ]
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

fn low_rank(i: i64, o: i64, r: i64) -> Box<LowRank> {
    let f = (Kind::Float, Device::Cpu);
    Box::new(LowRank {
        a: Tensor::randn([r, i], f) * 0.3,
        b: Tensor::randn([o, r], f) * 0.3,
    })
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]
    #[test]
    fn merge_unmerge_round_trip(i in 1i64..24, o in 1i64..24, r in 1i64..4, seed in 0i64..1000) {
        tch::manual_seed(seed);
        let mut l = Linear::new(i, o, true, Device::Cpu);
        let w0 = l.weight.detach().copy();
        l.add_delta("d1", low_rank(i, o, r)).unwrap();
        l.add_delta("d2", low_rank(i, o, r)).unwrap();
        let x = Tensor::randn([5, i], (Kind::Float, Device::Cpu));
        let unmerged = l.forward(&x, false).unwrap();
        let expect = x.linear(&(&w0 + l.delta("d1").unwrap().delta_weight(&w0).unwrap()
            + l.delta("d2").unwrap().delta_weight(&w0).unwrap()), l.bias.as_ref());
        prop_assert!(max_diff(&unmerged, &expect) < 1e-4);
        l.merge("d1").unwrap();
        l.merge("d2").unwrap();
        prop_assert!(max_diff(&l.forward(&x, false).unwrap(), &unmerged) < 1e-4);
        l.unmerge("d2").unwrap();
        l.unmerge("d1").unwrap();
        prop_assert!(max_diff(&l.weight, &w0) < 1e-5);
        prop_assert!(max_diff(&l.forward(&x, false).unwrap(), &unmerged) < 1e-4);
    }
}

#[test]
fn active_set_removal_and_names() {
    let mut l = Linear::new(6, 4, false, Device::Cpu);
    let x = Tensor::randn([3, 6], (Kind::Float, Device::Cpu));
    let base = l.forward(&x, false).unwrap();
    l.add_delta("a", low_rank(6, 4, 2)).unwrap();
    l.add_delta("b", low_rank(6, 4, 2)).unwrap();
    assert!(l.add_delta("a", low_rank(6, 4, 2)).is_err());
    let both = l.forward(&x, false).unwrap();
    l.set_active(&["a"]);
    let only_a = l.forward(&x, false).unwrap();
    l.set_active(&[]);
    assert!(max_diff(&l.forward(&x, false).unwrap(), &base) < 1e-6);
    l.set_active(&["a", "b"]);
    let db = &both - &only_a;
    let a_alone = &only_a - &base;
    assert!(
        db.abs().max().double_value(&[]) > 1e-3 && a_alone.abs().max().double_value(&[]) > 1e-3
    );
    let names: Vec<String> = l.named_parameters().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["weight", "a.A", "a.B", "b.A", "b.B"]);
    l.merge("a").unwrap();
    l.remove_delta("a").unwrap(); // unmerges first
    l.remove_delta("b").unwrap();
    assert!(max_diff(&l.forward(&x, false).unwrap(), &base) < 1e-5);
    let e = l.merge("zzz").unwrap_err().to_string();
    assert!(e.contains("zzz"), "{e}");
}

#[test]
fn merge_and_unload_gives_a_plain_layer() {
    let mut l = Linear::new(5, 3, true, Device::Cpu);
    l.add_delta("a", low_rank(5, 3, 2)).unwrap();
    let x = Tensor::randn([2, 5], (Kind::Float, Device::Cpu));
    let y = l.forward(&x, false).unwrap();
    l.merge_and_unload().unwrap();
    assert!(l.delta_names().is_empty());
    assert!(max_diff(&l.forward_base(&x).unwrap(), &y) < 1e-5);
}

/// Symmetric per-row int8 storage, written out here only to exercise the slot: the
/// quantization crate owns the real one.
struct RowInt8 {
    q: Tensor,
    scale: Tensor,
}

impl RowInt8 {
    fn new(w: &Tensor) -> Self {
        let scale = w.abs().amax([1i64].as_slice(), true) / 127.0;
        let q = (w / &scale).round().to_kind(Kind::Int8);
        Self { q, scale }
    }
}

impl reuse_core::WeightStorage for RowInt8 {
    fn shape(&self) -> [i64; 2] {
        let s = self.q.size();
        [s[0], s[1]]
    }
    fn dequantize(&self) -> Tensor {
        self.q.to_kind(Kind::Float) * &self.scale
    }
    fn named_buffers(&self) -> Vec<(String, Tensor)> {
        vec![
            ("weight".into(), self.q.shallow_clone()),
            ("weight_scale".into(), self.scale.shallow_clone()),
        ]
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[test]
fn stored_weights_compute_with_the_dequantized_weight_and_are_buffers() {
    tch::manual_seed(3);
    let mut l = Linear::new(16, 8, true, Device::Cpu);
    let x = Tensor::randn([5, 16], (Kind::Float, Device::Cpu));
    let st = RowInt8::new(&l.weight.detach());
    let w_deq = reuse_core::WeightStorage::dequantize(&st);
    let expect = x.linear(&w_deq, l.bias.as_ref());
    l.set_storage(Box::new(st)).unwrap();
    assert_eq!((l.in_features(), l.out_features()), (16, 8));
    assert!(max_diff(&l.forward(&x, false).unwrap(), &expect) < 1e-5);
    // The int8 values and scales are buffers, not trainable parameters.
    let names: Vec<String> = l.named_parameters().into_iter().map(|p| p.0).collect();
    assert_eq!(names, ["bias"]);
    let bufs: Vec<String> = l.named_buffers().into_iter().map(|p| p.0).collect();
    assert_eq!(bufs, ["weight", "weight_scale"]);
    // A delta on a stored weight adds its output; merging into storage is refused.
    l.add_delta("a", low_rank(16, 8, 2)).unwrap();
    let with = l.forward(&x, false).unwrap();
    assert!(max_diff(&with, &expect) > 1e-3);
    let e = l.merge("a").unwrap_err().to_string();
    assert!(e.contains("storage"), "{e}");
    // Densify gives the dequantized weight back as a plain dense layer.
    l.remove_delta("a").unwrap();
    l.densify(true).unwrap();
    assert!(max_diff(&l.weight.detach(), &w_deq) < 1e-7);
}

#[test]
fn weight_transform_masks_without_a_second_matmul() {
    tch::manual_seed(4);
    let mut l = Linear::new(6, 4, false, Device::Cpu);
    let x = Tensor::randn([3, 6], (Kind::Float, Device::Cpu));
    let mask = Tensor::from_slice(&[1.0f32, 0.0, 1.0, 0.0]).view([4, 1]);
    let m2 = mask.shallow_clone();
    l.set_weight_transform(Some(Box::new(move |w: &Tensor| w * &m2)));
    let y = l.forward(&x, false).unwrap();
    let expect = x.matmul(&(&l.weight * &mask).tr());
    assert!(max_diff(&y, &expect) < 1e-6);
    // masked rows give exactly zero
    assert_eq!(y.select(1, 1).abs().max().double_value(&[]), 0.0);
    l.set_weight_transform(None);
    assert!(max_diff(&l.forward(&x, false).unwrap(), &x.matmul(&l.weight.tr())) < 1e-6);
}

#[test]
fn wrong_inputs_and_routes_are_errors_not_panics() {
    let mut l = Linear::new(6, 4, true, Device::Cpu);
    let bad = Tensor::zeros([2, 5], (Kind::Float, Device::Cpu));
    let e = l.forward(&bad, false).unwrap_err().to_string();
    assert!(e.contains("in_features 6") && e.contains("[2, 5]"), "{e}");
    l.add_delta("a", low_rank(6, 4, 2)).unwrap();
    // Route sample 3 to `a`, then run a batch of 2.
    l.set_routing(Some(vec![("a".into(), Tensor::from_slice(&[0i64, 3]))]))
        .unwrap();
    let x = Tensor::zeros([2, 6], (Kind::Float, Device::Cpu));
    let e = l.forward(&x, false).unwrap_err().to_string();
    assert!(e.contains("index 3") && e.contains("2 samples"), "{e}");
    let e = l
        .set_routing(Some(vec![("a".into(), Tensor::from_slice(&[-1i64]))]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("negative"), "{e}");
}
