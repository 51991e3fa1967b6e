"""Times sentence-transformers on the same texts as `core.minilm_embed` (side by side).

Prints {"seconds": encode time after one warm-up batch}. Used by benches/src/experiments/core.rs.
"""
import argparse
import json
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
start = time.perf_counter()
emb = model.encode(texts, batch_size=a.batch_size)
if a.device == "cuda":
    torch.cuda.synchronize()
secs = time.perf_counter() - start
assert emb.shape[0] == len(texts)
print(json.dumps({"seconds": secs, "sentences": len(texts), "threads": torch.get_num_threads()}))
