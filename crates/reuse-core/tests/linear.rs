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
        let unmerged = l.forward(&x, false);
        let expect = x.linear(&(&w0 + l.delta("d1").unwrap().delta_weight(&w0).unwrap()
            + l.delta("d2").unwrap().delta_weight(&w0).unwrap()), l.bias.as_ref());
        prop_assert!(max_diff(&unmerged, &expect) < 1e-4);
        l.merge("d1").unwrap();
        l.merge("d2").unwrap();
        prop_assert!(max_diff(&l.forward(&x, false), &unmerged) < 1e-4);
        l.unmerge("d2").unwrap();
        l.unmerge("d1").unwrap();
        prop_assert!(max_diff(&l.weight, &w0) < 1e-5);
        prop_assert!(max_diff(&l.forward(&x, false), &unmerged) < 1e-4);
    }
}

#[test]
fn active_set_removal_and_names() {
    let mut l = Linear::new(6, 4, false, Device::Cpu);
    let x = Tensor::randn([3, 6], (Kind::Float, Device::Cpu));
    let base = l.forward(&x, false);
    l.add_delta("a", low_rank(6, 4, 2)).unwrap();
    l.add_delta("b", low_rank(6, 4, 2)).unwrap();
    assert!(l.add_delta("a", low_rank(6, 4, 2)).is_err());
    let both = l.forward(&x, false);
    l.set_active(&["a"]);
    let only_a = l.forward(&x, false);
    l.set_active(&[]);
    assert!(max_diff(&l.forward(&x, false), &base) < 1e-6);
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
    assert!(max_diff(&l.forward(&x, false), &base) < 1e-5);
    let e = l.merge("zzz").unwrap_err().to_string();
    assert!(e.contains("zzz"), "{e}");
}

#[test]
fn merge_and_unload_gives_a_plain_layer() {
    let mut l = Linear::new(5, 3, true, Device::Cpu);
    l.add_delta("a", low_rank(5, 3, 2)).unwrap();
    let x = Tensor::randn([2, 5], (Kind::Float, Device::Cpu));
    let y = l.forward(&x, false);
    l.merge_and_unload().unwrap();
    assert!(l.delta_names().is_empty());
    assert!(max_diff(&l.forward_base(&x), &y) < 1e-5);
}
