//! `reuse distill cache`: run a teacher (a classifier, or a causal LM per token) once
//! over a dataset and store its outputs as a teacher cache (reuse-distill's format).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use reuse_core::data::labelled::load_labelled;
use reuse_core::data::{BatchSource, TextDataset};
use reuse_core::models::{BertClassifier, SentenceEncoder, TokenizedDataset};
use reuse_core::Checkpoint;
use reuse_distill::cache::{build_cache_part, build_cache_with_progress, BuildPart, CacheConfig};
use reuse_peft::{LoraConfig, LoraModel};
use tch::{Device, Kind};

use crate::shared::{parse_device, parse_dtype, read_lines};

/// `reuse distill ...`
#[derive(clap::Subcommand)]
pub enum Command {
    /// Run a teacher classifier once over a dataset and store its outputs (full logits,
    /// or top-k log-probabilities and indices) in safetensors shards, so that students
    /// distil from the cache with no teacher in memory. An interrupted build resumes when
    /// run again with the same arguments; a folder made by another teacher, dataset or
    /// configuration is refused and left as it is.
    ///
    /// The teacher is a LoRA classifier as `reuse lora train` writes it: its output
    /// folder (adapter_config.json, adapter_model.safetensors with the head under
    /// modules_to_save) as --teacher, on the base model named by --base or else by the
    /// adapter's base_model_name_or_path; or the base model folder as --teacher with
    /// --adapter DIR.
    ///
    /// Or a causal LM (a .gguf file or a Llama-family folder, --adapter merged): its
    /// top-k next-token log-probabilities at every token of --data, read as
    /// `reuse distill lm --texts` reads it (the same options make the same examples),
    /// for `reuse distill lm --cache`.
    Cache(Box<CacheArgs>),
    /// A smaller causal LM: cut blocks from the teacher (or take --student), train them
    /// by token-level KD (forward / reverse KL or JSD, mixed with next-token
    /// cross-entropy) from the live teacher or its cache, write a Hugging Face folder.
    Lm(Box<crate::distill_lm::LmArgs>),
    /// A smaller sentence-embedding model: cut layers from the teacher, train them to give
    /// its embeddings on unlabeled text, write a sentence-transformers folder.
    Embed(Box<crate::distill_embed::Args>),
    /// Trim a model's vocabulary to the tokens of a corpus: the word-embedding table
    /// keeps only their rows and tokenizer.json / vocab.txt are renumbered. Text made of
    /// the corpus's words tokenizes and embeds exactly as before; the folder loads in
    /// transformers and sentence-transformers. Trim before `reuse quantize`.
    TrimVocab(TrimArgs),
}

/// Arguments of `reuse distill trim-vocab`.
#[derive(clap::Args)]
pub struct TrimArgs {
    /// A BERT model folder (f32, not quantized) with a WordPiece tokenizer.json.
    #[arg(long)]
    model: PathBuf,
    /// The corpus whose tokens are kept: one text per line, or a .tsv / .tsv.gz whose
    /// last column is the text.
    #[arg(long)]
    texts: PathBuf,
    /// Output model folder (must not exist, or be empty, unless --overwrite).
    #[arg(long)]
    out: PathBuf,
    /// Replace a non-empty --out.
    #[arg(long)]
    overwrite: bool,
}

/// Arguments of `reuse distill cache`.
#[derive(clap::Args)]
pub struct CacheArgs {
    /// The teacher: a `reuse lora train` output folder (or, with --adapter, its base
    /// model folder).
    #[arg(long)]
    teacher: PathBuf,
    /// Base model folder of the teacher's adapter (default: the adapter's recorded
    /// base_model_name_or_path).
    #[arg(long)]
    base: Option<PathBuf>,
    /// The teacher's adapter folder, when --teacher is its base model folder (a causal
    /// LM teacher: merged into it).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The examples: labelled text read as `reuse lora train --data` reads it (.tsv,
    /// .csv, .jsonl, optionally .gz, or the sections fixture), or unlabelled text, one
    /// text per line (a .txt file, or --format lines). Tokenized with the teacher's
    /// tokenizer; the cache records a hash of the token ids and labels, and a student
    /// must read the same data with the same options to use it.
    #[arg(long)]
    data: PathBuf,
    /// Format of --data: tsv, csv, jsonl or lines (default: from its extension).
    #[arg(long)]
    format: Option<String>,
    /// How the data file's columns are read and its splits held out.
    #[command(flatten)]
    columns: crate::columns::Columns,
    /// Seed of the dev/test hold-out.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// A causal LM teacher's prompt / response pairs (read as `distill lm` reads them).
    #[command(flatten)]
    pairs: crate::columns::Pairs,
    /// The split of labelled --data to cache: train, dev, test, or all (train, dev and
    /// test in that order). Unlabelled text is cached whole.
    #[arg(long, default_value = "train")]
    split: String,
    /// Output cache folder (created; a partial cache there is resumed).
    #[arg(long)]
    out: PathBuf,
    /// Store the top-K log-probabilities (at T = 1) and their class indices instead of
    /// the full logits (a causal LM teacher: default 64, at most 128 advised).
    #[arg(long, value_name = "K")]
    top_k: Option<usize>,
    /// Storage type of the cached values: f32, f16 or bf16 (default: f16 with --top-k,
    /// else f32).
    #[arg(long)]
    dtype: Option<String>,
    /// Also store the pooled features the teacher's head sees.
    #[arg(long)]
    pooled: bool,
    /// The distillation temperature to record with the cache (values are stored at T = 1).
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// Longest token sequence kept (default 64; a causal LM teacher: 512, the block
    /// size of packed text, as `distill lm`).
    #[arg(long)]
    max_len: Option<usize>,
    /// Examples per teacher forward pass.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Examples per shard.
    #[arg(long, default_value_t = 4096)]
    shard_size: usize,
    /// cpu or cuda (default: cuda if available).
    #[arg(long)]
    device: Option<String>,
}

pub fn run(c: Command) -> Result<()> {
    match c {
        Command::Cache(a) if crate::shared::is_causal_lm(&a.teacher) => cache_lm(*a),
        Command::Cache(a) => cache(*a),
        Command::Lm(a) => crate::distill_lm::run(*a),
        Command::Embed(a) => crate::distill_embed::run(*a),
        Command::TrimVocab(a) => trim_vocab(a),
    }
}

fn trim_vocab(a: TrimArgs) -> Result<()> {
    crate::shared::require_encoder(&a.model, "distill trim-vocab")?;
    let texts = crate::shared::read_texts(&a.texts)?;
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let r = reuse_distill::vocab::trim_vocab_folder(&a.model, &refs, &a.out, a.overwrite)
        .with_context(|| format!("cannot trim the vocabulary of {}", a.model.display()))?;
    println!(
        "kept {} of {} tokens ({} texts); model.safetensors {:.1} MB -> {:.1} MB; wrote {}",
        r.vocab_after,
        r.vocab_before,
        texts.len(),
        r.bytes_before as f64 / 1e6,
        r.bytes_after as f64 / 1e6,
        a.out.display()
    );
    Ok(())
}

/// A LoRA classifier, the data tokenized with its tokenizer, and its class names when
/// the adapter recorded them.
struct LoadedTeacher {
    model: LoraModel<BertClassifier>,
    data: TokenizedDataset,
    classes: Option<Vec<String>>,
}

fn load_teacher(a: &CacheArgs, device: Device, texts: &TextDataset) -> Result<LoadedTeacher> {
    let (base, adapter) = match (&a.adapter, &a.base) {
        (Some(_), Some(_)) => bail!(
            "give either --adapter (with the base model as --teacher) or --base (with the \
             adapter folder as --teacher), not both"
        ),
        (Some(adapter), None) => (a.teacher.clone(), adapter.clone()),
        (None, base) => {
            if !a.teacher.join("adapter_config.json").exists() {
                bail!(
                    "--teacher {}: no adapter_config.json; the teacher must be a classifier: a \
                     `reuse lora train` output folder, or a base model folder with --adapter DIR",
                    a.teacher.display()
                );
            }
            let base = match base {
                Some(b) => b.clone(),
                None => {
                    let cfg = LoraConfig::load(&a.teacher.join("adapter_config.json"))?;
                    let Some(b) = cfg.base_model_name_or_path else {
                        bail!(
                            "--teacher {}: the adapter names no base model; give --base DIR",
                            a.teacher.display()
                        );
                    };
                    let b = PathBuf::from(b);
                    if !b.join("config.json").exists() {
                        bail!(
                            "--teacher {}: its base model {} is not a model folder here; give --base DIR",
                            a.teacher.display(),
                            b.display()
                        );
                    }
                    b
                }
            };
            (base, a.teacher.clone())
        }
    };
    let config = LoraConfig::load(&adapter.join("adapter_config.json"))?;
    let weights = adapter.join("adapter_model.safetensors");
    let ck = Checkpoint::load(&weights, Device::Cpu)?;
    let Some(head) = ck.get("base_model.model.classifier.weight") else {
        bail!(
            "{}: the adapter has no classification head (`classifier` in modules_to_save); \
             a teacher is a classifier such as `reuse lora train` writes",
            weights.display()
        );
    };
    let num_classes = head.size()[0];
    let enc = SentenceEncoder::load_with(&base, &reuse_quant::load_options(device, Kind::Float))
        .with_context(|| {
            format!(
                "cannot load the teacher's base model from {}",
                base.display()
            )
        })?;
    let classes: Option<Vec<String>> = config
        .extra
        .get("reuse_classes")
        .and_then(|v| serde_json::from_value(v.clone()).ok());
    let mut model = LoraModel::new(BertClassifier::new(enc.bert, num_classes));
    model
        .load_adapter_from(config, &ck, &weights, "default")
        .with_context(|| format!("cannot apply the adapter {}", adapter.display()))?;
    let data = TokenizedDataset::new(&enc.tokenizer, texts, a.max_len.unwrap_or(64))?;
    Ok(LoadedTeacher {
        model,
        data,
        classes,
    })
}

fn is_lines(a: &CacheArgs) -> bool {
    match a.format.as_deref() {
        Some(f) => matches!(f, "lines" | "txt" | "text"),
        None => {
            let name = a.data.to_string_lossy().to_ascii_lowercase();
            name.ends_with(".txt")
        }
    }
}

/// The texts and labels to cache (labels -100 for unlabelled text) and the data's class
/// names when labelled.
fn read_data(a: &CacheArgs) -> Result<(TextDataset, Option<Vec<String>>)> {
    if is_lines(a) {
        let texts = read_lines(&a.data)?;
        let labels = vec![-100; texts.len()];
        return Ok((TextDataset { texts, labels }, None));
    }
    let data = if a.data.is_dir() {
        a.data.join("sections.tsv.gz")
    } else {
        a.data.clone()
    };
    let opts = a.columns.options(a.format.as_deref(), a.seed)?;
    let s = load_labelled(&data, &opts)?;
    let picked = match a.split.as_str() {
        "train" => s.train,
        "dev" | "validation" => s.dev,
        "test" => s.test,
        "all" => {
            let mut all = s.train;
            for d in [s.dev, s.test] {
                all.texts.extend(d.texts);
                all.labels.extend(d.labels);
            }
            all
        }
        other => bail!("--split: expected train, dev, test or all, found `{other}`"),
    };
    Ok((picked, Some(s.classes)))
}

fn cache(a: CacheArgs) -> Result<()> {
    crate::shared::require_encoder(&a.teacher, "distill cache")?;
    if a.pairs.prompt_column.is_some()
        || a.pairs.response_column.is_some()
        || a.pairs.chat
        || a.pairs.system.is_some()
    {
        bail!("--prompt-column, --response-column, --chat and --system are for a causal LM teacher (a .gguf file or a decoder folder)");
    }
    let device = parse_device(a.device.as_deref())?;
    let dtype = match (&a.dtype, a.top_k) {
        (Some(d), _) => parse_dtype(d)?,
        (None, Some(_)) => Kind::Half,
        (None, None) => Kind::Float,
    };
    let cfg = CacheConfig {
        top_k: a.top_k,
        dtype,
        per_token: false,
        pooled: a.pooled,
        shard_size: a.shard_size,
        temperature: a.temperature,
    };
    cfg.validate()?;
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let (texts, data_classes) = read_data(&a)?;
    if texts.texts.is_empty() {
        bail!(
            "{}: no examples to cache (split `{}`)",
            a.data.display(),
            a.split
        );
    }
    let teacher = load_teacher(&a, device, &texts)?;
    let teacher_classes = teacher.model.model.head.classifier.out_features() as usize;
    if let Some(k) = a.top_k {
        if k > teacher_classes {
            bail!("--top-k {k} exceeds the teacher's {teacher_classes} classes");
        }
    }
    if let Some(dc) = &data_classes {
        if let Some(tc) = &teacher.classes {
            if tc != dc {
                bail!(
                    "class mismatch: the teacher was trained on classes {tc:?}, {} has {dc:?}",
                    a.data.display()
                );
            }
        } else if dc.len() != teacher_classes {
            bail!(
                "class-count mismatch: the teacher has {teacher_classes} classes, {} has {}",
                a.data.display(),
                dc.len()
            );
        }
    }
    let manifest = build(&a, &teacher.model, &teacher.data, &cfg, device)?;
    let Some(manifest) = manifest else {
        return Ok(());
    };
    let n = teacher.data.len();
    let total = manifest.total_bytes();
    println!(
        "cached {n} examples in {} shards to {}: {:.1} bytes per example ({total} bytes); \
         teacher {}, dataset {}",
        manifest.shards.len(),
        a.out.display(),
        total as f64 / n as f64,
        short(&manifest.spec.teacher_fingerprint),
        short(&manifest.spec.dataset_fingerprint),
    );
    Ok(())
}

/// A causal LM teacher's per-token top-k cache over `--data` (see [`Command::Cache`]).
fn cache_lm(a: CacheArgs) -> Result<()> {
    if a.base.is_some() || a.pooled {
        bail!("--base and --pooled are for classifier teachers; a causal LM teacher is the .gguf or model folder itself (with --adapter to merge)");
    }
    let device = parse_device(a.device.as_deref())?;
    let cfg = CacheConfig {
        top_k: Some(a.top_k.unwrap_or(64)),
        dtype: parse_dtype(a.dtype.as_deref().unwrap_or("f16"))?,
        per_token: true,
        pooled: false,
        shard_size: a.shard_size,
        temperature: a.temperature,
    };
    cfg.validate()?;
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let adapters: Vec<PathBuf> = a.adapter.iter().cloned().collect();
    let teacher = crate::distill_lm::load_teacher(&a.teacher, &adapters, device, Kind::Float)?;
    let vocab = teacher.model.config.vocab_size as usize;
    let k = cfg.top_k.expect("set");
    if k > vocab {
        bail!("--top-k {k} exceeds the teacher's vocabulary of {vocab} tokens");
    }
    let spec = crate::lora_lm::LmDataSpec::new(
        &a.data,
        a.format.as_deref(),
        &a.columns,
        &a.pairs,
        a.seed,
        &a.teacher,
    );
    let max_len = a.max_len.unwrap_or(crate::distill_lm::MAX_LEN);
    let sets = crate::lora_lm::lm_data(&spec, &teacher, max_len)?;
    let data: Box<dyn BatchSource> = match a.split.as_str() {
        "train" => sets.train,
        "dev" | "validation" => sets.dev.context("--split dev: the data has no dev rows")?,
        "test" => sets
            .test
            .context("--split test: the data has no test rows")?,
        other => {
            bail!("--split: a causal LM cache is of one split: train, dev or test, found `{other}`")
        }
    };
    let manifest = build(&a, &teacher.model, data.as_ref(), &cfg, device)?;
    let Some(manifest) = manifest else {
        return Ok(());
    };
    let n = data.len();
    let tokens = token_count(data.as_ref(), device)?;
    let total = manifest.total_bytes();
    println!(
        "cached the teacher's top-{k} at {tokens} tokens of {n} examples in {} shards to {}: \
         {:.1} bytes per token ({total} bytes); teacher {}, dataset {}",
        manifest.shards.len(),
        a.out.display(),
        total as f64 / tokens.max(1) as f64,
        short(&manifest.spec.teacher_fingerprint),
        short(&manifest.spec.dataset_fingerprint),
    );
    Ok(())
}

/// Real (unpadded) tokens of `data`.
fn token_count(data: &dyn BatchSource, device: Device) -> Result<i64> {
    let mut n = 0;
    for idx in reuse_core::data::epoch_batches(data.len(), 64, None, 0) {
        let b = data.batch(&idx, device)?;
        n += match (&b.mask, b.padded) {
            (Some(m), true) => m.sum(Kind::Int64).int64_value(&[]),
            _ => b.inputs.numel() as i64,
        };
    }
    Ok(n)
}

/// Builds the cache of `teacher` over `data` into `--out`, split between ranks when
/// launched as several processes; the manifest on the process that wrote it (`None` on
/// the other ranks).
fn build(
    a: &CacheArgs,
    teacher: &dyn reuse_distill::Teacher,
    data: &dyn BatchSource,
    cfg: &CacheConfig,
    device: Device,
) -> Result<Option<reuse_distill::CacheManifest>> {
    let report = |rank: Option<usize>| {
        move |p: reuse_distill::cache::BuildProgress<'_>| {
            let what = if p.reused { "kept" } else { "written" };
            let who = rank.map_or(String::new(), |r| format!("rank {r}: "));
            // One write per line, so that ranks sharing a terminal or pipe never
            // interleave inside a line.
            let line = format!(
                "{who}shard {}/{} {what} (examples {}..{})\n",
                p.index + 1,
                p.total,
                p.shard.start,
                p.shard.end
            );
            let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
        }
    };
    // Launched as several ranks (torchrun, `reuse launch`): each runs the teacher over
    // its own shards, then rank 0 checks them all and writes the manifest.
    let group = reuse_dist::ProcessGroup::from_env()
        .context("joining the process group (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)")?;
    if let Some(g) = &group {
        let part = BuildPart {
            rank: g.rank(),
            world: g.world_size(),
        };
        let built = build_cache_part(
            teacher,
            data,
            &a.out,
            cfg,
            a.batch_size,
            device,
            part,
            &mut report(Some(g.rank())),
        )
        .with_context(|| {
            format!(
                "rank {} of {}: cannot build its part of the teacher cache in {}",
                g.rank(),
                g.world_size(),
                a.out.display()
            )
        });
        // Every rank reports, even one that failed, so that the others learn of it at
        // once instead of at the timeout, and nobody writes a manifest over a gap.
        let failed = tch::Tensor::from_slice(&[i32::from(built.is_err())]);
        g.all_reduce(&failed, reuse_dist::ReduceOp::Sum)?;
        built?;
        let failed = failed.int64_value(&[0]);
        if failed > 0 {
            bail!(
                "{failed} of {} ranks could not build their part of the teacher cache in {} \
                 (their errors are above); the shards written are kept for a resumed build",
                g.world_size(),
                a.out.display()
            );
        }
        if !g.is_main() {
            return Ok(None);
        }
    }
    let manifest = build_cache_with_progress(
        teacher,
        data,
        &a.out,
        cfg,
        a.batch_size,
        device,
        &mut report(None),
    )
    .with_context(|| format!("cannot build the teacher cache in {}", a.out.display()))?;
    Ok(Some(manifest))
}

fn short(h: &str) -> &str {
    &h[..h.len().min(12)]
}
