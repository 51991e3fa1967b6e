//! `reuse distill lm`: a smaller causal LM cut from a teacher's blocks (or given as a
//! folder) and trained by token-level KD from the live teacher or from its top-k cache,
//! mixed with next-token cross-entropy; written as a Hugging Face `LlamaForCausalLM`
//! folder with `distill_metrics.json`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use reuse_core::models::lm::LanguageModel;
use reuse_core::{Model, Schedule, TrainConfig, Trainer};
use reuse_distill::lm::{check_same_vocabulary, student_language_model};
use reuse_distill::losses::{Divergence, KdConfig, TopKTail};
use reuse_distill::{dataset_fingerprint, Distiller, Teacher, TeacherCache, TeacherSource};

use crate::lora_lm::{lm_data, nll, LmDataSpec};
use crate::shared::{load_lm, parse_device, parse_dtype};

/// Default longest sequence (the block size of packed text) of `distill lm` and of a
/// causal LM's `distill cache`.
pub(crate) const MAX_LEN: usize = 512;

/// Arguments of `reuse distill lm`.
#[derive(clap::Args)]
pub struct LmArgs {
    /// The teacher: a .gguf file or a Llama-family model folder.
    #[arg(long)]
    teacher: PathBuf,
    /// A LoRA adapter (PEFT folder) merged into the teacher first; repeatable.
    #[arg(long)]
    adapter: Vec<PathBuf>,
    /// The teacher's blocks the student keeps, in increasing order (e.g.
    /// 0,3,6,9,13,16,19,22,26,29): embeddings, final norm and head are copied.
    #[arg(long, value_delimiter = ',', conflicts_with = "student")]
    layers: Vec<usize>,
    /// Or: a student model folder to train (a .gguf or Llama-family folder) with the
    /// teacher's tokenizer (checked token by token).
    #[arg(long)]
    student: Option<PathBuf>,
    /// Training text: one text per line (.txt, packed into blocks of --max-len), or a
    /// .tsv / .csv / .jsonl read as `lora train --task causal-lm` reads it (--text-column,
    /// or --prompt-column and --response-column for pairs).
    #[arg(long, alias = "data")]
    texts: PathBuf,
    /// Format of --texts: lines, tsv, csv or jsonl (default: from its extension).
    #[arg(long)]
    format: Option<String>,
    /// Prompt / response pairs (the KD and CE losses are then on the responses).
    #[command(flatten)]
    pairs: crate::columns::Pairs,
    /// How the columns are read and the dev / test splits held out.
    #[command(flatten)]
    columns: crate::columns::Columns,
    /// Seed of the hold-out, the batch order and dropout.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// A teacher cache (`reuse distill cache` on the same teacher, texts and options):
    /// KD from its per-token top-k log-probabilities, no teacher forward pass per step.
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Optimizer steps (default: --epochs over the training split).
    #[arg(long)]
    max_steps: Option<usize>,
    /// Passes over the training split when --max-steps is not given.
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    /// Examples (packed blocks or pairs) per step.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// AdamW learning rate (linear schedule, 10% warmup).
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    /// Longest sequence: the block size of packed text, the cut of long pairs.
    #[arg(long, default_value_t = MAX_LEN)]
    max_len: usize,
    /// Divergence: fkl (forward KL, Hinton / DistillKit), rkl (reverse KL, MiniLLM) or
    /// jsd (generalised JSD with --beta, GKD).
    #[arg(long, default_value = "fkl")]
    loss: String,
    /// JSD's interpolation weight of the teacher, in (0, 1).
    #[arg(long, default_value_t = 0.5)]
    beta: f64,
    /// Softmax temperature of both distributions.
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// Weight of next-token cross-entropy on the references; the KD term gets 1 - alpha.
    #[arg(long, default_value_t = 0.5)]
    alpha: f64,
    /// cpu or cuda (default: cuda if available).
    #[arg(long)]
    device: Option<String>,
    /// Student and teacher dtype: f32 (default) or bf16.
    #[arg(long)]
    dtype: Option<String>,
    /// Output model folder (must not exist, or be empty, unless --overwrite).
    #[arg(long)]
    out: PathBuf,
    /// Replace a non-empty --out.
    #[arg(long)]
    overwrite: bool,
}

/// The divergence `--loss` and `--beta` name.
pub(crate) fn divergence(loss: &str, beta: f64) -> Result<Divergence> {
    Ok(match loss {
        "fkl" | "forward-kl" | "kl" => Divergence::ForwardKl,
        "rkl" | "reverse-kl" => Divergence::ReverseKl,
        "jsd" => Divergence::Jsd { beta },
        other => bail!("--loss: expected fkl, rkl or jsd, found `{other}`"),
    })
}

impl LmArgs {
    fn data_spec(&self) -> LmDataSpec<'_> {
        LmDataSpec::new(
            &self.texts,
            self.format.as_deref(),
            &self.columns,
            &self.pairs,
            self.seed,
            &self.teacher,
        )
    }
}

/// The teacher with its adapters merged.
pub(crate) fn load_teacher(
    path: &std::path::Path,
    adapters: &[PathBuf],
    device: tch::Device,
    kind: tch::Kind,
) -> Result<LanguageModel> {
    let mut lm = load_lm(path, device, kind, false)?;
    for a in adapters {
        lm = crate::adapters::merged(lm, a)
            .with_context(|| format!("cannot merge --adapter {} into the teacher", a.display()))?;
    }
    Ok(lm)
}

pub fn run(a: LmArgs) -> Result<()> {
    reuse_core::models::folder::check_out(&a.out, a.overwrite)?;
    let device = parse_device(a.device.as_deref())?;
    let kind = parse_dtype(a.dtype.as_deref().unwrap_or("f32"))?;
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let kd = KdConfig::new(a.temperature).with_divergence(divergence(&a.loss, a.beta)?);
    kd.validate()?;
    let teacher = load_teacher(&a.teacher, &a.adapter, device, kind)?;
    let student = match (&a.student, a.layers.is_empty()) {
        (Some(dir), _) => {
            let s = load_lm(dir, device, kind, false)?;
            check_same_vocabulary(&s.tokenizer, &teacher.tokenizer)
                .with_context(|| format!("--student {}", dir.display()))?;
            s
        }
        (None, false) => student_language_model(&teacher, &a.layers)
            .with_context(|| format!("cannot cut a student from {}", a.teacher.display()))?,
        (None, true) => {
            bail!("name the student: --layers 0,3,6,... (blocks of the teacher) or --student DIR")
        }
    };
    let context = student.model.config.max_position_embeddings.max(1) as usize;
    if a.max_len == 0 || a.max_len > context {
        bail!(
            "--max-len {} must lie in 1..={context} (the model's max_position_embeddings)",
            a.max_len
        );
    }
    let data = lm_data(&a.data_spec(), &teacher, a.max_len)?;
    let teacher_fp = Teacher::fingerprint(&teacher.model);
    let cache = match &a.cache {
        Some(dir) => {
            let data_fp = dataset_fingerprint(data.train.as_ref())?;
            let c =
                TeacherCache::open(dir, Some(&teacher_fp), Some(&data_fp)).with_context(|| {
                    format!(
                        "--cache {}: it must be built by `reuse distill cache` from this teacher \
                     (adapters merged) on these texts with the same options",
                        dir.display()
                    )
                })?;
            Some(c)
        }
        None => None,
    };
    let (s_params, t_params) = (
        student.model.params().count() as i64,
        teacher.model.params().count() as i64,
    );
    eprintln!(
        "student {} blocks, {s_params} parameters (teacher {} blocks, {t_params}); {} train / {} dev / {} test examples",
        student.model.layers.len(),
        teacher.model.layers.len(),
        data.train.len(),
        data.dev.as_ref().map_or(0, |d| d.len()),
        data.test.as_ref().map_or(0, |d| d.len()),
    );
    let dev = data.dev.as_deref();
    let teacher_dev = nll(&teacher.model, dev, device)?;
    let before_dev = nll(&student.model, dev, device)?;
    let source = match &cache {
        Some(c) => TeacherSource::Cached(c),
        None => TeacherSource::Live(&teacher.model),
    };
    let mut distiller = Distiller::new(source, kd, a.alpha)?;
    distiller.tail = match kd.divergence {
        Divergence::ForwardKl => TopKTail::Renormalize,
        _ => TopKTail::RestBucket,
    };
    let per_epoch = data.train.len().div_ceil(a.batch_size);
    let total = a.max_steps.unwrap_or(per_epoch * a.epochs.max(1));
    let mut t = Trainer::new(TrainConfig {
        max_steps: Some(total),
        batch_size: a.batch_size,
        lr: a.lr,
        weight_decay: 0.0,
        schedule: Schedule::Linear { warmup: total / 10 },
        seed: a.seed,
        device,
        progress: true,
        ..Default::default()
    });
    t.begin_task(
        0,
        &student.model,
        data.train.as_ref(),
        &mut [&mut distiller],
    )?;
    let report = if total > 0 {
        Some(t.fit(
            &student.model,
            data.train.as_ref(),
            None,
            &mut [&mut distiller],
        )?)
    } else {
        None
    };
    let dev_nll = nll(&student.model, dev, device)?;
    let test_nll = nll(&student.model, data.test.as_deref(), device)?;
    let teacher_test = nll(&teacher.model, data.test.as_deref(), device)?;
    drop(distiller);
    student
        .save_folder(&a.out, a.overwrite)
        .with_context(|| format!("cannot write {}", a.out.display()))?;
    let metrics = serde_json::json!({
        "teacher": a.teacher.display().to_string(),
        "layers": a.layers,
        "student_params": s_params,
        "teacher_params": t_params,
        "loss_on": data.what,
        "divergence": a.loss,
        "beta": a.beta,
        "temperature": a.temperature,
        "alpha": a.alpha,
        "cache": a.cache.as_ref().map(|c| c.display().to_string()),
        "steps": report.as_ref().map_or(0, |r| r.steps),
        "train_seconds": report.as_ref().map_or(0.0, |r| r.seconds),
        "lr": a.lr,
        "batch_size": a.batch_size,
        "max_len": a.max_len,
        "dev_nll_before": before_dev,
        "dev_nll": dev_nll,
        "test_nll": test_nll,
        "teacher_dev_nll": teacher_dev,
        "teacher_test_nll": teacher_test,
    });
    reuse_core::checkpoint::write_atomic(
        &a.out.join("distill_metrics.json"),
        serde_json::to_string_pretty(&metrics)?.as_bytes(),
    )?;
    let show = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.4}"));
    println!(
        "student ({} blocks, {:.1}% of the teacher's parameters): dev {} NLL {} ({} before training; teacher {}), test {} (teacher {}); wrote {}",
        student.model.layers.len(),
        100.0 * s_params as f64 / t_params as f64,
        data.what,
        show(dev_nll),
        show(before_dev),
        show(teacher_dev),
        show(test_nll),
        show(teacher_test),
        a.out.display()
    );
    Ok(())
}
