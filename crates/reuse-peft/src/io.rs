//! Hugging Face PEFT's adapter files, both ways.
//!
//! `adapter_model.safetensors` holds `base_model.model.<path>.lora_A.weight` `[r, in]`,
//! `...lora_B.weight` `[out, r]` and, for DoRA, `...lora_magnitude_vector` `[out]`
//! (no adapter name in the keys), `modules_to_save` and trained biases under their
//! plain path, metadata `{"format": "pt"}`. `adapter_config.json` is the
//! [`LoraConfig`] as JSON with sorted keys.
//!
//! Loading accepts exactly those keys: its LoRA tensors, its `modules_to_save` and the
//! biases its `bias` setting names. Any other key is an error naming it (an adapter
//! never overwrites other base weights), and `modules_to_save` the model lacks are set
//! aside ([`LoadedAdapter::set_aside`]) and written back when the adapter is saved.

use std::collections::BTreeMap;
use std::path::Path;

use reuse_core::checkpoint::write_atomic;
use reuse_core::{Checkpoint, Model, Params};
use tch::{Device, Tensor};

use crate::config::LoraConfig;
use crate::error::{PeftError, Result};
use crate::lora::LoraLayer;
use crate::model::{AdapterState, LoraModel};

/// Key prefix PEFT uses for every tensor.
pub const PREFIX: &str = "base_model.model.";
/// The weights file of an adapter folder.
pub const WEIGHTS: &str = "adapter_model.safetensors";
/// The config file of an adapter folder.
pub const CONFIG: &str = "adapter_config.json";

fn mismatch(path: &Path, reason: String) -> PeftError {
    PeftError::Mismatch {
        path: path.to_path_buf(),
        reason,
    }
}

/// What [`LoraModel::load_adapter`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadedAdapter {
    /// The linear paths that now carry the adapter.
    pub modules: Vec<String>,
    /// `modules_to_save` modules of the file that the model does not have (e.g.
    /// `classifier` when a classification adapter is loaded into a bare encoder): not
    /// loaded, kept with the adapter and written back by [`LoraModel::save_adapter`].
    pub set_aside: Vec<String>,
    /// Base biases the load wrote (its `bias` setting), by parameter name; deleting the
    /// adapter puts their previous values back.
    pub biases: Vec<String>,
}

#[derive(Default)]
struct ModuleTensors {
    a: Option<Tensor>,
    b: Option<Tensor>,
    magnitude: Option<Tensor>,
}

impl<M: Model> LoraModel<M> {
    /// Writes adapter `name` as a PEFT adapter folder (`adapter_config.json`,
    /// `adapter_model.safetensors`), each file atomically.
    pub fn save_adapter(&mut self, name: &str, dir: &Path) -> Result<()> {
        let st = self.adapters.get(name).ok_or_else(|| PeftError::Adapter {
            name: name.into(),
            reason: "no such adapter".into(),
        })?;
        let config = st.config.clone();
        let modules = st.modules.clone();
        let set_aside: Vec<(String, Tensor)> = st
            .set_aside
            .iter()
            .flat_map(|c| c.iter().map(|(n, t)| (n.to_string(), t.copy())))
            .collect();
        let parked = st.parked.as_ref().map(|c| {
            c.iter()
                .map(|(n, t)| (n.to_string(), t.copy()))
                .collect::<Vec<_>>()
        });
        let mut ck = Checkpoint::new();
        ck.set_metadata("format", "pt");
        self.model.visit_linears(&mut |path, l| {
            if let Some(d) = l
                .delta(name)
                .and_then(|d| d.as_any().downcast_ref::<LoraLayer>())
            {
                ck.insert(format!("{PREFIX}{path}.lora_A.weight"), d.a.detach().copy());
                ck.insert(format!("{PREFIX}{path}.lora_B.weight"), d.b.detach().copy());
                if let Some(m) = &d.magnitude {
                    ck.insert(
                        format!("{PREFIX}{path}.lora_magnitude_vector"),
                        m.detach().copy(),
                    );
                }
            }
        });
        let live = self.live_modules_is(name);
        for (n, t) in self.model.named_parameters() {
            let module = n.rsplit_once('.').map(|m| m.0).unwrap_or("");
            let bias = n.ends_with(".bias")
                && match config.bias.as_str() {
                    "all" => true,
                    "lora_only" => modules.iter().any(|m| m == module),
                    _ => false,
                };
            if config.saves_module(module) {
                let v = match (&parked, live) {
                    (Some(p), false) => p.iter().find(|(pn, _)| pn == &n).map(|(_, t)| t.copy()),
                    _ => None,
                };
                ck.insert(
                    format!("{PREFIX}{n}"),
                    v.unwrap_or_else(|| t.detach().copy()),
                );
            } else if bias {
                ck.insert(format!("{PREFIX}{n}"), t.detach().copy());
            }
        }
        for (n, t) in set_aside {
            ck.insert(format!("{PREFIX}{n}"), t);
        }
        std::fs::create_dir_all(dir).map_err(|e| PeftError::Io {
            path: dir.to_path_buf(),
            source: e,
        })?;
        let mut config = config;
        config.inference_mode = true;
        ck.save(dir.join(WEIGHTS))?;
        write_atomic(&dir.join(CONFIG), config.to_json().as_bytes())?;
        Ok(())
    }

    /// Reads a PEFT adapter folder into a new adapter `name`. Every tensor is checked
    /// against the base model (module exists, shapes fit the config's rank) before
    /// anything is attached: on error the model is unchanged.
    ///
    /// A load writes only its own LoRA tensors, its `modules_to_save` and the biases its
    /// `bias` setting names (`"all"`: any bias; `"lora_only"`: biases of the linears it
    /// adapts); any other key is an error naming it. Biases written into the base are
    /// remembered and put back by [`LoraModel::delete_adapter`]. A `modules_to_save`
    /// module the model does not have (a classification head loaded into a bare encoder)
    /// is set aside, not an error: [`LoadedAdapter::set_aside`] names it, and
    /// [`LoraModel::save_adapter`] writes it back unchanged.
    pub fn load_adapter(&mut self, dir: &Path, name: &str) -> Result<LoadedAdapter> {
        let config = LoraConfig::load(&dir.join(CONFIG))?;
        let wpath = dir.join(WEIGHTS);
        let ck = Checkpoint::load(&wpath, Device::Cpu)?;
        self.load_adapter_from(config, &ck, &wpath, name)
    }

    /// [`LoraModel::load_adapter`] from a config and tensors already in memory; `file` is
    /// named in errors.
    pub fn load_adapter_from(
        &mut self,
        config: LoraConfig,
        ck: &Checkpoint,
        file: &Path,
        name: &str,
    ) -> Result<LoadedAdapter> {
        config.validate()?;
        self.check_new_name(name)?;
        // Shapes of the model's linears and parameters.
        let mut linears: BTreeMap<String, (i64, i64, tch::Kind, Device)> = BTreeMap::new();
        self.model.visit_linears(&mut |p, l| {
            // The weight as the forward sees it (dequantized on a quantized base).
            let w = l.dense_weight();
            linears.insert(
                p.to_string(),
                (l.out_features(), l.in_features(), w.kind(), w.device()),
            );
        });
        let params: BTreeMap<String, Tensor> = self.model.named_parameters().into_iter().collect();
        let mut modules: BTreeMap<String, ModuleTensors> = BTreeMap::new();
        let mut plain: Vec<(&str, String, Tensor)> = Vec::new();
        for (key, t) in ck.iter() {
            let k = key.strip_prefix(PREFIX).unwrap_or(key);
            let (module, which) = if let Some(m) = k.strip_suffix(".lora_A.weight") {
                (m, 0)
            } else if let Some(m) = k.strip_suffix(".lora_B.weight") {
                (m, 1)
            } else if let Some(m) = k.strip_suffix(".lora_magnitude_vector") {
                (m, 2)
            } else {
                plain.push((key, k.to_string(), t.shallow_clone()));
                continue;
            };
            if !linears.contains_key(module) {
                let avail: Vec<&String> = linears.keys().take(12).collect();
                return Err(mismatch(
                    file,
                    format!("`{key}`: the base model has no linear layer `{module}` (it has {avail:?}...)"),
                ));
            }
            let e = modules.entry(module.to_string()).or_default();
            let slot = match which {
                0 => &mut e.a,
                1 => &mut e.b,
                _ => &mut e.magnitude,
            };
            *slot = Some(t.shallow_clone());
        }
        if modules.is_empty() {
            return Err(mismatch(
                file,
                "no lora_A / lora_B tensors in the file".into(),
            ));
        }
        // Every other key must be a modules_to_save tensor or a bias the config trains.
        let mut saved: Vec<(String, Tensor)> = Vec::new();
        let mut aside: Vec<(String, Tensor)> = Vec::new();
        let mut aside_modules: Vec<String> = Vec::new();
        let mut biases: Vec<(String, Tensor)> = Vec::new();
        for (key, k, t) in plain {
            let module = module_of(&k);
            let fits = |p: &Tensor| -> Result<()> {
                if p.size() != t.size() {
                    return Err(mismatch(
                        file,
                        format!(
                            "`{key}` has shape {:?}, the base model's is {:?}",
                            t.size(),
                            p.size()
                        ),
                    ));
                }
                Ok(())
            };
            if config.saves_module(module) {
                if let Some(p) = params.get(&k) {
                    fits(p)?;
                    saved.push((k, t));
                } else if params.keys().any(|n| module_of(n) == module) {
                    return Err(mismatch(
                        file,
                        format!("`{key}`: the model's module `{module}` (in modules_to_save) has no parameter `{k}`"),
                    ));
                } else {
                    if !aside_modules.iter().any(|m| m == module) {
                        aside_modules.push(module.to_string());
                    }
                    aside.push((k, t));
                }
                continue;
            }
            let bias_ok = k.ends_with(".bias")
                && match config.bias.as_str() {
                    "all" => true,
                    "lora_only" => modules.contains_key(module),
                    _ => false,
                };
            if !bias_ok {
                return Err(mismatch(
                    file,
                    format!(
                        "`{key}` is not a LoRA tensor of this adapter, nor in its modules_to_save \
                         ({:?}), nor a bias its `bias` setting ({:?}) trains: an adapter may not \
                         overwrite other base weights",
                        config.modules_to_save.as_deref().unwrap_or_default(),
                        config.bias
                    ),
                ));
            }
            let p = params.get(&k).ok_or_else(|| {
                mismatch(
                    file,
                    format!("`{key}` names no parameter of the base model"),
                )
            })?;
            fits(p)?;
            biases.push((k, t));
        }
        let mut layers = Vec::new();
        for (module, mt) in &modules {
            let (out, inp, kind, device) = linears[module];
            let spec = config.module_spec(module);
            let key = |s: &str| format!("{PREFIX}{module}.{s}");
            let a = mt
                .a
                .as_ref()
                .ok_or_else(|| mismatch(file, format!("`{}` is missing", key("lora_A.weight"))))?;
            let b = mt
                .b
                .as_ref()
                .ok_or_else(|| mismatch(file, format!("`{}` is missing", key("lora_B.weight"))))?;
            for (k, t, want) in [
                (key("lora_A.weight"), a, vec![spec.r, inp]),
                (key("lora_B.weight"), b, vec![out, spec.r]),
            ] {
                if t.size() != want {
                    return Err(mismatch(
                        file,
                        format!("`{k}` has shape {:?}, expected {want:?} (rank {} from the config, base layer [{out}, {inp}])", t.size(), spec.r),
                    ));
                }
            }
            let magnitude = match (&mt.magnitude, config.use_dora) {
                (Some(m), true) if m.size() == [out] => Some(m.to_kind(kind).to_device(device)),
                (Some(m), true) => {
                    return Err(mismatch(
                        file,
                        format!(
                            "`{}` has shape {:?}, expected [{out}]",
                            key("lora_magnitude_vector"),
                            m.size()
                        ),
                    ))
                }
                (None, true) => {
                    return Err(mismatch(
                        file,
                        format!(
                            "use_dora is set but `{}` is missing",
                            key("lora_magnitude_vector")
                        ),
                    ))
                }
                (Some(_), false) => {
                    return Err(mismatch(
                        file,
                        format!(
                            "`{}` present but use_dora is false",
                            key("lora_magnitude_vector")
                        ),
                    ))
                }
                (None, false) => None,
            };
            let mv = |t: &Tensor| t.to_kind(kind).to_device(device).set_requires_grad(true);
            layers.push((
                module.clone(),
                LoraLayer {
                    a: mv(a),
                    b: mv(b),
                    scaling: spec.scaling,
                    dropout: config.lora_dropout,
                    magnitude: magnitude.map(|m| m.set_requires_grad(true)),
                },
            ));
        }
        // Everything fits: attach.
        let paths: Vec<String> = layers.iter().map(|(m, _)| m.clone()).collect();
        let mut by_path: BTreeMap<String, LoraLayer> = layers.into_iter().collect();
        let mut err = None;
        self.model.visit_linears(&mut |p, l| {
            if let Some(layer) = by_path.remove(p) {
                if let Err(e) = l.add_delta(name, Box::new(layer)) {
                    err.get_or_insert(e);
                }
            }
        });
        if let Some(e) = err {
            self.model.visit_linears(&mut |_, l| {
                let _ = l.remove_delta(name);
            });
            return Err(e.into());
        }
        // Biases trained with the adapter are loaded into the model, remembering the
        // values they replace; modules_to_save values become this adapter's copy.
        let mut replaced = None;
        if !biases.is_empty() {
            let targets = Params::new(
                biases
                    .iter()
                    .map(|(n, _)| (n.clone(), params[n].shallow_clone()))
                    .collect(),
            );
            let before = targets.to_checkpoint();
            let mut src = Checkpoint::new();
            for (n, t) in &biases {
                src.insert(n.clone(), t.shallow_clone());
            }
            if let Err(e) = targets.load_checkpoint(&src) {
                // Put back what may have been written, then drop the deltas.
                let _ = targets.load_checkpoint(&before);
                self.model.visit_linears(&mut |_, l| {
                    let _ = l.remove_delta(name);
                });
                return Err(e.into());
            }
            replaced = Some(before);
        }
        let to_ck = |v: Vec<(String, Tensor)>| {
            (!v.is_empty()).then(|| {
                let mut c = Checkpoint::new();
                for (n, t) in v {
                    c.insert(n, t);
                }
                c
            })
        };
        let bias_names: Vec<String> = biases.iter().map(|(n, _)| n.clone()).collect();
        let parked = to_ck(saved);
        let set_aside = to_ck(aside);
        let seq = self.next_seq();
        let first = self.adapters.is_empty();
        self.adapters.insert(
            name.to_string(),
            AdapterState {
                config,
                modules: paths.clone(),
                parked,
                set_aside,
                replaced_biases: replaced,
                seq,
            },
        );
        if first {
            self.set_adapter(&[name])?;
        } else {
            let active: Vec<String> = self.active_adapters().to_vec();
            let a: Vec<&str> = active.iter().map(String::as_str).collect();
            self.set_adapter(&a)?;
        }
        Ok(LoadedAdapter {
            modules: paths,
            set_aside: aside_modules,
            biases: bias_names,
        })
    }
}

fn module_of(param: &str) -> &str {
    param.rsplit_once('.').map(|(m, _)| m).unwrap_or("")
}
