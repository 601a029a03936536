#!/usr/bin/env python
"""Recover the accuracy that token pooling costs, with a short `accelerate` fine-tune, and publish it.

    accelerate launch recipes/finetune.py --output_dir outputs/vit-tokenpool     # or plain `python ...`
    accelerate launch recipes/finetune.py --model_name_or_path google/vit-base-patch16-224 \\
        --dataset_name cifar10 --keep 0.6 --push_to_hub --hub_model_id me/vit-base-tokenpool-cifar10

A run: evaluates the plain model (top-1, GFLOPs per image, images/s), patches it with hf_tokenpool,
evaluates it off the shelf, fine-tunes (optionally distilling from the plain model), evaluates again,
and writes a Hub-ready folder (model.safetensors, config.json carrying the pooling settings,
preprocessor_config.json, all_results.json, README.md model card). Names follow transformers'
examples/pytorch/image-classification/run_image_classification_no_trainer.py.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
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
from hf_tokenpool.data import load_image_dataset  # noqa: E402

logger = get_logger(__name__)
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
    # pooling (hf_tokenpool.TokenPoolConfig)
    p.add_argument("--keep", type=float, default=0.6)
    p.add_argument("--method", default="tokenpool", choices=METHODS)
    p.add_argument("--pool_after", type=int, nargs="+", default=None)
    p.add_argument("--schedule", type=float, nargs="+", default=None)
    p.add_argument("--target_flops", type=float, default=None)
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--pooling_output", default="mean", choices=OUTPUTS)
    p.add_argument("--no_proportional_attention", action="store_true")
    # training
    p.add_argument("--num_train_epochs", type=float, default=1.0)
    p.add_argument("--max_train_steps", type=int, default=None, help="overrides --num_train_epochs")
    p.add_argument("--learning_rate", type=float, default=1e-4)
    p.add_argument("--weight_decay", type=float, default=0.05)
    p.add_argument("--lr_scheduler_type", default="cosine")
    p.add_argument("--num_warmup_steps", type=int, default=50)
    p.add_argument("--per_device_train_batch_size", type=int, default=64)
    p.add_argument("--per_device_eval_batch_size", type=int, default=256)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--distill", action="store_true", help="distil from the unpatched model (soft targets)")
    p.add_argument("--distill_alpha", type=float, default=0.5, help="weight of the distillation loss")
    p.add_argument("--distill_temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--overwrite_output_dir", action="store_true",
                   help="allow writing into a non-empty output_dir (files of the same name are replaced)")
    p.add_argument("--checkpointing_steps", default=None, help="an integer (every N steps) or 'epoch'")
    p.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint folder, or 'latest'")
    p.add_argument("--report_to", default=None, help="accelerate tracker(s): tensorboard, wandb, all, ...")
    p.add_argument("--bench_batch_size", type=int, default=64, help="batch for the images/s measurement")
    p.add_argument("--push_to_hub", action="store_true")
    p.add_argument("--hub_model_id", default=None)
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
    if args.push_to_hub and not args.hub_model_id:
        p.error("--push_to_hub needs --hub_model_id (e.g. your-name/vit-tokenpool)")
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        p.error(f"--output_dir {out} is a file")
    if (out.is_dir() and args.resume_from_checkpoint is None and not args.overwrite_output_dir
            and any(q.name != CHECKPOINT_DIR for q in out.iterdir())):
        p.error(f"--output_dir {out} is not empty; pass --overwrite_output_dir to write into it anyway")
    return args


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
            raise ValueError(f"cannot tell the label column among {columns}; pass --label_column_name")
    if label_column not in features:
        raise ValueError(f"no label column {label_column!r}; the columns are {columns}")
    if not isinstance(features[label_column], datasets.ClassLabel):
        raise ValueError(f"label column {label_column!r} is {features[label_column]}, not a ClassLabel; cast it "
                         "with dataset.cast_column(..., datasets.ClassLabel(names=[...])) first")
    if args.max_train_samples:
        train = train.shuffle(seed=args.seed).select(range(min(args.max_train_samples, len(train))))
    if args.max_eval_samples:
        evaluation = evaluation.select(range(min(args.max_eval_samples, len(evaluation))))
    return train, evaluation, train_split, eval_split, image_column, label_column


def load_model(args, label_names):
    """The checkpoint, with a new head when the dataset's classes differ from the checkpoint's."""
    model = tp.load_model(args.model_name_or_path)
    current = [model.config.id2label[i] for i in range(len(model.config.id2label))]
    if current != list(label_names):
        id2label = dict(enumerate(label_names))
        model = tp.load_model(args.model_name_or_path, num_labels=len(label_names), id2label=id2label,
                              label2id={v: k for k, v in id2label.items()}, ignore_mismatched_sizes=True)
        logger.info(f"new classification head: {len(label_names)} classes (the checkpoint had {len(current)})")
    return model


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
    """Top-1 on the eval split, GFLOPs per image and images/s (main process, one batch)."""
    accuracy = evaluate(model, loader, accelerator)
    bare = accelerator.unwrap_model(model)
    gflops = tp.count_flops(bare, sample_pixels[:1]) / 1e9
    ips = tp.images_per_second(bare, sample_pixels, warmup=2, repeats=5)
    return {"accuracy": round(accuracy, 2), "gflops": round(gflops, 4), "images_per_second": round(ips, 1)}


def launcher() -> str:
    """How this run was started, for the command recorded in all_results.json and the card."""
    return "accelerate launch" if "ACCELERATE_MIXED_PRECISION" in os.environ or "WORLD_SIZE" in os.environ else "python"


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


def model_card(args, results, model, train_split, eval_split) -> ModelCard:
    plain, shelf, tuned = results["plain"], results["pooled_off_the_shelf"], results["pooled_finetuned"]
    settings = model.config.token_pooling
    base = args.model_name_or_path
    base_model = base if not Path(base).exists() else None  # a local folder is no Hub id
    dataset_id = "zalando-datasets/fashion_mnist" if args.dataset_name in ("fashion_mnist", "fashion-mnist") \
        else (args.dataset_name if not Path(args.dataset_name).exists() else None)
    data = ModelCardData(
        library_name="transformers",
        base_model=base_model,
        datasets=[dataset_id] if dataset_id else None,
        tags=sorted({"hf-tokenpool", "token-pooling", "image-classification", "vision", model.config.model_type}),
        metrics=["accuracy"],
        pipeline_tag="image-classification",
        model_name=args.hub_model_id or Path(args.output_dir).name,
        eval_results=[EvalResult(task_type="image-classification", dataset_type=dataset_id or "custom",
                                 dataset_name=args.dataset_name, dataset_split=str(eval_split), metric_type="accuracy",
                                 metric_value=tuned["accuracy"])],
    )
    rows = "\n".join(
        f"| {name} | {r['accuracy']:.2f} | {r['gflops']:.4f} | {r['images_per_second']:.1f} |"
        for name, r in (("plain", plain), ("pooled, off the shelf", shelf), ("pooled, fine-tuned", tuned)))
    repo = args.hub_model_id or args.output_dir
    text = f"""---
{data.to_yaml()}
---

# {Path(repo).name}

`{base}` with **token pooling** ([Marin et al., Token Pooling in Vision Transformers](https://arxiv.org/abs/2110.03860))
applied by `hf_tokenpool` and fine-tuned for {results['train_steps']} steps ({results['train_minutes']} min) on
`{args.dataset_name}` (split `{train_split}`) to recover the accuracy that pooling costs.

## Results

Measured by this run on `{args.dataset_name}` split `{eval_split}` ({results['eval_samples']} images): top-1 accuracy,
FLOPs per image (torch.utils.flop_counter) and images/s (batch {args.bench_batch_size}, {results['device']}).

| model | top-1 (%) | GFLOPs / image | images/s |
|---|---|---|---|
{rows}

FLOPs ratio pooled / plain: {tuned['gflops'] / plain['gflops']:.3f}; measured speed-up: {tuned['images_per_second'] / plain['images_per_second']:.2f}x.

## Pooling settings

```json
{json.dumps(settings, indent=2, sort_keys=True)}
```

## Training

`{results['command']}`

{'Distilled from the unpatched model (alpha ' + str(args.distill_alpha) + ', temperature ' + str(args.distill_temperature) + ').' if args.distill else 'Cross-entropy on the labels.'}
Learning rate {args.learning_rate} ({args.lr_scheduler_type}, {args.num_warmup_steps} warm-up steps), batch
{args.per_device_train_batch_size} x {results['num_processes']} process(es) x {args.gradient_accumulation_steps} accumulation, seed {args.seed}.

## Use

```python
import hf_tokenpool

model = hf_tokenpool.from_pretrained("{repo}")  # loads with transformers, re-applies the pooling
```

Loading it with plain `transformers` (`AutoModelForImageClassification.from_pretrained`) gives the
unpooled model with the fine-tuned weights.
"""
    return ModelCard(text)


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
    set_seed(args.seed)
    output_dir = Path(args.output_dir)
    pooling = pooling_config(args)  # bad settings fail here, before any loading or training

    # dataset, model, processor
    raw = load_image_dataset(args.dataset_name)
    train, evaluation, train_split, eval_split, image_column, label_column = resolve_dataset(args, raw)
    label_names = train.features[label_column].names
    model = load_model(args, label_names)
    processor = AutoImageProcessor.from_pretrained(args.model_name_or_path)
    channels = model.config.num_channels

    def collate(examples):
        # the image processor runs once per batch (not once per image: its per-call cost dominates)
        images = [e[image_column].convert("RGB" if channels == 3 else "L") for e in examples]
        return {"pixel_values": processor(images, return_tensors="pt")["pixel_values"],
                "labels": torch.tensor([e[label_column] for e in examples])}

    train_loader = DataLoader(train, shuffle=True, collate_fn=collate, batch_size=args.per_device_train_batch_size)
    eval_loader = DataLoader(evaluation, collate_fn=collate, batch_size=args.per_device_eval_batch_size)
    sample = collate([evaluation[i] for i in range(min(args.bench_batch_size, len(evaluation)))])["pixel_values"]

    # teacher = the plain model (frozen); student = the same model, pooled
    teacher = copy.deepcopy(model).eval().requires_grad_(False) if args.distill else None
    steps_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps if args.max_train_steps is not None else \
        math.ceil(args.num_train_epochs * steps_per_epoch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.num_warmup_steps,
                              num_training_steps=max(max_steps, 1))
    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, scheduler)
    if teacher is not None:
        teacher = teacher.to(accelerator.device)
    sample = sample.to(accelerator.device)
    if args.report_to:
        accelerator.init_trackers("hf_tokenpool_finetune", {k: v for k, v in vars(args).items()
                                                            if isinstance(v, (int, float, str, bool))})

    results = {"plain": measure(model, eval_loader, accelerator, sample)}
    tp.patch_model(accelerator.unwrap_model(model), config=pooling)
    results["pooled_off_the_shelf"] = measure(model, eval_loader, accelerator, sample)
    logger.info(f"plain: {results['plain']}; pooled off the shelf: {results['pooled_off_the_shelf']}")

    # resume
    completed = 0
    if args.resume_from_checkpoint:
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

    progress = tqdm(range(max_steps), disable=not accelerator.is_local_main_process, desc="fine-tune")
    progress.update(completed)
    step = completed
    epoch = completed // steps_per_epoch if steps_per_epoch else 0
    started = time.perf_counter()
    while step < max_steps:
        model.train()
        loader = train_loader
        set_seed(args.seed + epoch)  # the shuffle of each epoch is reproducible, also after a resume
        skip = (step - epoch * steps_per_epoch) * args.gradient_accumulation_steps
        if skip:
            loader = accelerator.skip_first_batches(train_loader, skip)
        for batch in loader:
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
                if args.report_to:
                    accelerator.log({"train_loss": loss.item(), "lr": scheduler.get_last_lr()[0]}, step=step)
                if args.checkpointing_steps and args.checkpointing_steps.isdigit() \
                        and step % int(args.checkpointing_steps) == 0:
                    save_checkpoint(accelerator, output_dir, step)
                if step >= max_steps:
                    break
        epoch += 1
        if args.checkpointing_steps == "epoch":
            save_checkpoint(accelerator, output_dir, step)
    progress.close()
    train_minutes = round((time.perf_counter() - started) / 60, 2)

    results["pooled_finetuned"] = measure(model, eval_loader, accelerator, sample)
    results.update(train_steps=step, train_minutes=train_minutes, eval_samples=len(evaluation),
                   num_processes=accelerator.num_processes,
                   device=f"{accelerator.device.type}, {torch.get_num_threads()} threads",
                   command=" ".join([launcher(), "recipes/finetune.py", *(argv if argv is not None else sys.argv[1:])]))
    logger.info(f"fine-tuned: {results['pooled_finetuned']}")
    if args.report_to:
        accelerator.log({f"{k}_accuracy": v["accuracy"] for k, v in results.items() if isinstance(v, dict)}, step=step)
        accelerator.end_training()

    # write aside, then move into place: output_dir never holds a half-written model
    accelerator.wait_for_everyone()
    bare = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=output_dir))
        try:
            bare.save_pretrained(staging, is_main_process=True, save_function=accelerator.save, safe_serialization=True)
            processor.save_pretrained(staging)
            (staging / "all_results.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
            model_card(args, results, bare, train_split, eval_split).save(staging / "README.md")
            for item in staging.iterdir():
                os.replace(item, output_dir / item.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        print(summary_table(results))
        if args.push_to_hub:
            push(args, output_dir)
    accelerator.wait_for_everyone()
    return results


def push(args, output_dir: Path):
    from huggingface_hub import HfApi

    api = HfApi(token=args.hub_token)  # the token is passed on, never printed or logged
    repo_id = api.create_repo(args.hub_model_id, exist_ok=True, private=args.private).repo_id
    api.upload_folder(repo_id=repo_id, folder_path=str(output_dir), commit_message="hf_tokenpool fine-tune",
                      ignore_patterns=[f"{CHECKPOINT_DIR}/*", ".staging-*"])
    logger.info(f"pushed {output_dir} to https://huggingface.co/{repo_id}")


def summary_table(results) -> str:
    lines = ["| model | top-1 (%) | GFLOPs / image | images/s |", "|---|---|---|---|"]
    for name in ("plain", "pooled_off_the_shelf", "pooled_finetuned"):
        r = results[name]
        lines.append(f"| {name.replace('_', ' ')} | {r['accuracy']:.2f} | {r['gflops']:.4f} | {r['images_per_second']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
