//! Quantizers against their definitions: round-to-nearest error bounds (proptest), the
//! int4 byte layout, GPTQ against round-to-nearest on the objective it minimises, the
//! storage inside core's `Linear`, and bad input.

use proptest::prelude::*;
use reuse_core::{Error, Linear, WeightStorage};
use reuse_quant::gptq::{self, GptqOptions, Hessian};
use reuse_quant::{QuantSpec, QuantizedWeight};
use tch::{Device, Kind, Tensor};

const CPU: Device = Device::Cpu;

fn specs() -> impl Strategy<Value = QuantSpec> {
    prop_oneof![
        Just(QuantSpec::int8()),
        Just(QuantSpec {
            bits: 8,
            group_size: Some(4),
            symmetric: true
        }),
        (prop_oneof![Just(2i64), Just(4), Just(8)], any::<bool>())
            .prop_map(|(g, sym)| QuantSpec::int4(g, sym)),
    ]
}

/// Each element's scale, `[out, in]`.
fn element_scale(q: &QuantizedWeight, inp: i64) -> Tensor {
    let s = q.scale();
    let groups = s.size()[1];
    s.repeat_interleave_self_int(inp / groups, 1, None)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Round-to-nearest: every weight within half its group's step of its value, and
    /// the codes in range.
    #[test]
    fn rtn_error_is_at_most_half_a_step(
        spec in specs(),
        out in 1i64..6,
        blocks in 1i64..5,
        seed in 0i64..1000,
        shift in -1.0f64..1.0,
    ) {
        tch::manual_seed(seed);
        let inp = 8 * blocks;
        // A shifted distribution, so asymmetric groups are not centred on 0.
        let w = Tensor::randn([out, inp], (Kind::Float, CPU)) + shift;
        let q = QuantizedWeight::quantize(&w, spec).unwrap();
        let err = (q.dequantize() - &w).abs();
        let bound = element_scale(&q, inp) * (0.5 + 1e-5);
        prop_assert!(bool::try_from(err.le_tensor(&bound).all()).unwrap(),
            "max error {} with spec {spec:?}", err.max().double_value(&[]));
        let codes = q.codes();
        let (lo, hi) = spec.code_range();
        prop_assert!(codes.min().double_value(&[]) >= lo && codes.max().double_value(&[]) <= hi);
    }
}

/// The int4 layout: byte j of a row holds the codes of inputs 2j (low nibble) and 2j+1
/// (high nibble); the value is (code - zero) * scale of its group. Checked with plain
/// integers, not through the crate's own unpacking.
#[test]
fn int4_bytes_hold_two_codes_and_values_follow_them() {
    tch::manual_seed(3);
    let w = Tensor::randn([3, 16], (Kind::Float, CPU)) + 0.3;
    for sym in [true, false] {
        let q = QuantizedWeight::quantize(&w, QuantSpec::int4(8, sym)).unwrap();
        let bytes: Vec<u8> = Vec::try_from(q.qweight().flatten(0, -1)).unwrap();
        let scale: Vec<f32> = Vec::try_from(q.scale().flatten(0, -1)).unwrap();
        let zero: Vec<u8> = match q.zero() {
            Some(z) => Vec::try_from(z.flatten(0, -1)).unwrap(),
            None => vec![8; 6],
        };
        let deq: Vec<f32> = Vec::try_from(q.dequantize().flatten(0, -1)).unwrap();
        let orig: Vec<f32> = Vec::try_from(w.flatten(0, -1)).unwrap();
        assert_eq!(bytes.len(), 3 * 8);
        for r in 0..3 {
            for c in 0..16 {
                let b = bytes[r * 8 + c / 2];
                let code = if c % 2 == 0 { b & 15 } else { b >> 4 };
                let g = r * 2 + c / 8;
                let value = (code as f32 - zero[g] as f32) * scale[g];
                assert_eq!(deq[r * 16 + c], value, "row {r} col {c} sym {sym}");
                assert!((value - orig[r * 16 + c]).abs() <= scale[g] / 2.0 + 1e-6);
            }
        }
        // Symmetric: the scale is the group's max |w| / 7.
        if sym {
            let amax = w.narrow(1, 0, 8).abs().amax([1].as_slice(), false);
            let s0 = q.scale().select(1, 0);
            assert!((s0 - amax / 7.0).abs().max().double_value(&[]) < 1e-7);
        }
    }
}

/// Per-channel int8 as REFERENCE.md defines it: scale = max |w_row| / 127, codes =
/// round(w / scale), one scale per row; the file shape of the scale is `[out]`.
#[test]
fn int8_per_channel_matches_its_formula() {
    tch::manual_seed(4);
    let w = Tensor::randn([5, 24], (Kind::Float, CPU));
    let q = QuantizedWeight::quantize(&w, QuantSpec::int8()).unwrap();
    let scale = w.abs().amax([1].as_slice(), true) / 127.0;
    let codes = (&w / &scale).round();
    assert_eq!(q.qweight().kind(), Kind::Int8);
    assert!(
        (q.codes().to_kind(Kind::Float) - &codes)
            .abs()
            .max()
            .double_value(&[])
            == 0.0
    );
    assert!(
        (q.dequantize() - codes * &scale)
            .abs()
            .max()
            .double_value(&[])
            < 1e-7
    );
    let buffers = q.named_buffers();
    let names: Vec<_> = buffers.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["weight", "weight_scale"]);
    assert_eq!(buffers[1].1.size(), [5]);
    assert_eq!(q.nbytes(), 5 * 24 + 5 * 4);
}

/// Inputs whose features are correlated (as real activations are), so that the
/// Hessian is far from diagonal and compensation has something to do.
fn correlated_inputs(n: i64, inp: i64, seed: i64) -> Tensor {
    tch::manual_seed(seed);
    let z = Tensor::randn([n, inp], (Kind::Float, CPU));
    let mix = Tensor::randn([inp, inp], (Kind::Float, CPU)) / (inp as f64).sqrt();
    let scales = Tensor::linspace(0.1, 3.0, inp, (Kind::Float, CPU));
    z.mm(&mix) * scales
}

/// GPTQ lowers the layer-output error it minimises, tr((W-Q) H (W-Q)^T), well below
/// round-to-nearest's with the same grid settings, in every mode.
#[test]
fn gptq_beats_round_to_nearest_on_the_output_error() {
    let (out, inp) = (48, 128);
    tch::manual_seed(11);
    let w = Tensor::randn([out, inp], (Kind::Float, CPU)) * 0.05;
    let x = correlated_inputs(2048, inp, 12);
    let mut h = Hessian::new(inp, CPU);
    h.add(&x.narrow(0, 0, 1000)).unwrap();
    h.add(&x.narrow(0, 1000, 1048)).unwrap();
    assert_eq!(h.rows(), 2048);
    let hm = h.matrix();
    let direct = x.tr().mm(&x) * (2.0 / 2048.0);
    assert!((&hm - direct).abs().max().double_value(&[]) < 1e-3);
    for spec in [
        QuantSpec::int8(),
        QuantSpec::int4(32, false),
        QuantSpec::int4(64, true),
    ] {
        let rtn = QuantizedWeight::quantize(&w, spec).unwrap().dequantize();
        let e_rtn = gptq::output_error(&w, &rtn, &hm);
        for act_order in [false, true] {
            let opts = GptqOptions {
                act_order,
                block_size: 32,
                ..Default::default()
            };
            let q = gptq::quantize("w", &w, &hm, spec, &opts).unwrap();
            let e = gptq::output_error(&w, &q.dequantize(), &hm);
            // Activation order goes from the most to the least active inputs; here it
            // matters (GPTQ's paper: it helps most where activations vary most).
            let bound = if act_order { 0.5 } else { 0.85 };
            assert!(
                e < bound * e_rtn,
                "{spec:?} act_order {act_order}: GPTQ {e:.4e} vs RTN {e_rtn:.4e}"
            );
            let (lo, hi) = spec.code_range();
            let c = q.codes();
            assert!(c.min().double_value(&[]) >= lo && c.max().double_value(&[]) <= hi);
        }
    }
}

/// Against `fixtures/quant/reference.safetensors` (`make_reference.py`: round-to-nearest
/// and GPTQ written out in plain PyTorch from the formulas, independently of this
/// crate): round-to-nearest to float precision; GPTQ's codes nearly all equal (the
/// reference runs in f64, this crate in f32, so a code on a rounding boundary may flip)
/// and its output error within 1%.
#[test]
fn matches_the_pytorch_reference() {
    let ck = reuse_core::Checkpoint::load(
        reuse_testkit::fixtures_dir().join("quant/reference.safetensors"),
        CPU,
    )
    .unwrap();
    let t = |n: &str| ck.tensor(n).unwrap().shallow_clone();
    let (w, h) = (t("w"), t("h"));
    let diff = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
    let q8 = QuantizedWeight::quantize(&w, QuantSpec::int8()).unwrap();
    assert!(diff(&q8.dequantize(), &t("rtn_int8")) < 1e-7);
    let q4 = QuantizedWeight::quantize(&w, QuantSpec::int4(16, false)).unwrap();
    assert!(diff(&q4.dequantize(), &t("rtn_int4_g16")) < 1e-7);
    let opts = GptqOptions {
        block_size: 32,
        ..Default::default()
    };
    let g4 = gptq::quantize("w", &w, &h, QuantSpec::int4(16, false), &opts).unwrap();
    let ours = g4.dequantize();
    let reference = t("gptq_int4_g16");
    let same = (&ours - &reference)
        .abs()
        .le(1e-5)
        .to_kind(Kind::Float)
        .mean(Kind::Float)
        .double_value(&[]);
    assert!(same > 0.99, "only {same} of the GPTQ values agree");
    let (e, e_ref) = (
        gptq::output_error(&w, &ours, &h),
        gptq::output_error(&w, &reference, &h),
    );
    assert!(
        (e / e_ref - 1.0).abs() < 0.01,
        "output error {e} vs reference {e_ref}"
    );
    // And the reference's own point: GPTQ below round-to-nearest.
    assert!(e_ref < gptq::output_error(&w, &t("rtn_int4_g16"), &h));
}

/// An input never active in the calibration data gets a zero weight column (its codes
/// stand for 0), as GPTQ does.
#[test]
fn gptq_zeroes_dead_inputs() {
    let (out, inp) = (8, 32);
    tch::manual_seed(5);
    let w = Tensor::randn([out, inp], (Kind::Float, CPU));
    let x = correlated_inputs(256, inp, 6);
    let _ = x.narrow(1, 3, 1).fill_(0.0);
    let mut h = Hessian::new(inp, CPU);
    h.add(&x).unwrap();
    let q = gptq::quantize(
        "w",
        &w,
        &h.matrix(),
        QuantSpec::int4(16, false),
        &Default::default(),
    )
    .unwrap();
    let col = q.dequantize().narrow(1, 3, 1);
    assert_eq!(col.abs().max().double_value(&[]), 0.0);
}

/// The storage inside core's `Linear`: the forward is x W_q^T + b of the dequantized
/// weight, cached or not, and the layer's buffers are the quantized tensors.
#[test]
fn quantized_storage_drives_a_linear() {
    tch::manual_seed(8);
    let mut lin = Linear::new(64, 16, true, CPU);
    let x = Tensor::randn([4, 7, 64], (Kind::Float, CPU));
    let w = lin.weight.detach().copy();
    let b = lin.bias.as_ref().unwrap().detach().copy();
    for cached in [false, true] {
        let mut q = QuantizedWeight::quantize(&w, QuantSpec::int4(32, false)).unwrap();
        if cached {
            q = q.cached();
        }
        let deq = q.dequantize();
        let mut l = Linear::from_tensors(w.copy(), Some(b.copy())).unwrap();
        l.set_storage(Box::new(q)).unwrap();
        let y = l.forward(&x, false).unwrap();
        let expect = x.matmul(&deq.tr()) + &b;
        assert!((&y - &expect).abs().max().double_value(&[]) < 1e-5);
        let names: Vec<_> = l.named_buffers().into_iter().map(|(n, _)| n).collect();
        assert!(names.contains(&"weight_scale".to_string()), "{names:?}");
        assert!(names.contains(&"weight_zero".to_string()), "{names:?}");
        // The quantized layer is close to the dense one.
        let dense = x.matmul(&w.tr()) + &b;
        let rel = (&y - &dense).norm().double_value(&[]) / dense.norm().double_value(&[]);
        assert!(rel < 0.1, "relative output error {rel}");
    }
    lin.set_storage(Box::new(
        QuantizedWeight::quantize(&w, QuantSpec::int8()).unwrap(),
    ))
    .unwrap();
    assert_eq!(lin.shape(), [16, 64]);
}

/// Bad settings and bad tensors are errors that name the weight, what was expected and
/// what was found.
#[test]
fn bad_input_is_a_clear_error() {
    let w = Tensor::randn([4, 96], (Kind::Float, CPU));
    let e = QuantizedWeight::quantize(&w, QuantSpec::int4(64, false)).unwrap_err();
    assert!(
        e.to_string()
            .contains("group size 64 does not divide the input dimension 96"),
        "{e}"
    );
    let odd = Tensor::randn([4, 7], (Kind::Float, CPU));
    let spec = QuantSpec {
        bits: 4,
        group_size: None,
        symmetric: true,
    };
    let e = QuantizedWeight::quantize(&odd, spec).unwrap_err();
    assert!(e.to_string().contains("must be even"), "{e}");
    let e = QuantizedWeight::quantize(
        &w,
        QuantSpec {
            bits: 3,
            ..QuantSpec::int8()
        },
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("bits must be 8 or 4, found 3"),
        "{e}"
    );
    let e = QuantizedWeight::quantize(&w.to_kind(Kind::Int64), QuantSpec::int8()).unwrap_err();
    assert!(e.to_string().contains("2-D float"), "{e}");

    let good = QuantizedWeight::quantize(&w, QuantSpec::int4(32, false)).unwrap();
    let spec = *good.spec();
    // Missing zero points.
    let e = QuantizedWeight::from_buffers(
        "encoder.layer.0.attention.self.query.weight",
        spec,
        [4, 96],
        good.qweight().copy(),
        good.scale().copy(),
        None,
    )
    .unwrap_err();
    assert!(matches!(e, Error::MissingTensor { .. }), "{e}");
    assert!(e.to_string().contains("query.weight_zero"), "{e}");
    // Scales of the wrong shape and codes of the wrong dtype.
    let e = QuantizedWeight::from_buffers(
        "q.weight",
        spec,
        [4, 96],
        good.qweight().copy(),
        good.scale().narrow(1, 0, 2).copy(),
        good.zero().map(Tensor::copy),
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("tensor `q.weight_scale` has shape [4, 2], expected [4, 3]"),
        "{e}"
    );
    let e = QuantizedWeight::from_buffers(
        "q.weight",
        spec,
        [4, 96],
        good.qweight().to_kind(Kind::Int8),
        good.scale().copy(),
        good.zero().map(Tensor::copy),
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("`q.weight` has dtype Int8, expected Uint8"),
        "{e}"
    );
    // A good set round-trips to the same weight.
    let back = QuantizedWeight::from_buffers(
        "q.weight",
        spec,
        [4, 96],
        good.qweight().copy(),
        good.scale().copy(),
        good.zero().map(Tensor::copy),
    )
    .unwrap();
    assert_eq!(
        (back.dequantize() - good.dequantize())
            .abs()
            .max()
            .double_value(&[]),
        0.0
    );
    // A Hessian of the wrong size.
    let e = gptq::quantize(
        "q.weight",
        &w,
        &Tensor::eye(10, (Kind::Float, CPU)),
        QuantSpec::int8(),
        &Default::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("q.weight Hessian"), "{e}");
}

/// A fixed weight change, as a merged LoRA would add.
struct Fixed(Tensor);

impl reuse_core::LinearDelta for Fixed {
    fn forward(&self, x: &Tensor, _: &Tensor, _: &Tensor, _: bool) -> Tensor {
        x.matmul(&self.0.tr())
    }
    fn delta_weight(&self, _: &Tensor) -> Option<Tensor> {
        Some(self.0.shallow_clone())
    }
    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        Vec::new()
    }
    fn needs_base_out(&self) -> bool {
        false
    }
    fn needs_base_weight(&self) -> bool {
        false
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

/// Merging a delta into an int4 base: before, the layer computes dequantized base +
/// delta exactly; after, the requantized sum, within half a step of it, and the
/// reported error is that distance.
#[test]
fn merging_into_a_quantized_base_requantizes_and_reports_the_error() {
    use reuse_quant::model::merge_requantize;
    tch::manual_seed(21);
    let mut mlp = reuse_core::Mlp::new(&[32, 16, 4], reuse_core::Activation::Relu, CPU).unwrap();
    let spec = QuantSpec::int4(16, false);
    reuse_quant::model::quantize_model(&mut mlp, spec, &reuse_quant::model::Method::Rtn, &|_| true)
        .unwrap();
    let x = Tensor::randn([5, 32], (Kind::Float, CPU));
    let mut bases = Vec::new();
    use reuse_core::Model;
    mlp.visit_linears(&mut |_, l| {
        let dw = Tensor::randn(l.shape().to_vec(), (Kind::Float, CPU)) * 0.01;
        bases.push((l.storage().unwrap().dequantize(), dw.copy()));
        l.add_delta("lora", Box::new(Fixed(dw))).unwrap();
    });
    let before = mlp.forward(&x, false).unwrap();
    let report = merge_requantize(&mut mlp, "lora").unwrap();
    assert_eq!(report.layers, 2);
    let mut i = 0;
    let mut max = 0f64;
    mlp.visit_linears(&mut |_, l| {
        assert!(l.delta("lora").is_none(), "the delta is merged away");
        let s = l.storage().expect("still quantized");
        let q = s.as_any().downcast_ref::<QuantizedWeight>().unwrap();
        let (base, dw) = &bases[i];
        let merged = base + dw;
        let d = (q.dequantize() - &merged).abs();
        let step = q.scale().repeat_interleave_self_int(16, 1, None);
        assert!(bool::try_from(d.le_tensor(&(step * 0.50001)).all()).unwrap());
        max = max.max(d.max().double_value(&[]));
        i += 1;
    });
    assert!(
        (report.max_abs - max).abs() < 1e-7,
        "{} vs {max}",
        report.max_abs
    );
    assert!(report.relative > 0.0 && report.relative < 0.2, "{report:?}");
    let after = mlp.forward(&x, false).unwrap();
    let rel = (&after - &before).norm().double_value(&[]) / before.norm().double_value(&[]);
    assert!(rel > 0.0 && rel < 0.2, "output moved by {rel}");
    assert!(
        merge_requantize(&mut mlp, "lora").is_err(),
        "nothing left to merge"
    );
}

/// The training path (`x` needs a gradient, no cache) goes through the C++ autograd
/// function that rebuilds W in backward: the same output and the same gradient of `x` as
/// plain autograd on the dequantized weight, for int8 and for int4 with and without zero
/// points; the quantized tensors get no gradient.
#[test]
fn recomputing_matmul_gives_plain_autogrades_output_and_input_gradient() {
    tch::manual_seed(11);
    for spec in [
        QuantSpec::int8(),
        QuantSpec::int4(8, false),
        QuantSpec::int4(16, true),
    ] {
        let w = Tensor::randn([24, 32], (Kind::Float, CPU));
        let q = QuantizedWeight::quantize(&w, spec).unwrap();
        let x0 = Tensor::randn([3, 5, 32], (Kind::Float, CPU));
        let r = Tensor::randn([3, 5, 24], (Kind::Float, CPU));

        let x = x0.copy().set_requires_grad(true);
        let y = q.matmul(&x);
        (&y * &r).sum(Kind::Float).backward();
        let gx = x.grad();

        let x_ref = x0.copy().set_requires_grad(true);
        let y_ref = x_ref.matmul(&q.dequantize().tr());
        (&y_ref * &r).sum(Kind::Float).backward();
        let gx_ref = x_ref.grad();

        let dy = (&y - &y_ref).abs().max().double_value(&[]);
        let dg = (&gx - &gx_ref).abs().max().double_value(&[]);
        assert!(dy < 1e-5, "{spec:?}: output differs by {dy}");
        assert!(dg < 1e-5, "{spec:?}: input gradient differs by {dg}");
        assert!(gx.abs().sum(Kind::Float).double_value(&[]) > 0.0);
        // Analytic: d/dx sum(r * x W^T) = r W.
        let by_hand = r.matmul(&q.dequantize());
        assert!((&gx - &by_hand).abs().max().double_value(&[]) < 1e-5);
        for (_, t) in q.named_buffers() {
            assert!(!t.requires_grad());
        }
        // A second backward through a fresh graph works (nothing was freed for good).
        let x2 = x0.copy().set_requires_grad(true);
        q.matmul(&x2).sum(Kind::Float).backward();
        assert!(x2.grad().defined());
    }
}
