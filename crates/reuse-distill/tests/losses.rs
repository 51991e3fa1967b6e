//! The distillation losses against an independent PyTorch reference
//! (`fixtures/distill/make_losses_reference.py`, run with the `.venv` python), plus
//! checks by hand: zero at equality, the T^2 switch, masks, top-k with k = vocab,
//! gradients reaching the student only, and the error messages.

use reuse_core::{Checkpoint, Linear};
use reuse_distill::features::{
    attention_kl, attention_mse, cosine_loss, hidden_mse, split_heads, value_relation_kl, LayerMap,
    Projection,
};
use reuse_distill::losses::{
    cross_entropy_loss, kd_ce_loss, kd_loss, topk_kd_loss, Divergence, KdConfig, TopKTail,
};
use tch::{Device, Kind, Tensor};

fn reference() -> Checkpoint {
    Checkpoint::load(
        reuse_testkit::fixtures_dir().join("distill/losses_reference.safetensors"),
        Device::Cpu,
    )
    .unwrap()
}

fn input(r: &Checkpoint, name: &str) -> Tensor {
    r.tensor(&format!("in.{name}")).unwrap().shallow_clone()
}

fn expected(r: &Checkpoint, name: &str) -> f64 {
    r.tensor(&format!("out.{name}")).unwrap().double_value(&[0])
}

fn value(t: reuse_core::Result<Tensor>) -> f64 {
    let t = t.unwrap();
    assert_eq!(t.size(), Vec::<i64>::new(), "a loss is a scalar");
    t.double_value(&[])
}

#[track_caller]
fn close(name: &str, got: f64, want: f64, tol: f64) {
    assert!(
        (got - want).abs() <= tol * want.abs().max(1.0),
        "{name}: got {got}, reference {want}, |diff| {}",
        (got - want).abs()
    );
}

const TOL: f64 = 1e-5;

fn jsd(beta: f64) -> Divergence {
    Divergence::Jsd { beta }
}

#[test]
fn logit_losses_match_pytorch() {
    let r = reference();
    let (s2, t2, y2, m2) = (
        input(&r, "s2"),
        input(&r, "t2"),
        input(&r, "y2"),
        input(&r, "m2"),
    );
    let (s3, t3, y3, m3) = (
        input(&r, "s3"),
        input(&r, "t3"),
        input(&r, "y3"),
        input(&r, "m3"),
    );
    let kd = KdConfig::new;
    let cases: Vec<(&str, f64)> = vec![
        ("kd_fkl_2d_T2", value(kd_loss(&s2, &t2, None, &kd(2.0)))),
        (
            "kd_fkl_2d_T2_mask",
            value(kd_loss(&s2, &t2, Some(&m2), &kd(2.0))),
        ),
        (
            "kd_fkl_2d_T3_not2",
            value(kd_loss(&s2, &t2, None, &kd(3.0).with_t_squared(false))),
        ),
        (
            "kd_fkl_3d_T2_mask",
            value(kd_loss(&s3, &t3, Some(&m3), &kd(2.0))),
        ),
        ("kd_fkl_3d_T1", value(kd_loss(&s3, &t3, None, &kd(1.0)))),
        (
            "kd_rkl_3d_T2_mask",
            value(kd_loss(
                &s3,
                &t3,
                Some(&m3),
                &kd(2.0).with_divergence(Divergence::ReverseKl),
            )),
        ),
        (
            "kd_rkl_2d_T1",
            value(kd_loss(
                &s2,
                &t2,
                None,
                &kd(1.0).with_divergence(Divergence::ReverseKl),
            )),
        ),
        (
            "kd_jsd03_3d_T2_mask",
            value(kd_loss(
                &s3,
                &t3,
                Some(&m3),
                &kd(2.0).with_divergence(jsd(0.3)),
            )),
        ),
        (
            "kd_jsd07_2d_T1_not2",
            value(kd_loss(
                &s2,
                &t2,
                None,
                &kd(1.0).with_divergence(jsd(0.7)).with_t_squared(false),
            )),
        ),
        ("ce_2d", value(cross_entropy_loss(&s2, &y2, None))),
        ("ce_3d_mask", value(cross_entropy_loss(&s3, &y3, Some(&m3)))),
        (
            "kd_ce_3d_a04_T2_mask",
            value(kd_ce_loss(&s3, &t3, &y3, Some(&m3), 0.4, &kd(2.0))),
        ),
    ];
    for (name, got) in cases {
        close(name, got, expected(&r, name), TOL);
    }
}

#[test]
fn topk_losses_match_pytorch() {
    let r = reference();
    let (s3, m3) = (input(&r, "s3"), input(&r, "m3"));
    let (v, i) = (input(&r, "topk_values"), input(&r, "topk_indices"));
    assert_eq!(v.kind(), Kind::Half, "the cache is f16");
    let kd = KdConfig::new;
    let cases: Vec<(&str, f64)> = vec![
        (
            "topk_renorm_T2_mask",
            value(topk_kd_loss(
                &s3,
                &v,
                &i,
                Some(&m3),
                &kd(2.0),
                TopKTail::Renormalize,
            )),
        ),
        (
            "topk_renorm_T1",
            value(topk_kd_loss(
                &s3,
                &v,
                &i,
                None,
                &kd(1.0),
                TopKTail::default(),
            )),
        ),
        (
            "topk_rest_fkl_T2_mask",
            value(topk_kd_loss(
                &s3,
                &v,
                &i,
                Some(&m3),
                &kd(2.0),
                TopKTail::RestBucket,
            )),
        ),
        (
            "topk_rest_rkl_T1_mask",
            value(topk_kd_loss(
                &s3,
                &v,
                &i,
                Some(&m3),
                &kd(1.0).with_divergence(Divergence::ReverseKl),
                TopKTail::RestBucket,
            )),
        ),
        (
            "topk_rest_jsd05_T15_mask",
            value(topk_kd_loss(
                &s3,
                &v,
                &i,
                Some(&m3),
                &kd(1.5).with_divergence(jsd(0.5)),
                TopKTail::RestBucket,
            )),
        ),
    ];
    for (name, got) in cases {
        close(name, got, expected(&r, name), TOL);
    }
}

#[test]
fn feature_losses_match_pytorch() {
    let r = reference();
    let m3 = input(&r, "m3");
    let (hs, ht, ht6) = (input(&r, "hs"), input(&r, "ht"), input(&r, "ht6"));
    let proj = Projection::from_linear(
        Linear::from_tensors(input(&r, "proj_weight"), Some(input(&r, "proj_bias"))).unwrap(),
    );
    assert_eq!((proj.student_dim(), proj.teacher_dim()), (6, 8));
    let (a_s, a_t) = (input(&r, "att_s"), input(&r, "att_t"));
    let (v_s, v_t) = (input(&r, "val_s"), input(&r, "val_t"));
    let cases: Vec<(&str, f64)> = vec![
        (
            "hidden_mse_proj_mask",
            value(hidden_mse(&hs, &ht, Some(&m3), Some(&proj))),
        ),
        (
            "hidden_mse_proj",
            value(hidden_mse(&hs, &ht, None, Some(&proj))),
        ),
        (
            "hidden_mse_mask",
            value(hidden_mse(&hs, &ht6, Some(&m3), None)),
        ),
        (
            "cosine_mask",
            value(cosine_loss(&hs, &ht6, Some(&m3), None)),
        ),
        ("cosine", value(cosine_loss(&hs, &ht6, None, None))),
        ("att_mse_mask", value(attention_mse(&a_s, &a_t, Some(&m3)))),
        ("att_mse", value(attention_mse(&a_s, &a_t, None))),
        ("att_kl_mask", value(attention_kl(&a_s, &a_t, Some(&m3)))),
        (
            "value_kl_mask",
            value(value_relation_kl(&v_s, &v_t, Some(&m3))),
        ),
        ("value_kl", value(value_relation_kl(&v_s, &v_t, None))),
    ];
    for (name, got) in cases {
        close(name, got, expected(&r, name), TOL);
    }
}

fn randn(shape: &[i64]) -> Tensor {
    Tensor::randn(shape, (Kind::Float, Device::Cpu)) * 2.0
}

fn divergences() -> [Divergence; 4] {
    [
        Divergence::ForwardKl,
        Divergence::ReverseKl,
        jsd(0.1),
        jsd(0.9),
    ]
}

#[test]
fn identical_logits_give_zero() {
    tch::manual_seed(1);
    for shape in [&[5i64, 9][..], &[2, 4, 13]] {
        let z = randn(shape);
        for d in divergences() {
            let l = value(kd_loss(
                &z,
                &z,
                None,
                &KdConfig::new(3.0).with_divergence(d),
            ));
            assert!(l.abs() < 1e-6, "{d:?} on {shape:?}: {l}");
        }
    }
    // Also through a top-k cache of the same model, and for the feature losses.
    let z = randn(&[3, 10]);
    let (v, i) = z.log_softmax(-1, Kind::Float).topk(4, -1, true, true);
    for tail in [TopKTail::Renormalize, TopKTail::RestBucket] {
        let l = value(topk_kd_loss(&z, &v, &i, None, &KdConfig::new(2.0), tail));
        // Renormalize still pushes mass onto the kept classes, so it is 0 only when they
        // hold it all; the rest bucket is an exact comparison.
        if tail == TopKTail::RestBucket {
            assert!(l.abs() < 1e-6, "{tail:?}: {l}");
        } else {
            assert!(l > 0.0);
        }
    }
    let h = randn(&[2, 5, 8]);
    assert!(value(hidden_mse(&h, &h, None, None)).abs() < 1e-7);
    assert!(value(cosine_loss(&h, &h, None, None)).abs() < 1e-6);
    let a = randn(&[2, 4, 5, 5]).softmax(-1, Kind::Float);
    assert!(value(attention_mse(&a, &a, None)).abs() < 1e-7);
    assert!(value(attention_kl(&a, &a, None)).abs() < 1e-6);
    let v = randn(&[2, 4, 5, 3]);
    assert!(value(value_relation_kl(&v, &v, None)).abs() < 1e-6);
}

#[test]
fn t_squared_switch_scales_by_t_squared() {
    tch::manual_seed(2);
    let (s, t) = (randn(&[4, 6, 11]), randn(&[4, 6, 11]));
    let mask = randn(&[4, 6]).gt(-0.5);
    for temp in [0.5, 2.0, 4.0] {
        for d in divergences() {
            let cfg = KdConfig::new(temp).with_divergence(d);
            let on = value(kd_loss(&s, &t, Some(&mask), &cfg));
            let off = value(kd_loss(&s, &t, Some(&mask), &cfg.with_t_squared(false)));
            close(&format!("T={temp} {d:?}"), on, off * temp * temp, 1e-6);
        }
    }
}

#[test]
fn masked_positions_change_nothing() {
    tch::manual_seed(3);
    let (s, t) = (randn(&[2, 5, 7]), randn(&[2, 5, 7]));
    let mask = Tensor::from_slice(&[1u8, 1, 1, 0, 0, 1, 0, 1, 1, 0]).view([2, 5]);
    let keep = mask.to_kind(Kind::Bool).unsqueeze(-1);
    // Masked positions rewritten with garbage, NaN included.
    let garbage = |x: &Tensor| x.where_self(&keep, &x.full_like(f64::NAN));
    let labels = Tensor::from_slice(&[1i64, 2, 3, -100, -100, 4, -100, 5, 6, -100]).view([2, 5]);
    let loss_and_grad = |s: &Tensor, t: &Tensor, cfg: &KdConfig| {
        let s = s.detach().set_requires_grad(true);
        let l = kd_ce_loss(&s, t, &labels, Some(&mask), 0.3, cfg).unwrap();
        l.backward();
        (l.double_value(&[]), s.grad())
    };
    for d in divergences() {
        let cfg = KdConfig::new(2.0).with_divergence(d);
        let (l0, g0) = loss_and_grad(&s, &t, &cfg);
        let (l1, g1) = loss_and_grad(&garbage(&s), &garbage(&t), &cfg);
        assert!(l0.is_finite());
        assert_eq!(l0, l1, "{d:?}");
        assert!(
            g1.isfinite().all().int64_value(&[]) == 1,
            "{d:?}: NaN gradient"
        );
        assert!(g0.allclose(&g1, 0.0, 0.0, false), "{d:?}: gradients differ");
        let masked_grad = g1
            .where_scalarother(&keep.logical_not(), 0.0)
            .abs()
            .sum(None);
        assert_eq!(masked_grad.double_value(&[]), 0.0);
    }
    // The same mask as a float tensor or a bool tensor.
    let cfg = KdConfig::default();
    let a = value(kd_loss(&s, &t, Some(&mask), &cfg));
    close(
        "f32 mask",
        value(kd_loss(&s, &t, Some(&mask.to_kind(Kind::Float)), &cfg)),
        a,
        0.0,
    );
    close(
        "bool mask",
        value(kd_loss(&s, &t, Some(&mask.to_kind(Kind::Bool)), &cfg)),
        a,
        0.0,
    );
    // A mask that keeps nothing gives 0, not NaN.
    let none = Tensor::zeros([2, 5], (Kind::Bool, Device::Cpu));
    assert_eq!(value(kd_loss(&s, &t, Some(&none), &cfg)), 0.0);

    // Top-k: garbage indices and values at masked positions.
    let (v, i) = t.log_softmax(-1, Kind::Float).topk(3, -1, true, true);
    let i_bad = i.where_self(&keep, &i.full_like(999));
    let v_bad = v.where_self(&keep, &v.full_like(f64::NAN));
    for tail in [TopKTail::Renormalize, TopKTail::RestBucket] {
        let a = value(topk_kd_loss(&s, &v, &i, Some(&mask), &cfg, tail));
        let b = value(topk_kd_loss(
            &garbage(&s),
            &v_bad,
            &i_bad,
            Some(&mask),
            &cfg,
            tail,
        ));
        assert_eq!(a, b, "{tail:?}");
    }

    // Feature losses.
    let (hs, ht) = (randn(&[2, 5, 7]), randn(&[2, 5, 7]));
    let proj = Projection::new(7, 7, Device::Cpu).unwrap();
    for f in [hidden_mse, cosine_loss] {
        for p in [None, Some(&proj)] {
            let a = value(f(&hs, &ht, Some(&mask), p));
            let b = value(f(&garbage(&hs), &garbage(&ht), Some(&mask), p));
            assert_eq!(a, b);
        }
    }
    let pair = mask.to_kind(Kind::Bool);
    let pair = (pair.unsqueeze(-1).logical_and(&pair.unsqueeze(1))).unsqueeze(1); // [2,1,5,5]
    let att = |scale: f64| {
        (randn(&[2, 3, 5, 5]) * scale)
            .masked_fill(&mask.eq(0).view([2, 1, 1, 5]), f64::NEG_INFINITY)
            .softmax(-1, Kind::Float)
    };
    let (a_s, a_t) = (att(1.0), att(2.0));
    let junk = |a: &Tensor| a.where_self(&pair, &a.full_like(f64::NAN));
    for f in [attention_mse, attention_kl] {
        let s = a_s.detach().set_requires_grad(true);
        let a = f(&s, &a_t, Some(&mask)).unwrap();
        a.backward();
        let s2 = junk(&a_s).detach().set_requires_grad(true);
        let b = f(&s2, &junk(&a_t), Some(&mask)).unwrap();
        b.backward();
        assert_eq!(a.double_value(&[]), b.double_value(&[]));
        assert!(s.grad().allclose(&s2.grad(), 0.0, 0.0, false));
    }
    let (v_s, v_t) = (randn(&[2, 3, 5, 4]), randn(&[2, 3, 5, 6]));
    let rows = mask.to_kind(Kind::Bool).view([2, 1, 5, 1]);
    let junk_v = |v: &Tensor| v.where_self(&rows, &v.full_like(f64::NAN));
    let a = value(value_relation_kl(&v_s, &v_t, Some(&mask)));
    let b = value(value_relation_kl(&junk_v(&v_s), &junk_v(&v_t), Some(&mask)));
    assert_eq!(a, b);
}

#[test]
fn topk_with_full_vocab_is_full_kd() {
    tch::manual_seed(4);
    let (s, t) = (randn(&[3, 4, 17]), randn(&[3, 4, 17]) * 2.0);
    let mask = randn(&[3, 4]).gt(-0.3);
    let (v, i) = t.log_softmax(-1, Kind::Float).topk(17, -1, true, true);
    for temp in [1.0, 2.0, 0.7] {
        for m in [None, Some(&mask)] {
            let cfg = KdConfig::new(temp);
            let full = value(kd_loss(&s, &t, m, &cfg));
            let sparse = value(topk_kd_loss(&s, &v, &i, m, &cfg, TopKTail::Renormalize));
            assert!(
                (full - sparse).abs() <= 1e-6,
                "T={temp}: {full} vs {sparse}"
            );
        }
    }
    // Unsorted indices (a cache may store any order) give the same.
    let perm = Tensor::randperm(17, (Kind::Int64, Device::Cpu));
    let cfg = KdConfig::new(2.0);
    let a = value(topk_kd_loss(&s, &v, &i, None, &cfg, TopKTail::Renormalize));
    let b = value(topk_kd_loss(
        &s,
        &v.index_select(-1, &perm),
        &i.index_select(-1, &perm),
        None,
        &cfg,
        TopKTail::Renormalize,
    ));
    assert!((a - b).abs() <= 1e-6);
    // The rest bucket holds no mass with k = vocab: every divergence equals the full
    // one (in f64, where the teacher's rounding leaves no visible rest).
    let (s, t) = (s.to_kind(Kind::Double), t.to_kind(Kind::Double));
    let (v, i) = t.log_softmax(-1, Kind::Double).topk(17, -1, true, true);
    for d in divergences() {
        let cfg = KdConfig::new(1.0).with_divergence(d);
        let full = value(kd_loss(&s, &t, Some(&mask), &cfg));
        let sparse = value(topk_kd_loss(
            &s,
            &v,
            &i,
            Some(&mask),
            &cfg,
            TopKTail::RestBucket,
        ));
        assert!((full - sparse).abs() <= 1e-9, "{d:?}: {full} vs {sparse}");
    }
}

#[test]
fn gradients_reach_the_student_only() {
    tch::manual_seed(5);
    let s = randn(&[4, 9]).set_requires_grad(true);
    let t = randn(&[4, 9]).set_requires_grad(true);
    let labels = Tensor::from_slice(&[0i64, 3, 8, 2]);
    for d in divergences() {
        let cfg = KdConfig::new(2.0).with_divergence(d);
        kd_ce_loss(&s, &t, &labels, None, 0.5, &cfg)
            .unwrap()
            .backward();
        assert!(s.grad().defined() && s.grad().abs().sum(None).double_value(&[]) > 0.0);
        assert!(!t.grad().defined(), "{d:?}: the teacher got a gradient");
        let mut g = s.grad();
        let _ = g.zero_();
    }
    let (v, i) = t.log_softmax(-1, Kind::Float).topk(3, -1, true, true);
    let v = v.detach().set_requires_grad(true);
    topk_kd_loss(&s, &v, &i, None, &KdConfig::default(), TopKTail::RestBucket)
        .unwrap()
        .backward();
    assert!(!v.grad().defined() && !t.grad().defined());

    let hs = randn(&[2, 3, 4]).set_requires_grad(true);
    let ht = randn(&[2, 3, 6]).set_requires_grad(true);
    let proj = Projection::new(4, 6, Device::Cpu).unwrap();
    (hidden_mse(&hs, &ht, None, Some(&proj)).unwrap()
        + cosine_loss(&hs, &ht, None, Some(&proj)).unwrap())
    .backward();
    assert!(hs.grad().defined() && !ht.grad().defined());
    let params = proj.params("distill.proj");
    assert_eq!(params.names(), ["distill.proj.weight", "distill.proj.bias"]);
    for (n, p) in params.iter() {
        assert!(p.grad().defined(), "{n} got no gradient");
    }

    let a_s = randn(&[1, 2, 3, 3]).set_requires_grad(true);
    let a_t = randn(&[1, 2, 3, 3]).set_requires_grad(true);
    let (ps, pt) = (a_s.softmax(-1, Kind::Float), a_t.softmax(-1, Kind::Float));
    (attention_mse(&ps, &pt, None).unwrap() + attention_kl(&ps, &pt, None).unwrap()).backward();
    let v_s = randn(&[1, 2, 3, 4]).set_requires_grad(true);
    let v_t = randn(&[1, 2, 3, 5]).set_requires_grad(true);
    value_relation_kl(&v_s, &v_t, None).unwrap().backward();
    assert!(a_s.grad().defined() && v_s.grad().defined());
    assert!(!a_t.grad().defined() && !v_t.grad().defined());
}

#[test]
fn mixing_weights() {
    tch::manual_seed(6);
    let (s, t) = (randn(&[5, 4]), randn(&[5, 4]));
    let y = Tensor::from_slice(&[0i64, 1, 2, 3, 0]);
    let cfg = KdConfig::default();
    let kd = value(kd_loss(&s, &t, None, &cfg));
    let ce = value(cross_entropy_loss(&s, &y, None));
    close(
        "alpha 1",
        value(kd_ce_loss(&s, &t, &y, None, 1.0, &cfg)),
        ce,
        1e-7,
    );
    close(
        "alpha 0",
        value(kd_ce_loss(&s, &t, &y, None, 0.0, &cfg)),
        kd,
        1e-7,
    );
    close(
        "alpha 0.25",
        value(kd_ce_loss(&s, &t, &y, None, 0.25, &cfg)),
        0.25 * ce + 0.75 * kd,
        1e-6,
    );
}

#[test]
fn low_precision_logits() {
    tch::manual_seed(7);
    let (s, t) = (randn(&[3, 8, 20]), randn(&[3, 8, 20]));
    let cfg = KdConfig::default();
    for k in [Kind::BFloat16, Kind::Half] {
        let (sl, tl) = (s.to_kind(k), t.to_kind(k));
        let l = kd_loss(&sl, &tl, None, &cfg).unwrap();
        assert_eq!(l.kind(), Kind::Float);
        let want = value(kd_loss(
            &sl.to_kind(Kind::Float),
            &tl.to_kind(Kind::Float),
            None,
            &cfg,
        ));
        close(&format!("{k:?}"), l.double_value(&[]), want, 1e-6);
    }
}

fn err<T: std::fmt::Debug>(r: reuse_core::Result<T>) -> String {
    r.unwrap_err().to_string()
}

#[test]
fn mismatches_are_clear_errors() {
    let s = randn(&[4, 5]);
    let cfg = KdConfig::default();

    let e = err(kd_loss(&s, &randn(&[4, 7]), None, &cfg));
    assert!(e.contains("[4, 5]") && e.contains("[4, 7]"), "{e}");
    assert!(e.contains("5 student classes vs 7 teacher classes"), "{e}");
    let e = err(kd_loss(&s, &randn(&[3, 5]), None, &cfg));
    assert!(e.contains("[4, 5]") && e.contains("[3, 5]"), "{e}");
    let e = err(kd_loss(&randn(&[5]), &randn(&[5]), None, &cfg));
    assert!(e.contains("expected [rows, classes]"), "{e}");
    let e = err(kd_loss(&s, &s.to_kind(Kind::Int64), None, &cfg));
    assert!(e.contains("teacher logits") && e.contains("Int64"), "{e}");
    let e = err(kd_loss(
        &s,
        &s,
        Some(&Tensor::ones([5], (Kind::Bool, Device::Cpu))),
        &cfg,
    ));
    assert!(
        e.contains("KD mask") && e.contains("[5]") && e.contains("[4]"),
        "{e}"
    );

    for beta in [0.0, 1.0, -0.2, f64::NAN] {
        let e = err(kd_loss(&s, &s, None, &cfg.with_divergence(jsd(beta))));
        assert!(
            e.contains("JSD beta") && e.contains("strictly between 0 and 1"),
            "{e}"
        );
    }
    for temp in [0.0, -1.0, f64::INFINITY] {
        let e = err(kd_loss(&s, &s, None, &KdConfig::new(temp)));
        assert!(e.contains("temperature"), "{e}");
    }
    let y = Tensor::from_slice(&[0i64, 1, 5, 2]);
    let e = err(cross_entropy_loss(&s, &y, None));
    assert!(e.contains("[0, 5)") && e.contains("[0, 5]"), "{e}");
    let e = err(cross_entropy_loss(&s, &y.to_kind(Kind::Int), None));
    assert!(e.contains("labels") && e.contains("Int64"), "{e}");
    let e = err(kd_ce_loss(&s, &s, &y, None, 1.5, &cfg));
    assert!(e.contains("alpha") && e.contains("1.5"), "{e}");

    // Top-k.
    let (v, i) = s.log_softmax(-1, Kind::Float).topk(3, -1, true, true);
    let e = err(topk_kd_loss(
        &s,
        &v,
        &i.narrow(-1, 0, 2),
        None,
        &cfg,
        TopKTail::default(),
    ));
    assert!(e.contains("[4, 2]") && e.contains("[4, 3]"), "{e}");
    let (v6, i6) = (
        randn(&[4, 6]),
        Tensor::zeros([4, 6], (Kind::Int64, Device::Cpu)),
    );
    let e = err(topk_kd_loss(&s, &v6, &i6, None, &cfg, TopKTail::default()));
    assert!(e.contains("k = 6") && e.contains("5 classes"), "{e}");
    let e = err(topk_kd_loss(
        &s,
        &v,
        &(&i + 3),
        None,
        &cfg,
        TopKTail::default(),
    ));
    assert!(e.contains("[0, 5)") && e.contains("7]"), "{e}");
    let e = err(topk_kd_loss(
        &s,
        &v,
        &i.to_kind(Kind::Float),
        None,
        &cfg,
        TopKTail::default(),
    ));
    assert!(e.contains("indices") && e.contains("Float"), "{e}");
    let rkl = cfg.with_divergence(Divergence::ReverseKl);
    let e = err(topk_kd_loss(&s, &v, &i, None, &rkl, TopKTail::Renormalize));
    assert!(e.contains("RestBucket"), "{e}");
    let e = err(topk_kd_loss(
        &randn(&[2, 2, 5]),
        &v,
        &i,
        None,
        &cfg,
        TopKTail::default(),
    ));
    assert!(e.contains("[4, 3]") && e.contains("[2, 2, 5]"), "{e}");
    // i32 indices are accepted.
    let a = value(topk_kd_loss(&s, &v, &i, None, &cfg, TopKTail::default()));
    let b = value(topk_kd_loss(
        &s,
        &v,
        &i.to_kind(Kind::Int),
        None,
        &cfg,
        TopKTail::default(),
    ));
    assert_eq!(a, b);

    // Features.
    let e = err(hidden_mse(
        &randn(&[2, 3, 4]),
        &randn(&[2, 3, 6]),
        None,
        None,
    ));
    assert!(
        e.contains("hidden size 4") && e.contains("6") && e.contains("Projection (4 -> 6)"),
        "{e}"
    );
    let p = Projection::new(5, 6, Device::Cpu).unwrap();
    let e = err(hidden_mse(
        &randn(&[2, 3, 4]),
        &randn(&[2, 3, 6]),
        None,
        Some(&p),
    ));
    assert!(e.contains("5 -> 6") && e.contains("[2, 3, 4]"), "{e}");
    let e = err(cosine_loss(
        &randn(&[2, 3, 4]),
        &randn(&[2, 4, 4]),
        None,
        None,
    ));
    assert!(e.contains("[2, 3, 4]") && e.contains("[2, 4, 4]"), "{e}");
    let e = err(attention_kl(
        &randn(&[2, 12, 5, 5]),
        &randn(&[2, 6, 5, 5]),
        None,
    ));
    assert!(e.contains("12 heads") && e.contains("teacher 6"), "{e}");
    let e = err(value_relation_kl(
        &randn(&[2, 4, 5, 8]),
        &randn(&[2, 2, 5, 8]),
        None,
    ));
    assert!(e.contains("4 heads") && e.contains("teacher 2"), "{e}");
    let e = err(attention_mse(
        &randn(&[2, 4, 5, 5]),
        &randn(&[2, 4, 6, 6]),
        None,
    ));
    assert!(
        e.contains("[2, 4, 5, 5]") && e.contains("[2, 4, 6, 6]"),
        "{e}"
    );
    let e = err(attention_mse(&randn(&[2, 4, 5]), &randn(&[2, 4, 5]), None));
    assert!(e.contains("[batch, heads, len, len]"), "{e}");
    let m = Tensor::ones([2, 6], (Kind::Bool, Device::Cpu));
    let e = err(attention_kl(
        &randn(&[2, 4, 5, 5]),
        &randn(&[2, 4, 5, 5]),
        Some(&m),
    ));
    assert!(
        e.contains("mask") && e.contains("[2, 6]") && e.contains("[2, 5]"),
        "{e}"
    );
    let e = err(split_heads(&randn(&[2, 5, 10]), 4));
    assert!(e.contains("4 heads") && e.contains("[2, 5, 10]"), "{e}");

    // Layer maps against real depths.
    let e = err(LayerMap::pairs(vec![(0, 0), (5, 13)]).unwrap().check(7, 13));
    assert!(
        e.contains("teacher index 13") && e.contains("depth 13") && e.contains("student 5"),
        "{e}"
    );
    let st: Vec<Tensor> = (0..4).map(|_| randn(&[1])).collect();
    let te: Vec<Tensor> = (0..12).map(|_| randn(&[1])).collect();
    let e = err(LayerMap::uniform(6, 12).unwrap().select(&st, &te));
    assert!(
        e.contains("student index 4") && e.contains("depth 4"),
        "{e}"
    );
    let pairs = LayerMap::uniform_with_embeddings(3, 6).unwrap();
    assert_eq!(pairs.select(&st, &te).unwrap().len(), 4);
}

#[test]
fn split_heads_matches_bert_layout() {
    let x = Tensor::arange(2 * 3 * 8, (Kind::Float, Device::Cpu)).view([2, 3, 8]);
    let h = split_heads(&x, 2).unwrap();
    assert_eq!(h.size(), [2, 2, 3, 4]);
    // Head 1 of position 2 of example 0 is hidden units 4..8 of that position.
    assert!(h
        .get(0)
        .get(1)
        .get(2)
        .equal(&x.get(0).get(2).narrow(0, 4, 4)));
}
