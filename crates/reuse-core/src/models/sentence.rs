//! Sentence embeddings as sentence-transformers computes them for models such as
//! all-MiniLM-L6-v2: tokenize with the model's own `tokenizer.json` (truncating at
//! `sentence_bert_config.json`'s `max_seq_length`, padding to the longest text of the
//! batch), run BERT, mean-pool over the attention mask and L2-normalise when the model's
//! `modules.json` lists a `Normalize` module.
//!
//! Also here: tokenized text datasets and a BERT + classification-head model for
//! fine-tuning with the [`crate::Trainer`].

use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use super::bert::{l2_normalize, mean_pool, Bert, Want};
use crate::data::{Batch, BatchSource, TextDataset};
use crate::model::{prefixed, Model};
use crate::trainer::{StepOutputs, Trainable};
use crate::{ClassificationHead, Error, Linear, OutputSlots, Params, Result};

/// Environment variable naming the all-MiniLM-L6-v2 folder (`cargo xtask setup`
/// unpacks it to `.cache/models/all-MiniLM-L6-v2` and `.cargo/config.toml` points this
/// variable there).
pub const MINILM_ENV: &str = "REUSE_MINILM_DIR";

/// The all-MiniLM-L6-v2 folder: `$REUSE_MINILM_DIR`, else the workspace cache.
pub fn minilm_dir() -> Result<PathBuf> {
    let dir = std::env::var_os(MINILM_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/models/all-MiniLM-L6-v2")
        });
    if dir.join("model.safetensors").exists() {
        Ok(dir)
    } else {
        Err(Error::invalid(
            "model folder",
            format!(
                "{} has no model.safetensors; run `cargo xtask setup` (or set {MINILM_ENV})",
                dir.display()
            ),
        ))
    }
}

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

/// Token ids and attention mask `[n, t]` (i64, CPU) for `texts`.
pub fn tokenize(tok: &Tokenizer, texts: &[&str]) -> Result<(Tensor, Tensor)> {
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
    Ok((
        Tensor::from_slice(&ids).view([n, t]),
        Tensor::from_slice(&mask).view([n, t]),
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
    /// tokenizer.json, and optionally sentence_bert_config.json and modules.json).
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "model folder not found"),
            ));
        }
        let bert = Bert::load(dir, device, kind)?;
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
                let (ids, mask) = tokenize(&self.tokenizer, &batch)?;
                let (ids, mask) = (ids.to_device(device), mask.to_device(device));
                let out = self.bert.forward(&ids, &mask, None, false, Want::default());
                let mut e = mean_pool(&out.last_hidden_state, &mask);
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
/// to its longest text.
#[derive(Debug)]
pub struct TokenizedDataset {
    ids: Tensor,
    mask: Tensor,
    labels: Tensor,
}

impl TokenizedDataset {
    /// Tokenizes `data` with `tok` (whose truncation should be at most `max_len`).
    pub fn new(tok: &Tokenizer, data: &TextDataset, max_len: usize) -> Result<Self> {
        let mut tok = tok.clone();
        tok.with_truncation(Some(TruncationParams {
            max_length: max_len,
            ..Default::default()
        }))
        .map_err(|e| Error::invalid("truncation", e.to_string()))?;
        let texts: Vec<&str> = data.texts.iter().map(String::as_str).collect();
        let (ids, mask) = tokenize(&tok, &texts)?;
        Ok(Self {
            ids,
            mask,
            labels: Tensor::from_slice(&data.labels),
        })
    }
}

impl BatchSource for TokenizedDataset {
    fn len(&self) -> usize {
        self.labels.size()[0] as usize
    }

    fn batch(&self, indices: &[i64], device: Device) -> Result<Batch> {
        let idx = Tensor::from_slice(indices);
        let mask = self.mask.index_select(0, &idx);
        let t = mask
            .sum_dim_intlist(1, false, Kind::Int64)
            .max()
            .int64_value(&[])
            .max(1);
        Ok(Batch {
            inputs: self
                .ids
                .index_select(0, &idx)
                .narrow(1, 0, t)
                .to_device(device),
            mask: Some(mask.narrow(1, 0, t).to_device(device)),
            labels: self.labels.index_select(0, &idx).to_device(device),
            task: None,
        })
    }
}

/// BERT, mean pooling and a classification head (`classifier`): text classification.
#[derive(Debug)]
pub struct BertClassifier {
    /// The encoder.
    pub bert: Bert,
    /// The head, addressed as `classifier`.
    pub head: ClassificationHead,
}

impl BertClassifier {
    /// A new head of `num_classes` on `bert` (dropout = the config's hidden dropout).
    pub fn new(bert: Bert, num_classes: i64) -> Self {
        let head = ClassificationHead::new(
            bert.config.hidden_size,
            num_classes,
            bert.config.hidden_dropout_prob,
            bert.device(),
        );
        Self { bert, head }
    }

    /// Logits `[b, classes]` (f32).
    pub fn logits(&self, ids: &Tensor, mask: &Tensor, train: bool) -> Tensor {
        let out = self.bert.forward(ids, mask, None, train, Want::default());
        let pooled =
            mean_pool(&out.last_hidden_state, mask).to_kind(self.head.classifier.weight.kind());
        self.head.forward(&pooled, train).to_kind(Kind::Float)
    }
}

impl Model for BertClassifier {
    fn visit_linears(&mut self, f: &mut dyn FnMut(&str, &mut Linear)) {
        self.bert.visit_linears(f);
        self.head.visit_linears(f);
    }

    fn visit_block_outputs(&mut self, f: &mut dyn FnMut(&str, &mut OutputSlots)) {
        self.bert.visit_block_outputs(f);
    }

    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut v = self.bert.named_parameters();
        v.extend(prefixed(
            "classifier",
            self.head.classifier.named_parameters(),
        ));
        v
    }
}

impl Trainable for BertClassifier {
    fn parameters(&self) -> Params {
        self.params()
    }

    fn forward(&self, batch: &Batch, train: bool) -> Result<StepOutputs> {
        let mask = batch
            .mask
            .as_ref()
            .ok_or_else(|| Error::invalid("batch", "BERT needs an attention mask"))?;
        Ok(StepOutputs::logits(self.logits(&batch.inputs, mask, train)))
    }
}
