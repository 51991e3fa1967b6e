//! `reuse distill embed`: a smaller sentence-embedding model cut from its teacher and
//! trained to match the teacher's embeddings on unlabeled text.
//!
//! The defaults are the recipe `distill.minilm_embeddings` measured best on held-out
//! text (half the teacher's layers with its first and last, cosine loss, lr 1e-3), so the
//! short form gives a good student; a run that ends far below it says so.

use std::path::PathBuf;

use anyhow::{Context, Result};
use reuse_core::models::BertConfig;
use reuse_distill::embed::{
    default_layers, distill_embeddings, EmbedDistillConfig, EmbedLoss, DEFAULT_LR,
};
use reuse_distill::student::{check_layers, check_out, save_student_folder};

use crate::shared::{parse_device, read_texts};

/// The report `reuse distill embed` writes beside the student's files.
pub const METRICS_FILE: &str = "distill_metrics.json";

/// Arguments of `reuse distill embed`.
#[derive(clap::Args)]
#[command(
    after_help = "The defaults are the recipe `cargo xtask bench` measured best (distill.minilm_embeddings): \
    half the teacher's layers with its first and last (0,2,5 of six), cosine loss, lr 1e-3; one epoch over \
    52,298 Debian synopses gave held-out cosine 0.948 to all-MiniLM-L6-v2. A run whose held-out cosine \
    ends below 0.8 says so on stderr."
)]
pub struct Args {
    /// Teacher: a sentence-transformers model folder (config.json, model.safetensors,
    /// tokenizer.json, modules.json, ...).
    #[arg(long)]
    teacher: PathBuf,
    /// The teacher's layers the student keeps, comma-separated and increasing (0-based).
    /// Default: half of them, spread from the first to the last (0,2,5 of six layers;
    /// keeping the last layer matters).
    #[arg(long, value_delimiter = ',')]
    layers: Vec<usize>,
    /// Unlabeled text: one text per line, or a .tsv / .tsv.gz whose last column is the
    /// text (e.g. `section<TAB>text`); .gz files are decompressed. Empty texts are skipped.
    #[arg(long)]
    texts: PathBuf,
    /// Output folder for the student (must not exist, or be empty, unless --overwrite).
    #[arg(long)]
    out: PathBuf,
    /// Replace a non-empty --out.
    #[arg(long)]
    overwrite: bool,
    /// Epochs over the training texts.
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    /// Peak learning rate (AdamW, linear warmup then linear decay); 1e-3 is the bench's
    /// dev choice for the cosine loss.
    #[arg(long, default_value_t = DEFAULT_LR)]
    lr: f64,
    /// Texts per step.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Longest token sequence the student trains on.
    #[arg(long, default_value_t = 128)]
    max_len: usize,
    /// cosine (1 - cos, the bench's choice), mse (between the two models' embeddings as
    /// their folders give them, as sentence-transformers' distillation example) or
    /// normalized-mse (MSE of the L2-normalised embeddings).
    #[arg(long, default_value = "cosine")]
    loss: String,
    /// Use a seeded random sample of at most N texts (held-out share included).
    #[arg(long, value_name = "N")]
    max_texts: Option<usize>,
    /// Share of the texts held out of training to measure the cosine to the teacher.
    #[arg(long, default_value_t = 0.05)]
    eval_fraction: f64,
    /// Share of the steps spent warming the learning rate up.
    #[arg(long, default_value_t = 0.1)]
    warmup_fraction: f64,
    /// Seed for the sample, the held-out split, the data order and dropout.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// cpu or cuda (default: cuda if available).
    #[arg(long)]
    device: Option<String>,
}

pub fn run(a: Args) -> Result<()> {
    crate::shared::require_encoder(&a.teacher, "distill embed")?;
    // Everything that can be checked cheaply is checked before any text is read or
    // embedded, and nothing is written until the student is trained.
    let loss: EmbedLoss = a.loss.parse()?;
    let device = parse_device(a.device.as_deref())?;
    check_out(&a.out, a.overwrite)?;
    let teacher_cfg = BertConfig::load(&a.teacher.join("config.json"))
        .with_context(|| format!("cannot load teacher from {}", a.teacher.display()))?;
    let layers = if a.layers.is_empty() {
        default_layers(teacher_cfg.num_hidden_layers as usize)
    } else {
        a.layers.clone()
    };
    check_layers(&layers, teacher_cfg.num_hidden_layers as usize)?;
    let texts = read_texts(&a.texts)?;
    let cfg = EmbedDistillConfig {
        layers: layers.clone(),
        epochs: a.epochs,
        batch_size: a.batch_size,
        lr: a.lr,
        max_len: a.max_len,
        loss,
        seed: a.seed,
        device,
        max_texts: a.max_texts,
        eval_fraction: a.eval_fraction,
        warmup_fraction: a.warmup_fraction,
    };
    let (student, r) = distill_embeddings(&a.teacher, &texts, &cfg, true)
        .with_context(|| format!("distilling {}", a.teacher.display()))?;
    save_student_folder(&student.bert, &a.teacher, &a.out, a.overwrite)?;
    let metrics = serde_json::json!({
        "teacher": a.teacher.display().to_string(),
        "texts": a.texts.display().to_string(),
        "layers": layers,
        "loss": a.loss,
        "lr": a.lr,
        "epochs": a.epochs,
        "batch_size": a.batch_size,
        "max_len": a.max_len,
        "seed": a.seed,
        "steps": r.steps,
        "train_seconds": r.seconds,
        "teacher_seconds": r.teacher_seconds,
        "final_loss": r.final_loss,
        "train_texts": r.train_texts,
        "held_out_texts": r.held_out_texts,
        "held_out_cosine": r.held_out_cosine,
        "teacher_params": r.teacher_params,
        "student_params": r.student_params,
    });
    reuse_core::checkpoint::write_atomic(
        &a.out.join(METRICS_FILE),
        serde_json::to_string_pretty(&metrics)?.as_bytes(),
    )?;
    let cos = r
        .held_out_cosine
        .map_or("n/a".to_string(), |c| format!("{c:.4}"));
    println!(
        "held-out mean cosine to the teacher {cos} on {} texts; student {} layers, {} of {} parameters; \
         {} steps on {} texts in {:.1} s (final loss {:.6}); wrote {}",
        r.held_out_texts,
        layers.len(),
        r.student_params,
        r.teacher_params,
        r.steps,
        r.train_texts,
        r.seconds,
        r.final_loss,
        a.out.display()
    );
    if let Some(w) = r.weak() {
        eprintln!("warning: {w}");
    }
    Ok(())
}
