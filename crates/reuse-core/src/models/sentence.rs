//! Sentence embeddings as sentence-transformers computes them for models such as
//! all-MiniLM-L6-v2: tokenize with the model's own `tokenizer.json` (truncating at
//! `sentence_bert_config.json`'s `max_seq_length`, padding to the longest text of the
//! batch), run BERT, mean-pool over the attention mask and L2-normalise when the model's
//! `modules.json` lists a `Normalize` module.
//!
//! Also here: tokenized text datasets and a BERT + classification-head model for
//! fine-tuning with the [`crate::Trainer`].

use std::path::Path;

use tch::{Device, Kind, Tensor};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use super::bert::{l2_normalize, mean_pool, Bert};
use crate::data::{Batch, BatchSource, TextDataset};
use crate::model::ForwardOptions;
use crate::{Error, Result};

/// A `tokenizer.json` set up as sentence-transformers uses it: truncation at
/// `max_len`, padding to the longest sequence in the batch.
pub fn load_tokenizer(path: &Path, max_len: usize) -> Result<Tokenizer> {
    let mut tok = Tokenizer::from_file(path).map_err(|e| Error::Corrupt {
        path: path.to_path_buf(),
        reason: format!("not a readable tokenizer: {e}"),
    })?;
    let (pad_id, pad_token) = match tok.get_padding() {
        Some(p) => (p.pad_id, p.pad_token.clone()),
        None => (0, "[PAD]".to_string()),
    };
    tok.with_truncation(Some(TruncationParams {
        max_length: max_len,
        ..Default::default()
    }))
    .map_err(|e| Error::invalid("truncation", e.to_string()))?;
    tok.with_padding(Some(PaddingParams {
        strategy: PaddingStrategy::BatchLongest,
        pad_id,
        pad_token,
        ..Default::default()
    }));
    Ok(tok)
}

/// Token ids and attention mask `[n, t]` (i64, CPU) for `texts`, and whether any text
/// is padded.
pub fn tokenize(tok: &Tokenizer, texts: &[&str]) -> Result<(Tensor, Tensor, bool)> {
    let enc = tok
        .encode_batch(texts.to_vec(), true)
        .map_err(|e| Error::invalid("tokenization", e.to_string()))?;
    let n = enc.len() as i64;
    let t = enc.first().map(|e| e.get_ids().len()).unwrap_or(0) as i64;
    let ids: Vec<i64> = enc
        .iter()
        .flat_map(|e| e.get_ids().iter().map(|&i| i as i64))
        .collect();
    let mask: Vec<i64> = enc
        .iter()
        .flat_map(|e| e.get_attention_mask().iter().map(|&i| i as i64))
        .collect();
    let padded = mask.contains(&0);
    Ok((
        Tensor::from_slice(&ids).view([n, t]),
        Tensor::from_slice(&mask).view([n, t]),
        padded,
    ))
}

/// BERT + tokenizer + pooling: text in, sentence embeddings out.
#[derive(Debug)]
pub struct SentenceEncoder {
    /// The encoder.
    pub bert: Bert,
    /// The tokenizer (truncation and padding set).
    pub tokenizer: Tokenizer,
    /// Longest token sequence kept.
    pub max_seq_length: usize,
    /// Whether embeddings are L2-normalised.
    pub normalize: bool,
}

impl SentenceEncoder {
    /// Loads a sentence-transformers model folder (config.json, model.safetensors,
    /// tokenizer.json, and optionally sentence_bert_config.json and modules.json). A
    /// quantized folder needs [`SentenceEncoder::load_with`] and its storage loader.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        Self::load_with(dir, &crate::models::LoadOptions::new(device, kind))
    }

    /// [`SentenceEncoder::load`] with options (storage loaders for a quantized folder).
    pub fn load_with(dir: &Path, opts: &crate::models::LoadOptions<'_>) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "model folder not found"),
            ));
        }
        let bert = Bert::load_with(dir, opts)?;
        let sb = dir.join("sentence_bert_config.json");
        let max_seq_length = if sb.exists() {
            let text = std::fs::read_to_string(&sb).map_err(|e| Error::io(&sb, e))?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Corrupt {
                path: sb.clone(),
                reason: e.to_string(),
            })?;
            v.get("max_seq_length")
                .and_then(|m| m.as_u64())
                .unwrap_or(512) as usize
        } else {
            bert.config.max_position_embeddings as usize
        }
        .min(bert.config.max_position_embeddings as usize);
        let modules = dir.join("modules.json");
        let normalize = std::fs::read_to_string(&modules)
            .map(|t| t.contains("sentence_transformers.models.Normalize"))
            .unwrap_or(false);
        let tokenizer = load_tokenizer(&dir.join("tokenizer.json"), max_seq_length)?;
        Ok(Self {
            bert,
            tokenizer,
            max_seq_length,
            normalize,
        })
    }

    /// Embeddings `[n, hidden]` (f32, CPU) of `texts`, `batch_size` at a time. Texts are
    /// batched longest first (as sentence-transformers does) and returned in input order.
    pub fn encode(&self, texts: &[&str], batch_size: usize) -> Result<Tensor> {
        let device = self.bert.device();
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(texts[i].chars().count()));
        let mut rows: Vec<Tensor> = Vec::new();
        tch::no_grad(|| -> Result<()> {
            for chunk in order.chunks(batch_size.max(1)) {
                let batch: Vec<&str> = chunk.iter().map(|&i| texts[i]).collect();
                let (ids, mask, padded) = tokenize(&self.tokenizer, &batch)?;
                let (ids, mask) = (ids.to_device(device), mask.to_device(device));
                let mask = padded.then_some(&mask);
                let out = self
                    .bert
                    .forward(&ids, mask, None, false, ForwardOptions::default())?;
                let mut e = mean_pool(&out.last_hidden_state, mask);
                if self.normalize {
                    e = l2_normalize(&e);
                }
                rows.push(e.to_device(Device::Cpu));
            }
            Ok(())
        })?;
        if rows.is_empty() {
            return Ok(Tensor::zeros(
                [0, self.bert.config.hidden_size],
                (Kind::Float, Device::Cpu),
            ));
        }
        let sorted = Tensor::cat(&rows, 0);
        let mut inverse = vec![0i64; texts.len()];
        for (pos, &i) in order.iter().enumerate() {
            inverse[i] = pos as i64;
        }
        Ok(sorted.index_select(0, &Tensor::from_slice(&inverse)))
    }
}

/// Texts tokenized once, padded to `max_len`, batched by index; each batch is trimmed
/// to its longest text and knows whether it is padded. Optionally every example carries
/// a task id.
#[derive(Debug)]
pub struct TokenizedDataset {
    ids: Tensor,
    mask: Tensor,
    /// Tokens per example (host side: batches find their length and padding here).
    lens: Vec<i64>,
    labels: Tensor,
    task: Option<i64>,
}

impl TokenizedDataset {
    /// Tokenizes `data` with `tok`, truncating at `max_len`. `max_len` may not exceed the
    /// tokenizer's own truncation length (a sentence encoder sets it to the model's
    /// position table): longer inputs would not fit the model.
    pub fn new(tok: &Tokenizer, data: &TextDataset, max_len: usize) -> Result<Self> {
        if max_len == 0 {
            return Err(Error::invalid("max_len", "must be at least 1"));
        }
        if let Some(t) = tok.get_truncation() {
            if max_len > t.max_length {
                return Err(Error::invalid(
                    "max_len",
                    format!(
                        "{max_len} exceeds the tokenizer's truncation length {} (the model's longest input)",
                        t.max_length
                    ),
                ));
            }
        }
        if data.texts.len() != data.labels.len() {
            return Err(Error::invalid(
                "text dataset",
                format!(
                    "{} texts but {} labels",
                    data.texts.len(),
                    data.labels.len()
                ),
            ));
        }
        let mut tok = tok.clone();
        tok.with_truncation(Some(TruncationParams {
            max_length: max_len,
            ..Default::default()
        }))
        .map_err(|e| Error::invalid("truncation", e.to_string()))?;
        let texts: Vec<&str> = data.texts.iter().map(String::as_str).collect();
        let (ids, mask, _) = tokenize(&tok, &texts)?;
        let lens = if mask.numel() > 0 {
            Vec::<i64>::try_from(&mask.sum_dim_intlist(1, false, Kind::Int64))?
        } else {
            Vec::new()
        };
        Ok(Self {
            ids,
            mask,
            lens,
            labels: Tensor::from_slice(&data.labels),
            task: None,
        })
    }

    /// The same data, every example tagged with task id `task`.
    pub fn with_task(mut self, task: i64) -> Self {
        self.task = Some(task);
        self
    }
}

impl BatchSource for TokenizedDataset {
    fn len(&self) -> usize {
        self.labels.size()[0] as usize
    }

    fn batch(&self, indices: &[i64], device: Device) -> Result<Batch> {
        crate::data::check_indices(indices, self.len())?;
        let idx = Tensor::from_slice(indices);
        let lens: Vec<i64> = indices.iter().map(|&i| self.lens[i as usize]).collect();
        let t = lens.iter().copied().max().unwrap_or(1).max(1);
        let padded = lens.iter().any(|&l| l < t);
        let b = Batch {
            inputs: self
                .ids
                .index_select(0, &idx)
                .narrow(1, 0, t)
                .to_device(device),
            mask: Some(
                self.mask
                    .index_select(0, &idx)
                    .narrow(1, 0, t)
                    .to_device(device),
            ),
            padded,
            labels: self.labels.index_select(0, &idx).to_device(device),
            indices: indices.to_vec(),
            task_ids: None,
        };
        Ok(match self.task {
            Some(k) => b.with_task(k),
            None => b,
        })
    }
}
