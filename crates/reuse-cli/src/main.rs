//! `reuse`: command-line access to the reuse toolkit.
//!
//! * `reuse inspect FILE.safetensors|FILE.gguf` lists tensors, dtypes, shapes, parameter
//!   count and metadata of any safetensors or GGUF file (`--json` for machines).
//! * `reuse generate` continues prompts with a causal LM (a `.gguf` file or a model
//!   folder), greedy or sampled, optionally through its chat template; `reuse lm score`
//!   gives per-text NLL and perplexity; `reuse convert` writes a GGUF as a Hugging Face
//!   folder.
//! * `reuse embed --model DIR --texts FILE` writes sentence embeddings of one text per
//!   line, as sentence-transformers would compute them, optionally with PEFT adapters.
//! * `reuse lora merge` folds a PEFT adapter into a complete model folder;
//!   `reuse lora train` trains LoRA + a head on labelled text (TSV, CSV, JSON Lines or
//!   the Debian sections fixture), resumably with `--save-every` / `--resume`.
//! * `reuse distill cache` runs a teacher classifier (a `reuse lora train` output) once
//!   over a dataset and stores its logits or top-k log-probs as a teacher cache;
//!   `reuse distill embed` cuts a shallower student from a sentence-embedding teacher
//!   and trains it to give the teacher's embeddings on unlabeled text.
//! * `reuse grow width|depth` writes a wider or deeper model folder that starts from a
//!   trained one (exact where the operator is, with the drift printed where not).
//! * `reuse quantize` writes an int8 or int4 model folder (round-to-nearest, or GPTQ on
//!   calibration texts) that every command here loads like any model folder;
//!   `reuse dequantize` writes its values back as plain f32 for Hugging Face tools.
//!
//! * `reuse launch -n N -- reuse ...` starts N ranks of a command on this machine (as
//!   `torchrun --standalone --nproc_per_node N --no-python` does); `reuse lora train`
//!   run that way, or under torchrun, trains data-parallel and rank 0 writes the adapter.
//!
//! Errors are one line on stderr and a non-zero exit status, never a panic backtrace.

mod adapters;
mod columns;
mod convert;
mod distill;
mod distill_embed;
mod distill_lm;
mod embed;
mod generate;
mod grow;
mod inspect;
mod launch;
mod lm;
mod lora;
mod lora_lm;
mod quantize;
mod shared;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Reuse trained models: inspect checkpoints, embed text.
#[derive(Parser)]
#[command(name = "reuse", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show the tensors (name, dtype, shape), parameter count and metadata of a safetensors or GGUF file.
    Inspect(inspect::Args),
    /// Continue prompts with a causal LM (a .gguf file or a model folder).
    Generate(generate::Args),
    /// Causal language models: score texts (per-text NLL, perplexity).
    #[command(subcommand)]
    Lm(lm::Command),
    /// Write a .gguf causal LM as a Hugging Face folder transformers loads.
    Convert(convert::Args),
    /// Compute sentence embeddings (mean pooling + L2 norm, as sentence-transformers) for one text per line.
    Embed(embed::Args),
    /// LoRA adapters: merge into a base model, or train on labelled text.
    #[command(subcommand)]
    Lora(lora::Command),
    /// Knowledge distillation: cache a teacher's outputs over a dataset.
    #[command(subcommand)]
    Distill(distill::Command),
    /// Model growth: a wider or deeper model folder that starts from a trained one.
    #[command(subcommand)]
    Grow(grow::Command),
    /// Int8 or int4 weights: a smaller model folder for deployment or a QLoRA base.
    Quantize(quantize::Args),
    /// A quantized folder's weights as plain f32, for Hugging Face tools.
    Dequantize(quantize::DequantizeArgs),
    /// Start N ranks of a command on this machine (RANK, WORLD_SIZE, MASTER_ADDR,
    /// MASTER_PORT set as torchrun sets them).
    Launch(launch::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Inspect(a) => inspect::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Lm(c) => lm::run(c),
        Command::Convert(a) => convert::run(a),
        Command::Embed(a) => embed::run(a),
        Command::Lora(c) => lora::run(c),
        Command::Distill(c) => distill::run(c),
        Command::Grow(c) => grow::run(c),
        Command::Quantize(a) => quantize::run(a),
        Command::Dequantize(a) => quantize::run_dequantize(a),
        Command::Launch(a) => match launch::run(a) {
            Ok(0) => Ok(()),
            Ok(code) => return ExitCode::from(code.clamp(1, 255) as u8),
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One write, so that ranks of a launch sharing stderr never split a line.
            let line = format!("error: {}\n", format!("{e:#}").replace('\n', " "));
            let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
            ExitCode::FAILURE
        }
    }
}
