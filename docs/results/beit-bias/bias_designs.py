#!/usr/bin/env python
"""Measure the pooled relative-position-bias designs of the BEiT adapter (docs/beit.md).

Trains a tiny BEiT (per-layer relative position bias, no absolute positions, layer scale, mean pooling)
from random init on Fashion-MNIST for a few hundred steps on one CPU thread: a short self-trained
model, enough to make attention and the bias tables non-trivial, not a reference model. Then pools it
off the shelf with each bias design ("mean", "lse", "position", and "none": the bias dropped after
pooling, as a control) and reports top-1 agreement with the plain model and mean KL(plain || pooled)
on the first --eval images of the test split.

    OMP_NUM_THREADS=1 python docs/results/beit-bias/bias_designs.py --steps 1500 --out docs/results/beit-bias/results.json
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import BeitConfig, BeitForImageClassification

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import hf_tokenpool as tp  # noqa: E402
from hf_tokenpool.adapters import beit as beit_adapter  # noqa: E402
from hf_tokenpool.data import DEBIAN_FASHION_MNIST_DIR, FASHION_MNIST_MEAN, FASHION_MNIST_STD, _read_idx  # noqa: E402


def load(split):
    prefix = "train" if split == "train" else "t10k"
    images = torch.from_numpy(_read_idx(DEBIAN_FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz").copy())
    labels = torch.from_numpy(_read_idx(DEBIAN_FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz").copy()).long()
    x = F.interpolate(images[:, None].float() / 255, size=32, mode="bilinear", align_corners=False)
    x = ((x - FASHION_MNIST_MEAN) / FASHION_MNIST_STD).expand(-1, 3, -1, -1).contiguous()
    return x, labels


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval", type=int, default=2000)
    parser.add_argument("--out", type=str, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    start = time.time()
    config = BeitConfig(hidden_size=64, num_hidden_layers=6, num_attention_heads=4, intermediate_size=128,
                        image_size=32, patch_size=4, num_labels=10, use_relative_position_bias=True,
                        use_absolute_position_embeddings=False, use_mean_pooling=True, layer_scale_init_value=0.1)
    model = BeitForImageClassification(config)
    train_x, train_y = load("train")
    test_x, test_y = load("test")
    test_x, test_y = test_x[: args.eval], test_y[: args.eval]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    model.train()
    for step in range(args.steps):
        idx = torch.randint(0, train_x.shape[0], (args.batch,))
        x = train_x[idx]
        x = torch.where(torch.rand(args.batch, 1, 1, 1) < 0.5, x, x.flip(-1))  # horizontal flips
        loss = F.cross_entropy(model(pixel_values=x).logits, train_y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            print(f"step {step} loss {loss.item():.3f} {time.time() - start:.0f}s", flush=True)
    model.eval()
    train_minutes = (time.time() - start) / 60

    def logits_of(m):
        with torch.no_grad():
            return torch.cat([m(pixel_values=test_x[i : i + 250]).logits for i in range(0, len(test_x), 250)])

    plain = logits_of(model)
    table_std = [float(layer.relative_position_bias.relative_position_bias_table.detach().std()) for layer in model.beit.layers]
    results = {"plain_top1": float((plain.argmax(-1) == test_y).float().mean() * 100), "train_steps": args.steps,
               "train_minutes": train_minutes, "eval_images": len(test_x), "bias_table_std": table_std, "rows": []}
    pixels = torch.zeros(1, 3, 32, 32)
    plain_flops = tp.count_flops(model, pixels)
    original = beit_adapter.pooled_bias
    for keep in (0.6, 0.4):
        for method in ("tokenpool", "tome"):
            for design in ("mean", "lse", "position", "none"):
                if design == "none":  # control: no relative position bias once tokens are pooled
                    beit_adapter.pooled_bias = lambda plan, w, i, members, sizes, n0: (
                        original(plan, w, i, members, sizes, n0) if members is None else None)
                else:
                    tp.ADAPTERS["beit"].bias = design
                tp.patch_model(model, keep=keep, method=method)
                pooled = logits_of(model)
                flops = tp.count_flops(model, pixels) / plain_flops
                tp.unpatch_model(model)
                beit_adapter.pooled_bias = original
                tp.ADAPTERS["beit"].bias = beit_adapter.DEFAULT_BIAS
                kl = F.kl_div(pooled.log_softmax(-1), plain.log_softmax(-1), log_target=True, reduction="none").sum(-1)
                row = {"keep": keep, "method": method, "design": design,
                       "agreement": float((pooled.argmax(-1) == plain.argmax(-1)).float().mean() * 100),
                       "kl": float(kl.mean()), "top1": float((pooled.argmax(-1) == test_y).float().mean() * 100),
                       "flops_ratio": flops}
                results["rows"].append(row)
                print(row, flush=True)
    results["total_minutes"] = (time.time() - start) / 60
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
