"""sentence-transformers' side of `core.minilm_embed` (benches/src/experiments/core.rs).

Loads all-MiniLM-L6-v2 and the texts (one per line), embeds one warm-up batch, prints
{"ready": true, "sentences": N, "threads": T}, then answers each "run" line on stdin
with {"seconds": time to embed all texts once}; "quit" or end of input stops. The Rust
side interleaves its own passes with these, so both see the same machine load.
"""
import argparse
import json
import sys
import time

import torch
from sentence_transformers import SentenceTransformer

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("--texts", required=True)
p.add_argument("--batch-size", type=int, default=32)
p.add_argument("--device", default="cpu")
p.add_argument("--threads", type=int, default=0)
a = p.parse_args()
if a.threads > 0:
    torch.set_num_threads(a.threads)
with open(a.texts, encoding="utf-8") as f:
    texts = f.read().split("\n")
model = SentenceTransformer(a.model, device=a.device)
model.encode(texts[: a.batch_size], batch_size=a.batch_size)
if a.device == "cuda":
    torch.cuda.synchronize()
print(json.dumps({"ready": True, "sentences": len(texts), "threads": torch.get_num_threads()}), flush=True)


def run():
    start = time.perf_counter()
    emb = model.encode(texts, batch_size=a.batch_size)
    if a.device == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - start
    assert emb.shape[0] == len(texts)
    return secs


for line in sys.stdin:
    cmd = line.split()
    if not cmd or cmd[0] == "quit":
        break
    if cmd[0] == "run":
        print(json.dumps({"seconds": run()}), flush=True)
