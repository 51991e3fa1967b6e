//! BERT's `config.json`, with its defaults and the keys kept for round trips.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::checkpoint::write_atomic;
use crate::model::Activation;
use crate::{Error, Result};

fn d_gelu() -> String {
    "gelu".into()
}
fn d_drop() -> f64 {
    0.1
}
fn d_pos() -> i64 {
    512
}
fn d_types() -> i64 {
    2
}
fn d_eps() -> f64 {
    1e-12
}

/// A Hugging Face BERT `config.json`. Unknown keys are kept (and written back by
/// [`BertConfig::save`]) but otherwise ignored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BertConfig {
    /// Vocabulary size.
    pub vocab_size: i64,
    /// Hidden size.
    pub hidden_size: i64,
    /// Number of encoder layers.
    pub num_hidden_layers: i64,
    /// Attention heads per layer.
    pub num_attention_heads: i64,
    /// FFN inner size.
    pub intermediate_size: i64,
    /// FFN activation (`gelu` is the exact erf GELU).
    #[serde(default = "d_gelu")]
    pub hidden_act: String,
    /// Dropout on hidden states.
    #[serde(default = "d_drop")]
    pub hidden_dropout_prob: f64,
    /// Dropout on attention probabilities.
    #[serde(default = "d_drop")]
    pub attention_probs_dropout_prob: f64,
    /// Longest sequence the position table covers.
    #[serde(default = "d_pos")]
    pub max_position_embeddings: i64,
    /// Number of token types.
    #[serde(default = "d_types")]
    pub type_vocab_size: i64,
    /// LayerNorm epsilon.
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    /// Padding token id.
    #[serde(default)]
    pub pad_token_id: i64,
    /// Keys this crate does not use, kept for round trips.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl BertConfig {
    /// Reads a `config.json`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let cfg: Self = serde_json::from_str(&text).map_err(|e| Error::Corrupt {
            path: path.to_path_buf(),
            reason: format!("not a BERT config: {e}"),
        })?;
        cfg.validate().map_err(|e| Error::Corrupt {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Ok(cfg)
    }

    /// Writes it as pretty JSON, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| Error::invalid("config", e.to_string()))?;
        write_atomic(path, text.as_bytes())
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.num_attention_heads <= 0 || self.hidden_size % self.num_attention_heads != 0 {
            return Err(Error::invalid(
                "config",
                format!(
                    "hidden_size {} is not a multiple of num_attention_heads {}",
                    self.hidden_size, self.num_attention_heads
                ),
            ));
        }
        Activation::from_hf(&self.hidden_act)?;
        Ok(())
    }

    /// A tiny configuration for fast tests: `layers` layers, hidden `hidden`, 4 heads.
    pub fn tiny(vocab_size: i64, hidden: i64, layers: i64) -> Self {
        Self {
            vocab_size,
            hidden_size: hidden,
            num_hidden_layers: layers,
            num_attention_heads: 4,
            intermediate_size: hidden * 4,
            hidden_act: "gelu".into(),
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.1,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            pad_token_id: 0,
            extra: BTreeMap::new(),
        }
    }
}
