//! `LoraConfig`: Hugging Face PEFT's field names and defaults, read from and written to
//! `adapter_config.json`.
//!
//! PEFT writes about 40 keys; we read the ones LoRA needs, keep the others untouched
//! (so a config round-trips), and accept the minimal
//! `{"peft_type": "LORA", "target_modules": [...]}` with defaults for the rest.

use std::collections::BTreeMap;
use std::path::Path;

use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{config_err, PeftError, Result};

/// PEFT's `target_modules` shorthand for every linear layer but the output layer.
pub const ALL_LINEAR: &str = "all-linear";

/// `target_modules`: a list of name suffixes, or one regex that must match a whole path.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// A module matches if its path equals an entry or ends with `.entry`.
    List(Vec<String>),
    /// A module matches if the regex matches its whole path.
    Regex(String),
}

/// `init_lora_weights`: `true` (A kaiming-uniform, B = 0), `false` (both as
/// `nn.Linear`, so B is non-zero), or `"gaussian"` (A ~ N(0, 1/r), B = 0).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum InitLoraWeights {
    /// `true` / `false`.
    Bool(bool),
    /// A named scheme; only `"gaussian"` is supported for new adapters.
    Named(String),
}

/// `layers_to_transform`: one layer index or several.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Layers {
    /// One layer.
    One(i64),
    /// Several layers.
    Many(Vec<i64>),
}

/// A `str` or a list of them (`layers_pattern`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// One.
    One(String),
    /// Several.
    Many(Vec<String>),
}

fn d_lora() -> String {
    "LORA".into()
}
fn d_r() -> i64 {
    8
}
fn d_alpha() -> f64 {
    8.0
}
fn d_none() -> String {
    "none".into()
}
fn d_init() -> InitLoraWeights {
    InitLoraWeights::Bool(true)
}
fn d_true() -> bool {
    true
}

/// PEFT's `LoraConfig`, with its field names and defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// Always `"LORA"`.
    #[serde(default = "d_lora")]
    pub peft_type: String,
    /// Rank (default 8).
    #[serde(default = "d_r")]
    pub r: i64,
    /// Alpha (default 8): scaling = alpha / r, or alpha / sqrt(r) with rsLoRA.
    #[serde(default = "d_alpha", serialize_with = "ser_num")]
    pub lora_alpha: f64,
    /// Dropout on the adapter's input (default 0).
    #[serde(default)]
    pub lora_dropout: f64,
    /// Which linears get an adapter (required to create one).
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
    /// `"none"`, `"all"` or `"lora_only"`: which biases train and are saved.
    #[serde(default = "d_none")]
    pub bias: String,
    /// rsLoRA scaling alpha / sqrt(r).
    #[serde(default)]
    pub use_rslora: bool,
    /// DoRA (weight-decomposed LoRA).
    #[serde(default)]
    pub use_dora: bool,
    /// Conv1D-style transposed weights (GPT-2); must be false here.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// Initialisation scheme.
    #[serde(default = "d_init")]
    pub init_lora_weights: InitLoraWeights,
    /// Modules trained and saved in full beside the adapter (a classification head).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Rank per module: keys match a path as `(.*\.)?(key)$`.
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, i64>,
    /// Alpha per module, matched as `rank_pattern`.
    #[serde(default, serialize_with = "ser_num_map")]
    pub alpha_pattern: BTreeMap<String, f64>,
    /// Only these layer indices get adapters.
    #[serde(default)]
    pub layers_to_transform: Option<Layers>,
    /// The name of the layer list in paths (`layer` in `encoder.layer.3.`).
    #[serde(default)]
    pub layers_pattern: Option<OneOrMany>,
    /// Where the base model came from (informational).
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// PEFT task type (informational).
    #[serde(default)]
    pub task_type: Option<String>,
    /// Saved as true, as PEFT does.
    #[serde(default = "d_true")]
    pub inference_mode: bool,
    /// Version of the writer.
    #[serde(default)]
    pub peft_version: Option<String>,
    /// Keys this crate does not use, kept as they were.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

fn ser_num<S: serde::Serializer>(v: &f64, s: S) -> std::result::Result<S::Ok, S::Error> {
    // PEFT writes integral alphas as JSON integers.
    if v.fract() == 0.0 && v.abs() < 1e15 {
        s.serialize_i64(*v as i64)
    } else {
        s.serialize_f64(*v)
    }
}

fn ser_num_map<S: serde::Serializer>(
    m: &BTreeMap<String, f64>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = s.serialize_map(Some(m.len()))?;
    for (k, v) in m {
        if v.fract() == 0.0 && v.abs() < 1e15 {
            map.serialize_entry(k, &(*v as i64))?;
        } else {
            map.serialize_entry(k, v)?;
        }
    }
    map.end()
}

impl Default for LoraConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("all fields have defaults")
    }
}

/// What a config says about one module.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModuleSpec {
    /// Rank.
    pub r: i64,
    /// Alpha.
    pub alpha: f64,
    /// The output scale of the adapter.
    pub scaling: f64,
}

/// The regex a `rank_pattern` / `alpha_pattern` key stands for: PEFT matches it
/// against a module path as `(.*\.)?(key)$`.
fn pattern_regex(key: &str) -> std::result::Result<Regex, regex::Error> {
    Regex::new(&format!(r"^(.*\.)?({key})$"))
}

fn pattern_key<'a, V>(patterns: &'a BTreeMap<String, V>, path: &str) -> Option<&'a V> {
    // Keys are checked by `validate`; a bad one matches nothing here.
    patterns.iter().find_map(|(k, v)| {
        pattern_regex(k)
            .ok()
            .filter(|re| re.is_match(path))
            .map(|_| v)
    })
}

impl LoraConfig {
    /// A config with `r`, `lora_alpha` and a list of target suffixes.
    pub fn new(r: i64, lora_alpha: f64, targets: &[&str]) -> Self {
        Self {
            r,
            lora_alpha,
            target_modules: Some(TargetModules::List(
                targets.iter().map(|s| s.to_string()).collect(),
            )),
            ..Default::default()
        }
    }

    /// Reads `adapter_config.json`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| PeftError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        let cfg: Self = serde_json::from_str(&text).map_err(|e| PeftError::Config {
            path: Some(path.to_path_buf()),
            key: "adapter_config.json".into(),
            reason: e.to_string(),
        })?;
        cfg.validate().map_err(|e| match e {
            PeftError::Config { key, reason, .. } => PeftError::Config {
                path: Some(path.to_path_buf()),
                key,
                reason,
            },
            e => e,
        })?;
        Ok(cfg)
    }

    /// The JSON PEFT writes: sorted keys, indent 2.
    pub fn to_json(&self) -> String {
        // serde_json's Map is a BTreeMap here, so going through Value sorts the keys.
        let v = serde_json::to_value(self).expect("config serialises");
        serde_json::to_string_pretty(&v).expect("value serialises")
    }

    /// Checks values PEFT would reject or this crate cannot honour.
    pub fn validate(&self) -> Result<()> {
        if self.peft_type != "LORA" {
            return Err(config_err(
                "peft_type",
                format!("expected \"LORA\", found {:?}", self.peft_type),
            ));
        }
        if self.r <= 0 {
            return Err(config_err(
                "r",
                format!("must be positive, found {}", self.r),
            ));
        }
        if !self.lora_alpha.is_finite() || self.lora_alpha < 0.0 {
            return Err(config_err(
                "lora_alpha",
                format!("must be a finite number >= 0, found {}", self.lora_alpha),
            ));
        }
        for (k, r) in &self.rank_pattern {
            let key = format!("rank_pattern[{k:?}]");
            pattern_regex(k).map_err(|e| config_err(&key, format!("bad regex: {e}")))?;
            if *r <= 0 {
                return Err(config_err(
                    &key,
                    format!("rank must be positive, found {r}"),
                ));
            }
        }
        for (k, a) in &self.alpha_pattern {
            let key = format!("alpha_pattern[{k:?}]");
            pattern_regex(k).map_err(|e| config_err(&key, format!("bad regex: {e}")))?;
            if !a.is_finite() || *a < 0.0 {
                return Err(config_err(
                    &key,
                    format!("alpha must be a finite number >= 0, found {a}"),
                ));
            }
        }
        if !["none", "all", "lora_only"].contains(&self.bias.as_str()) {
            return Err(config_err(
                "bias",
                format!("expected none, all or lora_only, found {:?}", self.bias),
            ));
        }
        if self.fan_in_fan_out {
            return Err(config_err(
                "fan_in_fan_out",
                "true is not supported (no Conv1D layers here)",
            ));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(config_err(
                "lora_dropout",
                format!("must be in [0, 1), found {}", self.lora_dropout),
            ));
        }
        if let Some(TargetModules::Regex(re)) = &self.target_modules {
            Regex::new(re)
                .map_err(|e| config_err("target_modules", format!("bad regex {re:?}: {e}")))?;
            if self.layers_to_transform.is_some() {
                return Err(config_err(
                    "layers_to_transform",
                    "cannot be used when target_modules is a regex",
                ));
            }
        }
        Ok(())
    }

    /// Whether the module at `path` gets an adapter (PEFT's `check_target_module_exists`).
    pub fn targets(&self, path: &str) -> bool {
        let hit = match &self.target_modules {
            None => false,
            Some(TargetModules::Regex(re)) => {
                Regex::new(&format!("^(?:{re})$")).is_ok_and(|r| r.is_match(path))
            }
            Some(TargetModules::List(l)) => l
                .iter()
                .any(|t| path == t || path.ends_with(&format!(".{t}"))),
        };
        if !hit {
            return false;
        }
        let Some(layers) = &self.layers_to_transform else {
            return true;
        };
        let patterns: Vec<String> = match &self.layers_pattern {
            None => vec![r"[^.]*".into()],
            Some(OneOrMany::One(p)) => vec![regex::escape(p)],
            Some(OneOrMany::Many(v)) => v.iter().map(|p| regex::escape(p)).collect(),
        };
        let index = patterns.iter().find_map(|p| {
            Regex::new(&format!(r"^.*\.{p}\.(\d+)\."))
                .ok()?
                .captures(path)
                .and_then(|c| c[1].parse::<i64>().ok())
        });
        match (index, layers) {
            (Some(i), Layers::One(l)) => i == *l,
            (Some(i), Layers::Many(v)) => v.contains(&i),
            (None, _) => false,
        }
    }

    /// Rank, alpha and scaling for the module at `path` (rank/alpha patterns applied).
    pub fn module_spec(&self, path: &str) -> ModuleSpec {
        let r = *pattern_key(&self.rank_pattern, path).unwrap_or(&self.r);
        let alpha = *pattern_key(&self.alpha_pattern, path).unwrap_or(&self.lora_alpha);
        let scaling = if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        };
        ModuleSpec { r, alpha, scaling }
    }

    /// Whether `path` (a module path) is one of `modules_to_save`.
    pub fn saves_module(&self, path: &str) -> bool {
        self.modules_to_save
            .iter()
            .flatten()
            .any(|m| path == m || path.ends_with(&format!(".{m}")))
    }

    /// The pattern as written, for error messages.
    pub(crate) fn target_description(&self) -> String {
        let mut s = match &self.target_modules {
            None => "(none)".to_string(),
            Some(TargetModules::List(l)) => format!("{l:?}"),
            Some(TargetModules::Regex(r)) => format!("{r:?}"),
        };
        if let Some(l) = &self.layers_to_transform {
            s.push_str(&format!(" with layers_to_transform {l:?}"));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_peft_defaults() {
        let c: LoraConfig =
            serde_json::from_str(r#"{"peft_type":"LORA","target_modules":["query","value"]}"#)
                .unwrap();
        assert_eq!((c.r, c.lora_alpha, c.lora_dropout), (8, 8.0, 0.0));
        assert_eq!(c.bias, "none");
        assert_eq!(c.init_lora_weights, InitLoraWeights::Bool(true));
        assert!(!c.use_rslora && !c.use_dora);
        assert_eq!(c.module_spec("x.query").scaling, 1.0);
    }

    #[test]
    fn matching_follows_peft() {
        let c = LoraConfig::new(8, 16.0, &["query", "value"]);
        assert!(c.targets("encoder.layer.0.attention.self.query"));
        assert!(c.targets("query"));
        assert!(!c.targets("encoder.layer.0.attention.self.key"));
        assert!(!c.targets("encoder.layer.0.attention.self.queryx"));
        let mut r = c.clone();
        r.target_modules = Some(TargetModules::Regex(r".*\.(query|value)".into()));
        assert!(r.targets("encoder.layer.0.attention.self.value"));
        assert!(!r.targets("value.extra"));
        let mut l = c.clone();
        l.layers_to_transform = Some(Layers::Many(vec![0, 2]));
        assert!(l.targets("encoder.layer.2.attention.self.query"));
        assert!(!l.targets("encoder.layer.1.attention.self.query"));
        l.layers_pattern = Some(OneOrMany::One("layer".into()));
        assert!(l.targets("encoder.layer.0.attention.self.query"));
    }

    #[test]
    fn patterns_and_rslora() {
        let mut c = LoraConfig::new(4, 8.0, &["dense"]);
        c.use_rslora = true;
        c.rank_pattern.insert("intermediate.dense".into(), 2);
        c.alpha_pattern.insert("intermediate.dense".into(), 3.0);
        let s = c.module_spec("encoder.layer.0.intermediate.dense");
        assert_eq!((s.r, s.alpha), (2, 3.0));
        assert!((s.scaling - 3.0 / 2f64.sqrt()).abs() < 1e-12);
        let s = c.module_spec("encoder.layer.0.output.dense");
        assert_eq!((s.r, s.scaling), (4, 4.0));
    }

    #[test]
    fn json_is_sorted_keeps_unknown_keys_and_writes_integers() {
        let c: LoraConfig =
            serde_json::from_str(r#"{"target_modules":"q","zeta_option":[1],"lora_alpha":16}"#)
                .unwrap();
        let j = c.to_json();
        assert!(j.contains("\"lora_alpha\": 16,"), "{j}");
        assert!(j.contains("\"zeta_option\""));
        let keys: Vec<&str> = j
            .lines()
            .filter(|l| l.starts_with("  \""))
            .map(|l| l.split('"').nth(1).unwrap())
            .collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
        let back: LoraConfig = serde_json::from_str(&j).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn invalid_values_name_the_key() {
        for (json, key) in [
            (r#"{"peft_type":"IA3"}"#, "peft_type"),
            (r#"{"r":0}"#, "r"),
            (r#"{"bias":"some"}"#, "bias"),
            (r#"{"target_modules":"(","r":2}"#, "target_modules"),
            (r#"{"r":-3}"#, "r"),
            (r#"{"lora_alpha":-1}"#, "lora_alpha"),
            (
                r#"{"rank_pattern":{"query":4,"inter(mediate":2}}"#,
                r#"rank_pattern["inter(mediate"]"#,
            ),
            (
                r#"{"rank_pattern":{"query":0}}"#,
                r#"rank_pattern["query"]"#,
            ),
            (
                r#"{"rank_pattern":{"value":-2}}"#,
                r#"rank_pattern["value"]"#,
            ),
            (
                r#"{"alpha_pattern":{"[dense":8}}"#,
                r#"alpha_pattern["[dense"]"#,
            ),
            (
                r#"{"alpha_pattern":{"dense":-0.5}}"#,
                r#"alpha_pattern["dense"]"#,
            ),
        ] {
            let c: LoraConfig = serde_json::from_str(json).unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(&format!("invalid {key}:")), "{json}: {e}");
        }
        // Valid patterns, alpha 0 and the defaults pass.
        let ok: LoraConfig = serde_json::from_str(
            r#"{"lora_alpha":0,"rank_pattern":{"layer\\.0\\..*query":2},"alpha_pattern":{"value":4.5}}"#,
        )
        .unwrap();
        ok.validate().unwrap();
        assert_eq!(ok.module_spec("encoder.layer.0.attention.self.query").r, 2);
        // Through a file, the error names the file too.
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("adapter_config.json");
        std::fs::write(&f, r#"{"rank_pattern":{"(":2}}"#).unwrap();
        let e = LoraConfig::load(&f).unwrap_err().to_string();
        assert!(
            e.contains("adapter_config.json") && e.contains(r#"rank_pattern["("]"#),
            "{e}"
        );
    }
}
