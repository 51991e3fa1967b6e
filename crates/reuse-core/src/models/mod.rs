//! Pretrained architectures loaded from Hugging Face files by their own parameter names.

pub mod arch;
pub mod bert;
pub mod classifier;
pub mod folder;
pub mod llama;
pub mod mlm;
pub mod sentence;

pub use bert::{Bert, BertConfig, EncoderOutput};
pub use classifier::BertClassifier;
pub use llama::{CausalLm, LlamaConfig};
pub use mlm::{train_flops, BertForMaskedLm, MaskingSpec, MlmBatch};
pub use sentence::{SentenceEncoder, TokenizedDataset};
