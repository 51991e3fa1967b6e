"""PyTorch reference for `distill.minilm_embeddings`: the issue's recipe, written with
sentence-transformers and plain PyTorch, independent of reuse.

Student = all-MiniLM-L6-v2's embeddings + layers 0, 2, 4 (mean pooling and Normalize as
the teacher), trained with MSE against the teacher's (normalised) embeddings, AdamW lr
5e-4 (weight decay 0.01), batch 32, linear schedule with 10% warm-up, 1 epoch over the
synopses fixture (all of them, or --max-texts). Then the mean and min cosine to the
teacher on the sections test texts (in domain) and the AppStream sentences (out of
domain). Writes one JSON object.

    python benches/python/st_distill_reference.py --model DIR --out ref.json [--device cuda]
"""
import argparse, copy, gzip, json, random, time

import torch
from sentence_transformers import SentenceTransformer


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--root", default=".")
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-texts", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    random.seed(a.seed)
    torch.manual_seed(a.seed)
    with gzip.open(f"{a.root}/fixtures/debian_synopses/synopses.tsv.gz", "rt") as f:
        texts = [l.rstrip("\n").split("\t", 1)[1] for l in f if "\t" in l]
    random.shuffle(texts)
    if a.max_texts:
        texts = texts[: a.max_texts]
    with gzip.open(f"{a.root}/fixtures/debian_sections/sections.tsv.gz", "rt") as f:
        test = [l.rstrip("\n").split("\t")[2] for l in f if l.startswith("test\t")]
    with open(f"{a.root}/fixtures/appstream/sentences.txt") as f:
        ood = [l.rstrip("\n") for l in f if l.strip()]

    teacher = SentenceTransformer(a.model, device=a.device)
    teacher.eval()
    student = copy.deepcopy(teacher)
    bert = student[0].auto_model
    keep = [0, 2, 4]
    bert.encoder.layer = torch.nn.ModuleList([bert.encoder.layer[i] for i in keep])
    bert.config.num_hidden_layers = len(keep)

    t0 = time.time()
    with torch.no_grad():
        targets = teacher.encode(texts, batch_size=128, convert_to_tensor=True, device=a.device)
    teacher_s = time.time() - t0

    batch, epochs, lr = 32, 1, 5e-4
    steps = (len(texts) + batch - 1) // batch * epochs
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.01)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm))
    )
    student.train()
    order = list(range(len(texts)))
    t0 = time.time()
    for _ in range(epochs):
        random.shuffle(order)
        for i in range(0, len(order), batch):
            idx = order[i : i + batch]
            feats = student.tokenize([texts[j] for j in idx])
            feats = {k: (v.to(a.device) if torch.is_tensor(v) else v) for k, v in feats.items()}
            emb = student(feats)["sentence_embedding"]
            loss = torch.nn.functional.mse_loss(emb, targets[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    train_s = time.time() - t0
    student.eval()

    def cos(xs):
        with torch.no_grad():
            s = student.encode(xs, batch_size=128, convert_to_tensor=True, device=a.device)
            t = teacher.encode(xs, batch_size=128, convert_to_tensor=True, device=a.device)
        c = torch.nn.functional.cosine_similarity(s, t, dim=-1)
        return float(c.mean()), float(c.min())

    cin, cin_min = cos(test)
    cout, cout_min = cos(ood)
    r = dict(
        recipe="layers 0,2,4; MSE to the teacher's normalised embeddings; AdamW lr 5e-4 wd 0.01; batch 32; 1 epoch; linear schedule, 10% warm-up",
        train_texts=len(texts), seed=a.seed, device=a.device, torch=torch.__version__,
        cosine_in_domain_mean=cin, cosine_in_domain_min=cin_min,
        cosine_out_of_domain_mean=cout, cosine_out_of_domain_min=cout_min,
        in_domain_texts=len(test), out_of_domain_texts=len(ood),
        teacher_seconds=teacher_s, train_seconds=train_s, final_loss=float(loss.detach()),
    )
    with open(a.out, "w") as f:
        json.dump(r, f, indent=1)
    print(json.dumps(r))


if __name__ == "__main__":
    main()
