//! reuse-grow experiments.

use std::time::Instant;

use anyhow::Result;
use indicatif::ProgressBar;
use reuse_core::models::bert::Bert;
use reuse_core::models::sentence::{load_tokenizer, tokenize};
use reuse_core::models::{train_flops, BertConfig, BertForMaskedLm, MaskingSpec, MlmBatch};
use reuse_core::{Checkpoint, Model, Optimizer, OptimizerKind};
use reuse_grow::bert::{deepen_bert, widen_bert, DeepenBert, DepthMethod, Grown, WidenBert};
use reuse_grow::verify::{compare_bert, Drift};
use reuse_testkit::{fixtures_dir, minilm_dir};
use tch::{Device, Kind, Tensor};

use super::{Counts, Ctx, Knobs, Metrics, OnCuda, Outcome, Seeds, Sizes};
use crate::claims::{pm, Claim};

/// A growth to measure, planned on demand.
type Plan<'a> = Box<dyn Fn() -> reuse_core::Result<Grown> + 'a>;

/// `grow.minilm_preserve`'s sizes: its real texts, the first of the sections' test split.
pub(super) const MINILM_PRESERVE_SIZES: Sizes<usize> = Sizes {
    quick: 32,
    cpu: None,
    full: 256,
    cuda: OnCuda::SAME,
};

/// MiniLM grown wider and deeper by each operator: max |diff| of the last hidden state
/// against the original on random and real token ids, the mean-pooled embedding cosine
/// on real texts, and the time to plan and apply each growth.
pub fn minilm_preserve(ctx: &Ctx, bar: &ProgressBar) -> Result<Outcome> {
    let dir = minilm_dir()?;
    let cfg = BertConfig::load(&dir.join("config.json"))?;
    let ck = Checkpoint::load(dir.join("model.safetensors"), Device::Cpu)?;
    let small =
        Bert::from_checkpoint(cfg.clone(), &mut ck.shallow_copy(), ctx.device, Kind::Float)?;
    // Real text: the Debian sections' test texts (the growth has no training to choose
    // anything on, so any held-out text serves).
    let splits = super::sections()?;
    let n_texts = *ctx.sizes(&MINILM_PRESERVE_SIZES);
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
            &mut grown_ck.shallow_copy(),
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

/// The masked-LM corpus: issue 6's synopses, tokenized with MiniLM's tokenizer, mapped
/// to the vocabulary that occurs in the training texts, packed into `[CLS] ... [SEP]`
/// sequences.
struct Corpus {
    train: Tensor,
    /// Held-out test text: the loss the experiment reports.
    heldout: Vec<MlmBatch>,
    /// Held-out dev text: the loss the dev sweep chooses the growth step on.
    dev: Vec<MlmBatch>,
    vocab: i64,
    spec: MaskingSpec,
    seq: i64,
    train_texts: usize,
    heldout_texts: usize,
    dev_texts: usize,
}

const SEQ: i64 = 64;
// Compact ids of the special tokens.
const PAD: i64 = 0;
const UNK: i64 = 1;
const CLS: i64 = 2;
const SEP: i64 = 3;
const MASK: i64 = 4;

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e3779b97f4a7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
    z ^ (z >> 31)
}

fn pack(texts: &[Vec<i64>], seq: i64) -> Tensor {
    let body = (seq - 2) as usize;
    let mut stream = Vec::new();
    for t in texts {
        stream.extend_from_slice(t);
        stream.push(SEP);
    }
    let n = stream.len() / body;
    let mut rows = Vec::with_capacity(n * seq as usize);
    for c in stream.chunks_exact(body) {
        rows.push(CLS);
        rows.extend_from_slice(c);
        rows.push(SEP);
    }
    Tensor::from_slice(&rows).view([n as i64, seq])
}

/// Where text `i` goes: 0 train, 1 dev, 2 test (2.5% each, by a fixed hash).
fn split_of(i: usize) -> u8 {
    match splitmix(i as u64) % 40 {
        0 => 1,
        20 => 2,
        _ => 0,
    }
}

fn masked_batches(seqs: &Tensor, n: usize, spec: &MaskingSpec, seed: i64) -> Result<Vec<MlmBatch>> {
    let n = (n as i64).min(seqs.size()[0]);
    // Fixed masking, the same for every run.
    tch::manual_seed(seed);
    Ok(seqs
        .narrow(0, 0, n)
        .split(64, 0)
        .iter()
        .map(|c| spec.apply(c))
        .collect::<reuse_core::Result<Vec<_>>>()?)
}

fn load_corpus(heldout_sequences: usize) -> Result<Corpus> {
    let dir = minilm_dir()?;
    let mut tok = load_tokenizer(&dir.join("tokenizer.json"), 512)?;
    tok.with_padding(None);
    tok.with_truncation(None)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let path = fixtures_dir().join("debian_synopses/synopses.tsv.gz");
    let text = {
        use std::io::Read;
        let mut s = String::new();
        flate2::read::GzDecoder::new(std::fs::File::open(&path)?).read_to_string(&mut s)?;
        s
    };
    let texts: Vec<&str> = text
        .lines()
        .filter_map(|l| l.rsplit('\t').next())
        .filter(|t| !t.is_empty())
        .collect();
    let enc = tok
        .encode_batch(texts.clone(), false)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut map = vec![UNK; tok.get_vocab_size(true)];
    let mut next = 5i64;
    for (i, e) in enc.iter().enumerate() {
        if split_of(i) != 0 {
            continue;
        }
        for &id in e.get_ids() {
            if map[id as usize] == UNK {
                map[id as usize] = next;
                next += 1;
            }
        }
    }
    let (mut train, mut dev, mut test) = (Vec::new(), Vec::new(), Vec::new());
    for (i, e) in enc.iter().enumerate() {
        let ids: Vec<i64> = e.get_ids().iter().map(|&id| map[id as usize]).collect();
        match split_of(i) {
            0 => train.push(ids),
            1 => dev.push(ids),
            _ => test.push(ids),
        }
    }
    let spec = MaskingSpec {
        mask_id: MASK,
        special_ids: vec![PAD, UNK, CLS, SEP, MASK],
        vocab_size: next,
        probability: 0.15,
    };
    let heldout = masked_batches(&pack(&test, SEQ), heldout_sequences, &spec, 12345)?;
    let dev_batches = masked_batches(&pack(&dev, SEQ), heldout_sequences, &spec, 54321)?;
    Ok(Corpus {
        train: pack(&train, SEQ),
        heldout,
        dev: dev_batches,
        dev_texts: dev.len(),
        vocab: next,
        spec,
        seq: SEQ,
        train_texts: train.len(),
        heldout_texts: test.len(),
    })
}

/// A BERT config for the corpus: `layers`, `hidden`, `heads`, FFN `4 * hidden`.
fn mlm_config(vocab: i64, layers: i64, hidden: i64, heads: i64) -> BertConfig {
    let mut c = BertConfig::tiny(vocab, hidden, layers);
    c.num_attention_heads = heads;
    c.max_position_embeddings = SEQ;
    c.pad_token_id = PAD;
    c
}

fn heldout_loss(m: &BertForMaskedLm, batches: &[MlmBatch], device: Device) -> Result<f64> {
    tch::no_grad(|| -> Result<f64> {
        let (mut sum, mut n) = (0.0, 0.0);
        for b in batches {
            let logits = m.logits(
                &b.input_ids.to_device(device),
                &b.positions.to_device(device),
                false,
            )?;
            let ce = logits
                .log_softmax(-1, Kind::Float)
                .gather(1, &b.labels.to_device(device).unsqueeze(1), false)
                .sum(Kind::Double)
                .double_value(&[]);
            sum -= ce;
            n += b.labels.size()[0] as f64;
        }
        Ok(sum / n)
    })
}

/// One run's held-out curve: (training FLOPs so far, step, held-out loss).
struct Curve {
    points: Vec<(f64, usize, f64)>,
    seconds: f64,
}

impl Curve {
    fn last(&self) -> (f64, f64) {
        let p = self.points.last().expect("a point");
        (p.0, p.2)
    }

    /// The training FLOPs at which the held-out loss first reaches `target`, linearly
    /// interpolated between evaluations; `None` if it never does.
    fn flops_to(&self, target: f64) -> Option<f64> {
        let mut prev: Option<(f64, f64)> = None;
        for &(f, _, l) in &self.points {
            if l <= target {
                return Some(match prev {
                    Some((pf, pl)) if pl > l => pf + (f - pf) * (pl - target) / (pl - l),
                    _ => f,
                });
            }
            prev = Some((f, l));
        }
        None
    }
}

/// The training recipe, the same for scratch and grown runs.
#[derive(Clone, Copy)]
struct Recipe {
    steps: usize,
    batch: i64,
    lr: f64,
    warmup: usize,
    eval_every: usize,
    /// Grown runs: the step the small model is grown at, and the re-warmup after it.
    grow_at: usize,
    rewarm: usize,
}

fn lr_at(r: &Recipe, step: usize, grown_at: Option<usize>) -> f64 {
    let base = if step < r.warmup {
        (step + 1) as f64 / r.warmup as f64
    } else {
        (r.steps - step) as f64 / (r.steps - r.warmup) as f64
    };
    let rewarm = match grown_at {
        Some(g) if step >= g && step < g + r.rewarm => (step - g + 1) as f64 / r.rewarm as f64,
        _ => 1.0,
    };
    r.lr * base * rewarm
}

/// What every masked-LM run of an experiment shares.
struct Runs<'a> {
    corpus: &'a Corpus,
    small: BertConfig,
    big: BertConfig,
    device: Device,
    bar: &'a ProgressBar,
}

impl<'a> Runs<'a> {
    /// The experiment's pair: a 2-layer model of hidden `h` grown to 4 layers and twice
    /// the width.
    fn new(corpus: &'a Corpus, ctx: &Ctx, h: i64, bar: &'a ProgressBar) -> Self {
        Self {
            corpus,
            small: mlm_config(corpus.vocab, 2, h, 4),
            big: mlm_config(corpus.vocab, 4, 2 * h, 4),
            device: ctx.device,
            bar,
        }
    }
}

/// Trains `small` (then grows it 2x in depth and width at `recipe.grow_at`) when
/// `grow`, else `big` from scratch, evaluating the test (or, `on_dev`, the dev) loss
/// every `eval_every` steps.
fn train_mlm(runs: &Runs, recipe: &Recipe, seed: u64, grow: bool, on_dev: bool) -> Result<Curve> {
    let (corpus, device, bar) = (runs.corpus, runs.device, runs.bar);
    let (small, big) = (&runs.small, &runs.big);
    // A grown run gets the scratch run's FLOPs budget: the small model's steps, then as
    // many steps of the grown model as the rest of the budget pays for (expected masked
    // counts: 15% of the non-special positions). Its schedule decays to 0 at its own end.
    let mut recipe = *recipe;
    if grow {
        let predicted = (0.15 * (recipe.batch * (corpus.seq - 2)) as f64).round() as i64;
        let step = |c: &BertConfig| train_flops(c, recipe.batch, corpus.seq, predicted);
        let budget = recipe.steps as f64 * step(big);
        let rest = budget - recipe.grow_at as f64 * step(small);
        recipe.steps = recipe.grow_at + (rest / step(big)).round() as usize;
    }
    let recipe = &recipe;
    let eval = if on_dev { &corpus.dev } else { &corpus.heldout };
    let t0 = Instant::now();
    tch::manual_seed(seed as i64);
    let mut cfg = if grow { small.clone() } else { big.clone() };
    let mut model = BertForMaskedLm::random(cfg.clone(), device)?;
    let mut opt = Optimizer::new(OptimizerKind::default(), 0.01);
    let n = corpus.train.size()[0];
    let per_epoch = (n / recipe.batch) as usize;
    let mut order = Tensor::empty([0], (Kind::Int64, Device::Cpu));
    let mut flops = 0.0;
    let mut points = vec![(0.0, 0, heldout_loss(&model, eval, device)?)];
    for step in 0..recipe.steps {
        if grow && step == recipe.grow_at {
            let ck = model.state_dict();
            let st = opt.state();
            let wide = widen_bert(
                &cfg,
                &ck,
                &WidenBert {
                    hidden_size: Some(big.hidden_size),
                    heads: Some(big.num_attention_heads),
                    intermediate_size: Some(big.intermediate_size),
                    seed,
                },
            )?;
            let (ck, st) = (
                wide.growth.apply(&ck)?,
                wide.growth.apply_optimizer_state(&st)?,
            );
            let deep = deepen_bert(
                &wide.config,
                &ck,
                &DeepenBert {
                    layers: big.num_hidden_layers,
                    method: DepthMethod::Gated,
                    every: None,
                },
            )?;
            let (mut ck, st) = (
                deep.growth.apply(&ck)?,
                deep.growth.apply_optimizer_state(&st)?,
            );
            cfg = deep.config.clone();
            model = BertForMaskedLm::from_checkpoint(cfg.clone(), &mut ck, device, Kind::Float)?;
            opt = Optimizer::new(OptimizerKind::default(), 0.01);
            opt.load_state(&st, &model.params())?;
        }
        let in_epoch = step % per_epoch;
        if in_epoch == 0 {
            tch::manual_seed((seed * 1_000_003 + (step / per_epoch) as u64) as i64);
            order = Tensor::randperm(n, (Kind::Int64, Device::Cpu));
        }
        let idx = order.narrow(0, in_epoch as i64 * recipe.batch, recipe.batch);
        tch::manual_seed((seed * 7_919_993 + step as u64) as i64);
        let b = corpus.spec.apply(&corpus.train.index_select(0, &idx))?;
        let params = model.params();
        params.zero_grad();
        let loss = model.loss(
            &MlmBatch {
                input_ids: b.input_ids.to_device(device),
                positions: b.positions.to_device(device),
                labels: b.labels.to_device(device),
            },
            true,
        )?;
        loss.backward();
        let _ = params.clip_grad_norm(1.0)?;
        opt.step(&params, lr_at(recipe, step, grow.then_some(recipe.grow_at)))?;
        flops += train_flops(&cfg, recipe.batch, corpus.seq, b.positions.size()[0]);
        if (step + 1) % recipe.eval_every == 0 || step + 1 == recipe.steps {
            points.push((flops, step + 1, heldout_loss(&model, eval, device)?));
            bar.set_message(format!(
                "grow.train_faster seed {seed} {} step {}/{}: held-out {:.3}",
                if grow { "grown" } else { "scratch" },
                step + 1,
                recipe.steps,
                points.last().expect("pushed").2
            ));
        }
    }
    Ok(Curve {
        points,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

fn plot_curves(path: &std::path::Path, runs: &[(String, &Curve)], target: f64) -> Result<()> {
    use plotters::prelude::*;
    let max_f = runs.iter().map(|(_, c)| c.last().0).fold(0.0, f64::max);
    let losses = runs
        .iter()
        .flat_map(|(_, c)| c.points.iter().skip(1).map(|p| p.2));
    let (lo, hi) = losses.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), l| {
        (a.min(l), b.max(l))
    });
    let root = BitMapBackend::new(path, (900, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "held-out MLM loss against training FLOPs",
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..max_f * 1.02, (lo - 0.05)..(hi.min(lo + 3.0) + 0.05))?;
    chart
        .configure_mesh()
        .x_desc("training FLOPs")
        .y_desc("held-out loss (nats)")
        .x_label_formatter(&|x| format!("{x:.1e}"))
        .draw()?;
    for (i, (name, c)) in runs.iter().enumerate() {
        let color = if name.starts_with("scratch") {
            RED.mix(0.5 + 0.15 * (i % 3) as f64)
        } else {
            BLUE.mix(0.5 + 0.15 * (i % 3) as f64)
        };
        chart
            .draw_series(LineSeries::new(
                c.points.iter().skip(1).map(|p| (p.0, p.2)),
                color.stroke_width(2),
            ))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .draw_series(LineSeries::new(
            vec![(0.0, target), (max_f, target)],
            BLACK.mix(0.4),
        ))?
        .label("target (mean scratch final loss)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// The share of the steps the small model trains before growing, chosen by
/// `grow.train_faster_dev` on the dev text (seed 0): see `benches/sweeps/`.
const GROW_AT: f64 = 0.75;

/// The sizes of `grow.train_faster` and of its dev sweep `grow.train_faster_dev`.
pub(super) struct TrainFasterSizes {
    /// Held-out (test, and dev) sequences the loss is measured on.
    heldout: usize,
    /// The small model's hidden size (the big one's is twice that).
    hidden: i64,
    /// Scratch's steps (the grown run's budget in FLOPs).
    steps: usize,
    batch: i64,
    lr: f64,
    eval_every: usize,
    /// Steps of re-warmup after the growth.
    rewarm: usize,
    /// `grow.train_faster`'s seeds (the dev sweep runs seed 0).
    seeds: Seeds,
    /// The notes' line on the size.
    note: &'static str,
}

const TRAIN_FASTER_FULL: TrainFasterSizes = TrainFasterSizes {
    heldout: 512,
    hidden: 128,
    steps: 1000,
    batch: 32,
    lr: 1e-3,
    eval_every: 50,
    rewarm: 50,
    seeds: Seeds::All,
    note: "CPU size (a CUDA run uses models twice as wide, batch 128 and 1200 steps).",
};

/// On the CPU (and at quick sizes): 1000 steps of 32 sequences at lr 1e-3. At CUDA's
/// full size (models twice as wide): 1200 steps of 128 sequences (4.8x the tokens) at
/// lr 5e-4, halved a priori for the doubled width (fixed before any CUDA run, not
/// tuned).
pub(super) const TRAIN_FASTER_SIZES: Sizes<TrainFasterSizes> = Sizes {
    quick: TrainFasterSizes {
        heldout: 64,
        steps: 20,
        eval_every: 10,
        rewarm: 2,
        seeds: Seeds::First(1),
        ..TRAIN_FASTER_FULL
    },
    cpu: None,
    full: TRAIN_FASTER_FULL,
    cuda: OnCuda {
        quick: None,
        full: Some(TrainFasterSizes {
            hidden: 256,
            steps: 1200,
            batch: 128,
            lr: 5e-4,
            eval_every: 100,
            note: "CUDA size: both models twice as wide as the CPU run's, batch 128 instead of 32, 1200 steps instead of 1000, lr 5e-4 instead of 1e-3 (halved a priori for the width, not tuned); the growth step's share (75%) is the one the CPU-size dev sweep chose, not re-swept at this size.",
            ..TRAIN_FASTER_FULL
        }),
    },
};

impl Knobs for TrainFasterSizes {
    fn counts(&self) -> Counts {
        vec![
            ("heldout", self.heldout),
            ("hidden", self.hidden as usize),
            ("steps", self.steps),
            ("batch", self.batch as usize),
            ("eval_every", self.eval_every),
            ("rewarm", self.rewarm),
            ("seeds", self.seeds.count()),
        ]
    }
}

/// The recipe of a run that grows after `grow_at` of scratch's steps.
fn recipe(s: &TrainFasterSizes, grow_at: f64) -> Recipe {
    Recipe {
        steps: s.steps,
        batch: s.batch,
        lr: s.lr,
        warmup: s.steps / 20,
        eval_every: s.eval_every,
        grow_at: (s.steps as f64 * grow_at) as usize,
        rewarm: s.rewarm,
    }
}

/// Dev sweep for `grow.train_faster`: seed 0, growth after 25%, 50% or 75% of the
/// steps, against scratch, losses on the dev text (never the test text).
pub fn train_faster_dev(ctx: &Ctx, bar: &ProgressBar) -> Result<Outcome> {
    let sizes = ctx.sizes(&TRAIN_FASTER_SIZES);
    let corpus = load_corpus(sizes.heldout)?;
    let runs = Runs::new(&corpus, ctx, sizes.hidden, bar);
    let mut m = Metrics::new();
    let r = recipe(sizes, GROW_AT);
    let s = train_mlm(&runs, &r, 0, false, true)?;
    let (s_flops, target) = s.last();
    m.insert("scratch.dev_loss".into(), target);
    m.insert("scratch.flops".into(), s_flops);
    let mut curves = vec![("scratch seed 0".to_string(), s)];
    for share in [0.25, 0.5, 0.75] {
        let r = recipe(sizes, share);
        let g = train_mlm(&runs, &r, 0, true, true)?;
        let key = format!("grow_at_{}", (share * 100.0) as u32);
        m.insert(format!("{key}.dev_loss"), g.last().1);
        m.insert(format!("{key}.flops"), g.last().0);
        if let Some(f) = g.flops_to(target) {
            m.insert(
                format!("{key}.flops_saving"),
                1.0 - f / curves[0].1.flops_to(target).expect("reaches its own end"),
            );
        }
        super::say(
            bar,
            format!(
                "grow.train_faster_dev {key}: dev loss {:.4} vs scratch {target:.4}",
                g.last().1
            ),
        );
        curves.push((format!("grown at {share} seed 0"), g));
    }
    let dir = ctx.report_dir();
    std::fs::create_dir_all(&dir)?;
    let plot = dir.join("grow_train_faster_dev.png");
    let refs: Vec<(String, &Curve)> = curves.iter().map(|(n, c)| (n.clone(), c)).collect();
    plot_curves(&plot, &refs, target)?;
    Ok(Outcome {
        metrics: m,
        notes: vec![format!(
            "Dev sweep (seed 0, dev text only) of the step at which grow.train_faster grows the small model; the recipe otherwise as grow.train_faster's. Plot: {}.",
            plot.display()
        )],
    })
}

/// Masked-LM pretraining on the synopses: a 2-layer, hidden-128 BERT grown exactly to
/// 4 layers and hidden 256 (gated layers, uniform replication) at a set step and
/// trained on, against the 4-layer model trained from scratch with the same recipe.
pub fn train_faster(ctx: &Ctx, bar: &ProgressBar) -> Result<Outcome> {
    let sizes = ctx.sizes(&TRAIN_FASTER_SIZES);
    let corpus = load_corpus(sizes.heldout)?;
    let runs = Runs::new(&corpus, ctx, sizes.hidden, bar);
    let recipe = recipe(sizes, GROW_AT);
    let seeds = sizes.seeds.of(&ctx.seeds);
    let (small, big) = (runs.small.clone(), runs.big.clone());
    let mut m = Metrics::new();
    // The sizes that ran, so a report says which (CPU and CUDA sizes differ).
    m.insert("big.hidden_size".into(), big.hidden_size as f64);
    m.insert("small.hidden_size".into(), small.hidden_size as f64);
    m.insert("scratch.steps".into(), recipe.steps as f64);
    m.insert("batch".into(), recipe.batch as f64);
    let mut curves = Vec::new();
    for &seed in seeds {
        // Interleaved: scratch then grown for each seed.
        let s = train_mlm(&runs, &recipe, seed, false, false)?;
        let g = train_mlm(&runs, &recipe, seed, true, false)?;
        super::say(bar, format!(
            "grow.train_faster seed {seed}: scratch {:.4} ({:.2e} FLOPs, {:.0} s), grown {:.4} ({:.2e} FLOPs, {:.0} s)",
            s.last().1, s.last().0, s.seconds, g.last().1, g.last().0, g.seconds
        ));
        curves.push((seed, s, g));
    }
    let target = super::mean(
        &curves
            .iter()
            .map(|(_, s, _)| s.last().1)
            .collect::<Vec<_>>(),
    );
    let (mut sf, mut gf, mut sl, mut gl, mut save, mut ss, mut gs) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut reached = 0;
    for (seed, s, g) in &curves {
        // Per seed, the target is that seed's scratch loss at its end.
        let t = s.last().1;
        let s_f = s.flops_to(t).expect("scratch reaches its own final loss");
        sf.push(s_f);
        sl.push(t);
        gl.push(g.last().1);
        ss.push(s.seconds);
        gs.push(g.seconds);
        m.insert(format!("seed{seed}.scratch.final_loss"), t);
        m.insert(format!("seed{seed}.grown.final_loss"), g.last().1);
        m.insert(format!("seed{seed}.scratch.flops_total"), s.last().0);
        m.insert(format!("seed{seed}.grown.flops_total"), g.last().0);
        if let Some(g_f) = g.flops_to(t) {
            reached += 1;
            gf.push(g_f);
            save.push(1.0 - g_f / s_f);
            m.insert(format!("seed{seed}.flops_saving"), 1.0 - g_f / s_f);
        }
    }
    use super::{mean, sample_sd};
    m.insert("scratch.flops_to_target".into(), mean(&sf));
    m.insert("scratch.final_loss".into(), mean(&sl));
    m.insert("scratch.final_loss_sd".into(), sample_sd(&sl));
    m.insert("grown.final_loss".into(), mean(&gl));
    m.insert("grown.final_loss_sd".into(), sample_sd(&gl));
    m.insert("grown.reached_target_runs".into(), reached as f64);
    m.insert("scratch.seconds".into(), mean(&ss));
    m.insert("grown.seconds".into(), mean(&gs));
    m.insert("target_loss".into(), target);
    if reached == curves.len() {
        m.insert("grown.flops_to_target".into(), mean(&gf));
        m.insert("flops_saving".into(), mean(&save));
        m.insert("flops_saving_sd".into(), sample_sd(&save));
    }
    let dir = ctx.report_dir();
    std::fs::create_dir_all(&dir)?;
    let plot = dir.join("grow_train_faster.png");
    let runs: Vec<(String, &Curve)> = curves
        .iter()
        .flat_map(|(seed, s, g)| {
            [
                (format!("scratch seed {seed}"), s),
                (format!("grown seed {seed}"), g),
            ]
        })
        .collect();
    // A plot that cannot be drawn (no fonts on the machine) costs the plot, not the
    // runs' figures.
    let plot_note = match plot_curves(&plot, &runs, target) {
        Ok(()) => format!(
            "Plot: {} (held-out loss against training FLOPs, every run).",
            plot.display()
        ),
        Err(e) => format!("No plot: drawing {} failed: {e:#}", plot.display()),
    };
    let notes = vec![
        format!(
            "Masked-LM pretraining (BERT masking: 15% of non-special tokens, 80/10/10) on the {} training synopses of fixtures/debian_synopses ({} test and {} dev texts held out by a fixed hash of their position; the reported loss is on the first {} packed test sequences, masked once with a fixed seed). Tokens: MiniLM's tokenizer, mapped to the {} ids that occur in the training texts (others to [UNK]) so the tied decoder is a third of MiniLM's; texts joined by [SEP] and packed into [CLS] ... [SEP] sequences of {} tokens.",
            corpus.train_texts, corpus.heldout_texts, corpus.dev_texts, corpus.heldout.iter().map(|b| b.input_ids.size()[0]).sum::<i64>(), corpus.vocab, corpus.seq
        ),
        format!(
            "Big model: {} layers, hidden {}, {} heads, FFN {}. Scratch trains it for {} steps; grown trains a {}-layer, hidden-{}, {}-head, FFN-{} model for {} steps, grows it exactly (hidden {} -> {} by uniform replication with heads of {} -> {}, FFN {} -> {} by Net2WiderNet, {} -> {} layers by gated layers at g = 0; the AdamW moments carried over by the growth's gradient scales) and trains it on with a {}-step re-warmup for as many steps as the rest of scratch's FLOPs budget pays for (the same total compute). Same recipe for both (fixed before any run except the growth step, which grow.train_faster_dev chose on the dev text): AdamW lr {:.0e}, weight decay 0.01, batch {} x {} tokens, {} warmup steps, linear decay to 0 at each run's last step, gradient clipping at 1, dropout 0.1, seeds {:?}.",
            big.num_hidden_layers, big.hidden_size, big.num_attention_heads, big.intermediate_size,
            recipe.steps,
            small.num_hidden_layers, small.hidden_size, small.num_attention_heads, small.intermediate_size,
            recipe.grow_at,
            small.hidden_size, big.hidden_size,
            small.hidden_size / small.num_attention_heads, big.hidden_size / big.num_attention_heads,
            small.intermediate_size, big.intermediate_size,
            small.num_hidden_layers, big.num_hidden_layers,
            recipe.rewarm, recipe.lr, recipe.batch, corpus.seq, recipe.warmup, seeds
        ),
        sizes.note.into(),
        "FLOPs counted from the shapes (reuse_core::models::mlm::train_flops): 6 x non-embedding encoder parameters per token, 12 x layers x seq x hidden per token for attention, and 6 x (head transform + hidden x vocab) per predicted token; the small model's steps are counted at its own size. Evaluation is not counted. Target: each seed's scratch held-out loss at its end; flops_to_target interpolates linearly between evaluations; flops_saving = 1 - grown / scratch, averaged over seeds (only when every grown run reached its target).".into(),
        plot_note,
        "Where growth does not pay: on digits, growing a 32-unit MLP to 512 units cost more FLOPs than training 512 units from scratch (-15% to -280% over 5 seeds, the issue's measurement).".into(),
    ];
    Ok(Outcome { metrics: m, notes })
}

/// The claims-table rows this file's experiments measure (see `crate::claims`).
pub const CLAIMS: &[Claim] = &[
    Claim {
        text: "A grown model reaches the scratch model's loss with >= 30% less compute",
        experiment: "grow.train_faster",
        target: "flops_saving >= 0.30",
        // flops_saving is reported only when every seed's grown run reached scratch's
        // final loss.
        keys: &["grown.reached_target_runs"],
        eval: |g| {
            let s = g("flops_saving");
            if s.is_nan() {
                return (
                    "not reached".into(),
                    format!(
                        "the grown model reached scratch's final loss in {:.0} run(s) of the \
                         seeds only",
                        g("grown.reached_target_runs")
                    ),
                    Some(false),
                );
            }
            (
                format!("{s:.3}"),
                format!("sd {:.3} over seeds", g("flops_saving_sd")),
                Some(s >= 0.3),
            )
        },
    },
    Claim {
        text: "... and ends no worse than scratch (held-out masked-LM loss)",
        experiment: "grow.train_faster",
        target: "grown final loss <= scratch's",
        keys: &[
            "grown.final_loss",
            "grown.final_loss_sd",
            "scratch.final_loss",
            "scratch.final_loss_sd",
        ],
        eval: |g| {
            let (a, b) = (g("grown.final_loss"), g("scratch.final_loss"));
            (
                format!("{a:.3}"),
                format!(
                    "sd {:.3}; scratch {}",
                    g("grown.final_loss_sd"),
                    pm(b, g("scratch.final_loss_sd"))
                ),
                Some(a <= b),
            )
        },
    },
];
