//! A training process killed with SIGKILL at random steps, several times, resumes from
//! its run file and ends with weights bit-identical to a run that was never killed.
//!
//! The training process is this test binary itself, re-run with only `training_child`
//! selected and `REUSE_RESUME_CHILD` naming its folder; it prints `step N` after each
//! optimizer step so the parent knows when to kill it.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use rand::{Rng, SeedableRng};
use reuse_core::data::load_digits;
use reuse_core::trainer::StepContext;
use reuse_core::{
    Activation, Checkpoint, Mlp, Model, Params, Result, RunStateConfig, SaveParams, Schedule,
    Technique, TrainConfig, Trainer,
};
use tch::{Device, Tensor};

const STEPS: usize = 120;

/// Counts steps (state saved with the run) and reports each one on stdout.
struct Progress {
    count: i64,
    slow_ms: u64,
}

impl Technique for Progress {
    fn name(&self) -> &str {
        "progress"
    }
    fn after_step(&mut self, _p: &Params, ctx: &StepContext) -> Result<()> {
        self.count += 1;
        println!("step {}", ctx.step + 1);
        std::thread::sleep(std::time::Duration::from_millis(self.slow_ms));
        Ok(())
    }
    fn state(&self) -> Result<Checkpoint> {
        let mut c = Checkpoint::new();
        c.insert("count", Tensor::from(self.count));
        Ok(c)
    }
    fn load_state(&mut self, s: &Checkpoint) -> Result<()> {
        self.count = s.tensor("count")?.int64_value(&[]);
        Ok(())
    }
}

/// The training process: runs only when the parent sets `REUSE_RESUME_CHILD`.
#[test]
fn training_child() {
    let Some(dir) = std::env::var_os("REUSE_RESUME_CHILD") else {
        return;
    };
    let dir = Path::new(&dir);
    let slow_ms = std::env::var("REUSE_RESUME_SLOW_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // One intra-op thread: with two, libtorch's reductions split their work by how many
    // threads OpenMP hands out, which varies with machine load and changes the last bit.
    tch::set_num_threads(1);
    let d = load_digits(&reuse_testkit::fixtures_dir().join("digits/digits.csv.gz")).unwrap();
    tch::manual_seed(3);
    let net = Mlp::new(&[64, 96, 10], Activation::Relu, Device::Cpu)
        .unwrap()
        .with_dropout(0.2);
    let mut t = Trainer::new(TrainConfig {
        max_steps: Some(STEPS),
        lr: 3e-3,
        weight_decay: 0.01,
        schedule: Schedule::Cosine { warmup: 10 },
        clip_grad_norm: Some(1.0),
        seed: 11,
        run_state: Some(RunStateConfig {
            path: dir.join("run.safetensors"),
            every: 1,
            params: SaveParams::Trainable,
        }),
        ..Default::default()
    });
    let mut p = Progress { count: 0, slow_ms };
    if let Some(step) = t.resume(&net, &mut [&mut p]).unwrap() {
        println!("resumed from {step}");
    }
    t.fit(&net, &d.train, None, &mut [&mut p]).unwrap();
    net.params()
        .to_checkpoint()
        .save(dir.join("final.safetensors"))
        .unwrap();
    println!("count {}", p.count);
}

/// Runs the child in `dir`; kills it with SIGKILL when it reports step `kill_at`.
/// Returns the lines it printed.
fn run_child(dir: &Path, kill_at: Option<usize>) -> Vec<String> {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "training_child",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("REUSE_RESUME_CHILD", dir)
        .env("REUSE_RESUME_SLOW_MS", "5")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = Vec::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        let killed = kill_at.is_some_and(|k| line.ends_with(&format!("step {k}")));
        lines.push(line);
        if killed {
            child.kill().unwrap(); // SIGKILL on Unix
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
fn sigkilled_training_resumes_bit_identical() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let straight = run_child(a.path(), None);
    assert!(straight.contains(&format!("count {STEPS}")), "{straight:?}");

    let mut rng = rand::rngs::StdRng::seed_from_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    );
    let mut last = 0usize;
    let mut kills = Vec::new();
    for _ in 0..4 {
        let k = rng.random_range(last + 2..last + 30).min(STEPS - 1);
        let lines = run_child(b.path(), Some(k));
        kills.push(k);
        assert!(
            lines.iter().any(|l| l.ends_with(&format!("step {k}"))),
            "child never reached step {k}: {lines:?}"
        );
        if last > 0 {
            assert!(
                lines.iter().any(|l| l.contains("resumed from")),
                "did not resume: {lines:?}"
            );
        }
        last = k;
    }
    let finish = run_child(b.path(), None);
    assert!(
        finish.iter().any(|l| l.contains("resumed from")),
        "{finish:?}"
    );
    // The technique's state came back too: it counted every step exactly once.
    assert!(finish.contains(&format!("count {STEPS}")), "{finish:?}");
    let fa = Checkpoint::load(a.path().join("final.safetensors"), Device::Cpu).unwrap();
    let fb = Checkpoint::load(b.path().join("final.safetensors"), Device::Cpu).unwrap();
    assert_eq!(fa.len(), fb.len());
    for (n, t) in fa.iter() {
        assert!(
            t.equal(fb.tensor(n).unwrap()),
            "{n} differs after kills at steps {kills:?}"
        );
    }
    eprintln!("killed at steps {kills:?}; final weights bit-identical");
}
