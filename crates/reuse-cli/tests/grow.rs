//! `reuse grow` on the real MiniLM: width-grown folders load in transformers and
//! sentence-transformers (through the `.venv` python, `fixtures/distill/student_check.py`)
//! and give the original's embeddings; a gated folder gives them in reuse; a copied-depth
//! folder loads in both and drifts by what reuse measures; bad requests are one-line
//! errors that leave the source folder untouched and write nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use reuse_core::Checkpoint;
use reuse_testkit::minilm_dir;
use tch::{Device, Kind, Tensor};

mod common;
use common::{max_diff, ok, reuse, root};

fn texts() -> PathBuf {
    root().join("fixtures/minilm/texts.txt")
}

/// `reuse embed` of the fixture texts with the model in `dir`.
fn embed(dir: &Path, tmp: &Path) -> Tensor {
    let out = tmp.join(format!(
        "emb-{}.safetensors",
        dir.file_name().unwrap().to_string_lossy()
    ));
    ok(&reuse(&[
        "embed",
        "--model",
        dir.to_str().unwrap(),
        "--texts",
        texts().to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--device",
        "cpu",
    ]));
    Checkpoint::load(&out, Device::Cpu)
        .unwrap()
        .tensor("embeddings")
        .unwrap()
        .shallow_clone()
}

/// sentence-transformers' and transformers' view of the folder.
fn python(dir: &Path, tmp: &Path) -> Checkpoint {
    let res = tmp.join(format!(
        "py-{}.safetensors",
        dir.file_name().unwrap().to_string_lossy()
    ));
    let o = Command::new(root().join(".venv/bin/python"))
        .arg(root().join("fixtures/distill/student_check.py"))
        .args([dir.as_os_str(), texts().as_os_str(), res.as_os_str()])
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    ok(&o);
    Checkpoint::load(&res, Device::Cpu).unwrap()
}

fn grow(args: &[&str], src: &Path, out: &Path) -> serde_json::Value {
    let mut all = vec!["grow"];
    all.extend_from_slice(args);
    all.extend_from_slice(&[
        "--model",
        src.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]);
    let o = reuse(&all);
    ok(&o);
    serde_json::from_slice(&o.stdout).unwrap()
}

fn loads_cleanly(py: &Checkpoint, layers: i64) {
    let meta = py.metadata();
    assert_eq!(meta["model_class"], "BertModel");
    assert_eq!(meta["encoder_layers"], layers.to_string());
    assert_eq!(meta["missing_keys"], "[]");
    assert_eq!(meta["unexpected_keys"], "[]");
}

#[test]
fn grown_minilm_folders_load_in_hugging_face_and_keep_or_report_the_function() {
    let tmp = tempfile::tempdir().unwrap();
    let src = minilm_dir().unwrap();
    let original = embed(&src, tmp.path());

    // FFN 1536 -> 3072: exact, and transformers / sentence-transformers agree.
    let wide = tmp.path().join("wide");
    let r = grow(&["width", "--intermediate-size", "3072"], &src, &wide);
    assert_eq!(r["exact"], true);
    assert!(r["max_abs_diff"].as_f64().unwrap() <= 1e-5, "{r}");
    let py = python(&wide, tmp.path());
    loads_cleanly(&py, 6);
    let st = py.tensor("st_embeddings").unwrap();
    assert!(
        max_diff(st, &original) < 1e-4,
        "width-grown ST vs original: {}",
        max_diff(st, &original)
    );
    assert!(max_diff(py.tensor("hf_embeddings").unwrap(), &original) < 1e-4);
    assert!(max_diff(&embed(&wide, tmp.path()), &original) < 1e-5);

    // Hidden 384 -> 768 with 24 heads of 32: the embedding is the original repeated twice,
    // so after L2 normalisation each half is the original / sqrt(2).
    let wider = tmp.path().join("wider");
    let r = grow(
        &["width", "--hidden-size", "768", "--heads", "24"],
        &src,
        &wider,
    );
    assert!(r["max_abs_diff"].as_f64().unwrap() <= 1e-5, "{r}");
    let py = python(&wider, tmp.path());
    loads_cleanly(&py, 6);
    let st = py.tensor("st_embeddings").unwrap();
    assert_eq!(st.size(), [39, 768]);
    let halves = st.view([39, 2, 384]) * 2f64.sqrt();
    assert!(max_diff(&halves.select(1, 0), &original) < 1e-4);
    assert!(max_diff(&halves.select(1, 1), &original) < 1e-4);
    let pooling: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(wider.join("1_Pooling/config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(pooling["word_embedding_dimension"], 768);

    // 6 -> 8 gated layers: exact in reuse, and config.json says which layers are gated.
    let gated = tmp.path().join("gated");
    let r = grow(
        &["depth", "--layers", "8", "--method", "gated"],
        &src,
        &gated,
    );
    assert_eq!(r["gated_layers"], serde_json::json!([3, 7]));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(gated.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        cfg["reuse_layer_gates"]["layers"],
        serde_json::json!([3, 7])
    );
    assert_eq!(cfg["num_hidden_layers"], 8);
    assert!(max_diff(&embed(&gated, tmp.path()), &original) < 1e-5);

    // 6 -> 8 copied layers: loads in Hugging Face, and drifts by what reuse computes.
    let copy = tmp.path().join("copy");
    let r = grow(&["depth", "--layers", "8", "--method", "copy"], &src, &copy);
    assert_eq!(r["exact"], false);
    assert!(r["max_abs_diff"].as_f64().unwrap() > 1e-3, "{r}");
    let py = python(&copy, tmp.path());
    loads_cleanly(&py, 8);
    let ours = embed(&copy, tmp.path());
    let st = py.tensor("st_embeddings").unwrap();
    assert!(
        max_diff(st, &ours) < 1e-4,
        "copy folder: ST vs reuse {}",
        max_diff(st, &ours)
    );
    let cos = |a: &Tensor| Tensor::cosine_similarity(a, &original, -1, 1e-8);
    let (cos_py, cos_reuse) = (cos(st), cos(&ours));
    assert!(max_diff(&cos_py, &cos_reuse) < 1e-4);
    let mean = cos_reuse.mean(Kind::Double).double_value(&[]);
    assert!(
        mean < 0.9999 && mean > 0.3,
        "copied layers should drift: cosine {mean}"
    );
}

fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut m = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            m.insert(
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            );
        }
    }
    m
}

fn one_line_error(o: &Output, needles: &[&str]) {
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    for n in needles {
        assert!(err.contains(n), "{n:?} not in: {err}");
    }
}

#[test]
fn bad_growth_requests_are_one_line_errors_and_touch_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    // A small copy of MiniLM's folder so the check of "untouched" is cheap.
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let m = minilm_dir().unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(m.join(f), src.join(f)).unwrap();
    }
    let before = snapshot(&src);
    let out = tmp.path().join("out");
    let s = src.to_str().unwrap();
    let o = out.to_str().unwrap();
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            vec!["width", "--intermediate-size", "1000"],
            vec!["intermediate size", "shrink", "1536", "1000"],
        ),
        (
            vec!["width", "--hidden-size", "500"],
            vec!["500 is not a multiple of 384", "768"],
        ),
        (
            vec!["width", "--heads", "24"],
            vec!["head", "hidden size to 768"],
        ),
        (
            vec!["depth", "--layers", "4"],
            vec!["more layers than the model's 6", "4"],
        ),
        (
            vec!["depth", "--layers", "8", "--method", "zip"],
            vec!["`zip` is not one of gated, copy, stack"],
        ),
        (vec!["width"], vec!["nothing to grow"]),
    ];
    for (args, needles) in cases {
        let mut all = vec!["grow"];
        all.extend_from_slice(&args);
        all.extend_from_slice(&["--model", s, "--out", o]);
        one_line_error(&reuse(&all), &needles);
        assert!(!out.exists(), "{args:?} wrote {o}");
    }
    assert_eq!(snapshot(&src), before, "the source folder changed");

    // Another architecture.
    let gpt = tmp.path().join("gpt");
    std::fs::create_dir(&gpt).unwrap();
    std::fs::write(
        gpt.join("config.json"),
        r#"{"model_type": "gpt2", "n_embd": 8}"#,
    )
    .unwrap();
    one_line_error(
        &reuse(&[
            "grow",
            "width",
            "--intermediate-size",
            "64",
            "--model",
            gpt.to_str().unwrap(),
            "--out",
            o,
        ]),
        &["model_type is `gpt2`", "BERT"],
    );
    assert!(!out.exists());

    // An occupied output folder is refused without --overwrite, and kept.
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "x").unwrap();
    one_line_error(
        &reuse(&[
            "grow",
            "width",
            "--intermediate-size",
            "2048",
            "--model",
            s,
            "--out",
            o,
        ]),
        &["already exists and is not empty"],
    );
    assert_eq!(std::fs::read_to_string(out.join("keep.txt")).unwrap(), "x");
}
