//! `reuse distill lm` and `reuse distill cache` on SmolLM2-135M-Instruct's GGUF: a
//! student cut to 4 of the 30 blocks learns from the live teacher and from its per-token
//! top-k cache on Debian package descriptions, is written as a folder that reuse and
//! transformers score alike, and bad input is a clear error that writes nothing. Skips
//! when the GGUF is absent.

use std::path::Path;
use std::process::Command;

use reuse_testkit::smollm2_gguf_or_skip;

mod common;
use common::{ok, reuse, root};

fn err_text(o: &std::process::Output) -> String {
    assert!(!o.status.success(), "expected a failure");
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!e.contains("panicked"), "{e}");
    e
}

/// The first `n` synopses of the Debian fixture, one per line.
fn synopses(path: &Path, n: usize) {
    let f = std::fs::File::open(root().join("fixtures/debian_synopses/synopses.tsv.gz")).unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(f), &mut text).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split('\t').nth(1))
        .take(n)
        .collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

fn metrics(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("distill_metrics.json")).unwrap())
        .unwrap()
}

#[test]
fn distil_a_cut_student_live_and_from_a_cache() {
    let Some(gguf) = smollm2_gguf_or_skip("distil_a_cut_student_live_and_from_a_cache") else {
        return;
    };
    let g = gguf.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let p = |n: &str| tmp.path().join(n);
    let ps = |n: &str| p(n).to_str().unwrap().to_string();
    synopses(&p("texts.txt"), 120);
    let distil = |out: &str, extra: &[&str]| {
        let mut a = vec![
            "distill",
            "lm",
            "--teacher",
            g,
            "--layers",
            "0,10,20,29",
            "--texts",
        ];
        let texts = ps("texts.txt");
        let out = ps(out);
        a.push(&texts);
        a.extend([
            "--max-len",
            "32",
            "--batch-size",
            "4",
            "--max-steps",
            "4",
            "--lr",
            "1e-3",
            "--device",
            "cpu",
            "--out",
        ]);
        a.push(&out);
        a.extend_from_slice(extra);
        reuse(&a)
    };
    // Live teacher, forward KL mixed half and half with cross-entropy.
    ok(&distil("live", &[]));
    let m = metrics(&p("live"));
    assert_eq!(m["steps"], 4);
    let (before, after) = (
        m["dev_nll_before"].as_f64().unwrap(),
        m["dev_nll"].as_f64().unwrap(),
    );
    assert!(
        after < before,
        "4 steps lower the cut student's dev NLL: {m}"
    );
    assert!(m["teacher_dev_nll"].as_f64().unwrap() < after, "{m}");
    let share = m["student_params"].as_f64().unwrap() / m["teacher_params"].as_f64().unwrap();
    assert!(
        share > 0.3 && share < 0.5,
        "4 of 30 blocks keep the tied embeddings: {share}"
    );
    // The folder: reuse and transformers give the same NLL; its config says 4 layers.
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p("live/config.json")).unwrap()).unwrap();
    assert_eq!(cfg["num_hidden_layers"], 4);
    assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
    std::fs::write(
        p("probe.txt"),
        "A tool that converts audio files between formats.\nLibrary for parsing XML documents\n",
    )
    .unwrap();
    ok(&reuse(&[
        "lm",
        "score",
        "--model",
        &ps("live"),
        "--texts",
        &ps("probe.txt"),
        "--device",
        "cpu",
        "--out",
        &ps("score.json"),
    ]));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p("score.json")).unwrap()).unwrap();
    let ours: Vec<f64> = v["per_text"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["nll"].as_f64().unwrap())
        .collect();
    let o = Command::new(root().join(".venv/bin/python"))
        .arg(root().join("fixtures/smollm2_lm/hf_folder_nll.py"))
        .arg(p("live"))
        .arg(p("probe.txt"))
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let hf: serde_json::Value = serde_json::from_str(ok(&o).trim()).unwrap();
    for (i, x) in ours.iter().enumerate() {
        let y = hf["nll"][i].as_f64().unwrap();
        assert!(
            ((x - y) / y).abs() < 1e-4,
            "text {i}: reuse {x} vs transformers {y}"
        );
    }

    // Greedy generation in transformers from the folder equals `reuse generate`'s, token
    // for token, on prompts written for this test.
    std::fs::write(
        p("prompts.txt"),
        "A small utility that renames photos by the date they were taken\nFonts for\n",
    )
    .unwrap();
    ok(&reuse(&[
        "generate",
        "--model",
        &ps("live"),
        "--prompts",
        &ps("prompts.txt"),
        "--max-new-tokens",
        "8",
        "--device",
        "cpu",
        "--out",
        &ps("gen.jsonl"),
    ]));
    let ours: Vec<serde_json::Value> = std::fs::read_to_string(p("gen.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["tokens"].clone())
        .collect();
    let o = Command::new(root().join(".venv/bin/python"))
        .arg(root().join("fixtures/smollm2_lm/hf_folder_generate.py"))
        .arg(p("live"))
        .arg(p("prompts.txt"))
        .arg("8")
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let hf: serde_json::Value = serde_json::from_str(ok(&o).trim()).unwrap();
    assert_eq!(ours.len(), 2);
    for (i, t) in ours.iter().enumerate() {
        assert_eq!(
            t, &hf["tokens"][i],
            "prompt {i}: reuse vs transformers greedy tokens"
        );
    }

    // A per-token top-16 cache of the training split, then KD from it.
    let cache_out = ok(&reuse(&[
        "distill",
        "cache",
        "--teacher",
        g,
        "--data",
        &ps("texts.txt"),
        "--max-len",
        "32",
        "--top-k",
        "16",
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "--out",
        &ps("cache"),
    ]));
    assert!(cache_out.contains("bytes per token"), "{cache_out}");
    ok(&distil(
        "cached",
        &["--cache", &ps("cache"), "--loss", "jsd"],
    ));
    let mc = metrics(&p("cached"));
    assert!(
        mc["dev_nll"].as_f64().unwrap() < mc["dev_nll_before"].as_f64().unwrap(),
        "{mc}"
    );
    // A cache of other examples (another hold-out) is refused, and nothing is written.
    let e = err_text(&distil("wrong", &["--cache", &ps("cache"), "--seed", "7"]));
    assert!(e.contains("--cache") && e.contains("dataset"), "{e}");
    assert!(!p("wrong").exists());

    // Bad layer lists and losses: clear errors, nothing written.
    let bad = |layers: &str, extra: &[&str]| {
        let mut a = vec![
            "distill",
            "lm",
            "--teacher",
            g,
            "--layers",
            layers,
            "--texts",
        ];
        let texts = ps("texts.txt");
        let out = ps("bad");
        a.push(&texts);
        a.extend(["--device", "cpu", "--out"]);
        a.push(&out);
        a.extend_from_slice(extra);
        let e = err_text(&reuse(&a));
        assert!(!p("bad").exists(), "{e}");
        e
    };
    let e = bad("0,30", &[]);
    assert!(e.contains("30") && e.contains("30 layers"), "{e}");
    let e = bad("5,2", &[]);
    assert!(e.contains("strictly increasing"), "{e}");
    let e = bad("0,1", &["--loss", "wasserstein"]);
    assert!(e.contains("fkl, rkl or jsd"), "{e}");
    let e = bad("0,1", &["--loss", "jsd", "--beta", "1.5"]);
    assert!(e.contains("beta"), "{e}");
    // A student folder with another tokenizer: MiniLM is not a causal LM at all.
    let minilm = reuse_testkit::minilm_dir().unwrap();
    let e = err_text(&reuse(&[
        "distill",
        "lm",
        "--teacher",
        g,
        "--student",
        minilm.to_str().unwrap(),
        "--texts",
        &ps("texts.txt"),
        "--out",
        &ps("bad"),
    ]));
    assert!(e.contains(minilm.to_str().unwrap()), "{e}");
}
