//! `reuse distill trim-vocab` on MiniLM and the Debian synopses: the trimmed folder
//! embeds the corpus's text exactly as the original does, loads in sentence-transformers
//! and transformers (through the `.venv` python) with the same embeddings, embeds new
//! sentences of the corpus's words as before and text outside it differently, and bad input is a one-line error that writes nothing.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Output};

use reuse_core::Checkpoint;
use reuse_testkit::minilm_dir;
use tch::{Device, Tensor};

mod common;
use common::{max_diff, ok, reuse, root};

/// The first `n` synopses of the fixture.
fn synopses(n: usize) -> Vec<String> {
    let mut s = String::new();
    flate2::read::GzDecoder::new(
        std::fs::File::open(root().join("fixtures/debian_synopses/synopses.tsv.gz")).unwrap(),
    )
    .read_to_string(&mut s)
    .unwrap();
    s.lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(_, t)| t.to_string())
        .take(n)
        .collect()
}

fn embed(model: &Path, texts: &Path, out: &Path) -> Tensor {
    ok(&reuse(&[
        "embed",
        "--model",
        model.to_str().unwrap(),
        "--texts",
        texts.to_str().unwrap(),
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

fn vocab_size(dir: &Path) -> i64 {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    v["vocab_size"].as_i64().unwrap()
}

#[test]
fn trimmed_minilm_embeds_its_corpus_as_before_and_loads_in_sentence_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let src = minilm_dir().unwrap();
    let corpus = synopses(3000);
    let corpus_file = dir.path().join("corpus.txt");
    std::fs::write(&corpus_file, corpus.join("\n") + "\n").unwrap();
    let out = dir.path().join("trimmed");
    let o = reuse(&[
        "distill",
        "trim-vocab",
        "--model",
        src.to_str().unwrap(),
        "--texts",
        corpus_file.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    ok(&o);
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(said.contains("of 30522 tokens"), "{said}");
    let kept = vocab_size(&out);
    assert!((1000..15000).contains(&kept), "kept {kept} tokens");
    let lines = std::fs::read_to_string(out.join("vocab.txt")).unwrap();
    assert_eq!(lines.lines().count() as i64, kept);
    let before = std::fs::metadata(src.join("model.safetensors"))
        .unwrap()
        .len();
    let after = std::fs::metadata(out.join("model.safetensors"))
        .unwrap()
        .len();
    // The table shrinks by (30522 - kept) rows of 384 f32 (the JSON headers of the two
    // files differ by a few kB: the original was written by another tool).
    let rows = (30522 - kept) as i64 * 384 * 4;
    let shrunk = before as i64 - after as i64;
    assert!(
        (shrunk - rows).abs() < 16_384,
        "shrunk {shrunk}, rows {rows}"
    );

    // Texts of the corpus (every word seen): the same embeddings, bit for bit in effect.
    let seen: Vec<String> = corpus.iter().step_by(97).take(24).cloned().collect();
    let seen_file = dir.path().join("seen.txt");
    std::fs::write(&seen_file, seen.join("\n") + "\n").unwrap();
    let a = embed(&src, &seen_file, &dir.path().join("a.safetensors"));
    let b = embed(&out, &seen_file, &dir.path().join("b.safetensors"));
    let d = max_diff(&a, &b);
    assert!(d < 1e-6, "trimmed vs original on corpus text: {d}");

    // New sentences made of the corpus's words: the same pieces, so the same embeddings.
    let words: Vec<&str> = seen.iter().flat_map(|t| t.split_whitespace()).collect();
    let remix: Vec<String> = (0..6)
        .map(|k| {
            (0..7)
                .map(|j| words[(k * 31 + j * 17) % words.len()])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    let remix_file = dir.path().join("remix.txt");
    std::fs::write(&remix_file, remix.join("\n") + "\n").unwrap();
    let ra = embed(&src, &remix_file, &dir.path().join("ra.safetensors"));
    let rb = embed(&out, &remix_file, &dir.path().join("rb.safetensors"));
    let d = max_diff(&ra, &rb);
    assert!(
        d < 1e-6,
        "trimmed vs original on new sentences of corpus words: {d}"
    );

    // Words outside the corpus still embed (split into kept pieces), but differently:
    // what the trim costs out of domain.
    let unseen = ["Quixotic zephyr vexes the jabberwock", "naïve café résumé"];
    let unseen_file = dir.path().join("unseen.txt");
    std::fs::write(&unseen_file, unseen.join("\n") + "\n").unwrap();
    let ua = embed(&src, &unseen_file, &dir.path().join("ua.safetensors"));
    let ub = embed(&out, &unseen_file, &dir.path().join("ub.safetensors"));
    assert_eq!(ub.size(), [2, 384]);
    let norms = ub.norm_scalaropt_dim(2, [1i64].as_slice(), false);
    assert!(max_diff(&norms, &Tensor::ones([2], (tch::Kind::Float, Device::Cpu))) < 1e-4);
    let cos = (&ua * &ub).sum_dim_intlist([1i64].as_slice(), false, tch::Kind::Float);
    assert!(
        cos.max().double_value(&[]) < 0.99,
        "unseen text: cosine {cos:?}"
    );

    // Hugging Face reads the trimmed tokenizer and table as reuse does.
    let res = dir.path().join("py.safetensors");
    let o = Command::new(root().join(".venv/bin/python"))
        .arg(root().join("fixtures/distill/student_check.py"))
        .args([out.as_os_str(), seen_file.as_os_str(), res.as_os_str()])
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    ok(&o);
    let py = Checkpoint::load(&res, Device::Cpu).unwrap();
    assert_eq!(py.metadata()["missing_keys"], "[]");
    assert_eq!(py.metadata()["unexpected_keys"], "[]");
    let d = max_diff(py.tensor("st_embeddings").unwrap(), &b);
    assert!(
        d < 1e-4,
        "sentence-transformers vs reuse on the trimmed folder: {d}"
    );
    let d = max_diff(py.tensor("hf_embeddings").unwrap(), &b);
    assert!(d < 1e-4, "transformers vs reuse on the trimmed folder: {d}");
}

#[test]
fn bad_trim_input_is_a_one_line_error_that_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let src = minilm_dir().unwrap();
    let texts = dir.path().join("t.txt");
    std::fs::write(&texts, "mail transfer agent\n").unwrap();
    let run = |model: &Path, out: &Path| {
        reuse(&[
            "distill",
            "trim-vocab",
            "--model",
            model.to_str().unwrap(),
            "--texts",
            texts.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
    };
    let one_line = |o: &Output, needles: &[&str]| {
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
        for n in needles {
            assert!(err.contains(n), "{n:?} not in: {err}");
        }
    };

    // A tokenizer that is not WordPiece: named, with what it is.
    let bpe = dir.path().join("bpe");
    std::fs::create_dir(&bpe).unwrap();
    std::fs::copy(src.join("config.json"), bpe.join("config.json")).unwrap();
    std::os::unix::fs::symlink(src.join("model.safetensors"), bpe.join("model.safetensors"))
        .unwrap();
    let tok = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
        "normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,
        "decoder":null,"model":{"type":"WordLevel","vocab":{"[UNK]":0,"mail":1},
        "unk_token":"[UNK]"}}"#;
    std::fs::write(bpe.join("tokenizer.json"), tok).unwrap();
    let out = dir.path().join("out1");
    one_line(
        &run(&bpe, &out),
        &["tokenizer.json", "WordPiece", "WordLevel"],
    );
    assert!(!out.exists());

    // A quantized folder: trim first, then quantize.
    let q = dir.path().join("q");
    std::fs::create_dir(&q).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg["quantization_config"] = serde_json::json!({"quant_method": "reuse", "bits": 8});
    std::fs::write(q.join("config.json"), cfg.to_string()).unwrap();
    let out = dir.path().join("out2");
    one_line(&run(&q, &out), &["config.json", "quantized"]);
    assert!(!out.exists());

    // An occupied output folder is left as it is.
    let busy = dir.path().join("busy");
    std::fs::create_dir(&busy).unwrap();
    std::fs::write(busy.join("keep.txt"), "mine").unwrap();
    one_line(&run(&src, &busy), &["busy"]);
    assert_eq!(
        std::fs::read_to_string(busy.join("keep.txt")).unwrap(),
        "mine"
    );
}
