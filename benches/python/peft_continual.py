"""PyTorch + Hugging Face PEFT reference for class-incremental continual learning on text.

Trains all-MiniLM-L6-v2 with one shared LoRA adapter and one 8-way linear head on the
Debian package-sections fixture, four tasks of two sections each, and reports the accuracy
matrix, average accuracy, forgetting and wall times, so that the Rust side can run the
same protocol and compare accuracy and time side by side.

Call:
    .venv/bin/python benches/python/peft_continual.py --model DIR --data TSV.gz \
        --spec SPEC.json --out OUT.json

    DIR     a local folder with config.json, model.safetensors and the tokenizer files
            (e.g. .cache/models/all-MiniLM-L6-v2). Nothing is downloaded: HF_HUB_OFFLINE=1
            and TRANSFORMERS_OFFLINE=1 are set before the imports and every load is
            local_files_only.
    TSV.gz  fixtures/debian_sections/sections.tsv.gz: gzip, UTF-8, no header, one example
            per line `split<TAB>label<TAB>text`, split in {train, dev, test}. The dev split
            is not used here.
    SPEC    {"runs": [{"method": "naive"|"replay"|"joint"|"ewc", "seed": 0,
                       "ewc_lambda": 100.0}, ...],
             "threads": 2, "epochs": 2, "max_train_per_task": null}
            Optional top-level fields (defaults = the protocol below): "batch_size" 16,
            "lr" 1e-3, "weight_decay" 0.01, "max_length" 32, "mem_size" 200,
            "replay_per_batch" 8, "lora_r" 8, "lora_alpha" 16, "lora_dropout" 0.1,
            "eval_batch_size" 64. Missing run fields: seed 0, ewc_lambda 100.0 (only
            read by ewc). max_train_per_task = N keeps, per task, the first N training
            examples after a shuffle seeded by the run's seed (for smoke tests); null
            keeps all.
    OUT     written atomically (temp file in the same folder + os.replace):
            {"torch_version", "peft_version", "transformers_version",
             "import_seconds" (import of torch + transformers + peft),
             "tokenize_seconds" (tokenizer load + tokenizing every example once),
             "threads", "settings": {the effective top-level settings},
             "classes": [the 8 names, index = class],
             "tasks": [[class names of task k], ...],
             "runs": [{<the run's spec fields as given>, "R": [[...]],
                       "avg_accuracy", "forgetting", "seconds", "train_seconds",
                       "trainable_params"}]}
            R[i][j] = fraction correct on task j's test examples after training task i
            (all j, also tasks not yet trained). joint: R is one row (after training on
            everything) and forgetting is null. avg_accuracy = mean of the last row (a
            mean over tasks, not over examples: mail has 64 test examples, the rest 100).
            forgetting = mean over k < T-1 of R[k][k] - R[T-1][k].
            seconds = wall time of model construction (loading the weights, wrapping in
            PEFT, the optimizer) + training + all evaluations; tokenizing is done once
            per script before the runs and is not in it. train_seconds = the training
            loops only, including the EWC Fisher computations, excluding evaluations.
            trainable_params = parameters with requires_grad (LoRA A/B + the head copy).
    One short line per finished run goes to stderr; nothing else is printed.

Classes. The eight labels sorted by name (Python sorted() on str, byte order for these
ASCII names): admin 0, games 1, graphics 2, mail 3, net 4, science 5, sound 6, text 7.
That is how the Rust side numbers them: reuse_core::data::load_text_splits collects the
labels, sorts and dedups them, and a label's class is its index (binary_search).

Model (as benches/python/peft_step.py): transformers BertModel.from_pretrained(DIR)
(pooler kept, unused), mean pooling of last_hidden_state over the attention mask,
Dropout(hidden_dropout_prob = 0.1), Linear(384, 8). PEFT get_peft_model with
LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "value"],
modules_to_save=["classifier"]): the LoRA matrices and the head copy are trained, the rest
frozen. Training runs in train mode (BERT's dropouts, the LoRA dropout and the head
dropout on); evaluation in model.eval() under torch.no_grad().

Protocol.
* Tasks in order {admin, games}, {graphics, mail}, {net, science}, {sound, text}; one
  8-way head, labels stay global, no task id at test time (class-incremental).
* Tokens: the fast tokenizer from DIR, truncation to max_length 32 (including [CLS] and
  [SEP]); each batch is padded to its longest row with the tokenizer's pad id (0) and an
  attention mask (right padding, token_type_ids left to BertModel's default zeros).
* Before each run random, numpy and torch are seeded with the run's seed, then the model
  is built (so the head and the LoRA A init are seeded too).
* AdamW(trainable parameters, lr 1e-3, weight_decay 0.01, torch defaults otherwise),
  created once per run and kept (moments and step count) across tasks.
* Per task: `epochs` (2) epochs over that task's training examples, batches of 16 in an
  order drawn per epoch from torch.randperm with a torch.Generator seeded with the run's
  seed (one generator for the whole run; last batch partial). Loss = mean cross-entropy
  over the batch (over the enlarged batch for replay) plus the EWC penalty for ewc.
* After each task: accuracy on every task's test examples (batches of 64) -> row of R.
* naive: the above, nothing else.
* replay: a reservoir memory of 200 examples (Vitter's algorithm R with a
  random.Random(seed)): every training batch of the current data (16 examples, in every
  epoch, as the Rust Replay offers each batch it trains on) is offered to the memory
  after the replay sample for that step has been drawn; while the memory holds fewer
  than 200 an example is appended, otherwise the n-th example offered replaces slot
  randrange(n) if that is < 200. From the second task on, each step draws 8 distinct
  stored examples uniformly (random.sample) and appends them to the batch of 16, which
  is padded as one batch of 24; one mean cross-entropy over the 24. During the first
  task nothing is replayed (the memory only fills).
* ewc (Avalanche EWCPlugin, mode "separate"): after each task, in model.eval(), the
  empirical Fisher over the trainable parameters (LoRA A/B and the head copy): for each
  batch of 16 of that task's training examples in file order (last batch partial), the
  square of the gradient of the batch-mean cross-entropy with the true labels, averaged
  over the batches. Each finished task k keeps (F_k, theta*_k = parameters at its end);
  while later tasks train the loss gains ewc_lambda * sum_k sum_i F_k,i (theta_i -
  theta*_k,i)^2 (no 1/2, as Avalanche writes it).
* joint: the four tasks' training examples together, `epochs` epochs, batches of 16 from
  the same seeded shuffle, evaluated once on each task's test examples (one row of R).
"""
import argparse
import gzip
import json
import os
import random
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CLASSES = ["admin", "games", "graphics", "mail", "net", "science", "sound", "text"]
TASKS = [["admin", "games"], ["graphics", "mail"], ["net", "science"], ["sound", "text"]]
METHODS = ("naive", "replay", "joint", "ewc")
DEFAULTS = {
    "threads": 2,
    "epochs": 2,
    "max_train_per_task": None,
    "batch_size": 16,
    "lr": 1e-3,
    "weight_decay": 0.01,
    "max_length": 32,
    "mem_size": 200,
    "replay_per_batch": 8,
    "lora_r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.1,
    "eval_batch_size": 64,
}


def load_rows(path):
    """(split, class index, text) per line; classes numbered in sorted label order."""
    rows = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            line = line.rstrip("\n")
            if not line:
                continue
            parts = line.split("\t", 2)
            if len(parts) != 3:
                raise SystemExit(f"{path}: line {i + 1}: expected split<TAB>label<TAB>text")
            rows.append(parts)
    labels = sorted({r[1] for r in rows})
    if labels != CLASSES:
        raise SystemExit(f"{path}: labels {labels}, expected {CLASSES}")
    index = {c: k for k, c in enumerate(labels)}
    return [(s, index[l], t) for s, l, t in rows]


def write_atomic(path, obj):
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".peft_continual.", suffix=".tmp")
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
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--spec", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()

    with open(a.spec) as f:
        spec = json.load(f)
    settings = dict(DEFAULTS)
    for k in DEFAULTS:
        if k in spec and (spec[k] is not None or k == "max_train_per_task"):
            settings[k] = spec[k]
    runs_spec = spec.get("runs", [])
    for r in runs_spec:
        if r.get("method") not in METHODS:
            raise SystemExit(f"unknown method {r.get('method')!r}; expected one of {METHODS}")

    t_imp = time.perf_counter()
    import numpy as np
    import torch
    import transformers
    import peft
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, BertModel
    import_seconds = time.perf_counter() - t_imp

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import warnings
    warnings.filterwarnings("ignore")

    threads = int(settings["threads"])
    if threads > 0:
        torch.set_num_threads(threads)

    bs = int(settings["batch_size"])
    epochs = int(settings["epochs"])
    cap = settings["max_train_per_task"]
    mem_size = int(settings["mem_size"])
    per_batch = int(settings["replay_per_batch"])
    eval_bs = int(settings["eval_batch_size"])

    # ---- data: tokenized once ----
    rows = load_rows(a.data)
    t_tok = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(a.model, local_files_only=True)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    enc = tok([r[2] for r in rows], truncation=True, max_length=int(settings["max_length"]))["input_ids"]
    tokenize_seconds = time.perf_counter() - t_tok
    ids_all = [list(x) for x in enc]
    labels_all = [r[1] for r in rows]

    def split_task(split, task):
        cls = {CLASSES.index(c) for c in task}
        return [i for i, r in enumerate(rows) if r[0] == split and r[1] in cls]

    train_idx = [split_task("train", t) for t in TASKS]
    test_idx = [split_task("test", t) for t in TASKS]

    def collate(idx):
        seqs = [ids_all[i] for i in idx]
        n = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), n), dtype=torch.long)
        for k, s in enumerate(seqs):
            ids[k, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[k, : len(s)] = 1
        y = torch.tensor([labels_all[i] for i in idx], dtype=torch.long)
        return ids, mask, y

    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = BertModel.from_pretrained(a.model, local_files_only=True)
            self.classifier = torch.nn.Linear(self.bert.config.hidden_size, len(CLASSES))
            self.dropout = torch.nn.Dropout(self.bert.config.hidden_dropout_prob)

        def forward(self, input_ids, attention_mask):
            h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return self.classifier(self.dropout(pooled))

    ce = torch.nn.functional.cross_entropy

    def run_one(run):
        method = run["method"]
        seed = int(run.get("seed", 0))
        lam = float(run.get("ewc_lambda", 100.0))
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

        # Per-task training lists (optionally capped after a seeded shuffle).
        tasks_train = []
        cap_rng = np.random.default_rng(seed)
        for idx in train_idx:
            if cap is not None:
                perm = cap_rng.permutation(len(idx))
                idx = [idx[j] for j in perm[: int(cap)]]
            tasks_train.append(idx)

        t0 = time.perf_counter()
        model = get_peft_model(
            Classifier(),
            LoraConfig(r=int(settings["lora_r"]), lora_alpha=settings["lora_alpha"],
                       lora_dropout=float(settings["lora_dropout"]),
                       target_modules=["query", "value"], modules_to_save=["classifier"]),
        )
        params = [(n, q) for n, q in model.named_parameters() if q.requires_grad]
        trainable = sum(q.numel() for _, q in params)
        opt = torch.optim.AdamW([q for _, q in params], lr=float(settings["lr"]),
                                weight_decay=float(settings["weight_decay"]))
        gen = torch.Generator().manual_seed(seed)
        rrng = random.Random(seed)
        memory, seen = [], 0
        anchors = []  # ewc: (fisher, theta*) per finished task
        train_seconds = 0.0

        def evaluate():
            model.eval()
            row = []
            with torch.no_grad():
                for idx in test_idx:
                    correct = 0
                    for s in range(0, len(idx), eval_bs):
                        ids, mask, y = collate(idx[s: s + eval_bs])
                        correct += int((model(ids, mask).argmax(-1) == y).sum())
                    row.append(correct / len(idx))
            model.train()
            return row

        def ewc_penalty():
            total = None
            for fisher, star in anchors:
                for (n, q), f, s in zip(params, fisher, star):
                    term = (f * (q - s).pow(2)).sum()
                    total = term if total is None else total + term
            return total

        def fisher_of(idx):
            model.eval()
            fis = [torch.zeros_like(q) for _, q in params]
            nb = 0
            for s in range(0, len(idx), bs):
                ids, mask, y = collate(idx[s: s + bs])
                opt.zero_grad(set_to_none=True)
                ce(model(ids, mask), y).backward()
                for f, (_, q) in zip(fis, params):
                    if q.grad is not None:
                        f += q.grad.detach().pow(2)
                nb += 1
            opt.zero_grad(set_to_none=True)
            model.train()
            return [f / max(nb, 1) for f in fis]

        def train_on(idx, task_no):
            nonlocal seen
            model.train()
            for _ in range(epochs):
                order = torch.randperm(len(idx), generator=gen).tolist()
                for s in range(0, len(order), bs):
                    batch = [idx[j] for j in order[s: s + bs]]
                    full = batch
                    if method == "replay":
                        if task_no > 0 and memory:
                            full = batch + rrng.sample(memory, min(per_batch, len(memory)))
                        for ex in batch:
                            seen += 1
                            if len(memory) < mem_size:
                                memory.append(ex)
                            else:
                                j = rrng.randrange(seen)
                                if j < mem_size:
                                    memory[j] = ex
                    ids, mask, y = collate(full)
                    loss = ce(model(ids, mask), y)
                    if method == "ewc" and anchors:
                        loss = loss + lam * ewc_penalty()
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)

        R = []
        if method == "joint":
            allidx = [i for t in tasks_train for i in t]
            ts = time.perf_counter()
            train_on(allidx, 0)
            train_seconds += time.perf_counter() - ts
            R.append(evaluate())
        else:
            for k, idx in enumerate(tasks_train):
                ts = time.perf_counter()
                train_on(idx, k)
                if method == "ewc" and k < len(tasks_train) - 1:
                    fisher = fisher_of(idx)
                    star = [q.detach().clone() for _, q in params]
                    anchors.append((fisher, star))
                train_seconds += time.perf_counter() - ts
                R.append(evaluate())
        seconds = time.perf_counter() - t0

        T = len(TASKS)
        avg = sum(R[-1]) / len(R[-1])
        forgetting = None
        if method != "joint":
            forgetting = sum(R[k][k] - R[T - 1][k] for k in range(T - 1)) / (T - 1)
        out = dict(run)
        out.update({"R": R, "avg_accuracy": avg, "forgetting": forgetting,
                    "seconds": seconds, "train_seconds": train_seconds,
                    "trainable_params": trainable})
        fg = "-" if forgetting is None else f"{forgetting:.3f}"
        print(f"peft_continual: {method} seed {seed}: avg acc {avg:.3f}, forgetting {fg}, "
              f"{seconds:.1f}s (train {train_seconds:.1f}s)", file=sys.stderr, flush=True)
        return out

    results = [run_one(r) for r in runs_spec]
    write_atomic(a.out, {
        "torch_version": torch.__version__,
        "peft_version": peft.__version__,
        "transformers_version": transformers.__version__,
        "import_seconds": import_seconds,
        "tokenize_seconds": tokenize_seconds,
        "threads": torch.get_num_threads(),
        "settings": settings,
        "classes": CLASSES,
        "tasks": TASKS,
        "runs": results,
    })


if __name__ == "__main__":
    main()
