//! Embedding distillation with the teacher's embeddings given up front: the same
//! student and held-out cosine as when the teacher embeds the texts itself, and
//! embeddings of the wrong shape are refused by name.

use reuse_core::models::SentenceEncoder;
use reuse_distill::embed::{
    distill_embeddings, distill_embeddings_with, EmbedDistillConfig, EmbedLoss,
};
use reuse_testkit::minilm_dir;
use tch::{Device, Kind};

fn texts() -> Vec<String> {
    [
        "command-line tool to convert images",
        "library for parsing XML documents",
        "fast web server with a small footprint",
        "game of falling blocks for the terminal",
        "mail transfer agent with spam filtering",
        "plotting library for scientific data",
        "sound mixer for the ALSA sound system",
        "text editor with syntax highlighting",
        "network monitoring daemon",
        "utilities for managing disk partitions",
        "font rendering engine",
        "chess engine that speaks the UCI protocol",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn given_teacher_embeddings_train_the_same_student() {
    let dir = minilm_dir().unwrap();
    let texts = texts();
    let cfg = EmbedDistillConfig {
        layers: vec![0, 2, 5],
        batch_size: 4,
        epochs: 1,
        lr: 1e-3,
        loss: EmbedLoss::Cosine,
        eval_fraction: 0.2,
        max_texts: Some(10),
        seed: 3,
        ..Default::default()
    };
    let (a, ra) = distill_embeddings(&dir, &texts, &cfg, false).unwrap();
    let teacher = SentenceEncoder::load(&dir, Device::Cpu, Kind::Float).unwrap();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let all = teacher.encode(&refs, 5).unwrap();
    let (b, rb) = distill_embeddings_with(&dir, &texts, Some(&all), &cfg, false).unwrap();
    assert_eq!((ra.steps, ra.train_texts, ra.held_out_texts), (2, 8, 2));
    assert_eq!((rb.steps, rb.train_texts, rb.held_out_texts), (2, 8, 2));
    assert_eq!(rb.teacher_params, ra.teacher_params);
    // The teacher's pass over 10 sampled texts and over all 12 pad differently, so the
    // targets (and what the students learn from them) agree to rounding only.
    let (ca, cb) = (ra.held_out_cosine.unwrap(), rb.held_out_cosine.unwrap());
    assert!((ca - cb).abs() < 1e-4, "{ca} vs {cb}");
    let ea = a.encode(&refs, 12).unwrap();
    let eb = b.encode(&refs, 12).unwrap();
    let d = (&ea - &eb).abs().max().double_value(&[]);
    assert!(d < 1e-4, "students differ by {d}");
    // A student that learnt something moved away from the untrained cut.
    let cut = distill_embeddings(
        &dir,
        &texts,
        &EmbedDistillConfig {
            lr: 1e-12,
            ..cfg.clone()
        },
        false,
    )
    .unwrap()
    .0
    .encode(&refs, 12)
    .unwrap();
    assert!((&ea - &cut).abs().max().double_value(&[]) > 1e-3);

    let short = all.narrow(0, 0, 11);
    let err = distill_embeddings_with(&dir, &texts, Some(&short), &cfg, false)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("teacher embeddings"), "{err}");
    assert!(err.contains("12") && err.contains("11"), "{err}");
}
