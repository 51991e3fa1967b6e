//! Growing a BERT encoder (Hugging Face names) wider and deeper.
//!
//! **Width** ([`widen_bert`]), all exact (max |diff| at f32 rounding):
//! - FFN inner size `I → I'`: Net2WiderNet (Chen et al. 2016,
//!   <https://arxiv.org/abs/1511.05641>): units `0..I` keep their place, each extra unit
//!   copies a seeded random one; `intermediate.dense` rows are copied and
//!   `output.dense` columns divided by the replica count. Exact for any element-wise
//!   activation.
//! - hidden size `H → k·H` (k an integer): every unit of the residual stream is copied
//!   exactly `k` times (uniform replication), so LayerNorm's mean and variance, and so
//!   its output, are those of the original, copied. Linears reading the stream divide
//!   their input columns by `k`. The grown model's hidden states are the original ones
//!   repeated `k` times (`[h, h, ..., h]`), so cosine similarities between embeddings
//!   are unchanged. A hidden size that is not a multiple cannot be reached exactly and
//!   is refused.
//! - attention heads: with `A → A'` heads of size `d → d'`, exact growth needs
//!   `d' = r·d` (r an integer) and `A' ≥ A`. The first `A` heads keep their attention:
//!   each query/key/value unit is copied `r` times within its head and queries are
//!   scaled by `1/sqrt(r)`, so `q'·k' / sqrt(d') = q·k / sqrt(d)`. The `A' - A` extra
//!   heads copy seeded existing heads and their columns of `attention.output.dense` are
//!   zero, so they add nothing until trained. Adding heads at a fixed hidden size would
//!   shrink the head size and is refused.
//! - A masked-LM head (`cls.predictions.*`, as `BertForMaskedLM` saves it) grows with
//!   the encoder: with the decoder tied to the word embeddings, the logits sum over the
//!   `k` copies of each unit, so the head's LayerNorm scale and shift are divided by `k`.
//!
//! **Depth** ([`deepen_bert`]): BERT is post-LN, so no weights make a standard layer the
//! identity (see `REFERENCE.md`). [`DepthMethod::Gated`] inserts copies of existing
//! layers behind core's residual gate `x + g (layer(x) - x)` at `g = 0` (exact; the
//! folder records the gates in `config.json` and loads in `reuse`, while Hugging Face
//! `transformers` would ignore the gate tensors). [`DepthMethod::Copy`] inserts plain
//! copies (LLaMA Pro's positions, without its zeroed projections, which do not make a
//! post-LN block the identity) and [`DepthMethod::Stack`] repeats the whole stack
//! (G_stack, Du et al. 2024, <https://arxiv.org/abs/2405.15319>); both load in
//! `transformers` and change the function: [`crate::verify`] measures by how much.

use reuse_core::models::BertConfig;
use reuse_core::{Checkpoint, Error, Result};
use tch::Tensor;

use reuse_core::models::bert::{checkpoint_prefix, layer_of, layer_path, GATE, WORD_EMBEDDINGS};

use crate::plan::{unit_map, Axis, Growth, Source};

/// What to widen; `None` keeps a size.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WidenBert {
    /// New FFN inner size (at least the current one).
    pub intermediate_size: Option<i64>,
    /// New hidden size (a multiple of the current one).
    pub hidden_size: Option<i64>,
    /// New number of attention heads (see the module docs for what is exact).
    pub heads: Option<i64>,
    /// Seed of the replica choice for extra FFN units and extra heads.
    pub seed: u64,
}

/// How [`deepen_bert`] adds layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DepthMethod {
    /// Copies of existing layers behind a residual gate at 0: exact, `reuse` format.
    Gated,
    /// Plain copies of existing layers: loads in `transformers`, approximate.
    Copy,
    /// The whole stack repeated (layer `i` copies layer `i mod L`): approximate.
    Stack,
}

impl std::str::FromStr for DepthMethod {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "gated" => Ok(Self::Gated),
            "copy" => Ok(Self::Copy),
            "stack" => Ok(Self::Stack),
            _ => Err(Error::invalid(
                "depth method",
                format!("`{s}` is not one of gated, copy, stack"),
            )),
        }
    }
}

/// What to deepen.
#[derive(Debug, Clone, PartialEq)]
pub struct DeepenBert {
    /// The new number of layers (more than the current one).
    pub layers: i64,
    /// How the new layers are made.
    pub method: DepthMethod,
    /// For `Gated` and `Copy`: insert after every `every` original layers (LLaMA Pro's
    /// grouping); by default the new layers are spread as evenly as the depth allows.
    pub every: Option<usize>,
}

/// A growth plan with the grown configuration.
#[derive(Debug)]
pub struct Grown {
    /// The grown model's configuration.
    pub config: BertConfig,
    /// Where each grown tensor comes from.
    pub growth: Growth,
    /// Whether the grown model computes the same function (before any noise).
    pub exact: bool,
    /// How many times each hidden unit is repeated in the grown hidden states (1 when
    /// the hidden size is unchanged).
    pub replicas: i64,
    /// For each grown layer, the source layer it copies and whether it is new.
    pub layer_sources: Vec<(usize, bool)>,
    /// Grown layers that carry a residual gate inserted at 0.
    pub gated_layers: Vec<usize>,
}

fn invalid(what: &str, reason: String) -> Error {
    Error::invalid(what, reason)
}

/// `bert.` when the checkpoint is a `BertFor*` model's, else empty.
fn prefix_of(ck: &Checkpoint) -> Result<&'static str> {
    checkpoint_prefix(ck).ok_or_else(|| Error::MissingTensor {
        path: ck.source().map(|p| p.to_path_buf()),
        tensor: WORD_EMBEDDINGS.into(),
    })
}

/// Axes of the grown model's dimensions.
struct Axes {
    hid_out: Axis,
    hid_in: Axis,
    inter_out: Axis,
    inter_in: Axis,
    query: Axis,
    key: Axis,
    value: Axis,
    context_in: Axis,
}

fn with_scales(index: Vec<i64>, scale: Vec<f64>, grad: Vec<f64>) -> Axis {
    Axis {
        index,
        scale,
        grad_scale: grad,
    }
}

/// Plans a wider BERT: see the module docs for each dimension.
///
/// # Errors
/// A size smaller than the current one; a hidden size that is not a multiple of the
/// current one; a head count that cannot be reached exactly (the message says what
/// would be); a checkpoint that is not a BERT encoder's (a tensor it cannot place is
/// named).
pub fn widen_bert(cfg: &BertConfig, ck: &Checkpoint, spec: &WidenBert) -> Result<Grown> {
    let prefix = prefix_of(ck)?;
    let (h, i, a) = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_attention_heads,
    );
    let h2 = spec.hidden_size.unwrap_or(h);
    let i2 = spec.intermediate_size.unwrap_or(i);
    let a2 = spec.heads.unwrap_or(a);
    for (what, old, new) in [
        ("hidden size", h, h2),
        ("intermediate size", i, i2),
        ("attention heads", a, a2),
    ] {
        if new < old {
            return Err(invalid(
                what,
                format!("growth cannot shrink it: the model has {old}, asked for {new}"),
            ));
        }
    }
    if h2 % h != 0 {
        return Err(invalid(
            "hidden size",
            format!(
                "{h2} is not a multiple of {h}: LayerNorm stays exact only when every unit is copied \
                 the same number of times (try {} or {})",
                h * (h2 / h).max(1),
                h * (h2 / h + 1)
            ),
        ));
    }
    let k = h2 / h;
    let d = h / a;
    if h2 % a2 != 0 {
        return Err(invalid(
            "attention heads",
            format!("hidden size {h2} is not a multiple of {a2} heads"),
        ));
    }
    let d2 = h2 / a2;
    if d2 % d != 0 {
        let reason = if d2 < d {
            format!(
                "{a2} heads of a hidden size of {h2} have size {d2}, smaller than the model's {d}: \
                 existing heads cannot keep their attention; grow the hidden size to {} too",
                a2 * d
            )
        } else {
            format!("the head size would go from {d} to {d2}, not a multiple of it")
        };
        return Err(invalid("attention heads", reason));
    }
    let r = d2 / d;

    // Residual stream: uniform replication.
    let hid = unit_map(h, h2, 0, true);
    let kf = k as f64;
    let hid_out = with_scales(hid.clone(), vec![1.0; hid.len()], vec![1.0 / kf; hid.len()]);
    let hid_in = with_scales(hid.clone(), vec![1.0 / kf; hid.len()], vec![1.0; hid.len()]);
    // FFN units: Net2WiderNet.
    let g = unit_map(i, i2, spec.seed, false);
    let c = Axis::gather(g.clone()).counts(i);
    let inter_out = with_scales(
        g.clone(),
        vec![1.0; g.len()],
        g.iter().map(|&u| 1.0 / c[u as usize]).collect(),
    );
    let inter_in = with_scales(
        g.clone(),
        g.iter().map(|&u| 1.0 / c[u as usize]).collect(),
        vec![1.0; g.len()],
    );
    // Heads: old heads widened r times, extra heads copy seeded heads.
    let head_src = unit_map(a, a2, spec.seed ^ 0x4845_4144, false);
    let rf = r as f64;
    let (mut idx, mut q_s, mut q_g, mut kv_g, mut ctx_s, mut ctx_g) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for (ap, &src) in head_src.iter().enumerate() {
        let old = (ap as i64) < a;
        for j in 0..d2 {
            idx.push(src * d + j % d);
            q_s.push(1.0 / rf.sqrt());
            q_g.push(if old { 1.0 / rf.sqrt() } else { 0.0 });
            kv_g.push(if old { 1.0 / rf } else { 0.0 });
            ctx_s.push(if old { 1.0 / rf } else { 0.0 });
            ctx_g.push(if old { 1.0 } else { 0.0 });
        }
    }
    let n = idx.len();
    let axes = Axes {
        hid_out,
        hid_in,
        inter_out,
        inter_in,
        query: with_scales(idx.clone(), q_s, q_g),
        key: with_scales(idx.clone(), vec![1.0; n], kv_g.clone()),
        value: with_scales(idx.clone(), vec![1.0; n], kv_g),
        context_in: with_scales(idx, ctx_s, ctx_g),
    };

    // The MLM head's LayerNorm feeds the tied decoder, which sums over the k copies of
    // each unit: its scale and shift are divided by k so the logits stay exact.
    let head_norm = with_scales(hid.clone(), vec![1.0 / kf; hid.len()], vec![1.0; hid.len()]);
    let mut tensors = Vec::new();
    for name in ck.names() {
        let head: Option<(Option<&Axis>, Option<&Axis>)> = match name {
            "cls.predictions.transform.dense.weight" => {
                Some((Some(&axes.hid_out), Some(&axes.hid_in)))
            }
            "cls.predictions.transform.dense.bias" => Some((Some(&axes.hid_out), None)),
            "cls.predictions.transform.LayerNorm.weight"
            | "cls.predictions.transform.LayerNorm.bias" => Some((Some(&head_norm), None)),
            "cls.predictions.decoder.weight" => Some((None, Some(&axes.hid_out))),
            "cls.predictions.bias" | "cls.predictions.decoder.bias" => Some((None, None)),
            _ => None,
        };
        if let Some((rows, cols)) = head {
            let dim = ck.tensor(name)?.dim();
            tensors.push((
                name.to_string(),
                Source::Tensor {
                    name: name.to_string(),
                    axes: [rows, cols]
                        .into_iter()
                        .take(dim)
                        .map(|a| a.cloned())
                        .collect(),
                },
            ));
            continue;
        }
        let Some(local) = name.strip_prefix(prefix) else {
            return Err(unplaced(ck, name));
        };
        let (rows, cols): (Option<&Axis>, Option<&Axis>) = match local {
            "embeddings.position_ids" => {
                tensors.push((
                    name.to_string(),
                    Source::Tensor {
                        name: name.to_string(),
                        axes: vec![None; ck.tensor(name)?.dim()],
                    },
                ));
                continue;
            }
            "embeddings.word_embeddings.weight"
            | "embeddings.position_embeddings.weight"
            | "embeddings.token_type_embeddings.weight" => {
                tensors.push((
                    name.to_string(),
                    Source::Tensor {
                        name: name.to_string(),
                        axes: vec![None, Some(axes.hid_out.clone())],
                    },
                ));
                continue;
            }
            "embeddings.LayerNorm.weight" | "embeddings.LayerNorm.bias" => {
                (Some(&axes.hid_out), None)
            }
            "pooler.dense.weight" => (Some(&axes.hid_out), Some(&axes.hid_in)),
            "pooler.dense.bias" => (Some(&axes.hid_out), None),
            _ => {
                let Some((_, tail)) = layer_of(local) else {
                    return Err(unplaced(ck, name));
                };
                match tail {
                    t if t == GATE => (None, None),
                    "attention.self.query.weight" => (Some(&axes.query), Some(&axes.hid_in)),
                    "attention.self.query.bias" => (Some(&axes.query), None),
                    "attention.self.key.weight" => (Some(&axes.key), Some(&axes.hid_in)),
                    "attention.self.key.bias" => (Some(&axes.key), None),
                    "attention.self.value.weight" => (Some(&axes.value), Some(&axes.hid_in)),
                    "attention.self.value.bias" => (Some(&axes.value), None),
                    "attention.output.dense.weight" => {
                        (Some(&axes.hid_out), Some(&axes.context_in))
                    }
                    "attention.output.dense.bias"
                    | "attention.output.LayerNorm.weight"
                    | "attention.output.LayerNorm.bias"
                    | "output.dense.bias"
                    | "output.LayerNorm.weight"
                    | "output.LayerNorm.bias" => (Some(&axes.hid_out), None),
                    "intermediate.dense.weight" => (Some(&axes.inter_out), Some(&axes.hid_in)),
                    "intermediate.dense.bias" => (Some(&axes.inter_out), None),
                    "output.dense.weight" => (Some(&axes.hid_out), Some(&axes.inter_in)),
                    _ => return Err(unplaced(ck, name)),
                }
            }
        };
        let t = ck.tensor(name)?;
        let ax: Vec<Option<Axis>> = [rows, cols]
            .into_iter()
            .take(t.dim())
            .map(|a| a.cloned())
            .collect();
        tensors.push((
            name.to_string(),
            Source::Tensor {
                name: name.to_string(),
                axes: ax,
            },
        ));
    }
    let mut config = cfg.clone();
    config.hidden_size = h2;
    config.intermediate_size = i2;
    config.num_attention_heads = a2;
    let depth = cfg.num_hidden_layers as usize;
    Ok(Grown {
        config,
        growth: Growth {
            tensors,
            ..Default::default()
        },
        exact: true,
        replicas: k,
        layer_sources: (0..depth).map(|l| (l, false)).collect(),
        gated_layers: Vec::new(),
    })
}

fn unplaced(ck: &Checkpoint, name: &str) -> Error {
    Error::invalid(
        "checkpoint",
        format!(
            "{}tensor `{name}` is not part of a BERT encoder (embeddings, encoder.layer.N, pooler), \
             so width growth cannot place it; grow the encoder alone",
            ck.source()
                .map(|p| format!("{}: ", p.display()))
                .unwrap_or_default()
        ),
    )
}

/// Where the new layers go for `Gated` / `Copy`: for each grown layer, the source
/// layer it copies and whether it is new (it then follows the layer it copies).
pub fn insertion_plan(
    depth: usize,
    new_depth: usize,
    every: Option<usize>,
) -> Result<Vec<(usize, bool)>> {
    let n_new = new_depth - depth;
    let every = match every {
        Some(0) => return Err(invalid("every", "must be at least 1".into())),
        Some(e) if e > depth => {
            return Err(invalid(
                "every",
                format!("{e} is more than the model's {depth} layers"),
            ))
        }
        Some(e) => e,
        None => (depth / n_new).max(1),
    };
    let slots = depth / every;
    // Inserts per slot, spread as evenly as the counts allow.
    let per_slot: Vec<usize> = (0..slots)
        .map(|s| (s + 1) * n_new / slots - s * n_new / slots)
        .collect();
    let mut out = Vec::with_capacity(new_depth);
    for l in 0..depth {
        out.push((l, false));
        if (l + 1) % every == 0 {
            let s = (l + 1) / every - 1;
            if s < slots {
                out.extend(std::iter::repeat_n((l, true), per_slot[s]));
            }
        }
    }
    debug_assert_eq!(out.len(), new_depth);
    Ok(out)
}

/// Plans a deeper BERT: see the module docs and [`DepthMethod`]. Tensors outside the
/// encoder layers (embeddings, pooler, task heads) are kept as they are.
///
/// # Errors
/// A layer count not above the current one; `every` of 0 or beyond the depth; a
/// checkpoint without a layer the config names.
pub fn deepen_bert(cfg: &BertConfig, ck: &Checkpoint, spec: &DeepenBert) -> Result<Grown> {
    let prefix = prefix_of(ck)?;
    let depth = cfg.num_hidden_layers as usize;
    if spec.layers <= depth as i64 {
        return Err(invalid(
            "layers",
            format!(
                "depth growth needs more layers than the model's {depth}, asked for {}",
                spec.layers
            ),
        ));
    }
    let new_depth = spec.layers as usize;
    let plan = match spec.method {
        DepthMethod::Stack => (0..new_depth).map(|l| (l % depth, l >= depth)).collect(),
        _ => insertion_plan(depth, new_depth, spec.every)?,
    };
    // Each source layer's tensors, in checkpoint order.
    let mut layer_tensors: Vec<Vec<(String, String)>> = vec![Vec::new(); depth];
    let mut others = Vec::new();
    for name in ck.names() {
        let local = name.strip_prefix(prefix).unwrap_or(name);
        match layer_of(local) {
            Some((l, tail)) if l < depth => {
                layer_tensors[l].push((name.to_string(), tail.to_string()))
            }
            Some((l, _)) => {
                return Err(invalid(
                    "checkpoint",
                    format!(
                        "tensor `{name}` belongs to layer {l}, but the config has {depth} layers"
                    ),
                ))
            }
            None => others.push(name.to_string()),
        }
    }
    if let Some(l) = layer_tensors.iter().position(|v| v.is_empty()) {
        return Err(Error::MissingTensor {
            path: ck.source().map(|p| p.to_path_buf()),
            tensor: format!("{prefix}{}", layer_path(l, "*")),
        });
    }
    let mut tensors = Vec::new();
    let mut gated_layers = Vec::new();
    for name in others {
        let dim = ck.tensor(&name)?.dim();
        tensors.push((
            name.clone(),
            Source::Tensor {
                name,
                axes: vec![None; dim],
            },
        ));
    }
    for (new_l, &(src, is_new)) in plan.iter().enumerate() {
        let gated = is_new && spec.method == DepthMethod::Gated;
        for (name, tail) in &layer_tensors[src] {
            if gated && tail == GATE {
                continue;
            }
            let t = ck.tensor(name)?;
            let mut axes: Vec<Option<Axis>> = vec![None; t.dim()];
            if is_new && t.dim() > 0 {
                // New layers start with fresh optimizer state.
                let mut a = Axis::identity(t.size()[0]);
                a.grad_scale.iter_mut().for_each(|g| *g = 0.0);
                axes[0] = Some(a);
            }
            tensors.push((
                format!("{prefix}{}", layer_path(new_l, tail)),
                Source::Tensor {
                    name: name.clone(),
                    axes,
                },
            ));
        }
        if gated {
            gated_layers.push(new_l);
            tensors.push((
                format!("{prefix}{}", layer_path(new_l, GATE)),
                Source::Fresh(Tensor::zeros([1], (tch::Kind::Float, tch::Device::Cpu))),
            ));
        }
    }
    let mut config = cfg.clone();
    config.num_hidden_layers = new_depth as i64;
    Ok(Grown {
        config,
        growth: Growth {
            tensors,
            ..Default::default()
        },
        exact: spec.method == DepthMethod::Gated,
        replicas: 1,
        layer_sources: plan,
        gated_layers,
    })
}
