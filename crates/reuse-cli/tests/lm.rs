//! The causal-LM commands on SmolLM2-135M-Instruct's GGUF, against transformers on the
//! same file (`fixtures/smollm2_lm`): `reuse inspect`, `reuse lm score` (NLL to 1e-4
//! relative), `reuse generate` (greedy tokens equal, through the chat template),
//! `reuse convert` (a folder transformers loads with the same NLL), and bad input as
//! one-line errors that write nothing. Skips when the GGUF is absent.

use std::path::Path;
use std::process::Command;

use reuse_testkit::{minilm_dir, smollm2_gguf_or_skip};

mod common;
use common::{ok, reuse, root};

fn reference() -> serde_json::Value {
    let t = std::fs::read_to_string(root().join("fixtures/smollm2_lm/reference.json")).unwrap();
    serde_json::from_str(&t).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

fn close(got: f64, want: f64, what: &str) {
    assert!(
        ((got - want) / want).abs() < 1e-4,
        "{what}: {got} vs {want}"
    );
}

fn err_line(o: &std::process::Output) -> String {
    assert!(!o.status.success(), "expected a failure");
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!e.contains("panicked"), "{e}");
    e
}

#[test]
fn gguf_commands_agree_with_transformers() {
    let Some(gguf) = smollm2_gguf_or_skip("gguf_commands_agree_with_transformers") else {
        return;
    };
    let g = gguf.to_str().unwrap();
    let r = reference();
    let tmp = tempfile::tempdir().unwrap();
    let p = |n: &str| tmp.path().join(n);

    // inspect: the file's tensors and the parameter count transformers reports.
    let v: serde_json::Value =
        serde_json::from_str(&ok(&reuse(&["inspect", g, "--json"]))).unwrap();
    assert_eq!(v["format"], "gguf");
    assert_eq!(v["parameters"], 134_515_008);
    assert_eq!(v["tensors"].as_array().unwrap().len(), 272);

    // lm score.
    let texts: Vec<&str> = r["score"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["text"].as_str().unwrap())
        .collect();
    // One text per line: the code snippet's newline would split it, so score the
    // single-line texts only.
    let lines: Vec<&str> = texts
        .iter()
        .copied()
        .filter(|t| !t.contains('\n'))
        .collect();
    std::fs::write(p("texts.txt"), lines.join("\n") + "\n").unwrap();
    ok(&reuse(&[
        "lm",
        "score",
        "--model",
        g,
        "--texts",
        p("texts.txt").to_str().unwrap(),
        "--out",
        p("score.json").to_str().unwrap(),
        "--device",
        "cpu",
    ]));
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p("score.json")).unwrap()).unwrap();
    let per = s["per_text"].as_array().unwrap();
    assert_eq!(per.len(), lines.len());
    for (got, want) in per.iter().zip(r["score"].as_array().unwrap()) {
        assert_eq!(got["tokens"], want["tokens"]);
        close(
            got["nll"].as_f64().unwrap(),
            want["nll"].as_f64().unwrap(),
            "lm score NLL",
        );
    }

    // generate: the chat prompts, greedy, in one batch of two (left-padded).
    let chats: Vec<&serde_json::Value> = r["generate"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["chat"].as_bool().unwrap())
        .collect();
    let prompts: Vec<&str> = chats
        .iter()
        .map(|g| g["prompt"].as_str().unwrap())
        .collect();
    std::fs::write(p("prompts.txt"), prompts.join("\n") + "\n").unwrap();
    ok(&reuse(&[
        "generate",
        "--model",
        g,
        "--prompts",
        p("prompts.txt").to_str().unwrap(),
        "--chat",
        "--max-new-tokens",
        "24",
        "--out",
        p("gen.jsonl").to_str().unwrap(),
        "--device",
        "cpu",
    ]));
    let lines_out = std::fs::read_to_string(p("gen.jsonl")).unwrap();
    let got: Vec<serde_json::Value> = lines_out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(got.len(), chats.len());
    for (o, want) in got.iter().zip(&chats) {
        assert_eq!(
            ids(&o["tokens"]),
            ids(&want["greedy"]),
            "{}",
            want["prompt"]
        );
        assert_eq!(o["completion"], want["completion"]);
    }

    // --keep-codes: the Q4_1 linears stay in their codes; in f32 each matmul dequantizes
    // exactly, so scores and greedy tokens are those above.
    ok(&reuse(&[
        "lm",
        "score",
        "--model",
        g,
        "--texts",
        p("texts.txt").to_str().unwrap(),
        "--out",
        p("score_codes.json").to_str().unwrap(),
        "--device",
        "cpu",
        "--keep-codes",
    ]));
    let sc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p("score_codes.json")).unwrap()).unwrap();
    close(
        sc["nll"].as_f64().unwrap(),
        s["nll"].as_f64().unwrap(),
        "lm score --keep-codes",
    );
    ok(&reuse(&[
        "generate",
        "--model",
        g,
        "--prompts",
        p("prompts.txt").to_str().unwrap(),
        "--chat",
        "--max-new-tokens",
        "24",
        "--out",
        p("gen_codes.jsonl").to_str().unwrap(),
        "--device",
        "cpu",
        "--keep-codes",
    ]));
    assert_eq!(
        std::fs::read_to_string(p("gen_codes.jsonl")).unwrap(),
        lines_out,
        "generate --keep-codes"
    );

    // convert: a Hugging Face folder transformers loads with the same NLL.
    let hf = p("hf");
    ok(&reuse(&[
        "convert",
        "--model",
        g,
        "--out",
        hf.to_str().unwrap(),
    ]));
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(hf.join(f).is_file(), "{f} missing");
    }
    let py = Command::new(root().join(".venv/bin/python"))
        .arg(root().join("fixtures/smollm2_lm/hf_folder_nll.py"))
        .arg(&hf)
        .arg(p("texts.txt"))
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let out: serde_json::Value = serde_json::from_str(ok(&py).trim()).unwrap();
    for ((nll, got_ids), want) in out["nll"]
        .as_array()
        .unwrap()
        .iter()
        .zip(out["ids"].as_array().unwrap())
        .zip(r["score"].as_array().unwrap())
    {
        assert_eq!(ids(got_ids), ids(&want["ids"]), "the folder's tokenizer");
        close(
            nll.as_f64().unwrap(),
            want["nll"].as_f64().unwrap(),
            "converted folder NLL",
        );
    }
    assert!(out["chat"]
        .as_str()
        .unwrap()
        .ends_with("<|im_start|>assistant\n"));
    // The folder loads in reuse too, with the same scores.
    ok(&reuse(&[
        "lm",
        "score",
        "--model",
        hf.to_str().unwrap(),
        "--texts",
        p("texts.txt").to_str().unwrap(),
        "--out",
        p("score_hf.json").to_str().unwrap(),
        "--device",
        "cpu",
    ]));
    let s2: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p("score_hf.json")).unwrap()).unwrap();
    close(
        s2["nll"].as_f64().unwrap(),
        s["nll"].as_f64().unwrap(),
        "folder vs GGUF",
    );
    // A second convert into the full folder is refused, the folder intact.
    let e = err_line(&reuse(&[
        "convert",
        "--model",
        g,
        "--out",
        hf.to_str().unwrap(),
    ]));
    assert!(e.contains("not empty"), "{e}");
    assert!(hf.join("model.safetensors").is_file());
}

#[test]
fn bad_models_are_one_line_errors_that_write_nothing() {
    let Some(gguf) = smollm2_gguf_or_skip("bad_models_are_one_line_errors_that_write_nothing")
    else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    // A GGUF cut short: the error names the file, nothing is written.
    let cut = tmp.path().join("cut.gguf");
    let bytes = std::fs::read(&gguf).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
    let out = tmp.path().join("gen.jsonl");
    let e = err_line(&reuse(&[
        "generate",
        "--model",
        cut.to_str().unwrap(),
        "--prompt",
        "hi",
        "--out",
        out.to_str().unwrap(),
        "--device",
        "cpu",
    ]));
    assert!(e.contains("cut.gguf"), "{e}");
    assert!(!out.exists());
    let conv = tmp.path().join("conv");
    let e = err_line(&reuse(&[
        "convert",
        "--model",
        cut.to_str().unwrap(),
        "--out",
        conv.to_str().unwrap(),
    ]));
    assert!(e.contains("cut.gguf"), "{e}");
    assert!(!conv.exists());
    // An encoder folder is not a causal LM.
    if let Ok(minilm) = minilm_dir() {
        let e = err_line(&reuse(&[
            "lm",
            "score",
            "--model",
            minilm.to_str().unwrap(),
            "--texts",
            root().join("fixtures/minilm/texts.txt").to_str().unwrap(),
            "--device",
            "cpu",
        ]));
        assert!(e.contains("not a causal language model"), "{e}");
        // --keep-codes is for GGUF files.
        let e = err_line(&reuse(&[
            "generate",
            "--model",
            minilm.to_str().unwrap(),
            "--prompt",
            "hi",
            "--keep-codes",
            "--device",
            "cpu",
        ]));
        assert!(
            e.contains("--keep-codes") && e.contains("not a .gguf"),
            "{e}"
        );
    }
    // Encoder-only commands name the causal LM and what to use instead.
    for args in [
        vec![
            "embed",
            "--model",
            gguf.to_str().unwrap(),
            "--texts",
            "x.txt",
        ],
        vec![
            "quantize",
            "--model",
            gguf.to_str().unwrap(),
            "--bits",
            "8",
            "--out",
            "q",
        ],
        vec![
            "grow",
            "depth",
            "--model",
            gguf.to_str().unwrap(),
            "--out",
            "g",
            "--layers",
            "8",
        ],
    ] {
        let e = err_line(&reuse(&args));
        assert!(
            e.contains("GGUF causal LM") && e.contains("reuse generate"),
            "{args:?}: {e}"
        );
    }
    // --chat on a model without a template: the GGUF has one, so use --system without
    // --chat, which clap refuses.
    let e = err_line(&reuse(&[
        "generate",
        "--model",
        gguf.to_str().unwrap(),
        "--prompt",
        "x",
        "--system",
        "s",
    ]));
    assert!(e.contains("--chat"), "{e}");
    let _ = Path::new("");
}
