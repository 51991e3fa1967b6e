//! A smaller sentence-embedding model: a student cut from its teacher
//! ([`crate::student::cut_layers`]) learns to give the teacher's sentence embeddings on
//! unlabeled text, as sentence-transformers' model-distillation example does
//! (<https://github.com/UKPLab/sentence-transformers/tree/master/examples/sentence_transformer/training/distillation>;
//! Reimers & Gurevych 2020, <https://arxiv.org/abs/2004.09813>).
//!
//! The teacher embeds every text once, up front, in evaluation mode and without a
//! graph: a cached teacher, so training holds one model's activations, not two. The
//! student's mean-pooled output is then fitted to those embeddings with core's
//! [`Trainer`] (AdamW, weight decay 0.01, linear warmup then linear decay), through a
//! [`Trainable`] whose [`Trainable::loss`] is the embedding loss: each batch's labels
//! are its examples' indices into the cached embeddings, so the targets are gathered on
//! the device without a host round trip.
//!
//! The student's embedding is what its folder will give: mean pooling, then the
//! teacher's `Normalize` module when its `modules.json` lists one (a student cut from a
//! sentence-transformers model keeps every module of its teacher, as in
//! sentence-transformers' layer-reduction example), so every loss compares the two
//! models' outputs as users see them.
//!
//! A seeded share of the texts ([`EmbedDistillConfig::eval_fraction`], 5% by default)
//! is held out of training; the report gives the student's mean cosine to the teacher
//! on them. Which layers the student keeps matters more than the loss: cut from
//! all-MiniLM-L6-v2 and trained on 11,400 Debian synopses (cosine loss, lr 2e-3), a
//! student of layers 0, 2, 5 reached held-out cosine 0.924 to the teacher, 1, 3, 5
//! 0.922, and 0, 2, 4 (DistilBERT's every-other-layer rule) 0.868. The defaults are the
//! recipe `distill.minilm_embeddings` chose on held-out text: half the teacher's layers
//! with its first and last ([`default_layers`]: 0, 2, 5 of six), cosine loss, lr 1e-3;
//! one epoch over the 52,298 training synopses reached held-out cosine 0.948.
//!
//! ```no_run
//! use std::path::Path;
//! use reuse_distill::embed::{distill_embeddings, EmbedDistillConfig, EmbedLoss};
//! use reuse_distill::student::save_student_folder;
//!
//! # fn main() -> reuse_core::Result<()> {
//! let teacher = Path::new("all-MiniLM-L6-v2");
//! let texts: Vec<String> = std::fs::read_to_string("texts.txt").unwrap()
//!     .lines().map(String::from).collect();
//! // Keeping the teacher's last layer matters: see the crate's bench notes.
//! let cfg = EmbedDistillConfig { layers: vec![0, 2, 5], loss: EmbedLoss::Cosine, lr: 1e-3, ..Default::default() };
//! let (student, report) = distill_embeddings(teacher, &texts, &cfg, true)?;
//! println!("held-out cosine {:?}", report.held_out_cosine);
//! save_student_folder(&student.bert, teacher, Path::new("minilm-l3"), false)?;
//! # Ok(()) }
//! ```

use std::path::Path;
use std::time::Instant;

use reuse_core::data::{epoch_batches, Batch, TextDataset};
use reuse_core::models::bert::{l2_normalize, mean_pool};
use reuse_core::models::{Bert, SentenceEncoder, TokenizedDataset};
use reuse_core::trainer::StepOutputs;
use reuse_core::ForwardOptions;
use reuse_core::{
    Error, Linear, Model, OutputSlots, Result, Schedule, TrainConfig, Trainable, Trainer,
};
use tch::{Device, Kind, Tensor};

use crate::features::{cosine_loss, hidden_mse};
use crate::student::cut_layers;

/// How the student's embedding is compared with the teacher's. Both are the models'
/// outputs as their folders give them (normalised when the teacher's `modules.json`
/// lists `Normalize`, for the student too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EmbedLoss {
    /// `nn.MSELoss` between the student's and the teacher's embeddings:
    /// sentence-transformers' `MSELoss`, as in its distillation example.
    Mse,
    /// MSE between the L2-normalised student and teacher embeddings, whether or not the
    /// teacher normalises: only the direction counts (equals `(2 - 2 cos) / hidden`).
    NormalizedMse,
    /// `1 - cos(student, teacher)`, mean over the batch: the cosine itself. The default:
    /// the loss `distill.minilm_embeddings` chose.
    #[default]
    Cosine,
}

impl EmbedLoss {
    /// The loss of student embeddings `[b, h]` against teacher embeddings `[b, h]`.
    pub fn compute(self, student: &Tensor, teacher: &Tensor) -> Result<Tensor> {
        match self {
            EmbedLoss::Mse => hidden_mse(student, teacher, None, None),
            EmbedLoss::NormalizedMse => hidden_mse(
                &l2_normalize(&student.to_kind(Kind::Float)),
                &l2_normalize(&teacher.to_kind(Kind::Float)),
                None,
                None,
            ),
            EmbedLoss::Cosine => cosine_loss(student, teacher, None, None),
        }
    }
}

impl std::str::FromStr for EmbedLoss {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "mse" => Ok(EmbedLoss::Mse),
            "normalized-mse" | "normalised-mse" => Ok(EmbedLoss::NormalizedMse),
            "cosine" => Ok(EmbedLoss::Cosine),
            other => Err(Error::invalid(
                "embedding loss",
                format!("expected mse, normalized-mse or cosine, found `{other}`"),
            )),
        }
    }
}

/// Settings of [`distill_embeddings`]. Defaults: the layers of [`default_layers`] (0, 2,
/// 5 of a six-layer teacher), 1 epoch, batch 32, lr 1e-3, 128 tokens, cosine
/// loss, seed 0, CPU, every text, 5% held out, 10% warmup: the recipe the bench measured
/// best (held-out cosine 0.948 after one epoch over 52,298 Debian synopses).
#[derive(Debug, Clone)]
pub struct EmbedDistillConfig {
    /// The teacher's layers the student keeps, strictly increasing; empty (the default)
    /// keeps [`default_layers`] of the teacher's depth.
    pub layers: Vec<usize>,
    /// Epochs over the training texts.
    pub epochs: usize,
    /// Texts per optimizer step.
    pub batch_size: usize,
    /// Peak learning rate (AdamW, weight decay 0.01).
    pub lr: f64,
    /// Longest token sequence the student trains on (at most the teacher's
    /// `max_seq_length`; the teacher embeds each text at its own `max_seq_length`).
    pub max_len: usize,
    /// The loss.
    pub loss: EmbedLoss,
    /// Seeds the text sample, the held-out split, the data order and dropout.
    pub seed: u64,
    /// Where the teacher and the student run.
    pub device: Device,
    /// Use a seeded random sample of at most this many texts (held-out share included).
    pub max_texts: Option<usize>,
    /// Share of the (sampled) texts held out of training to measure the student's
    /// cosine to the teacher; 0 holds none out.
    pub eval_fraction: f64,
    /// Share of the optimizer steps spent warming the learning rate up linearly from 0;
    /// then it decays linearly to 0.
    pub warmup_fraction: f64,
}

impl Default for EmbedDistillConfig {
    fn default() -> Self {
        Self {
            layers: Vec::new(),
            epochs: 1,
            batch_size: 32,
            lr: DEFAULT_LR,
            max_len: 128,
            loss: EmbedLoss::Cosine,
            seed: 0,
            device: Device::Cpu,
            max_texts: None,
            eval_fraction: 0.05,
            warmup_fraction: 0.1,
        }
    }
}

/// The default peak learning rate: `distill.minilm_embeddings`' dev choice for the
/// cosine loss (1e-3 beat 2e-3 and 4e-3 on held-out synopses).
pub const DEFAULT_LR: f64 = 1e-3;

/// Below this held-out cosine to the teacher, a student is far from what the default
/// recipe reaches (0.93-0.95 on Debian synopses with MiniLM): [`EmbedReport::weak`]
/// says so.
pub const WEAK_COSINE: f64 = 0.8;

/// The layers a student keeps by default from a teacher of `depth` layers: half of them
/// (rounded up), spread evenly from the first to the last. Keeping the last layer
/// matters: on MiniLM, 0, 2, 5 reached held-out cosine 0.924 where 0, 2, 4 reached
/// 0.868 (same budget).
pub fn default_layers(depth: usize) -> Vec<usize> {
    let k = depth.div_ceil(2);
    if k <= 1 {
        // One layer of one or two: the last.
        return depth.checked_sub(1).into_iter().collect();
    }
    (0..k).map(|i| i * (depth - 1) / (k - 1)).collect()
}

/// What [`distill_embeddings`] did.
#[derive(Debug, Clone, Default)]
pub struct EmbedReport {
    /// Wall-clock seconds of training (the teacher's pass not included).
    pub seconds: f64,
    /// Wall-clock seconds the teacher took to embed every text.
    pub teacher_seconds: f64,
    /// Loss of the last optimizer step.
    pub final_loss: f64,
    /// Loss of every optimizer step.
    pub losses: Vec<f64>,
    /// Optimizer steps taken.
    pub steps: usize,
    /// Texts trained on.
    pub train_texts: usize,
    /// Texts held out.
    pub held_out_texts: usize,
    /// The student's mean cosine to the teacher on the held-out texts (none held out:
    /// `None`).
    pub held_out_cosine: Option<f64>,
    /// Parameters of the teacher.
    pub teacher_params: usize,
    /// Parameters of the student.
    pub student_params: usize,
    /// The teacher's layers the student kept.
    pub layers: Vec<usize>,
}

impl EmbedReport {
    /// A sentence saying why the student is weak, when its held-out cosine to the
    /// teacher is below [`WEAK_COSINE`]; `None` when it is not (or nothing was held out).
    pub fn weak(&self) -> Option<String> {
        let c = self.held_out_cosine?;
        (c < WEAK_COSINE).then(|| {
            format!(
                "the student's held-out cosine to its teacher is {c:.3}, below {WEAK_COSINE}: \
                 its embeddings do not resemble the teacher's yet (the default recipe reaches \
                 0.93-0.95 after one epoch over 50,000 short texts). Train on more text or \
                 for more epochs ({} steps on {} texts here), keep the teacher's last layer, \
                 or use the default loss and learning rate (cosine, {DEFAULT_LR:e})",
                self.steps, self.train_texts
            )
        })
    }
}

/// A student BERT trained to give cached teacher embeddings: a batch's labels index
/// into `targets`.
struct EmbedStudent {
    bert: Bert,
    /// Teacher embeddings `[n, hidden]` (f32) on the training device.
    targets: Tensor,
    loss: EmbedLoss,
    /// The teacher's pipeline ends in `Normalize`, so the student's (a copy of it) does.
    normalize: bool,
}

impl Model for EmbedStudent {
    fn visit_linears(&mut self, f: &mut dyn FnMut(&str, &mut Linear)) {
        self.bert.visit_linears(f);
    }
    fn visit_block_outputs(&mut self, f: &mut dyn FnMut(&str, &mut OutputSlots)) {
        self.bert.visit_block_outputs(f);
    }
    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        self.bert.named_parameters()
    }
    fn named_buffers(&self) -> Vec<(String, Tensor)> {
        self.bert.named_buffers()
    }
}

impl Trainable for EmbedStudent {
    /// The embedding as the student's folder gives it (mean-pooled, normalised when the
    /// teacher normalises), as `logits` and `pooled`.
    fn forward(&self, batch: &Batch, train: bool, opts: ForwardOptions) -> Result<StepOutputs> {
        let mask = batch
            .mask
            .as_ref()
            .ok_or_else(|| Error::invalid("batch", "BERT needs an attention mask"))?;
        let mask = batch.padded.then_some(mask);
        let want = opts;
        let out = self.bert.forward(&batch.inputs, mask, None, train, want)?;
        let mut pooled = mean_pool(&out.last_hidden_state, mask);
        if self.normalize {
            pooled = l2_normalize(&pooled);
        }
        Ok(StepOutputs {
            last_hidden: None,
            logits: pooled.shallow_clone(),
            hidden_states: out.hidden_states,
            attentions: out.attentions,
            pooled: Some(pooled),
        })
    }

    /// The embedding loss against the cached teacher embeddings of the batch's texts.
    fn loss(&self, out: &StepOutputs, batch: &Batch) -> Result<Tensor> {
        let target = self
            .targets
            .f_index_select(0, &batch.labels.to_device(self.targets.device()))?;
        self.loss.compute(&out.logits, &target)
    }
}

/// Mean over rows of the cosine between `a` and `b` (`[n, h]` each); 0 rows give NaN.
pub fn mean_cosine(a: &Tensor, b: &Tensor) -> f64 {
    Tensor::cosine_similarity(&a.to_kind(Kind::Float), &b.to_kind(Kind::Float), -1, 1e-8)
        .mean(Kind::Float)
        .double_value(&[])
}

/// The mean cosine between `student`'s and `teacher`'s embeddings of `texts`.
pub fn embedding_agreement(
    student: &SentenceEncoder,
    teacher: &SentenceEncoder,
    texts: &[&str],
    batch_size: usize,
) -> Result<f64> {
    let s = student.encode(texts, batch_size)?;
    let t = teacher.encode(texts, batch_size)?;
    Ok(mean_cosine(&s, &t))
}

/// Texts per teacher (and evaluation) forward pass: no graph is kept, so larger than a
/// training batch.
const ENCODE_BATCH: usize = 128;

/// Distils the sentence-transformers model in `teacher_dir` into a student of the
/// teacher's layers `cfg.layers`, on unlabeled `texts`, and returns the student as a
/// [`SentenceEncoder`] (the teacher's tokenizer, sequence length and normalisation) with
/// a report. Save it with [`crate::student::save_student_folder`]`(&student.bert,
/// teacher_dir, out, ..)`. `progress` prints the phases and a progress bar on stderr.
///
/// # Errors
/// Bad layer indices (checked before any text is embedded), a teacher folder that does
/// not load, no texts to train on, zero epochs or batch size, a learning rate or
/// fraction out of range.
pub fn distill_embeddings(
    teacher_dir: &Path,
    texts: &[String],
    cfg: &EmbedDistillConfig,
    progress: bool,
) -> Result<(SentenceEncoder, EmbedReport)> {
    distill_embeddings_with(teacher_dir, texts, None, cfg, progress)
}

/// [`distill_embeddings`] with the teacher's embeddings of `texts` given
/// (`teacher_embeddings[i]` is the teacher's embedding of `texts[i]`, as
/// [`SentenceEncoder::encode`] gives it): the teacher then embeds nothing, so runs that
/// share a text set (a hyper-parameter grid, several seeds) pay for its pass once.
/// `None` embeds them here, as [`distill_embeddings`] does.
///
/// # Errors
/// Those of [`distill_embeddings`], and embeddings that are not `[texts.len(), hidden]`.
pub fn distill_embeddings_with(
    teacher_dir: &Path,
    texts: &[String],
    teacher_embeddings: Option<&Tensor>,
    cfg: &EmbedDistillConfig,
    progress: bool,
) -> Result<(SentenceEncoder, EmbedReport)> {
    check_config(cfg)?;
    let teacher = SentenceEncoder::load(teacher_dir, cfg.device, Kind::Float)?;
    let layers = if cfg.layers.is_empty() {
        default_layers(teacher.bert.config.num_hidden_layers as usize)
    } else {
        cfg.layers.clone()
    };
    let student = cut_layers(&teacher.bert, &layers)?;
    if let Some(e) = teacher_embeddings {
        let want = vec![texts.len() as i64, teacher.bert.config.hidden_size];
        if e.size() != want {
            return Err(Error::ShapeMismatch {
                path: None,
                tensor: "teacher embeddings".into(),
                expected: want,
                found: e.size(),
            });
        }
    }

    // A seeded sample, then the held-out share from its front.
    let order = epoch_batches(texts.len(), texts.len().max(1), Some(cfg.seed), 0)
        .into_iter()
        .next()
        .unwrap_or_default();
    let n = cfg.max_texts.map_or(order.len(), |m| m.min(order.len()));
    let sample: Vec<&str> = order[..n]
        .iter()
        .map(|&i| texts[i as usize].as_str())
        .collect();
    let n_eval = if cfg.eval_fraction > 0.0 && n >= 2 {
        ((n as f64 * cfg.eval_fraction).round() as usize).clamp(1, n - 1)
    } else {
        0
    };
    if n - n_eval == 0 {
        return Err(Error::invalid(
            "texts",
            format!(
                "no texts to train on ({} given{})",
                texts.len(),
                cfg.max_texts
                    .map_or(String::new(), |m| format!(", at most {m} used"))
            ),
        ));
    }

    let t0 = Instant::now();
    let targets = match teacher_embeddings {
        Some(e) => e
            .to_device(cfg.device)
            .index_select(0, &Tensor::from_slice(&order[..n]).to_device(cfg.device))
            .to_kind(Kind::Float),
        None => {
            if progress {
                eprintln!("teacher: embedding {n} texts");
            }
            teacher.encode(&sample, ENCODE_BATCH)?
        }
    };
    let teacher_seconds = t0.elapsed().as_secs_f64();
    let teacher_params = teacher.bert.params().count();
    let SentenceEncoder {
        bert: teacher_bert,
        tokenizer,
        max_seq_length,
        normalize,
    } = teacher;
    drop(teacher_bert);

    let (eval_texts, train_texts) = sample.split_at(n_eval);
    let train_data = TextDataset {
        texts: train_texts.iter().map(|s| s.to_string()).collect(),
        labels: (0..train_texts.len() as i64).collect(),
    };
    let max_len = cfg.max_len.min(max_seq_length);
    let train = TokenizedDataset::new(&tokenizer, &train_data, max_len)?;
    let model = EmbedStudent {
        bert: student,
        targets: targets
            .narrow(0, n_eval as i64, train_texts.len() as i64)
            .to_device(cfg.device),
        loss: cfg.loss,
        normalize,
    };
    let student_params = model.params().count();
    let per_epoch = train_texts.len().div_ceil(cfg.batch_size);
    let total = per_epoch * cfg.epochs;
    let mut trainer = Trainer::new(TrainConfig {
        epochs: cfg.epochs,
        batch_size: cfg.batch_size,
        lr: cfg.lr,
        weight_decay: 0.01,
        schedule: Schedule::Linear {
            warmup: (total as f64 * cfg.warmup_fraction).round() as usize,
        },
        seed: cfg.seed,
        device: cfg.device,
        progress,
        ..Default::default()
    });
    if progress {
        eprintln!(
            "student: layers {layers:?} ({student_params} parameters, teacher {teacher_params}); \
             {} texts, {total} steps",
            train_texts.len()
        );
    }
    let tr = trainer.fit(&model, &train, None, &mut [])?;

    let student = SentenceEncoder {
        bert: model.bert,
        tokenizer,
        max_seq_length,
        normalize,
    };
    let held_out_cosine = if n_eval > 0 {
        let s = student.encode(eval_texts, ENCODE_BATCH)?;
        Some(mean_cosine(&s, &targets.narrow(0, 0, n_eval as i64)))
    } else {
        None
    };
    let report = EmbedReport {
        seconds: tr.seconds,
        teacher_seconds,
        final_loss: tr.losses.last().copied().unwrap_or(f64::NAN),
        losses: tr.losses,
        steps: tr.steps,
        train_texts: train_texts.len(),
        held_out_texts: n_eval,
        held_out_cosine,
        teacher_params,
        student_params,
        layers,
    };
    Ok((student, report))
}

fn check_config(cfg: &EmbedDistillConfig) -> Result<()> {
    let what = "embedding distillation config";
    if cfg.epochs == 0 || cfg.batch_size == 0 || cfg.max_len == 0 {
        return Err(Error::invalid(
            what,
            format!(
                "epochs ({}), batch_size ({}) and max_len ({}) must be at least 1",
                cfg.epochs, cfg.batch_size, cfg.max_len
            ),
        ));
    }
    if !(cfg.lr.is_finite() && cfg.lr > 0.0) {
        return Err(Error::invalid(
            what,
            format!("lr must be finite and > 0, found {}", cfg.lr),
        ));
    }
    for (name, v) in [
        ("eval_fraction", cfg.eval_fraction),
        ("warmup_fraction", cfg.warmup_fraction),
    ] {
        if !(0.0..1.0).contains(&v) {
            return Err(Error::invalid(
                what,
                format!("{name} must be in [0, 1), found {v}"),
            ));
        }
    }
    if cfg.max_texts == Some(0) {
        return Err(Error::invalid(what, "max_texts must be at least 1"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_layers_keep_half_with_the_first_and_last() {
        assert_eq!(default_layers(6), [0, 2, 5]);
        assert_eq!(default_layers(12), [0, 2, 4, 6, 8, 11]);
        assert_eq!(default_layers(4), [0, 3]);
        assert_eq!(default_layers(3), [0, 2]);
        assert_eq!(default_layers(2), [1]);
        assert_eq!(default_layers(1), [0]);
        assert!(default_layers(0).is_empty());
    }

    #[test]
    fn losses_are_zero_at_equality_and_normalized_ones_ignore_scale() {
        let t = Tensor::randn([4, 8], (Kind::Float, Device::Cpu));
        for l in [EmbedLoss::Mse, EmbedLoss::NormalizedMse, EmbedLoss::Cosine] {
            assert!(l.compute(&t, &t).unwrap().double_value(&[]).abs() < 1e-6);
        }
        let s = &t * 3.0;
        assert!(EmbedLoss::Mse.compute(&s, &t).unwrap().double_value(&[]) > 0.1);
        for l in [EmbedLoss::NormalizedMse, EmbedLoss::Cosine] {
            assert!(l.compute(&s, &t).unwrap().double_value(&[]).abs() < 1e-6);
        }
        // Normalised MSE is (2 - 2 cos) / hidden.
        let u = Tensor::randn([4, 8], (Kind::Float, Device::Cpu));
        let cos = EmbedLoss::Cosine.compute(&u, &t).unwrap().double_value(&[]);
        let nmse = EmbedLoss::NormalizedMse
            .compute(&u, &t)
            .unwrap()
            .double_value(&[]);
        assert!((nmse - 2.0 * cos / 8.0).abs() < 1e-6, "{nmse} {cos}");
        assert_eq!(
            "normalized-mse".parse::<EmbedLoss>().unwrap(),
            EmbedLoss::NormalizedMse
        );
        assert!("l1".parse::<EmbedLoss>().is_err());
    }
}
