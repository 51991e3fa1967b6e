//! `reuse lora train` on two processes — under `reuse launch` and under torchrun — trains
//! the adapter one process trains on the combined batch, writes it once (rank 0), and
//! PEFT loads it.

use std::path::{Path, PathBuf};
use std::process::Command;

use reuse_core::Checkpoint;
use reuse_testkit::minilm_dir;
use tch::{Device, Tensor};

mod common;
use common::{ok, reuse, reuse_bin, root};

/// MiniLM with dropout off (so one process and two compute the same thing; with dropout
/// each rank draws its own masks, as in PyTorch DDP): its config.json edited, the other
/// files linked.
fn minilm_without_dropout(dir: &Path) -> PathBuf {
    let src = minilm_dir().unwrap();
    let dst = dir.join("minilm-nodrop");
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        if e.file_name() == "config.json" {
            let mut c: serde_json::Value =
                serde_json::from_slice(&std::fs::read(e.path()).unwrap()).unwrap();
            c["hidden_dropout_prob"] = 0.0.into();
            c["attention_probs_dropout_prob"] = 0.0.into();
            std::fs::write(dst.join("config.json"), c.to_string()).unwrap();
        } else {
            std::os::unix::fs::symlink(e.path(), dst.join(e.file_name())).unwrap();
        }
    }
    dst
}

/// 40 labelled rows of two easy classes.
fn csv(dir: &Path) -> PathBuf {
    let words = [
        "apple", "hammer", "pear", "wrench", "plum", "saw", "grape", "drill",
    ];
    let mut s = String::from("sentence,category\n");
    for i in 0..40 {
        let c = if i % 2 == 0 { "fruit" } else { "tool" };
        s.push_str(&format!("\"a {}, number {i}\",{c}\n", words[i % 8]));
    }
    let p = dir.join("items.csv");
    std::fs::write(&p, s).unwrap();
    p
}

fn train_args(model: &Path, data: &Path, out: &Path) -> Vec<String> {
    [
        "lora",
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--text-column",
        "sentence",
        "--label-column",
        "category",
        "--max-steps",
        "8",
        "--batch-size",
        "8",
        "--max-len",
        "12",
        "--lr",
        "3e-3",
        "--device",
        "cpu",
        "--stratify",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn adapter(dir: &Path) -> Checkpoint {
    Checkpoint::load(dir.join("adapter_model.safetensors"), Device::Cpu).unwrap()
}

fn max_diff(a: &Checkpoint, b: &Checkpoint) -> f64 {
    let mut na: Vec<&str> = a.names().collect();
    let mut nb: Vec<&str> = b.names().collect();
    na.sort_unstable();
    nb.sort_unstable();
    assert_eq!(na, nb);
    na.iter()
        .map(|n| {
            (a.get(n).unwrap() - b.get(n).unwrap())
                .abs()
                .max()
                .double_value(&[])
        })
        .fold(0.0, f64::max)
}

fn processes(out: &Path) -> i64 {
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("train_metrics.json")).unwrap()).unwrap();
    m["processes"].as_i64().unwrap()
}

#[test]
fn lora_train_on_two_processes_equals_one_and_peft_loads_the_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let model = minilm_without_dropout(dir.path());
    let data = csv(dir.path());

    // One process, with one thread and with two: how far float rounding alone moves
    // the adapter (kernels split sums differently), the tolerance below.
    let one = dir.path().join("one");
    let one_2t = dir.path().join("one-2t");
    for (out, threads) in [(&one, "1"), (&one_2t, "2")] {
        let o = Command::new(reuse_bin())
            .args(train_args(&model, &data, out))
            .env("OMP_NUM_THREADS", threads)
            .output()
            .unwrap();
        ok(&o);
    }
    assert_eq!(processes(&one), 1);
    let floor = max_diff(&adapter(&one), &adapter(&one_2t));
    // Two ranks sum two half-batch gradients where one process sums one batch: a
    // different rounding from the thread split above, which can be none at all (MKL
    // gives bit-identical results on 1 and 2 threads on some machines). AdamW divides
    // each update by the gradient's running size, so a weight whose gradient nearly
    // cancels can move by up to 2 lr on a rounding flip; 1e-4 (lr / 30) keeps that
    // noise in and any real divergence (a dropped or mis-weighted rank moves weights by
    // about lr per step) out.
    let tol = 2.0 * floor + 1e-4;
    eprintln!("one process, 1 vs 2 threads: adapter max |diff| {floor:.2e}");
    assert!(floor < 2e-4, "{floor}");

    // `reuse launch`: two ranks of this binary, one thread each.
    let launched = dir.path().join("launched");
    let o = Command::new(reuse_bin())
        .args(["launch", "-n", "2", "--threads", "1", "--", "reuse"])
        .args(train_args(&model, &data, &launched))
        .output()
        .unwrap();
    ok(&o);
    assert_eq!(processes(&launched), 2);
    // Rank 0 alone reports.
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(stdout.matches("test accuracy").count(), 1, "{stdout}");
    let d = max_diff(&adapter(&one), &adapter(&launched));
    eprintln!("reuse launch -n 2 vs one process: adapter max |diff| {d:.2e}");
    assert!(d <= tol, "{d} > {tol}");
    // The adapter trained (B starts at zero).
    let b = adapter(&one);
    let moved = b
        .iter()
        .filter(|(n, _)| n.ends_with("lora_B.weight"))
        .map(|(_, t)| t.abs().max().double_value(&[]))
        .fold(0.0, f64::max);
    assert!(moved > 1e-4, "lora_B moved by only {moved}");

    // torchrun, as a PyTorch user launches: `--no-python` runs our binary directly.
    let torchrun = root().join(".venv/bin/torchrun");
    let tr = dir.path().join("torchrun");
    let o = Command::new(&torchrun)
        .args([
            "--standalone",
            "--nproc_per_node",
            "2",
            "--no-python",
            reuse_bin(),
        ])
        .args(train_args(&model, &data, &tr))
        .env("OMP_NUM_THREADS", "1")
        .output()
        .unwrap();
    ok(&o);
    assert_eq!(processes(&tr), 2);
    let d = max_diff(&adapter(&one), &adapter(&tr));
    eprintln!("torchrun --nproc_per_node 2 vs one process: adapter max |diff| {d:.2e}");
    assert!(d <= tol, "{d} > {tol}");

    // PEFT loads the torchrun adapter and embeds as `reuse embed --adapter` does.
    let texts = dir.path().join("texts.txt");
    std::fs::write(
        &texts,
        "a pear, number 3\na drill, number 8\nsomething else\n",
    )
    .unwrap();
    let ours_path = dir.path().join("ours.safetensors");
    ok(&reuse(&[
        "embed",
        "--model",
        model.to_str().unwrap(),
        "--texts",
        texts.to_str().unwrap(),
        "--adapter",
        tr.to_str().unwrap(),
        "--out",
        ours_path.to_str().unwrap(),
        "--device",
        "cpu",
    ]));
    let peft_path = dir.path().join("peft.safetensors");
    let o = Command::new(root().join(".venv/bin/python"))
        .arg(root().join("fixtures/quant/peft_embed.py"))
        .args([&model, &tr, &texts, &peft_path])
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    ok(&o);
    let emb = |p: &Path| -> Tensor {
        Checkpoint::load(p, Device::Cpu)
            .unwrap()
            .tensor("embeddings")
            .unwrap()
            .shallow_clone()
    };
    let d = (emb(&ours_path) - emb(&peft_path))
        .abs()
        .max()
        .double_value(&[]);
    assert!(
        d < 1e-4,
        "reuse embed vs PEFT on the 2-process adapter: {d}"
    );
}

#[test]
fn a_failing_rank_fails_the_launch_with_its_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-model");
    let data = csv(dir.path());
    let out = dir.path().join("out");
    let o = Command::new(reuse_bin())
        .args(["launch", "-n", "2", "--", "reuse"])
        .args(train_args(&missing, &data, &out))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("no-such-model") && err.contains("rank"),
        "{err}"
    );
    assert!(!out.exists(), "nothing is written");
    let o = reuse(&["launch", "-n", "0", "--", "true"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("at least 1 process"));
}
