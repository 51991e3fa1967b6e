"""Avalanche 0.6.0 reference for the digits continual-learning benchmark.

Runs Avalanche's own strategies (Naive, EWC separate/online, Replay, JointTraining) on
the sklearn digits data (fixtures/digits/digits.csv.gz: 1797 rows of 64 pixel values
0-16 then the label, no header; features are value/16 as float32) under a fixed protocol,
so that the Rust side can compare accuracy matrices and wall times side by side.

Call:
    .venv/bin/python benches/python/avalanche_digits.py --spec SPEC.json --out OUT.json
        [--data fixtures/digits/digits.csv.gz]
    .venv/bin/python benches/python/avalanche_digits.py --spec SPEC.json --serve
  The second form keeps one process for many runs, so that the caller can interleave
  them with its own, run by run: after set-up and the spec's optional "warmup" run (a
  run object, not reported) it prints {"ready": true, ...}, then reads one run object
  per stdin line and prints its result object (as in OUT.json's "runs") as one line.

SPEC.json:
    {"train": [row indices], "test": [row indices],
     "tasks": [[0,1],[2,3],[4,5],[6,7],[8,9]],     # class split (class_il, task_il)
     "permutations": [[64 ints], ...],              # permuted: one per task, first identity
     "runs": [{"scenario": "class_il"|"task_il"|"permuted",
               "method": "naive"|"ewc"|"online_ewc"|"replay"|"joint",
               "seed": 0, "ewc_lambda": 1000.0, "decay_factor": 0.9, "mem_size": 200}],
     "epochs": 5, "batch_size": 32, "lr": 0.001, "threads": 2}
  Missing run fields default to seed 0, ewc_lambda 1000.0, decay_factor 0.9,
  mem_size 200; missing top-level fields to the values shown.

OUT.json (written atomically, temp file + os.replace):
    {"avalanche_version", "torch_version", "import_seconds" (import of torch+avalanche),
     "threads", "runs": [{<the run's spec fields as given>, "R": [[...]], "avg_accuracy",
                          "forgetting", "seconds", "train_seconds"}]}
  R[i][j] = plain fraction correct on test experience j after training experience i.
  task_il: R[i][j] for j > i is null (the head of task j does not exist yet in
  Avalanche's MultiHeadClassifier, which creates heads lazily). joint: R is one row
  (after training on everything at once) and forgetting is null.
  avg_accuracy = mean of the last row; forgetting = mean over k < T-1 of
  R[k][k] - R[T-1][k] (Avalanche's experience forgetting, averaged).
  seconds = wall time of model/strategy construction + training + the evaluations
  (imports and data loading excluded); train_seconds = the strategy.train() calls only.

Protocol. MLP 64-400-400-10 with ReLU, no dropout (class_il, permuted: one 10-way head,
no task labels at test). task_il: the same 64-400-400 body + Avalanche's
MultiHeadClassifier (masking=True) and task labels 0..T-1. Adam(lr), CrossEntropyLoss,
train_mb_size = batch_size, train_epochs = epochs per experience, CPU,
torch.set_num_threads(threads); before each run random/numpy/torch are seeded with the
run's seed. class_il/task_il: experience k = the rows whose labels are in tasks[k]
(labels stay global; class order exactly as given). permuted: experience k = all rows
with x[:, permutations[k]] (new feature i = old feature perm[i]), all task label 0.
Evaluation is ours (model.eval(), no_grad, whole test experience at once), not
strategy.eval(), so it neither adapts the model nor draws random numbers; for task_il we
call the model with the experience's task label as an int (MultiTaskModule's single-task
path: only that head, inactive units at -1000). No loggers: EvaluationPlugin(loggers=[]).

What Avalanche 0.6.0 actually does (site-packages/avalanche/...):

* Training loop (training/templates/base_sgd.py, SupervisedTemplate.make_train_dataloader):
  every experience has `task_labels`, so the loader is TaskBalancedDataLoader(
  oversample_small_groups=True, shuffle=True, drop_last=False); with a single task label
  per experience that is a plain shuffled loader of batch_size (last batch partial).
  Optimizer (training/templates/observation_type/batch_observation.py, make_optimizer ->
  models/dynamic_optimizers.py update_optimizer): state is reset only on the very first
  experience; afterwards Adam's moments are KEPT across experiences (reset_state=False);
  parameters that are new or replaced (a new head, a grown IncrementalClassifier) get
  empty state.

* Replay (training/plugins/replay.py, ReplayPlugin; the Replay strategy in
  training/supervised/strategy_wrappers.py is Naive + ReplayPlugin(mem_size)):
  - Storage: default storage_policy = ExperienceBalancedBuffer(max_size=mem_size,
    adaptive_size=True) (training/storage_policy.py). After each experience
    (after_training_exp -> post_adapt) the memory is split equally over the experiences
    seen so far (get_group_lengths: mem_size // n each, the remainder +1 to the first
    groups); the new experience gets a ReservoirSamplingBuffer of the last length filled
    with a uniform random subset of its whole dataset (torch.rand weight per sample, keep
    the largest), and the older groups are truncated to their new length by keeping their
    first (highest-weight) items, i.e. they stay uniform random subsets. mem 200, 5 exps:
    200 -> 100/100 -> 67/67/66 -> 50x4 (-> 40x5 after the last one, unused).
  - Minibatches (before_training_exp -> benchmarks/utils/data_loader.py ReplayDataLoader
    / MultiDatasetSampler): nothing changes on the first experience. From the second on
    each step concatenates a batch of the current data (batch_size, shuffled, last batch
    partial) with a batch from the memory of batch_size_mem samples; batch_size_mem
    defaults to None -> strategy.train_mb_size, so 32 + 32 = 64 samples per step, one
    CrossEntropy mean over all 64. task_balanced_dataloader=False: the memory is one
    shuffled loader (drop_last=False, so its last batch per pass is partial, e.g. 200 =
    6x32 + 8), re-shuffled and cycled when exhausted (oversample_small_tasks=True). The
    epoch length is set by the current data: ceil(n_current / 32) steps per epoch.
    The memory iterator restarts at every epoch.

* EWC (training/plugins/ewc.py, EWCPlugin; EWC strategy in strategy_wrappers.py):
  - compute_importances (called in after_training_exp): model.eval(); an UNshuffled
    DataLoader(experience.dataset, batch_size=train_mb_size) (last batch partial); for
    each batch: optimizer.zero_grad(), loss = criterion(model(x), y) (CrossEntropy MEAN
    over the batch, true labels: empirical Fisher), backward, imp += grad**2; finally
    imp /= number of batches. So F = mean over minibatches of the squared gradient of
    the minibatch-mean loss (not per-sample squared gradients). Then model.train().
  - update_importances: 'separate' keeps F_t and theta*_t of every experience; 'online'
    keeps one F_t = decay_factor * F_{t-1} + F_new and only the last theta*.
  - before_backward: penalty = sum over (previous experiences, for separate; last one,
    for online) of sum_params F * (theta - theta*)**2, and loss += ewc_lambda * penalty;
    no 1/2 factor. Parameters not present when theta* was saved (new heads) are skipped.

* MultiHeadClassifier (models/dynamic_modules.py): each task's head is an
  IncrementalClassifier starting at 2 outputs and grown to max(class)+1 outputs (global
  labels), units of classes never trained for that task are set to -1000 (masking), so
  each head is effectively 2-way. Heads are created during model adaptation before
  training an experience. Quirk: with a task-label TENSOR (what strategy.eval and the
  training loop pass), MultiTaskModule.forward writes each head's output into a
  zeros(batch, max_class_label) tensor, so a smaller (older) head gets unmasked 0 logits
  in the padding columns, and an old-task sample whose two active logits are both < 0
  is predicted as a padding class. This never matters while training sequentially
  (the current head is the widest), but it does for replayed old-task samples, for
  mixed-task joint batches and for Avalanche's own eval of old tasks; our evaluation
  uses the single-task path and is free of it (on the test spec it changed 1 of ~2200
  predictions).
"""
import argparse
import gzip
import json
import os
import random
import sys
import tempfile
import time
import warnings


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", required=True, help="JSON spec file")
    p.add_argument("--out", help="output JSON file (required unless --serve)")
    here = os.path.dirname(os.path.abspath(__file__))
    p.add_argument(
        "--data",
        default=os.path.join(here, "..", "..", "fixtures", "digits", "digits.csv.gz"),
        help="digits csv.gz (64 pixels 0-16 then the label, no header)",
    )
    p.add_argument(
        "--serve",
        action="store_true",
        help="after set-up (and the spec's optional 'warmup' run), read one run object "
        "per line of stdin and answer each with one JSON line on stdout (the run's "
        "result, or {\"error\": ...}); --out is not written",
    )
    return p.parse_args()


def load_digits(path):
    rows = []
    with gzip.open(path, "rt") as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append([int(v) for v in line.split(",")])
    return rows


def write_atomic(path, obj):
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".avalanche_digits.", suffix=".json", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main():
    a = parse_args()
    if not a.serve and not a.out:
        raise SystemExit("--out is required unless --serve")
    with open(a.spec) as f:
        spec = json.load(f)

    t_imp = time.perf_counter()
    import numpy as np
    import torch
    from torch import nn

    warnings.filterwarnings("ignore", module="avalanche")
    warnings.filterwarnings("ignore", module="qpsolvers")  # "no QP solver found" (GEM)
    import avalanche
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.benchmarks.scenarios.supervised import with_classes_timeline
    from avalanche.benchmarks.scenarios.task_aware import with_task_labels
    from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset
    from avalanche.models import MultiHeadClassifier, MultiTaskModule
    from avalanche.training.plugins import EvaluationPlugin
    from avalanche.training.supervised import EWC, JointTraining, Naive, Replay
    import_seconds = time.perf_counter() - t_imp

    threads = int(spec.get("threads", 2))
    torch.set_num_threads(threads)
    epochs = int(spec.get("epochs", 5))
    batch_size = int(spec.get("batch_size", 32))
    lr = float(spec.get("lr", 1e-3))
    tasks = spec.get("tasks", [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]])
    perms = spec.get("permutations")

    # Data loading (not timed).
    rows = load_digits(a.data)
    data = torch.tensor(rows, dtype=torch.float32)
    x_all = data[:, :64] / 16.0
    y_all = data[:, 64].to(torch.long)
    tr = torch.tensor(spec["train"], dtype=torch.long)
    te = torch.tensor(spec["test"], dtype=torch.long)
    x_tr, y_tr, x_te, y_te = x_all[tr], y_all[tr], x_all[te], y_all[te]

    def make_ds(x, y, task):
        return _make_taskaware_tensor_classification_dataset(
            x, y, task_labels=task, targets=y.tolist()
        )

    def build(scenario):
        """Returns (benchmark, [(x_test, y_test, task)] per test experience)."""
        train_sets, test_sets, test_raw = [], [], []
        if scenario in ("class_il", "task_il"):
            for k, cls in enumerate(tasks):
                t = k if scenario == "task_il" else 0
                mtr = torch.isin(y_tr, torch.tensor(cls))
                mte = torch.isin(y_te, torch.tensor(cls))
                train_sets.append(make_ds(x_tr[mtr], y_tr[mtr], t))
                test_sets.append(make_ds(x_te[mte], y_te[mte], t))
                test_raw.append((x_te[mte], y_te[mte], t))
        elif scenario == "permuted":
            if not perms:
                raise SystemExit("spec: 'permutations' is required for permuted")
            for p in perms:
                p = torch.tensor(p, dtype=torch.long)
                train_sets.append(make_ds(x_tr[:, p].contiguous(), y_tr, 0))
                test_sets.append(make_ds(x_te[:, p].contiguous(), y_te, 0))
                test_raw.append((x_te[:, p].contiguous(), y_te, 0))
        else:
            raise SystemExit(f"unknown scenario {scenario!r}")
        bm = benchmark_from_datasets(train=train_sets, test=test_sets)
        bm = with_task_labels(with_classes_timeline(bm))
        # with_classes_timeline stores sets, but MultiHeadClassifier.adaptation indexes a
        # tensor with classes_in_this_experience (0.6.0 fails on a set): use sorted lists.
        for stream in bm.streams.values():
            for exp in stream:
                for attr in ("classes_in_this_experience", "previous_classes",
                             "classes_seen_so_far", "future_classes"):
                    setattr(exp, attr, sorted(getattr(exp, attr)))
        return bm, test_raw

    class MTMLP(MultiTaskModule):
        """64-400-400 ReLU body + Avalanche MultiHeadClassifier (task_il)."""

        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Linear(64, 400), nn.ReLU(), nn.Linear(400, 400), nn.ReLU()
            )
            self.classifier = MultiHeadClassifier(400)

        def forward(self, x, task_labels):
            return self.classifier(self.features(x), task_labels)

    def make_model(scenario):
        if scenario == "task_il":
            return MTMLP()
        return nn.Sequential(
            nn.Linear(64, 400), nn.ReLU(), nn.Linear(400, 400), nn.ReLU(),
            nn.Linear(400, 10),
        )

    @torch.no_grad()
    def evaluate(model, test_raw, scenario):
        was_training = model.training
        model.eval()
        row = []
        for x, y, t in test_raw:
            if scenario == "task_il":
                if str(t) not in model.classifier.classifiers:
                    row.append(None)
                    continue
                out = model(x, t)
            else:
                out = model(x)
            row.append(int((out.argmax(1) == y).sum().item()) / len(y))
        model.train(was_training)
        return row

    def do_run(run):
        scenario, method = run["scenario"], run["method"]
        seed = int(run.get("seed", 0))
        bm, test_raw = build(scenario)  # data preparation, not timed
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

        t0 = time.perf_counter()
        model = make_model(scenario)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        common = dict(
            model=model, optimizer=opt, criterion=nn.CrossEntropyLoss(),
            train_mb_size=batch_size, train_epochs=epochs, eval_mb_size=batch_size,
            device="cpu", evaluator=EvaluationPlugin(loggers=[]), eval_every=-1,
        )
        if method == "naive":
            strat = Naive(**common)
        elif method == "ewc":
            strat = EWC(ewc_lambda=float(run.get("ewc_lambda", 1000.0)),
                        mode="separate", **common)
        elif method == "online_ewc":
            strat = EWC(ewc_lambda=float(run.get("ewc_lambda", 1000.0)), mode="online",
                        decay_factor=float(run.get("decay_factor", 0.9)), **common)
        elif method == "replay":
            strat = Replay(mem_size=int(run.get("mem_size", 200)), **common)
        elif method == "joint":
            strat = JointTraining(**common)
        else:
            raise SystemExit(f"unknown method {method!r}")

        train_seconds = 0.0
        R = []
        if method == "joint":
            ts = time.perf_counter()
            with warnings.catch_warnings(record=True):  # see the comment below
                strat.train(bm.train_stream, eval_streams=[])
            train_seconds += time.perf_counter() - ts
            R.append(evaluate(strat.model, test_raw, scenario))
        else:
            for exp in bm.train_stream:
                ts = time.perf_counter()
                # avalanche._annotations.deprecated calls simplefilter("once") itself
                # (e.g. ReplayPlugin -> storage_policy.update), which overrides any
                # filter set here; record=True swallows those warnings for the call.
                with warnings.catch_warnings(record=True):
                    strat.train(exp, eval_streams=[])
                train_seconds += time.perf_counter() - ts
                R.append(evaluate(strat.model, test_raw, scenario))
        seconds = time.perf_counter() - t0

        last = R[-1]
        avg = sum(last) / len(last)
        T = len(R)
        forgetting = None
        if T > 1:
            forgetting = sum(R[k][k] - R[T - 1][k] for k in range(T - 1)) / (T - 1)
        res = dict(run)
        res.update(R=R, avg_accuracy=avg, forgetting=forgetting, seconds=seconds,
                   train_seconds=train_seconds)
        f = "n/a" if forgetting is None else f"{forgetting:.3f}"
        print(f"{scenario:9s} {method:10s} seed {seed}: avg {avg:.3f} forgetting {f} "
              f"{seconds:.2f}s (train {train_seconds:.2f}s)", file=sys.stderr)
        return res

    if a.serve:
        # One warm-up run (not reported) so the first timed run does not pay for
        # first-call costs, then one run per line of stdin, one result line each.
        if spec.get("warmup"):
            do_run(spec["warmup"])
        print(json.dumps({"ready": True, "avalanche_version":
                          getattr(avalanche, "__version__", None),
                          "torch_version": torch.__version__}), flush=True)
        for line in sys.stdin:
            line = line.strip()
            if not line:
                continue
            try:
                print(json.dumps(do_run(json.loads(line))), flush=True)
            except Exception as e:  # the caller reads the error as the run's result
                print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
        return

    out_runs = [do_run(run) for run in spec["runs"]]

    write_atomic(a.out, {
        "avalanche_version": getattr(avalanche, "__version__", None),
        "torch_version": torch.__version__,
        "import_seconds": import_seconds,
        "threads": threads,
        "runs": out_runs,
    })


if __name__ == "__main__":
    main()
