//! `reuse generate`: continue prompts with a causal LM (a `.gguf` file or a model
//! folder), greedy by default, sampled with `--temperature`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use reuse_core::models::llama::{GenerateOptions, Sampling};
use reuse_core::models::lm::LanguageModel;

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
    /// A file of prompts, one per line.
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
    /// A PEFT LoRA adapter folder to apply; repeat to apply several (their outputs sum).
    #[arg(long = "adapter", value_name = "DIR")]
    adapters: Vec<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    let device = parse_device(a.device.as_deref())?;
    let kind = parse_dtype(&a.dtype)?;
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    if !a.adapters.is_empty() {
        bail!("--adapter on a causal LM is not supported yet (LoRA on LLMs comes with `reuse lora train --task causal-lm`)");
    }
    let prompts = match (&a.prompt, &a.prompts) {
        (Some(p), _) => vec![p.clone()],
        (None, Some(f)) => read_lines(f)?,
        (None, None) => bail!("give --prompt TEXT or --prompts FILE"),
    };
    let lm = load_lm(&a.model, device, kind, a.keep_codes)?;
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
            .map(|p| lm.prompt_ids(p, a.chat, a.system.as_deref()))
            .collect::<reuse_core::Result<Vec<_>>>()?;
        // One prompt streams its text as it comes; a batch prints each row at its end.
        let single = stream && prompts.len() == 1;
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
        let g = lm
            .model
            .generate(&ids, &opts, &mut on_token)
            .with_context(|| format!("generating for prompts {}..", b * a.batch_size))?;
        if single {
            println!();
        }
        for (i, p) in chunk.iter().enumerate() {
            let completion = lm.decode(&g.tokens[i])?;
            if stream && !single {
                println!(
                    "{}",
                    serde_json::json!({"prompt": p, "completion": completion})
                );
            }
            records.push(record(p, &completion, &g.tokens[i], g.stop[i], &lm));
        }
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
