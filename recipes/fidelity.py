#!/usr/bin/env python
"""Fidelity of each reducer to the plain model, at equal token schedules, on a whole test split.

    python recipes/fidelity.py --output_dir docs/results/fidelity            # the default suite
    python recipes/benchmark.py --suite fidelity --output_dir docs/results/fidelity   # the same

Accuracy differences between reducers drown in the noise of a 10k test split; agreement with the plain
model's own predictions and KL(plain || pooled) do not, because they are paired (the same image, with
and without pooling). Per row: top-1 agreement (%) with its standard error, mean KL with its standard
error, top-1, the true FLOPs ratio (hf_tokenpool.count_flops) and the patch tokens after each layer.

Schedules (--schedules), each one TokenPoolConfig:
    steps-K   three evenly spaced pooling steps keeping K at each (the default schedule), e.g. steps-0.5;
              for Swin: keep=K, every block computing on K of each window's tokens
    layer-K   pooling in every layer keeping K, e.g. layer-0.75
    r-R       ToMe's schedule: R fewer patch tokens in every layer, e.g. r-8 (64 -> 56 -> ... -> 16)
    flops-F   the default three steps at the keep that costs F of the plain model's FLOPs (target_flops=F)
With --official_tome, the official ToMe code (facebookresearch/ToMe on timm; not a dependency) runs every
schedule too, on a timm copy of each checkpoint (recipes/compare_official_tome.py, `timm_twin`; the logits
are checked equal) with `model.r` set to the patch tokens our `tome` removes in each layer: the same tokens.
Ablation variants (--variants, tokenpool only) change one thing of the default algorithm each; see
docs/fidelity.md for what was measured and what was kept.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoImageProcessor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import hf_tokenpool as tp  # noqa: E402
from hf_tokenpool.reducers import REDUCERS  # noqa: E402
from hf_tokenpool.reducers.tokenpool import tokenpool  # noqa: E402

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"
DEFAULT_SCHEDULES = ["steps-0.3", "steps-0.4", "steps-0.5", "steps-0.6", "r-4", "r-6", "r-8", "layer-0.75"]
# name -> (TokenPoolConfig settings, keyword arguments bound into the tokenpool function)
VARIANTS = {
    "default": ({}, {}),
    "init=significance": ({}, {"init": "significance"}),
    "metric=keys": ({"metric": "keys"}, {}),
    "size_weight": ({}, {"size_weighted": True}),
    "after_layer": ({"pool_location": "after_layer"}, {}),
    "no_proportional": ({"proportional_attention": False}, {}),
    "iterations=0": ({"iterations": 0}, {}),
    "iterations=1": ({"iterations": 1}, {}),
    "iterations=2": ({"iterations": 2}, {}),
    "v0.1": ({"pool_location": "after_layer", "metric": "tokens"}, {"init": "significance"}),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path", nargs="+", default=[str(CHECKPOINTS / "vit-tiny-fashion-mnist"),
                                                                str(CHECKPOINTS / "deit-tiny-fashion-mnist")])
    p.add_argument("--methods", nargs="*", default=["tokenpool", "kmeans", "tome", "topk"])
    p.add_argument("--schedules", nargs="+", default=DEFAULT_SCHEDULES)
    p.add_argument("--variants", nargs="*", default=[], choices=list(VARIANTS),
                   help="tokenpool ablation variants, each an extra row next to the methods")
    p.add_argument("--finetuned", nargs="*", default=[],
                   help="pooled models saved by recipes/finetune.py: each is compared with its plain model "
                        "(--model_name_or_path, one) instead of running the schedules")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="TokenPoolConfig setting for every method row (JSON value), e.g. pool_location=after_layer")
    p.add_argument("--official_tome", action="store_true",
                   help="also run the official ToMe code at every schedule (needs timm and ToMe installed)")
    p.add_argument("--dataset_name", default="fashion_mnist")
    p.add_argument("--eval_samples", type=int, default=None, help="default: the whole test split")
    p.add_argument("--batch_size", type=int, default=500)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--output_dir", default=None, help="write results.json, results.md and a plot here")
    args = p.parse_args(argv)
    if args.finetuned and len(args.model_name_or_path) != 1:
        p.error("--finetuned compares with one plain model: give exactly one --model_name_or_path")
    for s in args.schedules:
        try:  # fails early on a malformed name or value
            tp.TokenPoolConfig(**schedule_settings(s, 6))
        except ValueError as err:
            p.error(f"--schedules: {err}")
    if args.official_tome and args.finetuned:
        p.error("--official_tome runs the schedules; it does not apply to --finetuned models")
    args.options = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"--option takes KEY=VALUE, got {item!r}")
        try:
            args.options[key] = json.loads(value)
        except json.JSONDecodeError:
            args.options[key] = value
    try:
        tp.TokenPoolConfig(**args.options)
    except (TypeError, ValueError) as err:
        p.error(f"--option: {err}")
    return args


def schedule_settings(name: str, num_layers: int, num_patches: int = 64) -> dict:
    """A schedule name (see the module docstring) as TokenPoolConfig settings."""
    kind, _, value = name.partition("-")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"schedule {name!r}: expected steps-K, layer-K, r-R or flops-F") from None
    if kind == "steps":
        return {"keep": number}
    if kind == "flops":
        return {"target_flops": number}
    if kind == "layer":
        return {"schedule": [number] * num_layers}
    if kind == "r":
        keeps, n = [], num_patches
        for _ in range(num_layers):
            left = max(n - int(number), 1)
            keeps.append(left / n)
            n = left
        return {"schedule": keeps}
    raise ValueError(f"schedule {name!r}: expected steps-K, layer-K, r-R or flops-F")


@torch.no_grad()
def logits_of(model, pixels, batch_size) -> torch.Tensor:
    """Logits of a transformers classifier, or of a model that returns them as a tensor (timm's)."""
    outs = [model(pixel_values=pixels[i : i + batch_size]) for i in range(0, len(pixels), batch_size)]
    return torch.cat([getattr(out, "logits", out).float() for out in outs])


def compare(plain: torch.Tensor, pooled: torch.Tensor, labels: torch.Tensor) -> dict:
    """Paired fidelity of pooled logits to plain ones, with standard errors over the images."""
    n = len(labels)
    agree = (pooled.argmax(-1) == plain.argmax(-1)).float()
    kl = F.kl_div(pooled.log_softmax(-1), plain.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    p = agree.mean().item()
    return {"agreement": 100 * p, "agreement_se": 100 * math.sqrt(p * (1 - p) / n),
            "kl": kl.mean().item(), "kl_se": kl.std().item() / math.sqrt(n),
            "top1": 100 * (pooled.argmax(-1) == labels).float().mean().item(), "n": n}


@torch.no_grad()
def tokens_after_layers(model, one) -> list[int] | None:
    """Patch tokens after each layer (ViT/DeiT); None for Swin, which keeps its grid between blocks."""
    protected = tp.protected_tokens(model)
    if protected is None:
        return None
    out = model(pixel_values=one, output_hidden_states=True).hidden_states
    return [h.shape[1] - protected for h in out[1:]]


def bound_tokenpool(**kwargs):
    """Swap tokenpool's function for one with `kwargs` bound (an ablation); returns the undo."""
    saved = REDUCERS["tokenpool"].fn
    object.__setattr__(REDUCERS["tokenpool"], "fn", functools.partial(tokenpool, **kwargs))
    return lambda: object.__setattr__(REDUCERS["tokenpool"], "fn", saved)


def eval_split(path: str, args):
    from hf_tokenpool.data import load_image_dataset, to_pixel_values

    split = load_image_dataset(args.dataset_name)["test"]
    if args.eval_samples:
        split = split.select(range(min(args.eval_samples, len(split))))
    return to_pixel_values(split, AutoImageProcessor.from_pretrained(path))


def finetuned_rows(path: str, args) -> list[dict]:
    """Each fine-tuned pooled model against the plain model it was fine-tuned from."""
    pixels, labels = eval_split(path, args)
    model = tp.load_model(path).eval()
    plain, plain_flops = logits_of(model, pixels, args.batch_size), tp.count_flops(model, pixels[:1])
    name = Path(path).name
    rows = []
    for folder in args.finetuned:
        pooled_model = tp.from_pretrained(folder).eval()
        settings = pooled_model.config.token_pooling
        row = {"model": name, "method": settings["method"], "variant": "fine-tuned", "schedule": f"steps-{settings['keep']:g}",
               "options": settings, "finetuned": Path(folder).name,
               "flops_ratio": tp.count_flops(pooled_model, pixels[:1]) / plain_flops,
               **compare(plain, logits_of(pooled_model, pixels, args.batch_size), labels)}
        rows.append(row)
        print(f"{name} fine-tuned {Path(folder).name}: agree {row['agreement']:.2f} ± {row['agreement_se']:.2f}  "
              f"KL {row['kl']:.5f}  top-1 {row['top1']:.2f}", flush=True)
    return rows


def rows_for_model(path: str, args) -> list[dict]:
    model = tp.load_model(path).eval()
    pixels, labels = eval_split(path, args)
    plain = logits_of(model, pixels, args.batch_size)
    plain_flops = tp.count_flops(model, pixels[:1])
    num_layers = tp.num_layers(model)
    num_patches = (tokens_after_layers(model, pixels[:1]) or [0])[0]
    name = Path(path).name
    rows = [{"model": name, "method": "none", "variant": None, "schedule": "plain", "flops_ratio": 1.0,
             **compare(plain, plain, labels)}]
    runs = [(m, None) for m in args.methods] + [("tokenpool", v) for v in args.variants]
    for schedule in tqdm(args.schedules, desc=name):
        settings = schedule_settings(schedule, num_layers, num_patches)
        for method, variant in runs:
            config_settings, bound = VARIANTS[variant] if variant else (args.options, {})
            if method not in tp.ADAPTERS[model.config.model_type].methods:
                continue
            undo = bound_tokenpool(**bound) if bound else (lambda: None)
            try:
                tp.patch_model(model, method=method, **{**settings, **config_settings})
                started = time.perf_counter()
                pooled = logits_of(model, pixels, args.batch_size)
                seconds = time.perf_counter() - started
                row = {"model": name, "method": method, "variant": variant, "schedule": schedule,
                       "options": config_settings, "flops_ratio": tp.count_flops(model, pixels[:1]) / plain_flops,
                       "tokens": tokens_after_layers(model, pixels[:1]), "seconds": round(seconds, 1),
                       **compare(plain, pooled, labels)}
            finally:
                if tp.is_patched(model):
                    tp.unpatch_model(model)
                undo()
            rows.append(row)
            say(row)
        if args.official_tome and (row := official_tome_row(model, settings, pixels, labels, plain, args)):
            rows.append({"model": name, "schedule": schedule, **row})
            say(rows[-1])
    return rows


def say(row: dict) -> None:
    print(f"{row['model']} {row['schedule']:>11} {row['method']:>13} {row['variant'] or '':>16}  agree "
          f"{row['agreement']:.2f} ± {row['agreement_se']:.2f}  KL {row['kl']:.5f}  top-1 {row['top1']:.2f}  "
          f"FLOPs {row['flops_ratio']:.3f}  ({row['seconds']:.0f}s)", flush=True)


def official_tome_row(model, settings: dict, pixels, labels, plain: torch.Tensor, args) -> dict | None:
    """Official ToMe on a timm copy of `model`, removing in each layer the patch tokens our `tome` removes at
    `settings`; None (said) where it cannot: a model timm_twin does not convert, or a step that merges more than
    half a layer's tokens (ToMe's matching cannot)."""
    compare_official_tome = _sibling("compare_official_tome")
    timm, tome = compare_official_tome._import_contender()
    try:
        twin = compare_official_tome.timm_twin(model, timm)
    except ValueError as err:
        print(f"official ToMe skipped: {err}", flush=True)
        return None
    one = pixels[:1]
    tp.patch_model(model, method="tome", **settings)
    try:
        ours = tokens_after_layers(model, one)
    finally:
        tp.unpatch_model(model)
    plain_twin = compare_official_tome.PixelValues(compare_official_tome.timm_twin(model, timm))
    same = (logits_of(plain_twin, pixels[: args.batch_size], args.batch_size) - plain[: args.batch_size]).abs().max()
    if same > 1e-4:
        raise RuntimeError(f"the timm copy's logits differ from the model's by {same:.2e}")
    tome.patch.timm(twin)
    twin.r = [a - b for a, b in zip([twin.patch_embed.num_patches, *ours[:-1]], ours)]
    entering = compare_official_tome.tokens_entering([*twin.blocks, twin.norm], lambda: twin(one))
    official = [n - tp.protected_tokens(model) for n in entering[1:]]
    if official != ours:
        print(f"official ToMe cannot follow {ours} (it gives {official}): skipped", flush=True)
        return None
    wrapped = compare_official_tome.PixelValues(twin)
    started = time.perf_counter()
    pooled = logits_of(wrapped, pixels, args.batch_size)
    return {"method": "official ToMe", "variant": None, "options": {"r": twin.r}, "tokens": official,
            "flops_ratio": tp.count_flops(wrapped, one) / tp.count_flops(plain_twin, one),
            "seconds": round(time.perf_counter() - started, 1), **compare(plain, pooled, labels)}


def _sibling(name: str):
    """A sibling script of this one (recipes/<name>.py), imported as a module."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    return __import__(name)


def label(r) -> str:
    return r["method"] + (f" [{r['variant']}]" if r["variant"] else "")


def markdown(rows) -> str:
    """One table per model: a row per schedule, a column per method/variant (agreement % / KL)."""
    text = ""
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model and r["method"] != "none"]
        cols = list(dict.fromkeys(label(r) for r in mine))
        text += f"**{model}**: top-1 agreement with the plain model (%) / mean KL(plain || pooled)\n\n"
        text += f"| schedule | FLOPs ratio | {' | '.join(cols)} |\n|---|---|{'---|' * len(cols)}\n"
        for schedule in dict.fromkeys(r["schedule"] for r in mine):
            cells = {label(r): r for r in mine if r["schedule"] == schedule}
            best_kl = min(r["kl"] for r in cells.values())
            ratio = cells[next(iter(cells))]["flops_ratio"]
            text += f"| {schedule} | {ratio:.3f} | " + " | ".join(
                (f"**{cells[c]['agreement']:.2f} / {cells[c]['kl']:.5f}**" if cells[c]["kl"] == best_kl else
                 f"{cells[c]['agreement']:.2f} / {cells[c]['kl']:.5f}") if c in cells else "–" for c in cols) + " |\n"
        se = max(r["agreement_se"] for r in mine)
        text += f"\nStandard errors: agreement at most ±{se:.2f} points; every row on {mine[0]['n']} images.\n\n"
    return text


def plot(rows, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(4.6 * len(models), 3.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model and r["method"] != "none"]
        for i, col in enumerate(dict.fromkeys(label(r) for r in mine)):
            pts = sorted((r["flops_ratio"], r["agreement"]) for r in mine if label(r) == col)
            ax.plot(*zip(*pts), "o", color=f"C{i}", label=col, ms=4)
        ax.set(title=model, xlabel="FLOPs ratio (pooled / plain)", ylabel="top-1 agreement with plain (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "agreement_vs_flops.png", dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    if args.official_tome:
        _sibling("compare_official_tome")._import_contender()  # says what to install before any work
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rows = []
    for path in args.model_name_or_path:
        rows += finetuned_rows(path, args) if args.finetuned else rows_for_model(path, args)
    meta = {"command": " ".join(["python", "recipes/fidelity.py", *(argv if argv is not None else sys.argv[1:])]),
            "threads": args.threads, "torch": torch.__version__,
            "wall_minutes": (time.perf_counter() - started) / 60}
    text = markdown(rows)
    print(text)
    if args.output_dir:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        (out / "results.md").write_text(f"Command: `{meta['command']}` ({meta['wall_minutes']:.1f} min, "
                                        f"{args.threads} threads)\n\n{text}")
        plot(rows, out)
    return rows


if __name__ == "__main__":
    main()
