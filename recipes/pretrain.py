#!/usr/bin/env python
"""Pretrain a tiny ViT, DeiT (distilled), Swin, DINOv2, CLIP-vision or SigLIP on Fashion-MNIST, with accelerate.

The checkpoints in recipes/checkpoints/ were made with this script on a 2-core CPU; their model
cards hold the exact commands. Follows transformers' run_image_classification_no_trainer.py:
parse_args() validates up front, main() reads top to bottom.

Example:
    accelerate launch recipes/pretrain.py --model_type vit --output_dir recipes/checkpoints/vit-tiny-fashion-mnist
    accelerate launch recipes/pretrain.py --model_type deit --teacher recipes/checkpoints/vit-tiny-fashion-mnist \
        --output_dir recipes/checkpoints/deit-tiny-fashion-mnist

Speed: the whole split is turned once into a uint8 tensor by the image processor's own resize
(hf_tokenpool.data.to_uint8_pixels), augmented per batch on tensors and normalised with the
processor's mean/std, so training sees exactly what `pipeline("image-classification")` feeds the
saved model. `evaluate.load("accuracy")` needs the Hub, so accuracy is counted with
gather_for_metrics and torch.
"""

import argparse
import json
import logging
import math
import os
import shlex
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
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm
from transformers import (
    AutoModelForImageClassification,
    CLIPConfig,
    CLIPForImageClassification,
    DeiTConfig,
    DeiTForImageClassificationWithTeacher,
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersForImageClassification,
    SiglipConfig,
    SiglipForImageClassification,
    SwinConfig,
    SwinForImageClassification,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
    get_scheduler,
)

# Import from the checkout without installing it.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hf_tokenpool.data import (  # noqa: E402
    FASHION_MNIST_MEAN,
    FASHION_MNIST_NAMES,
    FASHION_MNIST_STD,
    load_image_dataset,
    normalize_pixels,
    to_uint8_pixels,
)

logger = get_logger(__name__)

MODEL_TYPES = ("vit", "deit", "swin", "dinov2", "dinov2_with_registers", "clip", "siglip")
# Families that --init_from can start from a vit checkpoint (the same encoder under their names).
FROM_VIT = ("deit", "dinov2", "dinov2_with_registers", "clip", "siglip")
IMAGE_SIZE = 32


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_type", choices=MODEL_TYPES, required=True)
    parser.add_argument("--output_dir", type=str, required=True, help="Final folder; written aside, then moved in.")
    parser.add_argument("--dataset_name", type=str, default="fashion_mnist",
                        help="Anything hf_tokenpool.data.load_image_dataset accepts; needs train and test splits.")
    parser.add_argument("--teacher", type=str, default=None,
                        help="Checkpoint folder of the teacher for DeiT hard-label distillation (deit only, required).")
    parser.add_argument("--init_from", type=str, default=None,
                        help="Start from this checkpoint's weights instead of random init: a checkpoint of the same "
                             "model_type (continue training), or a vit checkpoint for deit (encoder copied; the "
                             "distillation token and head start as copies of the class token and head).")
    parser.add_argument("--num_train_epochs", type=float, default=2.0,
                        help="Used when --max_train_steps is not given.")
    parser.add_argument("--max_train_steps", type=int, default=None, help="Overrides --num_train_epochs.")
    parser.add_argument("--per_device_train_batch_size", type=int, default=64)
    parser.add_argument("--per_device_eval_batch_size", type=int, default=500)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--weight_decay", type=float, default=0.05)
    parser.add_argument("--lr_scheduler_type", type=str, default="cosine")
    parser.add_argument("--num_warmup_steps", type=int, default=150)
    parser.add_argument("--label_smoothing", type=float, default=0.1)
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    parser.add_argument("--random_crop_padding", type=int, default=0,
                        help="Pixels of zero padding for random-crop augmentation (0: no crop).")
    parser.add_argument("--no_hflip", action="store_true", help="Switch off random horizontal flips.")
    parser.add_argument("--num_hidden_layers", type=int, default=6, help="Depth of the plain ViTs (all but swin; >= 6).")
    parser.add_argument("--num_register_tokens", type=int, default=4, help="Register tokens of dinov2_with_registers.")
    parser.add_argument("--max_train_samples", type=int, default=None, help="Train on a prefix (quick probes).")
    parser.add_argument("--max_eval_samples", type=int, default=None, help="Evaluate on a prefix (quick probes).")
    parser.add_argument("--logging_steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)

    if args.model_type == "deit" and not args.teacher:
        parser.error("--model_type deit needs --teacher (a checkpoint folder)")
    if args.model_type != "deit" and args.teacher:
        parser.error("--teacher is only used by --model_type deit")
    if args.teacher and not Path(args.teacher, "config.json").is_file():
        parser.error(f"--teacher {args.teacher!r} is not a checkpoint folder (no config.json)")
    if args.init_from:
        config_file = Path(args.init_from, "config.json")
        if not config_file.is_file():
            parser.error(f"--init_from {args.init_from!r} is not a checkpoint folder (no config.json)")
        source_type = json.loads(config_file.read_text())["model_type"]
        if source_type != args.model_type and not (source_type == "vit" and args.model_type in FROM_VIT):
            parser.error(f"--init_from is a {source_type} checkpoint; it can start {source_type} (a vit checkpoint "
                         f"can also start {', '.join(FROM_VIT)}), not {args.model_type}")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        parser.error("--max_train_steps must be >= 1")
    if args.num_train_epochs <= 0:
        parser.error("--num_train_epochs must be > 0")
    if args.learning_rate <= 0 or args.weight_decay < 0 or not 0 <= args.label_smoothing < 1:
        parser.error("need --learning_rate > 0, --weight_decay >= 0, 0 <= --label_smoothing < 1")
    if args.num_hidden_layers < 6:
        parser.error("--num_hidden_layers must be >= 6")
    if args.num_register_tokens < 0:
        parser.error("--num_register_tokens must be >= 0")
    if not 0 <= args.random_crop_padding <= 8:
        parser.error("--random_crop_padding must be in [0, 8]")
    return args


def build_model(args, id2label):
    label2id = {name: i for i, name in id2label.items()}
    common = dict(num_channels=3, image_size=IMAGE_SIZE, id2label=id2label, label2id=label2id)
    # Every plain ViT family has the same shape: 8x8 = 64 patch tokens (+ CLS, distillation, registers).
    shape = dict(hidden_size=192, num_hidden_layers=args.num_hidden_layers, num_attention_heads=3, patch_size=4)
    if args.model_type == "vit":
        return ViTForImageClassification(ViTConfig(**shape, intermediate_size=768, **common))
    if args.model_type == "deit":
        return DeiTForImageClassificationWithTeacher(DeiTConfig(**shape, intermediate_size=768, **common))
    if args.model_type == "dinov2":  # layer scale starts at 1: a vit checkpoint maps onto it exactly
        return Dinov2ForImageClassification(Dinov2Config(**shape, mlp_ratio=4, layerscale_value=1.0, **common))
    if args.model_type == "dinov2_with_registers":
        return Dinov2WithRegistersForImageClassification(Dinov2WithRegistersConfig(
            **shape, mlp_ratio=4, layerscale_value=1.0, num_register_tokens=args.num_register_tokens, **common))
    if args.model_type in ("clip", "siglip"):  # vision tower + classifier on the mean of the patch tokens
        vision = dict(**shape, intermediate_size=768, hidden_act="gelu", num_channels=3, image_size=IMAGE_SIZE)
        config_class, model_class = ((CLIPConfig, CLIPForImageClassification) if args.model_type == "clip"
                                     else (SiglipConfig, SiglipForImageClassification))
        return model_class(config_class(vision_config=vision, id2label=id2label, label2id=label2id))
    # Swin: patch 2 -> 16x16 = 256 tokens, 16 windows of 4x4 in stage 1; 8x8 (4 windows) in stage 2;
    # 4x4 (one window) in stage 3. About the ViT's cost per image: each stage ~56M multiply-adds.
    config = SwinConfig(patch_size=2, embed_dim=96, depths=[2, 2, 2], num_heads=[3, 6, 12], window_size=4, **common)
    return SwinForImageClassification(config)


def load_init_weights(model, args):
    """Copy --init_from's weights into the freshly built model; every parameter must be covered, except
    the parts a vit has no counterpart for (listed in the log)."""
    source = AutoModelForImageClassification.from_pretrained(args.init_from).state_dict()
    if source.keys() == model.state_dict().keys():
        model.load_state_dict(source)
        return
    if args.model_type != "deit":
        mapped = vit_weights_as(args.model_type, source)
        target = model.state_dict()
        missing = set(mapped) - set(target)
        if missing:
            raise ValueError(f"vit -> {args.model_type}: names not in the new model: {sorted(missing)}")
        fresh = sorted(set(target) - set(mapped))
        logger.info(f"vit -> {args.model_type}: {len(mapped)} tensors copied; fresh init for {fresh}")
        model.load_state_dict({**target, **mapped}, strict=True)
        return
    # vit -> deit: same encoder under another prefix; the distillation token, its position and its head
    # start as copies of the class token's, so that the two heads agree at step 0.
    mapped = {("deit." + k[len("vit."):] if k.startswith("vit.") else k): v for k, v in source.items()}
    mapped["deit.embeddings.distillation_token"] = mapped["deit.embeddings.cls_token"].clone()
    pos = mapped["deit.embeddings.position_embeddings"]
    mapped["deit.embeddings.position_embeddings"] = torch.cat([pos[:, :1], pos[:, :1], pos[:, 1:]], dim=1)
    for head in ("cls_classifier", "distillation_classifier"):
        for part in ("weight", "bias"):
            mapped[f"{head}.{part}"] = mapped[f"classifier.{part}"].clone()
    del mapped["classifier.weight"], mapped["classifier.bias"]
    model.load_state_dict(mapped, strict=True)


# vit layer parameter names -> each family's, by prefix (first match wins)
_LAYER_NAMES = {
    "dinov2": (("layernorm_before", "norm1"), ("layernorm_after", "norm2"), ("", "")),
    "clip": (("attention.o_proj", "self_attn.out_proj"), ("attention.", "self_attn."),
             ("layernorm_before", "layer_norm1"), ("layernorm_after", "layer_norm2"), ("", "")),
}


def vit_weights_as(model_type, source):
    """A vit state_dict under dinov2 / dinov2_with_registers / clip / siglip names (same shape as built by
    build_model). What has no vit counterpart keeps its fresh init: DINOv2's registers, mask token and
    layer scale (1.0), CLIP's pre-layernorm, SigLIP's attention-pooling head. Where the names differ but the
    function is the same the copy is exact: CLIP's bias-free patch embedding gets the bias folded into the
    patch positions; SigLIP has no CLS, so its positions are the vit's patch positions; DINOv2's classifier
    reads [CLS, patch mean] and starts with zero weights on the patch mean."""
    family = "dinov2" if model_type.startswith("dinov2") else "clip"
    prefix = {"dinov2": "dinov2.", "dinov2_with_registers": "dinov2_with_registers.",
              "clip": "vision_model.", "siglip": "vision_model."}[model_type]
    layers = prefix + ("encoder.layer." if family == "dinov2" else "encoder.layers.")
    out = {}
    for key, value in source.items():
        if key.startswith("vit.layers."):
            index, rest = key[len("vit.layers."):].split(".", 1)
            old, new = next(pair for pair in _LAYER_NAMES[family] if rest.startswith(pair[0]))
            out[f"{layers}{index}.{new}{rest[len(old):]}"] = value
    cls, pos = source["vit.embeddings.cls_token"], source["vit.embeddings.position_embeddings"]
    weight, bias = (source[f"vit.embeddings.patch_embeddings.projection.{p}"] for p in ("weight", "bias"))
    final = {f"{prefix}{'layernorm' if family == 'dinov2' else 'post_layernorm'}.{p}": source[f"vit.layernorm.{p}"]
             for p in ("weight", "bias")}
    out.update(final)
    if family == "dinov2":
        out.update({f"{prefix}embeddings.cls_token": cls, f"{prefix}embeddings.position_embeddings": pos,
                    f"{prefix}embeddings.patch_embeddings.projection.weight": weight,
                    f"{prefix}embeddings.patch_embeddings.projection.bias": bias,
                    "classifier.weight": torch.cat([source["classifier.weight"],
                                                    torch.zeros_like(source["classifier.weight"])], dim=1),
                    "classifier.bias": source["classifier.bias"]})
    elif model_type == "clip":
        out.update({f"{prefix}embeddings.class_embedding": cls[0, 0],
                    f"{prefix}embeddings.patch_embedding.weight": weight,
                    f"{prefix}embeddings.position_embedding.weight": torch.cat([pos[0, :1], pos[0, 1:] + bias]),
                    "classifier.weight": source["classifier.weight"], "classifier.bias": source["classifier.bias"]})
    else:
        out.update({f"{prefix}embeddings.patch_embedding.weight": weight,
                    f"{prefix}embeddings.patch_embedding.bias": bias,
                    f"{prefix}embeddings.position_embedding.weight": pos[0, 1:],
                    "classifier.weight": source["classifier.weight"], "classifier.bias": source["classifier.bias"]})
    return out


def augment(pixels, generator, padding, hflip):
    """Random crop from a zero-padded image and random horizontal flip, on uint8 [B, C, H, W]."""
    batch, _, height, width = pixels.shape
    if padding:
        padded = F.pad(pixels, (padding,) * 4)  # 0 = black, the Fashion-MNIST background
        dy = torch.randint(0, 2 * padding + 1, (batch, 1, 1, 1), generator=generator)
        dx = torch.randint(0, 2 * padding + 1, (batch, 1, 1, 1), generator=generator)
        pixels = _crop(padded, dy, dx, height, width)
    if hflip:
        flip = torch.rand(batch, generator=generator) < 0.5
        pixels = torch.where(flip.view(-1, 1, 1, 1), pixels.flip(-1), pixels)
    return pixels


def _crop(padded, dy, dx, height, width):
    batch, channels = padded.shape[:2]
    rows = dy.view(batch, 1, 1, 1) + torch.arange(height).view(1, 1, height, 1)
    cols = dx.view(batch, 1, 1, 1) + torch.arange(width).view(1, 1, 1, width)
    b = torch.arange(batch).view(batch, 1, 1, 1)
    c = torch.arange(channels).view(1, channels, 1, 1)
    return padded[b, c, rows, cols]


def evaluate_accuracy(model, dataloader, accelerator, image_processor):
    model.eval()
    correct = total = 0
    for pixels, labels in dataloader:
        with torch.no_grad():
            logits = model(pixel_values=normalize_pixels(pixels, image_processor)).logits
        predictions, references = accelerator.gather_for_metrics((logits.argmax(-1), labels))
        correct += (predictions == references).sum().item()
        total += references.numel()
    model.train()
    return correct / total


def write_model_card(folder, args, results, command, id2label):
    teacher_line = ""
    if args.init_from and not results["history"]:
        teacher_line += f"\nInitialised from the checkpoint `{args.init_from}` (see its model card).\n"
    if args.model_type == "deit":
        teacher_line += (f"\nDistilled (DeiT hard-label distillation: 0.5 * CE(cls_logits, y) + 0.5 * "
                        f"CE(distillation_logits, argmax teacher)) from the teacher `{args.teacher}`.\n")
    source_type = (json.loads(Path(args.init_from, "config.json").read_text())["model_type"]
                   if args.init_from else None)
    if source_type == "vit" and args.model_type not in ("vit", "deit"):
        origin = ("starting from the project's own self-pretrained ViT checkpoint: the ViT's weights were mapped "
                  f"onto {results['architecture']}'s names (recipes/pretrain.py `vit_weights_as`; what a ViT has no "
                  "counterpart for started fresh), then trained as this architecture")
    else:
        origin = "from random initialisation" if not args.init_from and not results["history"] else \
            "from random initialisation, in the runs listed below"
    card_data = ModelCardData(
        library_name="transformers",
        license="apache-2.0",
        datasets=["fashion_mnist"],
        metrics=["accuracy"],
        pipeline_tag="image-classification",
        tags=sorted(["hf_tokenpool", "image-classification", args.model_type, "fashion-mnist", "tiny"]),
    )
    content = f"""---
{card_data.to_yaml()}
---

# {Path(args.output_dir).name}

A tiny `{results["architecture"]}` ({results["num_parameters"] / 1e6:.2f}M parameters, 32x32 RGB input)
**self-pretrained on Fashion-MNIST {origin}** by hf_tokenpool's
`recipes/pretrain.py`. It is **not** an ImageNet model and was never trained on anything but the
60000 Fashion-MNIST training images. It exists so that hf_tokenpool's tests, recipes and
benchmarks have a real, trained checkpoint of each architecture without network access.
{teacher_line}
| | |
|---|---|
| top-1 accuracy, Fashion-MNIST test split (10000 images) | **{results["test_accuracy"] * 100:.2f}%** |
| training time | {results["train_minutes"] + sum(h["train_minutes"] for h in results["history"]):.1f} min in all on a shared 2-core CPU (fp32, AMD EPYC, no GPU) |
| optimiser steps (last run) | {results["train_steps"]} (batch {args.per_device_train_batch_size}, {results["epochs_seen"]:.2f} epochs) |
| seed | {args.seed} |

{history_text(args, results)}

Recipe: AdamW (lr {args.learning_rate}, weight decay {args.weight_decay}), {args.num_warmup_steps} linear
warm-up steps then {args.lr_scheduler_type} decay, label smoothing {args.label_smoothing}, gradient clipping
{args.max_grad_norm}, augmentation: {"random horizontal flip" if not args.no_hflip else "none"}
{f"+ random crop with {args.random_crop_padding} px padding" if args.random_crop_padding else ""}.

Inputs: grayscale images converted to RGB (`image.convert("RGB")`); the saved `ViTImageProcessor`
resizes 28x28 to 32x32 (bilinear) and normalises with the Fashion-MNIST mean/std
({FASHION_MNIST_MEAN}/{FASHION_MNIST_STD}) on all three channels.

```python
from transformers import pipeline
classifier = pipeline("image-classification", model="{folder_hint(args)}")
classifier(image.convert("RGB"))
```

Labels: {", ".join(id2label[i] for i in range(len(id2label)))}.
"""
    ModelCard(content).save(os.path.join(folder, "README.md"))


def history_text(args, results):
    """The exact commands, oldest first: the random-init run and any run that continued from it."""
    runs = results["history"] + [{k: results[k] for k in ("command", "test_accuracy", "train_minutes", "train_steps")}]
    lines = []
    if len(runs) > 1:
        lines.append("Made by these runs of `recipes/pretrain.py`, in order (each later one starts from the "
                     "checkpoint the one before wrote, `--init_from`; the first starts from random init):\n")
    else:
        lines.append("Made with (from random init):\n")
    for i, run in enumerate(runs, 1):
        lines.append(f"{i}. {run['train_steps']} steps, {run['train_minutes']:.1f} min, test accuracy "
                     f"{run['test_accuracy'] * 100:.2f}% after it:\n\n   ```bash\n   {run['command']}\n   ```\n")
    return "\n".join(lines)


def folder_hint(args):
    return args.output_dir


def main(argv=None):
    args = parse_args(argv)
    command = "python recipes/pretrain.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))

    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
                        datefmt="%H:%M:%S", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_warning()
    else:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
    set_seed(args.seed)

    # Dataset.
    dataset = load_image_dataset(args.dataset_name)
    for split in ("train", "test"):
        if split not in dataset:
            raise ValueError(f"{args.dataset_name!r} has splits {list(dataset)}; this recipe needs train and test")
    label_names = dataset["train"].features["label"].names
    id2label = dict(enumerate(label_names))
    if args.max_train_samples:
        dataset["train"] = dataset["train"].select(range(min(args.max_train_samples, len(dataset["train"]))))
    if args.max_eval_samples:
        dataset["test"] = dataset["test"].select(range(min(args.max_eval_samples, len(dataset["test"]))))

    # Transforms: the image processor that is saved with the model; the tensors come from its own resize.
    if args.dataset_name.lower() in FASHION_MNIST_NAMES:
        mean, std = [FASHION_MNIST_MEAN] * 3, [FASHION_MNIST_STD] * 3
    else:
        mean, std = [0.5] * 3, [0.5] * 3
    image_processor = ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_resize=True,
                                        do_rescale=True, do_normalize=True, image_mean=mean, image_std=std)
    with accelerator.main_process_first():
        train_pixels = to_uint8_pixels(dataset["train"], image_processor)
        test_pixels = to_uint8_pixels(dataset["test"], image_processor)
    train_labels = torch.tensor(dataset["train"]["label"], dtype=torch.long)
    test_labels = torch.tensor(dataset["test"]["label"], dtype=torch.long)

    # DataLoaders (uint8 tensors; augmentation and normalisation happen per batch in the loop).
    loader_generator = torch.Generator().manual_seed(args.seed)
    train_dataloader = DataLoader(TensorDataset(train_pixels, train_labels), shuffle=True, drop_last=True,
                                  batch_size=args.per_device_train_batch_size, generator=loader_generator)
    eval_dataloader = DataLoader(TensorDataset(test_pixels, test_labels), batch_size=args.per_device_eval_batch_size)

    # Model (random init), teacher.
    model = build_model(args, id2label)
    history = []
    if args.init_from:
        load_init_weights(model, args)
        previous = Path(args.init_from, "all_results.json")
        if previous.is_file():
            earlier = json.loads(previous.read_text())
            history = earlier.get("history", []) + [{k: earlier[k] for k in ("command", "test_accuracy", "train_minutes", "train_steps")}]
    teacher = None
    if args.teacher:
        teacher = AutoModelForImageClassification.from_pretrained(args.teacher)
        if teacher.config.num_labels != len(label_names):
            raise ValueError(f"teacher {args.teacher} has {teacher.config.num_labels} labels, dataset {len(label_names)}")
        teacher.requires_grad_(False).eval()

    # Optimizer: no weight decay on biases, norms, embeddings/tokens.
    no_decay = ("bias", "layernorm", "layer_norm", "layrnorm", "norm", "cls_token", "distillation_token",
                "position_embedding", "relative_position_bias_table", "register_tokens", "class_embedding",
                "lambda1", "probe")
    params = list(model.named_parameters())
    grouped = [
        {"params": [p for n, p in params if not any(k in n.lower() for k in no_decay)], "weight_decay": args.weight_decay},
        {"params": [p for n, p in params if any(k in n.lower() for k in no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(grouped, lr=args.learning_rate)

    # Scheduler and math around the number of training steps.
    num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = math.ceil(args.num_train_epochs * num_update_steps_per_epoch)
    lr_scheduler = get_scheduler(args.lr_scheduler_type, optimizer=optimizer,
                                 num_warmup_steps=args.num_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes)

    model, optimizer, train_dataloader, eval_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader, lr_scheduler)
    if teacher is not None:
        teacher = teacher.to(accelerator.device)
    num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    num_epochs = math.ceil(args.max_train_steps / num_update_steps_per_epoch)

    # Train.
    total_batch_size = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running training *****")
    logger.info(f"  Model = {args.model_type}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    logger.info(f"  Num examples = {len(train_labels)}, epochs = {num_epochs}, total batch size = {total_batch_size}")
    logger.info(f"  Total optimization steps = {args.max_train_steps}")
    progress_bar = tqdm(range(args.max_train_steps), disable=not accelerator.is_local_main_process, mininterval=30)
    augment_generator = torch.Generator().manual_seed(args.seed + 1)
    completed_steps = 0
    start = time.time()
    running = {"loss": 0.0, "correct": 0, "seen": 0}
    model.train()
    for epoch in range(num_epochs):
        for pixels, labels in train_dataloader:
            with accelerator.accumulate(model):
                pixels = augment(pixels, augment_generator, args.random_crop_padding, not args.no_hflip)
                pixel_values = normalize_pixels(pixels, image_processor).to(accelerator.device)
                outputs = model(pixel_values=pixel_values)
                if teacher is None:
                    logits = outputs.logits
                    loss = F.cross_entropy(logits, labels, label_smoothing=args.label_smoothing)
                else:
                    # DeiT hard-label distillation (Touvron et al. 2021, eq. 3): the class token learns the
                    # labels, the distillation token learns the teacher's argmax.
                    with torch.no_grad():
                        teacher_labels = teacher(pixel_values=pixel_values).logits.argmax(-1)
                    logits = outputs.logits  # mean of the two heads, what inference uses
                    loss = 0.5 * F.cross_entropy(outputs.cls_logits, labels, label_smoothing=args.label_smoothing) \
                        + 0.5 * F.cross_entropy(outputs.distillation_logits, teacher_labels)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            running["loss"] += loss.item() * labels.numel()
            running["correct"] += (logits.argmax(-1) == labels).sum().item()
            running["seen"] += labels.numel()
            if accelerator.sync_gradients:
                progress_bar.update(1)
                completed_steps += 1
                if completed_steps % args.logging_steps == 0 or completed_steps == args.max_train_steps:
                    elapsed = time.time() - start
                    logger.info(f"step {completed_steps}/{args.max_train_steps} epoch {epoch} "
                                f"loss {running['loss'] / running['seen']:.4f} "
                                f"train_acc {running['correct'] / running['seen']:.4f} "
                                f"lr {lr_scheduler.get_last_lr()[0]:.2e} elapsed {elapsed / 60:.1f} min "
                                f"({completed_steps * total_batch_size / elapsed:.0f} img/s)")
                    running = {"loss": 0.0, "correct": 0, "seen": 0}
            if completed_steps >= args.max_train_steps:
                break
        if completed_steps >= args.max_train_steps:
            break
    train_minutes = (time.time() - start) / 60

    # Evaluate.
    accuracy = evaluate_accuracy(model, eval_dataloader, accelerator, image_processor)
    logger.info(f"test accuracy {accuracy:.4f} on {len(test_labels)} images, trained {train_minutes:.1f} min")

    # Save: write aside in the same parent, then move into place.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        output_dir = Path(args.output_dir)
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # it becomes output_dir: a normal folder, not mkdtemp's private 0700
    else:
        staging = None
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        unwrapped.save_pretrained(staging, is_main_process=accelerator.is_main_process,
                                  save_function=accelerator.save, safe_serialization=True)
        image_processor.save_pretrained(staging)
        results = {
            "test_accuracy": accuracy,
            "test_samples": len(test_labels),
            "train_minutes": train_minutes,
            "train_steps": completed_steps,
            "epochs_seen": completed_steps * total_batch_size / len(train_labels),
            "architecture": type(unwrapped).__name__,
            "num_parameters": sum(p.numel() for p in unwrapped.parameters()),
            "seed": args.seed,
            "teacher": args.teacher,
            "command": command,
            "init_from": args.init_from,
            "history": history,  # earlier runs this one started from, oldest first
        }
        with open(staging / "all_results.json", "w") as f:
            json.dump(results, f, indent=2)
        write_model_card(staging, args, results, command, id2label)
        old = None
        if output_dir.exists():
            old = output_dir.with_name(f".{output_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(output_dir, old)
        os.replace(staging, output_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        logger.info(f"saved {output_dir}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
