//! Next-token training of a tiny Llama on real text (Debian package synopses as bytes):
//! it learns, the trainer reports its token NLL, the chunked head + loss trains exactly
//! as the plain one, and a crashed run resumes to the same weights.

use reuse_core::data::lm::PackedText;
use reuse_core::data::{load_text_splits, BatchSource};
use reuse_core::models::llama::{CausalLm, LlamaConfig};
use reuse_core::trainer::{evaluate, StepContext};
use reuse_core::{
    Evaluation, ForwardOptions, Model, Params, Result, RunStateConfig, SaveParams, Technique,
    TrainConfig, Trainable, Trainer,
};
use reuse_testkit::fixtures_dir;
use tch::Device;

static SEED_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Bytes as tokens (0..256), EOS 257.
const EOS: i64 = 257;

fn data() -> (PackedText, PackedText) {
    let s = load_text_splits(&fixtures_dir().join("debian_sections/sections.tsv.gz")).unwrap();
    let docs = |texts: &[String], n: usize| -> Vec<Vec<i64>> {
        texts
            .iter()
            .take(n)
            .map(|t| t.bytes().map(i64::from).collect())
            .collect()
    };
    (
        PackedText::from_ids(&docs(&s.train.texts, 600), EOS, 32).unwrap(),
        PackedText::from_ids(&docs(&s.dev.texts, 100), EOS, 32).unwrap(),
    )
}

fn model(seed: i64) -> CausalLm {
    tch::manual_seed(seed);
    let mut c = LlamaConfig::tiny(260, 32, 2);
    c.tie_word_embeddings = true;
    CausalLm::random(c, Device::Cpu).unwrap()
}

#[test]
fn a_tiny_llama_learns_synopses_and_reports_token_nll() {
    let _g = SEED_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let (train, dev) = data();
    let m = model(0);
    let before = evaluate(&m, &dev, 64, Device::Cpu).unwrap();
    let Evaluation::TokenNll { nll: nll0, tokens } = before else {
        panic!("a causal LM reports token NLL, got {before:?}")
    };
    // Every position but the first of each block is a target.
    assert_eq!(tokens, dev.len() * 31);
    // Untrained: near ln(260) = 5.56.
    assert!((nll0 - 260f64.ln()).abs() < 0.3, "{nll0}");
    let mut t = Trainer::new(TrainConfig {
        epochs: 4,
        batch_size: 16,
        lr: 5e-3,
        ..Default::default()
    });
    let r = t.fit(&m, &train, Some(&dev), &mut []).unwrap();
    assert_eq!(r.eval_metric, "token_nll");
    let nll1 = r.evals.last().unwrap().1;
    // Below the entropy of the dev text's byte frequencies: the model uses context,
    // not only how common each byte is.
    let b = dev
        .batch(&(0..dev.len() as i64).collect::<Vec<_>>(), Device::Cpu)
        .unwrap();
    let ids = Vec::<i64>::try_from(b.inputs.view([-1])).unwrap();
    let mut counts = [0f64; 260];
    ids.iter().for_each(|&i| counts[i as usize] += 1.0);
    let n = ids.len() as f64;
    let unigram: f64 = counts
        .iter()
        .filter(|&&c| c > 0.0)
        .map(|c| -(c / n) * (c / n).ln())
        .sum();
    assert!(
        nll1 < unigram - 0.2,
        "dev NLL {nll0:.3} -> {nll1:.3}, unigram entropy {unigram:.3}"
    );
}

#[test]
fn the_chunked_loss_trains_exactly_as_full_logits() {
    let _g = SEED_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let (train, _) = data();
    let b = train.batch(&[0, 5, 9, 11], Device::Cpu).unwrap();
    let m = model(1);
    let grads = |logits: bool| {
        let p = m.params();
        p.zero_grad();
        let opts = ForwardOptions {
            logits,
            ..Default::default()
        };
        let o = Trainable::forward(&m, &b, true, opts).unwrap();
        assert_eq!(o.logits.defined(), logits);
        let l = m.loss(&o, &b).unwrap();
        l.backward();
        let g: Vec<_> = p
            .iter()
            .map(|(n, t)| (n.to_string(), t.grad().copy()))
            .collect();
        (l.double_value(&[]), g)
    };
    let (lf, gf) = grads(true);
    let (lc, gc) = grads(false);
    assert!((lf - lc).abs() < 1e-5, "{lf} vs {lc}");
    for ((n, a), (_, c)) in gf.iter().zip(&gc) {
        let d = (a - c).abs().max().double_value(&[]);
        assert!(d < 1e-5, "{n}: gradients differ by {d}");
    }
}

struct CrashAt(usize);

impl Technique for CrashAt {
    fn name(&self) -> &str {
        "crash"
    }
    fn after_step(&mut self, _p: &Params, ctx: &StepContext) -> Result<()> {
        if ctx.step + 1 == self.0 {
            return Err(reuse_core::Error::invalid("test", "crash"));
        }
        Ok(())
    }
}

#[test]
fn a_crashed_causal_lm_run_resumes_to_the_same_weights() {
    let _g = SEED_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let (train, _) = data();
    let dir = tempfile::tempdir().unwrap();
    let cfg = |path: &str| TrainConfig {
        max_steps: Some(12),
        batch_size: 8,
        lr: 3e-3,
        weight_decay: 0.01,
        schedule: reuse_core::Schedule::Cosine { warmup: 2 },
        clip_grad_norm: Some(1.0),
        run_state: Some(RunStateConfig {
            path: dir.path().join(path),
            every: 5,
            params: SaveParams::Trainable,
        }),
        ..Default::default()
    };
    let a = model(3);
    Trainer::new(cfg("a.safetensors"))
        .fit(&a, &train, None, &mut [])
        .unwrap();
    let b = model(3);
    let e = Trainer::new(cfg("b.safetensors"))
        .fit(&b, &train, None, &mut [&mut CrashAt(8)])
        .unwrap_err();
    assert!(e.to_string().contains("crash"));
    let b2 = model(77);
    let mut t = Trainer::new(cfg("b.safetensors"));
    assert_eq!(t.resume(&b2, &mut []).unwrap(), Some(5));
    t.fit(&b2, &train, None, &mut []).unwrap();
    for ((n, x), (_, y)) in a.named_parameters().iter().zip(b2.named_parameters()) {
        assert!(x.equal(&y), "{n} differs after resuming");
    }
}

/// Prints each optimizer step (its state saved with the run).
struct Steps(i64);

impl Technique for Steps {
    fn name(&self) -> &str {
        "steps"
    }
    fn after_step(&mut self, _p: &Params, _ctx: &StepContext) -> Result<()> {
        self.0 += 1;
        println!("step {}", self.0);
        Ok(())
    }
    fn state(&self) -> Result<reuse_core::Checkpoint> {
        let mut c = reuse_core::Checkpoint::new();
        c.insert("count", tch::Tensor::from(self.0));
        Ok(c)
    }
    fn load_state(&mut self, s: &reuse_core::Checkpoint) -> Result<()> {
        self.0 = s.tensor("count").map_or(0, |t| t.int64_value(&[]));
        Ok(())
    }
}

/// The training process of the SIGKILL test: this binary re-run with only this test
/// selected and `REUSE_LM_CHILD` naming its folder.
#[test]
fn lm_child() {
    let Some(dir) = std::env::var_os("REUSE_LM_CHILD") else {
        return;
    };
    let dir = std::path::Path::new(&dir);
    // Bit-for-bit resumption is defined for a fixed thread count (see reuse-continual's
    // kill test).
    tch::set_num_threads(1);
    let (train, _) = data();
    let m = model(11);
    let mut t = Trainer::new(TrainConfig {
        max_steps: Some(16),
        batch_size: 8,
        lr: 3e-3,
        seed: 5,
        run_state: Some(RunStateConfig {
            path: dir.join("run.safetensors"),
            every: 1,
            params: SaveParams::All,
        }),
        ..Default::default()
    });
    let mut s = Steps(0);
    t.resume(&m, &mut [&mut s]).unwrap();
    t.fit(&m, &train, None, &mut [&mut s]).unwrap();
    m.params()
        .to_checkpoint()
        .save(dir.join("final.safetensors"))
        .unwrap();
    println!("done {}", s.0);
}

fn run_lm_child(dir: &std::path::Path, kill_at: Option<i64>) -> Vec<String> {
    use std::io::BufRead;
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["lm_child", "--exact", "--nocapture", "--test-threads=1"])
        .env("REUSE_LM_CHILD", dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = Vec::new();
    for line in std::io::BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        let kill = kill_at.is_some_and(|k| line.ends_with(&format!("step {k}")));
        lines.push(line);
        if kill {
            child.kill().unwrap(); // SIGKILL
            break;
        }
    }
    let status = child.wait().unwrap();
    if kill_at.is_none() {
        assert!(status.success(), "child failed: {lines:?}");
    }
    lines
}

#[test]
fn a_sigkilled_causal_lm_run_resumes_bit_for_bit() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let straight = run_lm_child(a.path(), None);
    assert!(
        straight.iter().any(|l| l.ends_with("done 16")),
        "{straight:?}"
    );
    for k in [3, 9, 14] {
        let lines = run_lm_child(b.path(), Some(k));
        assert!(
            lines.iter().any(|l| l.ends_with(&format!("step {k}"))),
            "{lines:?}"
        );
    }
    let fin = run_lm_child(b.path(), None);
    assert!(fin.iter().any(|l| l.ends_with("done 16")), "{fin:?}");
    // It went on from the last kill, not from the start.
    assert!(!fin.iter().any(|l| l.ends_with("step 1")), "{fin:?}");
    let x = reuse_core::Checkpoint::load(a.path().join("final.safetensors"), Device::Cpu).unwrap();
    let y = reuse_core::Checkpoint::load(b.path().join("final.safetensors"), Device::Cpu).unwrap();
    for (n, t) in x.iter() {
        assert!(
            t.equal(y.get(n).unwrap()),
            "{n} differs after kills and resumes"
        );
    }
}
