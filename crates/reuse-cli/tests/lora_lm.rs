//! LoRA on a causal LM from the command line, on SmolLM2-135M-Instruct's GGUF: the
//! SFT → generate → merge chain (`lora train --task causal-lm`, `generate --adapter`,
//! `lm score --adapter`, `lora merge`), the trained adapter in PEFT with reuse's NLL,
//! a mixed-adapter batch equal to each row alone, QLoRA on the file's codes, and bad
//! input as errors that write nothing. Skips when the GGUF is absent.

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

/// Ten prompt / response pairs (8 train, 1 dev, 1 test) written for this test.
fn pairs(path: &Path) {
    let rows = [
        (
            "A tool that resizes images from the command line.",
            "Resize images",
            "train",
        ),
        (
            "A library for parsing TOML configuration files.",
            "Parse TOML files",
            "train",
        ),
        (
            "A daemon that watches folders and syncs them to a server.",
            "Sync folders",
            "train",
        ),
        (
            "A game where you stack falling blocks into lines.",
            "Stack blocks",
            "train",
        ),
        (
            "An editor for subtitles with a waveform view.",
            "Edit subtitles",
            "train",
        ),
        (
            "A program that plots data from CSV files.",
            "Plot CSV data",
            "train",
        ),
        (
            "A font of rounded sans-serif letters.",
            "Rounded sans font",
            "train",
        ),
        (
            "A calculator for network subnets.",
            "Subnet calculator",
            "train",
        ),
        ("A viewer for comic book archives.", "View comics", "dev"),
        (
            "A client for reading RSS feeds in a terminal.",
            "Read RSS feeds",
            "test",
        ),
    ];
    let text: String = rows
        .iter()
        .map(|(p, r, s)| {
            serde_json::json!({"description": p, "summary": r, "split": s}).to_string() + "\n"
        })
        .collect();
    std::fs::write(path, text).unwrap();
}

fn score(args: &[&str], out: &Path) -> Vec<f64> {
    let mut a = vec!["lm", "score"];
    a.extend_from_slice(args);
    a.extend(["--out", out.to_str().unwrap(), "--device", "cpu"]);
    ok(&reuse(&a));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap();
    v["per_text"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["nll"].as_f64().unwrap())
        .collect()
}

fn close_all(a: &[f64], b: &[f64], tol: f64, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (x, y) in a.iter().zip(b) {
        assert!(((x - y) / y).abs() <= tol, "{what}: {x} vs {y}");
    }
}

fn completions(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn sft_generate_score_merge_on_the_real_gguf() {
    let Some(gguf) = smollm2_gguf_or_skip("sft_generate_score_merge_on_the_real_gguf") else {
        return;
    };
    let g = gguf.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let p = |n: &str| tmp.path().join(n);
    let ps = |n: &str| p(n).to_str().unwrap().to_string();
    pairs(&p("pairs.jsonl"));
    let train_on = |data: &str, out: &str, extra: &[&str]| {
        let mut a = vec![
            "lora",
            "train",
            "--task",
            "causal-lm",
            "--model",
            g,
            "--data",
        ];
        let data = ps(data);
        let out = ps(out);
        a.push(&data);
        a.extend([
            "--prompt-column",
            "description",
            "--response-column",
            "summary",
            "--chat",
            "--r",
            "4",
            "--max-steps",
            "3",
            "--batch-size",
            "4",
            "--lr",
            "5e-3",
            "--device",
            "cpu",
            "--out",
        ]);
        a.push(&out);
        a.extend_from_slice(extra);
        reuse(&a)
    };
    let train = |out: &str, extra: &[&str]| train_on("pairs.jsonl", out, extra);
    // SFT: 3 steps of LoRA on every linear, dev NLL measured before and after.
    ok(&train("a", &[]));
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p("a/train_metrics.json")).unwrap()).unwrap();
    assert_eq!(m["steps"], 3);
    assert_eq!(m["lora_modules"], 210, "all-linear: 7 linears x 30 blocks");
    assert_eq!(m["train_examples"], 8);
    let share = m["trainable_share"].as_f64().unwrap();
    assert!(share > 0.0 && share < 0.01, "{share}");
    assert!(
        m["dev_nll"].as_f64().unwrap() < m["dev_nll_before"].as_f64().unwrap(),
        "training on the pairs lowers the dev response NLL: {m}"
    );
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p("a/adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    // A second adapter, another seed and only q/v.
    ok(&train("b", &["--seed", "1", "--target", "q_proj,v_proj"]));

    // lm score with the adapter, and the same adapter in PEFT (through .venv).
    std::fs::write(
        p("texts.txt"),
        "A tool that converts audio files between formats.\nThe river froze early that winter.\n",
    )
    .unwrap();
    let base = score(&["--model", g, "--texts", &ps("texts.txt")], &p("s0.json"));
    let with_a = score(
        &[
            "--model",
            g,
            "--texts",
            &ps("texts.txt"),
            "--adapter",
            &ps("a"),
        ],
        &p("s1.json"),
    );
    assert!(
        base.iter().zip(&with_a).any(|(x, y)| (x - y).abs() > 1e-3),
        "the adapter changes the scores"
    );
    let peft_out = p("peft.safetensors");
    let o = Command::new(root().join(".venv/bin/python"))
        .arg(root().join("fixtures/peft_llm/peft_logits.py"))
        .arg(g)
        .arg(p("a"))
        .arg(p("texts.txt"))
        .arg(&peft_out)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    ok(&o);
    let ck = reuse_core::Checkpoint::load(&peft_out, tch::Device::Cpu).unwrap();
    let peft_nll: Vec<f64> = (0..2)
        .map(|i| {
            ck.tensor(&format!("text{i}.nll"))
                .unwrap()
                .mean(tch::Kind::Double)
                .double_value(&[])
        })
        .collect();
    close_all(&with_a, &peft_nll, 1e-4, "our trained adapter in PEFT");

    // Mixed batch: rows of adapter a, adapter b and the base in one batch, each equal
    // to that row generated alone with its adapter.
    let prompts = [
        ("A program that tracks time spent on tasks.", Some("a")),
        ("A library that reads EXIF data from photos.", Some("b")),
        ("A tool that checks links in web pages.", None),
        ("A game of chess against the computer.", Some("a")),
    ];
    let jsonl: String = prompts
        .iter()
        .map(|(t, ad)| serde_json::json!({"prompt": t, "adapter": ad}).to_string() + "\n")
        .collect();
    std::fs::write(p("mixed.jsonl"), jsonl).unwrap();
    let gen = |extra: &[&str], out: &str| {
        let mut a = vec![
            "generate",
            "--model",
            g,
            "--chat",
            "--max-new-tokens",
            "12",
            "--device",
            "cpu",
            "--out",
        ];
        let out = ps(out);
        a.push(&out);
        a.extend_from_slice(extra);
        ok(&reuse(&a));
        completions(Path::new(&out))
    };
    let aa = format!("a={}", ps("a"));
    let bb = format!("b={}", ps("b"));
    let mixed = gen(
        &[
            "--adapter",
            &aa,
            "--adapter",
            &bb,
            "--prompts",
            &ps("mixed.jsonl"),
        ],
        "mixed.jsonl.out",
    );
    assert_eq!(mixed.len(), 4);
    let mut differ = 0;
    for (i, (prompt, ad)) in prompts.iter().enumerate() {
        let mut extra = vec!["--prompt", prompt];
        let dir = ad.map(ps);
        if let Some(d) = &dir {
            extra.extend(["--adapter", d]);
        }
        let alone = gen(&extra, &format!("alone{i}.jsonl"));
        assert_eq!(
            mixed[i]["tokens"], alone[0]["tokens"],
            "row {i} ({ad:?}) in the mixed batch vs alone"
        );
        assert_eq!(mixed[i]["adapter"], serde_json::json!(ad));
        if ad.is_some() {
            let base_alone = gen(&["--prompt", prompt], &format!("base{i}.jsonl"));
            differ += usize::from(base_alone[0]["tokens"] != alone[0]["tokens"]);
        }
    }
    assert!(
        differ > 0,
        "at least one adapter changes its greedy continuation"
    );

    // Merge: a Hugging Face folder whose scores are the adapter's, in reuse and in
    // transformers.
    ok(&reuse(&[
        "lora",
        "merge",
        "--model",
        g,
        "--adapter",
        &ps("a"),
        "--out",
        &ps("merged"),
    ]));
    let merged = score(
        &["--model", &ps("merged"), "--texts", &ps("texts.txt")],
        &p("s2.json"),
    );
    close_all(&merged, &with_a, 1e-4, "merged folder vs base + adapter");
    let o = Command::new(root().join(".venv/bin/python"))
        .arg(root().join("fixtures/smollm2_lm/hf_folder_nll.py"))
        .arg(p("merged"))
        .arg(p("texts.txt"))
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(ok(&o).trim()).unwrap();
    let hf: Vec<f64> = v["nll"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    close_all(&hf, &with_a, 1e-4, "merged folder in transformers");

    // QLoRA on the GGUF's codes: trains, and its adapter loads like any other.
    ok(&train("q", &["--keep-codes"]));
    let mq: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p("q/train_metrics.json")).unwrap()).unwrap();
    assert_eq!(mq["keep_codes"], true);
    assert!(mq["dev_nll"].as_f64().unwrap() < mq["dev_nll_before"].as_f64().unwrap());

    // Bad input: clear errors, nothing written.
    std::fs::write(
        p("no_summary.jsonl"),
        "{\"description\": \"A tool.\", \"answer\": \"Tool\"}\n",
    )
    .unwrap();
    let e = err_text(&train_on("no_summary.jsonl", "x1", &[]));
    assert!(
        e.contains("`summary`") && e.contains("no_summary.jsonl"),
        "{e}"
    );
    assert!(!p("x1").exists());
    let e = err_text(&train("x2", &["--max-len", "20"]));
    assert!(e.contains("no response token is left"), "{e}");
    assert!(!p("x2").exists());
    let e = err_text(&reuse(&[
        "generate",
        "--model",
        g,
        "--prompts",
        &ps("mixed.jsonl"),
        "--adapter",
        &aa,
        "--adapter",
        &format!("a={}", ps("b")),
        "--out",
        &ps("x3.jsonl"),
    ]));
    assert!(e.contains("`a` is given twice"), "{e}");
    assert!(!p("x3.jsonl").exists());
    // An adapter for another base: MiniLM's PEFT fixture on the LLM.
    let e = err_text(&reuse(&[
        "lm",
        "score",
        "--model",
        g,
        "--texts",
        &ps("texts.txt"),
        "--adapter",
        root().join("fixtures/peft/lora_qv").to_str().unwrap(),
        "--out",
        &ps("x4.json"),
    ]));
    assert!(e.contains("lora_qv"), "{e}");
    assert!(!p("x4.json").exists());
}
