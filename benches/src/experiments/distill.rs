//! reuse-distill experiments: digits (a wide MLP teacher, a student a tenth its size) and
//! the Debian sections task (MiniLM teacher, a 2-layer student cut from it, trained on
//! hard labels, with KD from the live teacher on the labelled set plus unlabelled
//! synopses, and with KD from a top-k teacher cache).

use std::io::Read;
use std::time::Instant;

use anyhow::{Context, Result};
use indicatif::ProgressBar;
use reuse_core::data::{load_digits, BatchSource, TensorDataset};
use reuse_core::models::{Bert, BertClassifier, SentenceEncoder, TokenizedDataset};
use reuse_core::trainer::accuracy;
use reuse_core::ForwardOptions;
use reuse_core::{Activation, Mlp, Model, Schedule, TrainConfig, Trainable, Trainer};
use reuse_distill::cache::{build_cache, CacheConfig, TeacherCache};
use reuse_distill::losses::KdConfig;
use reuse_distill::student::cut_layers;
use reuse_distill::{dataset_fingerprint, Distiller, Teacher, TeacherSource};
use reuse_testkit::{fixtures_dir, minilm_dir};
use tch::{Device, Kind, Tensor};

use super::{
    insert_spread, mean, median, sample_sd, Counts, Ctx, Knobs, Metrics, OnCuda, Outcome, Sizes,
};
use crate::claims::{pm, Claim};

fn summary(m: &mut Metrics, name: &str, v: &[f64]) {
    m.insert(format!("{name}.test_accuracy"), mean(v));
    m.insert(format!("{name}.test_accuracy_sd"), sample_sd(v));
}

/// `distill.digits_mlp`'s sizes: the teacher's and students' epochs.
pub(super) const DIGITS_MLP_SIZES: Sizes<usize> = Sizes {
    quick: 2,
    cpu: None,
    full: 30,
    cuda: OnCuda::SAME,
};

/// Digits: teacher 64-512-512-10, student 64-64-10 (1.6% of its parameters). KD's
/// temperature and alpha are chosen on a dev split cut from the training images.
pub fn digits_mlp(ctx: &Ctx, bar: &ProgressBar) -> Result<Outcome> {
    let seeds = &ctx.seeds;
    let d = load_digits(&fixtures_dir().join("digits/digits.csv.gz"))?;
    // The last 20% of the training images are the dev split for the KD grid.
    let n = d.train.len() as i64;
    let all = d.train.batch(&(0..n).collect::<Vec<_>>(), Device::Cpu)?;
    let n_fit = n * 4 / 5;
    let fit_set = TensorDataset::new(
        all.inputs.narrow(0, 0, n_fit),
        all.labels.narrow(0, 0, n_fit),
    )?;
    let dev = TensorDataset::new(
        all.inputs.narrow(0, n_fit, n - n_fit),
        all.labels.narrow(0, n_fit, n - n_fit),
    )?;
    let epochs = *ctx.sizes(&DIGITS_MLP_SIZES);
    let cfg = |seed: u64| TrainConfig {
        epochs,
        lr: 2e-3,
        batch_size: 32,
        device: ctx.device,
        seed,
        ..Default::default()
    };
    let teacher_of = |seed: u64| -> Result<Mlp> {
        tch::manual_seed(seed as i64);
        let t = Mlp::new(&[64, 512, 512, 10], Activation::Relu, ctx.device)?;
        Trainer::new(cfg(seed)).fit(&t, &fit_set, None, &mut [])?;
        Ok(t)
    };
    let student_of = |seed: u64, teacher: Option<(&Mlp, f64, f64)>| -> Result<Mlp> {
        tch::manual_seed(1000 + seed as i64);
        let s = Mlp::new(&[64, 64, 10], Activation::Relu, ctx.device)?;
        match teacher {
            Some((t, temp, alpha)) => {
                let mut dist = Distiller::new(TeacherSource::Live(t), KdConfig::new(temp), alpha)?;
                let mut tr = Trainer::new(cfg(seed));
                tr.begin_task(0, &s, &fit_set, &mut [&mut dist])?;
                tr.fit(&s, &fit_set, None, &mut [&mut dist])?;
            }
            None => {
                Trainer::new(cfg(seed)).fit(&s, &fit_set, None, &mut [])?;
            }
        }
        Ok(s)
    };
    // KD grid on dev, seed 0.
    let t0 = teacher_of(0)?;
    let mut best = (f64::MIN, 0.0, 0.0);
    let mut seen = Vec::new();
    for temp in [1.0, 2.0, 4.0] {
        for alpha in [0.0, 0.5] {
            let s = student_of(0, Some((&t0, temp, alpha)))?;
            let acc = accuracy(&s, &dev, 256, ctx.device)?;
            seen.push(format!("T {temp} alpha {alpha}: {acc:.4}"));
            if acc > best.0 {
                best = (acc, temp, alpha);
            }
        }
    }
    let (_, temp, alpha) = best;
    super::say(bar, format!("  digits KD grid on dev: {}", seen.join(", ")));
    let (mut ta, mut ha, mut ka) = (vec![], vec![], vec![]);
    let (mut tp, mut sp) = (0, 0);
    for seed in seeds.iter().copied() {
        let owned;
        let t: &Mlp = if seed == 0 {
            &t0
        } else {
            owned = teacher_of(seed)?;
            &owned
        };
        ta.push(accuracy(t, &d.test, 256, ctx.device)?);
        let h = student_of(seed, None)?;
        ha.push(accuracy(&h, &d.test, 256, ctx.device)?);
        let k = student_of(seed, Some((t, temp, alpha)))?;
        ka.push(accuracy(&k, &d.test, 256, ctx.device)?);
        tp = t.params().count();
        sp = k.params().count();
    }
    let mut m = Metrics::new();
    summary(&mut m, "teacher", &ta);
    summary(&mut m, "student_hard", &ha);
    summary(&mut m, "student_kd", &ka);
    m.insert("student_kd_over_teacher".into(), mean(&ka) / mean(&ta));
    m.insert("params_ratio".into(), sp as f64 / tp as f64);
    m.insert("teacher_params".into(), tp as f64);
    m.insert("student_params".into(), sp as f64);
    m.insert("temperature".into(), temp);
    m.insert("alpha".into(), alpha);
    m.insert("seeds".into(), seeds.len() as f64);
    m.insert("epochs".into(), epochs as f64);
    Ok(Outcome {
        metrics: m,
        notes: vec![
            format!(
                "Teacher MLP 64-512-512-10, student 64-64-10; both trained {epochs} epochs \
                 (AdamW lr 2e-3, batch 32) on the first 80% of the training images; the last \
                 20% are the dev split. KD (forward KL with T², alpha * CE + (1 - alpha) * \
                 KD) took T and alpha from a grid on dev at seed 0: {}; chose T {temp}, alpha \
                 {alpha}.",
                seen.join(", ")
            ),
            format!(
                "Seeds {seeds:?}: each seed trains its own teacher, hard-label student and KD \
                 student (from that seed's teacher); accuracies on the 360 test images are \
                 means and sample sds over the seeds."
            ),
        ],
    })
}

/// The eight-section part of the synopses fixture: texts nobody labelled for this task
/// (the teacher labels them), never in the sections splits.
pub(super) fn pool(classes: &[String]) -> Result<Vec<String>> {
    synopses(Some(classes))
}

/// How much of the sections splits and the unlabelled pool an experiment keeps: the
/// first this many texts of each (`usize::MAX`: all).
#[derive(Clone, Copy)]
pub(super) struct Cut {
    pub train: usize,
    pub dev: usize,
    pub test: usize,
    pub pool: usize,
}

impl Cut {
    pub const ALL: Cut = Cut {
        train: usize::MAX,
        dev: usize::MAX,
        test: usize::MAX,
        pool: usize::MAX,
    };
    /// A few dozen texts each: quick sizes.
    pub const QUICK: Cut = Cut {
        train: 96,
        dev: 64,
        test: 64,
        pool: 96,
    };

    #[cfg_attr(not(test), allow(dead_code))] // read by the tests only
    pub fn counts(self) -> Counts {
        vec![
            ("train_texts", self.train),
            ("dev_texts", self.dev),
            ("test_texts", self.test),
            ("pool_texts", self.pool),
        ]
    }
}

/// The Debian sections splits and the unlabelled eight-section pool, `cut`.
pub(super) fn sections_and_pool(cut: Cut) -> Result<(reuse_core::data::TextSplits, Vec<String>)> {
    let mut splits = super::sections()?;
    let mut pool_texts = pool(&splits.classes)?;
    splits.train.texts.truncate(cut.train);
    splits.train.labels.truncate(cut.train);
    splits.test.texts.truncate(cut.test);
    splits.test.labels.truncate(cut.test);
    splits.dev.texts.truncate(cut.dev);
    splits.dev.labels.truncate(cut.dev);
    pool_texts.truncate(cut.pool);
    Ok((splits, pool_texts))
}

/// The synopses fixture's texts, of every section or of `sections` only.
pub(super) fn synopses(sections: Option<&[String]>) -> Result<Vec<String>> {
    let path = fixtures_dir().join("debian_synopses/synopses.tsv.gz");
    let mut s = String::new();
    flate2::read::GzDecoder::new(
        std::fs::File::open(&path).with_context(|| format!("{}", path.display()))?,
    )
    .read_to_string(&mut s)?;
    Ok(s.lines()
        .filter_map(|l| l.split_once('\t'))
        .filter(|(sec, _)| sections.is_none_or(|c| c.iter().any(|c| c == sec)))
        .map(|(_, t)| t.to_string())
        .collect())
}

pub(super) const MAX_LEN: usize = 32;
pub(super) const BATCH: usize = 32;

/// What `distill.minilm_sections` leaves for `quant.distill_plus_quant` in the same run:
/// its teacher and, per seed, its student trained from the top-4 cache.
pub(super) struct SectionsKd {
    pub teacher: BertClassifier,
    pub teacher_test: f64,
    pub teacher_lr: f64,
    pub student_lr: f64,
    /// One per seed of the run, in order.
    pub students: Vec<BertClassifier>,
    pub kd_epochs: usize,
}

/// `distill.minilm_sections`' sizes.
pub(super) struct SectionsSizes {
    cut: Cut,
    /// The teacher's and the hard-label students' epochs over the train split.
    epochs: usize,
    /// The KD students' epochs over the train split plus the pool.
    kd_epochs: usize,
    /// How the students' lr, and whether they train the word embeddings, are chosen.
    student: StudentChoice,
    /// Interleaved rounds of the inference timing.
    rounds: usize,
    /// What the notes add after the KD students' epochs.
    kd_note: &'static str,
}

/// How `distill.minilm_sections` chooses its students' lr and frozen embeddings.
#[derive(Clone, Copy, PartialEq, Eq)]
enum StudentChoice {
    /// The grid on dev at seed 0 with hard labels.
    Grid,
    /// The choice the grid made at the full size on the CPU (not run again).
    FullSizeChoice,
}

const SECTIONS_FULL: SectionsSizes = SectionsSizes {
    cut: Cut::ALL,
    epochs: 3,
    kd_epochs: 3,
    student: StudentChoice::Grid,
    rounds: 20,
    kd_note: "",
};

pub(super) const MINILM_SECTIONS_SIZES: Sizes<SectionsSizes> = Sizes {
    quick: SectionsSizes {
        cut: Cut::QUICK,
        epochs: 1,
        kd_epochs: 1,
        rounds: 3,
        ..SECTIONS_FULL
    },
    // One KD epoch over the labelled set plus the pool, and the grid's full-size choice.
    cpu: Some(SectionsSizes {
        kd_epochs: 1,
        student: StudentChoice::FullSizeChoice,
        kd_note: " (the CPU size: the full size gives them as many epochs as the teacher)",
        ..SECTIONS_FULL
    }),
    full: SECTIONS_FULL,
    cuda: OnCuda {
        quick: None,
        full: Some(SectionsSizes {
            rounds: 50,
            ..SECTIONS_FULL
        }),
    },
};

impl Knobs for SectionsSizes {
    fn counts(&self) -> Counts {
        let grid = match self.student {
            StudentChoice::Grid => 6,
            StudentChoice::FullSizeChoice => 0,
        };
        let mut c = self.cut.counts();
        c.extend([
            ("epochs", self.epochs),
            ("kd_epochs", self.kd_epochs),
            ("student_grid", grid),
            ("rounds", self.rounds),
        ]);
        c
    }
}

/// Debian sections: MiniLM teacher fine-tuned on the train split; students of 2 layers
/// cut from it (layers 0 and 5, the head copied), trained (a) on hard labels, (b) with KD
/// from the live teacher on the labelled set plus the unlabelled eight-section
/// synopses, (c) as (b) from a top-4 cache.
pub fn minilm_sections(ctx: &Ctx, bar: &ProgressBar) -> Result<Outcome> {
    let seeds = &ctx.seeds;
    let sizes = ctx.sizes(&MINILM_SECTIONS_SIZES);
    let dir = minilm_dir()?;
    let (splits, pool_texts) = sections_and_pool(sizes.cut)?;
    let n_classes = splits.classes.len() as i64;
    let enc = SentenceEncoder::load(&dir, ctx.device, Kind::Float)?;
    let tok = enc.tokenizer.clone();
    drop(enc);
    let train = TokenizedDataset::new(&tok, &splits.train, MAX_LEN)?;
    let dev = TokenizedDataset::new(&tok, &splits.dev, MAX_LEN)?;
    let test = TokenizedDataset::new(&tok, &splits.test, MAX_LEN)?;
    let mut with_pool = splits.train.clone();
    with_pool.texts.extend(pool_texts.iter().cloned());
    with_pool
        .labels
        .extend(std::iter::repeat_n(-100, pool_texts.len()));
    let train_pool = TokenizedDataset::new(&tok, &with_pool, MAX_LEN)?;
    let (epochs, kd_epochs) = (sizes.epochs, sizes.kd_epochs);
    let cfg = |lr: f64, seed: u64| TrainConfig {
        epochs,
        batch_size: BATCH,
        lr,
        weight_decay: 0.01,
        schedule: Schedule::Linear { warmup: 0 },
        device: ctx.device,
        seed,
        ..Default::default()
    };
    let warm = |c: TrainConfig, data: &dyn BatchSource| -> TrainConfig {
        let steps = data.len().div_ceil(BATCH) * c.epochs;
        TrainConfig {
            schedule: Schedule::Linear { warmup: steps / 10 },
            ..c
        }
    };

    // The teacher: full fine-tuning at the lr the PEFT sweep found best on dev.
    bar.set_message("distill.minilm_sections teacher");
    tch::manual_seed(0);
    let teacher = BertClassifier::new(Bert::load(&dir, ctx.device, Kind::Float)?, n_classes);
    let t_lr = 2e-4;
    let rt = Trainer::new(warm(cfg(t_lr, 0), &train)).fit(&teacher, &train, None, &mut [])?;
    let teacher_test = accuracy(&teacher, &test, 64, ctx.device)?;
    let teacher_dev = accuracy(&teacher, &dev, 64, ctx.device)?;
    super::say(
        bar,
        format!(
            "  teacher: dev {teacher_dev:.4}, test {teacher_test:.4} ({:.0} s)",
            rt.seconds
        ),
    );
    let layers = [0usize, 5];
    // `frozen`: the word-embedding table (11.7M of the student's 15.6M values), copied
    // from the teacher, is not trained.
    let student_of = |seed: u64, frozen: bool| -> Result<BertClassifier> {
        tch::manual_seed(seed as i64);
        let s = with_teachers_head(cut_layers(&teacher.bert, &layers)?, &teacher)?;
        if frozen {
            s.params()
                .select_glob("embeddings.word_embeddings.*")?
                .freeze();
        }
        Ok(s)
    };

    // The students' lr, and whether they train the word embeddings: chosen on dev at
    // seed 0 with hard labels; KD reuses both. The CPU size takes the choice this grid
    // made at the full size on the CPU (benches/reports/2026-11-29-cpu-distill-minilm.json:
    // lr 1e-4, embeddings trained) instead of running it again.
    let mut best = (f64::MIN, 0.0, false);
    let mut seen = Vec::new();
    let grid: (&[bool], &[f64]) = match sizes.student {
        StudentChoice::Grid => (&[false, true], &[1e-4, 3e-4, 1e-3]),
        StudentChoice::FullSizeChoice => {
            best = (f64::NAN, 1e-4, false);
            seen.push("none run at the CPU size: lr 1e-4 with the embeddings trained, the full-size grid's choice on this CPU (0.8530 on dev at every lr trained, 0.8478-0.8504 frozen; benches/reports/2026-11-29-cpu-distill-minilm.json)".to_string());
            (&[], &[])
        }
    };
    for &frozen in grid.0 {
        for &lr in grid.1 {
            let s = student_of(0, frozen)?;
            Trainer::new(warm(cfg(lr, 0), &train)).fit(&s, &train, None, &mut [])?;
            let acc = accuracy(&s, &dev, 64, ctx.device)?;
            let what = if frozen { "frozen" } else { "trained" };
            seen.push(format!("{lr:e} embeddings {what}: {acc:.4}"));
            if acc > best.0 {
                best = (acc, lr, frozen);
            }
        }
    }
    let (_, s_lr, frozen) = best;
    super::say(
        bar,
        format!("  student grid on dev (hard labels): {}", seen.join(", ")),
    );
    let kd = KdConfig::new(2.0);
    let alpha = 0.5;

    // The top-k cache over the labelled set plus the pool, built once.
    let cache_dir = ctx.root.join("target/reuse-report/distill-cache");
    let _ = std::fs::remove_dir_all(&cache_dir);
    let t0 = Instant::now();
    let ccfg = CacheConfig::top_k(4).with_dtype(Kind::Half);
    build_cache(&teacher, &train_pool, &cache_dir, &ccfg, 128, ctx.device)?;
    let cache_build_s = t0.elapsed().as_secs_f64();
    let cache = TeacherCache::open(
        &cache_dir,
        Some(&teacher.fingerprint()),
        Some(&dataset_fingerprint(&train_pool)?),
    )?;

    let (mut hard, mut live, mut cached) = (vec![], vec![], vec![]);
    let mut cached_students = Vec::new();
    let (mut live_epoch_s, mut cached_epoch_s) = (vec![], vec![]);
    let (mut live_step_ms, mut cached_step_ms) = (vec![], vec![]);
    let (mut hard_step_ms, mut cached_over_hard) = (vec![], vec![]);
    for seed in seeds.iter().copied() {
        bar.set_message(format!("distill.minilm_sections seed {seed}"));
        let s = student_of(seed, frozen)?;
        let r = Trainer::new(warm(cfg(s_lr, seed), &train)).fit(&s, &train, None, &mut [])?;
        hard_step_ms.push(1000.0 * r.seconds / r.steps as f64);
        hard.push(accuracy(&s, &test, 64, ctx.device)?);

        for (source, acc, epoch_s, step_ms) in [
            (
                TeacherSource::Live(&teacher),
                &mut live,
                &mut live_epoch_s,
                &mut live_step_ms,
            ),
            (
                TeacherSource::Cached(&cache),
                &mut cached,
                &mut cached_epoch_s,
                &mut cached_step_ms,
            ),
        ] {
            let is_cached = matches!(source, TeacherSource::Cached(_));
            let s = student_of(seed, frozen)?;
            let mut d = Distiller::new(source, kd, alpha)?;
            let c = TrainConfig {
                epochs: kd_epochs,
                ..cfg(s_lr, seed)
            };
            let mut tr = Trainer::new(warm(c, &train_pool));
            tr.begin_task(0, &s, &train_pool, &mut [&mut d])?;
            let r = tr.fit(&s, &train_pool, None, &mut [&mut d])?;
            epoch_s.push(r.seconds / kd_epochs as f64);
            step_ms.push(1000.0 * r.seconds / r.steps as f64);
            acc.push(accuracy(&s, &test, 64, ctx.device)?);
            if is_cached {
                cached_students.push(s);
                cached_over_hard
                    .push(step_ms[step_ms.len() - 1] / hard_step_ms[hard_step_ms.len() - 1]);
            }
        }
        super::say(
            bar,
            format!(
                "  seed {seed}: hard {:.4}, kd live {:.4}, kd cached {:.4}",
                hard[hard.len() - 1],
                live[live.len() - 1],
                cached[cached.len() - 1]
            ),
        );
    }

    // Inference: teacher and student forwards on the same batch, interleaved rounds.
    let student = student_of(0, frozen)?;
    let b = test.batch(
        &(0..(test.len() as i64).min(64)).collect::<Vec<_>>(),
        ctx.device,
    )?;
    let time = |m: &dyn Trainable| -> Result<f64> {
        let t0 = Instant::now();
        tch::no_grad(|| m.forward(&b, false, ForwardOptions::default()))?;
        if ctx.device.is_cuda() {
            tch::Cuda::synchronize(0);
        }
        Ok(t0.elapsed().as_secs_f64())
    };
    let rounds = sizes.rounds;
    let (mut ratio, mut t_ms, mut s_ms) = (vec![], vec![], vec![]);
    time(&teacher)?;
    time(&student)?;
    for _ in 0..rounds {
        let t = time(&teacher)?;
        let s = time(&student)?;
        ratio.push(t / s);
        t_ms.push(1000.0 * t);
        s_ms.push(1000.0 * s);
    }
    let count = |m: &BertClassifier, embeddings: bool| -> f64 {
        m.named_parameters()
            .iter()
            .filter(|(n, _)| embeddings || !n.contains("embeddings."))
            .map(|(_, t)| t.numel())
            .sum::<usize>() as f64
    };

    let mut m = Metrics::new();
    m.insert("teacher.test_accuracy".into(), teacher_test);
    m.insert("teacher.dev_accuracy".into(), teacher_dev);
    let (student_params, teacher_params) = (count(&student, true), count(&teacher, true));
    let (student_body, teacher_body) = (count(&student, false), count(&teacher, false));
    drop(student);
    summary(&mut m, "student_hard", &hard);
    summary(&mut m, "student_kd", &live);
    summary(&mut m, "student_cached", &cached);
    m.insert("student_kd_over_teacher".into(), mean(&live) / teacher_test);
    m.insert(
        "student_cached_over_teacher".into(),
        mean(&cached) / teacher_test,
    );
    m.insert("params_ratio".into(), student_params / teacher_params);
    m.insert(
        "params_ratio_without_embeddings".into(),
        student_body / teacher_body,
    );
    insert_spread(&mut m, "inference_speedup", &ratio);
    insert_spread(&mut m, "teacher_forward_ms", &t_ms);
    insert_spread(&mut m, "student_forward_ms", &s_ms);
    insert_spread(&mut m, "live_epoch_seconds", &live_epoch_s);
    insert_spread(&mut m, "cached_epoch_seconds", &cached_epoch_s);
    insert_spread(&mut m, "live_kd_step_ms", &live_step_ms);
    insert_spread(&mut m, "cached_kd_step_ms", &cached_step_ms);
    insert_spread(&mut m, "hard_label_step_ms", &hard_step_ms);
    insert_spread(&mut m, "cached_kd_over_hard_step", &cached_over_hard);
    m.insert(
        "cached_epoch_speedup".into(),
        median(&live_epoch_s) / median(&cached_epoch_s),
    );
    m.insert("cache_bytes_per_example".into(), cache.bytes_per_example());
    m.insert("cache_build_seconds".into(), cache_build_s);
    m.insert("student_lr".into(), s_lr);
    m.insert(
        "student_word_embeddings_frozen".into(),
        f64::from(u8::from(frozen)),
    );
    m.insert("teacher_lr".into(), t_lr);
    m.insert("epochs".into(), epochs as f64);
    m.insert("kd_epochs".into(), kd_epochs as f64);
    m.insert("seeds".into(), seeds.len() as f64);
    m.insert("train_examples".into(), train.len() as f64);
    m.insert("pool_examples".into(), pool_texts.len() as f64);
    // quant.distill_plus_quant trims and quantizes these students when it runs later in
    // this run, rather than training the same teacher and students again.
    ctx.share(
        "distill.minilm_sections",
        SectionsKd {
            teacher,
            teacher_test,
            teacher_lr: t_lr,
            student_lr: s_lr,
            students: cached_students,
            kd_epochs,
        },
    );
    Ok(Outcome {
        metrics: m,
        notes: vec![
            format!(
                "Teacher: all-MiniLM-L6-v2 + a linear head, fully fine-tuned on the {} train \
                 texts for {epochs} epochs (batch {BATCH}, max length {MAX_LEN}, AdamW lr \
                 {t_lr:e} — the best dev lr of peft.dev_sweep for full fine-tuning —, weight \
                 decay 0.01, linear schedule, 10% warm-up), seed 0; one teacher serves every \
                 student.",
                train.len()
            ),
            format!(
                "Students: embeddings and layers {layers:?} of the fine-tuned teacher, its \
                 head copied. Their lr, and whether the word-embedding table (copied from \
                 the teacher) trains, were chosen on dev at seed 0 with hard labels from \
                 {{{}}}: {s_lr:e}, embeddings {}; KD reuses both, with T = 2 and alpha = 0.5 as the issue's PyTorch \
                 reference (not tuned here). student_hard trains on the labelled train split; \
                 student_kd and student_cached on it plus the {} eight-section synopses of \
                 fixtures/debian_synopses (labelled -100: the teacher alone labels them), \
                 forward KL with T², alpha * CE + (1 - alpha) * KD; student_cached reads the \
                 teacher's top-4 log-probabilities (f16) from a cache built once ({:.1} s), \
                 the missing tail renormalised away. Same batch and schedule for all; \
                 student_hard {epochs} epochs over the train split, the KD students \
                 {kd_epochs} over train plus pool{}. Accuracies: means and sample sds over \
                 seeds {seeds:?} on the {} test texts.",
                seen.join(", "),
                if frozen { "frozen" } else { "trained" },
                pool_texts.len(),
                cache_build_s,
                sizes.kd_note,
                test.len()
            ),
            format!(
                "inference_speedup: teacher / student forward time on the same {}-text test \
                 batch, {rounds} interleaved rounds (median, spread in *_sd/min/max). \
                 cached_epoch_speedup: median live-KD epoch time over median cached-KD \
                 epoch time (one sample per seed). cached_kd_over_hard_step: per seed, the \
                 cached-KD run's mean step time over the hard-label run's (the same student \
                 and batch size; an epoch of either is its steps times this). params_ratio counts every parameter; \
                 `_without_embeddings` leaves out the embedding tables (11.7M of MiniLM's \
                 22.7M).",
                b.len()
            ),
        ],
    })
}

/// A classifier on `bert` (a student cut from `teacher`) whose head starts as the
/// teacher's (DistilBERT copies what it can).
pub(super) fn with_teachers_head(bert: Bert, teacher: &BertClassifier) -> Result<BertClassifier> {
    let s = BertClassifier::new(bert, teacher.head.classifier.out_features());
    tch::no_grad(|| {
        for ((_, mut dst), (_, src)) in s
            .head
            .named_parameters()
            .into_iter()
            .zip(teacher.head.named_parameters())
        {
            dst.copy_(&src);
        }
    });
    Ok(s)
}

/// Every synopsis of the fixture (the embedding-distillation text).
fn all_synopses() -> Result<Vec<String>> {
    synopses(None)
}

/// Accuracy of a linear probe (a linear layer on frozen embeddings, AdamW, 100 epochs)
/// whose lr is chosen on dev from {1e-2, 3e-2, 1e-1}: (test accuracy, chosen lr).
fn probe(
    train: (&Tensor, &[i64]),
    dev: (&Tensor, &[i64]),
    test: (&Tensor, &[i64]),
    classes: i64,
    device: Device,
) -> Result<(f64, f64)> {
    let (head, lr) = fit_probe(train, dev, classes, device, 0)?;
    Ok((probe_accuracy(&head, test, device)?, lr))
}

/// A linear probe (a linear layer on frozen embeddings, AdamW, 100 epochs, batch 256)
/// trained with `seed`, its lr chosen on dev from {1e-2, 3e-2, 1e-1}: (head, lr).
pub(super) fn fit_probe(
    train: (&Tensor, &[i64]),
    dev: (&Tensor, &[i64]),
    classes: i64,
    device: Device,
    seed: u64,
) -> Result<(Mlp, f64)> {
    let tr = TensorDataset::new(train.0.to_device(Device::Cpu), Tensor::from_slice(train.1))?;
    let mut best: Option<(f64, f64, Mlp)> = None;
    for lr in [1e-2, 3e-2, 1e-1] {
        tch::manual_seed(seed as i64);
        let head = Mlp::new(&[train.0.size()[1], classes], Activation::Relu, device)?;
        Trainer::new(TrainConfig {
            epochs: 100,
            batch_size: 256,
            lr,
            device,
            seed,
            ..Default::default()
        })
        .fit(&head, &tr, None, &mut [])?;
        let acc = probe_accuracy(&head, dev, device)?;
        if best.as_ref().is_none_or(|b| acc > b.0) {
            best = Some((acc, lr, head));
        }
    }
    let (_, lr, head) = best.context("empty probe grid")?;
    Ok((head, lr))
}

/// Accuracy of a probe on embeddings `[n, d]` with labels.
pub(super) fn probe_accuracy(head: &Mlp, data: (&Tensor, &[i64]), device: Device) -> Result<f64> {
    let ds = TensorDataset::new(data.0.to_device(Device::Cpu), Tensor::from_slice(data.1))?;
    Ok(accuracy(head, &ds, 1024, device)?)
}

/// Cosine of each row of `a` to the same row of `b`.
pub(super) fn row_cosines(a: &Tensor, b: &Tensor) -> Tensor {
    Tensor::cosine_similarity(&a.to_kind(Kind::Float), &b.to_kind(Kind::Float), -1, 1e-8)
}

/// `distill.minilm_embeddings`' sizes.
pub(super) struct EmbeddingsSizes {
    /// The synopses cut to their first this many (`usize::MAX`: all).
    texts: usize,
    /// The grid's seeded sample of them (`None`: all of them).
    grid_texts: Option<usize>,
    /// Interleaved rounds of the encode timing, per seed.
    rounds: usize,
}

const EMBEDDINGS_FULL: EmbeddingsSizes = EmbeddingsSizes {
    texts: usize::MAX,
    grid_texts: Some(12_000),
    rounds: 5,
};

/// The seeds train on every synopsis for one epoch (the budget of the PyTorch
/// recipe); the grid on a seeded sample of 12,000 on a CPU, every synopsis on CUDA.
pub(super) const MINILM_EMBEDDINGS_SIZES: Sizes<EmbeddingsSizes> = Sizes {
    quick: EmbeddingsSizes {
        texts: 400,
        grid_texts: Some(300),
        rounds: 1,
    },
    cpu: None,
    full: EMBEDDINGS_FULL,
    cuda: OnCuda {
        quick: None,
        full: Some(EmbeddingsSizes {
            grid_texts: None,
            ..EMBEDDINGS_FULL
        }),
    },
};

impl Knobs for EmbeddingsSizes {
    fn counts(&self) -> Counts {
        vec![
            ("texts", self.texts),
            ("grid_texts", self.grid_texts.unwrap_or(usize::MAX)),
            ("rounds", self.rounds),
        ]
    }
}

/// A 3-layer sentence-embedding student (3 of MiniLM's 6 layers, chosen on held-out
/// text) trained to match the teacher's embeddings on the synopses: cosine to the
/// teacher in and out of domain, a linear probe on the sections task, speed.
pub fn minilm_embeddings(ctx: &Ctx, bar: &ProgressBar) -> Result<Outcome> {
    let seeds = &ctx.seeds;
    let sizes = ctx.sizes(&MINILM_EMBEDDINGS_SIZES);
    use reuse_distill::embed::{distill_embeddings_with, EmbedDistillConfig, EmbedLoss};
    let dir = minilm_dir()?;
    let mut texts = all_synopses()?;
    texts.truncate(sizes.texts);
    let splits = super::sections()?;
    let ood: Vec<String> = std::fs::read_to_string(fixtures_dir().join("appstream/sentences.txt"))?
        .lines()
        .map(str::to_string)
        .collect();
    let grid_texts = sizes.grid_texts.unwrap_or(texts.len());
    let teacher = reuse_core::models::SentenceEncoder::load(&dir, ctx.device, Kind::Float)?;
    bar.set_message("distill.minilm_embeddings teacher pass");
    let t0 = Instant::now();
    let all_targets = teacher.encode(&texts.iter().map(String::as_str).collect::<Vec<_>>(), 128)?;
    let teacher_pass_s = t0.elapsed().as_secs_f64();
    // The recipe (which 3 layers, lr) is chosen on the held-out 5% of the distillation
    // text at seed 0 (that held-out text is the dev split here), from a small grid. The
    // loss is the cosine: on an H200 at every synopsis it beat normalised MSE at the same
    // lr on that held-out text (0.9181 against 0.9174 at 5e-4), and 1e-3 beat 5e-4
    // (0.9290), the edge of that grid. A first CPU grid (12,000 texts, lr 2e-3) put
    // students that keep the last layer far ahead: layers 0, 2, 4 0.8680; 1, 3, 5
    // 0.9218; 0, 2, 5 0.9236 (0, 2, 4 at 1e-3 0.8625, at 4e-3 0.8490).
    let grid: &[(&[usize], f64)] = &[
        (&[0, 2, 5], 1e-3),
        (&[0, 2, 5], 2e-3),
        (&[0, 2, 5], 4e-3),
        (&[1, 3, 5], 2e-3),
        (&[0, 2, 4], 2e-3),
    ];
    let loss = EmbedLoss::Cosine;
    let base = EmbedDistillConfig {
        layers: vec![0, 2, 4],
        epochs: 1,
        batch_size: 32,
        max_len: 128,
        device: ctx.device,
        ..Default::default()
    };
    let mut best: Option<(f64, &[usize], f64)> = None;
    let mut seen = Vec::new();
    for &(layers, lr) in grid {
        bar.set_message(format!("distill.minilm_embeddings grid {layers:?} {lr:e}"));
        let cfg = EmbedDistillConfig {
            layers: layers.to_vec(),
            loss,
            lr,
            seed: 0,
            max_texts: Some(grid_texts),
            ..base.clone()
        };
        let (_, r) = distill_embeddings_with(&dir, &texts, Some(&all_targets), &cfg, false)?;
        let c = r.held_out_cosine.unwrap_or(f64::NAN);
        seen.push(format!("layers {layers:?} lr {lr:e}: {c:.4}"));
        if best.as_ref().is_none_or(|b| c > b.0) {
            best = Some((c, layers, lr));
        }
    }
    let (_, layers, lr) = best.context("empty grid")?;
    super::say(
        bar,
        format!("  embedding recipe on held-out text: {}", seen.join(", ")),
    );

    fn refs(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
    let (tr_t, dv_t, te_t, ood_t) = (
        refs(&splits.train.texts),
        refs(&splits.dev.texts),
        refs(&splits.test.texts),
        refs(&ood),
    );
    let t_emb = (
        teacher.encode(&tr_t, 128)?,
        teacher.encode(&dv_t, 128)?,
        teacher.encode(&te_t, 128)?,
        teacher.encode(&ood_t, 128)?,
    );
    let n_classes = splits.classes.len() as i64;
    let (t_probe, t_probe_lr) = probe(
        (&t_emb.0, &splits.train.labels),
        (&t_emb.1, &splits.dev.labels),
        (&t_emb.2, &splits.test.labels),
        n_classes,
        ctx.device,
    )?;
    let (mut cin, mut cin_min, mut cout, mut cout_min, mut probes, mut secs) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut speed = vec![];
    let mut student_params = 0;
    let mut teacher_params = 0;
    for seed in seeds.iter().copied() {
        bar.set_message(format!("distill.minilm_embeddings seed {seed}"));
        let cfg = EmbedDistillConfig {
            layers: layers.to_vec(),
            loss,
            lr,
            seed,
            ..base.clone()
        };
        let (student, r) = distill_embeddings_with(&dir, &texts, Some(&all_targets), &cfg, false)?;
        secs.push(r.seconds);
        student_params = r.student_params;
        teacher_params = r.teacher_params;
        let s_test = student.encode(&te_t, 128)?;
        let s_ood = student.encode(&ood_t, 128)?;
        let ci = row_cosines(&s_test, &t_emb.2);
        let co = row_cosines(&s_ood, &t_emb.3);
        cin.push(ci.mean(Kind::Float).double_value(&[]));
        cin_min.push(ci.min().double_value(&[]));
        cout.push(co.mean(Kind::Float).double_value(&[]));
        cout_min.push(co.min().double_value(&[]));
        let (p, _) = probe(
            (&student.encode(&tr_t, 128)?, &splits.train.labels),
            (&student.encode(&dv_t, 128)?, &splits.dev.labels),
            (&s_test, &splits.test.labels),
            n_classes,
            ctx.device,
        )?;
        probes.push(p);
        // Encode time of the test texts, teacher and student interleaved.
        for _ in 0..sizes.rounds {
            let t0 = Instant::now();
            let _ = teacher.encode(&te_t, 128)?.to_device(Device::Cpu);
            let tt = t0.elapsed().as_secs_f64();
            let t0 = Instant::now();
            let _ = student.encode(&te_t, 128)?.to_device(Device::Cpu);
            speed.push(tt / t0.elapsed().as_secs_f64());
        }
        super::say(
            bar,
            format!(
                "  seed {seed}: in-domain cosine {:.4}, out-of-domain {:.4}, probe {:.4}, {:.0} s",
                cin[cin.len() - 1],
                cout[cout.len() - 1],
                p,
                r.seconds
            ),
        );
    }
    let mut m = Metrics::new();
    let mut put = |k: &str, v: &[f64]| {
        m.insert(k.to_string(), mean(v));
        m.insert(format!("{k}_sd"), sample_sd(v));
    };
    put("cosine_in_domain_mean", &cin);
    put("cosine_in_domain_min", &cin_min);
    put("cosine_out_of_domain_mean", &cout);
    put("cosine_out_of_domain_min", &cout_min);
    put("student.probe_accuracy", &probes);
    m.insert("teacher.probe_accuracy".into(), t_probe);
    m.insert("teacher.probe_lr".into(), t_probe_lr);
    m.insert("probe_gap_points".into(), 100.0 * (t_probe - mean(&probes)));
    insert_spread(&mut m, "inference_speedup", &speed);
    insert_spread(&mut m, "train_seconds", &secs);
    m.insert("train_texts".into(), (texts.len() as f64 * 0.95).round());
    m.insert("grid_texts".into(), grid_texts as f64);
    m.insert("teacher_pass_seconds".into(), teacher_pass_s);
    m.insert(
        "params_ratio".into(),
        student_params as f64 / teacher_params as f64,
    );
    m.insert("lr".into(), lr);
    m.insert("student_layers".into(), layers.len() as f64);
    m.insert("seeds".into(), seeds.len() as f64);
    Ok(Outcome {
        metrics: m,
        notes: vec![
            format!(
                "Student: embeddings and layers {layers:?} of all-MiniLM-L6-v2, mean pooling \
                 and normalisation as the teacher, cosine loss; each seed trained 1 epoch \
                 (batch 32, AdamW, weight decay 0.01, linear schedule, 10% warm-up) on the \
                 {} synopses of fixtures/debian_synopses (95% train, 5% held out), against \
                 the teacher's embeddings computed once up front ({teacher_pass_s:.0} s, \
                 shared by every run). Layers and lr chosen at seed 0 on the held-out 5% of \
                 a seeded sample of {grid_texts} texts: {}; chose layers {layers:?} at \
                 {lr:e}.",
                texts.len(),
                seen.join(", ")
            ),
            format!(
                "Cosine to the teacher's embedding of the same text: in domain on the {} \
                 sections test texts, out of domain on the {} AppStream sentences of \
                 fixtures/appstream; means over seeds {seeds:?} of each run's mean and min.",
                te_t.len(),
                ood_t.len()
            ),
            "Probe: a linear layer on frozen embeddings trained on the sections train split \
             (AdamW, 100 epochs, batch 256), lr chosen on the dev split from {1e-2, 3e-2, \
             1e-1}, separately for the teacher and each student; test accuracy."
                .into(),
            "inference_speedup: teacher / student time to encode the test texts (batch 128), \
             interleaved rounds, 5 per seed."
                .into(),
        ],
    })
}

/// The claims-table rows this file's experiments measure (see `crate::claims`).
pub const CLAIMS: &[Claim] = &[
    Claim {
        text: "A distilled student keeps >= 0.95x its teacher's accuracy (MiniLM, 2 of 6 layers, KD with unlabelled text)",
        experiment: "distill.minilm_sections",
        target: ">= 0.95x",
        keys: &[
            "student_kd_over_teacher",
            "student_kd.test_accuracy",
            "student_kd.test_accuracy_sd",
            "teacher.test_accuracy",
        ],
        eval: |g| {
            let r = g("student_kd_over_teacher");
            (
                format!("{r:.3}x"),
                format!(
                    "student {} vs teacher {:.4}",
                    pm(g("student_kd.test_accuracy"), g("student_kd.test_accuracy_sd")),
                    g("teacher.test_accuracy")
                ),
                Some(r >= 0.95),
            )
        },
    },
    Claim {
        text: "... and KD trains it at least as well as hard labels alone (same student, lr and budget)",
        experiment: "distill.minilm_sections",
        target: "KD >= hard labels (means over seeds)",
        keys: &[
            "student_kd.test_accuracy",
            "student_kd.test_accuracy_sd",
            "student_hard.test_accuracy",
            "student_hard.test_accuracy_sd",
        ],
        eval: |g| {
            let (kd, hard) = (
                g("student_kd.test_accuracy"),
                g("student_hard.test_accuracy"),
            );
            (
                format!("{:+.2} points", 100.0 * (kd - hard)),
                format!(
                    "KD {} vs hard labels {}",
                    pm(kd, g("student_kd.test_accuracy_sd")),
                    pm(hard, g("student_hard.test_accuracy_sd"))
                ),
                Some(kd >= hard),
            )
        },
    },
    Claim {
        text: "... at a fraction of the size",
        experiment: "distill.minilm_sections",
        target: "< 1x the teacher's parameters",
        keys: &["params_ratio", "params_ratio_without_embeddings"],
        eval: |g| {
            let r = g("params_ratio");
            (
                format!("{r:.3}x"),
                format!(
                    "{:.3}x without the embedding table",
                    g("params_ratio_without_embeddings")
                ),
                Some(r < 1.0),
            )
        },
    },
    Claim {
        text: "... and several times the speed",
        experiment: "distill.minilm_sections",
        target: ">= 2.5x faster inference",
        keys: &["inference_speedup_median", "inference_speedup_sd"],
        eval: |g| {
            let s = g("inference_speedup_median");
            (
                format!("{s:.2}x"),
                format!("sd {:.2} over rounds", g("inference_speedup_sd")),
                Some(s >= 2.5),
            )
        },
    },
    Claim {
        text: "A teacher cache puts KD at the cost of hard labels: the cached-KD step over the hard-label step of the same student",
        experiment: "distill.minilm_sections",
        target: "<= 1.15x",
        // Reports older than this row (2026-12-08) measured the epoch ratio alone: they
        // show it, with no figure against the target.
        keys: &["cached_epoch_speedup"],
        eval: |g| {
            let r = g("cached_kd_over_hard_step_median");
            if r.is_nan() {
                return (
                    "—".into(),
                    format!(
                        "the report predates this measure; live / cached KD epoch {:.2}x",
                        g("cached_epoch_speedup")
                    ),
                    None,
                );
            }
            (
                format!("{r:.2}x"),
                format!(
                    "sd {:.2} over seeds; live / cached KD epoch {:.2}x",
                    g("cached_kd_over_hard_step_sd"),
                    g("cached_epoch_speedup")
                ),
                Some(r <= 1.15),
            )
        },
    },
    Claim {
        text: "A distilled student keeps >= 0.95x its teacher's accuracy (digits MLP, 1.6% of its size)",
        experiment: "distill.digits_mlp",
        target: ">= 0.95x",
        keys: &[
            "student_kd_over_teacher",
            "student_kd.test_accuracy",
            "student_kd.test_accuracy_sd",
            "params_ratio",
        ],
        eval: |g| {
            let r = g("student_kd_over_teacher");
            (
                format!("{r:.3}x"),
                format!(
                    "student {} at {:.3}x the parameters",
                    pm(g("student_kd.test_accuracy"), g("student_kd.test_accuracy_sd")),
                    g("params_ratio")
                ),
                Some(r >= 0.95),
            )
        },
    },
];
