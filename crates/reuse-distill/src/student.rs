//! Students cut from their teacher, as DistilBERT initialises its student (Sanh et al.
//! 2019, <https://arxiv.org/abs/1910.01108>: "taking one layer out of two" of BERT):
//! the embeddings, a chosen subset of the teacher's encoder layers and any pooler are
//! copied into a shallower BERT of the same width.
//!
//! [`cut_layers`] makes the student; [`save_student_folder`] writes it as a complete
//! Hugging Face / sentence-transformers model folder beside the teacher's own files
//! (tokenizer, pooling and normalisation modules), so `transformers.AutoModel`,
//! `SentenceTransformer` and reuse's [`reuse_core::models::SentenceEncoder`] all load it.
//!
//! ```no_run
//! use std::path::Path;
//! use reuse_core::models::Bert;
//! use reuse_distill::student::{cut_layers, save_student_folder};
//! use tch::{Device, Kind};
//!
//! # fn main() -> reuse_core::Result<()> {
//! let teacher_dir = Path::new("all-MiniLM-L6-v2");
//! let teacher = Bert::load(teacher_dir, Device::Cpu, Kind::Float)?;
//! let student = cut_layers(&teacher, &[0, 2, 4])?; // 3 of the 6 layers
//! save_student_folder(&student, teacher_dir, Path::new("minilm-l3"), false)?;
//! # Ok(()) }
//! ```

use std::path::Path;

use reuse_core::models::arch::{Architecture, BERT};
use reuse_core::models::folder::write_model_folder;
pub use reuse_core::models::folder::{check_out, SHARED_FILES};
use reuse_core::models::{Bert, BertConfig};
use reuse_core::{Checkpoint, Error, Model, Result};

/// Checks that `layers` is a non-empty, strictly increasing list of layer indices of a
/// teacher with `depth` layers.
pub fn check_layers(layers: &[usize], depth: usize) -> Result<()> {
    let what = "student layers";
    if layers.is_empty() {
        return Err(Error::invalid(
            what,
            format!("no layers given; name at least one of the teacher's layers 0..{depth}"),
        ));
    }
    for (k, &i) in layers.iter().enumerate() {
        if i >= depth {
            return Err(Error::invalid(
                what,
                format!(
                    "layer index {i} is past the teacher's depth: it has {depth} layers (0..={})",
                    depth.saturating_sub(1)
                ),
            ));
        }
        if k > 0 && i <= layers[k - 1] {
            return Err(Error::invalid(
                what,
                format!(
                    "indices must be strictly increasing: {i} follows {} in {layers:?}",
                    layers[k - 1]
                ),
            ));
        }
    }
    Ok(())
}

/// A shallower copy of `teacher`: its embeddings, its encoder layers `layers` (which
/// become the student's layers `0..layers.len()`, in that order) and its pooler if it
/// has one, on the teacher's device and in its dtype. The student's tensors are copies
/// (training it leaves the teacher unchanged) and require grad. Layer gates are copied
/// with their layer.
///
/// # Errors
/// `layers` empty, not strictly increasing, or naming a layer at or past the teacher's
/// depth (the message names the index and the depth); a teacher with adapters or other
/// deltas attached (merge them first: the student is cut from base weights only), or
/// with weights stored in a form the loader cannot rebuild (quantized).
pub fn cut_layers(teacher: &Bert, layers: &[usize]) -> Result<Bert> {
    check_layers(layers, teacher.layers.len())?;
    let mut ck = cut_blocks(
        &BERT,
        teacher.state_dict(),
        &teacher.named_parameters(),
        layers,
    )?;
    let mut config = teacher.config.clone();
    config.num_hidden_layers = layers.len() as i64;
    let student = Bert::from_checkpoint(config, &mut ck, teacher.device(), teacher.kind())?;
    if let Some(left) = ck.names().next() {
        return Err(Error::invalid(
            "teacher",
            format!("tensor `{left}` has no place in a plain BERT student (quantized weights?)"),
        ));
    }
    Ok(student)
}

/// The tensors of a student cut from `state` (a teacher's base weights by Hugging Face
/// name) as the family's description `arch` lays its blocks out: block `layers[k]`
/// becomes block `k` (`{layer_prefix}.{k}.*`), the other blocks are left out, and every
/// tensor outside the blocks (embeddings, final norm, head, pooler) is kept as it is.
/// `layers` must already be checked ([`check_layers`]). `params` are the teacher's
/// parameters: one that `state` lacks is an adapter or other delta, which a student
/// cannot carry.
///
/// # Errors
/// A parameter of `params` that is not among the base weights (named, with the advice
/// to merge it first).
pub fn cut_blocks(
    arch: &Architecture,
    mut state: Checkpoint,
    params: &[(String, tch::Tensor)],
    layers: &[usize],
) -> Result<Checkpoint> {
    if let Some((extra, _)) = params.iter().find(|(n, _)| state.get(n).is_none()) {
        return Err(Error::invalid(
            "teacher",
            format!(
                "it has `{extra}` beyond its base weights (an adapter or other delta); \
                 merge it into the weights first (merge_and_unload), since a student copies base weights only"
            ),
        ));
    }
    let mut ck = Checkpoint::new();
    let names: Vec<String> = state.names().map(String::from).collect();
    for name in names {
        let t = state.remove(&name).expect("listed");
        match arch.layer_of(&name) {
            Some((idx, tail)) => {
                if let Some(new) = layers.iter().position(|&l| l == idx) {
                    ck.insert(arch.layer_path(new, tail), t);
                }
            }
            None => {
                ck.insert(name, t);
            }
        }
    }
    Ok(ck)
}

/// Writes `student` as a complete model folder at `out`: `config.json` (the teacher's
/// `config.json` with only `num_hidden_layers` changed, so keys reuse does not read are
/// kept), `model.safetensors` (Hugging Face names, as [`Bert::state_dict`] writes them),
/// and the teacher's tokenizer and sentence-transformers files ([`SHARED_FILES`] and the
/// module folders `modules.json` names) copied from `teacher_dir`, through
/// [`reuse_core::models::folder::write_model_folder`].
///
/// The folder is built beside `out` and renamed into place at the end, so a failure
/// leaves nothing half-written. An `out` that exists and is not empty is refused unless
/// `overwrite` is set; then it is replaced as a whole.
///
/// # Errors
/// `out` not empty (without `overwrite`) or not a folder; a teacher folder without a
/// readable `config.json`; a student whose width, vocabulary or heads differ from the
/// teacher config's (it was not cut from this teacher); any I/O failure (naming the
/// file).
pub fn save_student_folder(
    student: &Bert,
    teacher_dir: &Path,
    out: &Path,
    overwrite: bool,
) -> Result<()> {
    check_out(out, overwrite)?;
    let cfg_path = teacher_dir.join("config.json");
    let teacher_cfg = BertConfig::load(&cfg_path)?;
    check_same_shape(&student.config, &teacher_cfg, &cfg_path)?;
    let mut updates = serde_json::Map::new();
    updates.insert(
        "num_hidden_layers".into(),
        serde_json::Value::from(student.layers.len()),
    );
    write_model_folder(
        teacher_dir,
        out,
        &updates,
        &student.state_dict(),
        overwrite,
        &mut |_| Ok(()),
    )
}

/// The shape-defining fields of `student` must equal the teacher's: otherwise the
/// teacher's config.json (with a new depth) would not describe the student.
fn check_same_shape(student: &BertConfig, teacher: &BertConfig, path: &Path) -> Result<()> {
    let fields: [(&str, i64, i64); 6] = [
        ("vocab_size", student.vocab_size, teacher.vocab_size),
        ("hidden_size", student.hidden_size, teacher.hidden_size),
        (
            "num_attention_heads",
            student.num_attention_heads,
            teacher.num_attention_heads,
        ),
        (
            "intermediate_size",
            student.intermediate_size,
            teacher.intermediate_size,
        ),
        (
            "max_position_embeddings",
            student.max_position_embeddings,
            teacher.max_position_embeddings,
        ),
        (
            "type_vocab_size",
            student.type_vocab_size,
            teacher.type_vocab_size,
        ),
    ];
    for (key, s, t) in fields {
        if s != t {
            return Err(Error::invalid(
                "student",
                format!(
                    "its {key} is {s} but the teacher's {} says {t}: the student was not cut from this teacher",
                    path.display()
                ),
            ));
        }
    }
    if student.hidden_act != teacher.hidden_act {
        return Err(Error::invalid(
            "student",
            format!(
                "its hidden_act is `{}` but the teacher's {} says `{}`",
                student.hidden_act,
                path.display(),
                teacher.hidden_act
            ),
        ));
    }
    Ok(())
}
