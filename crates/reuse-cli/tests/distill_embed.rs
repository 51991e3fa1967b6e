//! `reuse distill embed`: the student folder loads in sentence-transformers and
//! transformers (through the `.venv` python) and gives the embeddings `reuse embed`
//! gives; bad layer lists and occupied output folders are one-line errors that write
//! nothing.

use std::process::{Command, Output};

use reuse_core::Checkpoint;
use reuse_testkit::minilm_dir;
use tch::Device;

mod common;
use common::{max_diff, ok, reuse, root};

fn assert_one_line_error(o: &Output, needles: &[&str]) {
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    assert!(err.starts_with("error: "), "{err}");
    for n in needles {
        assert!(err.contains(n), "{n:?} not in: {err}");
    }
}

fn synopses() -> String {
    root()
        .join("fixtures/debian_synopses/synopses.tsv.gz")
        .display()
        .to_string()
}

/// `reuse distill embed` with only the required flags (on the CPU) and `extra`.
fn distill_embed(teacher: &std::path::Path, out: &std::path::Path, extra: &[&str]) -> Output {
    let (t, o, texts) = (teacher.to_str().unwrap(), out.to_str().unwrap(), synopses());
    let mut args = vec![
        "distill",
        "embed",
        "--teacher",
        t,
        "--texts",
        &texts,
        "--out",
        o,
        "--device",
        "cpu",
    ];
    args.extend_from_slice(extra);
    reuse(&args)
}

#[test]
fn student_loads_in_sentence_transformers_and_gives_reuse_embeds_embeddings() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("student");
    let teacher = minilm_dir().unwrap();
    let o = distill_embed(&teacher, &out, &["--max-texts", "200"]);
    ok(&o);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("held-out mean cosine to the teacher"),
        "{stdout}"
    );
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("distill_metrics.json")).unwrap()).unwrap();
    assert_eq!(m["train_texts"], 190);
    assert_eq!(m["held_out_texts"], 10);
    assert_eq!(m["steps"], 6);
    // The defaults: half the layers with the first and last, cosine loss, lr 1e-3.
    assert_eq!(m["layers"], serde_json::json!([0, 2, 5]));
    assert_eq!(m["loss"], "cosine");
    assert_eq!(m["lr"], 1e-3);
    let cos = m["held_out_cosine"].as_f64().unwrap();
    eprintln!("reuse distill embed, 6 steps on 190 synopses: held-out cosine {cos:.4}");
    assert!(cos > 0.0 && cos <= 1.0 + 1e-6, "{cos}");
    assert!(m["final_loss"].as_f64().unwrap().is_finite());
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["num_hidden_layers"], 3);
    for f in [
        "model.safetensors",
        "tokenizer.json",
        "modules.json",
        "sentence_bert_config.json",
        "1_Pooling/config.json",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }

    // The same texts through `reuse embed` and through Python.
    let texts = [
        "Real-time strategy game of ancient warfare",
        "command-line tool to convert between audio formats",
        "Python library for numerical linear algebra on sparse matrices and graphs, with bindings",
        "mail transfer agent",
        "x",
    ];
    let t = dir.path().join("t.txt");
    std::fs::write(&t, texts.join("\n") + "\n").unwrap();
    let emb = dir.path().join("e.safetensors");
    ok(&reuse(&[
        "embed",
        "--model",
        out.to_str().unwrap(),
        "--texts",
        t.to_str().unwrap(),
        "--out",
        emb.to_str().unwrap(),
        "--device",
        "cpu",
    ]));
    let ours = Checkpoint::load(&emb, Device::Cpu).unwrap();
    let ours = ours.tensor("embeddings").unwrap();
    assert_eq!(ours.size(), [5, 384]);
    let res = dir.path().join("py.safetensors");
    let o = Command::new(root().join(".venv/bin/python"))
        .arg(root().join("fixtures/distill/student_check.py"))
        .args([out.as_os_str(), t.as_os_str(), res.as_os_str()])
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    ok(&o);
    let py = Checkpoint::load(&res, Device::Cpu).unwrap();
    let meta = py.metadata();
    assert_eq!(meta["model_class"], "BertModel");
    assert_eq!(meta["num_hidden_layers"], "3");
    assert_eq!(meta["encoder_layers"], "3");
    assert_eq!(meta["missing_keys"], "[]");
    assert_eq!(meta["unexpected_keys"], "[]");
    let d = max_diff(py.tensor("st_embeddings").unwrap(), ours);
    eprintln!("max |sentence-transformers - reuse embed| = {d:.2e}");
    assert!(d < 1e-4, "sentence-transformers vs reuse embed: {d}");
    let d = max_diff(py.tensor("hf_embeddings").unwrap(), ours);
    assert!(d < 1e-4, "transformers AutoModel vs reuse embed: {d}");
    // And it is a new model, not the teacher.
    let te = dir.path().join("teacher.safetensors");
    ok(&reuse(&[
        "embed",
        "--model",
        teacher.to_str().unwrap(),
        "--texts",
        t.to_str().unwrap(),
        "--out",
        te.to_str().unwrap(),
        "--device",
        "cpu",
    ]));
    let te = Checkpoint::load(&te, Device::Cpu).unwrap();
    assert!(max_diff(te.tensor("embeddings").unwrap(), ours) > 1e-3);
}

/// A run that ends far below the recipe's cosine says so in words on stderr (and still
/// writes its student: the user may want it).
#[test]
fn a_weak_student_is_named_at_the_end_of_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("student");
    let teacher = minilm_dir().unwrap();
    let o = distill_embed(&teacher, &out, &["--max-texts", "40", "--lr", "1e-9"]);
    ok(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    let warning = err
        .lines()
        .find(|l| l.starts_with("warning: "))
        .unwrap_or_else(|| panic!("no warning in: {err}"));
    for needle in ["held-out cosine", "below 0.8", "more text"] {
        assert!(warning.contains(needle), "{needle:?} not in: {warning}");
    }
    assert!(out.join("model.safetensors").exists());
}

#[test]
fn bad_layers_and_occupied_output_are_one_line_errors_that_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("student");
    let teacher = minilm_dir().unwrap();
    let args = |layers: &str, out: &str| -> Vec<String> {
        [
            "distill",
            "embed",
            "--teacher",
            teacher.to_str().unwrap(),
            "--layers",
            layers,
            "--texts",
            &synopses(),
            "--out",
            out,
            "--max-texts",
            "40",
            "--device",
            "cpu",
        ]
        .map(String::from)
        .to_vec()
    };
    let run = |a: Vec<String>| reuse(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let o = run(args("0,2,6", out.to_str().unwrap()));
    assert_one_line_error(&o, &["layer index 6", "6 layers"]);
    assert!(!out.exists());
    let o = run(args("2,0", out.to_str().unwrap()));
    assert_one_line_error(&o, &["strictly increasing"]);
    assert!(!out.exists());
    // An occupied --out is refused before any training and left as it was.
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let o = run(args("0,2,4", out.to_str().unwrap()));
    assert_one_line_error(&o, &["already exists and is not empty"]);
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).unwrap(),
        "mine"
    );
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);
    // An unknown loss.
    let mut a = args("0,2,4", dir.path().join("s2").to_str().unwrap());
    a.extend(["--loss".into(), "l1".into()]);
    assert_one_line_error(&run(a), &["mse, normalized-mse or cosine"]);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    // Help names the command's options.
    let o = reuse(&["distill", "embed", "--help"]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("--layers"));
}
