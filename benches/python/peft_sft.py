"""PyTorch + PEFT's arm of `peft.smollm2_summaries` (benches/src/experiments/llm_sft.rs).

Loads the model folder the Rust side wrote from the GGUF (f32; transformers loads it with
the GGUF's logits) with AutoModelForCausalLM.from_pretrained(dir, dtype=float32), wraps it with get_peft_model(LoraConfig(r, alpha, dropout,
target_modules="all-linear", task_type="CAUSAL_LM")), and trains it on the token ids the
Rust side wrote (--spec names them and the batch order reuse's trainer draws), in the
same way: right-padded batches, labels -100 on the prompt and padding, AdamW (betas
0.9/0.999, eps 1e-8, no weight decay), a linear schedule with warmup steps // 10
(transformers' get_linear_schedule_with_warmup). Then the mean response NLL of the chosen
split's first N examples and greedy summaries of their prompts (left-padded batches,
stopped at the stop tokens). Prints one JSON line, the fields the Rust side's children
print: load_rss_mb, peak_rss_mb (ru_maxrss), step_ms, nll, tokens, trainable,
parameters, losses.
"""
import argparse
import json
import resource
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, get_linear_schedule_with_warmup

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("--spec", required=True)
p.add_argument("--threads", type=int, default=0)
p.add_argument("--r", type=int, default=4)
p.add_argument("--alpha", type=float, default=8.0)
p.add_argument("--dropout", type=float, default=0.05)
p.add_argument("--new-tokens", type=int, default=24)
p.add_argument("--eval-batch", type=int, default=8)
a = p.parse_args()
if a.threads > 0:
    torch.set_num_threads(a.threads)


def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


spec = json.load(open(a.spec))
data = json.load(open(spec["data"]))
dev = torch.device("cuda" if spec["cuda"] else "cpu")
torch.manual_seed(spec["seed"])
base = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).to(dev)
parameters = sum(t.numel() for t in base.parameters())
model = get_peft_model(base, LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout,
                                        target_modules="all-linear", task_type="CAUSAL_LM"))
trainable = sum(t.numel() for t in model.parameters() if t.requires_grad)
pad, stop = data["pad"], data["stop"]
split = data[spec["split"]][:spec["eval"]]
train = data["train"]
load_rss = rss_mb()


def batch(rows):
    t = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), t), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    labels = torch.full((len(rows), t), -100, dtype=torch.long)
    for i, (x, plen) in enumerate(rows):
        ids[i, :len(x)] = torch.tensor(x)
        mask[i, :len(x)] = 1
        labels[i, plen:len(x)] = torch.tensor(x[plen:])
    return ids.to(dev), mask.to(dev), labels.to(dev)


def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize()


steps = spec["steps"]
opt = torch.optim.AdamW([t for t in model.parameters() if t.requires_grad], lr=spec["lr"],
                        betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
sched = get_linear_schedule_with_warmup(opt, steps // 10, steps)
model.train()
step_ms, losses = [], []
for idx in spec["order"][:steps]:
    ids, mask, labels = batch([train[i] for i in idx])
    sync()
    start = time.perf_counter()
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    losses.append(float(loss))
    sync()
    step_ms.append((time.perf_counter() - start) * 1e3)

model.eval()
total, count = 0.0, 0
with torch.no_grad():
    for k in range(0, len(split), a.eval_batch):
        ids, mask, labels = batch(split[k:k + a.eval_batch])
        n = int((labels[:, 1:] != -100).sum())
        total += float(model(input_ids=ids, attention_mask=mask, labels=labels).loss) * n
        count += n

tokens = []
if spec["generate"]:
    prompts = [x[:plen] for x, plen in split]
    with torch.no_grad():
        for k in range(0, len(prompts), a.eval_batch):
            chunk = prompts[k:k + a.eval_batch]
            t = max(len(x) for x in chunk)
            ids = torch.full((len(chunk), t), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), t), dtype=torch.long)
            for i, x in enumerate(chunk):
                ids[i, t - len(x):] = torch.tensor(x)
                mask[i, t - len(x):] = 1
            out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                                 max_new_tokens=a.new_tokens, do_sample=False,
                                 eos_token_id=stop, pad_token_id=pad)
            for row in out[:, t:].tolist():
                cut = next((i + 1 for i, x in enumerate(row) if x in stop), len(row))
                tokens.append(row[:cut])

print(json.dumps({"load_rss_mb": load_rss, "peak_rss_mb": rss_mb(), "step_ms": step_ms,
                  "nll": total / max(count, 1), "tokens": tokens, "trainable": trainable,
                  "parameters": parameters, "losses": losses}))
