//! Teachers: anything that returns logits and, on request, hidden states and attentions.
//!
//! Every [`Trainable`] model of reuse-core is a teacher as it is ([`Teacher`] has a
//! blanket implementation): it runs in evaluation mode (dropout off) without building a
//! graph. A teacher has a fingerprint, a hash of its parameters and buffers, that a
//! teacher cache records so that it can refuse to serve another teacher's outputs.

use reuse_core::data::{Batch, BatchSource};
use reuse_core::trainer::StepOutputs;
use reuse_core::ForwardOptions;
use reuse_core::{Error, Result, Trainable};
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

/// A model whose outputs a student learns from.
pub trait Teacher {
    /// The teacher's outputs for `batch` (on the batch's device): logits always, hidden
    /// states, attentions and pooled features as `opts` asks. No graph is built.
    fn teach(&self, batch: &Batch, opts: ForwardOptions) -> Result<StepOutputs>;

    /// A hex SHA-256 over the teacher's parameter and buffer names, shapes, dtypes and
    /// values (in name order): two teachers with the same fingerprint compute the same
    /// function.
    fn fingerprint(&self) -> String;

    /// Rows of the teacher's word-embedding table, when it has one: a student fed the
    /// same token ids must have as many.
    fn vocab_size(&self) -> Option<i64> {
        None
    }
}

impl<M: Trainable + ?Sized> Teacher for M {
    fn teach(&self, batch: &Batch, opts: ForwardOptions) -> Result<StepOutputs> {
        tch::no_grad(|| self.forward(batch, false, opts))
    }

    fn fingerprint(&self) -> String {
        let mut named = self.named_parameters();
        named.extend(self.named_buffers());
        fingerprint_tensors(&mut named)
    }

    fn vocab_size(&self) -> Option<i64> {
        vocab_rows(&self.named_parameters())
    }
}

/// Rows of the word-embedding table among `named` parameters, if there is one.
/// Rows of the word-embedding table among `named`, found by the embedding path of any
/// family reuse-core describes (BERT's `embeddings.word_embeddings.weight`, the Llama
/// family's `model.embed_tokens.weight`).
pub(crate) fn vocab_rows(named: &[(String, Tensor)]) -> Option<i64> {
    named
        .iter()
        .find(|(n, _)| {
            reuse_core::models::arch::FAMILIES
                .iter()
                .any(|a| n.ends_with(a.embedding))
        })
        .map(|(_, t)| t.size()[0])
}

/// A hex SHA-256 over named tensors (sorted by name): names, dtypes, shapes and the
/// little-endian bytes of the values.
pub fn fingerprint_tensors(named: &mut [(String, Tensor)]) -> String {
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let mut h = Sha256::new();
    for (n, t) in named.iter() {
        h.update(n.as_bytes());
        h.update(format!("{:?}{:?}", t.kind(), t.size()).as_bytes());
        hash_values(&mut h, t);
    }
    hex(&h.finalize())
}

fn hash_values(h: &mut Sha256, t: &Tensor) {
    let t = t.to_device(Device::Cpu).contiguous();
    let numel = t.numel();
    let mut buf = vec![0u8; numel * t.kind().elt_size_in_bytes()];
    // `copy_data_u8` counts elements, not bytes.
    t.copy_data_u8(&mut buf, numel);
    h.update(&buf);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A hex SHA-256 over a dataset's examples in index order: inputs, masks and labels of
/// every example (read in chunks of 256 on the CPU). A teacher cache records it and
/// refuses another dataset (other texts, another order, another tokenization).
pub fn dataset_fingerprint(data: &dyn BatchSource) -> Result<String> {
    let mut h = Sha256::new();
    h.update(format!("n={}", data.len()).as_bytes());
    let n = data.len() as i64;
    let mut start = 0i64;
    while start < n {
        let idx: Vec<i64> = (start..(start + 256).min(n)).collect();
        let b = data.batch(&idx, Device::Cpu)?;
        let (inputs, labels) = (b.inputs, b.labels);
        // Token ids may be padded to the longest of the chunk: hash each row's unpadded
        // tokens so the fingerprint does not depend on how examples were grouped.
        match &b.mask {
            Some(mask) => {
                let lens: Vec<i64> = Vec::<i64>::try_from(mask.sum_dim_intlist(
                    [1i64].as_slice(),
                    false,
                    Kind::Int64,
                ))
                .map_err(|e| Error::invalid("dataset", e.to_string()))?;
                for (r, &len) in lens.iter().enumerate() {
                    hash_values(&mut h, &inputs.get(r as i64).narrow(0, 0, len));
                }
            }
            None => hash_values(&mut h, &inputs),
        }
        hash_values(&mut h, &labels);
        start += idx.len() as i64;
    }
    Ok(hex(&h.finalize()))
}
