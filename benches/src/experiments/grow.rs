//! reuse-grow experiments.

use std::time::Instant;

use anyhow::Result;
use indicatif::ProgressBar;
use reuse_core::data::load_text_splits;
use reuse_core::models::bert::Bert;
use reuse_core::models::sentence::{load_tokenizer, tokenize};
use reuse_core::models::BertConfig;
use reuse_core::Checkpoint;
use reuse_grow::bert::{deepen_bert, widen_bert, DeepenBert, DepthMethod, Grown, WidenBert};
use reuse_grow::verify::{compare_bert, Drift};
use reuse_testkit::{fixtures_dir, minilm_dir};
use tch::{Device, Kind, Tensor};

use super::{Ctx, Metrics, Outcome};

/// A growth to measure, planned on demand.
type Plan<'a> = Box<dyn Fn() -> reuse_core::Result<Grown> + 'a>;

fn clone(ck: &Checkpoint) -> Checkpoint {
    let mut c = Checkpoint::new();
    for (n, t) in ck.iter() {
        c.insert(n, t.shallow_clone());
    }
    c
}

/// MiniLM grown wider and deeper by each operator: max |diff| of the last hidden state
/// against the original on random and real token ids, the mean-pooled embedding cosine
/// on real texts, and the time to plan and apply each growth.
pub fn minilm_preserve(ctx: &Ctx, bar: &ProgressBar) -> Result<Outcome> {
    let dir = minilm_dir()?;
    let cfg = BertConfig::load(&dir.join("config.json"))?;
    let ck = Checkpoint::load(dir.join("model.safetensors"), Device::Cpu)?;
    let small = Bert::from_checkpoint(cfg.clone(), &mut clone(&ck), ctx.device, Kind::Float)?;
    // Real text: the Debian sections' test texts (the growth has no training to choose
    // anything on, so any held-out text serves).
    let splits = load_text_splits(&fixtures_dir().join("debian_sections/sections.tsv.gz"))?;
    let n_texts = ctx.size(256, 32);
    let texts: Vec<&str> = splits
        .test
        .texts
        .iter()
        .take(n_texts)
        .map(String::as_str)
        .collect();
    let tok = load_tokenizer(&dir.join("tokenizer.json"), 128)?;
    let real: Vec<(Tensor, Tensor)> = texts
        .chunks(32)
        .map(|c| tokenize(&tok, c).map(|(ids, mask, _)| (ids, mask)))
        .collect::<reuse_core::Result<_>>()?;
    tch::manual_seed(0);
    let random = Tensor::randint(cfg.vocab_size, [8, 64], (Kind::Int64, Device::Cpu));

    let ops: Vec<(&str, Plan)> = vec![
        (
            "ffn_3072",
            Box::new(|| {
                widen_bert(
                    &cfg,
                    &ck,
                    &WidenBert {
                        intermediate_size: Some(3072),
                        ..Default::default()
                    },
                )
            }),
        ),
        (
            "hidden_768",
            Box::new(|| {
                widen_bert(
                    &cfg,
                    &ck,
                    &WidenBert {
                        hidden_size: Some(768),
                        heads: Some(24),
                        intermediate_size: Some(3072),
                        seed: 0,
                    },
                )
            }),
        ),
        (
            "gated_8",
            Box::new(|| {
                deepen_bert(
                    &cfg,
                    &ck,
                    &DeepenBert {
                        layers: 8,
                        method: DepthMethod::Gated,
                        every: None,
                    },
                )
            }),
        ),
        (
            "gated_12",
            Box::new(|| {
                deepen_bert(
                    &cfg,
                    &ck,
                    &DeepenBert {
                        layers: 12,
                        method: DepthMethod::Gated,
                        every: None,
                    },
                )
            }),
        ),
        (
            "copy_8",
            Box::new(|| {
                deepen_bert(
                    &cfg,
                    &ck,
                    &DeepenBert {
                        layers: 8,
                        method: DepthMethod::Copy,
                        every: None,
                    },
                )
            }),
        ),
        (
            "copy_12",
            Box::new(|| {
                deepen_bert(
                    &cfg,
                    &ck,
                    &DeepenBert {
                        layers: 12,
                        method: DepthMethod::Copy,
                        every: None,
                    },
                )
            }),
        ),
        (
            "stack_12",
            Box::new(|| {
                deepen_bert(
                    &cfg,
                    &ck,
                    &DeepenBert {
                        layers: 12,
                        method: DepthMethod::Stack,
                        every: None,
                    },
                )
            }),
        ),
    ];
    let mut m = Metrics::new();
    let mut exact_max: f64 = 0.0;
    for (name, op) in &ops {
        bar.set_message(format!("grow.minilm_preserve {name}"));
        let t0 = Instant::now();
        let g = op()?;
        let grown_ck = g.growth.apply(&ck)?;
        let secs = t0.elapsed().as_secs_f64();
        let big = Bert::from_checkpoint(
            g.config.clone(),
            &mut clone(&grown_ck),
            ctx.device,
            Kind::Float,
        )?;
        let d_rand = compare_bert(&small, &big, &random, None)?;
        let mut real_drifts: Vec<Drift> = Vec::new();
        for (ids, mask) in &real {
            real_drifts.push(compare_bert(&small, &big, ids, Some(mask))?);
        }
        let max_real = real_drifts
            .iter()
            .map(|d| d.max_abs_diff)
            .fold(0.0, f64::max);
        // Cosine per text: weight each chunk's mean by its size.
        let sizes: Vec<f64> = real.iter().map(|(ids, _)| ids.size()[0] as f64).collect();
        let cos_mean = real_drifts
            .iter()
            .zip(&sizes)
            .map(|(d, n)| d.cosine_mean * n)
            .sum::<f64>()
            / sizes.iter().sum::<f64>();
        let cos_min = real_drifts.iter().map(|d| d.cosine_min).fold(1.0, f64::min);
        let max = d_rand.max_abs_diff.max(max_real);
        if g.exact {
            exact_max = exact_max.max(max);
        }
        m.insert(format!("max_abs_diff_{name}"), max);
        m.insert(format!("max_abs_diff_random_{name}"), d_rand.max_abs_diff);
        m.insert(format!("max_abs_diff_real_{name}"), max_real);
        m.insert(format!("cosine_mean_{name}"), cos_mean);
        m.insert(format!("cosine_min_{name}"), cos_min);
        m.insert(format!("grow_seconds_{name}"), secs);
        m.insert(format!("exact_{name}"), if g.exact { 1.0 } else { 0.0 });
        super::say(bar, format!("grow.minilm_preserve {name}: max |diff| {max:.2e}, cosine {cos_mean:.6} (min {cos_min:.6}), {secs:.2} s"));
    }
    m.insert("max_abs_diff_exact_operators".into(), exact_max);
    m.insert("texts".into(), texts.len() as f64);
    let notes = vec![
        format!(
            "all-MiniLM-L6-v2 (6 layers, hidden 384, 12 heads, FFN 1536) grown by each operator, in f32 on {:?}; compared with the original on 8 random sequences of 64 token ids and on {} Debian-sections test texts (max 128 tokens, padded positions left out). max_abs_diff is over the last hidden state (for hidden 768, each of the two copies of every unit against the original unit); cosine is between mean-pooled embeddings (the original's repeated for hidden 768). grow_seconds is planning and applying the growth to the checkpoint on the CPU, not loading or verifying.",
            ctx.device, texts.len()
        ),
        "Exact operators: ffn_3072 (Net2WiderNet), hidden_768 (hidden 384 -> 768 by uniform replication, 24 heads of 32: 12 extra heads with zero output columns, FFN 3072), gated_8 / gated_12 (layer copies behind a residual gate at 0). Approximate, loadable by Hugging Face transformers: copy_8 / copy_12 (each new layer a copy of the one before it, LLaMA Pro's positions) and stack_12 (G_stack: the 6 layers twice).".into(),
    ];
    Ok(Outcome { metrics: m, notes })
}
