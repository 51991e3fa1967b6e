//! Serving several LoRA adapters over one causal LM: a greedy batch whose rows use
//! different adapters (as LoRAX / S-LoRA serve them) against running each adapter's
//! rows on their own, one adapter after another, on SmolLM2-135M-Instruct's GGUF.

use std::time::Instant;

use anyhow::{ensure, Result};
use indicatif::ProgressBar;
use reuse_core::models::llama::{CausalLm, GenerateOptions, Sampling};
use reuse_core::Model;
use reuse_peft::config::{InitLoraWeights, TargetModules};
use reuse_peft::model::route_samples;
use reuse_peft::{LoraConfig, LoraModel, BASE};
use tch::Kind;

use super::{insert_spread, Counts, Ctx, Knobs, Metrics, OnCuda, Outcome, Sizes};
use crate::claims::Claim;

/// `peft.smollm2_mixed_adapters`' sizes.
pub(super) struct MixedSizes {
    new_tokens: usize,
    rounds: usize,
}

impl Knobs for MixedSizes {
    fn counts(&self) -> Counts {
        vec![("new_tokens", self.new_tokens), ("rounds", self.rounds)]
    }
}

pub(super) const MIXED_SIZES: Sizes<MixedSizes> = Sizes {
    quick: MixedSizes {
        new_tokens: 4,
        rounds: 1,
    },
    // The plain CPU run: half the tokens, so the whole run keeps under an hour.
    cpu: Some(MixedSizes {
        new_tokens: 16,
        rounds: 3,
    }),
    full: MixedSizes {
        new_tokens: 32,
        rounds: 3,
    },
    cuda: OnCuda {
        quick: None,
        full: Some(MixedSizes {
            new_tokens: 32,
            rounds: 5,
        }),
    },
};

/// Adapters served, and prompts per adapter.
const ADAPTERS: usize = 4;
const ROWS_PER_ADAPTER: usize = 2;

/// Generates `prompts` greedily, row `i` through adapter `names[i]`, in one routed batch.
fn mixed(
    model: &mut CausalLm,
    prompts: &[Vec<i64>],
    names: &[&str],
    opts: &GenerateOptions,
) -> Result<(f64, Vec<Vec<i64>>)> {
    let device = model.device();
    let start = Instant::now();
    let g = route_samples(model, names, device, |m| {
        m.generate(prompts, opts, &mut |_, _| {})
    })?;
    sync(device);
    Ok((start.elapsed().as_secs_f64(), g.tokens))
}

/// Each adapter's rows on their own, that adapter active, one adapter after another;
/// the rows' tokens in the original order.
fn one_by_one(
    model: &mut CausalLm,
    prompts: &[Vec<i64>],
    names: &[String],
    opts: &GenerateOptions,
) -> Result<(f64, Vec<Vec<i64>>)> {
    let device = model.device();
    let mut tokens = vec![Vec::new(); prompts.len()];
    let start = Instant::now();
    for (k, name) in names.iter().enumerate() {
        model.visit_linears(&mut |_, l| l.set_active(&[name.as_str()]));
        let rows = k * ROWS_PER_ADAPTER..(k + 1) * ROWS_PER_ADAPTER;
        let g = model.generate(&prompts[rows.clone()], opts, &mut |_, _| {})?;
        for (i, t) in rows.zip(g.tokens) {
            tokens[i] = t;
        }
    }
    sync(device);
    let secs = start.elapsed().as_secs_f64();
    model.visit_linears(&mut |_, l| l.set_active(&[]));
    Ok((secs, tokens))
}

fn sync(device: tch::Device) {
    if device.is_cuda() {
        tch::Cuda::synchronize(0);
    }
}

/// One batch of 8 prompts over 4 LoRA adapters (2 rows each), routed per row, against
/// each adapter's 2 rows on their own in turn, and the bare base model's batch of 8 as a
/// control; interleaved rounds, greedy, a fixed number of new tokens.
pub fn smollm2_mixed_adapters(ctx: &Ctx, bar: &ProgressBar) -> Result<Outcome> {
    let s = ctx.sizes(&MIXED_SIZES);
    let lm = super::llm::setup(ctx, Kind::Float)?;
    let prompts = super::llm::prompts(&lm, ADAPTERS * ROWS_PER_ADAPTER)?;
    let mut peft = LoraModel::new(lm.model);
    let names: Vec<String> = (0..ADAPTERS).map(|k| format!("task{k}")).collect();
    for (k, n) in names.iter().enumerate() {
        tch::manual_seed(k as i64);
        let mut cfg = LoraConfig::new(8, 16.0, &[]);
        cfg.target_modules = Some(TargetModules::List(vec!["all-linear".into()]));
        cfg.task_type = Some("CAUSAL_LM".into());
        // Non-zero B (PEFT's init_lora_weights=False): each adapter changes the outputs,
        // as trained ones do.
        cfg.init_lora_weights = InitLoraWeights::Bool(false);
        peft.add_adapter(n, cfg)?;
    }
    peft.set_adapter(&[])?;
    let mut model = peft.into_inner();
    let rows: Vec<&str> = (0..prompts.len())
        .map(|i| names[i / ROWS_PER_ADAPTER].as_str())
        .collect();
    let base_rows = vec![BASE; prompts.len()];
    let opts = GenerateOptions {
        max_new_tokens: s.new_tokens,
        sampling: Sampling::Greedy,
        stop_tokens: Vec::new(),
    };
    // Warm-up: each path once, 2 tokens.
    let warm = GenerateOptions {
        max_new_tokens: 2,
        ..opts.clone()
    };
    mixed(&mut model, &prompts, &rows, &warm)?;
    one_by_one(&mut model, &prompts, &names, &warm)?;
    let sides = ["mixed", "one_by_one", "base"];
    let mut secs = vec![Vec::new(); sides.len()];
    let mut tokens = vec![Vec::new(); sides.len()];
    for round in 0..s.rounds {
        for k in 0..sides.len() {
            let side = (round + k) % sides.len();
            bar.set_message(format!(
                "peft.smollm2_mixed_adapters round {}/{}: {}",
                round + 1,
                s.rounds,
                sides[side]
            ));
            let (t, toks) = match side {
                0 => mixed(&mut model, &prompts, &rows, &opts)?,
                1 => one_by_one(&mut model, &prompts, &names, &opts)?,
                _ => mixed(&mut model, &prompts, &base_rows, &opts)?,
            };
            ensure!(
                toks.iter().all(|t| t.len() == s.new_tokens),
                "{}: a row stopped early",
                sides[side]
            );
            secs[side].push(t);
            tokens[side] = toks;
        }
    }
    let n_tokens = (prompts.len() * s.new_tokens) as f64;
    let mut m = Metrics::from([
        ("adapters".into(), ADAPTERS as f64),
        ("rows".into(), prompts.len() as f64),
        ("new_tokens".into(), s.new_tokens as f64),
        ("rounds".into(), s.rounds as f64),
    ]);
    for (side, name) in sides.iter().enumerate() {
        let tps: Vec<f64> = secs[side].iter().map(|t| n_tokens / t).collect();
        insert_spread(&mut m, &format!("{name}.tokens_per_second"), &tps);
    }
    let ratio = |a: usize, b: usize| -> Vec<f64> {
        secs[a].iter().zip(&secs[b]).map(|(x, y)| x / y).collect()
    };
    // Throughput of the mixed batch over one-by-one: one-by-one's time over mixed's.
    insert_spread(&mut m, "mixed_throughput_speedup", &ratio(1, 0));
    insert_spread(&mut m, "mixed_over_base_time", &ratio(0, 2));
    let equal = tokens[0]
        .iter()
        .zip(&tokens[1])
        .filter(|(a, b)| a == b)
        .count();
    m.insert("rows_equal_to_alone".into(), equal as f64);
    let changed = tokens[0]
        .iter()
        .zip(&tokens[2])
        .filter(|(a, b)| a != b)
        .count();
    m.insert("rows_differing_from_base".into(), changed as f64);
    Ok(Outcome {
        metrics: m,
        notes: vec![format!(
            "SmolLM2-135M-Instruct from its GGUF in f32 with {ADAPTERS} LoRA adapters (r 8, \
             alpha 16, all-linear, random non-zero B as PEFT's init_lora_weights=False), \
             {} chat-template prompts from the sections fixture's test synopses, {} per \
             adapter; greedy, exactly {} new tokens. `mixed`: one batch of all rows, each \
             routed to its adapter (the base computed once, each adapter's delta added to \
             its rows); `one_by_one`: each adapter active in turn on its own {} rows; \
             `base`: the batch without adapters (a control). {} rounds, the order rotating \
             per round, after one warm-up of each. `mixed_throughput_speedup`: \
             per-round one-by-one time over mixed time (above 1: the mixed batch serves \
             more tokens a second). `rows_equal_to_alone`: rows whose tokens equal the \
             same row generated with its adapter alone.",
            prompts.len(),
            ROWS_PER_ADAPTER,
            s.new_tokens,
            ROWS_PER_ADAPTER,
            s.rounds
        )],
    })
}

/// The claims-table rows this file's experiments measure (see `crate::claims`).
pub const CLAIMS: &[Claim] = &[Claim {
    text: "Many adapters, one batch: 4 LoRA adapters' rows decoded together, throughput over serving each adapter in turn",
    experiment: "peft.smollm2_mixed_adapters",
    target: ">= 2x",
    keys: &[
        "mixed_throughput_speedup_median",
        "mixed_throughput_speedup_sd",
        "rows_equal_to_alone",
        "rows",
    ],
    eval: |g| {
        let r = g("mixed_throughput_speedup_median");
        (
            format!("{r:.2}x"),
            format!(
                "sd {:.2} over rounds; {:.0} of {:.0} rows equal to the row alone",
                g("mixed_throughput_speedup_sd"),
                g("rows_equal_to_alone"),
                g("rows")
            ),
            Some(r >= 2.0),
        )
    },
}];
