"""Times one LoRA training step in PyTorch + PEFT for `peft.vs_python`: BertModel
(all-MiniLM-L6-v2) with LoRA r=8, alpha=16 on query,value, mean pooling, a linear head
(modules_to_save), cross-entropy, backward, AdamW (lr 1e-3, weight decay 0.01), in
train mode (dropout on), on the batch the Rust side used. With --serve it answers
"run N" lines on stdin with N step times (JSON), so the Rust side can interleave its own
steps with ours; otherwise it prints the median of --reps steps after two warm-ups.
"""
import argparse
import json
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import BertModel

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("--batch", required=True)
p.add_argument("--device", default="cpu")
p.add_argument("--threads", type=int, default=0)
p.add_argument("--reps", type=int, default=8)
p.add_argument("--classes", type=int, default=8)
p.add_argument("--serve", action="store_true")
a = p.parse_args()
if a.threads > 0:
    torch.set_num_threads(a.threads)
torch.manual_seed(0)
dev = torch.device(a.device)
b = {k: v.to(dev) for k, v in load_file(a.batch).items()}


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
).to(dev)
model.train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.01)


def step():
    start = time.perf_counter()
    logits = model(b["input_ids"], b["attention_mask"])
    loss = torch.nn.functional.cross_entropy(logits, b["labels"])
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    loss.item()
    if a.device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


if a.serve:
    # Interleaved timing: the Rust side sends "run N", we answer with N step times,
    # so both sides see the same machine load; "quit" ends.
    step()
    step()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        times = [step() for _ in range(int(cmd[1]))]
        print(json.dumps({"seconds": times}), flush=True)
else:
    times = [step() for _ in range(a.reps + 2)][2:]
    times.sort()
    print(json.dumps({"median_seconds": times[len(times) // 2], "threads": torch.get_num_threads(),
                      "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}))
