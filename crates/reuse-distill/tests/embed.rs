//! Embedding distillation: the teacher's embeddings given up front train the same
//! student as when the teacher embeds the texts itself, embeddings of the wrong shape
//! are refused by name, and the defaults (and the MSE loss) train a student that
//! resembles its teacher on texts it never saw.

use reuse_core::models::SentenceEncoder;
use reuse_distill::embed::{
    distill_embeddings, distill_embeddings_with, embedding_agreement, EmbedDistillConfig, EmbedLoss,
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

/// Texts of the sections fixture (Debian package synopses): `n` of its train split from
/// `skip`, or of its test split.
fn sections(test: bool, skip: usize, n: usize) -> Vec<String> {
    let splits = reuse_core::data::load_text_splits(
        &reuse_testkit::fixtures_dir().join("debian_sections/sections.tsv.gz"),
    )
    .unwrap();
    let v = if test {
        splits.test.texts
    } else {
        splits.train.texts
    };
    v.into_iter().skip(skip).take(n).collect()
}

/// The defaults alone (no layers, loss or lr chosen) train a student that resembles its
/// teacher on texts it never saw, well beyond the untrained cut of the same layers.
#[test]
fn the_defaults_train_a_student_well_above_the_untrained_cut() {
    let dir = minilm_dir().unwrap();
    let train = sections(false, 0, 640);
    let unseen = sections(true, 0, 200);
    let cfg = EmbedDistillConfig::default();
    assert_eq!(cfg.loss, EmbedLoss::Cosine);
    let (student, r) = distill_embeddings(&dir, &train, &cfg, false).unwrap();
    assert_eq!(r.layers, [0, 2, 5]);
    let teacher = SentenceEncoder::load(&dir, Device::Cpu, Kind::Float).unwrap();
    let cut = SentenceEncoder {
        bert: reuse_distill::student::cut_layers(&teacher.bert, &r.layers).unwrap(),
        tokenizer: teacher.tokenizer.clone(),
        max_seq_length: teacher.max_seq_length,
        normalize: teacher.normalize,
    };
    let unseen: Vec<&str> = unseen.iter().map(String::as_str).collect();
    let trained = embedding_agreement(&student, &teacher, &unseen, 64).unwrap();
    let untrained = embedding_agreement(&cut, &teacher, &unseen, 64).unwrap();
    let held = r.held_out_cosine.unwrap();
    eprintln!(
        "defaults, {} steps on {} synopses: cosine on unseen synopses {trained:.4} \
         (untrained cut {untrained:.4}), held out {held:.4}",
        r.steps, r.train_texts
    );
    assert!(trained > untrained + 0.1, "{trained} vs cut {untrained}");
    assert!(held > untrained + 0.1, "{held} vs cut {untrained}");
    assert!(r.weak().is_none(), "{:?}", r.weak());
}

/// The MSE loss compares the student's embedding as its folder gives it (normalised, as
/// the teacher's) with the teacher's: a student whose output is the teacher's own has
/// zero loss, and a few steps raise the cosine as the cosine loss does, instead of
/// spending them shrinking an unnormalised norm toward 1.
#[test]
fn mse_trains_the_normalised_embedding() {
    let dir = minilm_dir().unwrap();
    let train = sections(false, 640, 320);
    let unseen = sections(true, 200, 120);
    let unseen: Vec<&str> = unseen.iter().map(String::as_str).collect();
    let teacher = SentenceEncoder::load(&dir, Device::Cpu, Kind::Float).unwrap();
    let run = |loss: EmbedLoss, lr: f64| {
        let cfg = EmbedDistillConfig {
            loss,
            lr,
            eval_fraction: 0.0,
            ..Default::default()
        };
        let (s, r) = distill_embeddings(&dir, &train, &cfg, false).unwrap();
        (embedding_agreement(&s, &teacher, &unseen, 64).unwrap(), r)
    };
    let (mse, r) = run(EmbedLoss::Mse, 1e-3);
    let (cos, _) = run(EmbedLoss::Cosine, 1e-3);
    let (untrained, _) = run(EmbedLoss::Mse, 1e-12);
    eprintln!("mse {mse:.4}, cosine {cos:.4}, untrained {untrained:.4}");
    // The normalised MSE is (2 - 2 cos) / hidden: its final loss tells the cosine.
    assert!(r.final_loss < 2.0 / 384.0, "{}", r.final_loss);
    assert!(mse > untrained + 0.05, "mse {mse} vs untrained {untrained}");
    assert!((mse - cos).abs() < 0.1, "mse {mse} vs cosine {cos}");
}
