//! `--adapter` on the causal-LM commands (`generate`, `lm score`, `lora merge`): PEFT
//! LoRA adapters attached to a [`LanguageModel`]. `--adapter DIR` (repeatable) applies
//! every adapter to every row, their outputs summed; `--adapter NAME=DIR` names them
//! for mixed batches, where each prompt says which adapter (or none) its row uses.

use std::path::PathBuf;
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use reuse_core::models::llama::CausalLm;
use reuse_core::models::lm::LanguageModel;
use reuse_peft::LoraModel;

use crate::shared::note_set_aside;

/// One `--adapter` value: `DIR` or `NAME=DIR`.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterArg {
    /// The name prompts route to (`NAME=`), if given.
    pub name: Option<String>,
    /// The PEFT adapter folder.
    pub dir: PathBuf,
}

impl FromStr for AdapterArg {
    type Err = String;

    /// `NAME=DIR` when the text before the first `=` is a plain name (letters, digits,
    /// `_`, `-`); anything else is a folder path.
    fn from_str(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("an empty adapter path".into());
        }
        if let Some((name, dir)) = s.split_once('=') {
            let plain = !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if plain {
                if dir.is_empty() {
                    return Err(format!("adapter `{name}` has no folder after `=`"));
                }
                return Ok(Self {
                    name: Some(name.to_string()),
                    dir: PathBuf::from(dir),
                });
            }
        }
        Ok(Self {
            name: None,
            dir: PathBuf::from(s),
        })
    }
}

/// The adapters attached to a model.
#[derive(Debug, Default)]
pub struct Attached {
    /// Adapter names, in the order given (unnamed ones are `adapter0`, `adapter1`, ...).
    pub names: Vec<String>,
    /// Whether they were named: rows route to one adapter each (none active otherwise);
    /// unnamed adapters are all active, their outputs summed.
    pub routed: bool,
}

/// Loads `args` onto `lm`'s linears (each checked against the base first: a module or
/// shape the model does not have is an error naming the adapter folder and the tensor,
/// and the model is unchanged). Every adapter must be for a causal LM.
pub fn attach(lm: LanguageModel, args: &[AdapterArg]) -> Result<(LanguageModel, Attached)> {
    if args.is_empty() {
        return Ok((lm, Attached::default()));
    }
    let named = args.iter().filter(|a| a.name.is_some()).count();
    if named != 0 && named != args.len() {
        bail!("name every --adapter (NAME=DIR, for mixed batches) or none (their outputs sum)");
    }
    let names: Vec<String> = args
        .iter()
        .enumerate()
        .map(|(i, a)| a.name.clone().unwrap_or_else(|| format!("adapter{i}")))
        .collect();
    for (i, n) in names.iter().enumerate() {
        if names[..i].contains(n) {
            bail!("the adapter name `{n}` is given twice (each --adapter NAME=DIR needs its own name)");
        }
    }
    let routed = named > 0;
    let lm = with_peft(lm, |mut peft| {
        for (a, name) in args.iter().zip(&names) {
            load_one(&mut peft, a, name)?;
        }
        if routed {
            peft.set_adapter(&[])?;
        } else {
            let all: Vec<&str> = names.iter().map(String::as_str).collect();
            peft.set_adapter(&all)?;
        }
        Ok(peft.into_inner())
    })?;
    Ok((lm, Attached { names, routed }))
}

/// Loads the adapter folder `a.dir` as `name`, refusing one made for another task.
fn load_one(peft: &mut LoraModel<CausalLm>, a: &AdapterArg, name: &str) -> Result<()> {
    let config = reuse_peft::LoraConfig::load(&a.dir.join(reuse_peft::io::CONFIG))
        .with_context(|| format!("cannot read adapter {}", a.dir.display()))?;
    if let Some(t) = config.task_type.as_deref().filter(|t| *t != "CAUSAL_LM") {
        bail!(
            "adapter {} has task_type {t}: a causal LM takes CAUSAL_LM adapters",
            a.dir.display()
        );
    }
    let loaded = peft
        .load_adapter(&a.dir, name)
        .with_context(|| format!("cannot apply adapter {}", a.dir.display()))?;
    note_set_aside(&a.dir, &loaded.set_aside);
    Ok(())
}

/// `lm` with its network passed through `f` as a [`LoraModel`].
fn with_peft(
    lm: LanguageModel,
    f: impl FnOnce(LoraModel<CausalLm>) -> Result<CausalLm>,
) -> Result<LanguageModel> {
    lm.map_model(|m| f(LoraModel::new(m)))
}

/// `lm` with the adapter in `dir` merged into its weights (W + scaling B A; DoRA's
/// magnitudes applied), as PEFT's `merge_and_unload`.
pub fn merged(lm: LanguageModel, dir: &std::path::Path) -> Result<LanguageModel> {
    let a = AdapterArg {
        name: None,
        dir: dir.to_path_buf(),
    };
    with_peft(lm, |mut peft| {
        load_one(&mut peft, &a, "merge")?;
        Ok(peft.merge_and_unload()?)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_plain_words_before_an_equals_sign() {
        let a: AdapterArg = "fr=/tmp/a".parse().unwrap();
        assert_eq!(a.name.as_deref(), Some("fr"));
        assert_eq!(a.dir, PathBuf::from("/tmp/a"));
        let b: AdapterArg = "/tmp/x=y".parse().unwrap();
        assert_eq!((b.name, b.dir), (None, PathBuf::from("/tmp/x=y")));
        assert!("fr=".parse::<AdapterArg>().is_err());
    }
}
