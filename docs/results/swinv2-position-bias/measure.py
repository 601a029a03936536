#!/usr/bin/env python
"""Swinv2 position-bias design for clusters: a short self-trained Swinv2 on Fashion-MNIST, then the
fidelity of pooled variants to it (top-1 agreement, mean KL(plain || pooled)).

    OMP_NUM_THREADS=1 python docs/results/swinv2-position-bias/measure.py train    # 800 steps, ~9 min on one shared core
    OMP_NUM_THREADS=1 python docs/results/swinv2-position-bias/measure.py measure  # writes results.json here

The model is tiny and briefly trained (not a checkpoint of this project): 32 x 32 inputs (28 x 28 padded),
patch 2, windows of 8 x 8 = 64 tokens (16 x 16 grid -> 4 windows, then one 8 x 8 window), so
pooled windows hold 38 clusters at keep 0.6 and attention has had time to become non-trivial.
"""

import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Swinv2Config, Swinv2ForImageClassification

from hf_tokenpool.data import DEBIAN_FASHION_MNIST_DIR, FASHION_MNIST_MEAN, FASHION_MNIST_STD, _read_idx

HERE = Path(__file__).resolve().parent
MODEL_DIR = HERE.parents[2] / "outputs" / "swinv2-tiny-fashion-mnist"
CONFIG = dict(image_size=32, patch_size=2, num_channels=1, embed_dim=48, depths=[2, 2], num_heads=[3, 6],
              window_size=8, num_labels=10, drop_path_rate=0.0)
STEPS, BATCH, LR, EVAL = 800, 64, 1e-3, 2000


def split(name):
    images = _read_idx(DEBIAN_FASHION_MNIST_DIR / f"{name}-images-idx3-ubyte.gz")
    labels = _read_idx(DEBIAN_FASHION_MNIST_DIR / f"{name}-labels-idx1-ubyte.gz")
    x = torch.from_numpy(images.copy()).float().div(255).sub(FASHION_MNIST_MEAN).div(FASHION_MNIST_STD)
    x = F.pad(x, (2, 2, 2, 2), value=-FASHION_MNIST_MEAN / FASHION_MNIST_STD).unsqueeze(1)
    return x, torch.from_numpy(labels.astype("int64"))


def train():
    torch.manual_seed(0)
    x, y = split("train")
    model = Swinv2ForImageClassification(Swinv2Config(**CONFIG)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 40) * 0.5 * (1 + math.cos(math.pi * min(s, STEPS) / STEPS)))
    start = time.time()
    for step in range(STEPS):
        idx = torch.randint(0, x.shape[0], (BATCH,))
        xb = x[idx]
        flip = torch.rand(BATCH) < 0.5
        xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
        loss = F.cross_entropy(model(pixel_values=xb).logits, y[idx], label_smoothing=0.1)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.3f} {time.time() - start:.0f}s", flush=True)
    model.eval().save_pretrained(MODEL_DIR)
    xt, yt = split("t10k")
    with torch.no_grad():
        acc = (model(pixel_values=xt[:EVAL]).logits.argmax(-1) == yt[:EVAL]).float().mean().item()
    info = {"steps": STEPS, "batch": BATCH, "lr": LR, "train_minutes": (time.time() - start) / 60,
            "test_accuracy_first_2000": acc, "config": CONFIG}
    (MODEL_DIR / "train.json").write_text(json.dumps(info, indent=1))
    print(info)



def mlp_at_mean_offsets(self, stats, sizes, ws):
    """The alternative: upstream's bias MLP evaluated at the clusters' exact (fractional) mean offsets,
    log-spaced as upstream's table (create_coords_table_and_index)."""
    from hf_tokenpool.adapters.swin import mean_positions

    attn = self.attention.self
    pos = mean_positions(stats, sizes)
    offset = pos[:, :, None, :] - pos[:, None, :, :]  # [W, query, key, 2], query minus key as upstream
    pws = attn.pretrained_window_size
    norm = float(pws[0] - 1) if pws[0] > 0 else float(ws - 1)
    coords = offset / norm * 8
    coords = torch.sign(coords) * torch.log2(coords.abs() + 1.0) / math.log2(8)
    return (16 * torch.sigmoid(attn.continuous_position_bias_mlp(coords))).permute(0, 3, 1, 2)


def measure():
    import hf_tokenpool as tp
    from hf_tokenpool.adapters.swinv2 import TokenPoolSwinv2Layer

    model = Swinv2ForImageClassification.from_pretrained(MODEL_DIR).eval()
    xt, yt = split("t10k")
    xt, yt = xt[:EVAL], yt[:EVAL]

    def logits_of(m):
        with torch.no_grad():
            return torch.cat([m(pixel_values=xb).logits for xb in xt.split(250)])

    plain = logits_of(model)
    plain_flops = tp.count_flops(model, xt[:1])
    results = {"model": json.loads((MODEL_DIR / "train.json").read_text()), "eval_images": EVAL, "keep": 0.6,
               "plain_top1": (plain.argmax(-1) == yt).float().mean().item(), "designs": {}}
    original = TokenPoolSwinv2Layer._position_bias
    for design, bias_fn in (("table at rounded mean positions (shipped)", original),
                            ("MLP at exact mean offsets", mlp_at_mean_offsets)):
        TokenPoolSwinv2Layer._position_bias = bias_fn
        try:
            for method in ("tokenpool", "kmeans", "tome"):
                tp.patch_model(model, keep=0.6, method=method)
                start = time.time()
                pooled = logits_of(model)
                seconds = time.time() - start
                flops = tp.count_flops(model, xt[:1]) / plain_flops
                tp.unpatch_model(model)
                kl = F.kl_div(pooled.log_softmax(-1), plain.log_softmax(-1), log_target=True, reduction="none")
                row = {"agreement": (pooled.argmax(-1) == plain.argmax(-1)).float().mean().item(),
                       "kl": kl.sum(-1).mean().item(), "top1": (pooled.argmax(-1) == yt).float().mean().item(),
                       "flops_ratio": flops, "eval_seconds": seconds}
                results["designs"].setdefault(design, {})[method] = row
                print(design, method, row, flush=True)
        finally:
            TokenPoolSwinv2Layer._position_bias = original
    (HERE / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    {"train": train, "measure": measure}[sys.argv[1]]()
