//! reuse-quant experiments.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use indicatif::ProgressBar;
use reuse_core::models::{BertConfig, SentenceEncoder};
use reuse_core::Checkpoint;
use reuse_quant::folder::{quantize_folder, QuantizeFolder, QuantizeReport};
use reuse_quant::gptq::GptqOptions;
use reuse_quant::QuantSpec;
use reuse_testkit::{fixtures_dir, minilm_dir};
use tch::{Device, Kind, Tensor};

use super::distill::Cut;
use super::distill::{fit_probe, probe_accuracy, row_cosines};
use super::{insert_spread, mean, sample_sd, Counts, Ctx, Knobs, Metrics, OnCuda, Outcome, Sizes};
use crate::claims::{pm, Claim};

const BATCH: usize = 32;

/// One quantized variant of MiniLM.
struct Variant {
    name: String,
    dir: std::path::PathBuf,
    report: Option<QuantizeReport>,
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Bytes of a folder's quantized linear weights (codes, scales, zero points) over the
/// bytes the same weights take in f32.
fn quantized_weight_ratio(dir: &Path, modules: &[String], f32_ck: &Checkpoint) -> Result<f64> {
    let ck = Checkpoint::load(dir.join("model.safetensors"), Device::Cpu)?;
    let bytes = |t: &Tensor| (t.numel() * t.kind().elt_size_in_bytes()) as f64;
    let (mut q, mut f) = (0.0, 0.0);
    for m in modules {
        let w = format!("{m}.weight");
        for suffix in ["", "_scale", "_zero"] {
            if let Some(t) = ck.get(&format!("{w}{suffix}")) {
                q += bytes(t);
            }
        }
        f += bytes(f32_ck.tensor(&w)?);
    }
    Ok(q / f)
}

/// `quant.minilm`'s sizes: texts are the first this many of each (`usize::MAX`: all).
pub(super) struct MinilmSizes {
    /// GPTQ's calibration texts (from the train split).
    calibration: usize,
    /// The probe's train, dev and test texts, and the out-of-domain sentences.
    train: usize,
    dev: usize,
    test: usize,
    ood: usize,
    /// The probe's seeds.
    probe_seeds: &'static [u64],
    /// Interleaved rounds of the throughput timing.
    rounds: usize,
}

pub(super) const MINILM_SIZES: Sizes<MinilmSizes> = Sizes {
    quick: MinilmSizes {
        calibration: 16,
        train: 200,
        dev: 100,
        test: 100,
        ood: 50,
        probe_seeds: &[0],
        rounds: 1,
    },
    cpu: None,
    full: MinilmSizes {
        calibration: 256,
        train: usize::MAX,
        dev: usize::MAX,
        test: usize::MAX,
        ood: usize::MAX,
        probe_seeds: &[0, 1, 2],
        rounds: 3,
    },
    cuda: OnCuda::SAME,
};

impl Knobs for MinilmSizes {
    fn counts(&self) -> Counts {
        vec![
            ("calibration", self.calibration),
            ("train", self.train),
            ("dev", self.dev),
            ("test", self.test),
            ("ood", self.ood),
            ("probe_seeds", self.probe_seeds.len()),
            ("rounds", self.rounds),
        ]
    }
}

/// MiniLM in f32, bf16, int8 and int4 (round-to-nearest and GPTQ, groups of 32, 64 and
/// 128): size on disk, embedding cosine to f32 on the sections' test texts, a linear
/// probe's test accuracy (trained on the f32 embeddings) before and after, and embed
/// throughput in interleaved rounds.
pub fn minilm(ctx: &Ctx, bar: &ProgressBar) -> Result<Outcome> {
    let sizes = ctx.sizes(&MINILM_SIZES);
    let src = minilm_dir()?;
    let splits = super::sections()?;
    let take = |v: &[String], n: usize| v.iter().take(n).cloned().collect::<Vec<_>>();
    let calib = calibration_texts(&splits.train.texts, sizes.calibration);
    let n_train = sizes.train.min(splits.train.texts.len());
    let n_dev = sizes.dev.min(splits.dev.texts.len());
    let n_test = sizes.test.min(splits.test.texts.len());
    let train = take(&splits.train.texts, n_train);
    let dev = take(&splits.dev.texts, n_dev);
    let test = take(&splits.test.texts, n_test);
    let labels = |v: &[i64], n: usize| v[..n].to_vec();
    let (y_train, y_dev, y_test) = (
        labels(&splits.train.labels, n_train),
        labels(&splits.dev.labels, n_dev),
        labels(&splits.test.labels, n_test),
    );
    let classes = splits.classes.len() as i64;
    let device = ctx.device;

    // The variants, written as model folders (what `reuse quantize` writes).
    let tmp = tempfile_dir(ctx)?;
    let mut variants = vec![Variant {
        name: "f32".into(),
        dir: src.clone(),
        report: None,
    }];
    let mut add = |name: &str, spec: QuantSpec, calibrated: bool| -> Result<()> {
        let dir = tmp.join(name);
        let r = quantize_folder(
            &src,
            &dir,
            &QuantizeFolder {
                spec,
                calibration: calibrated.then(|| calib.clone()),
                gptq: GptqOptions::default(),
                embeddings: false,
            },
            true,
        )
        .with_context(|| format!("quantizing MiniLM as {name}"))?;
        super::say(bar, format!("quant.minilm {name}: {:.1} s", r.seconds));
        variants.push(Variant {
            name: name.into(),
            dir,
            report: Some(r),
        });
        Ok(())
    };
    add("int8", QuantSpec::int8(), false)?;
    for g in [32, 64, 128] {
        add(&format!("int4_rtn_g{g}"), QuantSpec::int4(g, false), false)?;
        add(&format!("int4_gptq_g{g}"), QuantSpec::int4(g, false), true)?;
    }

    let mut m = Metrics::new();
    let f32_ck = Checkpoint::load(src.join("model.safetensors"), Device::Cpu)?;
    let f32_bytes = std::fs::metadata(src.join("model.safetensors"))?.len() as f64;
    m.insert("size_mb_f32".into(), f32_bytes / 1e6);
    // bf16: the same tensors stored in bf16.
    let bf16_path = tmp.join("model-bf16.safetensors");
    let mut bf = Checkpoint::new();
    for (n, t) in f32_ck.iter() {
        let t = if t.is_floating_point() {
            t.to_kind(Kind::BFloat16)
        } else {
            t.shallow_clone()
        };
        bf.insert(n, t);
    }
    bf.save(&bf16_path)?;
    m.insert(
        "size_mb_bf16".into(),
        std::fs::metadata(&bf16_path)?.len() as f64 / 1e6,
    );
    for v in &variants[1..] {
        let r = v.report.as_ref().expect("quantized variants have reports");
        m.insert(format!("size_mb_{}", v.name), r.bytes_after as f64 / 1e6);
        m.insert(
            format!("file_ratio_{}", v.name),
            r.bytes_after as f64 / f32_bytes,
        );
        m.insert(
            format!("weight_ratio_{}", v.name),
            quantized_weight_ratio(&v.dir, &r.config.modules, &f32_ck)?,
        );
    }
    let r8 = m["weight_ratio_int8"];
    let r4 = m["weight_ratio_int4_gptq_g64"];
    m.insert("size_ratio_int8".into(), r8);
    m.insert("size_ratio_int4".into(), r4);

    // Embeddings of the test texts by every variant (and bf16); the probe's data by f32.
    let f32_enc = SentenceEncoder::load(&src, device, Kind::Float)?;
    bar.set_message("quant.minilm: f32 embeddings");
    let e_train = f32_enc.encode(&refs(&train), BATCH)?;
    let e_dev = f32_enc.encode(&refs(&dev), BATCH)?;
    let e_test = f32_enc.encode(&refs(&test), BATCH)?;
    let mut encoders: Vec<(String, SentenceEncoder)> = Vec::new();
    encoders.push((
        "bf16".into(),
        SentenceEncoder::load(&src, device, Kind::BFloat16)?,
    ));
    for v in &variants[1..] {
        encoders.push((
            v.name.clone(),
            SentenceEncoder::load_with(&v.dir, &reuse_quant::load_options(device, Kind::Float))?,
        ));
    }
    // Out of domain: sentences of AppStream descriptions (full English prose), unlike the
    // short synopses GPTQ calibrates on.
    let ood: Vec<String> = std::fs::read_to_string(fixtures_dir().join("appstream/sentences.txt"))?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .take(sizes.ood)
        .map(String::from)
        .collect();
    let e_ood = f32_enc.encode(&refs(&ood), BATCH)?;
    let mut test_emb: Vec<(String, Tensor)> = Vec::new();
    for (name, enc) in &encoders {
        bar.set_message(format!("quant.minilm: {name} embeddings"));
        let e = enc.encode(&refs(&test), BATCH)?.to_kind(Kind::Float);
        let cos = row_cosines(&e, &e_test);
        m.insert(
            format!("cosine_mean_{name}"),
            cos.mean(Kind::Float).double_value(&[]),
        );
        m.insert(format!("cosine_min_{name}"), cos.min().double_value(&[]));
        let o = enc.encode(&refs(&ood), BATCH)?.to_kind(Kind::Float);
        let cos = row_cosines(&o, &e_ood);
        m.insert(
            format!("cosine_ood_mean_{name}"),
            cos.mean(Kind::Float).double_value(&[]),
        );
        m.insert(
            format!("cosine_ood_min_{name}"),
            cos.min().double_value(&[]),
        );
        test_emb.push((name.clone(), e));
    }
    for (k, from) in [
        ("cosine_mean_int8", "cosine_mean_int8"),
        ("cosine_min_int8", "cosine_min_int8"),
        ("cosine_mean_int4_rtn", "cosine_mean_int4_rtn_g64"),
        ("cosine_mean_int4", "cosine_mean_int4_gptq_g64"),
        ("cosine_ood_mean_int4", "cosine_ood_mean_int4_gptq_g64"),
        ("cosine_ood_min_int4", "cosine_ood_min_int4_gptq_g64"),
    ] {
        let v = m[from];
        m.insert(k.into(), v);
    }

    // The classifier: a linear probe on the f32 embeddings (lr chosen on dev), seeds
    // 0-2; its test accuracy on each variant's embeddings.
    let seeds = sizes.probe_seeds;
    let mut acc: Vec<(String, Vec<f64>)> = vec![("f32".into(), Vec::new())];
    acc.extend(test_emb.iter().map(|(n, _)| (n.clone(), Vec::new())));
    for &seed in seeds {
        bar.set_message(format!("quant.minilm: probe seed {seed}"));
        let (head, _) = fit_probe(
            (&e_train, &y_train),
            (&e_dev, &y_dev),
            classes,
            device,
            seed,
        )?;
        acc[0]
            .1
            .push(probe_accuracy(&head, (&e_test, &y_test), device)?);
        for (i, (_, e)) in test_emb.iter().enumerate() {
            acc[i + 1]
                .1
                .push(probe_accuracy(&head, (e, &y_test), device)?);
        }
    }
    for (name, a) in &acc {
        m.insert(format!("accuracy_{name}"), mean(a));
        m.insert(format!("accuracy_{name}_sd"), sample_sd(a));
    }
    let drops = |name: &str| -> Vec<f64> {
        let base = &acc[0].1;
        let other = &acc.iter().find(|(n, _)| n == name).expect("variant").1;
        base.iter().zip(other).map(|(b, o)| b - o).collect()
    };
    let (d8, d4) = (drops("int8"), drops("int4_gptq_g64"));
    m.insert("accuracy_drop_int8".into(), mean(&d8));
    m.insert("accuracy_drop_int8_sd".into(), sample_sd(&d8));
    m.insert("accuracy_drop_int4".into(), mean(&d4));
    m.insert("accuracy_drop_int4_sd".into(), sample_sd(&d4));

    // Throughput: texts/s of each encoder over the test texts, rounds interleaved (the
    // order rotates each round). Quantized weights are dequantized on every forward
    // (no int8/int4 kernels): the memory saving, at a cost in speed.
    let rounds = sizes.rounds;
    let mut all: Vec<(&str, &SentenceEncoder)> = vec![("f32", &f32_enc)];
    all.extend(encoders.iter().map(|(n, e)| (n.as_str(), e)));
    let speed_set = ["f32", "bf16", "int8", "int4_gptq_g64"];
    all.retain(|(n, _)| speed_set.contains(n));
    let mut secs = vec![Vec::new(); all.len()];
    let test_refs = refs(&test);
    for round in 0..rounds {
        for k in 0..all.len() {
            let i = (round + k) % all.len();
            let t0 = Instant::now();
            let _ = all[i].1.encode(&test_refs, BATCH)?;
            if device.is_cuda() {
                tch::Cuda::synchronize(0);
            }
            secs[i].push(t0.elapsed().as_secs_f64());
        }
    }
    for (i, (name, _)) in all.iter().enumerate() {
        let per_s: Vec<f64> = secs[i].iter().map(|s| test.len() as f64 / s).collect();
        insert_spread(&mut m, &format!("texts_per_s_{name}"), &per_s);
    }
    drop(encoders);
    std::fs::remove_dir_all(&tmp)?;
    let cfg = BertConfig::load(&src.join("config.json"))?;
    let notes = vec![
        format!(
            "all-MiniLM-L6-v2 ({} layers, hidden {}); the 36 encoder linears quantized (the pooler, unused by mean pooling, and the embedding tables stay f32). Calibration (GPTQ): the first {} training texts of the Debian sections, one text per forward, all Hessians from the f32 model in one pass; damp 0.01, blocks of 128, no act order. Measured on the {} test texts (in domain, cosine_mean_* / cosine_min_*) and on the {} sentences of AppStream descriptions in fixtures/appstream (out of domain: full English prose, unlike the short synopses GPTQ calibrated on; cosine_ood_mean_* / cosine_ood_min_*): cosine of each variant's embedding to f32's.",
            cfg.num_hidden_layers, cfg.hidden_size, calib.len(), test.len(), ood.len()
        ),
        "size_ratio_int8 / size_ratio_int4 (int4 = GPTQ, groups of 64, zero points): bytes of the quantized linear weights (codes, f32 scales, u8 zero points) over the same weights in f32; file_ratio_*: the whole model.safetensors over f32's (embeddings and biases stay f32). cosine_mean_int4_rtn / cosine_mean_int4: groups of 64, round-to-nearest / GPTQ.".into(),
        format!(
            "Classifier: a linear probe on the f32 model's embeddings ({} training texts, lr from {{1e-2, 3e-2, 1e-1}} chosen on the {} dev texts), seeds {:?}; accuracy_drop_* = f32 test accuracy - the same probe's accuracy on the quantized model's embeddings, per seed, mean (and sd). A frozen-encoder probe, not a fine-tuned encoder.",
            train.len(), dev.len(), seeds
        ),
        format!(
            "Throughput: texts/s encoding the {} test texts at batch {BATCH}, {rounds} interleaved rounds, on {}. Quantized weights are dequantized on every forward (no integer kernels), so int8/int4 trade speed for memory here.",
            test.len(),
            if device.is_cuda() { "CUDA" } else { "the CPU" }
        ),
    ];
    Ok(Outcome { metrics: m, notes })
}

/// GPTQ's calibration texts: the first `n` training texts.
fn calibration_texts(train: &[String], n: usize) -> Vec<String> {
    train.iter().take(n).cloned().collect()
}

/// A scratch folder under the report folder for the quantized variants.
fn tempfile_dir(ctx: &Ctx) -> Result<std::path::PathBuf> {
    let d = ctx.report_dir().join("quant-minilm");
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// `quant.distill_plus_quant`'s sizes.
pub(super) struct DistillPlusQuantSizes {
    cut: Cut,
    /// The teacher's and students' epochs, when it trains its own.
    epochs: usize,
    /// GPTQ's calibration texts.
    calibration: usize,
}

const DISTILL_PLUS_QUANT_FULL: DistillPlusQuantSizes = DistillPlusQuantSizes {
    cut: Cut::ALL,
    epochs: 3,
    calibration: 256,
};

pub(super) const DISTILL_PLUS_QUANT_SIZES: Sizes<DistillPlusQuantSizes> = Sizes {
    quick: DistillPlusQuantSizes {
        cut: Cut::QUICK,
        epochs: 1,
        calibration: 16,
    },
    // Its CPU size has the full size's numbers: in a plain CPU run it follows
    // distill.minilm_sections and trims and quantizes that experiment's (CPU-size)
    // students; on its own it trains its own at these.
    cpu: Some(DISTILL_PLUS_QUANT_FULL),
    full: DISTILL_PLUS_QUANT_FULL,
    cuda: OnCuda::SAME,
};

impl Knobs for DistillPlusQuantSizes {
    fn counts(&self) -> Counts {
        let mut c = self.cut.counts();
        c.extend([("epochs", self.epochs), ("calibration", self.calibration)]);
        c
    }
}

/// Distillation + quantization: the MiniLM classifier (the teacher, fully fine-tuned on
/// the Debian sections) -> a 2-layer student cut from it and trained with KD from a
/// top-4 teacher cache (as `distill.minilm_sections`) -> its vocabulary trimmed to the
/// synopses' tokens -> int4 (GPTQ on the encoder linears, round-to-nearest per row on
/// the embedding tables, groups of 64 with zero points). Size against the f32 teacher
/// and test accuracy relative to it, 3 seeds.
pub fn distill_plus_quant(ctx: &Ctx, bar: &ProgressBar) -> Result<Outcome> {
    let seeds = &ctx.seeds;
    use super::distill::{sections_and_pool, synopses, BATCH as KD_BATCH, MAX_LEN};
    use reuse_core::data::BatchSource;
    use reuse_core::models::sentence::tokenize;
    use reuse_core::models::{BertClassifier, TokenizedDataset};
    use reuse_core::trainer::accuracy;
    use reuse_core::ForwardOptions;
    use reuse_core::WeightStorage;
    use reuse_core::{Model, Schedule, TrainConfig};
    use reuse_distill::vocab::VocabTrim;
    use reuse_quant::model::{calibrate, quantize_model, Method};
    use reuse_quant::QuantizedWeight;

    let sizes = ctx.sizes(&DISTILL_PLUS_QUANT_SIZES);
    let dir = minilm_dir()?;
    let device = ctx.device;
    let (splits, pool_texts) = sections_and_pool(sizes.cut)?;
    let n_classes = splits.classes.len() as i64;
    let tok = SentenceEncoder::load(&dir, Device::Cpu, Kind::Float)?.tokenizer;
    let train = TokenizedDataset::new(&tok, &splits.train, MAX_LEN)?;
    let dev = TokenizedDataset::new(&tok, &splits.dev, MAX_LEN)?;
    let test = TokenizedDataset::new(&tok, &splits.test, MAX_LEN)?;
    let mut with_pool = splits.train.clone();
    with_pool.texts.extend(pool_texts.iter().cloned());
    with_pool
        .labels
        .extend(std::iter::repeat_n(-100, pool_texts.len()));
    let train_pool = TokenizedDataset::new(&tok, &with_pool, MAX_LEN)?;
    let epochs = sizes.epochs;
    let cfg = |lr: f64, seed: u64, data: &dyn BatchSource| TrainConfig {
        epochs,
        batch_size: KD_BATCH,
        lr,
        weight_decay: 0.01,
        schedule: Schedule::Linear {
            warmup: data.len().div_ceil(KD_BATCH) * epochs / 10,
        },
        device,
        seed,
        ..Default::default()
    };

    // The teacher and the KD students: distill.minilm_sections' of this run when it ran
    // before (the same recipe: it trains them anyway), else trained here.
    let shared: Option<super::distill::SectionsKd> = ctx.take_shared("distill.minilm_sections");
    let from_sections = shared.is_some();
    let (teacher, teacher_test, t_lr, s_lr, kd_epochs, students, seen) = match shared {
        Some(k) => {
            super::say(
                bar,
                format!(
                    "  teacher and {} KD students from distill.minilm_sections (this run)",
                    k.students.len()
                ),
            );
            (
                k.teacher,
                k.teacher_test,
                k.teacher_lr,
                k.student_lr,
                k.kd_epochs,
                k.students,
                vec!["distill.minilm_sections' choice in this run".to_string()],
            )
        }
        None => {
            let (teacher, teacher_test, s_lr, students, seen) = train_teacher_and_students(
                ctx,
                bar,
                &dir,
                n_classes,
                &train,
                &dev,
                &test,
                &train_pool,
                &cfg,
            )?;
            (teacher, teacher_test, 2e-4, s_lr, epochs, students, seen)
        }
    };
    if students.len() != seeds.len() {
        anyhow::bail!(
            "quant.distill_plus_quant: {} students for {} seeds",
            students.len(),
            seeds.len()
        );
    }

    // The trimmed vocabulary: the tokens of every synopsis in the fixture (none of them
    // a sections test text) and of the labelled train split.
    let mut corpus = synopses(None)?;
    corpus.extend(splits.train.texts.iter().cloned());
    let plan = VocabTrim::from_texts(&tok, &refs(&corpus))?;
    let test_trim = TokenizedDataset::new(plan.tokenizer(), &splits.test, MAX_LEN)?;
    let calib = calibration_texts(&splits.train.texts, sizes.calibration);
    let spec = QuantSpec::int4(64, false);
    // The embedding tables per row, as the issue asks ("per row"): one scale and zero
    // point for each token's whole vector.
    let hidden = teacher.bert.config.hidden_size;
    let table_spec = QuantSpec::int4(hidden, false);
    let tmp = tempfile_dir(ctx)?;
    let file_bytes = |name: &str, ck: &Checkpoint| -> Result<f64> {
        let p = tmp.join(name);
        ck.save(&p)?;
        let n = std::fs::metadata(&p)?.len() as f64;
        std::fs::remove_file(&p)?;
        Ok(n)
    };
    let state = |m: &BertClassifier| -> Checkpoint {
        let mut ck = m.bert.state_dict();
        tch::no_grad(|| {
            for (n, t) in m.head.named_parameters() {
                ck.insert(format!("classifier.{n}"), t.detach().copy());
            }
        });
        ck
    };
    let teacher_bytes = file_bytes("teacher.safetensors", &state(&teacher))?;
    let teacher_pooler_bytes = teacher
        .bert
        .pooler
        .as_ref()
        .map(|p| {
            p.named_parameters()
                .iter()
                .map(|(_, t)| (t.numel() * 4) as f64)
                .sum::<f64>()
        })
        .unwrap_or(0.0);

    let (mut acc_f32, mut acc_trim, mut acc_q) = (vec![], vec![], vec![]);
    let (mut bytes_f32, mut bytes_trim, mut bytes_q) = (0.0, 0.0, 0.0);
    for (seed, mut s) in seeds.iter().copied().zip(students) {
        bar.set_message(format!("quant.distill_plus_quant seed {seed}"));
        // Mean pooling never reads the pooler: a deployed student does not carry it.
        s.bert.pooler = None;
        acc_f32.push(accuracy(&s, &test, 64, device)?);
        bytes_f32 = file_bytes("student.safetensors", &state(&s))?;

        // Trim, then quantize the trimmed model.
        plan.apply(&mut s.bert)?;
        acc_trim.push(accuracy(&s, &test_trim, 64, device)?);
        bytes_trim = file_bytes("trimmed.safetensors", &state(&s))?;
        let enc_tok = plan.tokenizer().clone();
        let select = |p: &str| p.starts_with("encoder.layer.");
        let hessians = calibrate(&mut s.bert, &select, &mut |bert| {
            tch::no_grad(|| -> reuse_core::Result<()> {
                for t in &calib {
                    let (ids, _, _) = tokenize(&enc_tok, &[t.as_str()])?;
                    bert.forward(
                        &ids.to_device(device),
                        None,
                        None,
                        false,
                        ForwardOptions::default(),
                    )?;
                }
                Ok(())
            })
        })?;
        quantize_model(
            &mut s.bert,
            spec,
            &Method::Gptq {
                hessians: &hessians,
                options: GptqOptions::default(),
            },
            &select,
        )?;
        // The embedding tables, per row; the model computes with their dequantized
        // values, the file stores codes, scales and zero points.
        let mut ck = state(&s);
        for (name, table) in [
            (
                "embeddings.word_embeddings",
                s.bert.embeddings.word_embeddings.shallow_clone(),
            ),
            (
                "embeddings.position_embeddings",
                s.bert.embeddings.position_embeddings.shallow_clone(),
            ),
        ] {
            let q = QuantizedWeight::quantize(&table.to_device(Device::Cpu), table_spec)?;
            ck.remove(&format!("{name}.weight"));
            for (n, t) in q.named_buffers() {
                ck.insert(format!("{name}.{n}"), t);
            }
            let deq = q.dequantize().to_device(device);
            tch::no_grad(|| table.detach().copy_(&deq));
        }
        acc_q.push(accuracy(&s, &test_trim, 64, device)?);
        bytes_q = file_bytes("int4.safetensors", &ck)?;
        super::say(
            bar,
            format!(
                "  seed {seed}: student f32 {:.4}, trimmed {:.4}, int4 {:.4} ({:.2} MB)",
                acc_f32[acc_f32.len() - 1],
                acc_trim[acc_trim.len() - 1],
                acc_q[acc_q.len() - 1],
                bytes_q / 1e6
            ),
        );
    }

    let mut m = Metrics::new();
    m.insert("teacher.test_accuracy".into(), teacher_test);
    m.insert(
        "students_from_distill_minilm_sections".into(),
        f64::from(u8::from(from_sections)),
    );
    m.insert("kd_epochs".into(), kd_epochs as f64);
    for (name, v) in [
        ("student_f32", &acc_f32),
        ("student_trimmed", &acc_trim),
        ("student_int4", &acc_q),
    ] {
        m.insert(format!("{name}.test_accuracy"), mean(v));
        m.insert(format!("{name}.test_accuracy_sd"), sample_sd(v));
        m.insert(format!("{name}_over_teacher"), mean(v) / teacher_test);
    }
    m.insert("accuracy_relative".into(), mean(&acc_q) / teacher_test);
    m.insert("size_mb_teacher".into(), teacher_bytes / 1e6);
    m.insert("size_mb_student_f32".into(), bytes_f32 / 1e6);
    m.insert("size_mb_student_trimmed".into(), bytes_trim / 1e6);
    m.insert("size_mb_student_int4".into(), bytes_q / 1e6);
    m.insert("size_reduction".into(), 1.0 - bytes_q / teacher_bytes);
    m.insert(
        "size_reduction_vs_teacher_without_pooler".into(),
        1.0 - bytes_q / (teacher_bytes - teacher_pooler_bytes),
    );
    // The same pipeline without the trim: the dropped rows at int4's bytes per weight.
    let dropped = (plan.old_size() - plan.len() as i64) * hidden;
    let untrimmed = bytes_q + dropped as f64 * table_spec.bits_per_weight(hidden) / 8.0;
    m.insert("size_mb_student_int4_untrimmed".into(), untrimmed / 1e6);
    m.insert(
        "size_reduction_without_trim".into(),
        1.0 - untrimmed / teacher_bytes,
    );
    m.insert("vocab_kept".into(), plan.len() as f64);
    m.insert("vocab_before".into(), plan.old_size() as f64);
    m.insert("student_lr".into(), s_lr);
    m.insert("seeds".into(), seeds.len() as f64);
    let notes = vec![
        format!(
            "Teacher: all-MiniLM-L6-v2 + a linear head, fully fine-tuned on the {} train texts of the Debian sections ({epochs} epochs, batch {KD_BATCH}, max length {MAX_LEN}, AdamW lr {t_lr:e}, weight decay 0.01, linear schedule with 10% warm-up), seed 0; its size is its whole f32 state (encoder, unused pooler included, and head) as safetensors.",
            train.len()
        ),
        format!(
            "Student: embeddings and layers [0, 5] of the fine-tuned teacher, its head copied, the unused pooler dropped; KD (forward KL with T², T = 2, alpha = 0.5) for {kd_epochs} epoch(s) from the teacher's top-4 cache over the train texts plus the {} unlabelled eight-section synopses, as distill.minilm_sections. {} Student lr chosen on the {} dev texts at seed 0 with hard labels ({}): {s_lr:e}. Seeds {seeds:?}; accuracies on the {} test texts (mean, sample sd).",
            pool_texts.len(),
            if from_sections {
                "Teacher and students are distill.minilm_sections' of this same run (its cached-KD students, one per seed), handed over in memory rather than trained twice; `--only quant.distill_plus_quant` trains its own with the same recipe."
            } else {
                "Teacher and students trained here (distill.minilm_sections did not run before it in this run)."
            },
            dev.len(),
            seen.join(", "),
            test.len()
        ),
        format!(
            "Vocabulary trimmed (reuse_distill::vocab) to the tokens of the {} synopses of fixtures/debian_synopses plus the train texts, and printable ASCII single characters: {} of {} tokens kept. Test texts are tokenized with the trimmed tokenizer (an unseen word splits into kept pieces), so student_trimmed measures what trimming costs.",
            corpus.len() - splits.train.texts.len(),
            plan.len(),
            plan.old_size()
        ),
        format!(
            "int4: the 12 encoder linears by GPTQ (groups of 64, zero points, calibrated on {} train texts tokenized with the trimmed tokenizer), the word and position tables by round-to-nearest, one group per row (a scale and a zero point per token vector); LayerNorms, biases, token-type table and head stay f32. Size: the safetensors file of codes, f32 scales, u8 zero points and the f32 rest. size_reduction = 1 - int4 student / teacher; size_reduction_without_trim: the same pipeline with the full table (the dropped rows at int4's bits per weight, scales and zero points included).",
            calib.len()
        ),
    ];
    Ok(Outcome { metrics: m, notes })
}

/// `quant.distill_plus_quant` on its own: the teacher (distill.minilm_sections' recipe,
/// seed 0), the student lr on dev at seed 0 with hard labels, the top-4 cache, and one
/// KD student per seed. Returns (teacher, its test accuracy, student lr, students, the
/// grid's dev accuracies).
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn train_teacher_and_students(
    ctx: &Ctx,
    bar: &ProgressBar,
    dir: &Path,
    n_classes: i64,
    train: &reuse_core::models::TokenizedDataset,
    dev: &reuse_core::models::TokenizedDataset,
    test: &reuse_core::models::TokenizedDataset,
    train_pool: &reuse_core::models::TokenizedDataset,
    cfg: &dyn Fn(f64, u64, &dyn reuse_core::data::BatchSource) -> reuse_core::TrainConfig,
) -> Result<(
    reuse_core::models::BertClassifier,
    f64,
    f64,
    Vec<reuse_core::models::BertClassifier>,
    Vec<String>,
)> {
    use reuse_core::models::{Bert, BertClassifier};
    use reuse_core::trainer::accuracy;
    use reuse_core::Trainer;
    use reuse_distill::cache::{build_cache, CacheConfig, TeacherCache};
    use reuse_distill::losses::KdConfig;
    use reuse_distill::student::cut_layers;
    use reuse_distill::{dataset_fingerprint, Distiller, Teacher, TeacherSource};
    let device = ctx.device;
    bar.set_message("quant.distill_plus_quant teacher");
    tch::manual_seed(0);
    let teacher = BertClassifier::new(Bert::load(dir, device, Kind::Float)?, n_classes);
    let rt = Trainer::new(cfg(2e-4, 0, train)).fit(&teacher, train, None, &mut [])?;
    let teacher_test = accuracy(&teacher, test, 64, device)?;
    super::say(
        bar,
        format!("  teacher: test {teacher_test:.4} ({:.0} s)", rt.seconds),
    );
    let student_of = |seed: u64| -> Result<BertClassifier> {
        tch::manual_seed(seed as i64);
        let bert = cut_layers(&teacher.bert, &[0, 5])?;
        super::distill::with_teachers_head(bert, &teacher)
    };
    // The student lr, chosen on dev at seed 0 with hard labels.
    let mut best = (f64::MIN, 0.0);
    let mut seen = Vec::new();
    for lr in [1e-4, 3e-4, 1e-3] {
        let s = student_of(0)?;
        Trainer::new(cfg(lr, 0, train)).fit(&s, train, None, &mut [])?;
        let acc = accuracy(&s, dev, 64, device)?;
        seen.push(format!("{lr:e}: {acc:.4}"));
        if acc > best.0 {
            best = (acc, lr);
        }
    }
    let s_lr = best.1;
    super::say(bar, format!("  student lr on dev: {}", seen.join(", ")));
    // The teacher's top-4 cache over the labelled set plus the pool.
    let cache_dir = ctx.report_dir().join("distill-plus-quant-cache");
    let _ = std::fs::remove_dir_all(&cache_dir);
    let ccfg = CacheConfig::top_k(4).with_dtype(Kind::Half);
    build_cache(&teacher, train_pool, &cache_dir, &ccfg, 128, device)?;
    let cache = TeacherCache::open(
        &cache_dir,
        Some(&teacher.fingerprint()),
        Some(&dataset_fingerprint(train_pool)?),
    )?;
    let mut students = Vec::new();
    for &seed in &ctx.seeds {
        bar.set_message(format!("quant.distill_plus_quant KD seed {seed}"));
        let s = student_of(seed)?;
        let mut d = Distiller::new(TeacherSource::Cached(&cache), KdConfig::new(2.0), 0.5)?;
        let mut tr = Trainer::new(cfg(s_lr, seed, train_pool));
        tr.begin_task(0, &s, train_pool, &mut [&mut d])?;
        tr.fit(&s, train_pool, None, &mut [&mut d])?;
        students.push(s);
    }
    drop(cache);
    let _ = std::fs::remove_dir_all(&cache_dir);
    Ok((teacher, teacher_test, s_lr, students, seen))
}

/// The environment variable that turns `reuse-bench` into one `quant.qlora` training
/// run (a child process, so each run's peak memory is its own).
pub const QLORA_CHILD: &str = "REUSE_BENCH_QLORA_CHILD";

/// One QLoRA / LoRA run, as [`qlora`] asks its child process for it.
#[derive(serde::Serialize, serde::Deserialize)]
struct QloraRun {
    base: std::path::PathBuf,
    lr: f64,
    seed: u64,
    cuda: bool,
    /// The parent's sizes: training steps, the dev and test splits cut to their first
    /// this many texts, GPTQ's calibration texts for `quantize_after`.
    steps: usize,
    eval_texts: usize,
    calibration: usize,
    /// After training, merge the adapter and quantize the fine-tuned classifier (int8
    /// round-to-nearest, int4 GPTQ) to measure its test accuracy after quantization.
    quantize_after: bool,
}

/// What a child run reports on its last stdout line.
#[derive(serde::Serialize, serde::Deserialize)]
struct QloraResult {
    dev_accuracy: f64,
    test_accuracy: f64,
    peak_rss_mb: f64,
    load_rss_mb: f64,
    step_ms: f64,
    trainable: usize,
    /// Test accuracy of the merged classifier quantized to int8 / int4, when asked.
    test_accuracy_int8: Option<f64>,
    test_accuracy_int4: Option<f64>,
}

/// `quant.qlora`'s sizes.
pub(super) struct QloraSizes {
    /// Training steps of each run: peft.minilm_sections' budget, half of it at the CPU
    /// size (both arms alike).
    steps: usize,
    /// The dev and test splits cut to their first this many texts (`usize::MAX`: all).
    eval_texts: usize,
    /// GPTQ's calibration texts (the int4 base, and the classifier quantized after).
    calibration: usize,
    /// What the report's notes say of this size (before its steps).
    note: Option<&'static str>,
}

const QLORA_FULL: QloraSizes = QloraSizes {
    steps: super::peft::STEPS,
    eval_texts: usize::MAX,
    calibration: 256,
    note: None,
};

pub(super) const QLORA_SIZES: Sizes<QloraSizes> = Sizes {
    quick: QloraSizes {
        steps: 6,
        eval_texts: 64,
        calibration: 16,
        note: None,
    },
    cpu: Some(QloraSizes {
        steps: super::peft::STEPS / 2,
        note: Some("CPU size, to fit the plain CPU bench"),
        ..QLORA_FULL
    }),
    full: QLORA_FULL,
    cuda: OnCuda::SAME,
};

impl Knobs for QloraSizes {
    fn counts(&self) -> Counts {
        vec![
            ("steps", self.steps),
            ("eval_texts", self.eval_texts),
            ("calibration", self.calibration),
        ]
    }
}

/// The child side: trains `lora` (peft.minilm_sections' LoRA: r=4 on query, value and
/// both FFN linears, the head trained) on the base folder and prints a [`QloraResult`].
pub fn qlora_child(spec: &str) -> Result<()> {
    use reuse_core::models::sentence::tokenize;
    use reuse_core::models::{Bert, BertClassifier, TokenizedDataset};
    use reuse_core::trainer::accuracy;
    use reuse_core::ForwardOptions;
    use reuse_core::{Model, Schedule, TrainConfig, Trainer};
    use reuse_peft::LoraModel;
    use reuse_quant::model::{calibrate, quantize_model, Method};

    let run: QloraRun = serde_json::from_str(spec).context("quant.qlora child spec")?;
    let device = if run.cuda {
        Device::Cuda(0)
    } else {
        Device::Cpu
    };
    let mut splits = super::sections()?;
    splits.dev.texts.truncate(run.eval_texts);
    splits.dev.labels.truncate(run.eval_texts);
    splits.test.texts.truncate(run.eval_texts);
    splits.test.labels.truncate(run.eval_texts);
    let tok = SentenceEncoder::load_with(
        &run.base,
        &reuse_quant::load_options(Device::Cpu, Kind::Float),
    )?
    .tokenizer;
    let max_len = super::peft::MAX_LEN;
    let train = TokenizedDataset::new(&tok, &splits.train, max_len)?;
    let dev = TokenizedDataset::new(&tok, &splits.dev, max_len)?;
    let test = TokenizedDataset::new(&tok, &splits.test, max_len)?;
    let steps = run.steps;
    let n_classes = splits.classes.len() as i64;
    tch::manual_seed(run.seed as i64);
    let mut model = LoraModel::new(BertClassifier::new(
        Bert::load_with(&run.base, &reuse_quant::load_options(device, Kind::Float))?,
        n_classes,
    ));
    let mut lcfg = super::peft::lora_config("lora")?;
    lcfg.modules_to_save = Some(vec!["classifier".into()]);
    model.add_adapter("default", lcfg)?;
    let load_rss_mb = super::peft::peak_rss_mb();
    let cfg = TrainConfig {
        max_steps: Some(steps),
        batch_size: super::peft::BATCH,
        lr: run.lr,
        weight_decay: 0.01,
        schedule: Schedule::Linear { warmup: steps / 10 },
        device,
        seed: run.seed,
        ..Default::default()
    };
    let r = Trainer::new(cfg).fit(&model, &train, None, &mut [])?;
    let peak_rss_mb = super::peft::peak_rss_mb();
    let mut out = QloraResult {
        dev_accuracy: accuracy(&model, &dev, 64, device)?,
        test_accuracy: accuracy(&model, &test, 64, device)?,
        peak_rss_mb,
        load_rss_mb,
        step_ms: 1000.0 * r.seconds / r.steps as f64,
        trainable: model.params().count_trainable(),
        test_accuracy_int8: None,
        test_accuracy_int4: None,
    };
    if run.quantize_after {
        // The fine-tuned classifier (adapter merged) quantized as a deployment would.
        let merged = model.merge_and_unload()?;
        let bert_cfg = merged.bert.config.clone();
        let state = merged.bert.state_dict();
        let head = merged.head;
        let fresh = || -> Result<BertClassifier> {
            let mut ck = state.shallow_copy();
            let bert = Bert::from_checkpoint_with(
                bert_cfg.clone(),
                &mut ck,
                &reuse_quant::load_options(device, Kind::Float),
            )?;
            let c = BertClassifier::new(bert, n_classes);
            tch::no_grad(|| {
                for ((_, mut dst), (_, src)) in c
                    .head
                    .named_parameters()
                    .into_iter()
                    .zip(head.named_parameters())
                {
                    dst.copy_(&src);
                }
            });
            Ok(c)
        };
        let select = |p: &str| p.starts_with("encoder.layer.");
        let mut m8 = fresh()?;
        quantize_model(&mut m8, QuantSpec::int8(), &Method::Rtn, &select)?;
        out.test_accuracy_int8 = Some(accuracy(&m8, &test, 64, device)?);
        drop(m8);
        let mut m4 = fresh()?;
        let calib = calibration_texts(&splits.train.texts, run.calibration);
        let hessians = calibrate(&mut m4.bert, &select, &mut |bert| {
            tch::no_grad(|| -> reuse_core::Result<()> {
                for t in &calib {
                    let (ids, _, _) = tokenize(&tok, &[t.as_str()])?;
                    bert.forward(
                        &ids.to_device(device),
                        None,
                        None,
                        false,
                        ForwardOptions::default(),
                    )?;
                }
                Ok(())
            })
        })?;
        quantize_model(
            &mut m4.bert,
            QuantSpec::int4(64, false),
            &Method::Gptq {
                hessians: &hessians,
                options: GptqOptions::default(),
            },
            &select,
        )?;
        out.test_accuracy_int4 = Some(accuracy(&m4, &test, 64, device)?);
    }
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}

/// QLoRA: the same LoRA (r=4 on query, value and both FFN linears, plus the head) trained
/// on MiniLM's f32 weights and on its int4 weights (GPTQ, groups of 64, zero points),
/// same steps, batch and lr, seeds 0-2; test accuracy and each run's peak memory (a child
/// process per run, f32 and int4 alternating).
pub fn qlora(ctx: &Ctx, bar: &ProgressBar) -> Result<Outcome> {
    let seeds = &ctx.seeds;
    let sizes = ctx.sizes(&QLORA_SIZES);
    let src = minilm_dir()?;
    let splits = super::sections()?;
    let calib = calibration_texts(&splits.train.texts, sizes.calibration);
    let tmp = tempfile_dir(ctx)?;
    let int4 = tmp.join("qlora-int4");
    let r = quantize_folder(
        &src,
        &int4,
        &QuantizeFolder {
            spec: QuantSpec::int4(64, false),
            calibration: Some(calib.clone()),
            gptq: GptqOptions::default(),
            embeddings: false,
        },
        true,
    )?;
    super::say(bar, format!("quant.qlora: int4 base in {:.1} s", r.seconds));
    // The lr peft.dev_sweep found best on dev for this LoRA (lora_qv_ffn_r4): both bases
    // use it, as the QLoRA paper keeps LoRA's hyperparameters.
    let lr = 3e-3;
    let exe = std::env::current_exe()?;
    let mut results: Vec<(&str, Vec<QloraResult>)> = vec![("f32", vec![]), ("int4", vec![])];
    for seed in seeds.iter().copied() {
        for k in 0..2 {
            // Alternate which base goes first, so drift in the machine hits both alike.
            let i = (k + seed as usize) % 2;
            let base = if i == 0 { src.clone() } else { int4.clone() };
            bar.set_message(format!("quant.qlora {} seed {seed}", results[i].0));
            let spec = serde_json::to_string(&QloraRun {
                base,
                lr,
                seed,
                cuda: ctx.device.is_cuda(),
                steps: sizes.steps,
                eval_texts: sizes.eval_texts,
                calibration: sizes.calibration,
                quantize_after: i == 0,
            })?;
            let o = std::process::Command::new(&exe)
                .env(QLORA_CHILD, spec)
                .output()
                .context("starting a quant.qlora child run")?;
            if !o.status.success() {
                anyhow::bail!(
                    "quant.qlora child run ({} seed {seed}) failed: {}",
                    results[i].0,
                    String::from_utf8_lossy(&o.stderr)
                );
            }
            let stdout = String::from_utf8_lossy(&o.stdout);
            let last = stdout.lines().last().unwrap_or_default();
            let res: QloraResult = serde_json::from_str(last)
                .with_context(|| format!("quant.qlora child output: {stdout}"))?;
            super::say(
                bar,
                format!(
                    "  {} seed {seed}: test {:.4}, peak RSS {:.0} MB (after load {:.0} MB), {:.0} ms/step",
                    results[i].0, res.test_accuracy, res.peak_rss_mb, res.load_rss_mb, res.step_ms
                ),
            );
            results[i].1.push(res);
        }
    }
    let _ = std::fs::remove_dir_all(&int4);
    let mut m = Metrics::new();
    for (name, rs) in &results {
        let get = |f: &dyn Fn(&QloraResult) -> f64| rs.iter().map(f).collect::<Vec<_>>();
        let acc = get(&|r| r.test_accuracy);
        m.insert(format!("{name}.test_accuracy"), mean(&acc));
        m.insert(format!("{name}.test_accuracy_sd"), sample_sd(&acc));
        let dev = get(&|r| r.dev_accuracy);
        m.insert(format!("{name}.dev_accuracy"), mean(&dev));
        let peak = get(&|r| r.peak_rss_mb);
        m.insert(format!("{name}.peak_rss_mb"), mean(&peak));
        m.insert(format!("{name}.peak_rss_mb_sd"), sample_sd(&peak));
        let load = get(&|r| r.load_rss_mb);
        m.insert(format!("{name}.load_rss_mb"), mean(&load));
        insert_spread(&mut m, &format!("{name}.step_ms"), &get(&|r| r.step_ms));
        m.insert(format!("{name}.trainable_params"), rs[0].trainable as f64);
    }
    let gap: Vec<f64> = results[0]
        .1
        .iter()
        .zip(&results[1].1)
        .map(|(f, q)| f.test_accuracy - q.test_accuracy)
        .collect();
    m.insert("accuracy_gap".into(), mean(&gap));
    m.insert("accuracy_gap_sd".into(), sample_sd(&gap));
    let ratio: Vec<f64> = results[0]
        .1
        .iter()
        .zip(&results[1].1)
        .map(|(f, q)| q.peak_rss_mb / f.peak_rss_mb)
        .collect();
    // The fine-tuned classifier (f32 LoRA, merged) before and after quantization.
    for (bits, get) in [
        (
            "int8",
            (|r: &QloraResult| r.test_accuracy_int8) as fn(&QloraResult) -> Option<f64>,
        ),
        ("int4", |r: &QloraResult| r.test_accuracy_int4),
    ] {
        let drops: Vec<f64> = results[0]
            .1
            .iter()
            .filter_map(|r| get(r).map(|q| r.test_accuracy - q))
            .collect();
        let accs: Vec<f64> = results[0].1.iter().filter_map(get).collect();
        m.insert(format!("classifier.test_accuracy_{bits}"), mean(&accs));
        m.insert(format!("classifier.accuracy_drop_{bits}"), mean(&drops));
        m.insert(
            format!("classifier.accuracy_drop_{bits}_sd"),
            sample_sd(&drops),
        );
    }
    m.insert("peak_memory_ratio".into(), mean(&ratio));
    m.insert("peak_memory_ratio_sd".into(), sample_sd(&ratio));
    m.insert("lr".into(), lr);
    m.insert("int4_file_mb".into(), r.bytes_after as f64 / 1e6);
    m.insert("f32_file_mb".into(), r.bytes_before as f64 / 1e6);
    let mut notes = vec![
        format!(
            "LoRA r=4 (alpha 8) on query, value and both FFN linears of all-MiniLM-L6-v2, plus a linear head, trained on the {} train texts of the Debian sections: {} steps, batch {}, max length {}, AdamW lr {lr:e} (the best dev lr for this LoRA in peft.dev_sweep, benches/sweeps/peft_dev_sweep.md; the int4 base reuses it, as the QLoRA paper reuses LoRA's), weight decay 0.01, linear schedule with 10% warm-up. Seeds {seeds:?}; accuracies on the test split; accuracy_gap = f32 - int4 per seed.",
            splits.train.texts.len(),
            sizes.steps,
            super::peft::BATCH,
            super::peft::MAX_LEN
        ),
        format!(
            "Bases: the f32 folder, and the same folder quantized by `reuse quantize`'s code: the 36 encoder linears int4 by GPTQ (groups of 64, zero points, calibrated on {} train texts), the embedding tables f32 ({:.1} MB -> {:.1} MB on disk). Frozen int4 weights are dequantized on every forward.",
            calib.len(),
            r.bytes_before as f64 / 1e6,
            r.bytes_after as f64 / 1e6
        ),
        "classifier.*: each f32 run's fine-tuned classifier, its adapter merged into the encoder, then quantized as a deployment would: int8 per channel by round-to-nearest, and int4 by GPTQ (groups of 64, zero points, the first 256 train texts as calibration); accuracy_drop_* = the merged f32 classifier's test accuracy - the quantized one's, per seed (mean, sample sd). Measured after the run's peak memory was read.".into(),
        "Memory: each run is its own process (this binary, re-run with one run's settings); peak_rss_mb is its VmHWM after training (process RSS: libtorch, the model, optimizer state, activations), load_rss_mb its VmHWM once the model is built. peak_memory_ratio = int4 / f32 peak, per seed. f32 and int4 runs alternate, first one then the other.".into(),
    ];
    if let Some(note) = sizes.note {
        notes.push(format!(
            "{note}: {} steps per run, half of peft.minilm_sections' {} (both arms alike; a CUDA run or `--full` trains {}).",
            sizes.steps,
            super::peft::STEPS,
            super::peft::STEPS
        ));
    }
    Ok(Outcome { metrics: m, notes })
}

/// The claims-table rows this file's experiments measure (see `crate::claims`).
pub const CLAIMS: &[Claim] = &[
    Claim {
        text: "Distillation + quantization is >= 95% smaller",
        experiment: "quant.distill_plus_quant",
        target: ">= 0.95 size reduction",
        keys: &["size_reduction", "size_mb_student_int4", "size_mb_teacher"],
        eval: |g| {
            let r = g("size_reduction");
            (
                format!("{r:.3}"),
                format!(
                    "{:.2} MB vs the teacher's {:.2} MB",
                    g("size_mb_student_int4"),
                    g("size_mb_teacher")
                ),
                Some(r >= 0.95),
            )
        },
    },
    Claim {
        text: "... at >= 0.90x the teacher's accuracy",
        experiment: "quant.distill_plus_quant",
        target: ">= 0.90x",
        keys: &[
            "accuracy_relative",
            "student_int4.test_accuracy",
            "student_int4.test_accuracy_sd",
        ],
        eval: |g| {
            let r = g("accuracy_relative");
            (
                format!("{r:.3}x"),
                format!(
                    "int4 student {}",
                    pm(
                        g("student_int4.test_accuracy"),
                        g("student_int4.test_accuracy_sd")
                    )
                ),
                Some(r >= 0.9),
            )
        },
    },
];
