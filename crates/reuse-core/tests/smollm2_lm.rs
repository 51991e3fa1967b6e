//! SmolLM2-135M-Instruct from its GGUF against transformers on the same file
//! (`fixtures/smollm2_lm/make_reference.py`): the NLL of texts written for the fixture
//! (1e-4 relative) and greedy continuations token for token, plain and through the chat
//! template. Skips with a notice when `cargo xtask setup` has not unpacked the GGUF.

use reuse_core::data::lm::encode;
use reuse_core::models::llama::GenerateOptions;
use reuse_core::models::lm::LanguageModel;
use reuse_core::models::LoadOptions;
use reuse_testkit::{fixtures_dir, smollm2_gguf_or_skip};
use tch::{Device, Kind};

fn reference() -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures_dir().join("smollm2_lm/reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

#[test]
fn smollm2_scores_and_generates_as_transformers_does() {
    let Some(path) = smollm2_gguf_or_skip("smollm2_scores_and_generates_as_transformers_does")
    else {
        return;
    };
    tch::set_num_threads(2);
    let lm = LanguageModel::load(&path, &LoadOptions::new(Device::Cpu, Kind::Float)).unwrap();
    let r = reference();
    let score = r["score"].as_array().unwrap();
    let rows: Vec<Vec<i64>> = score
        .iter()
        .map(|s| {
            let got = encode(&lm.tokenizer, s["text"].as_str().unwrap(), true).unwrap();
            assert_eq!(got, ids(&s["ids"]), "token ids of {}", s["text"]);
            got
        })
        .collect();
    // Batched (right-padded, longest first) as `reuse lm score` runs it.
    let nlls = lm.model.sequence_nlls(&rows, 4).unwrap();
    for (s, (sum, n)) in score.iter().zip(nlls) {
        assert_eq!(n as i64, s["tokens"].as_i64().unwrap());
        let want = s["nll"].as_f64().unwrap();
        let got = sum / n as f64;
        assert!(
            ((got - want) / want).abs() < 1e-4,
            "{}: NLL {got} vs transformers {want}",
            s["text"]
        );
    }
    for g in r["generate"].as_array().unwrap() {
        let p = g["prompt"].as_str().unwrap();
        let chat = g["chat"].as_bool().unwrap();
        let prompt = lm.prompt_ids(p, chat, None).unwrap();
        assert_eq!(prompt, ids(&g["prompt_ids"]), "prompt ids of {p}");
        let opts = GenerateOptions {
            max_new_tokens: 24,
            stop_tokens: lm.stop_tokens.clone(),
            ..Default::default()
        };
        let out = lm.model.generate(&[prompt], &opts, &mut |_, _| {}).unwrap();
        assert_eq!(
            out.tokens[0],
            ids(&g["greedy"]),
            "greedy continuation of {p}"
        );
        assert_eq!(
            lm.decode(&out.tokens[0]).unwrap(),
            g["completion"].as_str().unwrap()
        );
    }
}
