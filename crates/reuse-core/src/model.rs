//! What a model is to the rest of the workspace: [`Model`], how techniques find layers
//! (every model addresses its linears and block outputs by the dotted path Hugging Face
//! uses, `encoder.layer.3.attention.self.query`), and the forward contract the trainer
//! and techniques call ([`Trainable`], [`ForwardOptions`], [`StepOutputs`]).

use std::any::Any;

use tch::Tensor;

use crate::data::{Batch, BatchSource};
use crate::loss::cross_entropy;
use crate::{Error, Linear, Params, Result};

/// A change to a block's output (bottleneck adapters, ...), implemented by technique
/// crates and attached to a model's [`OutputSlots`].
pub trait OutputDelta: Send {
    /// The new block output, given the block's input and its output.
    fn forward(&self, input: &Tensor, output: &Tensor, train: bool) -> Result<Tensor>;
    /// Its parameters by local name.
    fn named_parameters(&self) -> Vec<(String, Tensor)>;
    /// For downcasting to the concrete type.
    fn as_any(&self) -> &dyn Any;
}

/// Named [`OutputDelta`]s applied, in order, to one block output.
#[derive(Default)]
pub struct OutputSlots {
    slots: Vec<(String, Box<dyn OutputDelta>, bool)>,
}

impl std::fmt::Debug for OutputSlots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.slots.iter().map(|s| &s.0))
            .finish()
    }
}

impl OutputSlots {
    /// Attaches a delta under `name`, active.
    pub fn add(&mut self, name: &str, delta: Box<dyn OutputDelta>) -> Result<()> {
        if self.slots.iter().any(|s| s.0 == name) {
            return Err(Error::invalid(
                "output delta name",
                format!("`{name}` is already attached"),
            ));
        }
        self.slots.push((name.to_string(), delta, true));
        Ok(())
    }

    /// Removes the delta `name`.
    pub fn remove(&mut self, name: &str) -> Option<Box<dyn OutputDelta>> {
        let i = self.slots.iter().position(|s| s.0 == name)?;
        Some(self.slots.remove(i).1)
    }

    /// Makes exactly `names` active.
    pub fn set_active(&mut self, names: &[&str]) {
        for s in &mut self.slots {
            s.2 = names.contains(&s.0.as_str());
        }
    }

    /// Names attached.
    pub fn names(&self) -> Vec<&str> {
        self.slots.iter().map(|s| s.0.as_str()).collect()
    }

    /// Applies every active delta in order.
    pub fn apply(&self, input: &Tensor, output: Tensor, train: bool) -> Result<Tensor> {
        self.slots
            .iter()
            .filter(|s| s.2)
            .try_fold(output, |out, s| s.1.forward(input, &out, train))
    }

    /// Parameters as `<delta name>.<local name>`.
    pub fn named_parameters(&self) -> Vec<(String, Tensor)> {
        self.slots
            .iter()
            .flat_map(|(n, d, _)| {
                d.named_parameters()
                    .into_iter()
                    .map(move |(p, t)| (format!("{n}.{p}"), t))
            })
            .collect()
    }
}

/// A model whose layers techniques can find by Hugging Face path.
pub trait Model {
    /// Calls `f` on every linear with its dotted path, in forward order.
    fn visit_linears(&mut self, f: &mut dyn FnMut(&str, &mut Linear));
    /// Calls `f` on every block output slot with its dotted path. Default: none.
    fn visit_block_outputs(&mut self, _f: &mut dyn FnMut(&str, &mut OutputSlots)) {}
    /// Every parameter (frozen ones too) by dotted name.
    fn named_parameters(&self) -> Vec<(String, Tensor)>;
    /// Tensors saved with the model that are not parameters (quantized weights, scales,
    /// zero points, masks), by dotted name. Default: none.
    fn named_buffers(&self) -> Vec<(String, Tensor)> {
        Vec::new()
    }

    /// [`Model::visit_linears`] with a visitor that can fail: stops at the first error
    /// and returns it.
    fn try_visit_linears(
        &mut self,
        f: &mut dyn FnMut(&str, &mut Linear) -> Result<()>,
    ) -> Result<()> {
        let mut err = None;
        self.visit_linears(&mut |p, l| {
            if err.is_none() {
                if let Err(e) = f(p, l) {
                    err = Some(e);
                }
            }
        });
        err.map_or(Ok(()), Err)
    }

    /// [`Model::named_parameters`] as [`Params`].
    fn params(&self) -> Params {
        Params::new(self.named_parameters())
    }

    /// The dotted paths of every linear.
    fn linear_paths(&mut self) -> Vec<String> {
        let mut v = Vec::new();
        self.visit_linears(&mut |p, _| v.push(p.to_string()));
        v
    }

    /// The dotted paths of every block output slot.
    fn block_output_paths(&mut self) -> Vec<String> {
        let mut v = Vec::new();
        self.visit_block_outputs(&mut |p, _| v.push(p.to_string()));
        v
    }
}

/// A linear's tensors under `prefix`: its weight and bias only, or (with `with_deltas`)
/// its delta parameters too. What every model's tensor list walks.
pub(crate) fn linear_tensors(prefix: &str, l: &Linear, with_deltas: bool) -> Vec<(String, Tensor)> {
    let v = l.named_parameters();
    let v = if with_deltas {
        v
    } else {
        v.into_iter()
            .filter(|(n, _)| n == "weight" || n == "bias")
            .collect()
    };
    prefixed(prefix, v)
}

/// A checkpoint of detached copies of `base` then `buffers`, marked `format: pt`: what a
/// model folder's `model.safetensors` holds.
pub(crate) fn state_dict_of(
    base: Vec<(String, Tensor)>,
    buffers: Vec<(String, Tensor)>,
) -> crate::Checkpoint {
    let mut ck = crate::Checkpoint::new();
    tch::no_grad(|| {
        for (n, t) in base.into_iter().chain(buffers) {
            ck.insert(n, t.detach().copy());
        }
    });
    ck.set_metadata("format", "pt");
    ck
}

/// Checks that `input_ids` is i64 `[batch, seq]`; returns `(batch, seq)`.
pub(crate) fn check_input_ids(input_ids: &Tensor) -> Result<(i64, i64)> {
    let size = input_ids.size();
    if size.len() != 2 || input_ids.kind() != tch::Kind::Int64 {
        return Err(Error::invalid(
            "input_ids",
            format!(
                "expected i64 [batch, seq], found {:?} {size:?}",
                input_ids.kind()
            ),
        ));
    }
    Ok((size[0], size[1]))
}

/// Prefixes local parameter names: `prefix.name`.
pub(crate) fn prefixed(prefix: &str, v: Vec<(String, Tensor)>) -> Vec<(String, Tensor)> {
    v.into_iter()
        .map(|(n, t)| (format!("{prefix}.{n}"), t))
        .collect()
}

/// Element-wise activations by their Hugging Face names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// max(0, x).
    Relu,
    /// Exact (erf) GELU, as `hidden_act: "gelu"`.
    Gelu,
    /// tanh-approximated GELU (`gelu_new`).
    GeluNew,
    /// tanh.
    Tanh,
    /// logistic sigmoid.
    Sigmoid,
    /// x * sigmoid(x) (`swish`/`silu`).
    Silu,
    /// The identity.
    Identity,
}

impl Activation {
    /// Applies the activation.
    pub fn apply(self, x: &Tensor) -> Tensor {
        match self {
            Activation::Relu => x.relu(),
            Activation::Gelu => x.gelu("none"),
            Activation::GeluNew => x.gelu("tanh"),
            Activation::Tanh => x.tanh(),
            Activation::Sigmoid => x.sigmoid(),
            Activation::Silu => x.silu(),
            Activation::Identity => x.shallow_clone(),
        }
    }

    /// Parses a Hugging Face `hidden_act` name.
    pub fn from_hf(name: &str) -> Result<Self> {
        Ok(match name {
            "relu" => Activation::Relu,
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => Activation::GeluNew,
            "tanh" => Activation::Tanh,
            "sigmoid" => Activation::Sigmoid,
            "silu" | "swish" => Activation::Silu,
            "linear" | "identity" => Activation::Identity,
            other => {
                return Err(Error::invalid(
                    "activation",
                    format!("`{other}` is not one of relu, gelu, gelu_new, tanh, sigmoid, silu, swish, linear"),
                ))
            }
        })
    }
}

/// What a forward pass should return besides logits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ForwardOptions {
    /// Hidden states of every layer (embedding output first).
    pub hidden_states: bool,
    /// Attention probabilities of every layer.
    pub attentions: bool,
    /// The pooled representation the head sees.
    pub pooled: bool,
    /// Every position's logits, from models that otherwise leave them out: a causal
    /// LM's loss reads its final hidden state through the head in chunks
    /// ([`StepOutputs::last_hidden`]), so `[tokens, vocab]` logits exist only when a
    /// technique asks (distillation does). Classifiers always return logits.
    pub logits: bool,
}

impl ForwardOptions {
    /// Everything either asks for.
    pub fn union(self, o: ForwardOptions) -> ForwardOptions {
        ForwardOptions {
            hidden_states: self.hidden_states || o.hidden_states,
            attentions: self.attentions || o.attentions,
            pooled: self.pooled || o.pooled,
            logits: self.logits || o.logits,
        }
    }
}

/// What a model's forward pass returns to the trainer and to techniques.
#[derive(Debug)]
pub struct StepOutputs {
    /// Class logits `[b, c]`, or token logits `[b, t, vocab]` (causal LMs: only when
    /// [`ForwardOptions::logits`] asks; otherwise an undefined tensor, and the loss reads
    /// `last_hidden`).
    pub logits: Tensor,
    /// The final hidden state `[b, t, hidden]` a causal LM's head reads, when the model
    /// computes its loss from it.
    pub last_hidden: Option<Tensor>,
    /// Hidden states, when asked for and the model has them (feature distillation).
    pub hidden_states: Vec<Tensor>,
    /// Attention probabilities `[b, heads, t, t]` per layer, when asked for.
    pub attentions: Vec<Tensor>,
    /// The pooled features `[b, h]` the head sees, when asked for.
    pub pooled: Option<Tensor>,
}

impl StepOutputs {
    /// Outputs with logits only.
    pub fn logits(logits: Tensor) -> Self {
        Self {
            logits,
            last_hidden: None,
            hidden_states: Vec::new(),
            attentions: Vec::new(),
            pooled: None,
        }
    }
}

/// A model the trainer can train: a [`Model`] (its parameters by name) with a forward
/// pass over batches and a task loss.
pub trait Trainable: Model {
    /// Forward pass for a batch; `train` enables dropout; `opts` asks for extra outputs.
    fn forward(&self, batch: &Batch, train: bool, opts: ForwardOptions) -> Result<StepOutputs>;
    /// The task loss. Default: cross-entropy of the logits against the labels.
    fn loss(&self, out: &StepOutputs, batch: &Batch) -> Result<Tensor> {
        cross_entropy(&out.logits, &batch.labels)
    }
    /// Whether the logits at position `j` predict the label at position `j + 1` (a
    /// causal LM's next-token objective), so that a technique comparing per-token
    /// outputs with another model's (distillation) scores positions `0..t-1` against
    /// the labelled targets `labels[:, 1:]`. Default: false (logits and labels line up).
    fn predicts_next_token(&self) -> bool {
        false
    }
    /// The figure the trainer reports on an eval set (eval mode, no gradient), when the
    /// model chooses its own: causal LMs report mean token NLL. `None` (the default):
    /// accuracy, for classifiers. Callers use [`crate::trainer::evaluate`].
    fn evaluate(
        &self,
        _data: &dyn BatchSource,
        _batch_size: usize,
        _device: tch::Device,
    ) -> Result<Option<Evaluation>> {
        Ok(None)
    }
}

/// What [`Trainable::evaluate`] measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Evaluation {
    /// Fraction of examples classified right (higher is better).
    Accuracy(f64),
    /// Mean negative log-likelihood of the labelled tokens, in nats (lower is better),
    /// over `tokens` tokens; perplexity is its exponential.
    TokenNll {
        /// Mean NLL.
        nll: f64,
        /// Labelled tokens it averages over.
        tokens: usize,
    },
}

impl Evaluation {
    /// The figure: accuracy, or mean token NLL.
    pub fn value(&self) -> f64 {
        match *self {
            Evaluation::Accuracy(a) => a,
            Evaluation::TokenNll { nll, .. } => nll,
        }
    }
    /// Its name in reports: `accuracy` or `token_nll`.
    pub fn name(&self) -> &'static str {
        match self {
            Evaluation::Accuracy(_) => "accuracy",
            Evaluation::TokenNll { .. } => "token_nll",
        }
    }
}
