//! Architecture descriptions: one table per model family of where its layers live by
//! Hugging Face path, what dimensions each linear reads and writes, which have biases,
//! its norms and adapter slots, its embedding table and head, and the `config.json` keys
//! for depth and width. Loading, listing and visiting walk the table, so they cannot
//! disagree; technique crates (cutting a student, growing, quantizing) walk the same
//! table instead of knowing a family by name.
//!
//! A second family costs one more [`Architecture`] value (and, when its forward pass
//! differs, the forward pass); the families here are BERT ([`BERT`]) and the Llama
//! decoder family ([`LLAMA`], [`QWEN2`], [`MISTRAL`]).

use crate::{Error, Result};

/// Which model dimension a linear reads or writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dim {
    /// `hidden_size`.
    Hidden,
    /// `intermediate_size` (the FFN's inner width).
    Inter,
    /// `num_attention_heads * head_dim`: the query projection's output.
    Heads,
    /// `num_key_value_heads * head_dim`: key and value projections' outputs
    /// (grouped-query attention).
    KvHeads,
}

/// Whether a linear has a bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bias {
    /// Always (BERT's linears, Qwen2's q/k/v).
    Always,
    /// Never.
    Never,
    /// When this boolean `config.json` key is true (Llama's `attention_bias`,
    /// `mlp_bias`; absent means false).
    Key(&'static str),
}

/// One linear of a block: its path under the block, the dimensions it reads and writes,
/// and whether it has a bias.
#[derive(Debug, Clone, Copy)]
pub struct LinearSpec {
    /// Path under `{layer_prefix}.{i}` (`self_attn.q_proj`).
    pub path: &'static str,
    /// What it reads.
    pub input: Dim,
    /// What it writes.
    pub output: Dim,
    /// Its bias.
    pub bias: Bias,
}

const fn lin(path: &'static str, input: Dim, output: Dim, bias: Bias) -> LinearSpec {
    LinearSpec {
        path,
        input,
        output,
        bias,
    }
}

/// The normalisation a family uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormKind {
    /// LayerNorm with `weight` and `bias`.
    LayerNorm,
    /// RMSNorm with `weight` only.
    RmsNorm,
}

/// One model family, as its Hugging Face checkpoints name it.
#[derive(Debug)]
pub struct Architecture {
    /// `config.json` `model_type` values this description reads.
    pub model_types: &'static [&'static str],
    /// The `architectures` entry written into a `config.json` of a full model of this
    /// family (`LlamaForCausalLM`); `None` for bare encoders.
    pub hf_class: Option<&'static str>,
    /// Blocks are `{layer_prefix}.{i}`.
    pub layer_prefix: &'static str,
    /// Each block's linears, in forward order.
    pub linears: &'static [LinearSpec],
    /// Each block's norms (path under the block), in forward order.
    pub norms: &'static [&'static str],
    /// The norm type of every norm.
    pub norm: NormKind,
    /// Each block's output slots (where bottleneck adapters attach), in forward order.
    pub slots: &'static [&'static str],
    /// The token-embedding table's full path.
    pub embedding: &'static str,
    /// The final norm (pre-norm decoders), if any.
    pub final_norm: Option<&'static str>,
    /// The output head's linear path (`lm_head`) for causal LMs; it shares the
    /// embedding table when `config.json` says `tie_word_embeddings` (then it is one
    /// parameter, listed once, under [`Architecture::embedding`]).
    pub head: Option<&'static str>,
    /// `config.json` key of the number of blocks.
    pub depth_key: &'static str,
    /// `config.json` key of the hidden width.
    pub width_key: &'static str,
    /// `config.json` key of the FFN's inner width.
    pub inter_key: &'static str,
}

/// BERT (`BertModel`): post-LN encoder layers.
pub const BERT: Architecture = Architecture {
    model_types: &["bert"],
    hf_class: None,
    layer_prefix: "encoder.layer",
    linears: &[
        lin(
            "attention.self.query",
            Dim::Hidden,
            Dim::Hidden,
            Bias::Always,
        ),
        lin("attention.self.key", Dim::Hidden, Dim::Hidden, Bias::Always),
        lin(
            "attention.self.value",
            Dim::Hidden,
            Dim::Hidden,
            Bias::Always,
        ),
        lin(
            "attention.output.dense",
            Dim::Hidden,
            Dim::Hidden,
            Bias::Always,
        ),
        lin("intermediate.dense", Dim::Hidden, Dim::Inter, Bias::Always),
        lin("output.dense", Dim::Inter, Dim::Hidden, Bias::Always),
    ],
    norms: &["attention.output.LayerNorm", "output.LayerNorm"],
    norm: NormKind::LayerNorm,
    slots: &["attention.output", "output"],
    embedding: "embeddings.word_embeddings.weight",
    final_norm: None,
    head: None,
    depth_key: "num_hidden_layers",
    width_key: "hidden_size",
    inter_key: "intermediate_size",
};

const LLAMA_LINEARS: &[LinearSpec] = &[
    lin(
        "self_attn.q_proj",
        Dim::Hidden,
        Dim::Heads,
        Bias::Key("attention_bias"),
    ),
    lin(
        "self_attn.k_proj",
        Dim::Hidden,
        Dim::KvHeads,
        Bias::Key("attention_bias"),
    ),
    lin(
        "self_attn.v_proj",
        Dim::Hidden,
        Dim::KvHeads,
        Bias::Key("attention_bias"),
    ),
    lin(
        "self_attn.o_proj",
        Dim::Heads,
        Dim::Hidden,
        Bias::Key("attention_bias"),
    ),
    lin(
        "mlp.gate_proj",
        Dim::Hidden,
        Dim::Inter,
        Bias::Key("mlp_bias"),
    ),
    lin(
        "mlp.up_proj",
        Dim::Hidden,
        Dim::Inter,
        Bias::Key("mlp_bias"),
    ),
    lin(
        "mlp.down_proj",
        Dim::Inter,
        Dim::Hidden,
        Bias::Key("mlp_bias"),
    ),
];

/// `LlamaForCausalLM`: pre-norm decoder blocks with RMSNorm, RoPE, grouped-query
/// attention and a SwiGLU FFN (SmolLM2, Llama 2/3).
pub const LLAMA: Architecture = Architecture {
    model_types: &["llama"],
    hf_class: Some("LlamaForCausalLM"),
    layer_prefix: "model.layers",
    linears: LLAMA_LINEARS,
    norms: &["input_layernorm", "post_attention_layernorm"],
    norm: NormKind::RmsNorm,
    slots: &["self_attn", "mlp"],
    embedding: "model.embed_tokens.weight",
    final_norm: Some("model.norm"),
    head: Some("lm_head"),
    depth_key: "num_hidden_layers",
    width_key: "hidden_size",
    inter_key: "intermediate_size",
};

/// `MistralForCausalLM`: Llama's blocks and names, no biases.
pub const MISTRAL: Architecture = Architecture {
    model_types: &["mistral"],
    hf_class: Some("MistralForCausalLM"),
    ..LLAMA
};

/// `Qwen2ForCausalLM`: Llama's blocks and names with biases on q, k and v.
pub const QWEN2: Architecture = Architecture {
    model_types: &["qwen2"],
    hf_class: Some("Qwen2ForCausalLM"),
    linears: &[
        lin("self_attn.q_proj", Dim::Hidden, Dim::Heads, Bias::Always),
        lin("self_attn.k_proj", Dim::Hidden, Dim::KvHeads, Bias::Always),
        lin("self_attn.v_proj", Dim::Hidden, Dim::KvHeads, Bias::Always),
        lin("self_attn.o_proj", Dim::Heads, Dim::Hidden, Bias::Never),
        lin("mlp.gate_proj", Dim::Hidden, Dim::Inter, Bias::Never),
        lin("mlp.up_proj", Dim::Hidden, Dim::Inter, Bias::Never),
        lin("mlp.down_proj", Dim::Inter, Dim::Hidden, Bias::Never),
    ],
    ..LLAMA
};

/// Every family this crate loads.
pub const FAMILIES: &[&Architecture] = &[&BERT, &LLAMA, &MISTRAL, &QWEN2];

/// The description of `config.json`'s `model_type`, or an error listing the known ones.
pub fn for_model_type(model_type: &str) -> Result<&'static Architecture> {
    FAMILIES
        .iter()
        .copied()
        .find(|a| a.model_types.contains(&model_type))
        .ok_or_else(|| {
            let known: Vec<&str> = FAMILIES
                .iter()
                .flat_map(|a| a.model_types.iter().copied())
                .collect();
            Error::invalid(
                "config.json model_type",
                format!(
                    "`{model_type}` is not a family reuse loads (known: {})",
                    known.join(", ")
                ),
            )
        })
}

/// A family's dimensions, resolved from one model's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    /// `hidden_size`.
    pub hidden: i64,
    /// `intermediate_size`.
    pub inter: i64,
    /// `num_attention_heads * head_dim`.
    pub heads: i64,
    /// `num_key_value_heads * head_dim`.
    pub kv_heads: i64,
}

impl Dims {
    /// The size of `d`.
    pub fn of(&self, d: Dim) -> i64 {
        match d {
            Dim::Hidden => self.hidden,
            Dim::Inter => self.inter,
            Dim::Heads => self.heads,
            Dim::KvHeads => self.kv_heads,
        }
    }
}

impl LinearSpec {
    /// Whether it has a bias under the model's `config.json` (`config`).
    pub fn has_bias(&self, config: &serde_json::Value) -> bool {
        match self.bias {
            Bias::Always => true,
            Bias::Never => false,
            Bias::Key(k) => config.get(k).and_then(|v| v.as_bool()).unwrap_or(false),
        }
    }

    /// `[out, in]`: its weight's shape.
    pub fn weight_shape(&self, dims: &Dims) -> [i64; 2] {
        [dims.of(self.output), dims.of(self.input)]
    }
}

impl Architecture {
    /// `(i, tail)` of a tensor named `{layer_prefix}.{i}.{tail}`; `None` otherwise.
    pub fn layer_of<'a>(&self, name: &'a str) -> Option<(usize, &'a str)> {
        let rest = name.strip_prefix(self.layer_prefix)?.strip_prefix('.')?;
        let (i, tail) = rest.split_once('.')?;
        if i.is_empty() || !i.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some((i.parse().ok()?, tail))
    }

    /// `{layer_prefix}.{i}.{tail}`.
    pub fn layer_path(&self, i: usize, tail: &str) -> String {
        format!("{}.{i}.{tail}", self.layer_prefix)
    }

    /// The linear at `tail` under a block, if it is one of the table's.
    pub fn linear(&self, tail: &str) -> Option<&LinearSpec> {
        self.linears.iter().find(|l| l.path == tail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_paths_round_trip_in_every_family() {
        for a in FAMILIES {
            let name = a.layer_path(11, &format!("{}.weight", a.linears[0].path));
            let (i, tail) = a.layer_of(&name).unwrap();
            assert_eq!(i, 11);
            assert_eq!(tail, format!("{}.weight", a.linears[0].path));
            assert_eq!(a.layer_of(a.embedding), None);
            assert_eq!(a.layer_of(&format!("{}.x.foo", a.layer_prefix)), None);
            assert_eq!(a.layer_of(&format!("{}.+1.foo", a.layer_prefix)), None);
            assert_eq!(a.layer_of(&format!("{}.2", a.layer_prefix)), None);
        }
    }

    #[test]
    fn model_types_dispatch_and_unknown_ones_are_named() {
        for (ty, class) in [
            ("llama", Some("LlamaForCausalLM")),
            ("qwen2", Some("Qwen2ForCausalLM")),
            ("mistral", Some("MistralForCausalLM")),
            ("bert", None),
        ] {
            assert_eq!(for_model_type(ty).unwrap().hf_class, class);
        }
        let e = for_model_type("gpt_neox").unwrap_err().to_string();
        assert!(e.contains("gpt_neox") && e.contains("llama"), "{e}");
    }

    #[test]
    fn biases_follow_the_config_keys() {
        let on = serde_json::json!({"attention_bias": true});
        let off = serde_json::json!({});
        let q = LLAMA.linear("self_attn.q_proj").unwrap();
        assert!(q.has_bias(&on) && !q.has_bias(&off));
        let g = LLAMA.linear("mlp.gate_proj").unwrap();
        assert!(!g.has_bias(&on));
        assert!(QWEN2.linear("self_attn.k_proj").unwrap().has_bias(&off));
        assert!(!QWEN2.linear("self_attn.o_proj").unwrap().has_bias(&on));
        let dims = Dims {
            hidden: 576,
            inter: 1536,
            heads: 576,
            kv_heads: 192,
        };
        assert_eq!(
            LLAMA
                .linear("self_attn.k_proj")
                .unwrap()
                .weight_shape(&dims),
            [192, 576]
        );
        assert_eq!(
            LLAMA.linear("mlp.down_proj").unwrap().weight_shape(&dims),
            [576, 1536]
        );
    }
}
