#!/usr/bin/env python
"""Which patches were pooled together at each step: a picture made by the library's own pooling.

    python recipes/visualize.py --output docs/images/pooling_steps.png

Runs the patched ViT (or DeiT) on real test images with assignment recording on, composes each
pooling step's assignment back to the original patch grid, and draws every cluster in its own colour
over the image (the cluster's mean pixel value in the right column).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoImageProcessor  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import hf_tokenpool as tp  # noqa: E402
from hf_tokenpool.data import load_image_dataset, to_pixel_values  # noqa: E402

DEFAULT_MODEL = str(Path(__file__).resolve().parent / "checkpoints" / "vit-tiny-fashion-mnist")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path", default=DEFAULT_MODEL)
    p.add_argument("--dataset_name", default="fashion_mnist")
    p.add_argument("--indices", type=int, nargs="+", default=[0, 1, 2, 9])
    p.add_argument("--keep", type=float, default=0.6)
    p.add_argument("--method", default="tokenpool")
    p.add_argument("--output", default="docs/images/pooling_steps.png")
    return p.parse_args(argv)


def patch_clusters(model, pixels) -> list[np.ndarray]:
    """For each pooling step, [B, N0] cluster id of every original patch (composed through the steps)."""
    base = model.base_model
    state = base._tokenpool_state
    state.record, state.assignments = True, {}
    with torch.no_grad():
        model(pixel_values=pixels)
    state.record = False
    maps, current = [], None
    for layer in sorted(state.assignments):
        assign = state.assignments[layer]  # [B, N_in] -> [0, k)
        current = assign if current is None else assign.gather(1, current)
        maps.append(current.cpu().numpy())
    return maps


def main(argv=None):
    args = parse_args(argv)
    model = tp.load_model(args.model_name_or_path).eval()
    if model.config.model_type not in ("vit", "deit"):
        raise ValueError("the picture is drawn for ViT/DeiT (Swin pools inside windows; see docs/swin.md)")
    processor = AutoImageProcessor.from_pretrained(args.model_name_or_path)
    split = load_image_dataset(args.dataset_name)["test"].select(args.indices)
    pixels, labels = to_pixel_values(split, processor)
    tp.patch_model(model, keep=args.keep, method=args.method)
    maps = patch_clusters(model, pixels)
    grid = model.config.image_size // model.config.patch_size
    names = model.config.id2label
    images = [np.asarray(img.convert("L").resize((grid * 8, grid * 8), resample=0)) for img in split["image"]]

    rng = np.random.default_rng(0)
    fig, axes = plt.subplots(len(images), len(maps) + 1, figsize=(2.2 * (len(maps) + 1), 2.3 * len(images)))
    axes = np.atleast_2d(axes)
    for row, image in enumerate(images):
        axes[row, 0].imshow(image, cmap="gray")
        axes[row, 0].set_title(f"{names[int(labels[row])]}\n{grid * grid} patches", fontsize=8)
        for step, cluster_map in enumerate(maps):
            ids = cluster_map[row].reshape(grid, grid)
            k = int(ids.max()) + 1
            colours = rng.random((k, 3)) * 0.8 + 0.2
            overlay = np.kron(colours[ids], np.ones((8, 8, 1)))
            axes[row, step + 1].imshow(image, cmap="gray")
            axes[row, step + 1].imshow(overlay, alpha=0.55)
            axes[row, step + 1].set_title(f"step {step + 1}: {len(np.unique(ids))} tokens", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(f"{Path(args.model_name_or_path).name}, method={args.method}, keep={args.keep}: "
                 "patches of one colour are one token", fontsize=9)
    fig.tight_layout()
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
