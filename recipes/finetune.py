#!/usr/bin/env python
"""Fine-tune a token-pooled vision transformer with `accelerate`, on its own classes or a new dataset, and publish it.

    accelerate launch recipes/finetune.py --output_dir outputs/vit-tokenpool     # or plain `python ...`
    accelerate launch recipes/finetune.py --model_name_or_path google/vit-base-patch16-224 \\
        --dataset_name cifar10 --keep 0.6 --push_to_hub --hub_model_id me/vit-base-tokenpool-cifar10

A run: checks the Hub credentials (with --push_to_hub) and the data (classes, every image readable),
evaluates the plain model; when the dataset's classes are new (new head), fine-tunes the plain model too,
on the same budget and seed, as the baseline; patches the model with hf_tokenpool, evaluates it off the
shelf, fine-tunes it (optionally distilling from the plain model), evaluates again, times plain and
pooled interleaved, and writes a Hub-ready folder (model.safetensors, config.json carrying the pooling
settings, preprocessor_config.json, all_results.json, README.md model card). Names follow transformers'
examples/pytorch/image-classification/run_image_classification_no_trainer.py.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.repocard_data import EvalResult
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoImageProcessor, get_scheduler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import hf_tokenpool as tp  # noqa: E402
from hf_tokenpool.config import METHODS, OUTPUTS  # noqa: E402
from hf_tokenpool.data import FASHION_MNIST_HUB_ID, FASHION_MNIST_NAMES, find_unreadable_images  # noqa: E402
from hf_tokenpool.data import load_image_dataset  # noqa: E402
from hf_tokenpool.flops import time_interleaved  # noqa: E402

logger = get_logger(__name__)
# Defaults for a new head on a small dataset as much as for a recovery fine-tune on 60k images: how they were
# chosen is in docs/recipe.md ("How the defaults were chosen"). A checkpoint that keeps its own classes only
# recovers what pooling cost it: a smaller learning rate, and the unpatched model as teacher (docs/fidelity.md).
DEFAULT_LR = 3e-4
RECOVERY_LR = 1e-4
DEFAULT_BATCH = 32
DEFAULT_WARMUP_RATIO = 0.1
DEFAULT_MODEL = str(Path(__file__).resolve().parent / "checkpoints" / "vit-tiny-fashion-mnist")
CHECKPOINT_DIR = "checkpoints"  # inside output_dir; never uploaded


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path", default=DEFAULT_MODEL, help="Hub id or local folder (default: the "
                   "embedded self-pretrained ViT checkpoint)")
    p.add_argument("--dataset_name", default="fashion_mnist", help="Hub id, image folder or save_to_disk folder")
    p.add_argument("--train_split", default=None, help="default: 'train'")
    p.add_argument("--eval_split", default=None, help="default: 'test' or 'validation' where the dataset has "
                   "one, else a seeded --train_val_split of the train split")
    p.add_argument("--train_val_split", type=float, default=0.15)
    p.add_argument("--image_column_name", default=None, help="default: the dataset's only Image column")
    p.add_argument("--label_column_name", default=None, help="default: 'label'/'labels' or the only ClassLabel")
    p.add_argument("--max_train_samples", type=int, default=None)
    p.add_argument("--max_eval_samples", type=int, default=None)
    p.add_argument("--skip_unreadable_images", action="store_true", help="drop images that cannot be decoded "
                   "(counted in the log and on the card) instead of stopping before training with their names")
    p.add_argument("--dataset_card_name", default=None, help="the dataset's name on the model card (default: its "
                   "Hub id, or the folder's name for a local folder; an 'owner/name' value is also listed as the "
                   "card's Hub dataset)")
    # pooling (hf_tokenpool.TokenPoolConfig)
    p.add_argument("--keep", type=float, default=0.6)
    p.add_argument("--method", default="tokenpool", choices=METHODS)
    p.add_argument("--pool_after", type=int, nargs="+", default=None)
    p.add_argument("--schedule", type=float, nargs="+", default=None)
    p.add_argument("--target_flops", type=float, default=None)
    p.add_argument("--iterations", type=int, default=None,
                   help="clustering update rounds (default: the method's own, tokenpool 1, kmeans 5)")
    p.add_argument("--pooling_output", default="mean", choices=OUTPUTS)
    p.add_argument("--no_proportional_attention", action="store_true")
    # training
    p.add_argument("--num_train_epochs", type=float, default=1.0)
    p.add_argument("--max_train_steps", type=int, default=None, help="overrides --num_train_epochs")
    p.add_argument("--learning_rate", type=float, default=None,
                   help=f"default: {DEFAULT_LR} with a new head, {RECOVERY_LR} when the checkpoint keeps its classes")
    p.add_argument("--weight_decay", type=float, default=0.05)
    p.add_argument("--lr_scheduler_type", default="cosine")
    p.add_argument("--warmup_ratio", type=float, default=DEFAULT_WARMUP_RATIO,
                   help="warm-up as a fraction of the run's optimizer steps")
    p.add_argument("--num_warmup_steps", type=int, default=None, help="overrides --warmup_ratio")
    p.add_argument("--per_device_train_batch_size", type=int, default=DEFAULT_BATCH)
    p.add_argument("--per_device_eval_batch_size", type=int, default=256)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--distill", action="store_true", default=None,
                   help="distil from the unpatched model (soft targets); default: on when the checkpoint keeps its "
                   "classes, off with a new head (then the teacher is the fine-tuned plain baseline)")
    p.add_argument("--no_distill", dest="distill", action="store_false", help="never distil")
    p.add_argument("--distill_alpha", type=float, default=0.5, help="weight of the distillation loss")
    p.add_argument("--distill_temperature", type=float, default=1.0)
    p.add_argument("--no_plain_baseline", action="store_true", help="with a new head, do not fine-tune the plain "
                   "model as the baseline (the table then has no plain row to compare with)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--overwrite_output_dir", action="store_true",
                   help="allow writing into a non-empty output_dir (files of the same name are replaced)")
    p.add_argument("--checkpointing_steps", default=None, help="an integer (every N steps) or 'epoch'")
    p.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint folder, or 'latest'")
    p.add_argument("--report_to", default=None, help="accelerate tracker(s): tensorboard, wandb, all, ...")
    p.add_argument("--bench_batch_size", type=int, default=64, help="batch for the images/s measurement")
    p.add_argument("--bench_repeats", type=int, default=7, help="timed forwards per model, plain and pooled "
                   "interleaved; the median is reported with the spread")
    p.add_argument("--push_to_hub", action="store_true")
    p.add_argument("--hub_model_id", default=None, help="default: <your user name>/<output_dir's name>")
    p.add_argument("--hub_token", default=None, help="default: the token of `hf auth login` / HF_TOKEN")
    p.add_argument("--private", action="store_true")
    args = p.parse_args(argv)

    if not 0 < args.keep <= 1:
        p.error(f"--keep must be in (0, 1] (the fraction of tokens kept per pooling step), got {args.keep}")
    if args.target_flops is not None and not 0 < args.target_flops <= 1:
        p.error(f"--target_flops must be in (0, 1], got {args.target_flops}")
    if args.num_train_epochs < 0 or (args.max_train_steps is not None and args.max_train_steps < 0):
        p.error("--num_train_epochs and --max_train_steps must be >= 0")
    if args.checkpointing_steps not in (None, "epoch") and not str(args.checkpointing_steps).isdigit():
        p.error(f"--checkpointing_steps must be an integer or 'epoch', got {args.checkpointing_steps!r}")
    if not 0 < args.train_val_split < 1:
        p.error("--train_val_split must be in (0, 1)")
    if not 0 <= args.warmup_ratio < 1:
        p.error(f"--warmup_ratio must be in [0, 1), got {args.warmup_ratio}")
    if args.num_warmup_steps is not None and args.num_warmup_steps < 0:
        p.error("--num_warmup_steps must be >= 0")
    if args.bench_repeats < 1:
        p.error("--bench_repeats must be >= 1")
    if args.learning_rate is not None and not args.learning_rate > 0:
        p.error(f"--learning_rate must be > 0, got {args.learning_rate}")
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        p.error(f"--output_dir {out} is a file")
    if (out.is_dir() and args.resume_from_checkpoint is None and not args.overwrite_output_dir
            and any(q.name != CHECKPOINT_DIR for q in out.iterdir())):
        p.error(f"--output_dir {out} is not empty; pass --overwrite_output_dir to write into it anyway")
    return args


def resolve_head_defaults(args, new_head: bool) -> None:
    """The settings left to the head: a new head is trained from scratch (DEFAULT_LR, labels only); a checkpoint
    that keeps its classes recovers what pooling cost it (RECOVERY_LR, distilled from the unpatched model)."""
    if args.learning_rate is None:
        args.learning_rate = DEFAULT_LR if new_head else RECOVERY_LR
    if args.distill is None:
        args.distill = not new_head


def pooling_config(args) -> tp.TokenPoolConfig:
    return tp.TokenPoolConfig(keep=args.keep, method=args.method, pool_after=args.pool_after, schedule=args.schedule,
                              target_flops=args.target_flops, iterations=args.iterations,
                              output=args.pooling_output, proportional_attention=not args.no_proportional_attention)


def resolve_dataset(args, raw: datasets.DatasetDict):
    """Pick splits and columns, or fail before any training with what there is."""
    if not raw or all(len(s) == 0 for s in raw.values()):
        raise ValueError(f"dataset {args.dataset_name!r} is empty")
    splits = list(raw)
    train_split = args.train_split or "train"
    if train_split not in raw:
        raise ValueError(f"no split {train_split!r} in {args.dataset_name!r}; its splits are {splits}")
    if args.eval_split is not None and args.eval_split not in raw:
        raise ValueError(f"no split {args.eval_split!r} in {args.dataset_name!r}; its splits are {splits}")
    eval_split = args.eval_split or next((s for s in ("test", "validation", "valid", "val") if s in raw), None)
    train = raw[train_split]
    if eval_split is None:  # a seeded split of train
        parts = train.train_test_split(test_size=args.train_val_split, seed=args.seed, stratify_by_column=None)
        train, evaluation, eval_split = parts["train"], parts["test"], f"{train_split} (held out {args.train_val_split})"
    else:
        evaluation = raw[eval_split]
    if len(train) == 0 or len(evaluation) == 0:
        raise ValueError(f"split {train_split!r} or {eval_split!r} of {args.dataset_name!r} is empty")

    features = train.features
    columns = list(features)
    image_column = args.image_column_name
    if image_column is None:
        images = [c for c, f in features.items() if isinstance(f, datasets.Image)]
        if len(images) != 1:
            raise ValueError(f"cannot tell the image column among {columns}; pass --image_column_name")
        image_column = images[0]
    if image_column not in features:
        raise ValueError(f"no image column {image_column!r}; the columns are {columns}")
    if not isinstance(features[image_column], datasets.Image):
        raise ValueError(f"column {image_column!r} holds {features[image_column]}, not images; the columns are "
                         f"{columns}")
    label_column = args.label_column_name
    if label_column is None:
        labels = [c for c, f in features.items() if isinstance(f, datasets.ClassLabel)]
        label_column = next((c for c in ("label", "labels") if c in features), labels[0] if len(labels) == 1 else None)
        if label_column is None:
            raise ValueError(f"cannot tell the label column among {columns}; pass --label_column_name"
                             + _one_folder_hint(args, columns))
    if label_column not in features:
        raise ValueError(f"no label column {label_column!r}; the columns are {columns}" + _one_folder_hint(args, columns))
    if not isinstance(features[label_column], datasets.ClassLabel):
        raise ValueError(f"label column {label_column!r} is {features[label_column]}, not a ClassLabel; cast it "
                         "with dataset.cast_column(..., datasets.ClassLabel(names=[...])) first")
    names = features[label_column].names
    if len(names) < 2:
        raise ValueError(f"label column {label_column!r} of {args.dataset_name!r} has {len(names)} class ({names}); "
                         "image classification needs at least two")
    present = sorted(set(train[label_column]))
    if len(present) < 2:
        raise ValueError(f"split {train_split!r} of {args.dataset_name!r} holds only the class "
                         f"{[names[i] for i in present]} of {names}; training needs images of at least two classes")
    if args.max_train_samples:
        train = train.shuffle(seed=args.seed).select(range(min(args.max_train_samples, len(train))))
    if args.max_eval_samples:
        evaluation = evaluation.select(range(min(args.max_eval_samples, len(evaluation))))
    return train, evaluation, train_split, eval_split, image_column, label_column


def _one_folder_hint(args, columns) -> str:
    """What an image folder with a single class folder turns into (no label column at all), said plainly."""
    if Path(args.dataset_name).expanduser().is_dir() and all(c == (args.image_column_name or "image") for c in columns):
        return (f". {args.dataset_name} is read as an image folder, whose labels are its sub-folders' names: it "
                "has no label column when all images sit in one folder (one class); image classification needs "
                "one sub-folder per class, at least two (train/<class>/..., test/<class>/... for splits)")
    return ""


def drop_unreadable_images(args, split, image_column, split_name):
    """Stop before training, naming the files, when an image cannot be decoded; or drop them with a count."""
    bad = find_unreadable_images(split, image_column)
    if not bad:
        return split, 0
    listing = "; ".join(f"{where} ({why})" for _, where, why in bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
    if not args.skip_unreadable_images:
        raise ValueError(f"{len(bad)} of the {len(split)} images of split {split_name!r} cannot be read: {listing}. "
                         "Fix or remove them, or pass --skip_unreadable_images to train without them")
    logger.warning(f"skipping {len(bad)} unreadable image(s) of split {split_name!r}: {listing}")
    rows = {row for row, _, _ in bad}
    return split.select([i for i in range(len(split)) if i not in rows]), len(bad)


def load_model(args, label_names):
    """The checkpoint, and whether it got a new head (when the dataset's classes differ from the checkpoint's)."""
    model = tp.load_model(args.model_name_or_path)
    current = [model.config.id2label[i] for i in range(len(model.config.id2label))]
    if current == list(label_names):
        return model, False
    id2label = dict(enumerate(label_names))
    set_seed(args.seed)  # the new head's initialisation belongs to the run's seed
    model = tp.load_model(args.model_name_or_path, num_labels=len(label_names), id2label=id2label,
                          label2id={v: k for k, v in id2label.items()}, ignore_mismatched_sizes=True)
    logger.info(f"new classification head for the dataset's {len(label_names)} classes {list(label_names)[:5]}... "
                f"(the checkpoint's {len(current)} are {current[:5]}...)")
    return model, True


@torch.no_grad()
def evaluate(model, loader, accelerator) -> float:
    model.eval()
    correct = total = 0
    for batch in loader:
        logits = model(pixel_values=batch["pixel_values"]).logits
        predictions, references = accelerator.gather_for_metrics((logits.argmax(-1), batch["labels"]))
        correct += (predictions == references).sum().item()
        total += references.numel()
    return 100.0 * correct / total


def measure(model, loader, accelerator, sample_pixels) -> dict:
    """Top-1 on the eval split (every process) and GFLOPs per image; speed is timed apart (`measure_speed`)."""
    accuracy = evaluate(model, loader, accelerator)
    gflops = tp.count_flops(accelerator.unwrap_model(model), sample_pixels[:1]) / 1e9
    return {"accuracy": round(accuracy, 2), "gflops": round(gflops, 4)}


def measure_speed(args, plain, pooled, sample, accelerator) -> dict | None:
    """Images/s of the plain and the pooled model timed in turn (plain, pooled, plain, ...) on the main process
    while the others wait: the median of --bench_repeats forwards each, with the slowest and fastest."""
    speed = None
    if accelerator.is_main_process:
        timed = time_interleaved({"plain": plain, "pooled": pooled}, sample, warmup=1, repeats=args.bench_repeats)
        speed = {name: {k: v if k == "repeats" else round(v, 1) for k, v in r.items() if k != "seconds"}
                 for name, r in timed.items()}
    accelerator.wait_for_everyone()
    return speed


def launcher() -> str:
    """How this run was started, for the command recorded in all_results.json and the card."""
    return "accelerate launch" if "ACCELERATE_MIXED_PRECISION" in os.environ or "WORLD_SIZE" in os.environ else "python"


def recorded_command(argv) -> str:
    """The command for all_results.json and the card (both uploaded): absolute local paths appear as their last
    part, so neither shows where the data, the checkpoint or the output lived on this machine."""
    def portable(token: str) -> str:
        return Path(token).expanduser().name if token.startswith(("/", "~")) and len(token) > 1 else token
    return " ".join([launcher(), "recipes/finetune.py", *(portable(t) for t in argv)])


def checkpoint_folders(output_dir: Path) -> list[Path]:
    root = output_dir / CHECKPOINT_DIR
    found = [p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[5:]))


def save_checkpoint(accelerator, output_dir: Path, step: int):
    """accelerate's save_state, written aside and renamed into place, so a checkpoint folder is whole."""
    final = output_dir / CHECKPOINT_DIR / f"step_{step}"
    tmp = output_dir / CHECKPOINT_DIR / f".step_{step}.tmp"
    accelerator.save_state(str(tmp))  # every process writes its part, main writes the rest
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()


def warmup_steps(args, max_steps: int) -> int:
    """--num_warmup_steps if given, else --warmup_ratio of the run's optimizer steps (rounded up)."""
    return args.num_warmup_steps if args.num_warmup_steps is not None else math.ceil(args.warmup_ratio * max_steps)


def fine_tune(args, accelerator, model, train, collate, *, teacher=None, output_dir=None, desc="fine-tune"):
    """Train `model` for the run's budget (AdamW, warm-up + schedule, clipping, optional distillation).

    The plain baseline and the pooled model go through this same function with the same seed, so they see the
    same batches in the same order. Checkpoints, resume and trackers belong to the pooled run (`output_dir`).
    Returns the bare model and a record of the run (steps, minutes, warm-up, learning rate at marked steps).
    """
    set_seed(args.seed)
    loader = DataLoader(train, shuffle=True, collate_fn=collate, batch_size=args.per_device_train_batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    # counted after prepare: the batches one process sees per epoch
    steps_per_epoch = max(1, math.ceil(len(loader) / args.gradient_accumulation_steps))
    max_steps = args.max_train_steps if args.max_train_steps is not None else \
        math.ceil(args.num_train_epochs * steps_per_epoch)
    warmup = warmup_steps(args, max_steps)
    # a prepared scheduler is stepped once per process at every optimizer step (as in transformers' example)
    scheduler = accelerator.prepare(get_scheduler(args.lr_scheduler_type, optimizer,
                                                  num_warmup_steps=warmup * accelerator.num_processes,
                                                  num_training_steps=max(max_steps, 1) * accelerator.num_processes))
    completed = 0
    if output_dir is not None and args.resume_from_checkpoint:
        path = Path(args.resume_from_checkpoint)
        if args.resume_from_checkpoint == "latest":
            found = checkpoint_folders(output_dir)
            if not found:
                raise ValueError(f"--resume_from_checkpoint latest: no checkpoint under {output_dir / CHECKPOINT_DIR}")
            path = found[-1]
        if not path.is_dir():
            raise ValueError(f"--resume_from_checkpoint {path}: no such checkpoint folder")
        accelerator.load_state(str(path))
        completed = int(path.name.split("_")[-1])
        logger.info(f"resumed from {path} at step {completed}")

    marks = {warmup, max(1, max_steps // 2), max_steps}  # the learning rate after these steps goes on record
    lr_after_step = {}
    progress = tqdm(range(max_steps), disable=not accelerator.is_local_main_process, desc=desc)
    progress.update(completed)
    step = completed
    epoch = completed // steps_per_epoch
    started = time.perf_counter()
    while step < max_steps:
        model.train()
        epoch_loader = loader
        set_seed(args.seed + epoch)  # the shuffle of each epoch is reproducible, also after a resume
        skip = (step - epoch * steps_per_epoch) * args.gradient_accumulation_steps
        if skip:
            epoch_loader = accelerator.skip_first_batches(loader, skip)
        for batch in epoch_loader:
            with accelerator.accumulate(model):
                logits = model(pixel_values=batch["pixel_values"]).logits
                loss = F.cross_entropy(logits, batch["labels"])
                if teacher is not None:
                    with torch.no_grad():
                        soft = teacher(pixel_values=batch["pixel_values"]).logits
                    t = args.distill_temperature
                    kd = F.kl_div(F.log_softmax(logits / t, -1), F.log_softmax(soft / t, -1), log_target=True,
                                  reduction="batchmean") * t * t
                    loss = (1 - args.distill_alpha) * loss + args.distill_alpha * kd
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                step += 1
                progress.update(1)
                progress.set_postfix(loss=f"{loss.item():.3f}")
                if step in marks:
                    lr_after_step[str(step)] = scheduler.get_last_lr()[0]
                if output_dir is not None and args.report_to:
                    accelerator.log({"train_loss": loss.item(), "lr": scheduler.get_last_lr()[0]}, step=step)
                if output_dir is not None and args.checkpointing_steps and args.checkpointing_steps.isdigit() \
                        and step % int(args.checkpointing_steps) == 0:
                    save_checkpoint(accelerator, output_dir, step)
                if step >= max_steps:
                    break
        epoch += 1
        if output_dir is not None and args.checkpointing_steps == "epoch":
            save_checkpoint(accelerator, output_dir, step)
    progress.close()
    record = {"train_steps": step, "train_minutes": (time.perf_counter() - started) / 60,
              "steps_per_epoch": steps_per_epoch, "warmup_steps": warmup, "lr_after_step": lr_after_step}
    return accelerator.unwrap_model(model), record


def hub_id_of(name: str) -> str | None:
    """The Hub id behind a model or dataset argument: itself when it is no local path, the id inside a
    huggingface_hub cache snapshot (.../models--owner--name/snapshots/...), else None (a local folder)."""
    path = Path(name).expanduser()
    if not path.exists():
        return name
    for part in path.resolve().parts:
        for prefix in ("models--", "datasets--"):
            if part.startswith(prefix):
                return part[len(prefix):].replace("--", "/")
    return None


def dataset_names(args) -> tuple[str | None, str]:
    """(the dataset's Hub id or None, the name the card shows): a Hub id or a folder's name, never a local path."""
    hub = FASHION_MNIST_HUB_ID if args.dataset_name.lower() in FASHION_MNIST_NAMES else hub_id_of(args.dataset_name)
    if args.dataset_card_name:
        if re.fullmatch(r"[\w.-]+/[\w.-]+", args.dataset_card_name):
            hub = args.dataset_card_name
        return hub, args.dataset_card_name
    return hub, hub or Path(args.dataset_name).expanduser().resolve().name


def model_card(args, results, model, train_split, eval_split) -> ModelCard:
    baseline = results["baseline"]
    plain, shelf, tuned = results[baseline], results["pooled_off_the_shelf"], results["pooled_finetuned"]
    speed = results["speed"]
    settings = model.config.token_pooling
    base = args.model_name_or_path
    base_model = hub_id_of(base)
    dataset_hub, dataset = dataset_names(args)
    model_name = args.hub_model_id or Path(args.output_dir).resolve().name
    data = ModelCardData(
        library_name="transformers",
        base_model=base_model,
        datasets=[dataset_hub] if dataset_hub else None,
        tags=sorted({"hf-tokenpool", "token-pooling", "image-classification", "vision", model.config.model_type}),
        metrics=["accuracy"],
        pipeline_tag="image-classification",
        model_name=model_name,
        eval_results=[EvalResult(task_type="image-classification", task_name="Image Classification",
                                 dataset_type=dataset_hub or dataset, dataset_name=dataset,
                                 dataset_split=str(eval_split), metric_type="accuracy", metric_name="Top-1 accuracy",
                                 metric_value=tuned["accuracy"])],
    )
    source = f"`{base_model}`" if base_model else f"the local checkpoint `{Path(base).name}`"
    if baseline == "plain_finetuned":
        names = ("plain, fine-tuned (baseline)", "pooled, off the shelf", "pooled, fine-tuned")
        story = (f"{source} got a new classification head for the dataset's {len(model.config.id2label)} classes "
                 f"and was fine-tuned on `{dataset}` (split `{train_split}`) for {results['train_steps']} steps "
                 f"({results['train_minutes']:.2f} min) with **token pooling** applied by `hf_tokenpool`. The baseline is "
                 "the plain model fine-tuned the same way (same steps, learning rate, batch and seed), so the table "
                 "compares pooled and plain at equal training; \"off the shelf\" is that fine-tuned plain model, "
                 "pooled, without further training.")
    elif results["new_head"]:
        names = ("plain (untrained head)", "pooled, off the shelf (untrained head)", "pooled, fine-tuned")
        story = (f"{source} got a new classification head for the dataset's {len(model.config.id2label)} classes "
                 f"and was fine-tuned on `{dataset}` (split `{train_split}`) for {results['train_steps']} steps "
                 f"({results['train_minutes']:.2f} min) with **token pooling** applied by `hf_tokenpool`. No plain "
                 "baseline was trained (`--no_plain_baseline`): the first two rows carry the untrained head, so this "
                 "card has no accuracy to compare the pooled model with.")
    else:
        names = ("plain", "pooled, off the shelf", "pooled, fine-tuned")
        story = (f"{source} with **token pooling** applied by `hf_tokenpool`, then fine-tuned for "
                 f"{results['train_steps']} steps ({results['train_minutes']:.2f} min) on `{dataset}` (split "
                 f"`{train_split}`), the classes the checkpoint was trained for.")
    rows = "\n".join(
        f"| {name} | {r['accuracy']:.2f} | {r['gflops']:.4f} | {_speed_cell(speed, kind)} |"
        for name, r, kind in zip(names, (plain, shelf, tuned), ("plain", "pooled", "pooled")))
    compare = ""
    if not (results["new_head"] and baseline == "plain"):  # an untrained head is nothing to compare with
        delta = tuned["accuracy"] - plain["accuracy"]
        compare = (f"Pooled and fine-tuned: {tuned['accuracy']:.2f}% top-1, {abs(delta):.2f} points "
                   f"{'above' if delta >= 0 else 'below'} the {names[0].split(' (')[0]} model's {plain['accuracy']:.2f}%. ")
    ratio = f"FLOPs ratio pooled / plain: {tuned['gflops'] / plain['gflops']:.3f}"
    if speed:
        ratio += f"; measured speed-up: {speed['pooled']['images_per_second'] / speed['plain']['images_per_second']:.2f}x"
    skipped = results["skipped_images"]
    skipped_line = (f"\n{sum(skipped.values())} unreadable image(s) were left out (`--skip_unreadable_images`): "
                    f"{skipped['train']} of the training split, {skipped['eval']} of the evaluation split.\n"
                    if sum(skipped.values()) else "")
    repo = args.hub_model_id or Path(args.output_dir).resolve().name
    warmup = (f"{results['warmup_steps']} warm-up steps" + (f", --warmup_ratio {args.warmup_ratio}"
                                                             if args.num_warmup_steps is None else ""))
    text = f"""---
{data.to_yaml()}
---

# {model_name.split('/')[-1]}

{story}
Token pooling: [Marin et al., Token Pooling in Vision Transformers](https://arxiv.org/abs/2110.03860).

## Results

Measured by this run on `{dataset}` split `{eval_split}` ({results['eval_samples']} images): top-1 accuracy,
FLOPs per image (torch.utils.flop_counter) and images/s (batch {args.bench_batch_size}, {results['device']}; the
plain and the pooled model timed in turn, median of {args.bench_repeats} forwards each, slowest-fastest in brackets).

| model | top-1 (%) | GFLOPs / image | images/s |
|---|---|---|---|
{rows}

{compare}{ratio}.
{skipped_line}
## Pooling settings

```json
{json.dumps(settings, indent=2, sort_keys=True)}
```

## Training

`{results['command']}`

{'Distilled from the ' + ('fine-tuned plain baseline' if baseline == 'plain_finetuned' else 'unpatched model') + ' (alpha ' + str(args.distill_alpha) + ', temperature ' + str(args.distill_temperature) + ').' if args.distill else 'Cross-entropy on the labels.'}
Learning rate {args.learning_rate} ({args.lr_scheduler_type}, {warmup}), batch
{args.per_device_train_batch_size} x {results['num_processes']} process(es) x {args.gradient_accumulation_steps} accumulation, seed {args.seed};
{results['train_samples']} training images.

## Use

```python
import hf_tokenpool

model = hf_tokenpool.from_pretrained("{repo}")  # loads with transformers, re-applies the pooling
```

Loading it with plain `transformers` (`AutoModelForImageClassification.from_pretrained`) gives the
unpooled model with the fine-tuned weights.
"""
    return ModelCard(text)


def _speed_cell(speed, kind) -> str:
    if not speed:
        return "-"
    s = speed[kind]
    return f"{s['images_per_second']:.1f} ({s['min']:.1f}-{s['max']:.1f})"


def _why(err) -> str:
    """An exception's type and HTTP status, never its text (which could quote a request)."""
    status = getattr(getattr(err, "response", None), "status_code", None)
    return type(err).__name__ + (f", HTTP {status}" if status else "")


def check_hub(args) -> str:
    """Before any work: credentials that the Hub accepts, with write access, and the target repo created (or
    already there). Returns the repo id (default <user>/<output_dir's name>); fails with what to do."""
    from huggingface_hub import HfApi

    api = HfApi(token=args.hub_token)  # the token is passed on, never printed or logged
    try:
        who = api.whoami()
    except Exception as err:
        raise SystemExit(f"--push_to_hub: the Hugging Face Hub did not accept your credentials ({_why(err)}). Log in "
                         "with `hf auth login`, set HF_TOKEN or pass --hub_token. Nothing was trained.") from None
    if ((who.get("auth") or {}).get("accessToken") or {}).get("role") == "read":
        raise SystemExit("--push_to_hub: your token is read-only; create one with write access at "
                         "https://huggingface.co/settings/tokens. Nothing was trained.")
    repo_id = args.hub_model_id or f"{who['name']}/{Path(args.output_dir).resolve().name}"
    try:
        repo_id = api.create_repo(repo_id, exist_ok=True, private=args.private).repo_id
    except Exception as err:
        raise SystemExit(f"--push_to_hub: cannot create or use the model repo {repo_id!r} as {who.get('name')!r} "
                         f"({_why(err)}); choose a --hub_model_id in a namespace you can write to. "
                         "Nothing was trained.") from None
    return repo_id


def push(args, output_dir: Path):
    """One upload_folder of the run's files: one commit, so a failed push leaves the Hub repo as it was; the
    output folder is complete before the push and untouched by it."""
    from huggingface_hub import HfApi

    api = HfApi(token=args.hub_token)
    try:
        api.upload_folder(repo_id=args.hub_model_id, folder_path=str(output_dir), commit_message="hf_tokenpool fine-tune",
                          ignore_patterns=[f"{CHECKPOINT_DIR}/*", ".staging-*"])
    except Exception as err:
        raise SystemExit(f"the push to {args.hub_model_id} failed ({_why(err)}). The Hub repo is as it was (an upload "
                         f"is one commit) and {output_dir} holds the complete run: push it again with `hf upload "
                         f"{args.hub_model_id} {output_dir} . --exclude 'checkpoints/*'`.") from None
    logger.info(f"pushed {output_dir} to https://huggingface.co/{args.hub_model_id}")


def main(argv=None):
    args = parse_args(argv)
    # accelerate counts a multi-process launch on a machine without CUDA as MULTI_CPU only with cpu=True
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps, cpu=multi_cpu,
                              log_with=args.report_to, project_dir=args.output_dir)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_warning()
    else:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
    if args.push_to_hub and accelerator.is_main_process:  # credentials and target repo before any work
        args.hub_model_id = check_hub(args)
    set_seed(args.seed)
    output_dir = Path(args.output_dir)
    pooling = pooling_config(args)  # bad settings fail here, before any loading or training

    # dataset (every image checked before training), model, processor
    raw = load_image_dataset(args.dataset_name)
    train, evaluation, train_split, eval_split, image_column, label_column = resolve_dataset(args, raw)
    train, skipped_train = drop_unreadable_images(args, train, image_column, train_split)
    evaluation, skipped_eval = drop_unreadable_images(args, evaluation, image_column, eval_split)
    label_names = train.features[label_column].names
    model, new_head = load_model(args, label_names)
    with_baseline = new_head and not args.no_plain_baseline
    resolve_head_defaults(args, new_head)
    if args.distill and new_head and not with_baseline:
        raise ValueError("--distill with a new head needs the plain baseline as its teacher (the head is untrained "
                         "otherwise); drop --no_plain_baseline")
    processor = AutoImageProcessor.from_pretrained(args.model_name_or_path)
    channels = tp.patch.vision_config(model).num_channels

    def collate(examples):
        # the image processor runs once per batch (not once per image: its per-call cost dominates)
        images = [e[image_column].convert("RGB" if channels == 3 else "L") for e in examples]
        return {"pixel_values": processor(images, return_tensors="pt")["pixel_values"],
                "labels": torch.tensor([e[label_column] for e in examples])}

    eval_loader = accelerator.prepare(DataLoader(evaluation, collate_fn=collate,
                                                 batch_size=args.per_device_eval_batch_size))
    sample = collate([evaluation[i] for i in range(min(args.bench_batch_size, len(evaluation)))])["pixel_values"]
    sample = sample.to(accelerator.device)
    model = model.to(accelerator.device)
    if args.report_to:
        accelerator.init_trackers("hf_tokenpool_finetune", {k: v for k, v in vars(args).items()
                                                            if isinstance(v, (int, float, str, bool))})

    # the plain model: measured as loaded; with a new head, fine-tuned as the baseline on the same budget and seed.
    # It is also the teacher (--distill) and the plain side of the speed measurement.
    results = {"plain": measure(model, eval_loader, accelerator, sample), "new_head": new_head}
    reference = copy.deepcopy(model)
    if with_baseline:
        reference, record = fine_tune(args, accelerator, reference, train, collate, desc="fine-tune plain (baseline)")
        accelerator.free_memory()  # the pooled run prepares its own; its checkpoints hold only its own state
        results["plain_finetuned"] = measure(reference, eval_loader, accelerator, sample)
        results["baseline_training"] = record
        shelf = tp.patch_model(copy.deepcopy(reference), config=pooling)  # what pooling costs the baseline
        results["pooled_off_the_shelf"] = measure(shelf, eval_loader, accelerator, sample)
        del shelf
    reference.eval().requires_grad_(False)
    tp.patch_model(model, config=pooling)
    if not with_baseline:
        results["pooled_off_the_shelf"] = measure(model, eval_loader, accelerator, sample)
    logger.info(f"plain: {results['plain']}; pooled off the shelf: {results['pooled_off_the_shelf']}"
                + (f"; plain fine-tuned: {results['plain_finetuned']}" if with_baseline else ""))

    model, record = fine_tune(args, accelerator, model, train, collate, teacher=reference if args.distill else None,
                              output_dir=output_dir, desc="fine-tune pooled")
    results["pooled_finetuned"] = measure(model, eval_loader, accelerator, sample)
    speed = measure_speed(args, reference, model, sample, accelerator)
    if speed:
        for name in ("plain", "plain_finetuned", "pooled_off_the_shelf", "pooled_finetuned"):
            if name in results:
                results[name]["images_per_second"] = speed["pooled" if name.startswith("pooled") else "plain"][
                    "images_per_second"]
    results.update(record, baseline="plain_finetuned" if with_baseline else "plain", speed=speed,
                   learning_rate=args.learning_rate, distill=args.distill,
                   eval_samples=len(evaluation), train_samples=len(train),
                   skipped_images={"train": skipped_train, "eval": skipped_eval},
                   dataset=dataset_names(args)[1], num_processes=accelerator.num_processes,
                   device=f"{accelerator.device.type}, {torch.get_num_threads()} threads",
                   command=recorded_command(argv if argv is not None else sys.argv[1:]))
    logger.info(f"fine-tuned: {results['pooled_finetuned']}")
    if args.report_to:
        accelerator.log({f"{k}_accuracy": results[k]["accuracy"] for k in
                         ("plain", "plain_finetuned", "pooled_off_the_shelf", "pooled_finetuned") if k in results},
                        step=record["train_steps"])
        accelerator.end_training()

    # write aside, then move into place: output_dir never holds a half-written model
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=output_dir))
        try:
            model.save_pretrained(staging, is_main_process=True, save_function=accelerator.save, safe_serialization=True)
            processor.save_pretrained(staging)
            (staging / "all_results.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
            model_card(args, results, model, train_split, eval_split).save(staging / "README.md")
            for item in staging.iterdir():
                os.replace(item, output_dir / item.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        print(summary_table(results))
        if args.push_to_hub:
            push(args, output_dir)
    accelerator.wait_for_everyone()
    return results


def summary_table(results) -> str:
    lines = ["| model | top-1 (%) | GFLOPs / image | images/s |", "|---|---|---|---|"]
    for name in (results["baseline"], "pooled_off_the_shelf", "pooled_finetuned"):
        r = results[name]
        ips = f"{r['images_per_second']:.1f}" if "images_per_second" in r else "-"
        lines.append(f"| {name.replace('_', ' ')} | {r['accuracy']:.2f} | {r['gflops']:.4f} | {ips} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
