"""Times one LoRA training step in PyTorch + PEFT for `peft.vs_python`: BertModel
(all-MiniLM-L6-v2) with LoRA r=8, alpha=16 on query,value, mean pooling, a linear head
(modules_to_save), cross-entropy, backward, AdamW (lr 1e-3, weight decay 0.01), in
train mode (dropout on), on the batch the Rust side used. Prints JSON with the median
step time after two warm-up steps.
"""
import argparse
import json
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
times = []
for i in range(a.reps + 2):
    start = time.perf_counter()
    logits = model(b["input_ids"], b["attention_mask"])
    loss = torch.nn.functional.cross_entropy(logits, b["labels"])
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    loss.item()
    if a.device == "cuda":
        torch.cuda.synchronize()
    if i >= 2:
        times.append(time.perf_counter() - start)
times.sort()
print(json.dumps({"median_seconds": times[len(times) // 2], "threads": torch.get_num_threads(),
                  "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}))
