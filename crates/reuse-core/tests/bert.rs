//! BERT on tiny random configurations: Hugging Face names, loading errors, masking,
//! extra outputs, half precision.

use reuse_core::models::bert::{mean_pool, Bert, BertConfig};
use reuse_core::ForwardOptions;
use reuse_core::{Checkpoint, Error, Model};
use tch::{Device, Kind, Tensor};

fn tiny() -> Bert {
    tch::manual_seed(11);
    Bert::random(BertConfig::tiny(50, 32, 2), Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Float) - b.to_kind(Kind::Float))
        .abs()
        .max()
        .double_value(&[])
}

fn ids() -> (Tensor, Tensor) {
    let ids = Tensor::from_slice(&[2i64, 7, 9, 4, 3, 2, 5, 3, 0, 0]).view([2, 5]);
    let mask = Tensor::from_slice(&[1i64, 1, 1, 1, 1, 1, 1, 1, 0, 0]).view([2, 5]);
    (ids, mask)
}

#[test]
fn saves_and_loads_under_hugging_face_names() {
    let b = tiny();
    let dir = tempfile::tempdir().unwrap();
    b.save(dir.path()).unwrap();
    let ck = Checkpoint::load(dir.path().join("model.safetensors"), Device::Cpu).unwrap();
    let names: Vec<&str> = ck.names().collect();
    for n in [
        "embeddings.word_embeddings.weight",
        "embeddings.LayerNorm.weight",
        "encoder.layer.0.attention.self.query.weight",
        "encoder.layer.1.attention.output.LayerNorm.bias",
        "encoder.layer.1.intermediate.dense.weight",
        "encoder.layer.1.output.dense.bias",
    ] {
        assert!(names.contains(&n), "{n} missing from {names:?}");
    }
    assert_eq!(ck.len(), 5 + 2 * 16);
    let c = Bert::load(dir.path(), Device::Cpu, Kind::Float).unwrap();
    let (ids, mask) = ids();
    let a = b
        .forward(&ids, Some(&mask), None, false, ForwardOptions::default())
        .unwrap()
        .last_hidden_state;
    let z = c
        .forward(&ids, Some(&mask), None, false, ForwardOptions::default())
        .unwrap()
        .last_hidden_state;
    assert!(a.equal(&z));
    let mut c = c;
    assert_eq!(c.linear_paths().len(), 12);
    assert_eq!(c.linear_paths()[0], "encoder.layer.0.attention.self.query");
    assert_eq!(c.block_output_paths()[1], "encoder.layer.0.output");
}

#[test]
fn missing_or_misshaped_tensors_are_clear_errors() {
    let b = tiny();
    let dir = tempfile::tempdir().unwrap();
    b.save(dir.path()).unwrap();
    let path = dir.path().join("model.safetensors");
    let mut ck = Checkpoint::load(&path, Device::Cpu).unwrap();
    ck.remove("encoder.layer.1.attention.self.key.bias");
    ck.save(&path).unwrap();
    let e = Bert::load(dir.path(), Device::Cpu, Kind::Float).unwrap_err();
    assert!(matches!(e, Error::MissingTensor { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("encoder.layer.1.attention.self.key.bias")
            && msg.contains("model.safetensors"),
        "{msg}"
    );
    ck.insert(
        "encoder.layer.1.attention.self.key.bias",
        Tensor::zeros([31], (Kind::Float, Device::Cpu)),
    );
    ck.save(&path).unwrap();
    let e = Bert::load(dir.path(), Device::Cpu, Kind::Float)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("[31]") && e.contains("[32]") && e.contains("key.bias"),
        "{e}"
    );
    // A config with a bad head count is rejected with the file named.
    std::fs::write(dir.path().join("config.json"), r#"{"vocab_size":50,"hidden_size":32,"num_hidden_layers":2,"num_attention_heads":5,"intermediate_size":64}"#).unwrap();
    let e = Bert::load(dir.path(), Device::Cpu, Kind::Float)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("config.json") && e.contains("num_attention_heads"),
        "{e}"
    );
}

#[test]
fn config_keeps_unknown_keys_and_fills_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("config.json");
    std::fs::write(&p, r#"{"vocab_size":50,"hidden_size":32,"num_hidden_layers":2,"num_attention_heads":4,"intermediate_size":64,"model_type":"bert","architectures":["BertModel"]}"#).unwrap();
    let c = BertConfig::load(&p).unwrap();
    assert_eq!(c.layer_norm_eps, 1e-12);
    assert_eq!(c.hidden_act, "gelu");
    assert_eq!(c.extra["model_type"], "bert");
    c.save(&p).unwrap();
    assert_eq!(BertConfig::load(&p).unwrap(), c);
}

#[test]
fn padding_does_not_change_real_tokens() {
    let b = tiny();
    let (ids, mask) = ids();
    let batch = b
        .forward(&ids, Some(&mask), None, false, ForwardOptions::default())
        .unwrap()
        .last_hidden_state;
    let alone = b
        .forward(
            &ids.narrow(0, 1, 1).narrow(1, 0, 3),
            None,
            None,
            false,
            ForwardOptions::default(),
        )
        .unwrap()
        .last_hidden_state;
    assert!(max_diff(&batch.narrow(0, 1, 1).narrow(1, 0, 3), &alone) < 1e-5);
    let pooled = mean_pool(&batch, Some(&mask));
    let pooled_alone = mean_pool(&alone, None);
    assert!(max_diff(&pooled.narrow(0, 1, 1), &pooled_alone) < 1e-5);
}

#[test]
fn hidden_states_and_attentions_on_request() {
    let b = tiny();
    let (ids, mask) = ids();
    let plain = b
        .forward(&ids, Some(&mask), None, false, ForwardOptions::default())
        .unwrap();
    let full = b
        .forward(
            &ids,
            Some(&mask),
            None,
            false,
            ForwardOptions {
                hidden_states: true,
                attentions: true,
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(full.hidden_states.len(), 3);
    assert_eq!(full.attentions.len(), 2);
    assert_eq!(full.attentions[0].size(), [2, 4, 5, 5]);
    // explicit attention path == fused SDPA path
    assert!(max_diff(&plain.last_hidden_state, &full.last_hidden_state) < 1e-5);
    assert!(full.hidden_states[2].equal(&full.last_hidden_state));
    let rows = full.attentions[1].sum_dim_intlist(-1, false, Kind::Float);
    assert!(max_diff(&rows, &rows.ones_like()) < 1e-5);
    // no attention to padded keys of the second example
    let pad = full.attentions[0]
        .get(1)
        .narrow(-1, 3, 2)
        .abs()
        .max()
        .double_value(&[]);
    assert!(pad < 1e-12, "{pad}");
}

#[test]
fn half_precision_tracks_f32() {
    let b = tiny();
    let dir = tempfile::tempdir().unwrap();
    b.save(dir.path()).unwrap();
    let (ids, mask) = ids();
    let r = b
        .forward(&ids, Some(&mask), None, false, ForwardOptions::default())
        .unwrap()
        .last_hidden_state;
    for (kind, tol) in [(Kind::Half, 2e-2), (Kind::BFloat16, 1e-1)] {
        let h = Bert::load(dir.path(), Device::Cpu, kind).unwrap();
        assert_eq!(h.kind(), kind);
        let o = h
            .forward(&ids, Some(&mask), None, false, ForwardOptions::default())
            .unwrap()
            .last_hidden_state;
        assert_eq!(o.kind(), kind);
        let d = max_diff(&o, &r);
        assert!(d < tol, "{kind:?}: max diff {d}");
    }
}

#[test]
fn dropout_only_in_training() {
    let b = tiny();
    let (ids, mask) = ids();
    let e1 = b
        .forward(&ids, Some(&mask), None, false, ForwardOptions::default())
        .unwrap()
        .last_hidden_state;
    let e2 = b
        .forward(&ids, Some(&mask), None, false, ForwardOptions::default())
        .unwrap()
        .last_hidden_state;
    assert!(e1.equal(&e2));
    let t1 = b
        .forward(&ids, Some(&mask), None, true, ForwardOptions::default())
        .unwrap()
        .last_hidden_state;
    assert!(max_diff(&t1, &e1) > 1e-3);
}

#[test]
fn a_gated_layer_at_zero_is_the_exact_identity() {
    let mut b = tiny();
    let (ids, mask) = ids();
    let run =
        |b: &Bert, want: ForwardOptions| b.forward(&ids, Some(&mask), None, false, want).unwrap();
    let plain = run(&b, ForwardOptions::default()).last_hidden_state;
    // g = 1 is the plain layer.
    b.set_gate(1, Some(1.0)).unwrap();
    assert!(
        max_diff(
            &run(&b, ForwardOptions::default()).last_hidden_state,
            &plain
        ) < 1e-6
    );
    // g = 0 on the last layer: the output is the first layer's output, bit for bit,
    // although the layer's weights are not zero (a post-LN layer cannot be the identity
    // by its weights).
    b.set_gate(1, Some(0.0)).unwrap();
    let want = ForwardOptions {
        hidden_states: true,
        attentions: false,
        ..Default::default()
    };
    let out = run(&b, want);
    assert!(out.last_hidden_state.equal(&out.hidden_states[1]));
    // The gate is a parameter under the layer's path, saved and loaded with the model.
    assert!(b
        .named_parameters()
        .iter()
        .any(|(n, t)| n == "encoder.layer.1.reuse_gate" && t.requires_grad()));
    let dir = tempfile::tempdir().unwrap();
    b.save(dir.path()).unwrap();
    let c = Bert::load(dir.path(), Device::Cpu, Kind::Float).unwrap();
    assert!(c.layers[1].gate.is_some() && c.layers[0].gate.is_none());
    assert!(run(&c, ForwardOptions::default())
        .last_hidden_state
        .equal(&out.last_hidden_state));
    assert!(b
        .set_gate(5, Some(0.0))
        .unwrap_err()
        .to_string()
        .contains("layer 5"));
}

#[test]
fn load_list_and_visit_agree_on_every_path() {
    let mut b = tiny();
    let names: Vec<String> = b.named_parameters().into_iter().map(|p| p.0).collect();
    let mut linears = Vec::new();
    b.visit_linears(&mut |p, l| linears.push((p.to_string(), l.weight.size())));
    // every visited linear has its weight and bias listed under the same path
    for (p, _) in &linears {
        assert!(names.contains(&format!("{p}.weight")), "{p}");
        assert!(names.contains(&format!("{p}.bias")), "{p}");
    }
    // and every listed tensor is what a save writes and a load reads back by that name
    let dir = tempfile::tempdir().unwrap();
    b.save(dir.path()).unwrap();
    let ck = Checkpoint::load(dir.path().join("model.safetensors"), Device::Cpu).unwrap();
    let mut saved: Vec<&str> = ck.names().collect();
    saved.sort();
    let mut listed: Vec<&str> = names.iter().map(String::as_str).collect();
    listed.sort();
    assert_eq!(saved, listed);
    // FFN shapes follow the table: intermediate.dense is [inter, hidden]
    let inter = linears
        .iter()
        .find(|(p, _)| p == "encoder.layer.0.intermediate.dense")
        .unwrap();
    assert_eq!(inter.1, [128, 32]);
}

#[test]
fn bad_inputs_are_errors_naming_what_is_wrong() {
    let b = tiny();
    let long = Tensor::zeros([1, 513], (Kind::Int64, Device::Cpu));
    let e = b
        .forward(&long, None, None, false, ForwardOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("513") && e.contains("max_position_embeddings 512"),
        "{e}"
    );
    let oov = Tensor::from_slice(&[1i64, 50]).view([1, 2]);
    let e = b
        .forward(&oov, None, None, false, ForwardOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("vocab_size"), "{e}");
    let (ids, _) = ids();
    let bad_mask = Tensor::ones([2, 4], (Kind::Int64, Device::Cpu));
    let e = b
        .forward(
            &ids,
            Some(&bad_mask),
            None,
            false,
            ForwardOptions::default(),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("attention_mask"), "{e}");
    let floats = Tensor::zeros([1, 3], (Kind::Float, Device::Cpu));
    assert!(b
        .forward(&floats, None, None, false, ForwardOptions::default())
        .is_err());
    // No mask means no padding: the same as an all-ones mask.
    let ones = Tensor::ones([2, 5], (Kind::Int64, Device::Cpu));
    let a = b
        .forward(&ids, None, None, false, ForwardOptions::default())
        .unwrap();
    let m = b
        .forward(&ids, Some(&ones), None, false, ForwardOptions::default())
        .unwrap();
    assert!(max_diff(&a.last_hidden_state, &m.last_hidden_state) < 1e-6);
}
