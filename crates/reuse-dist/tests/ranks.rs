//! Several processes on loopback with Gloo: collectives, data-parallel training that
//! equals one process on the combined batch (full fine-tuning of an MLP on digits, LoRA
//! on a small BERT, and next-token training of a tiny Llama whose ranks hold different
//! numbers of labelled tokens), and a rank that dies.
//!
//! Each test starts this same test binary again as the ranks (the ignored `rank` test,
//! told what to do by `REUSE_DIST_SCENARIO`), then compares what they wrote with a
//! single-process run.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reuse_core::data::lm::PromptResponse;
use reuse_core::data::{load_digits, Batch, BatchSource, TensorDataset};
use reuse_core::models::llama::{CausalLm, LlamaConfig};
use reuse_core::models::{Bert, BertClassifier, BertConfig};
use reuse_core::trainer::{StepContext, Technique};
use reuse_core::{
    Activation, Checkpoint, Mlp, Model, Params, Result as CoreResult, Schedule, TrainConfig,
    Trainer,
};
use reuse_dist::{DataParallel, GroupConfig, ProcessGroup, ReduceOp};
use reuse_peft::{LoraConfig, LoraModel};
use reuse_testkit::fixtures_dir;
use tch::{Device, Kind, Tensor};

const SCENARIO: &str = "REUSE_DIST_SCENARIO";

/// libtorch's generator is global and the harness runs tests on several threads: the
/// tests that seed it hold this lock.
static SEED_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn seeded() -> std::sync::MutexGuard<'static, ()> {
    SEED_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}
const OUT: &str = "REUSE_DIST_OUT";

fn digits_train() -> TensorDataset {
    load_digits(&fixtures_dir().join("digits/digits.csv.gz"))
        .unwrap()
        .train
}

fn first(d: &TensorDataset, n: i64) -> TensorDataset {
    TensorDataset::new(d.x.narrow(0, 0, n), d.y.narrow(0, 0, n)).unwrap()
}

fn mlp_config() -> TrainConfig {
    TrainConfig {
        epochs: 1,
        batch_size: 32,
        lr: 3e-3,
        weight_decay: 0.01,
        clip_grad_norm: Some(1.0),
        schedule: Schedule::Linear { warmup: 5 },
        ..Default::default()
    }
}

/// Trains an MLP on digits (1437 examples: the last batch has 29) and then on 33 of them
/// (the last batch has 1, so one of two ranks has nothing to train on). Returns the
/// weights and the reported losses.
fn train_mlp(dp: Option<&mut DataParallel>) -> (Checkpoint, Vec<f64>) {
    let data = digits_train();
    let small = first(&data, 33);
    // Each rank starts from different weights: the broadcast must make them equal.
    let seed = dp.as_ref().map_or(0, |d| d.group().rank() as i64 * 7);
    tch::manual_seed(seed);
    let net = Mlp::new(&[64, 48, 10], Activation::Relu, Device::Cpu).unwrap();
    if dp.is_none() {
        // The single-process run starts from rank 0's weights.
        tch::manual_seed(0);
        let r0 = Mlp::new(&[64, 48, 10], Activation::Relu, Device::Cpu).unwrap();
        net.params()
            .load_checkpoint(&r0.params().to_checkpoint())
            .unwrap();
    }
    let mut trainer = Trainer::new(mlp_config());
    let mut losses = Vec::new();
    match dp {
        Some(dp) => {
            for d in [&data, &small] {
                let shard = dp.shard(d);
                let r = trainer.fit(&net, &shard, None, &mut [&mut *dp]).unwrap();
                losses.extend(r.losses);
            }
        }
        None => {
            for d in [&data, &small] {
                losses.extend(trainer.fit(&net, d, None, &mut []).unwrap().losses);
            }
        }
    }
    (net.params().to_checkpoint(), losses)
}

/// Token batches of a fixed random corpus (no padding).
struct Tokens {
    ids: Tensor,
    labels: Tensor,
}

impl Tokens {
    fn new() -> Self {
        let g = Tensor::from_slice(
            &(0..40 * 12)
                .map(|i| (i * 7919 % 97) as i64)
                .collect::<Vec<_>>(),
        );
        let ids = (g.view([40, 12]).remainder(58) + 2).to_kind(Kind::Int64);
        let labels = ids.select(1, 0).remainder(3);
        Self { ids, labels }
    }
}

impl BatchSource for Tokens {
    fn len(&self) -> usize {
        40
    }
    fn batch(&self, indices: &[i64], device: Device) -> CoreResult<Batch> {
        let idx = Tensor::from_slice(indices);
        let ids = self.ids.index_select(0, &idx).to_device(device);
        Ok(Batch {
            mask: Some(ids.ones_like()),
            inputs: ids,
            padded: false,
            labels: self.labels.index_select(0, &idx).to_device(device),
            indices: indices.to_vec(),
            task_ids: None,
        })
    }
}

/// Trains a tiny Llama on prompt/response pairs whose responses grow from 1 to 12
/// tokens, so that the two halves of every batch hold very different numbers of
/// labelled tokens; returns the weights and losses.
fn train_lm(dp: Option<&mut DataParallel>) -> (Checkpoint, Vec<f64>) {
    let rows: Vec<(Vec<i64>, usize)> = (0..24)
        .map(|i| {
            let resp = 1 + (i * 5) % 12;
            let ids: Vec<i64> = (0..3 + resp)
                .map(|j| 3 + ((i * 7 + j * 3) % 40) as i64)
                .collect();
            (ids, 3)
        })
        .collect();
    let data = PromptResponse::from_ids(rows, 0, 64).unwrap();
    tch::manual_seed(dp.as_ref().map_or(0, |d| d.group().rank() as i64 * 5));
    let net = CausalLm::random(LlamaConfig::tiny(48, 32, 2), Device::Cpu).unwrap();
    if dp.is_none() {
        tch::manual_seed(0);
        let r0 = CausalLm::random(LlamaConfig::tiny(48, 32, 2), Device::Cpu).unwrap();
        net.params()
            .load_checkpoint(&r0.params().to_checkpoint())
            .unwrap();
    }
    let mut trainer = Trainer::new(TrainConfig {
        epochs: 2,
        batch_size: 6,
        lr: 3e-3,
        ..Default::default()
    });
    let r = match dp {
        Some(dp) => {
            let shard = dp.shard(&data);
            trainer.fit(&net, &shard, None, &mut [&mut *dp]).unwrap()
        }
        None => trainer.fit(&net, &data, None, &mut []).unwrap(),
    };
    (net.params().to_checkpoint(), r.losses)
}

fn lora_model() -> LoraModel<BertClassifier> {
    tch::manual_seed(3);
    let mut c = BertConfig::tiny(60, 32, 2);
    c.hidden_dropout_prob = 0.0;
    c.attention_probs_dropout_prob = 0.0;
    let bert = Bert::random(c, Device::Cpu).unwrap();
    let mut m = LoraModel::new(BertClassifier::new(bert, 3));
    let mut cfg = LoraConfig::new(4, 8.0, &["query", "value"]);
    cfg.modules_to_save = Some(vec!["classifier".into()]);
    m.add_adapter("default", cfg).unwrap();
    m
}

/// LoRA (r 4 on query/value, plus the head) on a 2-layer BERT, 40 examples in batches of
/// 16 (the last has 8) for 2 epochs. Returns the trainable weights, the losses, and the
/// bytes of gradient this rank all-reduced.
fn train_lora(dp: Option<&mut DataParallel>) -> (Checkpoint, Vec<f64>, u64, i64) {
    let m = lora_model();
    let data = Tokens::new();
    let mut trainer = Trainer::new(TrainConfig {
        epochs: 2,
        batch_size: 16,
        lr: 1e-2,
        weight_decay: 0.01,
        ..Default::default()
    });
    let trainable = m.params().trainable();
    let numel = trainable.iter().map(|(_, t)| t.numel() as i64).sum();
    let (losses, bytes) = match dp {
        Some(dp) => {
            let shard = dp.shard(&data);
            let r = trainer.fit(&m, &shard, None, &mut [&mut *dp]).unwrap();
            (r.losses, dp.gradient_bytes())
        }
        None => (trainer.fit(&m, &data, None, &mut []).unwrap().losses, 0),
    };
    (m.params().trainable().to_checkpoint(), losses, bytes, numel)
}

/// Exits the process at a given step, as a crashed rank would.
struct DieAt(usize);

impl Technique for DieAt {
    fn name(&self) -> &str {
        "die_at"
    }
    fn after_step(&mut self, _p: &Params, ctx: &StepContext) -> CoreResult<()> {
        if ctx.step + 1 == self.0 {
            std::process::exit(7);
        }
        Ok(())
    }
}

/// One rank of a scenario; the other tests start it. Ignored when run directly.
#[test]
#[ignore = "one rank of a multi-process test; the other tests in this file start it"]
fn rank() {
    let Ok(scenario) = std::env::var(SCENARIO) else {
        return;
    };
    let out = PathBuf::from(std::env::var(OUT).unwrap());
    let group = Arc::new(
        ProcessGroup::from_env()
            .unwrap()
            .expect("WORLD_SIZE is set"),
    );
    let r = group.rank();
    let w = group.world_size();
    match scenario.as_str() {
        "collectives" => {
            let t = Tensor::from_slice(&[r as f32, 10.0 - r as f32]);
            group.all_reduce(&t, ReduceOp::Sum).unwrap();
            let s: f32 = (0..w).map(|i| i as f32).sum();
            assert_eq!(Vec::<f32>::try_from(&t).unwrap(), [s, 10.0 * w as f32 - s]);
            let t = Tensor::from_slice(&[r as i64]);
            group.all_reduce(&t, ReduceOp::Max).unwrap();
            assert_eq!(t.int64_value(&[0]), w as i64 - 1);
            let t = Tensor::from_slice(&[r as f64 + 0.5]);
            group.all_reduce(&t, ReduceOp::Min).unwrap();
            assert_eq!(t.double_value(&[0]), 0.5);
            let b = Tensor::full([2, 3], r as f64, (Kind::Float, Device::Cpu));
            group.broadcast(&b, 1).unwrap();
            assert_eq!(b.sum(Kind::Float).double_value(&[]), 6.0);
            let g = group
                .all_gather(&Tensor::from_slice(&[r as i64, 2 * r as i64]))
                .unwrap();
            let got: Vec<Vec<i64>> = g.iter().map(|t| Vec::try_from(t).unwrap()).collect();
            let want: Vec<Vec<i64>> = (0..w as i64).map(|i| vec![i, 2 * i]).collect();
            assert_eq!(got, want);
            group.barrier().unwrap();
            let e = group.broadcast(&b, w).unwrap_err().to_string();
            assert!(
                e.contains("broadcast root") && e.contains(&format!("{w}")),
                "{e}"
            );
            let e = group
                .all_reduce(&b.tr(), ReduceOp::Sum)
                .unwrap_err()
                .to_string();
            assert!(e.contains("contiguous"), "{e}");
        }
        "mlp" => {
            let mut dp = DataParallel::new(group.clone());
            dp.bucket_bytes = 4096; // several buckets, to test their bookkeeping
            let (ck, losses) = train_mlp(Some(&mut dp));
            if group.is_main() {
                ck.save(out.join("mlp.safetensors")).unwrap();
                std::fs::write(out.join("mlp_losses.txt"), format!("{losses:?}")).unwrap();
            }
        }
        "lm" => {
            let mut dp = DataParallel::new(group.clone());
            let (ck, losses) = train_lm(Some(&mut dp));
            if group.is_main() {
                ck.save(out.join("lm.safetensors")).unwrap();
                std::fs::write(out.join("lm_losses.txt"), format!("{losses:?}")).unwrap();
            }
        }
        "lora" => {
            let mut dp = DataParallel::new(group.clone());
            let (ck, losses, bytes, numel) = train_lora(Some(&mut dp));
            ck.save(out.join(format!("lora{r}.safetensors"))).unwrap();
            std::fs::write(
                out.join(format!("lora{r}.txt")),
                format!(
                    "{losses:?}\n{bytes}\n{numel}\n{}",
                    group.all_reduced_bytes()
                ),
            )
            .unwrap();
        }
        "die" => {
            let mut dp = DataParallel::new(group.clone());
            let net = Mlp::new(&[64, 48, 10], Activation::Relu, Device::Cpu).unwrap();
            let data = digits_train();
            let shard = dp.shard(&data);
            let mut trainer = Trainer::new(mlp_config());
            let start = Instant::now();
            let res = if r == 1 {
                let mut die = DieAt(3);
                trainer.fit(&net, &shard, None, &mut [&mut dp, &mut die])
            } else {
                trainer.fit(&net, &shard, None, &mut [&mut dp])
            };
            let e = res
                .expect_err("rank 0 must fail when rank 1 dies")
                .to_string();
            std::fs::write(
                out.join("die.txt"),
                format!("{:.3}\n{e}", start.elapsed().as_secs_f64()),
            )
            .unwrap();
        }
        "stall" => {
            // Rank 1 is alive but never reaches the collective: rank 0's wait ends at
            // the timeout with an error.
            if r == 1 {
                std::thread::sleep(Duration::from_secs(12));
                return;
            }
            let start = Instant::now();
            let e = group
                .all_reduce(
                    &Tensor::ones([4], (Kind::Float, Device::Cpu)),
                    ReduceOp::Sum,
                )
                .unwrap_err()
                .to_string();
            std::fs::write(
                out.join("stall.txt"),
                format!("{:.3}\n{e}", start.elapsed().as_secs_f64()),
            )
            .unwrap();
        }
        other => panic!("unknown scenario {other}"),
    }
}

/// Starts `world` ranks of `scenario` and waits for them (at most `limit`), returning
/// each rank's exit code and stderr.
fn run_ranks(
    scenario: &str,
    world: usize,
    out: &Path,
    env: &[(&str, &str)],
    limit: Duration,
) -> Vec<(Option<i32>, String)> {
    let port = reuse_dist::launch::free_port().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut children: Vec<_> = (0..world)
        .map(|rank| {
            let mut c = Command::new(&exe);
            c.args([
                "rank",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(SCENARIO, scenario)
            .env(OUT, out)
            .env("OMP_NUM_THREADS", "1")
            .envs(reuse_dist::Launch::new(world).env(rank, port))
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
            for (k, v) in env {
                c.env(k, v);
            }
            c.spawn().unwrap()
        })
        .collect();
    let start = Instant::now();
    loop {
        if children.iter_mut().all(|c| c.try_wait().unwrap().is_some()) {
            break;
        }
        if start.elapsed() > limit {
            for c in &mut children {
                let _ = c.kill();
            }
            panic!("{scenario}: ranks still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    children
        .into_iter()
        .map(|c| {
            let o = c.wait_with_output().unwrap();
            (
                o.status.code(),
                String::from_utf8_lossy(&o.stderr).into_owned(),
            )
        })
        .collect()
}

fn assert_ok(scenario: &str, results: &[(Option<i32>, String)]) {
    for (rank, (code, err)) in results.iter().enumerate() {
        assert_eq!(*code, Some(0), "{scenario}: rank {rank} failed:\n{err}");
    }
}

fn max_diff(a: &Checkpoint, b: &Checkpoint) -> f64 {
    assert_eq!(a.names().collect::<Vec<_>>(), b.names().collect::<Vec<_>>());
    a.iter()
        .map(|(n, t)| (t - b.get(n).unwrap()).abs().max().double_value(&[]))
        .fold(0.0, f64::max)
}

fn parse_losses(s: &str) -> Vec<f64> {
    s.trim_matches(|c| c == '[' || c == ']')
        .split(", ")
        .map(|v| v.parse().unwrap())
        .collect()
}

#[test]
fn collectives_between_three_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let r = run_ranks("collectives", 3, dir.path(), &[], Duration::from_secs(120));
    assert_ok("collectives", &r);
}

#[test]
fn two_ranks_train_the_weights_one_process_trains_on_the_combined_batch() {
    let dir = tempfile::tempdir().unwrap();
    let r = run_ranks("mlp", 2, dir.path(), &[], Duration::from_secs(300));
    assert_ok("mlp", &r);
    let dist = Checkpoint::load(dir.path().join("mlp.safetensors"), Device::Cpu).unwrap();
    let dist_losses =
        parse_losses(&std::fs::read_to_string(dir.path().join("mlp_losses.txt")).unwrap());
    let _g = seeded();
    let (one, losses) = train_mlp(None);
    let d = max_diff(&dist, &one);
    eprintln!("MLP on digits, 2 ranks vs 1 process: max |diff| of the weights {d:.2e}");
    assert!(d < 1e-5, "weights differ by {d}");
    assert_eq!(dist_losses.len(), losses.len());
    assert_eq!(dist_losses.len(), 45 + 2);
    for (a, b) in dist_losses.iter().zip(&losses) {
        assert!((a - b).abs() < 1e-5 * b.abs().max(1.0), "loss {a} vs {b}");
    }
    // The weights really trained (the comparison is not between two untouched models).
    tch::manual_seed(0);
    let init = Mlp::new(&[64, 48, 10], Activation::Relu, Device::Cpu).unwrap();
    assert!(max_diff(&init.params().to_checkpoint(), &one) > 0.01);
}

#[test]
fn two_ranks_weight_causal_lm_gradients_by_labelled_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let r = run_ranks("lm", 2, dir.path(), &[], Duration::from_secs(300));
    assert_ok("lm", &r);
    let dist = Checkpoint::load(dir.path().join("lm.safetensors"), Device::Cpu).unwrap();
    let dist_losses =
        parse_losses(&std::fs::read_to_string(dir.path().join("lm_losses.txt")).unwrap());
    let _g = seeded();
    let (one, losses) = train_lm(None);
    let d = max_diff(&dist, &one);
    eprintln!("tiny Llama, 2 ranks vs 1 process: max |diff| of the weights {d:.2e}");
    assert!(d < 1e-5, "weights differ by {d}");
    for (a, b) in dist_losses.iter().zip(&losses) {
        assert!((a - b).abs() < 1e-5 * b.abs().max(1.0), "loss {a} vs {b}");
    }
    tch::manual_seed(0);
    let init = CausalLm::random(LlamaConfig::tiny(48, 32, 2), Device::Cpu).unwrap();
    assert!(max_diff(&init.params().to_checkpoint(), &one) > 1e-3);
}

#[test]
fn lora_on_two_ranks_equals_one_process_and_all_reduces_only_the_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let r = run_ranks("lora", 2, dir.path(), &[], Duration::from_secs(300));
    assert_ok("lora", &r);
    let _g = seeded();
    let (one, losses, _, numel) = train_lora(None);
    let steps = losses.len() as u64;
    assert_eq!(steps, 6);
    for rank in 0..2 {
        let ck = Checkpoint::load(
            dir.path().join(format!("lora{rank}.safetensors")),
            Device::Cpu,
        )
        .unwrap();
        let d = max_diff(&ck, &one);
        eprintln!("LoRA, rank {rank} of 2 vs 1 process: max |diff| {d:.2e}");
        assert!(d < 1e-5, "rank {rank}: adapter differs by {d}");
        let txt = std::fs::read_to_string(dir.path().join(format!("lora{rank}.txt"))).unwrap();
        let lines: Vec<&str> = txt.lines().collect();
        for (a, b) in parse_losses(lines[0]).iter().zip(&losses) {
            assert!((a - b).abs() < 1e-5 * b.abs().max(1.0), "loss {a} vs {b}");
        }
        // Gradient volume: exactly the trainable values (f32) each step, nothing of the
        // frozen base.
        let bytes: u64 = lines[1].parse().unwrap();
        assert_eq!(lines[2].parse::<i64>().unwrap(), numel);
        assert_eq!(bytes, steps * numel as u64 * 4);
        let total: u64 = lines[3].parse().unwrap();
        let trainable_tensors = Checkpoint::load(dir.path().join("lora0.safetensors"), Device::Cpu)
            .unwrap()
            .names()
            .count() as u64;
        // Plus a 4-byte flag per trainable tensor and the 4-byte loss per step, and the
        // start-of-run agreement check (two 3-value i64 reductions).
        assert_eq!(total, bytes + steps * (4 * trainable_tensors + 4) + 48);
    }
    let base = lora_model().params().trainable().to_checkpoint();
    assert!(
        max_diff(&base, &one) > 1e-3,
        "the adapter must have trained"
    );
}

#[test]
fn a_dead_rank_makes_the_other_fail_with_a_clear_error_not_hang() {
    let dir = tempfile::tempdir().unwrap();
    let start = Instant::now();
    let r = run_ranks(
        "die",
        2,
        dir.path(),
        &[("REUSE_DIST_TIMEOUT_SECS", "20")],
        Duration::from_secs(120),
    );
    let wall = start.elapsed();
    assert_eq!(r[1].0, Some(7), "rank 1 exits as told:\n{}", r[1].1);
    assert_eq!(
        r[0].0,
        Some(0),
        "rank 0 reports the error and exits:\n{}",
        r[0].1
    );
    let txt = std::fs::read_to_string(dir.path().join("die.txt")).unwrap();
    let (secs, msg) = txt.split_once('\n').unwrap();
    eprintln!("rank 0 after rank 1 died ({secs} s in fit, {wall:?} wall): {msg}");
    assert!(
        msg.contains("rank 0 of 2") && msg.contains("failed"),
        "{msg}"
    );
    assert!(wall < Duration::from_secs(60), "took {wall:?}");
}

fn from_vars(pairs: &[(&str, &str)]) -> reuse_dist::Result<Option<GroupConfig>> {
    GroupConfig::from_vars(|k| {
        pairs
            .iter()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| v.to_string())
    })
}

#[test]
fn torchrun_variables_are_checked_and_named() {
    assert_eq!(from_vars(&[]).unwrap(), None);
    let ok = from_vars(&[
        ("WORLD_SIZE", "4"),
        ("RANK", "3"),
        ("LOCAL_RANK", "1"),
        ("MASTER_ADDR", "node0"),
        ("MASTER_PORT", "29500"),
        ("REUSE_DIST_TIMEOUT_SECS", "2.5"),
    ])
    .unwrap()
    .unwrap();
    assert_eq!((ok.rank, ok.world_size, ok.local_rank), (3, 4, 1));
    assert_eq!((ok.master_addr.as_str(), ok.master_port), ("node0", 29500));
    assert_eq!(ok.timeout, Duration::from_millis(2500));
    let base = [("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_ADDR", "h")];
    for (pairs, var, says) in [
        (&[("WORLD_SIZE", "two")][..], "WORLD_SIZE", "found `two`"),
        (&[("WORLD_SIZE", "0")][..], "WORLD_SIZE", "at least 1"),
        (&[("WORLD_SIZE", "2")][..], "RANK", "not set"),
        (
            &[("WORLD_SIZE", "2"), ("RANK", "2")][..],
            "RANK",
            "below WORLD_SIZE 2, found 2",
        ),
        (&base[..], "MASTER_PORT", "not set"),
        (
            &[&base[..], &[("MASTER_PORT", "99999")]].concat()[..],
            "MASTER_PORT",
            "found `99999`",
        ),
        (
            &[
                &base[..],
                &[("MASTER_PORT", "1"), ("REUSE_DIST_TIMEOUT_SECS", "-1")],
            ]
            .concat()[..],
            "REUSE_DIST_TIMEOUT_SECS",
            "found `-1`",
        ),
    ] {
        let e = from_vars(pairs).unwrap_err().to_string();
        assert!(e.contains(var) && e.contains(says), "{e}");
    }
}

#[test]
fn nobody_at_the_store_is_a_rendezvous_error_within_the_timeout() {
    let mut c = GroupConfig::local(1, 2, reuse_dist::launch::free_port().unwrap());
    c.timeout = Duration::from_secs(3);
    let start = Instant::now();
    let e = ProcessGroup::new(c).unwrap_err().to_string();
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "{:?}",
        start.elapsed()
    );
    assert!(
        e.contains("rank 1 of 2") && e.contains("could not join"),
        "{e}"
    );
}

#[test]
fn a_rank_that_never_joins_the_collective_is_a_timeout_error() {
    let dir = tempfile::tempdir().unwrap();
    let r = run_ranks(
        "stall",
        2,
        dir.path(),
        &[("REUSE_DIST_TIMEOUT_SECS", "3")],
        Duration::from_secs(120),
    );
    assert_ok("stall", &r);
    let txt = std::fs::read_to_string(dir.path().join("stall.txt")).unwrap();
    let (secs, msg) = txt.split_once('\n').unwrap();
    let secs: f64 = secs.parse().unwrap();
    eprintln!("rank 0 waiting for a stalled rank 1: error after {secs:.1} s: {msg}");
    assert!((2.5..10.0).contains(&secs), "{secs} s");
    assert!(
        msg.contains("rank 0 of 2: all_reduce failed") && msg.contains("3 s"),
        "{msg}"
    );
}
