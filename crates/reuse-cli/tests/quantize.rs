//! `reuse quantize` on the real MiniLM: the int8 folder is smaller, `reuse embed` loads
//! it like any model folder and its embeddings of real texts stay close to f32's; bad
//! requests are one-line errors that write nothing.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use reuse_core::Checkpoint;
use reuse_testkit::minilm_dir;
use tch::{Device, Kind, Tensor};

fn reuse(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_reuse"))
        .args(args)
        .output()
        .unwrap()
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn ok(o: &Output) -> String {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn texts() -> PathBuf {
    root().join("fixtures/minilm/texts.txt")
}

fn embed(dir: &Path, out: &Path) -> Tensor {
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
    Checkpoint::load(out, Device::Cpu)
        .unwrap()
        .tensor("embeddings")
        .unwrap()
        .shallow_clone()
}

#[test]
fn int8_folder_embeds_like_the_original() {
    let src = minilm_dir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("minilm-int8");
    let stdout = ok(&reuse(&[
        "quantize",
        "--model",
        src.to_str().unwrap(),
        "--bits",
        "8",
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]));
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["quantization_config"]["bits"], 8);
    assert_eq!(report["quantization_config"]["method"], "rtn");
    let ratio = report["size_ratio"].as_f64().unwrap();
    assert!(ratio < 0.68, "size ratio {ratio}");
    let a = embed(&src, &tmp.path().join("f32.safetensors"));
    let b = embed(&out, &tmp.path().join("int8.safetensors"));
    let cos = (&a * &b).sum_dim_intlist(1, false, Kind::Float)
        / (a.norm_scalaropt_dim(2, [1].as_slice(), false)
            * b.norm_scalaropt_dim(2, [1].as_slice(), false));
    let min = cos.min().double_value(&[]);
    assert!(min > 0.995, "int8 embedding cosine min {min}");
    assert!(
        (&a - &b).abs().max().double_value(&[]) > 0.0,
        "int8 changed nothing"
    );
}

#[test]
fn bad_requests_are_one_line_errors_and_write_nothing() {
    let src = minilm_dir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("q");
    for (args, expect) in [
        (vec!["--bits", "3"], "--bits must be 8 or 4, found 3"),
        (
            vec!["--bits", "4", "--group-size", "100"],
            "group size 100 does not divide the input dimension 384",
        ),
        (
            vec!["--bits", "4", "--act-order"],
            "--act-order is a GPTQ setting",
        ),
        (
            vec!["--bits", "4", "--calibration", "/nonexistent/texts.txt"],
            "/nonexistent/texts.txt",
        ),
    ] {
        let mut all = vec![
            "quantize",
            "--model",
            src.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        all.extend(args);
        let o = reuse(&all);
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(expect), "{all:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(!out.exists(), "{all:?} wrote {}", out.display());
    }
}
