//! reuse-quant experiments.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use indicatif::ProgressBar;
use reuse_core::data::load_text_splits;
use reuse_core::models::{BertConfig, SentenceEncoder};
use reuse_core::Checkpoint;
use reuse_quant::folder::{quantize_folder, QuantizeFolder, QuantizeReport};
use reuse_quant::gptq::GptqOptions;
use reuse_quant::QuantSpec;
use reuse_testkit::{fixtures_dir, minilm_dir};
use tch::{Device, Kind, Tensor};

use super::distill::{fit_probe, probe_accuracy, row_cosines};
use super::{insert_spread, mean, sample_sd, Ctx, Metrics, Outcome};

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

/// MiniLM in f32, bf16, int8 and int4 (round-to-nearest and GPTQ, groups of 32, 64 and
/// 128): size on disk, embedding cosine to f32 on the sections' test texts, a linear
/// probe's test accuracy (trained on the f32 embeddings) before and after, and embed
/// throughput in interleaved rounds.
pub fn minilm(ctx: &Ctx, bar: &ProgressBar) -> Result<Outcome> {
    reuse_quant::register();
    let src = minilm_dir()?;
    let splits = load_text_splits(&fixtures_dir().join("debian_sections/sections.tsv.gz"))?;
    let take = |v: &[String], n: usize| v.iter().take(n).cloned().collect::<Vec<_>>();
    let calib = take(&splits.train.texts, ctx.size(256, 16));
    let n_train = ctx.size(splits.train.texts.len(), 200);
    let n_dev = ctx.size(splits.dev.texts.len(), 100);
    let n_test = ctx.size(splits.test.texts.len(), 100);
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
            SentenceEncoder::load(&v.dir, device, Kind::Float)?,
        ));
    }
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
        test_emb.push((name.clone(), e));
    }
    for (k, from) in [
        ("cosine_mean_int8", "cosine_mean_int8"),
        ("cosine_min_int8", "cosine_min_int8"),
        ("cosine_mean_int4_rtn", "cosine_mean_int4_rtn_g64"),
        ("cosine_mean_int4", "cosine_mean_int4_gptq_g64"),
    ] {
        let v = m[from];
        m.insert(k.into(), v);
    }

    // The classifier: a linear probe on the f32 embeddings (lr chosen on dev), seeds
    // 0-2; its test accuracy on each variant's embeddings.
    let seeds: &[u64] = if ctx.quick { &[0] } else { &[0, 1, 2] };
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
    let rounds = ctx.size(3, 1);
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
            "all-MiniLM-L6-v2 ({} layers, hidden {}); the 36 encoder linears quantized (the pooler, unused by mean pooling, and the embedding tables stay f32). Calibration (GPTQ): the first {} training texts of the Debian sections, one text per forward, all Hessians from the f32 model in one pass; damp 0.01, blocks of 128, no act order. Measured on the {} test texts: cosine of each variant's embedding to f32's.",
            cfg.num_hidden_layers, cfg.hidden_size, calib.len(), test.len()
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

/// A scratch folder under the report folder for the quantized variants.
fn tempfile_dir(ctx: &Ctx) -> Result<std::path::PathBuf> {
    let d = ctx.report_dir().join("quant-minilm");
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
