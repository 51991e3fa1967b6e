//! Vocabulary trimming: keep only the tokens a domain uses.
//!
//! A small student spends most of its bytes on the word-embedding table: MiniLM's
//! 30522 x 384 table is 11.7M of its 22.7M parameters, and a 2-layer student cut from
//! it keeps the whole table. A model that serves one domain needs only the rows of the
//! tokens that domain's text produces (Ushio et al., 2023, "An Efficient Multilingual
//! Language Model Compression through Vocabulary Trimming", trim to the tokens of a
//! corpus). [`VocabTrim::from_texts`] tokenizes a corpus and keeps:
//!
//! - every token id the corpus produces (special tokens included);
//! - every added / special token of the tokenizer (`[PAD]`, `[UNK]`, `[CLS]`, ...);
//! - every single-character piece of printable ASCII (`a`, `##a`, `7`, `##7`, ...), so
//!   any ASCII word still tokenizes without `[UNK]`, falling back to shorter pieces.
//!
//! Kept tokens keep their relative order; new id `i` is old id `keep[i]`.
//!
//! **What changes and what does not.** WordPiece picks the longest piece in its
//! vocabulary at each position. Every piece of a corpus word is kept, and a subset of
//! the vocabulary cannot offer a longer match, so any text made of the corpus's words
//! tokenizes to the same pieces, and the trimmed model computes exactly what the
//! original does on it. A word outside the corpus may split into shorter pieces than
//! before (a different input, so a different output), and a non-ASCII character the
//! corpus never had becomes `[UNK]`.
//!
//! [`trim_vocab_folder`] writes a complete model folder (config.json with the new
//! `vocab_size`, the gathered embedding rows, `tokenizer.json` and `vocab.txt` with the
//! new ids) that Hugging Face transformers and sentence-transformers load; trim before
//! quantizing.

use std::collections::BTreeSet;
use std::path::Path;
use std::str::FromStr;

use reuse_core::models::folder::{check_out, write_model_folder};
use reuse_core::models::{Bert, BertConfig};
use reuse_core::{Error, Result};
use serde_json::Value;
use tch::{Device, Kind, Tensor};
use tokenizers::Tokenizer;

/// A trimmed vocabulary: which old ids are kept, and the tokenizer that emits the new
/// ids.
#[derive(Clone)]
pub struct VocabTrim {
    keep: Vec<i64>,
    old_size: i64,
    json: Value,
    tokenizer: Tokenizer,
}

impl std::fmt::Debug for VocabTrim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VocabTrim")
            .field("kept", &self.keep.len())
            .field("old_size", &self.old_size)
            .finish()
    }
}

/// Where a tokenizer was read from, for error messages.
const WHAT: &str = "tokenizer.json";

fn corrupt(reason: impl Into<String>) -> Error {
    Error::invalid(WHAT, reason)
}

impl VocabTrim {
    /// Plans the trim of `tokenizer` (a WordPiece tokenizer, as BERT's) to the tokens of
    /// `texts` (see the module docs for what else is kept). Truncation is ignored while
    /// the corpus is read, so long texts count whole.
    ///
    /// # Errors
    /// No texts; a tokenizer that is not WordPiece or whose post-processor or added
    /// tokens this function does not know how to renumber (each named).
    pub fn from_texts(tokenizer: &Tokenizer, texts: &[&str]) -> Result<Self> {
        if texts.is_empty() {
            return Err(Error::invalid(
                "texts",
                "none given: the trimmed vocabulary is the tokens of a corpus",
            ));
        }
        let json: Value = serde_json::from_str(
            &tokenizer
                .to_string(false)
                .map_err(|e| corrupt(format!("cannot serialise the tokenizer: {e}")))?,
        )
        .map_err(|e| corrupt(e.to_string()))?;
        let vocab = wordpiece_vocab(&json)?;
        let old_size = vocab.values().copied().max().map_or(0, |m| m + 1);

        let mut keep: BTreeSet<i64> = BTreeSet::new();
        let mut plain = tokenizer.clone();
        plain
            .with_truncation(None)
            .map_err(|e| corrupt(e.to_string()))?;
        plain.with_padding(None);
        for chunk in texts.chunks(1024) {
            let enc = plain
                .encode_batch(chunk.to_vec(), true)
                .map_err(|e| Error::invalid("tokenization", e.to_string()))?;
            for e in enc {
                keep.extend(e.get_ids().iter().map(|&i| i as i64));
            }
        }
        if let Some(added) = json.get("added_tokens").and_then(Value::as_array) {
            for t in added {
                let id = t
                    .get("id")
                    .and_then(Value::as_i64)
                    .ok_or_else(|| corrupt("an added token without a numeric id"))?;
                keep.insert(id);
            }
        }
        let prefix = json["model"]
            .get("continuing_subword_prefix")
            .and_then(Value::as_str)
            .unwrap_or("##")
            .to_string();
        for c in (0x21u8..0x7f).map(char::from) {
            for piece in [c.to_string(), format!("{prefix}{c}")] {
                if let Some(&id) = vocab.get(&piece) {
                    keep.insert(id);
                }
            }
        }
        let keep: Vec<i64> = keep.into_iter().collect();
        Self::with_keep(json, keep, old_size)
    }

    fn with_keep(mut json: Value, keep: Vec<i64>, old_size: i64) -> Result<Self> {
        let mut new_id = vec![-1i64; old_size as usize];
        for (new, &old) in keep.iter().enumerate() {
            new_id[old as usize] = new as i64;
        }
        let remap = |old: i64, what: &str| -> Result<i64> {
            match new_id.get(old as usize) {
                Some(&n) if n >= 0 => Ok(n),
                _ => Err(corrupt(format!(
                    "{what} has id {old}, which the trimmed vocabulary does not keep"
                ))),
            }
        };
        // The WordPiece vocabulary itself.
        let vocab = wordpiece_vocab(&json)?;
        let mut new_vocab = serde_json::Map::new();
        let mut by_new: Vec<(i64, String)> = Vec::with_capacity(keep.len());
        for (tok, old) in vocab {
            let n = new_id[old as usize];
            if n >= 0 {
                by_new.push((n, tok));
            }
        }
        by_new.sort();
        for (n, tok) in &by_new {
            new_vocab.insert(tok.clone(), Value::from(*n));
        }
        json["model"]["vocab"] = Value::Object(new_vocab);
        // Added tokens.
        if let Some(added) = json.get_mut("added_tokens").and_then(Value::as_array_mut) {
            for t in added {
                let old = t["id"].as_i64().unwrap_or(-1);
                t["id"] = Value::from(remap(old, "an added token")?);
            }
        }
        // The post-processor's special-token ids.
        renumber_post_processor(&mut json["post_processor"], &remap)?;
        // Padding.
        if let Some(p) = json.get_mut("padding").filter(|p| p.is_object()) {
            if let Some(old) = p.get("pad_id").and_then(Value::as_i64) {
                p["pad_id"] = Value::from(remap(old, "padding's pad_id")?);
            }
        }
        let tokenizer = Tokenizer::from_str(&json.to_string())
            .map_err(|e| corrupt(format!("the trimmed tokenizer does not load: {e}")))?;
        Ok(Self {
            keep,
            old_size,
            json,
            tokenizer,
        })
    }

    /// Old ids of the kept tokens, in new-id order (new id `i` is old id `keep()[i]`).
    pub fn keep(&self) -> &[i64] {
        &self.keep
    }

    /// Tokens kept.
    pub fn len(&self) -> usize {
        self.keep.len()
    }

    /// Whether nothing is kept (never, for a plan built from texts).
    pub fn is_empty(&self) -> bool {
        self.keep.is_empty()
    }

    /// The vocabulary size before trimming.
    pub fn old_size(&self) -> i64 {
        self.old_size
    }

    /// The tokenizer with the trimmed vocabulary (the original's normaliser,
    /// pre-tokenizer, truncation and padding settings, renumbered).
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The trimmed `tokenizer.json`.
    pub fn tokenizer_json(&self) -> String {
        serde_json::to_string_pretty(&self.json).unwrap_or_else(|_| self.json.to_string())
    }

    /// The trimmed `vocab.txt` (one token per line, in id order), as BERT's slow
    /// tokenizer reads it.
    pub fn vocab_txt(&self) -> String {
        let mut by_new: Vec<(i64, &str)> = self.json["model"]["vocab"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(t, id)| (id.as_i64().unwrap_or(-1), t.as_str()))
                    .collect()
            })
            .unwrap_or_default();
        by_new.sort();
        let mut s = String::new();
        for (_, t) in by_new {
            s.push_str(t);
            s.push('\n');
        }
        s
    }

    /// The new ids of `old` (ids of the original tokenizer, any shape): what the
    /// trimmed tokenizer emits for a text the original tokenized to `old`, when every
    /// id is kept.
    ///
    /// # Errors
    /// An id the trimmed vocabulary does not keep, or out of range.
    pub fn map_ids(&self, old: &Tensor) -> Result<Tensor> {
        let mut lut = vec![-1i64; self.old_size as usize];
        for (n, &o) in self.keep.iter().enumerate() {
            lut[o as usize] = n as i64;
        }
        let flat: Vec<i64> = Vec::<i64>::try_from(old.flatten(0, -1).to_kind(Kind::Int64))
            .map_err(|e| Error::invalid("ids", e.to_string()))?;
        let mut out = Vec::with_capacity(flat.len());
        for o in flat {
            match lut.get(o as usize) {
                Some(&n) if n >= 0 => out.push(n),
                _ => {
                    return Err(Error::invalid(
                        "ids",
                        format!("token id {o} is not in the trimmed vocabulary"),
                    ))
                }
            }
        }
        Ok(Tensor::from_slice(&out).view(old.size().as_slice()))
    }

    /// Trims `bert`'s word-embedding table to the kept rows (in new-id order) and sets
    /// its `vocab_size`. The table stays on its device and keeps `requires_grad`.
    ///
    /// # Errors
    /// A model whose vocabulary size is not the tokenizer's (a different model).
    pub fn apply(&self, bert: &mut Bert) -> Result<()> {
        let table = &bert.embeddings.word_embeddings;
        let rows = table.size()[0];
        if rows != self.old_size || bert.config.vocab_size != self.old_size {
            return Err(Error::invalid(
                "word_embeddings",
                format!(
                    "the model has {rows} rows (config vocab_size {}) but the tokenizer has {} tokens: not this tokenizer's model",
                    bert.config.vocab_size, self.old_size
                ),
            ));
        }
        let idx = Tensor::from_slice(&self.keep).to_device(table.device());
        let grad = table.requires_grad();
        let trimmed = tch::no_grad(|| table.index_select(0, &idx)).set_requires_grad(grad);
        bert.embeddings.word_embeddings = trimmed;
        bert.config.vocab_size = self.keep.len() as i64;
        Ok(())
    }
}

/// The WordPiece `model.vocab` of a tokenizer.json (token -> id).
fn wordpiece_vocab(json: &Value) -> Result<std::collections::HashMap<String, i64>> {
    let model = &json["model"];
    let ty = model.get("type").and_then(Value::as_str).unwrap_or("");
    if ty != "WordPiece" {
        return Err(corrupt(format!(
            "vocabulary trimming supports WordPiece tokenizers (BERT's); this one's model is {:?}",
            if ty.is_empty() { "unknown" } else { ty }
        )));
    }
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| corrupt("model.vocab is not a token -> id map"))?;
    vocab
        .iter()
        .map(|(t, id)| {
            id.as_i64()
                .filter(|&i| i >= 0)
                .map(|i| (t.clone(), i))
                .ok_or_else(|| corrupt(format!("model.vocab[{t:?}] is not an id: {id}")))
        })
        .collect()
}

/// Renumbers a post-processor's special-token ids: TemplateProcessing (`special_tokens
/// .*.ids`), BertProcessing / RobertaProcessing (`cls`, `sep`), and Sequence of those.
fn renumber_post_processor(pp: &mut Value, remap: &dyn Fn(i64, &str) -> Result<i64>) -> Result<()> {
    if pp.is_null() {
        return Ok(());
    }
    match pp.get("type").and_then(Value::as_str).unwrap_or("") {
        "TemplateProcessing" => {
            if let Some(map) = pp.get_mut("special_tokens").and_then(Value::as_object_mut) {
                for (name, tok) in map.iter_mut() {
                    if let Some(ids) = tok.get_mut("ids").and_then(Value::as_array_mut) {
                        for id in ids.iter_mut() {
                            let old = id.as_i64().unwrap_or(-1);
                            *id = Value::from(remap(old, &format!("special token {name}"))?);
                        }
                    }
                }
            }
            Ok(())
        }
        "BertProcessing" | "RobertaProcessing" => {
            for key in ["cls", "sep"] {
                if let Some(pair) = pp.get_mut(key).and_then(Value::as_array_mut) {
                    if let Some(id) = pair.get_mut(1) {
                        let old = id.as_i64().unwrap_or(-1);
                        *id = Value::from(remap(old, key)?);
                    }
                }
            }
            Ok(())
        }
        "Sequence" => {
            if let Some(list) = pp.get_mut("processors").and_then(Value::as_array_mut) {
                for p in list {
                    renumber_post_processor(p, remap)?;
                }
            }
            Ok(())
        }
        "ByteLevel" => Ok(()),
        other => Err(corrupt(format!(
            "post_processor of type {other:?}: vocabulary trimming cannot renumber its ids"
        ))),
    }
}

/// What [`trim_vocab_folder`] did.
#[derive(Clone, Debug)]
pub struct TrimReport {
    /// Vocabulary size before.
    pub vocab_before: i64,
    /// Vocabulary size after.
    pub vocab_after: i64,
    /// Bytes of the source's `model.safetensors`.
    pub bytes_before: u64,
    /// Bytes of the trimmed `model.safetensors`.
    pub bytes_after: u64,
}

/// Writes the model folder `src` with its vocabulary trimmed to the tokens of `texts`
/// (see the module docs) as a complete model folder at `out`: `config.json` with the new
/// `vocab_size`, `model.safetensors` with the kept embedding rows, `tokenizer.json` and
/// `vocab.txt` renumbered, the other tokenizer and sentence-transformers files copied.
/// The folder is built beside `out` and moved into place whole; `src` is only read.
///
/// # Errors
/// `out` not empty (without `overwrite`); `src` not a BERT folder with a WordPiece
/// `tokenizer.json`, or a quantized one (trim first, then quantize); no texts.
pub fn trim_vocab_folder(
    src: &Path,
    texts: &[&str],
    out: &Path,
    overwrite: bool,
) -> Result<TrimReport> {
    check_out(out, overwrite)?;
    let cfg_path = src.join("config.json");
    let cfg = BertConfig::load(&cfg_path)?;
    if cfg.extra.contains_key("quantization_config") {
        return Err(Error::invalid(
            format!("{}", cfg_path.display()),
            "the model is quantized: trim the vocabulary of the f32 model, then quantize",
        ));
    }
    let tok_path = src.join("tokenizer.json");
    let tokenizer = Tokenizer::from_file(&tok_path).map_err(|e| Error::Corrupt {
        path: tok_path.clone(),
        reason: format!("not a readable tokenizer: {e}"),
    })?;
    let plan = VocabTrim::from_texts(&tokenizer, texts).map_err(|e| match e {
        Error::Invalid { what, reason } if what == WHAT => Error::Corrupt {
            path: tok_path.clone(),
            reason,
        },
        other => other,
    })?;
    let mut bert = Bert::load(src, Device::Cpu, Kind::Float)?;
    plan.apply(&mut bert)?;
    let mut updates = serde_json::Map::new();
    updates.insert("vocab_size".into(), Value::from(plan.len()));
    let has_vocab_txt = src.join("vocab.txt").is_file();
    write_model_folder(
        src,
        out,
        &updates,
        &bert.state_dict(),
        overwrite,
        &mut |tmp| {
            let write = |name: &str, text: String| -> Result<()> {
                let p = tmp.join(name);
                std::fs::write(&p, text).map_err(|e| Error::io(&p, e))
            };
            write("tokenizer.json", plan.tokenizer_json())?;
            if has_vocab_txt {
                write("vocab.txt", plan.vocab_txt())?;
            }
            Ok(())
        },
    )?;
    let size = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.len())
            .map_err(|e| Error::io(p, e))
    };
    Ok(TrimReport {
        vocab_before: plan.old_size(),
        vocab_after: plan.len() as i64,
        bytes_before: size(&src.join("model.safetensors"))?,
        bytes_after: size(&out.join("model.safetensors"))?,
    })
}
