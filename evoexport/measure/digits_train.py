"""Train the `digits-vit` preset on scikit-learn's digits and save it as a Hugging Face
checkpoint (safetensors): the weights shipped in evoexport/data/digits-vit, which the
accuracy table of docs/evoprune.md and its tests measure.

    .venv/bin/python -m evoexport.measure.digits_train [--out DIR]

Writes config.json + model.safetensors (transformers' CLIPVisionModel.save_pretrained) and
head.safetensors (the 10-way linear head on the post-layernorm CLS token). Deterministic
for a given seed on the same torch build; about five minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModel

from ..models import get_preset
from .digits import CHECKPOINT, digits_split


def shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random translation by up to 4 px (one original pixel) each way, per batch: cheap augmentation."""
    dy, dx = torch.randint(-4, 5, (2,), generator=g).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def train(out: Path, epochs: int = 150, seed: int = 0) -> float:
    """Train and save to `out`; returns the test accuracy."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    cfg = CLIPVisionConfig(**get_preset("digits-vit").vision)
    cfg._attn_implementation = "sdpa"
    model = CLIPVisionModel(cfg)
    head = torch.nn.Linear(cfg.hidden_size, 10)
    xtr, ytr, xte, yte = (torch.from_numpy(a) for a in digits_split(seed))
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.05)
    steps = epochs * ((len(xtr) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), 64):
            idx = perm[i:i + 64]
            logits = head(model(shift(xtr[idx], g)).pooler_output)
            loss = torch.nn.functional.cross_entropy(logits, ytr[idx], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if epoch % 10 == 9 or epoch == epochs - 1:
            model.eval()
            with torch.no_grad():
                acc = (head(model(xte).pooler_output).argmax(1) == yte).float().mean().item()
            print(f"epoch {epoch + 1}: loss {loss.item():.3f}, test accuracy {acc:.4f} ({time.time() - t0:.0f} s)")
    out = Path(out)
    model.eval().save_pretrained(out, safe_serialization=True)
    save_file({"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous()},
              out / "head.safetensors")
    (out / "training.json").write_text(json.dumps({"epochs": epochs, "seed": seed, "test_accuracy": acc,
                                                   "torch": torch.__version__}, indent=2) + "\n")
    print(f"saved {out} (test accuracy {acc:.4f})")
    return acc


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=CHECKPOINT)
    ap.add_argument("--epochs", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    train(args.out, args.epochs, args.seed)
