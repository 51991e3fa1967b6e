//! The tokenizer a GGUF's metadata describes, built as transformers builds it
//! (`integrations/gguf/gguf_tokenizer_mapping.py`) so that the ids agree with
//! `AutoTokenizer.from_pretrained(dir, gguf_file=...)`.
//!
//! Handled: `tokenizer.ggml.model == "gpt2"`, byte-level BPE from `tokenizer.ggml.tokens`
//! and `tokenizer.ggml.merges`. A token spelled outside GPT-2's byte alphabet is respelled
//! byte by byte; tokens of type 3 (control) become special added tokens and tokens of type
//! 4 (user-defined) plain added tokens, so they are matched whole. The pre-tokenizer
//! follows `tokenizer.ggml.pre` as transformers does: the Llama 3, Qwen2, GPT-4o and
//! Tekken families get their split regex, and every other name (`gpt2`, `smollm`, ...)
//! GPT-2's byte-level regex. A BOS (EOS) is added when `tokenizer.ggml.add_bos_token`
//! (`add_eos_token`) says so; absent means no, as transformers assumes for `gpt2` files.

use serde_json::{json, Map, Value as Json};

use super::{quote, GgufFile};
use crate::error::{Error, Result};

const LLAMA3_SPLIT: &str = concat!(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}",
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);
const QWEN2_SPLIT: &str = concat!(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}",
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);
const QWEN35_SPLIT: &str = concat!(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}",
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);
const TEKKEN_SPLIT: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*",
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);
const GPT4O_SPLIT: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);

/// The split regex for a `tokenizer.ggml.pre` name, as transformers 5.24 maps them; None
/// means GPT-2's own byte-level regex.
fn split_regex(pre: &str) -> Option<&'static str> {
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" | "dbrx" | "smaug-bpe" => LLAMA3_SPLIT,
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => QWEN2_SPLIT,
        "qwen35" => QWEN35_SPLIT,
        "tekken" => TEKKEN_SPLIT,
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => GPT4O_SPLIT,
        _ => return None,
    })
}

/// GPT-2's byte → character table: printable Latin-1 bytes stand for themselves, the
/// others for U+0100 onwards in byte order.
fn bytes_to_unicode() -> [char; 256] {
    let printable = |b: u32| {
        (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b)
    };
    let mut table = ['\0'; 256];
    let mut n = 0;
    for b in 0..256u32 {
        table[b as usize] = if printable(b) {
            char::from_u32(b).unwrap_or('\0')
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap_or('\0')
        };
    }
    table
}

fn added(id: u64, content: &str, special: bool) -> Json {
    json!({
        "id": id, "content": content, "single_word": false, "lstrip": false,
        "rstrip": false, "normalized": false, "special": special,
    })
}

/// The tokenizer as a `tokenizer.json` document (what [`tokenizer()`] parses, and what a
/// Hugging Face folder written from the file should hold).
pub fn tokenizer_json(file: &GgufFile) -> Result<Json> {
    let path = file.path().display().to_string();
    let model = file.get_str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(Error::invalid(
            format!("{path}: tokenizer.ggml.model"),
            format!(
                "{} is not supported (reuse builds `gpt2` byte-level BPE tokenizers)",
                quote(model)
            ),
        ));
    }
    let tokens = file.get_str_array("tokenizer.ggml.tokens")?;
    let types = match file.get("tokenizer.ggml.token_type") {
        Some(_) => file.get_i64_array("tokenizer.ggml.token_type")?,
        None => Vec::new(),
    };
    let merges = match file.get("tokenizer.ggml.merges") {
        Some(_) => file.get_str_array("tokenizer.ggml.merges")?,
        None => &[],
    };

    let spelling = bytes_to_unicode();
    let alphabet: std::collections::HashSet<char> = spelling.iter().copied().collect();
    let in_alphabet = |t: &str| t.chars().all(|c| alphabet.contains(&c));
    let mut vocab = Map::with_capacity(tokens.len());
    for (id, t) in tokens.iter().enumerate() {
        let key = if in_alphabet(t) {
            t.clone()
        } else {
            t.bytes().map(|b| spelling[b as usize]).collect()
        };
        // A repeated spelling keeps its last id, as a Python dict does.
        vocab.insert(key, json!(id));
    }
    let merges: Vec<Json> = merges
        .iter()
        .enumerate()
        .map(|(i, m)| match m.split_once(' ') {
            Some((a, b)) if !b.contains(' ') => Ok(json!([a, b])),
            _ => Err(Error::invalid(
                format!("{path}: tokenizer.ggml.merges[{i}]"),
                format!("expected two tokens separated by one space, found {m:?}"),
            )),
        })
        .collect::<Result<_>>()?;

    // Control tokens (type 3) become special; a control token spelled outside the byte
    // alphabet is a llama.cpp mislabel and is skipped, as transformers skips it.
    // User-defined tokens (type 4) are matched whole but are not special.
    let mut added_tokens: Vec<Json> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (t, &ty) in tokens.iter().zip(&types) {
        if ty == 3 && in_alphabet(t) && seen.insert(t.as_str()) {
            if let Some(id) = vocab.get(t).and_then(Json::as_u64) {
                added_tokens.push(added(id, t, true));
            }
        }
    }
    for (t, &ty) in tokens.iter().zip(&types) {
        if ty == 4 && seen.insert(t.as_str()) {
            if let Some(id) = vocab.get(t).and_then(Json::as_u64) {
                added_tokens.push(added(id, t, false));
            }
        }
    }
    let special = |key: &str| -> Result<Option<(String, u64)>> {
        let k = format!("tokenizer.ggml.{key}");
        if file.get(&k).is_none() {
            return Ok(None);
        }
        let id = file.get_u64(&k)?;
        match tokens.get(id as usize) {
            Some(t) => Ok(Some((t.clone(), id))),
            None => Err(Error::invalid(
                format!("{path}: {k}"),
                format!(
                    "token id {id} is past the vocabulary's {} tokens",
                    tokens.len()
                ),
            )),
        }
    };
    let bos = special("bos_token_id")?;
    let eos = special("eos_token_id")?;
    // transformers registers bos/eos/unk/pad as special tokens too.
    for s in [
        &bos,
        &eos,
        &special("unknown_token_id")?,
        &special("padding_token_id")?,
    ]
    .into_iter()
    .flatten()
    {
        if seen.insert(s.0.as_str()) {
            added_tokens.push(added(s.1, &s.0, true));
        }
    }
    let flag = |k: &str| -> Result<bool> {
        let k = format!("tokenizer.ggml.{k}");
        match file.get(&k) {
            Some(_) => file.get_bool(&k),
            None => Ok(false),
        }
    };
    let add_bos = flag("add_bos_token")?.then_some(bos).flatten();
    let add_eos = flag("add_eos_token")?.then_some(eos).flatten();

    let pre_tokenizer = match file
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.as_str())
        .and_then(split_regex)
    {
        Some(re) => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
        ]}),
        None => {
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true})
        }
    };

    let seq = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
    let tok = |t: &str, type_id: u32| json!({"SpecialToken": {"id": t, "type_id": type_id}});
    let mut single = Vec::new();
    let mut pair = Vec::new();
    let mut specials = Map::new();
    for (type_id, part, out) in [(0, "A", &mut single), (1, "B", &mut pair)] {
        if let Some((t, _)) = &add_bos {
            out.push(tok(t, type_id));
        }
        out.push(seq(part, type_id));
        if let Some((t, _)) = &add_eos {
            out.push(tok(t, type_id));
        }
    }
    let pair: Vec<Json> = single.iter().cloned().chain(pair).collect();
    for (t, id) in add_bos.iter().chain(add_eos.iter()) {
        specials.insert(t.clone(), json!({"id": t, "ids": [id], "tokens": [t]}));
    }

    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
            "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": merges,
        },
    }))
}

/// The file's tokenizer (see the module documentation for what is handled), giving the ids
/// transformers gives for the same file.
pub fn tokenizer(file: &GgufFile) -> Result<tokenizers::Tokenizer> {
    let doc = tokenizer_json(file)?.to_string();
    doc.parse::<tokenizers::Tokenizer>().map_err(|e| {
        Error::invalid(
            format!("{}: tokenizer", file.path().display()),
            format!("the tokenizer built from the metadata does not load: {e}"),
        )
    })
}

/// `tokenizer.chat_template`, the model's Jinja chat template, when the file has one.
pub fn chat_template(file: &GgufFile) -> Option<String> {
    file.get("tokenizer.chat_template")
        .and_then(|v| v.as_str())
        .map(str::to_string)
}
