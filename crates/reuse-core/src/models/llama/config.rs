//! The `config.json` of the Llama family (`llama`, `mistral`, `qwen2`), in both the
//! transformers 4 spelling (`rope_theta`, `rope_scaling`) and the transformers 5 one
//! (`rope_parameters`), with the keys this crate does not use kept for round trips.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::checkpoint::write_atomic;
use crate::models::arch::{self, Architecture, Dims};
use crate::{Error, Result};

fn d_eps() -> f64 {
    1e-6
}
fn d_pos() -> i64 {
    2048
}
fn d_act() -> String {
    "silu".into()
}

/// A Llama-family `config.json`. Unknown keys are kept in `extra` and written back.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LlamaConfig {
    /// `llama`, `mistral` or `qwen2`.
    pub model_type: String,
    /// Vocabulary size.
    pub vocab_size: i64,
    /// Hidden size.
    pub hidden_size: i64,
    /// SwiGLU inner size.
    pub intermediate_size: i64,
    /// Number of decoder blocks.
    pub num_hidden_layers: i64,
    /// Query heads.
    pub num_attention_heads: i64,
    /// Key/value heads (grouped-query attention); `num_attention_heads` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<i64>,
    /// Per-head size; `hidden_size / num_attention_heads` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<i64>,
    /// RMSNorm epsilon.
    #[serde(default = "d_eps")]
    pub rms_norm_eps: f64,
    /// Longest context the model was trained for.
    #[serde(default = "d_pos")]
    pub max_position_embeddings: i64,
    /// The FFN activation (`silu`).
    #[serde(default = "d_act")]
    pub hidden_act: String,
    /// Whether `lm_head` is the embedding table.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Keys this crate reads through accessors (`rope_theta`, `rope_scaling`,
    /// `rope_parameters`, `attention_bias`, token ids) or not at all, kept for round
    /// trips.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// How RoPE's inverse frequencies are computed.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// `theta^(-2i/d)`.
    Default,
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        /// `factor`.
        factor: f64,
        /// `low_freq_factor`.
        low_freq_factor: f64,
        /// `high_freq_factor`.
        high_freq_factor: f64,
        /// `original_max_position_embeddings`.
        original_max_position_embeddings: f64,
    },
}

impl LlamaConfig {
    /// Reads a `config.json`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text).map_err(|e| Error::Corrupt {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    }

    /// Parses and validates a `config.json`'s text.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let cfg: Self = serde_json::from_str(text)
            .map_err(|e| Error::invalid("config.json", format!("not a Llama config: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The config as JSON (what [`LlamaConfig::save`] writes).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("a config serializes")
    }

    /// Writes it as pretty JSON, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| Error::invalid("config", e.to_string()))?;
        write_atomic(path, text.as_bytes())
    }

    /// The family's description.
    pub fn architecture(&self) -> &'static Architecture {
        arch::for_model_type(&self.model_type).expect("validated")
    }

    /// Key/value heads.
    pub fn kv_heads(&self) -> i64 {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Per-head size.
    pub fn head_size(&self) -> i64 {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// The dimensions the architecture table refers to.
    pub fn dims(&self) -> Dims {
        Dims {
            hidden: self.hidden_size,
            inter: self.intermediate_size,
            heads: self.num_attention_heads * self.head_size(),
            kv_heads: self.kv_heads() * self.head_size(),
        }
    }

    /// `rope_theta` (transformers 5 keeps it in `rope_parameters`); 10000 when absent.
    pub fn rope_theta(&self) -> f64 {
        self.rope_parameters()
            .and_then(|p| p.get("rope_theta"))
            .or_else(|| self.extra.get("rope_theta"))
            .and_then(|v| v.as_f64())
            .unwrap_or(10000.0)
    }

    fn rope_parameters(&self) -> Option<&serde_json::Map<String, serde_json::Value>> {
        self.extra
            .get("rope_parameters")
            .or_else(|| self.extra.get("rope_scaling"))
            .and_then(|v| v.as_object())
    }

    /// The RoPE frequency scheme: `rope_parameters` (transformers 5) or `rope_scaling`
    /// (transformers 4) of type `default` or `llama3`; other types are an error.
    pub fn rope_scaling(&self) -> Result<RopeScaling> {
        let Some(p) = self.rope_parameters() else {
            return Ok(RopeScaling::Default);
        };
        let ty = p
            .get("rope_type")
            .or_else(|| p.get("type"))
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        match ty {
            "default" => Ok(RopeScaling::Default),
            "llama3" => {
                let f = |k: &str| {
                    p.get(k).and_then(|v| v.as_f64()).ok_or_else(|| {
                        Error::invalid(
                            "config.json rope_scaling",
                            format!("rope_type llama3 needs a number `{k}`"),
                        )
                    })
                };
                Ok(RopeScaling::Llama3 {
                    factor: f("factor")?,
                    low_freq_factor: f("low_freq_factor")?,
                    high_freq_factor: f("high_freq_factor")?,
                    original_max_position_embeddings: f("original_max_position_embeddings")?,
                })
            }
            other => Err(Error::invalid(
                "config.json rope_scaling",
                format!("rope_type `{other}` is not supported (default and llama3 are)"),
            )),
        }
    }

    /// A token id key (`bos_token_id`, `eos_token_id`, `pad_token_id`) as a list (an
    /// integer, a list of integers, or absent/null).
    pub fn token_ids(&self, key: &str) -> Vec<i64> {
        match self.extra.get(key) {
            Some(serde_json::Value::Number(n)) => n.as_i64().into_iter().collect(),
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_i64()).collect(),
            _ => Vec::new(),
        }
    }

    /// The padding token: `pad_token_id`, else the first `eos_token_id` (as transformers'
    /// `generate` falls back), else `None`.
    pub fn pad_token_id(&self) -> Option<i64> {
        let pad = self.token_ids("pad_token_id");
        pad.first()
            .or(self.token_ids("eos_token_id").first())
            .copied()
    }

    pub(crate) fn validate(&self) -> Result<()> {
        arch::for_model_type(&self.model_type)?;
        let bad = |what: &str, why: String| Err(Error::invalid(format!("config.json {what}"), why));
        for (k, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.kv_heads()),
            ("head_dim", self.head_size()),
        ] {
            if v <= 0 {
                return bad(k, format!("must be positive, found {v}"));
            }
        }
        if self.num_hidden_layers < 0 {
            return bad(
                "num_hidden_layers",
                format!("must be >= 0, found {}", self.num_hidden_layers),
            );
        }
        if self.num_attention_heads % self.kv_heads() != 0 {
            return bad(
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads {}",
                    self.kv_heads(),
                    self.num_attention_heads
                ),
            );
        }
        if self.head_size() % 2 != 0 {
            return bad(
                "head_dim",
                format!("RoPE needs an even head size, found {}", self.head_size()),
            );
        }
        if self.hidden_act != "silu" {
            return bad(
                "hidden_act",
                format!(
                    "the Llama family's FFN is SwiGLU (`silu`), found `{}`",
                    self.hidden_act
                ),
            );
        }
        if self
            .extra
            .get("use_sliding_window")
            .and_then(|v| v.as_bool())
            == Some(true)
        {
            return bad(
                "use_sliding_window",
                "sliding-window attention is not supported".into(),
            );
        }
        self.rope_scaling()?;
        Ok(())
    }

    /// A tiny configuration for fast tests: `layers` blocks, hidden `hidden`, 4 query
    /// heads and 2 key/value heads.
    pub fn tiny(vocab_size: i64, hidden: i64, layers: i64) -> Self {
        let mut extra = BTreeMap::new();
        extra.insert("rope_theta".into(), serde_json::json!(10000.0));
        extra.insert("bos_token_id".into(), serde_json::json!(1));
        extra.insert("eos_token_id".into(), serde_json::json!(2));
        Self {
            model_type: "llama".into(),
            vocab_size,
            hidden_size: hidden,
            intermediate_size: hidden * 2,
            num_hidden_layers: layers,
            num_attention_heads: 4,
            num_key_value_heads: Some(2),
            head_dim: None,
            rms_norm_eps: 1e-6,
            max_position_embeddings: 256,
            hidden_act: "silu".into(),
            tie_word_embeddings: false,
            extra,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_rope_spellings_are_read() {
        let v5 = r#"{"model_type":"llama","vocab_size":10,"hidden_size":8,"intermediate_size":16,
            "num_hidden_layers":1,"num_attention_heads":2,
            "rope_parameters":{"rope_theta":100000.0,"rope_type":"default"}}"#;
        let c = LlamaConfig::from_json_str(v5).unwrap();
        assert_eq!(c.rope_theta(), 100000.0);
        assert_eq!(c.rope_scaling().unwrap(), RopeScaling::Default);
        assert_eq!(c.kv_heads(), 2);
        let v4 = r#"{"model_type":"llama","vocab_size":10,"hidden_size":8,"intermediate_size":16,
            "num_hidden_layers":1,"num_attention_heads":2,"rope_theta":500000.0,
            "rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,
            "high_freq_factor":4.0,"original_max_position_embeddings":8192}}"#;
        let c = LlamaConfig::from_json_str(v4).unwrap();
        assert_eq!(c.rope_theta(), 500000.0);
        assert!(
            matches!(c.rope_scaling().unwrap(), RopeScaling::Llama3 { factor, .. } if factor == 8.0)
        );
    }

    #[test]
    fn bad_configs_are_named() {
        let base = |extra: &str| {
            format!(
                r#"{{"model_type":"llama","vocab_size":10,"hidden_size":8,"intermediate_size":16,
                "num_hidden_layers":1,"num_attention_heads":4{extra}}}"#
            )
        };
        for (extra, needle) in [
            (r#","num_key_value_heads":3"#, "num_key_value_heads"),
            (
                r#","rope_scaling":{"rope_type":"yarn","factor":2.0}"#,
                "yarn",
            ),
            (r#","hidden_act":"gelu""#, "hidden_act"),
            (r#","head_dim":3"#, "head_dim"),
        ] {
            let e = LlamaConfig::from_json_str(&base(extra))
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{extra}: {e}");
        }
        let e = LlamaConfig::from_json_str(&base("").replace("llama", "gpt2"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("gpt2"), "{e}");
    }
}
