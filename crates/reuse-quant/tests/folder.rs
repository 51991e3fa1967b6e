//! Quantized MiniLM folders: written, loaded back through core's ordinary loader, and
//! compared on real texts (Debian package synopses) with the f32 model; bad folders and
//! bad settings as clear errors.

use std::path::{Path, PathBuf};

use reuse_core::data::load_text_splits;
use reuse_core::models::SentenceEncoder;
use reuse_core::Model;
use reuse_quant::folder::{quantize_folder, QuantizeFolder};
use reuse_quant::gptq::GptqOptions;
use reuse_quant::model::{quantize_model, Method};
use reuse_quant::QuantSpec;
use reuse_testkit::{fixtures_dir, minilm_dir};
use tch::{Device, Kind, Tensor};

fn texts() -> (Vec<String>, Vec<String>) {
    let s = load_text_splits(&fixtures_dir().join("debian_sections/sections.tsv.gz")).unwrap();
    // Calibration from the training split, measurement on the dev split.
    (
        s.train.texts.into_iter().take(64).collect(),
        s.dev.texts.into_iter().take(96).collect(),
    )
}

fn encode(dir: &Path, texts: &[String]) -> Tensor {
    let enc = SentenceEncoder::load_with(dir, &reuse_quant::load_options(Device::Cpu, Kind::Float))
        .unwrap();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    enc.encode(&refs, 32).unwrap()
}

/// Cosine per row.
fn cosines(a: &Tensor, b: &Tensor) -> Tensor {
    (a * b).sum_dim_intlist(1, false, Kind::Float)
        / (a.norm_scalaropt_dim(2, [1].as_slice(), false)
            * b.norm_scalaropt_dim(2, [1].as_slice(), false))
}

fn opts(spec: QuantSpec) -> QuantizeFolder {
    QuantizeFolder {
        spec,
        calibration: None,
        gptq: GptqOptions::default(),
        embeddings: false,
    }
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// Int8 round-to-nearest: the folder is about a quarter of the linears' f32 bytes, it
/// loads through `SentenceEncoder::load` like any model folder, its embeddings are the
/// in-memory quantized model's exactly, and close to the f32 model's on real texts.
#[test]
fn int8_folder_loads_like_any_model_and_keeps_the_embeddings() {
    let src = minilm_dir().unwrap();
    let (_, dev) = texts();
    let dir = tmp();
    let out = dir.path().join("minilm-int8");
    let report = quantize_folder(&src, &out, &opts(QuantSpec::int8()), false).unwrap();
    // The six linears of each of the six layers; the pooler stays f32.
    assert_eq!(
        report.config.modules.len(),
        36,
        "{:?}",
        report.config.modules
    );
    assert!(report
        .config
        .modules
        .iter()
        .all(|m| m.starts_with("encoder.layer.")));
    assert_eq!(report.config.method, "rtn");
    // Linears are 47% of MiniLM; int8 makes them a quarter (+ scales).
    let ratio = report.bytes_after as f64 / report.bytes_before as f64;
    assert!((0.60..0.68).contains(&ratio), "size ratio {ratio}");
    for f in ["tokenizer.json", "modules.json", "1_Pooling/config.json"] {
        assert!(out.join(f).exists(), "{f} not copied");
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["quantization_config"]["bits"], 8);
    assert_eq!(cfg["model_type"], "bert");

    let mut loaded =
        SentenceEncoder::load_with(&out, &reuse_quant::load_options(Device::Cpu, Kind::Float))
            .unwrap();
    assert_eq!(stored_paths(&mut loaded), report.config.modules);

    // The same quantization in memory gives the same embeddings.
    let mut mem =
        SentenceEncoder::load_with(&src, &reuse_quant::load_options(Device::Cpu, Kind::Float))
            .unwrap();
    quantize_model(&mut mem.bert, QuantSpec::int8(), &Method::Rtn, &|_| true).unwrap();
    let refs: Vec<&str> = dev.iter().map(String::as_str).collect();
    let a = loaded.encode(&refs, 32).unwrap();
    let b = mem.encode(&refs, 32).unwrap();
    assert!((&a - &b).abs().max().double_value(&[]) < 1e-6);
    let f32_emb = encode(&src, &dev);
    let cos = cosines(&a, &f32_emb);
    let (mean, min) = (
        cos.mean(Kind::Float).double_value(&[]),
        cos.min().double_value(&[]),
    );
    assert!(
        mean > 0.999 && min > 0.995,
        "int8 cosine mean {mean} min {min}"
    );
}

/// Int4 in groups of 64 with zero points: GPTQ calibrated on 64 training texts keeps
/// the dev texts' embeddings closer to f32 than round-to-nearest does; the embedding
/// table quantized too loads back.
#[test]
fn int4_gptq_beats_round_to_nearest_on_held_out_texts() {
    let src = minilm_dir().unwrap();
    let (calib, dev) = texts();
    let f32_emb = encode(&src, &dev);
    let dir = tmp();
    let spec = QuantSpec::int4(64, false);
    let rtn = dir.path().join("rtn");
    quantize_folder(&src, &rtn, &opts(spec), false).unwrap();
    let gptq = dir.path().join("gptq");
    let report = quantize_folder(
        &src,
        &gptq,
        &QuantizeFolder {
            calibration: Some(calib),
            embeddings: true,
            ..opts(spec)
        },
        false,
    )
    .unwrap();
    assert_eq!(report.config.method, "gptq");
    assert!(report.calibration_tokens > 64 * 5);
    let mean = |d: &Path| {
        cosines(&encode(d, &dev), &f32_emb)
            .mean(Kind::Float)
            .double_value(&[])
    };
    let (c_rtn, c_gptq) = (mean(&rtn), mean(&gptq));
    assert!(
        c_gptq > c_rtn && c_gptq > 0.95,
        "int4 g64 cosine: GPTQ {c_gptq} vs RTN {c_rtn}"
    );
    // Embeddings in int4 too: the whole file is far smaller than f32.
    let ratio = report.bytes_after as f64 / report.bytes_before as f64;
    assert!(ratio < 0.2, "int4 with embeddings: size ratio {ratio}");
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), to).unwrap();
        }
    }
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// Bad folders and settings: each a clear error naming the file, tensor or key, and
/// nothing written where it should not be.
#[test]
fn bad_quantized_folders_and_settings_are_clear_errors() {
    let src = minilm_dir().unwrap();
    let dir = tmp();
    let good = dir.path().join("good");
    quantize_folder(&src, &good, &opts(QuantSpec::int4(32, false)), false).unwrap();

    // A group size that does not divide the weights: nothing written.
    // Without this crate's loader passed, the folder is refused with the way to load it.
    let e = SentenceEncoder::load(&good, Device::Cpu, Kind::Float)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("quant_method `reuse`") && e.contains("load_options"),
        "{e}"
    );

    let out = dir.path().join("bad-group");
    let e = quantize_folder(&src, &out, &opts(QuantSpec::int4(100, true)), false).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("encoder.layer.0.attention.self.query.weight")
            && msg.contains("group size 100 does not divide the input dimension 384"),
        "{msg}"
    );
    assert!(!out.exists());

    // Quantizing a quantized folder.
    let e = quantize_folder(
        &good,
        &dir.path().join("twice"),
        &opts(QuantSpec::int8()),
        false,
    )
    .unwrap_err();
    assert!(e.to_string().contains("already quantized"), "{e}");

    // Missing scales.
    let broken = dir.path().join("no-scale");
    copy_dir(&good, &broken);
    let w = broken.join("model.safetensors");
    let mut ck = reuse_core::Checkpoint::load(&w, Device::Cpu).unwrap();
    let _ = ck
        .remove("encoder.layer.2.output.dense.weight_scale")
        .unwrap();
    ck.save(&w).unwrap();
    let e = SentenceEncoder::load_with(
        &broken,
        &reuse_quant::load_options(Device::Cpu, Kind::Float),
    )
    .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("encoder.layer.2.output.dense.weight_scale")
            && msg.contains("model.safetensors"),
        "{msg}"
    );

    // An unknown layout.
    let other = dir.path().join("awq");
    copy_dir(&good, &other);
    edit_config(&other, |v| {
        v["quantization_config"]["quant_method"] = "awq".into()
    });
    let e =
        SentenceEncoder::load_with(&other, &reuse_quant::load_options(Device::Cpu, Kind::Float))
            .unwrap_err();
    assert!(
        e.to_string()
            .contains("quant_method `awq`) and no loader for it was passed"),
        "{e}"
    );
    edit_config(&other, |v| {
        v["quantization_config"]["quant_method"] = "reuse".into();
        v["quantization_config"]["bits"] = 3.into();
    });
    let e =
        SentenceEncoder::load_with(&other, &reuse_quant::load_options(Device::Cpu, Kind::Float))
            .unwrap_err();
    assert!(
        e.to_string().contains("bits must be 8 or 4, found 3"),
        "{e}"
    );

    // The source was only read.
    let again =
        SentenceEncoder::load_with(&src, &reuse_quant::load_options(Device::Cpu, Kind::Float))
            .unwrap();
    assert!(!again.bert.config.extra.contains_key("quantization_config"));
    let _: PathBuf = good;
}

/// Every parameter of a quantized model is a bias or LayerNorm or table: the quantized
/// weights are buffers, so an optimizer never sees them.
#[test]
fn quantized_weights_are_buffers_not_parameters() {
    let src = minilm_dir().unwrap();
    let mut enc =
        SentenceEncoder::load_with(&src, &reuse_quant::load_options(Device::Cpu, Kind::Float))
            .unwrap();
    let before = enc.bert.named_parameters().len();
    let done = quantize_model(&mut enc.bert, QuantSpec::int8(), &Method::Rtn, &|p| {
        p.contains("attention.self")
    })
    .unwrap();
    assert_eq!(done.len(), 18);
    assert_eq!(enc.bert.named_parameters().len(), before - 18);
    let buffers = enc.bert.named_buffers();
    assert_eq!(buffers.len(), 36);
    assert!(buffers
        .iter()
        .any(|(n, _)| n == "encoder.layer.5.attention.self.value.weight_scale"));
    assert_eq!(stored_paths(&mut enc), done);
}

/// The linears whose weight is quantized storage, in forward order.
fn stored_paths(enc: &mut SentenceEncoder) -> Vec<String> {
    let mut v = Vec::new();
    enc.bert.visit_linears(&mut |p, l| {
        if let Some(s) = l.storage() {
            assert_eq!(s.dequantize().size(), l.shape().to_vec());
            v.push(p.to_string());
        }
    });
    v
}
