#!/usr/bin/env python
"""Check that a recipe output folder's model card tells the truth: reload the saved model the way a user would
(`hf_tokenpool.from_pretrained`, which re-applies the pooling from config.json), evaluate it on the same split,
and compare with the card's model-index accuracy.

    python recipes/verify_card.py outputs/my-run --dataset_name path/to/images [--max_eval_samples N]

Prints one JSON line: {"card_accuracy", "reloaded_accuracy", "agree"}; exits 1 when they disagree.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import torch
from huggingface_hub import ModelCard
from transformers import AutoImageProcessor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import hf_tokenpool as tp  # noqa: E402
from hf_tokenpool.data import load_image_dataset  # noqa: E402


def _finetune():
    spec = importlib.util.spec_from_file_location("finetune", Path(__file__).with_name("finetune.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@torch.no_grad()
def reloaded_accuracy(output_dir, dataset_args: list[str], batch_size: int = 256) -> float:
    """Top-1 (%) of the saved model on the eval split that the recipe picks with these dataset flags."""
    finetune = _finetune()
    with tempfile.TemporaryDirectory() as scratch:
        args = finetune.parse_args([*dataset_args, "--output_dir", f"{scratch}/unused"])
    raw = load_image_dataset(args.dataset_name)
    _, evaluation, _, _, image_column, label_column = finetune.resolve_dataset(args, raw)
    model = tp.from_pretrained(str(output_dir)).eval()
    processor = AutoImageProcessor.from_pretrained(str(output_dir))
    mode = "RGB" if tp.patch.vision_config(model).num_channels == 3 else "L"
    correct = 0
    for start in range(0, len(evaluation), batch_size):
        rows = evaluation[start : start + batch_size]
        pixels = processor([im.convert(mode) for im in rows[image_column]], return_tensors="pt")["pixel_values"]
        predicted = model(pixel_values=pixels).logits.argmax(-1)
        correct += (predicted == torch.tensor(rows[label_column])).sum().item()
    return 100.0 * correct / len(evaluation)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output_dir")
    p.add_argument("--dataset_name", required=True)
    p.add_argument("--eval_split", default=None)
    p.add_argument("--max_eval_samples", default=None)
    args = p.parse_args(argv)
    dataset_args = ["--dataset_name", args.dataset_name]
    for flag in ("eval_split", "max_eval_samples"):
        if getattr(args, flag) is not None:
            dataset_args += [f"--{flag}", str(getattr(args, flag))]
    card = ModelCard.load(Path(args.output_dir) / "README.md")
    card_accuracy = card.data.eval_results[0].metric_value
    accuracy = round(reloaded_accuracy(args.output_dir, dataset_args), 2)
    result = {"card_accuracy": card_accuracy, "reloaded_accuracy": accuracy, "agree": accuracy == card_accuracy}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["agree"] else 1)
