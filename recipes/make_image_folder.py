#!/usr/bin/env python
"""Write a small image-classification folder (train/<class>/*.png, test/<class>/*.png), the layout a user
brings to the recipe, from labelled images available offline. The class names are new (never the
embedded checkpoints' own), so the recipe gives the model a new head, as it would on a user's data.

    python recipes/make_image_folder.py --source digits --output_dir data/digits-1400
    python recipes/make_image_folder.py --source fashion_mnist --train_per_class 100 --output_dir data/fm-1000

Sources:
- `digits`: scikit-learn's bundled 8x8 handwritten digits (1797 images; `load_digits`, no download),
  upscaled to 28x28. A task the embedded Fashion-MNIST checkpoints never saw: the held-out task on which
  docs/recipe.md checks the recipe's defaults (140 train images per class = 1400, the rest for test).
- `fashion_mnist`: images from Fashion-MNIST's *test* split (the embedded checkpoints were pretrained on
  the train split only) under shuffled, renamed class names: the small tasks the defaults were tuned on.
Per class, `--train_per_class` images go to train/ and up to `--test_per_class` of the rest to test/,
chosen with `--seed`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def digits() -> tuple[np.ndarray, np.ndarray, list[str]]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images * (255.0 / 16.0)).round().astype(np.uint8)  # 0..16 -> 0..255
    images = np.stack([np.asarray(Image.fromarray(im, mode="L").resize((28, 28), Image.BILINEAR)) for im in images])
    return images, data.target.astype(np.int64), list(DIGIT_NAMES)


def fashion_mnist_test(seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from hf_tokenpool.data import DEBIAN_FASHION_MNIST_DIR, _read_idx

    images = _read_idx(DEBIAN_FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz")
    labels = _read_idx(DEBIAN_FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
    # new names in a shuffled order: class k is written as "kind_<letter>", never the checkpoint's label
    order = np.random.default_rng(seed).permutation(10)
    names = [f"kind_{chr(ord('a') + int(order[k]))}" for k in range(10)]
    return images, labels, names


def write_folder(images, labels, names, output_dir: Path, train_per_class: int, test_per_class: int, seed: int):
    rng = np.random.default_rng(seed)
    counts = {"train": {}, "test": {}}
    for k, name in enumerate(names):
        index = rng.permutation(np.flatnonzero(labels == k))
        if len(index) <= train_per_class:
            raise ValueError(f"class {name!r} has {len(index)} images, not more than --train_per_class {train_per_class}")
        parts = {"train": index[:train_per_class], "test": index[train_per_class:train_per_class + test_per_class]}
        for split, chosen in parts.items():
            folder = output_dir / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in chosen:
                Image.fromarray(images[i], mode="L").save(folder / f"{int(i):05d}.png")
            counts[split][name] = len(chosen)
    return counts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", choices=["digits", "fashion_mnist"], default="digits")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--train_per_class", type=int, default=140)
    p.add_argument("--test_per_class", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = Path(args.output_dir)
    if out.exists() and any(out.iterdir()):
        p.error(f"--output_dir {out} is not empty")
    images, labels, names = digits() if args.source == "digits" else fashion_mnist_test(args.seed)
    counts = write_folder(images, labels, names, out, args.train_per_class, args.test_per_class, args.seed)
    summary = {split: sum(c.values()) for split, c in counts.items()}
    print(json.dumps({"output_dir": str(out), "source": args.source, "classes": names, **summary}))
    return counts


if __name__ == "__main__":
    main()
