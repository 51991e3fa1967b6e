//! `reuse lora merge` and `reuse lora train`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use reuse_core::data::labelled::load_labelled;
use reuse_core::data::majority_baseline;
use reuse_core::models::{Bert, BertClassifier, SentenceEncoder, TokenizedDataset};
use reuse_core::trainer::accuracy;
use reuse_core::trainer::{RunStateConfig, SaveParams, Technique};
use reuse_core::{Model, Schedule, TrainConfig, Trainer};
use reuse_peft::config::TargetModules;
use reuse_peft::{LoraConfig, LoraModel};
use tch::{Device, Kind};

use crate::shared::{note_set_aside, parse_device};

/// `reuse lora ...`
#[derive(clap::Subcommand)]
pub enum Command {
    /// Merge a PEFT LoRA adapter into its base model and write a complete model folder
    /// that transformers and sentence-transformers load as they load the base.
    Merge(MergeArgs),
    /// Train LoRA + a classification head on labelled text (TSV, CSV or JSON Lines, or
    /// the Debian sections fixture) and write a PEFT adapter folder (head under
    /// modules_to_save) with its dev and test accuracy; or, with `--task causal-lm`,
    /// LoRA on a causal LM (.gguf or decoder folder) by next-token loss on prompt /
    /// response pairs or plain text, evaluated by response NLL.
    Train(Box<TrainArgs>),
}

/// Arguments of `reuse lora merge`.
#[derive(clap::Args)]
pub struct MergeArgs {
    /// Base model folder (config.json, model.safetensors, tokenizer files), or a causal
    /// LM (.gguf or decoder folder): written out as an f32 Hugging Face folder.
    #[arg(long)]
    model: PathBuf,
    /// PEFT adapter folder (adapter_config.json, adapter_model.safetensors).
    #[arg(long)]
    adapter: PathBuf,
    /// Output model folder (must not exist, or be empty).
    #[arg(long)]
    out: PathBuf,
}

/// Arguments of `reuse lora train`.
#[derive(clap::Args)]
pub struct TrainArgs {
    /// Base model: a BERT folder (classification) or, for `--task causal-lm`, a .gguf
    /// file or a Llama-family folder.
    #[arg(long)]
    pub(crate) model: PathBuf,
    /// classification (a head on a sentence encoder) or causal-lm (next-token loss).
    #[arg(long, value_enum, default_value_t = Task::Classification)]
    pub(crate) task: Task,
    /// Labelled text: a .tsv, .csv or .jsonl file (optionally .gz) with a header /
    /// keys naming its columns, or the sections fixture (a headerless
    /// `split<TAB>label<TAB>text` .tsv.gz, or a folder holding `sections.tsv.gz`).
    #[arg(long)]
    pub(crate) data: PathBuf,
    /// Format of --data: tsv, csv or jsonl (default: from its extension).
    #[arg(long)]
    pub(crate) format: Option<String>,
    /// How the data file's columns are read and its splits held out.
    #[command(flatten)]
    pub(crate) columns: crate::columns::Columns,
    /// Prompt / response pairs (causal-lm).
    #[command(flatten)]
    pub(crate) pairs: crate::columns::Pairs,
    /// causal-lm: the dtype of the base and the adapter, f32 (default) or bf16.
    #[arg(long)]
    pub(crate) dtype: Option<String>,
    /// causal-lm on a .gguf: keep the base's Q8_0 / Q4_0 / Q4_1 linears in the file's
    /// codes while the adapter trains (QLoRA on the GGUF's own 4-bit weights): no dense
    /// copy of the frozen linears is held; each matmul rebuilds its weight, in backward
    /// too. Use --dtype f32 or f16 with it on the CPU.
    #[arg(long)]
    pub(crate) keep_codes: bool,
    /// Output adapter folder.
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    pub(crate) r: i64,
    /// LoRA alpha.
    #[arg(long, default_value_t = 16.0)]
    pub(crate) alpha: f64,
    /// LoRA dropout on the adapters' input (PEFT's lora_dropout).
    #[arg(long, default_value_t = 0.0)]
    pub(crate) dropout: f64,
    /// Target module suffixes, comma-separated, or `all-linear` (every linear but the
    /// output layer, as PEFT). Default: query,value (classification); all-linear
    /// (causal-lm: q/k/v/o/gate/up/down_proj, what QLoRA found needed to match full
    /// fine-tuning).
    #[arg(long, value_delimiter = ',')]
    pub(crate) target: Option<Vec<String>>,
    /// rsLoRA scaling (alpha / sqrt(r)).
    #[arg(long)]
    pub(crate) rslora: bool,
    /// DoRA.
    #[arg(long)]
    pub(crate) dora: bool,
    /// Epochs over the training split (3, as transformers' Trainer: one epoch left LoRA
    /// under-trained on the sections fixture, test accuracy 0.79 against 0.85).
    #[arg(long, default_value_t = 3)]
    pub(crate) epochs: usize,
    /// Stop after this many steps (overrides --epochs).
    #[arg(long)]
    pub(crate) max_steps: Option<usize>,
    /// Peak learning rate (linear warmup 10% then linear decay). Default 2e-3 for
    /// classification, chosen on the sections fixture's dev split (0.850 against 0.837
    /// at 1e-3, 3 epochs; the bench's dev sweep found 2e-3 to 3e-3 best for LoRA on
    /// MiniLM); 2e-4 for causal-lm (the usual LoRA SFT rate, PEFT's and TRL's examples).
    #[arg(long)]
    pub(crate) lr: Option<f64>,
    /// Batch size (default 16; causal-lm 8). Under torchrun or `reuse launch` this is
    /// the global batch, split among the processes, so N processes train the adapter
    /// one process trains.
    #[arg(long)]
    pub(crate) batch_size: Option<usize>,
    /// Longest token sequence kept (default 64; causal-lm 1024, at most the model's
    /// context). A causal-lm prompt that leaves no room for its response is an error.
    #[arg(long)]
    pub(crate) max_len: Option<usize>,
    /// Seed for the adapter init, dropout and data order.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// cpu or cuda (default: cuda if available).
    #[arg(long)]
    pub(crate) device: Option<String>,
    /// Write a resumable run state (`run_state.safetensors` in --out) every N steps
    /// and at the end.
    #[arg(long, value_name = "N")]
    pub(crate) save_every: Option<usize>,
    /// Continue from the run state in --out (run with the same arguments); the adapter
    /// is the one an uninterrupted run writes. Without a run state, starts afresh.
    #[arg(long)]
    pub(crate) resume: bool,
}

/// What `reuse lora train` trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Task {
    /// LoRA and a classification head on a sentence encoder.
    Classification,
    /// LoRA on a causal LM, next-token loss.
    #[value(name = "causal-lm")]
    CausalLm,
}

/// The run state file `reuse lora train --save-every` writes in its output folder.
pub const RUN_STATE: &str = "run_state.safetensors";

impl TrainArgs {
    /// The run state `--save-every` / `--resume` ask for over `total` steps (`None`:
    /// neither), with --out created when this process writes (`writes`).
    pub(crate) fn run_state(&self, total: usize, writes: bool) -> Result<Option<RunStateConfig>> {
        if !(self.save_every.is_some() || self.resume) {
            return Ok(None);
        }
        if writes {
            std::fs::create_dir_all(&self.out)
                .with_context(|| format!("cannot create {}", self.out.display()))?;
        }
        Ok(Some(RunStateConfig {
            path: self.out.join(RUN_STATE),
            every: self.save_every.unwrap_or(total.max(1)),
            params: SaveParams::Trainable,
        }))
    }

    /// With --resume, restores the trainer from the run state in --out (a note when
    /// there is none), printing where it resumes when `show`.
    pub(crate) fn resume(
        &self,
        t: &mut Trainer,
        model: &dyn reuse_core::Trainable,
        techniques: &mut [&mut dyn Technique],
        total: usize,
        show: bool,
    ) -> Result<()> {
        if !self.resume {
            return Ok(());
        }
        let path = self.out.join(RUN_STATE);
        match t.resume(model, techniques)? {
            Some(step) if show => {
                eprintln!("resuming from step {step} of {total} ({})", path.display())
            }
            None if show => eprintln!(
                "note: no run state at {}; starting from the beginning",
                path.display()
            ),
            _ => {}
        }
        Ok(())
    }
}

pub fn run(c: Command) -> Result<()> {
    match c {
        Command::Merge(a) => merge(a),
        Command::Train(a) => train(*a),
    }
}

fn copy_dir(src: &Path, dst: &Path, skip: &str) -> Result<()> {
    std::fs::create_dir_all(dst).with_context(|| format!("cannot create {}", dst.display()))?;
    for e in std::fs::read_dir(src).with_context(|| format!("cannot read {}", src.display()))? {
        let e = e?;
        let (from, to) = (e.path(), dst.join(e.file_name()));
        if e.file_name() == skip {
            continue;
        }
        if e.file_type()?.is_dir() {
            copy_dir(&from, &to, skip)?;
        } else {
            std::fs::copy(&from, &to).with_context(|| format!("cannot copy {}", from.display()))?;
        }
    }
    Ok(())
}

fn merge(a: MergeArgs) -> Result<()> {
    if crate::shared::is_causal_lm(&a.model) {
        return crate::lora_lm::merge(&a.model, &a.adapter, &a.out);
    }
    crate::shared::require_encoder(&a.model, "lora merge")?;
    if a.out.exists()
        && std::fs::read_dir(&a.out)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        bail!("--out {} already exists and is not empty", a.out.display());
    }
    let bert = Bert::load_with(
        &a.model,
        &reuse_quant::load_options(tch::Device::Cpu, Kind::Float),
    )
    .with_context(|| format!("cannot load model from {}", a.model.display()))?;
    let mut lm = LoraModel::new(bert);
    let loaded = lm
        .load_adapter(&a.adapter, "merge")
        .with_context(|| format!("cannot apply adapter {}", a.adapter.display()))?;
    note_set_aside(&a.adapter, &loaded.set_aside);
    let modules = loaded.modules;
    let quantized = lm.model.config.extra.contains_key("quantization_config");
    let merged = if quantized {
        // A quantized base: dequantize, add, requantize with the base's settings; the
        // folder stays quantized, and the error the requantization adds is printed.
        let mut bert = lm.into_inner();
        let err = reuse_quant::model::merge_requantize(&mut bert, "merge")?;
        eprintln!(
            "merged into the quantized base by requantizing {} linears: max |error| {:.3e}, relative (Frobenius) {:.3e} against base + adapter (for an exact merge, merge into `reuse dequantize`'s f32 folder)",
            err.layers, err.max_abs, err.relative
        );
        bert
    } else {
        lm.merge_and_unload()?
    };
    // Build the folder beside its destination, then move it into place in one rename.
    let parent = a
        .out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    let tmp = parent.join(format!(
        ".{}.tmp-{}",
        a.out
            .file_name()
            .context("--out has no folder name")?
            .to_string_lossy(),
        std::process::id()
    ));
    let result = (|| -> Result<()> {
        copy_dir(&a.model, &tmp, "model.safetensors")?;
        merged.state_dict().save(tmp.join("model.safetensors"))?;
        if a.out.exists() {
            std::fs::remove_dir(&a.out)?;
        }
        std::fs::rename(&tmp, &a.out)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result?;
    eprintln!(
        "merged {} LoRA modules into {}",
        modules.len(),
        a.out.display()
    );
    Ok(())
}

fn train(a: TrainArgs) -> Result<()> {
    if a.task == Task::CausalLm {
        return crate::lora_lm::train(&a);
    }
    for (flag, set) in [
        ("--prompt-column", a.pairs.prompt_column.is_some()),
        ("--response-column", a.pairs.response_column.is_some()),
        ("--chat", a.pairs.chat),
        ("--system", a.pairs.system.is_some()),
        ("--keep-codes", a.keep_codes),
        ("--dtype", a.dtype.is_some()),
    ] {
        if set {
            bail!("{flag} is for --task causal-lm");
        }
    }
    crate::shared::require_encoder(&a.model, "lora train")?;
    let lr = a.lr.unwrap_or(2e-3);
    let batch_size = a.batch_size.unwrap_or(16);
    let max_len = a.max_len.unwrap_or(64);
    let target = a
        .target
        .clone()
        .unwrap_or_else(|| vec!["query".into(), "value".into()]);
    // Launched as one rank of several (torchrun, `reuse launch`): join the group, train
    // on this rank's share of each batch, and let rank 0 alone write.
    let group = reuse_dist::ProcessGroup::from_env()
        .context("joining the process group (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)")?
        .map(std::sync::Arc::new);
    let main_rank = group.as_ref().is_none_or(|g| g.is_main());
    let mut device = parse_device(a.device.as_deref())?;
    if let (Some(g), Device::Cuda(_)) = (&group, device) {
        device = Device::Cuda(g.config().local_rank);
    }
    let data = if a.data.is_dir() {
        a.data.join("sections.tsv.gz")
    } else {
        a.data.clone()
    };
    if a.save_every == Some(0) {
        bail!("--save-every must be at least 1");
    }
    let opts = a.columns.options(a.format.as_deref(), a.seed)?;
    let splits = load_labelled(&data, &opts)?;
    let enc = SentenceEncoder::load_with(&a.model, &reuse_quant::load_options(device, Kind::Float))
        .with_context(|| format!("cannot load model from {}", a.model.display()))?;
    let train = TokenizedDataset::new(&enc.tokenizer, &splits.train, max_len)?;
    let dev = TokenizedDataset::new(&enc.tokenizer, &splits.dev, max_len)?;
    let test = TokenizedDataset::new(&enc.tokenizer, &splits.test, max_len)?;
    tch::manual_seed(a.seed as i64);
    let model = BertClassifier::new(enc.bert, splits.classes.len() as i64);
    let mut cfg = LoraConfig::new(a.r, a.alpha, &[]);
    cfg.target_modules = Some(TargetModules::List(target));
    cfg.lora_dropout = a.dropout;
    cfg.use_rslora = a.rslora;
    cfg.use_dora = a.dora;
    cfg.modules_to_save = Some(vec!["classifier".into()]);
    cfg.base_model_name_or_path = Some(a.model.display().to_string());
    cfg.task_type = Some("SEQ_CLS".into());
    cfg.extra
        .insert("reuse_classes".into(), serde_json::json!(splits.classes));
    let mut lm = LoraModel::new(model);
    let modules = lm.add_adapter("default", cfg)?;
    let base_params = lm.model.bert.params().count() - lm.adapter_parameter_count("default");
    let trainable = lm.trainable_parameters().count();
    let per_epoch = train_len(&train, batch_size);
    let total = a.max_steps.unwrap_or(per_epoch * a.epochs);
    let run_state = a.run_state(total, main_rank)?;
    let mut t = Trainer::new(TrainConfig {
        max_steps: Some(total),
        batch_size,
        lr,
        weight_decay: 0.01,
        schedule: Schedule::Linear { warmup: total / 10 },
        seed: a.seed,
        device,
        progress: main_rank,
        run_state,
        ..Default::default()
    });
    let mut dp = group.clone().map(reuse_dist::DataParallel::new);
    let shard = dp.as_ref().map(|d| d.shard(&train));
    let mut techniques: Vec<&mut dyn Technique> = Vec::new();
    if let Some(dp) = dp.as_mut() {
        techniques.push(dp);
    }
    a.resume(&mut t, &lm, &mut techniques, total, main_rank)?;
    let report = match &shard {
        Some(s) => t.fit(&lm, s, None, &mut techniques)?,
        None => t.fit(&lm, &train, None, &mut techniques)?,
    };
    drop(techniques);
    let eval = |d: &TokenizedDataset| -> Result<Option<f64>> {
        use reuse_core::data::BatchSource;
        Ok(if d.is_empty() {
            None
        } else if let Some(dp) = &dp {
            Some(dp.accuracy(&lm, d, 64, device)?)
        } else {
            Some(accuracy(&lm, d, 64, device)?)
        })
    };
    let dev_acc = eval(&dev)?;
    let test_acc = eval(&test)?;
    if !main_rank {
        return Ok(());
    }
    lm.save_adapter("default", &a.out)?;
    let metrics = serde_json::json!({
        "test_accuracy": test_acc,
        "dev_accuracy": dev_acc,
        "majority_baseline": majority_baseline(&splits.train.labels, &splits.test.labels),
        "steps": report.steps,
        "train_seconds": report.seconds,
        "trainable_params": trainable,
        "base_params": base_params,
        "lora_modules": modules.len(),
        "processes": group.as_ref().map_or(1, |g| g.world_size()),
        "classes": splits.classes,
    });
    reuse_core::checkpoint::write_atomic(
        &a.out.join("train_metrics.json"),
        serde_json::to_string_pretty(&metrics)?.as_bytes(),
    )?;
    let show = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.4}"));
    println!(
        "test accuracy {} (dev {}); {trainable} trainable of {base_params} base parameters; adapter in {}",
        show(test_acc),
        show(dev_acc),
        a.out.display()
    );
    Ok(())
}

fn train_len(d: &TokenizedDataset, batch: usize) -> usize {
    use reuse_core::data::BatchSource;
    d.len().div_ceil(batch.max(1))
}
