//! A continual run (three tasks, EWC and replay, a run file every step and a stream file
//! after every task) killed with SIGKILL at random points, mid-task and between tasks,
//! resumes and ends with the weights and accuracy matrix of a run never killed.
//!
//! The training process is this test binary itself, re-run with only `stream_child`
//! selected and `REUSE_STREAM_CHILD` naming its folder.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::rc::Rc;

use rand::{Rng, SeedableRng};
use reuse_continual::ewc::{Ewc, EwcConfig, FisherKind};
use reuse_continual::scenario::{run_stream_resumable, Scenario};
use reuse_continual::{BufferPolicy, PerBatch, Replay, ReplayConfig};
use reuse_core::data::load_digits;
use reuse_core::trainer::StepContext;
use reuse_core::{
    Activation, Checkpoint, Mlp, Model, Params, Result, RunStateConfig, SaveParams, Technique,
    TrainConfig, Trainer,
};
use tch::{Device, Tensor};

/// Counts optimizer steps over the whole stream (state saved with the run) and prints
/// each one.
struct Progress {
    count: i64,
}

impl Technique for Progress {
    fn name(&self) -> &str {
        "progress"
    }
    fn after_step(&mut self, _p: &Params, _ctx: &StepContext) -> Result<()> {
        self.count += 1;
        println!("step {}", self.count);
        std::thread::sleep(std::time::Duration::from_millis(4));
        Ok(())
    }
    fn state(&self) -> Result<Checkpoint> {
        let mut c = Checkpoint::new();
        c.insert("count", Tensor::from(self.count));
        Ok(c)
    }
    fn load_state(&mut self, s: &Checkpoint) -> Result<()> {
        self.count = s.tensor("count").map_or(0, |t| t.int64_value(&[]));
        Ok(())
    }
}

#[test]
fn stream_child() {
    let Some(dir) = std::env::var_os("REUSE_STREAM_CHILD") else {
        return;
    };
    let dir = Path::new(&dir);
    // One intra-op thread: with two, libtorch's reductions (the bias gradients) split
    // their work by how many threads OpenMP hands out, which varies with machine load
    // and changes the last bit; bit-for-bit resumption is only defined for a fixed
    // thread count.
    tch::set_num_threads(1);
    let d = load_digits(&reuse_testkit::fixtures_dir().join("digits/digits.csv.gz")).unwrap();
    let splits = vec![vec![0, 1], vec![2, 3], vec![4, 5]];
    let s = Scenario::class_incremental(Rc::new(d.train), Rc::new(d.test), &splits).unwrap();
    tch::manual_seed(5);
    let net = Mlp::new(&[64, 64, 10], Activation::Relu, Device::Cpu)
        .unwrap()
        .with_dropout(0.1);
    let mut trainer = Trainer::new(TrainConfig {
        epochs: 3,
        lr: 3e-3,
        weight_decay: 0.01,
        seed: 7,
        run_state: Some(RunStateConfig {
            path: dir.join("task.safetensors"),
            every: 1,
            params: SaveParams::All,
        }),
        ..Default::default()
    });
    let mut ewc = Ewc::new(EwcConfig::new(10.0, FisherKind::Exact)).unwrap();
    let mut rc = ReplayConfig::new(BufferPolicy::Reservoir, 50);
    rc.per_batch = PerBatch::Count(16);
    rc.seed = 3;
    let mut replay = Replay::new(rc).unwrap();
    let mut p = Progress { count: 0 };
    // Where this run starts, for the parent's messages.
    let meta = |f: &str, k: &str| {
        let f = dir.join(f);
        f.exists()
            .then(|| {
                Checkpoint::load(&f, Device::Cpu)
                    .unwrap()
                    .metadata()
                    .get(k)
                    .cloned()
            })
            .flatten()
            .unwrap_or_else(|| "-".into())
    };
    println!(
        "start: stream tasks_done {} run task {} position {}",
        meta("stream.safetensors", "tasks_done"),
        meta("task.safetensors", "task"),
        meta("task.safetensors", "step")
    );
    let r = run_stream_resumable(
        &s,
        &net,
        &mut trainer,
        &mut [&mut ewc, &mut replay, &mut p],
        256,
        &dir.join("stream.safetensors"),
    )
    .unwrap();
    net.params()
        .to_checkpoint()
        .save(dir.join("final.safetensors"))
        .unwrap();
    println!("rows {:?}", r.rows);
    println!("count {}", p.count);
}

fn run_child(dir: &Path, kill_at: Option<i64>) -> Vec<String> {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["stream_child", "--exact", "--nocapture", "--test-threads=1"])
        .env("REUSE_STREAM_CHILD", dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = Vec::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        // libtest may print "test stream_child ... " before the first line.
        let killed = kill_at
            .is_some_and(|k| line.ends_with(&format!(" step {k}")) || line == format!("step {k}"));
        lines.push(line);
        if killed {
            child.kill().unwrap();
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
fn a_killed_continual_run_resumes_to_the_same_weights_and_matrix() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let straight = run_child(a.path(), None);
    let total: i64 = straight
        .iter()
        .find_map(|l| l.strip_prefix("count "))
        .and_then(|c| c.parse().ok())
        .expect("the child reports its step count");
    let rows = straight
        .iter()
        .find(|l| l.starts_with("rows"))
        .unwrap()
        .clone();
    let mut rng = rand::rngs::StdRng::seed_from_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    );
    // Four kills at increasing steps; one near the end of the first task (tasks take
    // about a third of the steps each), where the stream file is being written and the
    // next task's run file does not exist yet. REUSE_STREAM_KILLS=a,b,c,d replays a
    // given sequence.
    let per_task = total / 3;
    let mut kills = vec![per_task];
    while kills.len() < 4 {
        let k = rng.random_range(1..total);
        if !kills.contains(&k) {
            kills.push(k);
        }
    }
    if let Ok(v) = std::env::var("REUSE_STREAM_KILLS") {
        kills = v.split(',').map(|k| k.parse().unwrap()).collect();
    }
    kills.sort_unstable();
    let first_step = |lines: &[String]| -> i64 {
        lines
            .iter()
            .find_map(|l| l.rsplit_once("step ").and_then(|(_, n)| n.parse().ok()))
            .unwrap_or(i64::MAX)
    };
    let mut last = 0;
    let mut starts = Vec::new();
    for &k in &kills {
        let lines = run_child(b.path(), Some(k));
        starts.extend(lines.iter().filter(|l| l.contains("start:")).cloned());
        assert!(
            lines.iter().any(|l| l.ends_with(&format!("step {k}"))),
            "child never reached step {k}: {lines:?}"
        );
        // It went on from where the last one was killed (at most one step is redone:
        // the kill may land before that step's run file is written), not from the start.
        let first = first_step(&lines);
        assert!(
            first == last + 1 || first == last,
            "after a kill at step {last} the next run started at step {first}: {lines:?}"
        );
        last = k;
    }
    let finish = run_child(b.path(), None);
    let first = first_step(&finish);
    assert!(
        first == last + 1 || first == last,
        "final run started at step {first}, killed at {last}"
    );
    assert!(finish.contains(&format!("count {total}")), "{finish:?}");
    assert!(finish.contains(&rows), "{rows} vs {finish:?}");
    let fa = Checkpoint::load(a.path().join("final.safetensors"), Device::Cpu).unwrap();
    let fb = Checkpoint::load(b.path().join("final.safetensors"), Device::Cpu).unwrap();
    assert_eq!(fa.len(), fb.len());
    for (n, t) in fa.iter() {
        assert!(
            t.equal(fb.tensor(n).unwrap()),
            "{n} differs (max |diff| {}) after kills at steps {kills:?}; runs: {starts:?}",
            (t - fb.tensor(n).unwrap()).abs().max().double_value(&[])
        );
    }
    eprintln!(
        "killed at steps {kills:?} of {total}; weights and matrix identical; runs: {starts:?}"
    );
}
