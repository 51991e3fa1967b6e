"""transformers' side of `core.smollm2_generate` and `core.smollm2_score`
(benches/src/experiments/llm.rs).

Loads a GGUF causal LM with AutoModelForCausalLM.from_pretrained(dir, gguf_file=name,
dtype=float32) (dequantized to f32, as transformers always loads GGUF), prints
{"ready": true, "parameters": N, "threads": T}, then answers one JSON request per stdin
line (token ids come from the Rust side, so both sides run the same inputs):

  {"op": "generate", "prompts": [[ids]...], "max_new_tokens": N}
      -> {"seconds": ..., "tokens": [[new ids]...]}   greedy, left-padded batch, exactly
         N new tokens (EOS does not stop it), pad = the tokenizer's pad id
  {"op": "score", "rows": [[ids]...], "batch_size": B}
      -> {"seconds": ..., "nll_sum": ..., "tokens": ...}   next-token NLL summed over
         every row's positions 1.., right-padded batches of B (labels -100 on padding)

"quit" or end of input stops. The Rust side interleaves its runs with these requests.
"""
import argparse
import json
import os
import sys
import time

import torch
from transformers import AutoModelForCausalLM

p = argparse.ArgumentParser()
p.add_argument("--gguf", required=True)
p.add_argument("--device", default="cpu")
p.add_argument("--threads", type=int, default=0)
p.add_argument("--pad", type=int, default=2)
a = p.parse_args()
if a.threads > 0:
    torch.set_num_threads(a.threads)
d, name = os.path.split(os.path.abspath(a.gguf))
model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).to(a.device)
model.eval()
n_params = sum(t.numel() for t in model.parameters())
print(json.dumps({"ready": True, "parameters": n_params, "threads": torch.get_num_threads()}),
      flush=True)


def sync():
    if a.device == "cuda":
        torch.cuda.synchronize()


def generate(prompts, n):
    t = max(len(x) for x in prompts)
    ids = torch.full((len(prompts), t), a.pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), t), dtype=torch.long)
    for i, x in enumerate(prompts):
        ids[i, t - len(x):] = torch.tensor(x)
        mask[i, t - len(x):] = 1
    ids, mask = ids.to(a.device), mask.to(a.device)
    sync()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=a.pad)
    sync()
    secs = time.perf_counter() - start
    return {"seconds": secs, "tokens": out[:, t:].tolist()}


def score(rows, bs):
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    total, count = 0.0, 0
    sync()
    start = time.perf_counter()
    with torch.no_grad():
        for k in range(0, len(order), bs):
            chunk = [rows[i] for i in order[k:k + bs]]
            t = max(len(x) for x in chunk)
            ids = torch.full((len(chunk), t), a.pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), t), dtype=torch.long)
            labels = torch.full((len(chunk), t), -100, dtype=torch.long)
            for i, x in enumerate(chunk):
                ids[i, :len(x)] = torch.tensor(x)
                mask[i, :len(x)] = 1
                labels[i, :len(x)] = torch.tensor(x)
            ids, mask, labels = ids.to(a.device), mask.to(a.device), labels.to(a.device)
            n = int((labels[:, 1:] != -100).sum())
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            total += float(loss) * n
            count += n
    sync()
    return {"seconds": time.perf_counter() - start, "nll_sum": total, "tokens": count}


for line in sys.stdin:
    line = line.strip()
    if not line or line == "quit":
        break
    try:
        req = json.loads(line)
        if req["op"] == "generate":
            ans = generate(req["prompts"], req["max_new_tokens"])
        elif req["op"] == "score":
            ans = score(req["rows"], req["batch_size"])
        else:
            ans = {"error": f"unknown op {req['op']}"}
    except Exception as e:  # reported to the Rust side, which names this peer
        ans = {"error": repr(e)}
    print(json.dumps(ans), flush=True)
