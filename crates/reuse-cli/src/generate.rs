//! `reuse generate`: continue prompts with a causal LM (a `.gguf` file or a model
//! folder), greedy by default, sampled with `--temperature`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use reuse_core::models::llama::{GenerateOptions, Sampling};
use reuse_core::models::lm::LanguageModel;

use reuse_peft::model::route_samples;
use reuse_peft::BASE;

use crate::adapters::{attach, AdapterArg};
use crate::shared::{load_lm, parse_device, parse_dtype, read_lines};

/// Arguments of `reuse generate`.
#[derive(clap::Args)]
pub struct Args {
    /// A `.gguf` file or a Hugging Face causal-LM folder (llama, mistral, qwen2).
    #[arg(long)]
    model: PathBuf,
    /// One prompt.
    #[arg(long, conflicts_with = "prompts", required_unless_present = "prompts")]
    prompt: Option<String>,
    /// A file of prompts, one per line; with named adapters (--adapter NAME=DIR), JSON
    /// Lines whose objects hold `prompt` and `adapter` (a name, or null / absent for the
    /// base model): each row decodes with its own adapter, all in one batch.
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Render each prompt as a user turn through the model's chat template (with the
    /// generation prompt), as `apply_chat_template(..., add_generation_prompt=True)`.
    #[arg(long)]
    chat: bool,
    /// A system message for `--chat`.
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// New tokens per prompt at most.
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// Sample at this temperature (without it: greedy).
    #[arg(long)]
    temperature: Option<f64>,
    /// Nucleus sampling: keep the most likely tokens up to this probability.
    #[arg(long, requires = "temperature")]
    top_p: Option<f64>,
    /// Keep the k most likely tokens when sampling.
    #[arg(long, requires = "temperature")]
    top_k: Option<usize>,
    /// The sampler's seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Prompts decoded together.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Compute in f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// cpu or cuda (default: cuda if available).
    #[arg(long)]
    device: Option<String>,
    /// For a .gguf model: keep its Q8_0/Q4_0/Q4_1 linear weights in their 8- or 4-bit
    /// codes (about the file's size in memory) instead of dequantizing them to --dtype.
    /// With --dtype bf16 on the CPU, the 4-bit weights multiply through libtorch's int4
    /// kernel (fast); in f32 each matmul dequantizes its weight exactly (same results
    /// as without the flag, slower). The token embedding table is dequantized either way.
    #[arg(long)]
    keep_codes: bool,
    /// Write one JSON object per prompt here (`prompt`, `completion`, `tokens`,
    /// `stop`); without it, completions stream to stdout.
    #[arg(long)]
    out: Option<PathBuf>,
    /// A PEFT LoRA adapter folder to apply; repeat to apply several (their outputs
    /// sum). As NAME=DIR (repeatable), adapters are chosen per prompt instead (see
    /// --prompts): one batch serves rows of different adapters over one base.
    #[arg(long = "adapter", value_name = "[NAME=]DIR")]
    adapters: Vec<AdapterArg>,
}

pub fn run(a: Args) -> Result<()> {
    let device = parse_device(a.device.as_deref())?;
    let kind = parse_dtype(&a.dtype)?;
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let lm = load_lm(&a.model, device, kind, a.keep_codes)?;
    let (mut lm, attached) = attach(lm, &a.adapters)?;
    // Each prompt and the adapter its row uses (BASE: none, or all when they sum).
    let prompts: Vec<(String, String)> = match (&a.prompt, &a.prompts) {
        (Some(_), _) if attached.routed => {
            bail!("named adapters route prompts from a --prompts JSON Lines file (`prompt`, `adapter`)")
        }
        (Some(p), _) => vec![(p.clone(), BASE.to_string())],
        (None, Some(f)) if attached.routed => routed_prompts(f, &attached.names)?,
        (None, Some(f)) => read_lines(f)?
            .into_iter()
            .map(|p| (p, BASE.to_string()))
            .collect(),
        (None, None) => bail!("give --prompt TEXT or --prompts FILE"),
    };
    let sampling = match a.temperature {
        None => Sampling::Greedy,
        Some(t) => Sampling::Sample {
            temperature: t,
            top_k: a.top_k,
            top_p: a.top_p,
            seed: a.seed,
        },
    };
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        sampling,
        stop_tokens: lm.stop_tokens.clone(),
    };
    let mut records = Vec::with_capacity(prompts.len());
    let stream = a.out.is_none();
    for (b, chunk) in prompts.chunks(a.batch_size).enumerate() {
        let ids = chunk
            .iter()
            .map(|(p, _)| lm.prompt_ids(p, a.chat, a.system.as_deref()))
            .collect::<reuse_core::Result<Vec<_>>>()?;
        // One prompt streams its text as it comes; a batch prints each row at its end.
        let single = stream && prompts.len() == 1 && !attached.routed;
        let mut shown = String::new();
        let mut so_far: Vec<i64> = Vec::new();
        let mut on_token = |_: usize, tok: i64| {
            if single {
                so_far.push(tok);
                if let Ok(text) = lm.decode(&so_far) {
                    if let Some(new) = text.strip_prefix(&shown) {
                        print!("{new}");
                        let _ = std::io::stdout().flush();
                    }
                    shown = text;
                }
            }
        };
        let g = if attached.routed {
            let names: Vec<&str> = chunk.iter().map(|(_, n)| n.as_str()).collect();
            // A mixed batch prints each row at its end (no streaming).
            route_samples(&mut lm.model, &names, device, |m| {
                m.generate(&ids, &opts, &mut |_, _| {})
            })
            .map_err(anyhow::Error::from)
        } else {
            lm.model
                .generate(&ids, &opts, &mut on_token)
                .map_err(anyhow::Error::from)
        }
        .with_context(|| format!("generating for prompts {}..", b * a.batch_size))?;
        if single {
            println!();
        }
        for (i, (p, adapter)) in chunk.iter().enumerate() {
            let completion = lm.decode(&g.tokens[i])?;
            let adapter = attached
                .routed
                .then_some(adapter.as_str())
                .filter(|n| *n != BASE);
            if stream && !single {
                let mut line = serde_json::json!({"prompt": p, "completion": completion});
                if attached.routed {
                    line["adapter"] = serde_json::json!(adapter);
                }
                println!("{line}");
            }
            let mut r = record(p, &completion, &g.tokens[i], g.stop[i], &lm);
            if attached.routed {
                r["adapter"] = serde_json::json!(adapter);
            } else if !attached.names.is_empty() {
                r["adapters"] = serde_json::json!(a
                    .adapters
                    .iter()
                    .map(|x| x.dir.display().to_string())
                    .collect::<Vec<_>>());
            }
            records.push(r);
        }
    }
    // A chat model that stops at once on a plain prompt usually wants its template
    // (adapters trained with `lora train --chat` learn to answer inside it).
    let stopped_at_once = records
        .iter()
        .filter(|r| {
            r["tokens"].as_array().is_some_and(|t| t.len() <= 1) && r["stop"] == "stop_token"
        })
        .count();
    if stopped_at_once > 0 && !a.chat && lm.chat.is_some() {
        eprintln!(
            "note: {stopped_at_once} of {} prompts ended at once with a stop token; this model has a chat template: try --chat (an adapter trained with --chat answers inside it)",
            records.len()
        );
    }
    if let Some(out) = &a.out {
        let mut text = String::new();
        for r in &records {
            text.push_str(&r.to_string());
            text.push('\n');
        }
        reuse_core::checkpoint::write_atomic(out, text.as_bytes())
            .with_context(|| format!("cannot write {}", out.display()))?;
        eprintln!("wrote {} completions to {}", records.len(), out.display());
    }
    Ok(())
}

/// Prompts and their adapters from a JSON Lines file: `prompt` (a string) and `adapter`
/// (one of `names`, or null / absent for the base model); errors name the line.
fn routed_prompts(path: &std::path::Path, names: &[String]) -> Result<Vec<(String, String)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{} line {}", path.display(), i + 1);
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}: not a JSON object (`prompt`, `adapter`)", at()))?;
        let Some(prompt) = v.get("prompt").and_then(|p| p.as_str()) else {
            bail!("{}: no string `prompt`", at());
        };
        let adapter = match v.get("adapter") {
            None | Some(serde_json::Value::Null) => BASE.to_string(),
            Some(serde_json::Value::String(n)) if names.contains(n) => n.clone(),
            Some(other) => bail!(
                "{}: adapter {other} is not one of the --adapter names ({}; null for the base model)",
                at(),
                names.join(", ")
            ),
        };
        out.push((prompt.to_string(), adapter));
    }
    if out.is_empty() {
        bail!("{} has no prompts", path.display());
    }
    Ok(out)
}

fn record(
    prompt: &str,
    completion: &str,
    tokens: &[i64],
    stop: reuse_core::models::llama::StopReason,
    lm: &LanguageModel,
) -> serde_json::Value {
    serde_json::json!({
        "prompt": prompt,
        "completion": completion,
        "tokens": tokens,
        "stop": match stop {
            reuse_core::models::llama::StopReason::StopToken => "stop_token",
            reuse_core::models::llama::StopReason::Length => "length",
        },
        "model": lm.source.display().to_string(),
    })
}
