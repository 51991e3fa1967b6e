//! `reuse embed --adapter`, `reuse lora merge` (checked by loading the result in
//! transformers and sentence-transformers) and `reuse lora train`.

use std::path::PathBuf;
use std::process::{Command, Output};

use reuse_core::models::bert::{l2_normalize, mean_pool};
use reuse_core::Checkpoint;
use reuse_testkit::minilm_dir;
use tch::{Device, Tensor};

mod common;
use common::{max_diff, ok, reuse, root};

fn peft_ref() -> Checkpoint {
    Checkpoint::load(
        root().join("fixtures/peft/reference_outputs.safetensors"),
        Device::Cpu,
    )
    .unwrap()
}

fn texts(r: &Checkpoint) -> Vec<String> {
    r.metadata()["texts"]
        .split('\n')
        .map(String::from)
        .collect()
}

#[test]
fn embed_with_a_peft_adapter_matches_peft() {
    let r = peft_ref();
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("t.txt");
    std::fs::write(&t, texts(&r).join("\n") + "\n").unwrap();
    let out = dir.path().join("e.safetensors");
    let model = minilm_dir().unwrap();
    let adapter = root().join("fixtures/peft/lora_qv");
    ok(&reuse(&[
        "embed",
        "--model",
        model.to_str().unwrap(),
        "--texts",
        t.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--device",
        "cpu",
        "--adapter",
        adapter.to_str().unwrap(),
    ]));
    let ours = Checkpoint::load(&out, Device::Cpu).unwrap();
    let expect = l2_normalize(&mean_pool(
        r.tensor("lora_qv.last_hidden_state").unwrap(),
        Some(r.tensor("attention_mask").unwrap()),
    ));
    let d = max_diff(ours.tensor("embeddings").unwrap(), &expect);
    assert!(d <= 1e-4, "{d}");
    // Two adapters: different from either alone.
    let out2 = dir.path().join("e2.safetensors");
    let dora = root().join("fixtures/peft/dora_qv");
    ok(&reuse(&[
        "embed",
        "--model",
        model.to_str().unwrap(),
        "--texts",
        t.to_str().unwrap(),
        "--out",
        out2.to_str().unwrap(),
        "--device",
        "cpu",
        "--adapter",
        adapter.to_str().unwrap(),
        "--adapter",
        dora.to_str().unwrap(),
    ]));
    let two = Checkpoint::load(&out2, Device::Cpu).unwrap();
    assert!(max_diff(two.tensor("embeddings").unwrap(), &expect) > 1e-3);
    // A missing adapter folder is one clear line.
    let o = reuse(&[
        "embed",
        "--model",
        model.to_str().unwrap(),
        "--texts",
        t.to_str().unwrap(),
        "--adapter",
        "/no/adapter",
        "--device",
        "cpu",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("/no/adapter") && err.trim_end().lines().count() == 1,
        "{err}"
    );
}

#[test]
fn merged_model_loads_in_transformers_and_sentence_transformers() {
    let r = peft_ref();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merged");
    let model = minilm_dir().unwrap();
    for name in ["lora_qv", "dora_qv"] {
        let out = out.with_file_name(format!("merged_{name}"));
        let adapter = root().join("fixtures/peft").join(name);
        ok(&reuse(&[
            "lora",
            "merge",
            "--model",
            model.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]));
        for f in [
            "config.json",
            "tokenizer.json",
            "modules.json",
            "sentence_bert_config.json",
            "1_Pooling/config.json",
            "model.safetensors",
        ] {
            assert!(out.join(f).exists(), "{f} missing");
        }
        let merged = Checkpoint::load(out.join("model.safetensors"), Device::Cpu).unwrap();
        let base = Checkpoint::load(model.join("model.safetensors"), Device::Cpu).unwrap();
        let mut names: Vec<&str> = base
            .names()
            .filter(|n| *n != "embeddings.position_ids")
            .collect();
        names.sort();
        assert_eq!(
            merged.names().collect::<Vec<_>>(),
            names,
            "key names differ from the base's"
        );
        // Python loads it: transformers gives PEFT's adapted output; sentence-transformers
        // gives its pooled, normalised form.
        let inputs = dir.path().join("in.safetensors");
        let mut ck = Checkpoint::new();
        ck.insert("input_ids", r.tensor("input_ids").unwrap().copy());
        ck.insert("attention_mask", r.tensor("attention_mask").unwrap().copy());
        ck.set_metadata("texts", texts(&r).join("\n"));
        ck.save(&inputs).unwrap();
        let res = dir.path().join(format!("{name}.out.safetensors"));
        let o = Command::new(root().join(".venv/bin/python"))
            .arg(root().join("fixtures/peft/hf_forward.py"))
            .args([out.as_os_str(), inputs.as_os_str(), res.as_os_str()])
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap();
        ok(&o);
        let py = Checkpoint::load(&res, Device::Cpu).unwrap();
        let expect = r.tensor(&format!("{name}.last_hidden_state")).unwrap();
        let d = max_diff(py.tensor("last_hidden_state").unwrap(), expect);
        assert!(
            d <= 1e-4,
            "{name}: transformers on the merged model vs PEFT: {d}"
        );
        let emb = l2_normalize(&mean_pool(
            expect,
            Some(r.tensor("attention_mask").unwrap()),
        ));
        let d = max_diff(py.tensor("st_embeddings").unwrap(), &emb);
        assert!(
            d <= 1e-4,
            "{name}: sentence-transformers on the merged model: {d}"
        );
    }
    // The output folder is never overwritten.
    let again = dir.path().join("merged_lora_qv");
    let o = reuse(&[
        "lora",
        "merge",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        root().join("fixtures/peft/lora_qv").to_str().unwrap(),
        "--out",
        again.to_str().unwrap(),
    ]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("already exists"));
}

#[test]
fn lora_train_writes_a_peft_adapter_that_beats_majority() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("adapter");
    let model = minilm_dir().unwrap();
    let data = root().join("fixtures/debian_sections");
    let o = reuse(&[
        "lora",
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--max-steps",
        "60",
        "--batch-size",
        "16",
        "--max-len",
        "32",
        "--lr",
        "2e-3",
        "--device",
        "cpu",
    ]);
    ok(&o);
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("train_metrics.json")).unwrap()).unwrap();
    let acc = m["test_accuracy"].as_f64().unwrap();
    let base = m["majority_baseline"].as_f64().unwrap();
    eprintln!("reuse lora train, 60 steps: test accuracy {acc:.4} (majority {base:.4})");
    assert!(acc > base + 0.3, "{acc} vs {base}");
    assert_eq!(m["trainable_params"], 73_728 + 384 * 8 + 8);
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["modules_to_save"], serde_json::json!(["classifier"]));
    let ck = Checkpoint::load(out.join("adapter_model.safetensors"), Device::Cpu).unwrap();
    assert!(ck.get("base_model.model.classifier.weight").is_some());
    assert!(ck
        .get("base_model.model.encoder.layer.5.attention.self.value.lora_B.weight")
        .is_some());
}

/// Parses `reuse embed`'s JSON lines (stdout) into a `[n, hidden]` tensor.
fn embeddings_from_stdout(o: &Output) -> Tensor {
    let rows: Vec<Tensor> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .enumerate()
        .map(|(i, l)| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["index"], i);
            let e: Vec<f32> = v["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect();
            Tensor::from_slice(&e)
        })
        .collect();
    Tensor::stack(&rows, 0)
}

#[test]
fn readme_chain_train_embed_merge() {
    // The README's three commands, run as written (plus a tiny --max-steps/--max-len),
    // from the repository root so that `fixtures/debian_sections` resolves.
    let dir = tempfile::tempdir().unwrap();
    let model = minilm_dir().unwrap();
    let m = model.to_str().unwrap();
    let adapter = dir.path().join("my-adapter");
    let merged = dir.path().join("merged-model");
    let t = dir.path().join("t.txt");
    std::fs::write(
        &t,
        "a free first-person shooter\nlibrary for numerical linear algebra\nIMAP mail server\n",
    )
    .unwrap();
    let at_root = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_reuse"))
            .current_dir(root())
            .args(args)
            .output()
            .unwrap()
    };
    let a = adapter.to_str().unwrap();
    ok(&at_root(&[
        "lora",
        "train",
        "--model",
        m,
        "--data",
        "fixtures/debian_sections",
        "--out",
        a,
        "--max-steps",
        "2",
        "--max-len",
        "16",
    ]));
    let with_adapter = at_root(&[
        "embed",
        "--model",
        m,
        "--texts",
        t.to_str().unwrap(),
        "--adapter",
        a,
    ]);
    ok(&with_adapter);
    let note = String::from_utf8_lossy(&with_adapter.stderr);
    assert!(
        note.contains("note: the adapter's classifier (modules_to_save)")
            && note.contains("set aside")
            && note.trim_end().lines().count() == 1,
        "{note}"
    );
    let o = at_root(&[
        "lora",
        "merge",
        "--model",
        m,
        "--adapter",
        a,
        "--out",
        merged.to_str().unwrap(),
    ]);
    ok(&o);
    assert!(String::from_utf8_lossy(&o.stderr).contains("set aside"));
    let plain = at_root(&[
        "embed",
        "--model",
        merged.to_str().unwrap(),
        "--texts",
        t.to_str().unwrap(),
    ]);
    ok(&plain);
    let base = at_root(&["embed", "--model", m, "--texts", t.to_str().unwrap()]);
    ok(&base);
    let (e_adapter, e_merged, e_base) = (
        embeddings_from_stdout(&with_adapter),
        embeddings_from_stdout(&plain),
        embeddings_from_stdout(&base),
    );
    assert_eq!(e_adapter.size(), [3, 384]);
    let d = max_diff(&e_adapter, &e_merged);
    assert!(d <= 1e-4, "merged vs adapter: {d}");
    // The adapter did change the model (B is no longer zero after training).
    assert!(max_diff(&e_adapter, &e_base) > 1e-6);
}

/// A small labelled CSV of two easy classes, with its own column names and no split.
fn small_csv(dir: &std::path::Path) -> PathBuf {
    let fruit = [
        "apple", "pear", "banana", "cherry", "plum", "mango", "grape", "peach",
    ];
    let tools = [
        "hammer",
        "wrench",
        "saw",
        "drill",
        "chisel",
        "pliers",
        "screwdriver",
        "file",
    ];
    let mut s = String::from("id,sentence,category\n");
    for i in 0..40 {
        let (w, c) = if i % 2 == 0 {
            (fruit[i / 2 % 8], "fruit")
        } else {
            (tools[i / 2 % 8], "tool")
        };
        s.push_str(&format!("{i},\"a {w}, number {i}\",{c}\n"));
    }
    let p = dir.join("items.csv");
    std::fs::write(&p, s).unwrap();
    p
}

fn train_args<'a>(model: &'a str, data: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "lora",
        "train",
        "--model",
        model,
        "--data",
        data,
        "--out",
        out,
        "--text-column",
        "sentence",
        "--label-column",
        "category",
        "--max-steps",
        "10",
        "--batch-size",
        "4",
        "--max-len",
        "12",
        "--device",
        "cpu",
        "--save-every",
        "2",
        "--stratify",
    ]
}

#[test]
fn lora_train_reads_users_data_and_names_bad_rows() {
    let dir = tempfile::tempdir().unwrap();
    let model = minilm_dir().unwrap();
    let m = model.to_str().unwrap();
    let csv = small_csv(dir.path());
    // JSON Lines with a split column, gzip-free, format from --format.
    let jl = dir.path().join("items.data");
    let mut body = String::new();
    for (i, l) in std::fs::read_to_string(&csv)
        .unwrap()
        .lines()
        .skip(1)
        .enumerate()
    {
        let f: Vec<&str> = l.splitn(2, ',').collect();
        let (text, cat) = f[1].rsplit_once(',').unwrap();
        let split = ["train", "train", "train", "dev", "test"][i % 5];
        body.push_str(&format!(
            "{}\n",
            serde_json::json!({"sentence": text.trim_matches('"'), "category": cat, "split": split})
        ));
    }
    std::fs::write(&jl, body).unwrap();
    for (data, extra) in [(&csv, vec![]), (&jl, vec!["--format", "jsonl"])] {
        let out = dir.path().join(format!(
            "out-{}",
            data.file_name().unwrap().to_str().unwrap()
        ));
        let mut args = train_args(m, data.to_str().unwrap(), out.to_str().unwrap());
        args.extend(extra);
        ok(&reuse(&args));
        let metrics: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("train_metrics.json")).unwrap())
                .unwrap();
        assert_eq!(metrics["classes"], serde_json::json!(["fruit", "tool"]));
        assert_eq!(metrics["steps"], 10);
        assert!(metrics["test_accuracy"].as_f64().is_some());
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("adapter_config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["reuse_classes"], serde_json::json!(["fruit", "tool"]));
    }
    // A malformed row: one line naming the file and the line.
    let bad = dir.path().join("bad.csv");
    std::fs::write(&bad, "sentence,category\nok,fruit\n\"a, b\",tool,extra\n").unwrap();
    let out = dir.path().join("never");
    let o = reuse(&train_args(m, bad.to_str().unwrap(), out.to_str().unwrap()));
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("bad.csv") && err.contains("line 3") && err.trim_end().lines().count() == 1,
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn lora_train_resumes_after_sigkill_to_the_same_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let model = minilm_dir().unwrap();
    let m = model.to_str().unwrap();
    let csv = small_csv(dir.path());
    let data = csv.to_str().unwrap();
    // Uninterrupted.
    let whole = dir.path().join("whole");
    ok(&reuse(&train_args(m, data, whole.to_str().unwrap())));
    // Killed as soon as its first run state exists, then resumed.
    let part = dir.path().join("part");
    let state = part.join("run_state.safetensors");
    let mut child = Command::new(env!("CARGO_BIN_EXE_reuse"))
        .args(train_args(m, data, part.to_str().unwrap()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while !state.exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before saving its state"
        );
        assert!(t0.elapsed().as_secs() < 300, "no run state after 300 s");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        !part.join("adapter_model.safetensors").exists(),
        "the run finished before it was killed"
    );
    let saved = Checkpoint::load(&state, Device::Cpu).unwrap();
    let step: usize = saved.metadata()["step"].parse().unwrap();
    assert!(step < 10, "killed after the last step ({step})");
    let mut args = train_args(m, data, part.to_str().unwrap());
    args.push("--resume");
    let o = reuse(&args);
    ok(&o);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains(&format!("resuming from step {step} of 10")),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let a = Checkpoint::load(whole.join("adapter_model.safetensors"), Device::Cpu).unwrap();
    let b = Checkpoint::load(part.join("adapter_model.safetensors"), Device::Cpu).unwrap();
    let mut names: Vec<&str> = a.names().collect();
    names.sort();
    let mut names_b: Vec<&str> = b.names().collect();
    names_b.sort();
    assert_eq!(names, names_b);
    assert!(names.iter().any(|n| n.ends_with("lora_B.weight")));
    for n in names {
        assert!(
            a.tensor(n).unwrap().equal(b.tensor(n).unwrap()),
            "{n} differs"
        );
    }
}
