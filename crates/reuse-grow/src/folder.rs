//! Growing a model folder into another: what `reuse grow` runs.

use std::path::Path;

use reuse_core::models::folder::{check_out, module_folders, write_model_folder};
use reuse_core::models::{Bert, BertConfig};
use reuse_core::{Checkpoint, Error, Result};
use tch::{Device, Kind};

use reuse_core::models::bert::{GATE, GATES_CONFIG_KEY};

use crate::bert::{deepen_bert, widen_bert, DeepenBert, Grown, WidenBert};
use crate::verify::{verify_growth, Verification};

/// A growth of a model folder.
#[derive(Debug, Clone, PartialEq)]
pub enum FolderGrowth {
    /// Wider (FFN, hidden, heads).
    Width(WidenBert),
    /// Deeper.
    Depth(DeepenBert),
}

/// What [`grow_folder`] did.
#[derive(Debug)]
pub struct FolderReport {
    /// The grown configuration.
    pub config: BertConfig,
    /// Whether the operator is function-preserving.
    pub exact: bool,
    /// The grown model against the original on random token ids.
    pub verification: Verification,
    /// Grown layers behind a gate at 0.
    pub gated_layers: Vec<usize>,
    /// Seconds spent planning and applying the growth (not verifying or writing).
    pub grow_seconds: f64,
}

/// Reads `src/config.json`, refusing architectures other than BERT.
pub fn load_bert_config(src: &Path) -> Result<BertConfig> {
    let path = src.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Corrupt {
        path: path.clone(),
        reason: format!("not JSON: {e}"),
    })?;
    if let Some(t) = v.get("model_type").and_then(|t| t.as_str()) {
        if t != "bert" {
            return Err(Error::invalid(
                "architecture",
                format!(
                    "{}: model_type is `{t}`; reuse grow handles BERT encoders (model_type `bert`)",
                    path.display()
                ),
            ));
        }
    }
    BertConfig::load(&path)
}

/// Plans `growth` for the model in `src` (config and checkpoint as read).
pub fn plan(cfg: &BertConfig, ck: &Checkpoint, growth: &FolderGrowth) -> Result<Grown> {
    match growth {
        FolderGrowth::Width(w) => widen_bert(cfg, ck, w),
        FolderGrowth::Depth(d) => deepen_bert(cfg, ck, d),
    }
}

/// Grows the BERT model folder `src` into `out`: `config.json` with the new sizes (and,
/// for gated layers, a `reuse_layer_gates` entry saying which layers hold
/// `encoder.layer.N.reuse_gate`), `model.safetensors` in the source's dtype, and the
/// tokenizer and sentence-transformers files copied (a pooling module's
/// `word_embedding_dimension` follows the hidden size). `noise` > 0 adds that relative
/// noise to grown tensors ([`crate::Growth::with_noise`]; the growth is then not
/// exact). The grown model is checked
/// against the original on random token ids before anything is written; `src` is only
/// read, and `out` appears whole or not at all.
///
/// # Errors
/// An architecture other than BERT; sizes the operator cannot reach (see
/// [`widen_bert`], [`deepen_bert`]); `out` not empty without `overwrite`; I/O errors
/// naming the file.
pub fn grow_folder(
    src: &Path,
    out: &Path,
    growth: &FolderGrowth,
    noise: f64,
    overwrite: bool,
) -> Result<FolderReport> {
    check_out(out, overwrite)?;
    if src
        .canonicalize()
        .ok()
        .is_some_and(|s| out.canonicalize().ok() == Some(s))
    {
        return Err(Error::invalid(
            "out",
            "is the source folder; write the grown model elsewhere",
        ));
    }
    let cfg = load_bert_config(src)?;
    let ck = Checkpoint::load(src.join("model.safetensors"), Device::Cpu)?;
    let t0 = std::time::Instant::now();
    let mut grown = plan(&cfg, &ck, growth)?;
    let new_ck = if noise > 0.0 {
        std::mem::take(&mut grown.growth)
            .with_noise(noise, 0)
            .apply(&ck)?
    } else {
        grown.growth.apply(&ck)?
    };
    let grow_seconds = t0.elapsed().as_secs_f64();

    let small = Bert::from_checkpoint(
        cfg.clone(),
        &mut ck.shallow_copy(),
        Device::Cpu,
        Kind::Float,
    )?;
    let big = Bert::from_checkpoint(
        grown.config.clone(),
        &mut new_ck.shallow_copy(),
        Device::Cpu,
        Kind::Float,
    )?;
    let verification = verify_growth(&small, &big, None, 0)?;

    let c = &grown.config;
    let mut updates = serde_json::Map::new();
    for (k, v) in [
        ("hidden_size", c.hidden_size),
        ("intermediate_size", c.intermediate_size),
        ("num_attention_heads", c.num_attention_heads),
        ("num_hidden_layers", c.num_hidden_layers),
    ] {
        updates.insert(k.into(), v.into());
    }
    if !grown.gated_layers.is_empty() {
        updates.insert(
            GATES_CONFIG_KEY.into(),
            serde_json::json!({
                "layers": grown.gated_layers,
                "tensor": format!("encoder.layer.N.{GATE}"),
                "computes": "x + g * (layer(x) - x)",
                "note": "written by reuse grow depth --method gated; Hugging Face transformers ignores these gates, load with reuse"
            }),
        );
    }
    let hidden = c.hidden_size;
    let changed_hidden = hidden != cfg.hidden_size;
    write_model_folder(src, out, &updates, &new_ck, overwrite, &mut |tmp| {
        if changed_hidden {
            for m in module_folders(tmp)? {
                set_embedding_dimension(&tmp.join(&m).join("config.json"), hidden)?;
            }
        }
        Ok(())
    })?;
    Ok(FolderReport {
        config: grown.config,
        exact: grown.exact && noise == 0.0,
        verification,
        gated_layers: grown.gated_layers,
        grow_seconds,
    })
}

/// Sets `word_embedding_dimension` in a module's `config.json` (sentence-transformers'
/// pooling module) when the file has that key.
fn set_embedding_dimension(path: &Path, hidden: i64) -> Result<()> {
    if !path.is_file() {
        return Ok(());
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Corrupt {
        path: path.to_path_buf(),
        reason: format!("not JSON: {e}"),
    })?;
    if let Some(o) = v.as_object_mut() {
        if o.contains_key("word_embedding_dimension") {
            o.insert("word_embedding_dimension".into(), hidden.into());
            let text = serde_json::to_string_pretty(&v)
                .map_err(|e| Error::invalid("config", e.to_string()))?;
            std::fs::write(path, text).map_err(|e| Error::io(path, e))?;
        }
    }
    Ok(())
}
