//! [`LoraModel`]: any reuse model with named LoRA adapters, managed as PEFT's
//! `PeftModel` / `LoraModel` manage them (add, set active, delete, merge, unmerge,
//! merge-and-unload, mixed-adapter batches).

use std::collections::BTreeMap;

use reuse_core::data::Batch;
use reuse_core::trainer::{StepOutputs, Trainable};
use reuse_core::ForwardOptions;
use reuse_core::{Checkpoint, Error as CoreError, Model, Params};
use tch::{Device, Kind, Tensor};

use crate::config::{LoraConfig, TargetModules, ALL_LINEAR};
use crate::error::{PeftError, Result};
use crate::lora::LoraLayer;

/// The adapter name that means "no adapter" in a mixed batch.
pub const BASE: &str = "__base__";

#[derive(Debug)]
pub(crate) struct AdapterState {
    pub(crate) config: LoraConfig,
    /// Linear paths carrying this adapter.
    pub(crate) modules: Vec<String>,
    /// This adapter's copy of its `modules_to_save` values while another adapter's copy
    /// is live in the model.
    pub(crate) parked: Option<Checkpoint>,
    /// `modules_to_save` tensors a loaded file held for modules this model lacks, by
    /// parameter name: kept aside and written back by `save_adapter`.
    pub(crate) set_aside: Option<Checkpoint>,
    /// Base biases a load overwrote, with the values they had before; `delete_adapter`
    /// puts them back.
    pub(crate) replaced_biases: Option<Checkpoint>,
    /// Order of creation, to restore overwritten biases correctly when several
    /// adapters replaced the same bias.
    pub(crate) seq: u64,
}

/// A model with LoRA adapters. The base weights stay frozen; only the active adapters
/// (and their `modules_to_save`, and biases when `bias` says so) train.
#[derive(Debug)]
pub struct LoraModel<M: Model> {
    /// The wrapped model; its linears carry the adapters as delta slots.
    pub model: M,
    pub(crate) adapters: BTreeMap<String, AdapterState>,
    active: Vec<String>,
    /// Whose `modules_to_save` values are live in the model.
    live_modules: Option<String>,
    /// The next [`AdapterState::seq`].
    next_seq: u64,
}

fn adapter_err(name: &str, reason: impl Into<String>) -> PeftError {
    PeftError::Adapter {
        name: name.into(),
        reason: reason.into(),
    }
}

/// The module path of a parameter name (`classifier.weight` -> `classifier`).
fn module_of(param: &str) -> &str {
    param.rsplit_once('.').map(|(m, _)| m).unwrap_or("")
}

impl<M: Model> LoraModel<M> {
    /// Wraps a model with no adapters yet.
    pub fn new(model: M) -> Self {
        Self {
            model,
            adapters: BTreeMap::new(),
            active: Vec::new(),
            live_modules: None,
            next_seq: 0,
        }
    }

    /// Adapter names, sorted.
    pub fn adapter_names(&self) -> Vec<&str> {
        self.adapters.keys().map(String::as_str).collect()
    }

    /// The active adapters.
    pub fn active_adapters(&self) -> &[String] {
        &self.active
    }

    /// The config of adapter `name`.
    pub fn config(&self, name: &str) -> Result<&LoraConfig> {
        Ok(&self.state(name)?.config)
    }

    /// The linear paths that carry adapter `name`.
    pub fn adapter_modules(&self, name: &str) -> Result<&[String]> {
        Ok(&self.state(name)?.modules)
    }

    pub(crate) fn live_modules_is(&self, name: &str) -> bool {
        self.live_modules.as_deref() == Some(name)
    }

    fn state(&self, name: &str) -> Result<&AdapterState> {
        self.adapters.get(name).ok_or_else(|| {
            adapter_err(
                name,
                format!("no such adapter; have {:?}", self.adapter_names()),
            )
        })
    }

    /// Adds a new adapter `name` on every linear that `config` targets, initialised as
    /// PEFT does. The first adapter becomes active (and trainable); later ones wait for
    /// [`LoraModel::set_adapter`]. Returns the adapted linear paths.
    pub fn add_adapter(&mut self, name: &str, mut config: LoraConfig) -> Result<Vec<String>> {
        config.validate()?;
        self.check_new_name(name)?;
        self.expand_all_linear(&mut config);
        let paths = self.targets(&config)?;
        let mut err = None;
        self.model.visit_linears(&mut |path, l| {
            if err.is_some() || !paths.iter().any(|p| p == path) {
                return;
            }
            let spec = config.module_spec(path);
            // Dequantized when the base is quantized (QLoRA): LoRA needs its shape,
            // dtype and device, DoRA its column norms.
            let res = LoraLayer::new(
                &l.dense_weight(),
                spec.r,
                spec.scaling,
                config.lora_dropout,
                &config.init_lora_weights,
                config.use_dora,
            )
            .and_then(|layer| Ok(l.add_delta(name, Box::new(layer))?));
            if let Err(e) = res {
                err = Some(e);
            }
        });
        if let Some(e) = err {
            self.detach(name);
            return Err(e);
        }
        let seq = self.next_seq();
        self.adapters.insert(
            name.to_string(),
            AdapterState {
                config,
                modules: paths.clone(),
                parked: None,
                set_aside: None,
                replaced_biases: None,
                seq,
            },
        );
        self.park_new_modules(name)?;
        if self.active.is_empty() {
            self.set_adapter(&[name])?;
        } else {
            self.apply_active();
        }
        Ok(paths)
    }

    /// Refuses a name that is reserved, already used, or equal to a segment of one of the
    /// model's parameter or buffer names (`query`, `output`, `dense`, `0`, `weight`...):
    /// an adapter's parameters are named `<linear path>.<adapter>.lora_A.weight`, so
    /// such a name would be ambiguous in every tool that selects parameters by name.
    pub(crate) fn check_new_name(&self, name: &str) -> Result<()> {
        if name == BASE || name.is_empty() || name.contains('.') {
            return Err(adapter_err(
                name,
                "reserved or invalid name (no dots, not __base__)",
            ));
        }
        if self.adapters.contains_key(name) {
            return Err(adapter_err(name, "already exists"));
        }
        let clash = self
            .model
            .named_parameters()
            .into_iter()
            .chain(self.model.named_buffers())
            .map(|(n, _)| n)
            .find(|n| n.split('.').any(|seg| seg == name));
        if let Some(n) = clash {
            return Err(adapter_err(
                name,
                format!(
                    "the name is a path segment of the model (e.g. in `{n}`); \
                     choose a name that is not part of any parameter name"
                ),
            ));
        }
        Ok(())
    }

    pub(crate) fn next_seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    /// Replaces `target_modules: "all-linear"` (PEFT's shorthand, as a string or a
    /// one-entry list) by what PEFT writes in its place: the sorted last path segments of
    /// every linear but the output layer (`lm_head`; for `SEQ_CLS`, also `classifier`
    /// and `score`). Any other value is left as it is.
    pub fn expand_all_linear(&mut self, config: &mut LoraConfig) {
        let all_linear = match &config.target_modules {
            Some(TargetModules::Regex(r)) => r == ALL_LINEAR,
            Some(TargetModules::List(l)) => l.len() == 1 && l[0] == ALL_LINEAR,
            None => false,
        };
        if !all_linear {
            return;
        }
        let mut heads = vec!["lm_head"];
        if config.task_type.as_deref() == Some("SEQ_CLS") {
            heads.extend(["classifier", "score"]);
        }
        let mut names: Vec<String> = self
            .model
            .linear_paths()
            .iter()
            .map(|p| p.rsplit('.').next().unwrap_or(p).to_string())
            .filter(|n| !heads.contains(&n.as_str()))
            .collect();
        names.sort();
        names.dedup();
        config.target_modules = Some(TargetModules::List(names));
    }

    /// The linear paths `config` targets, or an error listing the model's linears.
    /// (`"all-linear"` is expanded first, see [`LoraModel::expand_all_linear`].)
    pub fn targets(&mut self, config: &LoraConfig) -> Result<Vec<String>> {
        let mut expanded = config.clone();
        self.expand_all_linear(&mut expanded);
        let config = &expanded;
        let all = self.model.linear_paths();
        let paths: Vec<String> = all
            .iter()
            .filter(|p| config.targets(p) && !config.saves_module(p))
            .cloned()
            .collect();
        if paths.is_empty() {
            return Err(PeftError::NoTarget {
                pattern: config.target_description(),
                available: all.join(", "),
            });
        }
        Ok(paths)
    }

    /// Parameter names of the model's `modules_to_save` for `config`.
    fn saved_params(&self, config: &LoraConfig) -> Vec<(String, Tensor)> {
        self.model
            .named_parameters()
            .into_iter()
            .filter(|(n, _)| config.saves_module(module_of(n)))
            .collect()
    }

    /// A new adapter gets its own copy of its `modules_to_save`, starting from the
    /// values live now.
    fn park_new_modules(&mut self, name: &str) -> Result<()> {
        let cfg = &self.adapters[name].config;
        let saved = self.saved_params(cfg);
        if saved.is_empty() {
            return Ok(());
        }
        let ck = Params::new(saved).to_checkpoint();
        self.adapters.get_mut(name).expect("inserted").parked = Some(ck);
        Ok(())
    }

    /// Puts adapter `name`'s copy of its `modules_to_save` into the model, parking the
    /// copy of the adapter whose values were live.
    fn swap_modules_to(&mut self, name: &str) -> Result<()> {
        if self.live_modules.as_deref() == Some(name) {
            return Ok(());
        }
        if let Some(prev) = self.live_modules.take() {
            if let Some(st) = self.adapters.get(&prev) {
                let saved = self.saved_params(&st.config);
                let ck = Params::new(saved).to_checkpoint();
                self.adapters.get_mut(&prev).expect("exists").parked = Some(ck);
            }
        }
        let st = &self.adapters[name];
        if let Some(ck) = &st.parked {
            let saved = self.saved_params(&st.config);
            Params::new(saved).load_checkpoint(ck)?;
        }
        self.live_modules = Some(name.to_string());
        Ok(())
    }

    /// Makes exactly `names` active (their outputs sum) and trainable; everything else
    /// is frozen. With one active adapter its `modules_to_save` copy goes live.
    pub fn set_adapter(&mut self, names: &[&str]) -> Result<()> {
        for n in names {
            self.state(n)?;
        }
        if let [one] = names {
            self.swap_modules_to(one)?;
        }
        self.active = names.iter().map(|s| s.to_string()).collect();
        self.apply_active();
        Ok(())
    }

    pub(crate) fn apply_active(&mut self) {
        let active: Vec<&str> = self.active.iter().map(String::as_str).collect();
        self.model.visit_linears(&mut |_, l| l.set_active(&active));
        self.mark_trainable();
    }

    /// The tensors of adapter `name`'s deltas, found by structure: the linears that
    /// carry a delta named `name`, and that delta's own parameters.
    fn delta_tensors(&mut self, name: &str) -> Vec<Tensor> {
        let mut v = Vec::new();
        self.model.visit_linears(&mut |_, l| {
            if let Some(d) = l.delta(name) {
                v.extend(d.named_parameters().into_iter().map(|(_, t)| t));
            }
        });
        v
    }

    /// Freezes everything but the active adapters' parameters, their modules_to_save and
    /// the biases their `bias` setting trains (PEFT's `_mark_only_adapters_as_trainable`).
    fn mark_trainable(&mut self) {
        let params = self.model.params();
        params.freeze();
        for name in self.active.clone() {
            for t in self.delta_tensors(&name) {
                let _ = t.set_requires_grad(true);
            }
            let st = &self.adapters[&name];
            for (n, t) in params.iter() {
                let module = module_of(n);
                let on = st.config.saves_module(module)
                    || (n.ends_with(".bias")
                        && match st.config.bias.as_str() {
                            "all" => true,
                            "lora_only" => st.modules.iter().any(|m| m == module),
                            _ => false,
                        });
                if on {
                    let _ = t.set_requires_grad(true);
                }
            }
        }
    }

    fn detach(&mut self, name: &str) {
        self.model.visit_linears(&mut |_, l| {
            let _ = l.remove_delta(name);
        });
    }

    /// Removes adapter `name` (unmerging it first if merged). Base biases that loading
    /// it overwrote get back the values they had before (when a later adapter
    /// overwrote the same bias, that adapter restores them when it is deleted).
    pub fn delete_adapter(&mut self, name: &str) -> Result<()> {
        self.state(name)?;
        let old: Vec<(String, Tensor)> = self.adapters[name]
            .replaced_biases
            .iter()
            .flat_map(|c| c.iter().map(|(k, v)| (k.to_string(), v.shallow_clone())))
            .collect();
        if !old.is_empty() {
            let seq = self.adapters[name].seq;
            let mut restore = Checkpoint::new();
            for (k, v) in old {
                let k = k.as_str();
                // The earliest later adapter that overwrote this bias inherits the value.
                let heir = self
                    .adapters
                    .iter()
                    .filter(|(n, st)| {
                        n.as_str() != name
                            && st.seq > seq
                            && st
                                .replaced_biases
                                .as_ref()
                                .is_some_and(|c| c.get(k).is_some())
                    })
                    .min_by_key(|(_, st)| st.seq)
                    .map(|(n, _)| n.clone());
                match heir {
                    Some(h) => {
                        let c = self.adapters.get_mut(&h).expect("found above");
                        c.replaced_biases
                            .as_mut()
                            .expect("checked above")
                            .insert(k.to_string(), v.shallow_clone());
                    }
                    None => {
                        restore.insert(k.to_string(), v.shallow_clone());
                    }
                }
            }
            if !restore.is_empty() {
                let names: Vec<String> = restore.names().map(String::from).collect();
                let params = self.model.params();
                let targets = Params::new(
                    params
                        .iter()
                        .filter(|(n, _)| names.iter().any(|k| k == n))
                        .map(|(n, t)| (n.to_string(), t.shallow_clone()))
                        .collect(),
                );
                targets.load_checkpoint(&restore)?;
            }
        }
        if self.live_modules.as_deref() == Some(name) {
            self.live_modules = None;
        }
        self.detach(name);
        self.adapters.remove(name);
        self.active.retain(|a| a != name);
        self.apply_active();
        Ok(())
    }

    /// Merges adapters into the base weights (`W += delta`); forward then skips them.
    pub fn merge_adapter(&mut self, names: &[&str]) -> Result<()> {
        for n in names {
            self.state(n)?;
        }
        let mut err = None;
        self.model.visit_linears(&mut |_, l| {
            for n in names {
                if err.is_none() && l.delta(n).is_some() {
                    if let Err(e) = l.merge(n) {
                        err = Some(e);
                    }
                }
            }
        });
        err.map_or(Ok(()), |e| Err(e.into()))
    }

    /// Unmerges every merged adapter, restoring the base weights.
    pub fn unmerge_adapter(&mut self) -> Result<()> {
        let names: Vec<String> = self.adapters.keys().cloned().collect();
        let mut err = None;
        self.model.visit_linears(&mut |_, l| {
            for n in &names {
                if l.is_merged(n).unwrap_or(false) {
                    if let Err(e) = l.unmerge(n) {
                        err.get_or_insert(e);
                    }
                }
            }
        });
        err.map_or(Ok(()), |e| Err(e.into()))
    }

    /// Merges the active adapters and drops every adapter: the plain model, with every
    /// parameter trainable again as a fresh model's would be.
    pub fn merge_and_unload(mut self) -> Result<M> {
        let mut err = None;
        self.model.visit_linears(&mut |_, l| {
            if let Err(e) = l.merge_and_unload() {
                err.get_or_insert(e);
            }
        });
        if let Some(e) = err {
            return Err(e.into());
        }
        self.model.params().unfreeze();
        Ok(self.model)
    }

    /// Runs `f` with each sample routed to its own adapter (`adapter_names[i]` for
    /// sample i, [`BASE`] for none): the base output is computed once and each
    /// adapter's output is added to its samples only. No adapter may be merged.
    ///
    /// `f` returns a `reuse_core::Result` so that errors from the forward pass surface
    /// here: in particular more adapter names than the batch has samples is an error
    /// (from the first routed linear), never a panic. Routing ends whatever `f` returns.
    pub fn with_mixed_batch<T>(
        &mut self,
        adapter_names: &[&str],
        device: Device,
        f: impl FnOnce(&M) -> reuse_core::Result<T>,
    ) -> Result<T> {
        for n in adapter_names {
            if *n != BASE {
                self.state(n)?;
            }
        }
        route_samples(&mut self.model, adapter_names, device, f)
    }

    /// The model with its adapters still attached (unmerged, active as set), without
    /// the adapter registry: for inference with adapters applied.
    pub fn into_inner(self) -> M {
        self.model
    }

    /// Parameters that train now.
    pub fn trainable_parameters(&self) -> Params {
        self.model.params().trainable()
    }

    /// Values in adapter `name`'s own tensors (LoRA A, B and DoRA magnitudes of the
    /// linears that carry it; 0 for an unknown name).
    pub fn adapter_parameter_count(&mut self, name: &str) -> usize {
        self.delta_tensors(name).iter().map(Tensor::numel).sum()
    }

    /// Casts every adapter's tensors to `kind` (e.g. to match a bf16 base).
    pub fn adapters_to_kind(&mut self, kind: Kind) {
        self.model.visit_linears(&mut |_, l| {
            for n in l
                .delta_names()
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
            {
                if let Some(d) = l
                    .delta_mut(&n)
                    .and_then(|d| d.as_any_mut().downcast_mut::<LoraLayer>())
                {
                    let rg = |t: &Tensor| {
                        t.detach()
                            .to_kind(kind)
                            .set_requires_grad(t.requires_grad())
                    };
                    d.a = rg(&d.a);
                    d.b = rg(&d.b);
                    if let Some(m) = &d.magnitude {
                        d.magnitude = Some(rg(m));
                    }
                }
            }
        });
    }
}

/// [`LoraModel::with_mixed_batch`] on a model whose adapters are attached to its linears
/// but no longer in a `LoraModel` (after [`LoraModel::into_inner`]): runs `f` with sample
/// `i` routed to the delta named `adapter_names[i]` ([`BASE`] for none). A name that no
/// linear carries is an error naming it. Routing ends whatever `f` returns.
pub fn route_samples<M: Model, T>(
    model: &mut M,
    adapter_names: &[&str],
    device: Device,
    f: impl FnOnce(&M) -> reuse_core::Result<T>,
) -> Result<T> {
    let mut groups: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
    for (i, n) in adapter_names.iter().enumerate() {
        if *n != BASE {
            groups.entry(n).or_default().push(i as i64);
        }
    }
    let mut carried: BTreeMap<&str, bool> = groups.keys().map(|n| (*n, false)).collect();
    model.visit_linears(&mut |_, l| {
        for (n, seen) in carried.iter_mut() {
            *seen |= l.delta(n).is_some();
        }
    });
    if let Some((n, _)) = carried.iter().find(|(_, seen)| !**seen) {
        return Err(adapter_err(
            n,
            "no linear of the model carries this adapter",
        ));
    }
    let routes: Vec<(String, Tensor)> = groups
        .into_iter()
        .map(|(n, ix)| (n.to_string(), Tensor::from_slice(&ix).to_device(device)))
        .collect();
    let mut err: Option<CoreError> = None;
    model.visit_linears(&mut |_, l| {
        let mine: Vec<(String, Tensor)> = routes
            .iter()
            .filter(|(n, _)| l.delta(n).is_some())
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect();
        if let Err(e) = l.set_routing(Some(mine)) {
            err.get_or_insert(e);
        }
    });
    let out = if err.is_none() { Some(f(model)) } else { None };
    model.visit_linears(&mut |_, l| {
        let _ = l.set_routing(None);
    });
    match (err, out) {
        (Some(e), _) => Err(e.into()),
        (None, Some(o)) => o.map_err(|e| {
            PeftError::Core(CoreError::Invalid {
                what: "mixed-adapter batch".into(),
                reason: format!(
                    "{} adapter names were given (one per sample): {e}",
                    adapter_names.len()
                ),
            })
        }),
        (None, None) => Err(PeftError::Core(CoreError::Invalid {
            what: "mixed-adapter batch".into(),
            reason: "routing could not be set".into(),
        })),
    }
}

/// A `LoraModel` is the model it wraps, for techniques that walk layers by path.
impl<M: Model> Model for LoraModel<M> {
    fn visit_linears(&mut self, f: &mut dyn FnMut(&str, &mut reuse_core::Linear)) {
        self.model.visit_linears(f)
    }
    fn visit_block_outputs(&mut self, f: &mut dyn FnMut(&str, &mut reuse_core::OutputSlots)) {
        self.model.visit_block_outputs(f)
    }
    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        self.model.named_parameters()
    }
    fn named_buffers(&self) -> Vec<(String, Tensor)> {
        self.model.named_buffers()
    }
}

impl<M: Trainable> Trainable for LoraModel<M> {
    fn forward(
        &self,
        batch: &Batch,
        train: bool,
        opts: ForwardOptions,
    ) -> reuse_core::Result<StepOutputs> {
        Trainable::forward(&self.model, batch, train, opts)
    }
    fn loss(&self, out: &StepOutputs, batch: &Batch) -> reuse_core::Result<Tensor> {
        self.model.loss(out, batch)
    }
    /// The wrapped model's own figure (token NLL for a causal LM), adapters applied.
    fn evaluate(
        &self,
        data: &dyn reuse_core::data::BatchSource,
        batch_size: usize,
        device: Device,
    ) -> reuse_core::Result<Option<reuse_core::Evaluation>> {
        self.model.evaluate(data, batch_size, device)
    }
    fn predicts_next_token(&self) -> bool {
        self.model.predicts_next_token()
    }
}
