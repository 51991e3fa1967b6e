//! `reuse lora train --task causal-lm`: LoRA on a causal LM (a .gguf file or a
//! Llama-family folder) by next-token loss, on prompt / response pairs (loss on the
//! response, as TRL's completion-only loss) or on plain text packed into blocks. Writes a
//! PEFT `CAUSAL_LM` adapter folder and `train_metrics.json` (dev and test response NLL
//! before and after training).

use anyhow::{bail, Context, Result};
use reuse_core::data::labelled::{load_records, RecordOptions, RecordSplits};
use reuse_core::data::lm::{plain_exchange, PackedText, PromptResponse};
use reuse_core::data::BatchSource;
use reuse_core::models::lm::LanguageModel;
use reuse_core::trainer::{evaluate, Technique};
use reuse_core::{Evaluation, Model, Schedule, TrainConfig, Trainer};
use reuse_peft::config::TargetModules;
use reuse_peft::{LoraConfig, LoraModel};
use tch::Device;

use crate::lora::TrainArgs;
use crate::shared::{load_lm, parse_device, parse_dtype};

/// Default longest sequence for causal-LM training (TRL's SFT `max_length`).
const MAX_LEN: usize = 1024;
/// Batch size of the NLL evaluations.
const EVAL_BATCH: usize = 8;

/// The training, dev and test sets of a causal-LM run.
pub(crate) struct LmData {
    pub(crate) train: Box<dyn BatchSource>,
    pub(crate) dev: Option<Box<dyn BatchSource>>,
    pub(crate) test: Option<Box<dyn BatchSource>>,
    /// `token` (packed text) or `response` (pairs): what the NLL is over.
    pub(crate) what: &'static str,
}

/// How a causal-LM command reads its data: the options `lora train --task causal-lm`,
/// `distill lm` and `distill cache` share, so that a teacher cache and the student that
/// reads it see the same examples.
pub(crate) struct LmDataSpec<'a> {
    pub(crate) data: &'a std::path::Path,
    pub(crate) format: Option<&'a str>,
    pub(crate) prompt_column: Option<&'a str>,
    pub(crate) response_column: Option<&'a str>,
    pub(crate) text_column: &'a str,
    pub(crate) split_column: Option<&'a str>,
    pub(crate) dev_fraction: f64,
    pub(crate) test_fraction: f64,
    pub(crate) seed: u64,
    pub(crate) chat: bool,
    pub(crate) system: Option<&'a str>,
    /// The model file, for messages.
    pub(crate) model: &'a std::path::Path,
}

impl<'a> LmDataSpec<'a> {
    /// What a command's data options (`data`, `--format`, the column and pair groups,
    /// the hold-out `seed`) say, for a model at `model`.
    pub(crate) fn new(
        data: &'a std::path::Path,
        format: Option<&'a str>,
        columns: &'a crate::columns::Columns,
        pairs: &'a crate::columns::Pairs,
        seed: u64,
        model: &'a std::path::Path,
    ) -> Self {
        Self {
            data,
            format,
            prompt_column: pairs.prompt_column.as_deref(),
            response_column: pairs.response_column.as_deref(),
            text_column: &columns.text_column,
            split_column: columns.split_column.as_deref(),
            dev_fraction: columns.dev_fraction,
            test_fraction: columns.test_fraction,
            seed,
            chat: pairs.chat,
            system: pairs.system.as_deref(),
            model,
        }
    }

    fn of_train_args(a: &'a TrainArgs) -> Self {
        Self::new(
            &a.data,
            a.format.as_deref(),
            &a.columns,
            &a.pairs,
            a.seed,
            &a.model,
        )
    }
}

/// Pairs (`--prompt-column` / `--response-column`) or packed text (`--text-column`).
pub(crate) fn lm_data(a: &LmDataSpec<'_>, lm: &LanguageModel, max_len: usize) -> Result<LmData> {
    let pairs = a.prompt_column.is_some() || a.response_column.is_some();
    let eos = *lm
        .model
        .config
        .token_ids("eos_token_id")
        .first()
        .context("the model's config has no eos_token_id")?;
    let pad = lm.model.config.pad_token_id().unwrap_or(eos);
    let columns: Vec<String> = if pairs {
        vec![
            a.prompt_column.unwrap_or("prompt").into(),
            a.response_column.unwrap_or("response").into(),
        ]
    } else {
        vec![a.text_column.into()]
    };
    let opts = RecordOptions {
        format: a.format.map(str::parse).transpose()?,
        columns,
        split_column: a.split_column.map(String::from),
        dev_fraction: a.dev_fraction,
        test_fraction: a.test_fraction,
        seed: a.seed,
    };
    let RecordSplits { train, dev, test } = load_records(a.data, &opts)
        .with_context(|| format!("cannot read --data {}", a.data.display()))?;
    if !pairs {
        if a.chat || a.system.is_some() {
            bail!("--chat and --system need prompt / response pairs (--prompt-column, --response-column)");
        }
        let packed =
            |rows: Vec<Vec<String>>, split: &str| -> Result<Option<Box<dyn BatchSource>>> {
                if rows.is_empty() {
                    return Ok(None);
                }
                let texts: Vec<String> = rows.into_iter().map(|mut r| r.remove(0)).collect();
                let p = PackedText::new(&lm.tokenizer, &texts, eos, max_len)
                    .with_context(|| format!("{} ({split} split)", a.data.display()))?;
                Ok(Some(Box::new(p)))
            };
        return Ok(LmData {
            train: packed(train, "train")?.context("no training rows")?,
            dev: packed(dev, "dev")?,
            test: packed(test, "test")?,
            what: "token",
        });
    }
    if a.system.is_some() && !a.chat {
        bail!("--system is a chat message: give --chat too");
    }
    let chat = if a.chat {
        Some(lm.chat.as_ref().with_context(|| {
            format!(
                "--chat: {} has no chat template (train without --chat for plain prompt + response text)",
                a.model.display()
            )
        })?)
    } else {
        None
    };
    let make = |rows: Vec<Vec<String>>, split: &str| -> Result<Option<Box<dyn BatchSource>>> {
        if rows.is_empty() {
            return Ok(None);
        }
        let ids = rows
            .iter()
            .map(|r| match chat {
                Some(t) => t.exchange(&lm.tokenizer, a.system, &r[0], &r[1]),
                None => plain_exchange(&lm.tokenizer, &r[0], &r[1], eos),
            })
            .collect::<reuse_core::Result<Vec<_>>>()?;
        let d = PromptResponse::from_ids(ids, pad, max_len).with_context(|| {
            format!(
                "{} ({split} split, examples counted from 0 in file order)",
                a.data.display()
            )
        })?;
        Ok(Some(Box::new(d)))
    };
    Ok(LmData {
        train: make(train, "train")?.context("no training rows")?,
        dev: make(dev, "dev")?,
        test: make(test, "test")?,
        what: "response",
    })
}

/// Mean token NLL of `data` (`None` when there is none).
pub(crate) fn nll(
    model: &dyn reuse_core::Trainable,
    data: Option<&dyn BatchSource>,
    device: Device,
) -> Result<Option<f64>> {
    let Some(data) = data.filter(|d| !d.is_empty()) else {
        return Ok(None);
    };
    Ok(match evaluate(model, data, EVAL_BATCH, device)? {
        Evaluation::TokenNll { nll, .. } => Some(nll),
        other => bail!("expected a token NLL from the causal LM, got {other:?}"),
    })
}

pub fn train(a: &TrainArgs) -> Result<()> {
    if a.save_every == Some(0) {
        bail!("--save-every must be at least 1");
    }
    let world = std::env::var("WORLD_SIZE")
        .ok()
        .and_then(|w| w.trim().parse::<usize>().ok());
    if let Some(w) = world.filter(|w| *w > 1) {
        bail!(
            "WORLD_SIZE is {w}: `lora train --task causal-lm` runs in one process only (every rank would train alone and write --out); run it without torchrun / `reuse launch`"
        );
    }
    let device = parse_device(a.device.as_deref())?;
    let kind = parse_dtype(a.dtype.as_deref().unwrap_or("f32"))?;
    let lr = a.lr.unwrap_or(2e-4);
    let batch_size = a.batch_size.unwrap_or(8);
    if batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let lm = load_lm(&a.model, device, kind, a.keep_codes)?;
    let context = lm.model.config.max_position_embeddings.max(1) as usize;
    let max_len = match a.max_len {
        Some(m) if m > context => bail!(
            "--max-len {m} is longer than the model's context ({context} tokens, max_position_embeddings in {})",
            a.model.display()
        ),
        Some(0) => bail!("--max-len must be at least 1"),
        Some(m) => m,
        None => MAX_LEN.min(context),
    };
    let data = lm_data(&LmDataSpec::of_train_args(a), &lm, max_len)?;
    tch::manual_seed(a.seed as i64);
    let LanguageModel { model, .. } = lm;
    let base_params: i64 = model.params().count() as i64;
    let mut cfg = LoraConfig::new(a.r, a.alpha, &[]);
    let target = a
        .target
        .clone()
        .unwrap_or_else(|| vec!["all-linear".into()]);
    cfg.target_modules = Some(TargetModules::List(target));
    cfg.lora_dropout = a.dropout;
    cfg.use_rslora = a.rslora;
    cfg.use_dora = a.dora;
    cfg.base_model_name_or_path = Some(a.model.display().to_string());
    cfg.task_type = Some("CAUSAL_LM".into());
    let mut peft = LoraModel::new(model);
    let modules = peft.add_adapter("default", cfg)?;
    let trainable = peft.trainable_parameters().count();
    eprintln!(
        "{} train / {} dev / {} test examples; {} LoRA modules, {trainable} trainable parameters",
        data.train.len(),
        data.dev.as_ref().map_or(0, |d| d.len()),
        data.test.as_ref().map_or(0, |d| d.len()),
        modules.len()
    );
    if data.dev.is_some() {
        eprintln!("dev {} NLL before training...", data.what);
    }
    let before_dev = nll(&peft, data.dev.as_deref(), device)?;
    let per_epoch = data.train.len().div_ceil(batch_size);
    let total = a.max_steps.unwrap_or(per_epoch * a.epochs);
    let run_state = a.run_state(total, true)?;
    let mut t = Trainer::new(TrainConfig {
        max_steps: Some(total),
        batch_size,
        lr,
        weight_decay: 0.0,
        schedule: Schedule::Linear { warmup: total / 10 },
        seed: a.seed,
        device,
        progress: true,
        run_state,
        ..Default::default()
    });
    let mut techniques: Vec<&mut dyn Technique> = Vec::new();
    a.resume(&mut t, &peft, &mut techniques, total, true)?;
    let report = t.fit(&peft, data.train.as_ref(), None, &mut techniques)?;
    eprintln!("dev and test {} NLL...", data.what);
    let dev_nll = nll(&peft, data.dev.as_deref(), device)?;
    let test_nll = nll(&peft, data.test.as_deref(), device)?;
    peft.save_adapter("default", &a.out)?;
    let metrics = serde_json::json!({
        "task": "causal-lm",
        "loss_on": data.what,
        "dev_nll_before": before_dev,
        "dev_nll": dev_nll,
        "test_nll": test_nll,
        "steps": report.steps,
        "train_seconds": report.seconds,
        "trainable_params": trainable,
        "base_params": base_params,
        "trainable_share": trainable as f64 / base_params as f64,
        "lora_modules": modules.len(),
        "train_examples": data.train.len(),
        "dev_examples": data.dev.as_ref().map_or(0, |d| d.len()),
        "test_examples": data.test.as_ref().map_or(0, |d| d.len()),
        "max_len": max_len,
        "lr": lr,
        "keep_codes": a.keep_codes,
        "batch_size": batch_size,
    });
    reuse_core::checkpoint::write_atomic(
        &a.out.join("train_metrics.json"),
        serde_json::to_string_pretty(&metrics)?.as_bytes(),
    )?;
    let show = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.4}"));
    println!(
        "test {} NLL {} (dev {}, {} before training); {trainable} trainable of {base_params} base parameters ({:.2}%); adapter in {}",
        data.what,
        show(test_nll),
        show(dev_nll),
        show(before_dev),
        100.0 * trainable as f64 / base_params as f64,
        a.out.display()
    );
    Ok(())
}

/// `reuse lora merge` on a causal LM: the adapter merged into the base (dequantized to
/// f32 when it is a GGUF), written as a Hugging Face folder transformers loads, whole or
/// not at all.
pub fn merge(
    model: &std::path::Path,
    adapter: &std::path::Path,
    out: &std::path::Path,
) -> Result<()> {
    reuse_core::models::folder::check_out(out, false)?;
    let lm = load_lm(model, Device::Cpu, tch::Kind::Float, false)?;
    let lm = crate::adapters::merged(lm, adapter)?;
    lm.save_folder(out, false)
        .with_context(|| format!("cannot write {}", out.display()))?;
    eprintln!(
        "merged {} into {} and wrote {}",
        adapter.display(),
        model.display(),
        out.display()
    );
    Ok(())
}
