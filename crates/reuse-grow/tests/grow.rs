//! Growth operators on small random models: every function-preserving operator keeps
//! the function (proptest over random configs, max |diff| <= 1e-5 in f32, dropout off),
//! the gradient scales describe real backward passes, the optimizer state carries over
//! into a run that continues, and bad requests are clear errors.

use proptest::prelude::*;
use reuse_core::models::bert::{Bert, BertConfig};
use reuse_core::{Activation, Checkpoint, Mlp, Model, Optimizer, OptimizerKind};
use reuse_grow::bert::{
    deepen_bert, insertion_plan, widen_bert, DeepenBert, DepthMethod, WidenBert,
};
use reuse_grow::mlp::{deepen_mlp, widen_mlp};
use reuse_grow::verify::{compare_bert, compare_mlp, verify_growth};
use tch::{Device, Kind, Tensor};

fn config(hidden: i64, heads: i64, inter: i64, layers: i64) -> BertConfig {
    let mut c = BertConfig::tiny(40, hidden, layers);
    c.num_attention_heads = heads;
    c.intermediate_size = inter;
    c.max_position_embeddings = 16;
    c
}

/// A random BERT whose LayerNorms and biases are not at their initial values, with a
/// pooler, so every scale of the growth matters.
fn random_bert(c: &BertConfig, seed: i64) -> (Bert, Checkpoint) {
    tch::manual_seed(seed);
    let mut ck = Bert::random(c.clone(), Device::Cpu).unwrap().state_dict();
    let names: Vec<String> = ck.names().map(String::from).collect();
    for n in names {
        let t = ck.tensor(&n).unwrap();
        let noisy = if n.contains("LayerNorm.weight") {
            t + Tensor::randn(t.size(), (Kind::Float, Device::Cpu)) * 0.3
        } else {
            t + Tensor::randn(t.size(), (Kind::Float, Device::Cpu)) * 0.1
        };
        ck.insert(n, noisy);
    }
    let h = c.hidden_size;
    ck.insert(
        "pooler.dense.weight",
        Tensor::randn([h, h], (Kind::Float, Device::Cpu)) * 0.1,
    );
    ck.insert(
        "pooler.dense.bias",
        Tensor::randn([h], (Kind::Float, Device::Cpu)) * 0.1,
    );
    let bert = Bert::from_checkpoint(c.clone(), &mut clone(&ck), Device::Cpu, Kind::Float).unwrap();
    (bert, ck)
}

fn clone(ck: &Checkpoint) -> Checkpoint {
    let mut c = Checkpoint::new();
    for (n, t) in ck.iter() {
        c.insert(n, t.copy());
    }
    c
}

fn ids_and_mask(vocab: i64) -> (Tensor, Tensor) {
    tch::manual_seed(3);
    let ids = Tensor::randint(vocab, [3, 9], (Kind::Int64, Device::Cpu));
    let mask = Tensor::ones([3, 9], (Kind::Int64, Device::Cpu));
    let _ = mask.get(2).narrow(0, 6, 3).fill_(0);
    (ids, mask)
}

fn grown_bert(cfg: &BertConfig, ck: &Checkpoint) -> Bert {
    Bert::from_checkpoint(cfg.clone(), &mut clone(ck), Device::Cpu, Kind::Float).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    /// FFN, hidden and head growth together keep the function on padded inputs.
    #[test]
    fn widening_bert_preserves_its_function(
        head_dim in 2i64..5, heads in 1i64..4, k in 1i64..4, extra_inter in 0i64..20,
        inter in 4i64..24, layers in 1i64..3, head_choice in 0usize..8, seed in 0u64..1000,
    ) {
        let c = config(head_dim * heads, heads, inter, layers);
        let (small, ck) = random_bert(&c, seed as i64);
        // Reachable head counts: A' = A k / r for r dividing k.
        let options: Vec<i64> = (1..=k).filter(|r| k % r == 0).map(|r| heads * k / r).collect();
        let a2 = options[head_choice % options.len()];
        let spec = WidenBert {
            intermediate_size: Some(inter + extra_inter),
            hidden_size: Some(c.hidden_size * k),
            heads: Some(a2),
            seed,
        };
        let g = widen_bert(&c, &ck, &spec).unwrap();
        prop_assert!(g.exact);
        let big = grown_bert(&g.config, &g.growth.apply(&ck).unwrap());
        let (ids, mask) = ids_and_mask(c.vocab_size);
        let d = compare_bert(&small, &big, &ids, Some(&mask)).unwrap();
        prop_assert!(d.max_abs_diff <= 1e-5, "max |diff| {} for {:?} -> {:?}", d.max_abs_diff, (c.hidden_size, heads, inter), spec);
        prop_assert!(d.cosine_min > 1.0 - 1e-6);
    }

    /// Gated depth growth is the exact identity at g = 0, wherever the layers go.
    #[test]
    fn gated_depth_growth_preserves_its_function(
        layers in 1i64..4, extra in 1i64..5, every in 0usize..4, seed in 0u64..1000,
    ) {
        let c = config(8, 2, 16, layers);
        let (small, ck) = random_bert(&c, seed as i64);
        let every = (every > 0 && every <= layers as usize).then_some(every);
        let spec = DeepenBert { layers: layers + extra, method: DepthMethod::Gated, every };
        let g = deepen_bert(&c, &ck, &spec).unwrap();
        prop_assert_eq!(g.gated_layers.len() as i64, extra);
        let big = grown_bert(&g.config, &g.growth.apply(&ck).unwrap());
        prop_assert_eq!(big.layers.len() as i64, layers + extra);
        let (ids, mask) = ids_and_mask(c.vocab_size);
        let d = compare_bert(&small, &big, &ids, Some(&mask)).unwrap();
        prop_assert!(d.max_abs_diff <= 1e-5, "max |diff| {}", d.max_abs_diff);
    }

    /// Net2WiderNet on any hidden layer and Net2DeeperNet after any hidden layer.
    #[test]
    fn mlp_growth_preserves_its_function(
        w1 in 1i64..20, w2 in 1i64..20, extra in 0i64..30, at in 1usize..3, seed in 0u64..1000,
    ) {
        tch::manual_seed(seed as i64);
        let widths = [5, w1, w2, 3];
        let mlp = Mlp::new(&widths, Activation::Relu, Device::Cpu).unwrap();
        let x = Tensor::randn([7, 5], (Kind::Float, Device::Cpu));
        let wide = widen_mlp(&widths, at, widths[at] + extra, seed).unwrap();
        let wmlp = wide.apply(&mlp).unwrap();
        prop_assert_eq!(wmlp.layers[at - 1].out_features(), widths[at] + extra);
        prop_assert!(compare_mlp(&mlp, &wmlp, &x).unwrap().max_abs_diff <= 1e-5);
        let deep = deepen_mlp(&wide.widths, Activation::Relu, at).unwrap();
        let dmlp = deep.apply(&wmlp).unwrap();
        prop_assert_eq!(dmlp.layers.len(), 4);
        prop_assert!(compare_mlp(&mlp, &dmlp, &x).unwrap().max_abs_diff <= 1e-5);
    }
}

#[test]
fn insertion_plans_spread_new_layers_and_follow_every() {
    let plan = |d, n, e| -> Vec<usize> {
        insertion_plan(d, n, e)
            .unwrap()
            .iter()
            .enumerate()
            .filter(|(_, (_, new))| *new)
            .map(|(i, _)| i)
            .collect()
    };
    // 6 -> 8: one new layer after the 3rd and one after the 6th original (LLaMA Pro).
    assert_eq!(plan(6, 8, None), vec![3, 7]);
    // 6 -> 12: one after each.
    assert_eq!(plan(6, 12, None), vec![1, 3, 5, 7, 9, 11]);
    // every 2 with 6 -> 9: after layers 1, 3, 5.
    assert_eq!(plan(6, 9, Some(2)), vec![2, 5, 8]);
    // 2 -> 6: two after each.
    assert_eq!(plan(2, 6, None), vec![1, 2, 4, 5]);
    let sources: Vec<usize> = insertion_plan(2, 6, None)
        .unwrap()
        .iter()
        .map(|s| s.0)
        .collect();
    assert_eq!(sources, vec![0, 0, 0, 1, 1, 1]);
}

#[test]
fn copy_and_stack_change_the_function_and_verify_reports_it() {
    let c = config(8, 2, 16, 2);
    let (small, ck) = random_bert(&c, 11);
    for method in [DepthMethod::Copy, DepthMethod::Stack] {
        let g = deepen_bert(
            &c,
            &ck,
            &DeepenBert {
                layers: 4,
                method,
                every: None,
            },
        )
        .unwrap();
        assert!(!g.exact);
        assert!(g.gated_layers.is_empty());
        let grown = g.growth.apply(&ck).unwrap();
        assert!(grown.names().all(|n| !n.ends_with("reuse_gate")));
        let big = grown_bert(&g.config, &grown);
        let v = verify_growth(&small, &big, None, 0).unwrap();
        assert!(
            v.random.max_abs_diff > 1e-3,
            "{method:?} should drift: {:?}",
            v.random
        );
        // Stacking: layer 2 is layer 0, layer 3 is layer 1.
        if method == DepthMethod::Stack {
            let w = |ck: &Checkpoint, l: usize| {
                ck.tensor(&format!("encoder.layer.{l}.output.dense.weight"))
                    .unwrap()
                    .shallow_clone()
            };
            assert!(w(&grown, 2).equal(&w(&ck, 0)));
            assert!(w(&grown, 3).equal(&w(&ck, 1)));
        }
    }
}

/// Gradients of the small model, mapped by the growth's gradient scales, are the grown
/// model's gradients at the growth point (where the scale is not 0).
#[test]
fn gradient_scales_match_real_backward_passes() {
    let c = config(6, 2, 10, 2);
    let (small, ck) = random_bert(&c, 5);
    let spec = WidenBert {
        intermediate_size: Some(17),
        hidden_size: Some(12),
        heads: Some(2),
        seed: 9,
    };
    let g = widen_bert(&c, &ck, &spec).unwrap();
    let big = grown_bert(&g.config, &g.growth.apply(&ck).unwrap());
    let (ids, mask) = ids_and_mask(c.vocab_size);
    tch::manual_seed(4);
    let w = Tensor::randn([3, 9, 6], (Kind::Float, Device::Cpu));
    let loss = |m: &Bert, k: i64| {
        let h = m
            .forward(&ids, Some(&mask), None, false, Default::default())
            .unwrap()
            .last_hidden_state;
        // The grown model's loss reads each unit's k copies and averages them.
        (h * w.repeat([1, 1, k])).sum(Kind::Float) / k as f64
    };
    loss(&small, 1).backward();
    loss(&big, 2).backward();
    let state = |grads: bool| {
        let mut st = Checkpoint::new();
        for (n, p) in small.named_parameters() {
            if !p.grad().defined() {
                continue; // the pooler: not on the loss's path
            }
            let v = if grads { p.grad() } else { p.ones_like() };
            st.insert(format!("exp_avg.{n}"), v.detach().copy());
        }
        st.set_metadata("optimizer_step", "1");
        g.growth.apply_optimizer_state(&st).unwrap()
    };
    let (mapped, live) = (state(true), state(false));
    let mut compared = 0;
    for (n, p) in big.named_parameters() {
        let (Some(m), Some(l)) = (
            mapped.get(&format!("exp_avg.{n}")),
            live.get(&format!("exp_avg.{n}")),
        ) else {
            continue;
        };
        let on = l.ne(0.0);
        let diff = (p.grad() - m).abs().masked_select(&on);
        let tol = 1e-5 * (1.0 + p.grad().abs().max().double_value(&[]));
        assert!(
            diff.numel() == 0 || diff.max().double_value(&[]) <= tol,
            "{n}: {}",
            diff.max().double_value(&[])
        );
        compared += diff.numel();
    }
    assert!(compared > 1000, "compared only {compared} values");
}

/// A run in progress continues on the grown model: the optimizer's moments are carried
/// over (shapes and values), and training goes on lowering the loss.
#[test]
fn optimizer_state_carries_into_the_grown_model() {
    tch::manual_seed(0);
    let widths = [4, 6, 3];
    let mlp = Mlp::new(&widths, Activation::Relu, Device::Cpu).unwrap();
    let x = Tensor::randn([32, 4], (Kind::Float, Device::Cpu));
    let y = Tensor::randint(3, [32], (Kind::Int64, Device::Cpu));
    let step = |m: &Mlp, opt: &mut Optimizer| -> f64 {
        let params = m.params();
        params.zero_grad();
        let l = m.forward(&x, true).unwrap().cross_entropy_for_logits(&y);
        l.backward();
        opt.step(&params, 1e-2).unwrap();
        l.double_value(&[])
    };
    let mut opt = Optimizer::new(OptimizerKind::default(), 0.0);
    for _ in 0..20 {
        step(&mlp, &mut opt);
    }
    let grown = widen_mlp(&widths, 1, 10, 3).unwrap();
    let big = grown.apply(&mlp).unwrap();
    let state = grown.growth.apply_optimizer_state(&opt.state()).unwrap();
    let m_old = opt
        .state()
        .tensor("exp_avg.layers.1.weight")
        .unwrap()
        .shallow_clone();
    let m_new = state.tensor("exp_avg.layers.1.weight").unwrap();
    assert_eq!(m_new.size(), vec![3, 10]);
    // Input columns of the next layer keep the source column's moments unchanged.
    assert!(m_new.narrow(1, 0, 6).equal(&m_old));
    let mut opt2 = Optimizer::new(OptimizerKind::default(), 0.0);
    opt2.load_state(&state, &big.params()).unwrap();
    assert_eq!(opt2.param_steps("layers.0.weight"), 20);
    let first = step(&big, &mut opt2);
    let mut last = first;
    for _ in 0..30 {
        last = step(&big, &mut opt2);
    }
    assert!(last < first, "loss {first} -> {last}");
}

#[test]
fn bad_requests_are_clear_errors() {
    let c = config(8, 2, 16, 2);
    let (_, ck) = random_bert(&c, 1);
    let err = |spec: WidenBert| widen_bert(&c, &ck, &spec).unwrap_err().to_string();
    let e = err(WidenBert {
        intermediate_size: Some(8),
        ..Default::default()
    });
    assert!(
        e.contains("intermediate size")
            && e.contains("shrink")
            && e.contains("16")
            && e.contains('8'),
        "{e}"
    );
    let e = err(WidenBert {
        hidden_size: Some(12),
        ..Default::default()
    });
    assert!(
        e.contains("12 is not a multiple of 8") && e.contains("16"),
        "{e}"
    );
    let e = err(WidenBert {
        heads: Some(4),
        ..Default::default()
    });
    assert!(
        e.contains("smaller than the model's 4") && e.contains("hidden size to 16"),
        "{e}"
    );
    let e = deepen_bert(
        &c,
        &ck,
        &DeepenBert {
            layers: 2,
            method: DepthMethod::Gated,
            every: None,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("more layers than the model's 2"), "{e}");
    let e = deepen_mlp(&[3, 4, 2], Activation::Tanh, 1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("ReLU") && e.contains("Tanh"), "{e}");
    let e = widen_mlp(&[3, 4, 2], 2, 8, 0).unwrap_err().to_string();
    assert!(e.contains("not a hidden layer"), "{e}");
    // A tensor that is not part of a BERT encoder.
    let mut odd = clone(&ck);
    odd.insert(
        "classifier.weight",
        Tensor::zeros([2, 8], (Kind::Float, Device::Cpu)),
    );
    let e = widen_bert(
        &c,
        &odd,
        &WidenBert {
            intermediate_size: Some(32),
            ..Default::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("`classifier.weight`"), "{e}");
}

#[test]
fn noise_breaks_symmetry_and_is_seeded() {
    let c = config(8, 2, 16, 1);
    let (small, ck) = random_bert(&c, 2);
    let spec = WidenBert {
        intermediate_size: Some(32),
        ..Default::default()
    };
    let a = widen_bert(&c, &ck, &spec)
        .unwrap()
        .growth
        .with_noise(0.01, 1)
        .apply(&ck)
        .unwrap();
    let b = widen_bert(&c, &ck, &spec)
        .unwrap()
        .growth
        .with_noise(0.01, 1)
        .apply(&ck)
        .unwrap();
    let n = "encoder.layer.0.intermediate.dense.weight";
    assert!(a.tensor(n).unwrap().equal(b.tensor(n).unwrap()));
    let g = widen_bert(&c, &ck, &spec).unwrap();
    let big = grown_bert(&g.config, &a);
    let (ids, mask) = ids_and_mask(c.vocab_size);
    let d = compare_bert(&small, &big, &ids, Some(&mask)).unwrap();
    assert!(d.max_abs_diff > 1e-5 && d.max_abs_diff < 0.5, "{d:?}");
}

/// A masked-LM model (encoder + tied head) grown wider and then deeper gives the same
/// logits: the head's LayerNorm is divided by the replica count.
#[test]
fn masked_lm_growth_keeps_the_logits() {
    use reuse_core::models::BertForMaskedLm;
    let c = config(8, 2, 16, 2);
    tch::manual_seed(21);
    let m = BertForMaskedLm::random(c.clone(), Device::Cpu).unwrap();
    let mut ck = m.state_dict();
    let names: Vec<String> = ck.names().map(String::from).collect();
    for n in names {
        let t = ck.tensor(&n).unwrap();
        let noisy = t + Tensor::randn(t.size(), (Kind::Float, Device::Cpu)) * 0.2;
        ck.insert(n, noisy);
    }
    let small =
        BertForMaskedLm::from_checkpoint(c.clone(), &mut clone(&ck), Device::Cpu, Kind::Float)
            .unwrap();
    let wide = widen_bert(
        &c,
        &ck,
        &WidenBert {
            hidden_size: Some(16),
            heads: Some(4),
            intermediate_size: Some(40),
            seed: 2,
        },
    )
    .unwrap();
    let wck = wide.growth.apply(&ck).unwrap();
    let deep = deepen_bert(
        &wide.config,
        &wck,
        &DeepenBert {
            layers: 4,
            method: DepthMethod::Gated,
            every: None,
        },
    )
    .unwrap();
    let dck = deep.growth.apply(&wck).unwrap();
    assert!(dck
        .get("cls.predictions.transform.LayerNorm.weight")
        .is_some());
    let big = BertForMaskedLm::from_checkpoint(
        deep.config.clone(),
        &mut clone(&dck),
        Device::Cpu,
        Kind::Float,
    )
    .unwrap();
    let (ids, _) = ids_and_mask(c.vocab_size);
    let pos = Tensor::arange(27, (Kind::Int64, Device::Cpu));
    let (a, b) = tch::no_grad(|| {
        (
            small.logits(&ids, &pos, false).unwrap(),
            big.logits(&ids, &pos, false).unwrap(),
        )
    });
    let d = (a - b).abs().max().double_value(&[]);
    assert!(d <= 1e-5, "MLM logits moved by {d}");
}
