"""PyTorch DistributedDataParallel reference for `dist.lora_step`: the LoRA training step
of `peft_step.py` (BertModel all-MiniLM-L6-v2, LoRA r=8 alpha=16 on query,value, mean
pooling, dropout, a linear head in modules_to_save, cross-entropy, AdamW lr 1e-3 weight
decay 0.01), wrapped in DDP on the Gloo backend. Run under torchrun; each rank takes its
contiguous share of the global batch in --batch. Rank 0 writes the per-step seconds
(after --warmup steps) as JSON to --out.

usage: torchrun --standalone --nproc_per_node N ddp_lora.py --model DIR --batch FILE
       --threads T --steps S --warmup W --classes C --out FILE
"""
import argparse
import json
import os
import time

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers import BertModel

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("--batch", required=True)
p.add_argument("--threads", type=int, required=True)
p.add_argument("--steps", type=int, required=True)
p.add_argument("--warmup", type=int, default=2)
p.add_argument("--classes", type=int, default=8)
p.add_argument("--out", required=True)
a = p.parse_args()
torch.set_num_threads(a.threads)
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
b = load_file(a.batch)
n = b["input_ids"].shape[0]
chunk = -(-n // world)
rows = slice(rank * chunk, min(n, (rank + 1) * chunk))
ids, mask, labels = b["input_ids"][rows], b["attention_mask"][rows], b["labels"][rows]


class Classifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.bert = BertModel.from_pretrained(a.model)
        self.classifier = torch.nn.Linear(self.bert.config.hidden_size, a.classes)
        self.dropout = torch.nn.Dropout(self.bert.config.hidden_dropout_prob)

    def forward(self, input_ids, attention_mask):
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return self.classifier(self.dropout(pooled))


model = get_peft_model(
    Classifier(),
    LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"]),
)
model.train()
ddp = DDP(model)
opt = torch.optim.AdamW([q for q in ddp.parameters() if q.requires_grad], lr=1e-3, weight_decay=0.01)
times = []
for i in range(a.warmup + a.steps):
    start = time.perf_counter()
    loss = torch.nn.functional.cross_entropy(ddp(ids, mask), labels)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    _ = loss.item()
    if i >= a.warmup:
        times.append(time.perf_counter() - start)
if rank == 0:
    trainable = sum(q.numel() for q in ddp.parameters() if q.requires_grad)
    with open(a.out, "w") as f:
        json.dump({"step_seconds": times, "trainable": trainable, "world": world}, f)
dist.destroy_process_group()
