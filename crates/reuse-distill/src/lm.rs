//! Distilling causal LMs: students cut from a Llama-family teacher through its
//! architecture description, and the check that a teacher and a student read the same
//! tokens.
//!
//! [`cut_causal_lm`] keeps a chosen subset of the teacher's decoder blocks (any subset,
//! in increasing order; DistilBERT's "one layer out of two", or a first-k / spread
//! choice made on dev text), with the embedding table, the final norm and the head
//! (tied or not) copied. Nothing in it names a family: it walks
//! [`reuse_core::models::arch::Architecture`]'s block prefix, so a Mistral or Qwen2
//! teacher is cut the same way. [`student_language_model`] gives the student the
//! teacher's tokenizer, chat template and special tokens, so
//! [`LanguageModel::save_folder`] writes it as a Hugging Face `LlamaForCausalLM` folder
//! that transformers loads and `reuse generate` runs.
//!
//! ```no_run
//! use std::path::Path;
//! use reuse_core::models::lm::LanguageModel;
//! use reuse_core::models::LoadOptions;
//! use reuse_distill::lm::{check_same_vocabulary, student_language_model};
//! use tch::{Device, Kind};
//!
//! # fn main() -> reuse_core::Result<()> {
//! let opts = LoadOptions::new(Device::Cpu, Kind::Float);
//! let teacher = LanguageModel::load(Path::new("SmolLM2-135M-Instruct.gguf"), &opts)?;
//! // 10 of its 30 blocks, spread from the first to the last.
//! let layers = [0, 3, 6, 9, 13, 16, 19, 22, 26, 29];
//! let student = student_language_model(&teacher, &layers)?;
//! check_same_vocabulary(&student.tokenizer, &teacher.tokenizer)?;
//! student.save_folder(Path::new("smollm2-10-blocks"), false)?;
//! # Ok(()) }
//! ```

use reuse_core::data::lm::ChatTemplate;
use reuse_core::models::llama::CausalLm;
use reuse_core::models::lm::LanguageModel;
use reuse_core::{Error, Model, Result};
use tokenizers::Tokenizer;

use crate::student::{check_layers, cut_blocks};

/// A shallower copy of `teacher`: its blocks `layers` (which become the student's blocks
/// `0..layers.len()`, in that order), its embedding table, final norm and head (a tied
/// head stays tied), on the teacher's device and in its dtype, with `num_hidden_layers`
/// set to `layers.len()` and every other `config.json` key kept. The student's tensors
/// are copies that require grad.
///
/// # Errors
/// `layers` empty, not strictly increasing, or past the teacher's depth (named); a
/// teacher with adapters attached (merge them first), or with weights kept in quantized
/// codes (load it dequantized: a student is trained in floating point).
pub fn cut_causal_lm(teacher: &CausalLm, layers: &[usize]) -> Result<CausalLm> {
    check_layers(layers, teacher.layers.len())?;
    let mut ck = cut_blocks(
        teacher.arch,
        teacher.state_dict(),
        &teacher.named_parameters(),
        layers,
    )?;
    let mut config = teacher.config.clone();
    config.num_hidden_layers = layers.len() as i64;
    // Copies: training the student must leave the teacher as it is.
    let names: Vec<String> = ck.names().map(String::from).collect();
    for n in names {
        let t = ck.remove(&n).expect("listed");
        ck.insert(n, t.copy());
    }
    let student = CausalLm::from_checkpoint(config, &mut ck, teacher.device(), teacher.kind())?;
    if let Some(left) = ck.names().next() {
        return Err(Error::invalid(
            "teacher",
            format!(
                "tensor `{left}` has no place in a plain {} student: a teacher kept in \
                 quantized codes must be loaded dequantized to cut a student from it",
                teacher.config.model_type
            ),
        ));
    }
    Ok(student)
}

/// The student [`cut_causal_lm`] makes, with the teacher's tokenizer, chat template,
/// stop tokens and special tokens: ready for [`LanguageModel::save_folder`] and for
/// generation.
///
/// # Errors
/// Those of [`cut_causal_lm`]; a chat template that no longer compiles.
pub fn student_language_model(teacher: &LanguageModel, layers: &[usize]) -> Result<LanguageModel> {
    let model = cut_causal_lm(&teacher.model, layers)?;
    let (bos, eos) = &teacher.special;
    let chat = teacher
        .chat_template
        .as_deref()
        .map(|t| ChatTemplate::new(t, bos, eos))
        .transpose()?;
    Ok(LanguageModel {
        model,
        tokenizer: teacher.tokenizer.clone(),
        chat,
        stop_tokens: teacher.stop_tokens.clone(),
        source: teacher.source.clone(),
        chat_template: teacher.chat_template.clone(),
        special: teacher.special.clone(),
    })
}

/// Checks that two tokenizers map the same ids to the same tokens (added and special
/// tokens included), as token-level distillation needs: the teacher's distribution over
/// id `i` is only a target for the student's id `i` when both mean the same token.
///
/// # Errors
/// Different vocabulary sizes (both named), or the first id whose tokens differ (the id
/// and both tokens named).
pub fn check_same_vocabulary(student: &Tokenizer, teacher: &Tokenizer) -> Result<()> {
    let (s, t) = (student.get_vocab_size(true), teacher.get_vocab_size(true));
    if s != t {
        return Err(Error::invalid(
            "distillation vocabulary",
            format!(
                "the student's tokenizer has {s} tokens but the teacher's {t}: token-level \
                 distillation compares distributions over the same token ids, so both need \
                 the same tokenizer"
            ),
        ));
    }
    for id in 0..s as u32 {
        let (a, b) = (student.id_to_token(id), teacher.id_to_token(id));
        if a != b {
            return Err(Error::invalid(
                "distillation vocabulary",
                format!(
                    "token id {id} is {a:?} for the student but {b:?} for the teacher: \
                     both have {s} tokens, but not the same ones (another tokenizer)"
                ),
            ));
        }
    }
    Ok(())
}
