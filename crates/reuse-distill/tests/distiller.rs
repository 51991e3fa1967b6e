//! The Distiller technique in core's trainer: its loss is alpha * CE + (1 - alpha) * KD
//! as the formula says, a student learns from a teacher on text nobody labelled, and
//! mismatched students and teachers are refused before training.

use reuse_core::data::{load_digits, Batch, BatchSource, TensorDataset};
use reuse_core::loss::cross_entropy;
use reuse_core::models::{Bert, BertClassifier, BertConfig};
use reuse_core::trainer::{accuracy, StepContext};
use reuse_core::ForwardOptions;
use reuse_core::{Activation, Mlp, Model, Schedule, Technique, TrainConfig, Trainable, Trainer};
use reuse_distill::features::LayerMap;
use reuse_distill::losses::{kd_loss, KdConfig};
use reuse_distill::{Distiller, HiddenLoss, HiddenTerm, Teacher, TeacherSource};
use tch::{Device, Kind, Tensor};

static SEED_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn digits() -> reuse_core::data::Digits {
    load_digits(&reuse_testkit::fixtures_dir().join("digits/digits.csv.gz")).unwrap()
}

fn train(
    model: &dyn Trainable,
    data: &dyn BatchSource,
    steps: usize,
    t: &mut [&mut dyn Technique],
) {
    let mut tr = Trainer::new(TrainConfig {
        max_steps: Some(steps),
        batch_size: 32,
        lr: 3e-3,
        schedule: Schedule::Constant,
        seed: 1,
        ..Default::default()
    });
    tr.begin_task(0, model, data, t).unwrap();
    tr.fit(model, data, None, t).unwrap();
}

fn step_context() -> StepContext {
    StepContext {
        step: 0,
        total_steps: 1,
        micro: 0,
        epoch: 0,
        task: 0,
        lr: 1e-3,
        device: Device::Cpu,
    }
}

#[test]
fn the_loss_is_alpha_ce_plus_one_minus_alpha_kd() {
    let _g = SEED_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let d = digits();
    tch::manual_seed(0);
    let teacher = Mlp::new(&[64, 128, 10], Activation::Relu, Device::Cpu).unwrap();
    let student = Mlp::new(&[64, 16, 10], Activation::Relu, Device::Cpu).unwrap();
    let kd = KdConfig::new(3.0);
    let mut dist = Distiller::new(TeacherSource::Live(&teacher), kd, 0.3).unwrap();
    let batch = d.train.batch(&[0, 5, 9, 11], Device::Cpu).unwrap();
    let out = Trainable::forward(&student, &batch, true, ForwardOptions::default()).unwrap();
    let extra = dist
        .extra_loss(&batch, &out, &student.params(), &step_context())
        .unwrap()
        .unwrap();
    assert_eq!(dist.task_loss_weight(&step_context()), 0.3);
    // By the formula, with the teacher's logits computed here.
    let t_logits = tch::no_grad(|| teacher.logits_of(&batch));
    let p = (&t_logits / 3.0).softmax(-1, Kind::Float);
    let log_q = (&out.logits / 3.0).log_softmax(-1, Kind::Float);
    let kl = (&p * (p.log() - log_q)).sum(Kind::Float) / 4.0 * 9.0;
    let want = kl * 0.7;
    let diff = (&extra - &want).abs().double_value(&[]);
    assert!(diff < 1e-5, "extra loss {extra:?} vs formula {want:?}");
    // The trainer's total for the step is then alpha * CE + that.
    let total = cross_entropy(&out.logits, &batch.labels).unwrap() * 0.3 + &extra;
    let by_parts = cross_entropy(&out.logits, &batch.labels).unwrap() * 0.3
        + kd_loss(&out.logits, &t_logits, None, &kd).unwrap() * 0.7;
    assert!((total - by_parts).abs().double_value(&[]) < 1e-6);
    // Gradients reach the student, never the teacher.
    extra.backward();
    for (n, t) in teacher.named_parameters() {
        assert!(!t.grad().defined(), "teacher {n} got a gradient");
    }
}

trait LogitsOf {
    fn logits_of(&self, b: &Batch) -> Tensor;
}
impl LogitsOf for Mlp {
    fn logits_of(&self, b: &Batch) -> Tensor {
        Trainable::forward(self, b, false, ForwardOptions::default())
            .unwrap()
            .logits
    }
}

/// The teacher learns digits 0-9 on half of the training set; the student sees the other
/// half without labels (-100): it learns only from the teacher, and ends close to it.
#[test]
fn a_student_learns_from_a_teacher_on_unlabelled_examples() {
    let _g = SEED_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let d = digits();
    let n = d.train.len() as i64;
    let all = d
        .train
        .batch(&(0..n).collect::<Vec<_>>(), Device::Cpu)
        .unwrap();
    let half = n / 2;
    let labelled =
        TensorDataset::new(all.inputs.narrow(0, 0, half), all.labels.narrow(0, 0, half)).unwrap();
    let unlabelled = TensorDataset::new(
        all.inputs.narrow(0, half, n - half),
        Tensor::full([n - half], -100, (Kind::Int64, Device::Cpu)),
    )
    .unwrap();
    tch::manual_seed(1);
    let teacher = Mlp::new(&[64, 128, 10], Activation::Relu, Device::Cpu).unwrap();
    train(&teacher, &labelled, 300, &mut []);
    let t_acc = accuracy(&teacher, &d.test, 256, Device::Cpu).unwrap();

    let student = Mlp::new(&[64, 24, 10], Activation::Relu, Device::Cpu).unwrap();
    let before = accuracy(&student, &d.test, 256, Device::Cpu).unwrap();
    let mut dist = Distiller::new(TeacherSource::Live(&teacher), KdConfig::new(2.0), 0.5).unwrap();
    train(&student, &unlabelled, 300, &mut [&mut dist]);
    let s_acc = accuracy(&student, &d.test, 256, Device::Cpu).unwrap();
    let s_params = student.params().count();
    let t_params = teacher.params().count();
    eprintln!(
        "teacher {t_acc:.3} ({t_params} params); student from no labels {s_acc:.3} \
         ({s_params} params; {before:.3} untrained)"
    );
    assert!(t_acc > 0.9, "teacher {t_acc}");
    assert!(
        s_acc > 0.85 && s_acc > 0.9 * t_acc,
        "the student learned only {s_acc} from a {t_acc} teacher"
    );
}

fn tiny_classifier(vocab: i64, layers: i64, classes: i64) -> BertClassifier {
    let mut c = BertConfig::tiny(vocab, 32, layers);
    c.hidden_dropout_prob = 0.0;
    c.attention_probs_dropout_prob = 0.0;
    BertClassifier::new(Bert::random(c, Device::Cpu).unwrap(), classes)
}

/// Token batches for tiny BERTs: ids below 50, no padding.
struct Tokens(Tensor, Tensor);
impl BatchSource for Tokens {
    fn len(&self) -> usize {
        self.0.size()[0] as usize
    }
    fn batch(&self, indices: &[i64], device: Device) -> reuse_core::Result<Batch> {
        let ix = Tensor::from_slice(indices);
        let mut b = Batch::new(self.0.index_select(0, &ix), self.1.index_select(0, &ix))?;
        b.mask = Some(b.inputs.ones_like());
        b.indices = indices.to_vec();
        Ok(b.to_device(device))
    }
}

fn tokens() -> Tokens {
    let ids = Tensor::randint_low(1, 50, [16, 8], (Kind::Int64, Device::Cpu));
    let labels = ids.select(1, 0).remainder(3);
    Tokens(ids, labels)
}

#[test]
fn mismatched_students_and_teachers_are_refused_before_training() {
    let _g = SEED_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(2);
    let data = tokens();
    let teacher = tiny_classifier(60, 4, 3);
    let fails = |student: &BertClassifier, dist: &mut Distiller<'_>| -> String {
        let mut tr = Trainer::new(TrainConfig::default());
        let before = student.params().to_checkpoint();
        let e = tr
            .begin_task(0, student, &data, &mut [dist])
            .expect_err("mismatch accepted");
        for (n, t) in student.params().iter() {
            assert!(t.equal(before.tensor(n).unwrap()), "{n} changed");
        }
        e.to_string()
    };
    let kd = KdConfig::default;
    // Class count.
    let s = tiny_classifier(60, 2, 5);
    let mut d = Distiller::new(TeacherSource::Live(&teacher), kd(), 0.5).unwrap();
    let msg = fails(&s, &mut d);
    assert!(
        msg.contains("5 classes") && msg.contains("teacher 3"),
        "{msg}"
    );
    // Vocabulary.
    let s = tiny_classifier(70, 2, 3);
    let mut d = Distiller::new(TeacherSource::Live(&teacher), kd(), 0.5).unwrap();
    let msg = fails(&s, &mut d);
    assert!(msg.contains("70 tokens") && msg.contains("60"), "{msg}");
    // A layer map past the teacher's depth (5 hidden states: embeddings + 4 layers).
    let s = tiny_classifier(60, 2, 3);
    let term = HiddenTerm {
        map: LayerMap::pairs(vec![(1, 2), (2, 7)]).unwrap(),
        kind: HiddenLoss::Mse,
        weight: 1.0,
    };
    let mut d = Distiller::new(TeacherSource::Live(&teacher), kd(), 0.5)
        .unwrap()
        .with_hidden(term)
        .unwrap();
    let msg = fails(&s, &mut d);
    assert!(msg.contains('7') && msg.contains('5'), "{msg}");
    // A bad alpha.
    assert!(Distiller::new(TeacherSource::Live(&teacher), kd(), 1.5).is_err());
}

/// With a hidden-state term, a 2-layer student's hidden states move towards the
/// teacher's layers the map names, and the term's loss falls.
#[test]
fn hidden_state_terms_pull_the_student_towards_the_mapped_layers() {
    let _g = SEED_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(3);
    let data = tokens();
    let teacher = tiny_classifier(60, 4, 3);
    let student = tiny_classifier(60, 2, 3);
    let map = LayerMap::uniform_with_embeddings(2, 4).unwrap();
    let gap = |s: &BertClassifier| -> f64 {
        let b = data
            .batch(&(0..16).collect::<Vec<_>>(), Device::Cpu)
            .unwrap();
        let opts = ForwardOptions {
            hidden_states: true,
            ..Default::default()
        };
        let so = tch::no_grad(|| s.forward(&b, false, opts)).unwrap();
        let to = teacher.teach(&b, opts).unwrap();
        map.as_pairs()
            .iter()
            .map(|&(i, j)| {
                (&so.hidden_states[i] - &to.hidden_states[j])
                    .square()
                    .mean(Kind::Float)
                    .double_value(&[])
            })
            .sum()
    };
    let before = gap(&student);
    let term = HiddenTerm {
        map: map.clone(),
        kind: HiddenLoss::Mse,
        weight: 1.0,
    };
    let mut d = Distiller::new(TeacherSource::Live(&teacher), KdConfig::default(), 0.0)
        .unwrap()
        .with_hidden(term)
        .unwrap();
    train(&student, &data, 60, &mut [&mut d]);
    let after = gap(&student);
    eprintln!("hidden-state gap {before:.4} -> {after:.4}");
    assert!(after < 0.5 * before, "{before} -> {after}");
}

/// From a full-logits f32 cache the technique's loss is the live teacher's, batch for
/// batch; a student trains from a top-4 cache of a 10-class teacher; a cache of another
/// dataset is refused when opened with the student's data.
#[test]
fn a_cached_teacher_gives_the_live_teachers_loss() {
    use reuse_distill::{build_cache, dataset_fingerprint, CacheConfig, TeacherCache};
    let _g = SEED_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let d = digits();
    tch::manual_seed(4);
    let teacher = Mlp::new(&[64, 64, 10], Activation::Relu, Device::Cpu).unwrap();
    train(&teacher, &d.train, 100, &mut []);
    let dir = tempfile::tempdir().unwrap();
    let full = dir.path().join("full");
    let top4 = dir.path().join("top4");
    build_cache(
        &teacher,
        &d.train,
        &full,
        &CacheConfig::full_logits()
            .with_dtype(Kind::Float)
            .with_shard_size(500),
        128,
        Device::Cpu,
    )
    .unwrap();
    build_cache(
        &teacher,
        &d.train,
        &top4,
        &CacheConfig::top_k(4),
        128,
        Device::Cpu,
    )
    .unwrap();
    let fp = dataset_fingerprint(&d.train).unwrap();
    let full = TeacherCache::open(&full, Some(&teacher.fingerprint()), Some(&fp)).unwrap();
    let top4 = TeacherCache::open(&top4, Some(&teacher.fingerprint()), Some(&fp)).unwrap();
    let wrong = dataset_fingerprint(&d.test).unwrap();
    let e =
        TeacherCache::open(top4.dir(), None, Some(&wrong)).expect_err("another dataset accepted");
    assert!(e.to_string().contains(&wrong[..12]), "{e}");

    let student = Mlp::new(&[64, 16, 10], Activation::Relu, Device::Cpu).unwrap();
    let kd = KdConfig::new(2.0);
    let mut live = Distiller::new(TeacherSource::Live(&teacher), kd, 0.5).unwrap();
    let mut cached = Distiller::new(TeacherSource::Cached(&full), kd, 0.5).unwrap();
    let mut sparse = Distiller::new(TeacherSource::Cached(&top4), kd, 0.5).unwrap();
    let batch = d
        .train
        .batch(&[700, 3, 1200, 42, 999], Device::Cpu)
        .unwrap();
    let out = Trainable::forward(&student, &batch, false, ForwardOptions::default()).unwrap();
    let p = student.params();
    let ctx = step_context();
    let l = live.extra_loss(&batch, &out, &p, &ctx).unwrap().unwrap();
    let c = cached.extra_loss(&batch, &out, &p, &ctx).unwrap().unwrap();
    let s = sparse.extra_loss(&batch, &out, &p, &ctx).unwrap().unwrap();
    let (l, c, s) = (
        l.double_value(&[]),
        c.double_value(&[]),
        s.double_value(&[]),
    );
    eprintln!("KD loss: live {l:.6}, full cache {c:.6}, top-4 cache {s:.6}");
    assert_eq!(l, c, "a full f32 cache must give the live loss exactly");
    // The top-4 loss compares the teacher's renormalised top 4 with the student's full
    // log-probabilities at those classes (a cross-entropy minus the top-4 entropy), so its
    // value is not the full KL's; it is finite and training from it works.
    assert!(s.is_finite() && s > 0.0, "top-4 loss {s}");

    // Two students from the same initialisation: one from the live teacher, one from
    // the top-4 cache; they end close.
    let fresh = || {
        tch::manual_seed(9);
        Mlp::new(&[64, 16, 10], Activation::Relu, Device::Cpu).unwrap()
    };
    let (a, b) = (fresh(), fresh());
    let mut live = Distiller::new(TeacherSource::Live(&teacher), kd, 0.5).unwrap();
    train(&a, &d.train, 300, &mut [&mut live]);
    let mut sparse = Distiller::new(TeacherSource::Cached(&top4), kd, 0.5).unwrap();
    train(&b, &d.train, 300, &mut [&mut sparse]);
    let (acc_live, acc_top4) = (
        accuracy(&a, &d.test, 256, Device::Cpu).unwrap(),
        accuracy(&b, &d.test, 256, Device::Cpu).unwrap(),
    );
    eprintln!("student accuracy: live teacher {acc_live:.3}, top-4 cache {acc_top4:.3}");
    assert!(acc_top4 > 0.7, "student from a top-4 cache: {acc_top4}");
    assert!(
        (acc_live - acc_top4).abs() < 0.05,
        "live {acc_live} vs top-4 {acc_top4}"
    );
}
