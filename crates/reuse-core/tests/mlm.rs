//! `BertForMaskedLm` against Hugging Face `BertForMaskedLM` (a committed fixture made by
//! `fixtures/mlm/make_reference.py`), its checkpoint names, and BERT's masking rule.

use reuse_core::models::{train_flops, BertConfig, BertForMaskedLm, MaskingSpec};
use reuse_core::{Checkpoint, Model};
use reuse_testkit::fixtures_dir;
use tch::{Device, Kind, Tensor};

fn tiny() -> (BertForMaskedLm, Checkpoint) {
    let dir = fixtures_dir().join("mlm/tiny");
    let cfg = BertConfig::load(&dir.join("config.json")).unwrap();
    let file = Checkpoint::load(dir.join("model.safetensors"), Device::Cpu).unwrap();
    let mut ck = Checkpoint::load(dir.join("model.safetensors"), Device::Cpu).unwrap();
    let m = BertForMaskedLm::from_checkpoint(cfg, &mut ck, Device::Cpu, Kind::Float).unwrap();
    assert_eq!(
        ck.names().count(),
        0,
        "left over: {:?}",
        ck.names().collect::<Vec<_>>()
    );
    (m, file)
}

#[test]
fn logits_match_transformers_bert_for_masked_lm() {
    let (m, _) = tiny();
    let r = Checkpoint::load(
        fixtures_dir().join("mlm/reference.safetensors"),
        Device::Cpu,
    )
    .unwrap();
    let ids = r.tensor("input_ids").unwrap();
    let want = r.tensor("logits").unwrap();
    let positions = Tensor::arange(21, (Kind::Int64, Device::Cpu));
    let got = tch::no_grad(|| m.logits(ids, &positions, false).unwrap());
    let d = (got - want.view([21, 50])).abs().max().double_value(&[]);
    assert!(d < 1e-5, "max |reuse - transformers| = {d}");
    // Only some positions: the same rows.
    let some = Tensor::from_slice(&[3i64, 10, 20]);
    let part = tch::no_grad(|| m.logits(ids, &some, false).unwrap());
    let d = (part - want.view([21, 50]).index_select(0, &some))
        .abs()
        .max()
        .double_value(&[]);
    assert!(d < 1e-5);
}

#[test]
fn state_dict_has_transformers_names_and_round_trips() {
    let (m, file) = tiny();
    let sd = m.state_dict();
    let mut a: Vec<&str> = sd.names().collect();
    let mut b: Vec<&str> = file.names().collect();
    a.sort_unstable();
    b.sort_unstable();
    assert_eq!(a, b);
    for (n, t) in file.iter() {
        assert!(sd.tensor(n).unwrap().equal(t), "{n}");
    }
    // Parameters are the same tensors under the same names, the decoder counted once.
    assert_eq!(m.named_parameters().len(), file.names().count());
    // A decoder weight that is not the word embeddings is refused.
    let dir = fixtures_dir().join("mlm/tiny");
    let cfg = BertConfig::load(&dir.join("config.json")).unwrap();
    let mut ck = Checkpoint::load(dir.join("model.safetensors"), Device::Cpu).unwrap();
    ck.insert(
        "cls.predictions.decoder.weight",
        Tensor::zeros([50, 16], (Kind::Float, Device::Cpu)),
    );
    let e = BertForMaskedLm::from_checkpoint(cfg, &mut ck, Device::Cpu, Kind::Float).unwrap_err();
    assert!(e.to_string().contains("decoder.weight"), "{e}");
}

#[test]
fn masking_chooses_fifteen_percent_of_ordinary_tokens_80_10_10() {
    tch::manual_seed(0);
    let spec = MaskingSpec {
        mask_id: 3,
        special_ids: vec![0, 1, 2, 3],
        vocab_size: 1000,
        probability: 0.15,
    };
    let ids = Tensor::randint_low(4, 1000, [200, 64], (Kind::Int64, Device::Cpu));
    // [CLS] ... [SEP] framing, as packed sequences have.
    let _ = ids.select(1, 0).fill_(1);
    let _ = ids.select(1, 63).fill_(2);
    let b = spec.apply(&ids).unwrap();
    let n = b.positions.size()[0] as f64;
    let eligible = 200.0 * 62.0;
    assert!((n / eligible - 0.15).abs() < 0.01, "chose {}", n / eligible);
    let cols = b.positions.remainder(64);
    assert_eq!(
        cols.eq(0)
            .logical_or(&cols.eq(63))
            .sum(Kind::Int64)
            .int64_value(&[]),
        0
    );
    assert!(b
        .labels
        .equal(&ids.flatten(0, -1).index_select(0, &b.positions)));
    let seen = b.input_ids.flatten(0, -1).index_select(0, &b.positions);
    let masked = seen.eq(3).sum(Kind::Float).double_value(&[]) / n;
    let kept = seen.eq_tensor(&b.labels).sum(Kind::Float).double_value(&[]) / n;
    assert!((masked - 0.8).abs() < 0.02, "masked {masked}");
    // Kept: the 10% left alone plus random draws that hit the same token (~0.01%).
    assert!((kept - 0.1).abs() < 0.02, "kept {kept}");
    // Positions not chosen are untouched.
    let unchosen = b
        .input_ids
        .ne_tensor(&ids)
        .sum(Kind::Int64)
        .int64_value(&[]);
    assert!(unchosen as f64 <= n);
}

#[test]
fn train_flops_count_six_n_per_token_attention_and_the_head() {
    let (m, _) = tiny();
    let c = &m.bert.config;
    // N from the model itself: every layer parameter.
    let n: i64 = m
        .named_parameters()
        .iter()
        .filter(|(k, _)| k.starts_with("bert.encoder."))
        .map(|(_, t)| t.numel() as i64)
        .sum();
    let head: i64 = m
        .named_parameters()
        .iter()
        .filter(|(k, _)| k.starts_with("cls.predictions.transform."))
        .map(|(_, t)| t.numel() as i64)
        .sum();
    let (b, t, p) = (4i64, 8i64, 5i64);
    let want = 6.0 * n as f64 * (b * t) as f64
        + 12.0 * 2.0 * 8.0 * 16.0 * (b * t) as f64
        + 6.0 * (head + 16 * 50) as f64 * p as f64;
    assert!(
        (train_flops(c, b, t, p) - want).abs() < 1e-6 * want,
        "{} vs {want}",
        train_flops(c, b, t, p)
    );
}
