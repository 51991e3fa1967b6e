//! BERT's parts: LayerNorm, embeddings, one encoder layer, and the tables of their
//! Hugging Face paths that loading, listing and visiting walk.

use tch::Tensor;

use crate::model::OutputSlots;
use crate::models::arch::{LinearSpec, BERT};
use crate::{Checkpoint, Linear};

/// LayerNorm with `weight` / `bias`.
#[derive(Debug)]
pub struct LayerNorm {
    /// Scale.
    pub weight: Tensor,
    /// Shift.
    pub bias: Tensor,
    /// Epsilon.
    pub eps: f64,
}

impl LayerNorm {
    /// Normalises the last dimension of `x`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.layer_norm(
            [self.weight.size()[0]],
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
            true,
        )
    }
    /// `weight` and `bias` (shallow handles).
    pub fn named(&self) -> Vec<(String, Tensor)> {
        vec![
            ("weight".into(), self.weight.shallow_clone()),
            ("bias".into(), self.bias.shallow_clone()),
        ]
    }
}

/// Word + position + token-type embeddings, then LayerNorm.
#[derive(Debug)]
pub struct BertEmbeddings {
    /// `word_embeddings.weight` `[vocab, hidden]`.
    pub word_embeddings: Tensor,
    /// `position_embeddings.weight` `[max_pos, hidden]`.
    pub position_embeddings: Tensor,
    /// `token_type_embeddings.weight` `[types, hidden]`.
    pub token_type_embeddings: Tensor,
    /// `LayerNorm`.
    pub layer_norm: LayerNorm,
}

/// The linears of one encoder layer, in forward order (path under `encoder.layer.{i}`,
/// dimensions, bias): BERT's architecture table ([`crate::models::arch::BERT`]).
/// Loading, the tensor list and the visitor all walk it (with [`BertLayer::linears`]),
/// so they cannot disagree.
pub(crate) const LAYER_LINEARS: &[LinearSpec] = BERT.linears;
/// The LayerNorms of one encoder layer, in forward order.
pub(crate) const LAYER_NORMS: &[&str] = BERT.norms;
/// The block-output slots of one layer: where bottleneck adapters attach.
pub(crate) const LAYER_SLOTS: &[&str] = BERT.slots;
/// The embedding tables, under `embeddings.`.
pub(crate) const EMBEDDINGS: [&str; 3] = [
    "word_embeddings",
    "position_embeddings",
    "token_type_embeddings",
];
/// The word-embedding table's path in a `BertModel` checkpoint.
pub const WORD_EMBEDDINGS: &str = BERT.embedding;

/// The prefix of a checkpoint's encoder tensors: `""` for a `BertModel`'s, `"bert."` for
/// a `BertFor*` model's (as transformers saves them); `None` when it holds no BERT
/// word-embedding table under either.
pub fn checkpoint_prefix(ck: &Checkpoint) -> Option<&'static str> {
    ["", "bert."]
        .into_iter()
        .find(|p| ck.get(&format!("{p}{WORD_EMBEDDINGS}")).is_some())
}

/// `(i, tail)` of a tensor named `encoder.layer.{i}.{tail}`; `None` for any other name.
pub fn layer_of(name: &str) -> Option<(usize, &str)> {
    BERT.layer_of(name)
}

/// The name of tensor `tail` of encoder layer `i`: `encoder.layer.{i}.{tail}`.
pub fn layer_path(i: usize, tail: &str) -> String {
    BERT.layer_path(i, tail)
}

/// The layer gate's one name: its parameter, `encoder.layer.{i}.reuse_gate`.
pub const GATE: &str = "reuse_gate";

/// The `config.json` key under which a folder with gated layers lists them (and names
/// the [`GATE`] tensor), so a reader knows why transformers ignores a tensor.
pub const GATES_CONFIG_KEY: &str = "reuse_layer_gates";

/// One post-LN encoder layer.
#[derive(Debug)]
pub struct BertLayer {
    /// `attention.self.query`.
    pub query: Linear,
    /// `attention.self.key`.
    pub key: Linear,
    /// `attention.self.value`.
    pub value: Linear,
    /// `attention.output.dense`.
    pub attention_output: Linear,
    /// `attention.output.LayerNorm`.
    pub attention_norm: LayerNorm,
    /// `intermediate.dense`.
    pub intermediate: Linear,
    /// `output.dense`.
    pub output: Linear,
    /// `output.LayerNorm`.
    pub output_norm: LayerNorm,
    /// Slots on the attention output (before residual + LayerNorm).
    pub attention_slots: OutputSlots,
    /// Slots on the FFN output (before residual + LayerNorm).
    pub output_slots: OutputSlots,
    /// Optional residual gate `g` (`[1]`, parameter `encoder.layer.{i}.reuse_gate`): the
    /// layer computes `x + g * (layer(x) - x)`. With `g = 0` the layer is the exact
    /// identity, which no weights of a post-LN BERT layer can achieve; depth growth
    /// inserts layers this way and trains `g` up from 0. Absent by default, and then
    /// free: the forward pass is the plain layer.
    pub gate: Option<Tensor>,
}

impl BertLayer {
    /// The linears in [`LAYER_LINEARS`] order.
    pub(crate) fn linears(&self) -> [&Linear; 6] {
        [
            &self.query,
            &self.key,
            &self.value,
            &self.attention_output,
            &self.intermediate,
            &self.output,
        ]
    }

    /// The linears in [`LAYER_LINEARS`] order, mutably.
    pub(crate) fn linears_mut(&mut self) -> [&mut Linear; 6] {
        [
            &mut self.query,
            &mut self.key,
            &mut self.value,
            &mut self.attention_output,
            &mut self.intermediate,
            &mut self.output,
        ]
    }

    pub(crate) fn norms(&self) -> [&LayerNorm; 2] {
        [&self.attention_norm, &self.output_norm]
    }

    pub(crate) fn slots(&self) -> [&OutputSlots; 2] {
        [&self.attention_slots, &self.output_slots]
    }

    pub(crate) fn slots_mut(&mut self) -> [&mut OutputSlots; 2] {
        [&mut self.attention_slots, &mut self.output_slots]
    }

    /// Builds a layer from the table order: `linears` as [`LAYER_LINEARS`], `norms` as
    /// [`LAYER_NORMS`].
    pub(crate) fn from_parts(
        linears: [Linear; 6],
        norms: [LayerNorm; 2],
        gate: Option<Tensor>,
    ) -> Self {
        let [query, key, value, attention_output, intermediate, output] = linears;
        let [attention_norm, output_norm] = norms;
        Self {
            query,
            key,
            value,
            attention_output,
            attention_norm,
            intermediate,
            output,
            output_norm,
            attention_slots: OutputSlots::default(),
            output_slots: OutputSlots::default(),
            gate,
        }
    }
}

/// What [`Bert::forward`](super::Bert::forward) returns, as transformers'
/// `BaseModelOutput` (its `BertOutput` is the FFN's output module, a different thing).
#[derive(Debug)]
pub struct EncoderOutput {
    /// `[b, t, hidden]`.
    pub last_hidden_state: Tensor,
    /// Embedding output then each layer's output (layers + 1 tensors), when asked.
    pub hidden_states: Vec<Tensor>,
    /// Each layer's attention probabilities `[b, heads, t, t]`, when asked.
    pub attentions: Vec<Tensor>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_paths_round_trip_and_prefixes_are_found() {
        assert_eq!(
            layer_of("encoder.layer.11.attention.self.query.weight"),
            Some((11, "attention.self.query.weight"))
        );
        assert_eq!(layer_of(&layer_path(3, GATE)), Some((3, GATE)));
        for other in [
            "embeddings.word_embeddings.weight",
            "encoder.layer.x.output.dense.weight",
            "encoder.layer.2",
            "bert.encoder.layer.0.output.dense.weight",
        ] {
            assert_eq!(layer_of(other), None, "{other}");
        }
        let table = || Tensor::zeros([4, 2], (tch::Kind::Float, tch::Device::Cpu));
        let mut ck = Checkpoint::new();
        assert_eq!(checkpoint_prefix(&ck), None);
        ck.insert(format!("bert.{WORD_EMBEDDINGS}"), table());
        assert_eq!(checkpoint_prefix(&ck), Some("bert."));
        ck.insert(WORD_EMBEDDINGS, table());
        assert_eq!(checkpoint_prefix(&ck), Some(""));
    }
}
