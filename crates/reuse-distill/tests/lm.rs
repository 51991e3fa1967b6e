//! Distillation on causal LMs: the Distiller's token-level KD is the formula's (the
//! next-token shift, prompt and padding positions left out, the mean over labelled
//! targets) for forward KL, reverse KL and JSD; a per-token cache gives the live loss;
//! a student cut from a teacher keeps the chosen blocks as copies; the vocabulary check
//! names the first token that differs.

use reuse_core::data::lm::{PackedText, PromptResponse};
use reuse_core::data::{Batch, BatchSource};
use reuse_core::models::llama::{CausalLm, LlamaConfig};
use reuse_core::trainer::StepContext;
use reuse_core::Technique;
use reuse_core::{ForwardOptions, Model, Schedule, TrainConfig, Trainable, Trainer};
use reuse_distill::lm::{check_same_vocabulary, cut_causal_lm};
use reuse_distill::losses::{Divergence, KdConfig};
use reuse_distill::{
    build_cache, dataset_fingerprint, CacheConfig, Distiller, Teacher, TeacherCache, TeacherSource,
};
use tch::{Device, Kind, Tensor};

static SEED_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

const VOCAB: i64 = 50;

/// A random tiny Llama whose output distributions are peaked (embedding and head
/// scaled up), so that divergences between two of them are far from zero.
fn peaked(layers: i64, seed: i64) -> CausalLm {
    tch::manual_seed(seed);
    let m = CausalLm::random(LlamaConfig::tiny(VOCAB, 32, layers), Device::Cpu).unwrap();
    tch::no_grad(|| {
        let e = &m.embed_tokens;
        e.shallow_clone().copy_(&(e * 40.0));
        let h = &m.lm_head.as_ref().unwrap().weight;
        h.shallow_clone().copy_(&(h * 40.0));
    });
    m
}

/// Prompt/response rows of different lengths (so batches are right-padded).
fn pairs() -> PromptResponse {
    let rows = vec![
        (vec![1, 7, 9, 11, 4, 5, 6], 4),
        (vec![1, 3, 8, 2], 2),
        (vec![1, 12, 13, 14, 15, 16, 17, 18, 19], 3),
        (vec![1, 20, 21, 22, 23], 4),
    ];
    PromptResponse::from_ids(rows, 0, 64).unwrap()
}

fn ctx() -> StepContext {
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

fn begin(d: &mut Distiller<'_>, student: &dyn Trainable, data: &dyn BatchSource) {
    let mut t = Trainer::new(TrainConfig::default());
    t.begin_task(0, student, data, &mut [d]).unwrap();
}

/// The divergence between the teacher's and the student's distributions at one position,
/// by the textbook formulas, in f64.
fn divergence(t: &Tensor, s: &Tensor, temp: f64, d: Divergence) -> f64 {
    let p = (t.to_kind(Kind::Double) / temp).softmax(-1, Kind::Double);
    let q = (s.to_kind(Kind::Double) / temp).softmax(-1, Kind::Double);
    let kl = |a: &Tensor, b: &Tensor| {
        (a * (a.log() - b.log()))
            .sum(Kind::Double)
            .double_value(&[])
    };
    match d {
        Divergence::ForwardKl => kl(&p, &q),
        Divergence::ReverseKl => kl(&q, &p),
        Divergence::Jsd { beta } => {
            let m = &p * beta + &q * (1.0 - beta);
            beta * kl(&p, &m) + (1.0 - beta) * kl(&q, &m)
        }
    }
}

/// The expected token-level KD: the mean over (row, j) with `labels[row, j + 1] != -100`
/// of the divergence at position `j`, times T².
fn by_formula(batch: &Batch, t: &Tensor, s: &Tensor, temp: f64, d: Divergence) -> f64 {
    let labels = Vec::<Vec<i64>>::try_from(&batch.labels).unwrap();
    let (mut sum, mut n) = (0.0, 0);
    for (r, row) in labels.iter().enumerate() {
        for j in 0..row.len() - 1 {
            if row[j + 1] != -100 {
                let (r, j) = (r as i64, j as i64);
                sum += divergence(&t.get(r).get(j), &s.get(r).get(j), temp, d);
                n += 1;
            }
        }
    }
    assert!(n > 0);
    sum / n as f64 * temp * temp
}

#[test]
fn token_level_kd_is_the_formula_at_labelled_next_token_targets() {
    let _g = SEED_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let teacher = peaked(3, 0);
    let student = peaked(1, 1);
    let data = pairs();
    let batch = data.batch(&[0, 1, 2, 3], Device::Cpu).unwrap();
    assert!(batch.padded, "the rows differ in length");
    let opts = ForwardOptions {
        logits: true,
        ..Default::default()
    };
    let out = Trainable::forward(&student, &batch, false, opts).unwrap();
    let t_logits = tch::no_grad(|| Trainable::forward(&teacher, &batch, false, opts))
        .unwrap()
        .logits;
    for (d, temp) in [
        (Divergence::ForwardKl, 2.0),
        (Divergence::ReverseKl, 1.0),
        (Divergence::Jsd { beta: 0.3 }, 1.5),
    ] {
        let kd = KdConfig::new(temp).with_divergence(d);
        let mut dist = Distiller::new(TeacherSource::Live(&teacher), kd, 0.25).unwrap();
        // Before begin_task the distiller does not know the logits are next-token ones.
        let e = dist
            .extra_loss(&batch, &out, &student.params(), &ctx())
            .unwrap_err()
            .to_string();
        assert!(e.contains("begin_task"), "{e}");
        begin(&mut dist, &student, &data);
        let got = dist
            .extra_loss(&batch, &out, &student.params(), &ctx())
            .unwrap()
            .unwrap()
            .double_value(&[]);
        let want = 0.75 * by_formula(&batch, &t_logits, &out.logits, temp, d);
        assert!(
            (got - want).abs() < 1e-5 * want.abs().max(1.0),
            "{d:?}: {got} vs formula {want}"
        );
        assert!(want > 0.05, "peaked models differ: {want}");
    }
}

#[test]
fn prompt_and_padding_positions_do_not_reach_the_loss_or_its_gradient() {
    let _g = SEED_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let teacher = peaked(2, 2);
    let student = peaked(1, 3);
    let data = pairs();
    let mut dist = Distiller::new(TeacherSource::Live(&teacher), KdConfig::new(1.0), 0.0).unwrap();
    begin(&mut dist, &student, &data);
    let batch = data.batch(&[1, 2], Device::Cpu).unwrap();
    let opts = ForwardOptions {
        logits: true,
        ..Default::default()
    };
    let out = Trainable::forward(&student, &batch, false, opts).unwrap();
    let logits = out.logits.detach().set_requires_grad(true);
    let out2 = reuse_core::trainer::StepOutputs::logits(logits.shallow_clone());
    let loss = dist
        .extra_loss(&batch, &out2, &student.params(), &ctx())
        .unwrap()
        .unwrap();
    loss.backward();
    let g = logits
        .grad()
        .abs()
        .sum_dim_intlist([2i64].as_slice(), false, Kind::Float);
    let g = Vec::<Vec<f32>>::try_from(&g).unwrap();
    let labels = Vec::<Vec<i64>>::try_from(&batch.labels).unwrap();
    for (r, row) in labels.iter().enumerate() {
        for j in 0..row.len() {
            let counted = j + 1 < row.len() && row[j + 1] != -100;
            assert_eq!(
                g[r][j] > 0.0,
                counted,
                "row {r} position {j}: gradient {} (labels {row:?})",
                g[r][j]
            );
        }
    }
}

#[test]
fn a_per_token_cache_gives_the_live_loss() {
    let _g = SEED_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let teacher = peaked(2, 4);
    let student = peaked(1, 5);
    let tmp = tempfile::tempdir().unwrap();
    // Packed text and prompt/response pairs: both per-token layouts.
    let packed =
        PackedText::from_ids(&[(1..40).collect::<Vec<i64>>(), (10..30).collect()], 2, 8).unwrap();
    let sources: [(&str, &dyn BatchSource); 2] = [("packed", &packed), ("pairs", &pairs())];
    for (name, data) in sources {
        let full = tmp.path().join(format!("{name}-full"));
        let top = tmp.path().join(format!("{name}-top8"));
        let per_token = |c: CacheConfig| c.with_per_token(true).with_shard_size(3);
        build_cache(
            &teacher,
            data,
            &full,
            &per_token(CacheConfig::top_k(VOCAB as usize).with_dtype(Kind::Float)),
            2,
            Device::Cpu,
        )
        .unwrap();
        build_cache(
            &teacher,
            data,
            &top,
            &per_token(CacheConfig::top_k(8)),
            2,
            Device::Cpu,
        )
        .unwrap();
        let fp = dataset_fingerprint(data).unwrap();
        let full = TeacherCache::open(&full, Some(&teacher.fingerprint()), Some(&fp)).unwrap();
        let top = TeacherCache::open(&top, Some(&teacher.fingerprint()), Some(&fp)).unwrap();
        let kd = KdConfig::new(1.0);
        let mut live = Distiller::new(TeacherSource::Live(&teacher), kd, 0.0).unwrap();
        let mut cached = Distiller::new(TeacherSource::Cached(&full), kd, 0.0).unwrap();
        let mut sparse = Distiller::new(TeacherSource::Cached(&top), kd, 0.0).unwrap();
        for d in [&mut live, &mut cached, &mut sparse] {
            begin(d, &student, data);
        }
        let n = data.len() as i64;
        let batch = data.batch(&[n - 1, 0, 2], Device::Cpu).unwrap();
        let opts = ForwardOptions {
            logits: true,
            ..Default::default()
        };
        let out = Trainable::forward(&student, &batch, false, opts).unwrap();
        let p = student.params();
        let value = |d: &mut Distiller<'_>| {
            d.extra_loss(&batch, &out, &p, &ctx())
                .unwrap()
                .unwrap()
                .double_value(&[])
        };
        let (l, c, s) = (value(&mut live), value(&mut cached), value(&mut sparse));
        assert!(
            (l - c).abs() < 1e-5 * l.max(1.0),
            "{name}: live {l} vs k = vocab cache {c}"
        );
        assert!(s.is_finite() && s > 0.0, "{name}: top-8 {s}");
    }
}

#[test]
fn a_cut_student_keeps_the_chosen_blocks_as_copies() {
    let _g = SEED_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let teacher = peaked(4, 6);
    // Every block: the same function.
    let all = cut_causal_lm(&teacher, &[0, 1, 2, 3]).unwrap();
    let ids = Tensor::from_slice(&[1i64, 5, 9, 14, 3, 7]).view([1, 6]);
    let logits = |m: &CausalLm| {
        tch::no_grad(|| {
            let o = m
                .forward(&ids, None, None, false, ForwardOptions::default())
                .unwrap();
            m.logits(&o.last_hidden_state, false).unwrap()
        })
    };
    assert!(logits(&all).allclose(&logits(&teacher), 0.0, 0.0, false));
    // Blocks 1 and 3: named as the student's 0 and 1, equal values, separate storage.
    let s = cut_causal_lm(&teacher, &[1, 3]).unwrap();
    assert_eq!(s.config.num_hidden_layers, 2);
    let (ts, ss) = (teacher.state_dict(), s.state_dict());
    for (name, t) in ss.iter() {
        let src = match teacher.arch.layer_of(name) {
            Some((i, tail)) => teacher.arch.layer_path([1, 3][i], tail),
            None => name.to_string(),
        };
        assert!(
            t.equal(ts.tensor(&src).unwrap()),
            "{name} vs teacher's {src}"
        );
    }
    assert_eq!(ss.names().count() + 2 * 9, ts.names().count());
    tch::no_grad(|| {
        let w = &s.layers[0].linears[0].weight;
        let _ = w.shallow_clone().fill_(0.0);
    });
    let q = "model.layers.1.self_attn.q_proj.weight";
    assert!(
        teacher
            .state_dict()
            .tensor(q)
            .unwrap()
            .abs()
            .sum(Kind::Float)
            .double_value(&[])
            > 0.0
    );
    assert!(s.params().iter().all(|(_, p)| p.requires_grad()));
    // Bad layer lists name what is wrong.
    let e = cut_causal_lm(&teacher, &[0, 4]).unwrap_err().to_string();
    assert!(e.contains("4") && e.contains("4 layers"), "{e}");
    let e = cut_causal_lm(&teacher, &[2, 1]).unwrap_err().to_string();
    assert!(e.contains("strictly increasing"), "{e}");
}

#[test]
fn a_distilled_student_moves_toward_its_teacher() {
    let _g = SEED_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let teacher = peaked(3, 7);
    let student = cut_causal_lm(&teacher, &[0]).unwrap();
    let texts: Vec<Vec<i64>> = (0..8)
        .map(|k| (0..30).map(|j| (k * 7 + j * 3) % VOCAB).collect())
        .collect();
    let data = PackedText::from_ids(&texts, 2, 16).unwrap();
    let kd = KdConfig::new(1.0);
    let mut probe = Distiller::new(TeacherSource::Live(&teacher), kd, 0.0).unwrap();
    begin(&mut probe, &student, &data);
    let all: Vec<i64> = (0..data.len() as i64).collect();
    let batch = data.batch(&all, Device::Cpu).unwrap();
    let kd_now = |probe: &mut Distiller<'_>| {
        let opts = ForwardOptions {
            logits: true,
            ..Default::default()
        };
        let out = tch::no_grad(|| Trainable::forward(&student, &batch, false, opts)).unwrap();
        probe
            .extra_loss(&batch, &out, &student.params(), &ctx())
            .unwrap()
            .unwrap()
            .double_value(&[])
    };
    let before = kd_now(&mut probe);
    let mut d = Distiller::new(TeacherSource::Live(&teacher), kd, 0.0).unwrap();
    let mut t = Trainer::new(TrainConfig {
        max_steps: Some(30),
        batch_size: 4,
        lr: 3e-3,
        schedule: Schedule::Constant,
        ..Default::default()
    });
    t.begin_task(0, &student, &data, &mut [&mut d]).unwrap();
    t.fit(&student, &data, None, &mut [&mut d]).unwrap();
    let after = kd_now(&mut probe);
    assert!(
        after < 0.7 * before,
        "KL to the teacher {before} -> {after}"
    );
}

#[test]
fn the_vocabulary_check_names_the_first_token_that_differs() {
    let Some(gguf) = reuse_testkit::smollm2_gguf_or_skip("vocabulary_check") else {
        return;
    };
    let file = reuse_core::gguf::GgufFile::open(&gguf).unwrap();
    let tok = reuse_core::gguf::tokenizer(&file).unwrap();
    check_same_vocabulary(&tok, &tok.clone()).unwrap();
    // The same size and tokens, two of them with their ids swapped.
    let mut json: serde_json::Value = serde_json::from_str(&tok.to_string(false).unwrap()).unwrap();
    let vocab = json["model"]["vocab"].as_object_mut().unwrap();
    let name_of = |id: i64| {
        vocab
            .iter()
            .find(|(_, v)| v.as_i64() == Some(id))
            .map(|(k, _)| k.clone())
            .unwrap()
    };
    let (a, b) = (name_of(1000), name_of(1001));
    vocab.insert(a.clone(), 1001.into());
    vocab.insert(b.clone(), 1000.into());
    let other: tokenizers::Tokenizer = json.to_string().parse().unwrap();
    let e = check_same_vocabulary(&other, &tok).unwrap_err().to_string();
    assert!(
        e.contains("token id 1000") && e.contains(&format!("{b:?}")),
        "{e}"
    );
    // Another size altogether.
    let bert = reuse_testkit::minilm_dir().unwrap().join("tokenizer.json");
    let bert = tokenizers::Tokenizer::from_file(bert).unwrap();
    let e = check_same_vocabulary(&bert, &tok).unwrap_err().to_string();
    assert!(e.contains("30522") && e.contains("49152"), "{e}");
}
