#!/usr/bin/env python
"""Accuracy, FLOPs and speed of every reducer and keep ratio, side by side with the plain model.

    python recipes/benchmark.py                       # the default sweep: both suites below, every method,
                                                      # keep 0.5-0.8 and FLOPs budgets 0.5-0.7 (tokenpool)
    python recipes/benchmark.py --suite shapes        # random-init standard shapes of every family (cost)
    python recipes/benchmark.py --suite checkpoints   # the embedded Fashion-MNIST checkpoints (accuracy + cost)
    python recipes/benchmark.py --model_name_or_path google/vit-base-patch16-224 --keeps 0.6

Per row: GFLOPs per image (torch.utils.flop_counter, attention counted on every device), images/s and
the speed-up over the plain model (warm-up, then plain and pooled batches timed alternately, the median
of the repeats with its min-max; fixed thread count; CUDA-synchronised on a GPU; run it on an otherwise
idle machine), the share of forward time spent in the reducers, peak GPU memory
(GPU only), and top-1 on the test split for checkpoints. Results go to --output_dir as JSON and a
Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import (
    AutoImageProcessor,
    BeitConfig,
    BeitForImageClassification,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    DeiTConfig,
    DeiTForImageClassificationWithTeacher,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    SiglipVisionConfig,
    SiglipVisionModel,
    SwinConfig,
    SwinForImageClassification,
    Swinv2Config,
    Swinv2ForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import hf_tokenpool as tp  # noqa: E402
from hf_tokenpool.reducers import REDUCERS, PoolResult, Reducer  # noqa: E402

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"
# Standard shapes, random init: what the cost numbers are about.
_B16 = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, patch_size=16,
            image_size=224)
_DINO_S14 = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, patch_size=14,
                 image_size=518)  # 37 x 37 = 1369 patches
SHAPES = {
    "deit-s16-224": lambda: DeiTForImageClassificationWithTeacher(
        DeiTConfig(hidden_size=384, num_attention_heads=6, intermediate_size=1536, num_labels=1000)),
    "vit-b16-224": lambda: ViTForImageClassification(ViTConfig(num_labels=1000)),
    "swin-t-224": lambda: SwinForImageClassification(SwinConfig(num_labels=1000)),
    "clip-b16-224": lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**_B16, projection_dim=512)),
    "siglip-b16-224": lambda: SiglipVisionModel(SiglipVisionConfig(**_B16)),  # no CLS; attention-pooling head
    "dinov2-s14-518": lambda: Dinov2Model(Dinov2Config(**_DINO_S14)),
    "dinov2-reg-s14-518": lambda: Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**_DINO_S14,
                                                                                      num_register_tokens=4)),
    "beit-b16-224": lambda: BeitForImageClassification(BeitConfig(  # as microsoft/beit-base-patch16-224
        use_relative_position_bias=True, use_mean_pooling=True, layer_scale_init_value=0.1, num_labels=1000)),
    "swinv2-t-256": lambda: Swinv2ForImageClassification(Swinv2Config(image_size=256, window_size=8, num_labels=1000)),
}
METHODS = ("none", "tokenpool", "kmeans", "tome", "topk")
FLOOR = "floor"  # a reference row, not a method: see floor_model


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=["all", "shapes", "checkpoints", "reducer_cost", "compile", "fidelity",
                                            "none"],
                        default="all", help="all: checkpoints and shapes; reducer_cost: the reducers' FLOPs at "
                        "196-4096 tokens; compile: torch.compile time, graph breaks and speed of each method on the "
                        "checkpoints; fidelity: recipes/fidelity.py's suite; none: only --model_name_or_path")
    parser.add_argument("--shapes", nargs="+", default=None, choices=sorted(SHAPES),
                        help="only these standard shapes (suite shapes/all); default: all of them")
    parser.add_argument("--model_name_or_path", action="append", default=[],
                        help="extra model(s): Hub id or local folder (repeatable)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS[1:]), choices=METHODS[1:])
    parser.add_argument("--keeps", nargs="*", type=float, default=[0.5, 0.6, 0.7, 0.8])
    parser.add_argument("--target_flops", nargs="*", type=float, default=[0.5, 0.6, 0.7],
                        help="also rows solved to these FLOPs budgets (fractions of the plain model)")
    parser.add_argument("--floor", action="store_true",
                        help="also a 'floor' row per keep and schedule: the same token counts with no reducer at all "
                        "(each pooling layer keeps its first k tokens, SDPA, no proportional attention; Swin: each "
                        "window's first k-1 tokens alone and the rest in one cluster, pooled, computed and unpooled as "
                        "the methods are), the most any method could gain on this machine at that schedule")
    parser.add_argument("--compile", action="store_true",
                        help="time torch.compile(fullgraph=True) of the plain and of every pooled model against each "
                        "other (static shapes, one graph per batch size; the reducer share is then not measured)")
    parser.add_argument("--budget_methods", nargs="*", default=["tokenpool"], choices=METHODS[1:],
                        help="methods that get the --target_flops rows (the others compare at equal keep)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="extra TokenPoolConfig setting for every pooled row, e.g. output=medoid, "
                             "proportional_attention=false or schedule=[0.6,0.6,1] (repeatable)")
    parser.add_argument("--schedules", nargs="*", default=[],
                        help="also rows at these named schedules for every method: steps-K, layer-K or r-R "
                             "(R fewer patch tokens in every layer, ToMe's schedule); see recipes/fidelity.py")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[8, 1],
                        help="speed is measured at each (the first is the one in the summary tables)")
    parser.add_argument("--repeats", type=int, default=7,
                        help="timed forwards per model and batch size, plain and pooled alternating (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed forwards per row before timing")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--eval_samples", type=int, default=2000,
                        help="test images for top-1 (checkpoints; the first N of the 10k test split)")
    parser.add_argument("--dataset_name", default="fashion_mnist")
    parser.add_argument("--output_dir", default=None, help="write results.json, results.md and plots here")
    parser.add_argument("--finetune", action="store_true",
                        help="checkpoints: also top-1 after the recipe's short fine-tune of each pooled row")
    parser.add_argument("--finetune_steps", type=int, default=300)
    parser.add_argument("--finetune_keeps", nargs="+", type=float, default=None,
                        help="keeps to fine-tune (default: all --keeps)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if any(not 0 < k <= 1 for k in args.keeps):
        parser.error(f"--keeps must be in (0, 1], got {args.keeps}")
    if any(not 0 < t <= 1 for t in args.target_flops):
        parser.error(f"--target_flops must be in (0, 1], got {args.target_flops}")
    args.options = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--option takes KEY=VALUE, got {item!r}")
        try:  # numbers, true/false, lists such as schedule=[0.6,0.6,1]
            args.options[key] = json.loads(value.lower() if value.lower() in ("true", "false") else value)
        except json.JSONDecodeError:
            args.options[key] = value  # a bare word, e.g. output=medoid
    try:
        tp.TokenPoolConfig(**args.options)
    except (TypeError, ValueError) as err:
        parser.error(f"--option: {err}")
    for name in args.schedules:
        _recipe("fidelity").schedule_settings(name, 12)  # a malformed name fails here, not mid-sweep
    if args.suite == "none" and not args.model_name_or_path:
        parser.error("--suite none needs at least one --model_name_or_path")
    return args


class ReducerClock:
    """Wall time spent inside the reducer functions during a forward (wraps REDUCERS' functions)."""

    def __init__(self):
        self.seconds = 0.0
        self._saved = {}

    def __enter__(self):
        for name, reducer in REDUCERS.items():
            self._saved[name] = reducer.fn
            object.__setattr__(reducer, "fn", self._wrap(reducer.fn))
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            object.__setattr__(REDUCERS[name], "fn", fn)

    def _wrap(self, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self.seconds += time.perf_counter() - start
            return out

        return timed


class ReducerFlops(ReducerClock):
    """FLOPs counted inside the reducer functions during a forward (torch's counter, nested)."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def _wrap(self, fn):
        def counted(*args, **kwargs):
            with tp.flops.flop_counter_mode() as inner:
                out = fn(*args, **kwargs)
            self.flops += inner.get_total_flops()
            return out

        return counted


# ViT-B at the four token counts of issue #10: (patch size, image size) -> patch tokens
REDUCER_COST_SHAPES = {"vit-b16-224": (16, 224), "vit-b16-384": (16, 384), "vit-b14-518": (14, 518),
                       "vit-b16-1024": (16, 1024)}


@torch.no_grad()
def reducer_cost_rows(args) -> list[dict]:
    """Each reducer's own FLOPs as a share of the plain model's, ViT-B at 196, 576, 1369 and 4096 patch
    tokens, keep=0.6 on the default schedule. Counted on the meta device: shapes only, nothing runs."""
    rows = []
    for name, (patch, size) in REDUCER_COST_SHAPES.items():
        with torch.device("meta"):
            model = ViTForImageClassification(ViTConfig(image_size=size, patch_size=patch, num_labels=1000)).eval()
        pixels = torch.empty(1, 3, size, size, device="meta")
        plain = tp.count_flops(model, pixels)
        for method in args.methods:
            for metric in (("auto", "keys", "tokens") if method in ("tokenpool", "kmeans") else (None,)):
                options = {"metric": metric} if metric else {}
                tp.patch_model(model, keep=0.6, method=method, **options, **args.options)
                with ReducerFlops() as counter:
                    total = tp.count_flops(model, pixels)
                tp.unpatch_model(model)
                rows.append({"model": name, "patch_tokens": (size // patch) ** 2, "method": method, "metric": metric,
                             "plain_gflops": plain / 1e9, "pooled_gflops": total / 1e9,
                             "reducer_gflops": counter.flops / 1e9, "reducer_share_of_plain": counter.flops / plain})
                print(f"{name} {method} {metric or ''}: reducer {counter.flops / 1e9:.3f} GFLOPs = "
                      f"{100 * counter.flops / plain:.2f}% of plain {plain / 1e9:.1f}", flush=True)
    return rows


def compile_rows(args) -> list[dict]:
    """Per checkpoint and method: graph breaks (torch._dynamo.explain), the first compiled call's time
    (compiling included), the largest difference from eager, and eager vs compiled speed interleaved."""
    rows = []
    for path in sorted(p for p in CHECKPOINTS.iterdir() if (p / "config.json").exists()):
        model = tp.load_model(str(path)).eval()
        vision = tp.patch.vision_config(model)
        batch = torch.randn(args.batch_sizes[0], vision.num_channels, vision.image_size, vision.image_size)
        for method in args.methods:
            if method not in tp.ADAPTERS[model.config.model_type].methods:
                continue
            tp.patch_model(model, keep=0.6, method=method, **args.options)
            torch._dynamo.reset()
            breaks = torch._dynamo.explain(lambda x: model(pixel_values=x).logits)(batch).graph_break_count
            torch._dynamo.reset()
            compiled = torch.compile(model, fullgraph=True)
            with torch.no_grad():
                started = time.perf_counter()
                out = compiled(pixel_values=batch).logits
                compile_seconds = time.perf_counter() - started
                diff = (out - model(pixel_values=batch).logits).abs().max().item()
            t = tp.time_interleaved({"eager": model, "compiled": compiled}, batch, warmup=args.warmup,
                                    repeats=args.repeats)
            rows.append({"model": path.name, "method": method, "graph_breaks": breaks,
                         "compile_seconds": round(compile_seconds, 1), "max_abs_diff": diff,
                         "eager_images_per_s": t["eager"]["images_per_second"],
                         "compiled_images_per_s": t["compiled"]["images_per_second"]})
            print(rows[-1], flush=True)
            tp.unpatch_model(model)
    return rows


def compile_markdown(rows) -> str:
    text = ("| model | method | graph breaks | first call, compiling (s) | max abs diff vs eager | eager img/s | "
            "compiled img/s |\n|---|---|---|---|---|---|---|\n")
    return text + "".join(f"| {r['model']} | {r['method']} | {r['graph_breaks']} | {r['compile_seconds']:.1f} | "
                          f"{r['max_abs_diff']:.1e} | {r['eager_images_per_s']:.1f} | {r['compiled_images_per_s']:.1f} |\n"
                          for r in rows)


def reducer_cost_markdown(rows) -> str:
    cols = list(dict.fromkeys((r["method"], r["metric"]) for r in rows))
    head = " | ".join(m + (f" ({k})" if k else "") for m, k in cols)
    text = f"| model | patch tokens | plain GFLOPs | {head} |\n|---|---|---|{'---|' * len(cols)}\n"
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = {(r["method"], r["metric"]): r for r in rows if r["model"] == model}
        first = next(iter(mine.values()))
        text += (f"| {model} | {first['patch_tokens']} | {first['plain_gflops']:.1f} | "
                 + " | ".join(f"{100 * mine[c]['reducer_share_of_plain']:.2f}%" for c in cols) + " |\n")
    return text


@torch.no_grad()
def timed(fn, repeats: int, sync, warmup: int = 1) -> tuple[float, float]:
    """Median seconds of `repeats` calls after `warmup` untimed ones, and the seconds all the calls took."""
    times = []
    began = time.perf_counter()
    for i in range(warmup + repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times), time.perf_counter() - began


@torch.no_grad()
def tokens_per_layer(model, pixels) -> list[int] | None:
    """Tokens entering each encoder layer (None for Swin, whose blocks pool inside windows)."""
    if tp.protected_tokens(model) is None:
        return None
    adapter = tp.ADAPTERS[model.config.model_type]
    layers = adapter.layers(tp.patch.target(adapter, model))
    counts = []

    def record(module, args, kwargs):
        counts.append((args[0] if args else kwargs["hidden_states"]).shape[1])

    hooks = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in layers]
    try:
        tp.flops.image_forward(model, pixels)
    finally:
        for hook in hooks:
            hook.remove()
    return counts


@torch.no_grad()
def top1(model, pixels, labels, batch_size=256) -> float:
    correct = 0
    for i in range(0, len(labels), batch_size):
        logits = model(pixel_values=pixels[i : i + batch_size]).logits
        correct += (logits.argmax(-1).cpu() == labels[i : i + batch_size]).sum().item()
    return 100.0 * correct / len(labels)


def load_eval_data(folder, args):
    from hf_tokenpool.data import load_image_dataset, to_pixel_values

    processor = AutoImageProcessor.from_pretrained(folder)
    split = load_image_dataset(args.dataset_name)["test"]
    split = split.select(range(min(args.eval_samples, len(split))))
    pixels, labels = to_pixel_values(split, processor)
    return pixels.to(args.device), labels


def paired_speedup(plain_seconds, pooled_seconds) -> dict:
    """The speed-up of forwards timed alternately (tp.time_interleaved's "seconds", in timing order): the
    median of the repeat-by-repeat ratios plain / pooled, with its min and max."""
    ratios = sorted(a / b for a, b in zip(plain_seconds, pooled_seconds))
    return {"speedup": statistics.median(ratios), "speedup_min": ratios[0], "speedup_max": ratios[-1]}


def paired_row(times: dict, name: str, base: str, flops_ratio: float) -> dict:
    """One contender against its plain model from one tp.time_interleaved result: the paired speed-up with
    min-max, the ideal 1 / flops_ratio and the share of it reached, and both models' images/s."""
    speedup = paired_speedup(times[base]["seconds"], times[name]["seconds"])
    return {**speedup, "flops_ratio": flops_ratio, "ideal_speedup": 1 / flops_ratio,
            "speedup_of_ideal": speedup["speedup"] * flops_ratio, "images_per_s": times[name]["images_per_second"],
            "plain_images_per_s": times[base]["images_per_second"]}


def speed(plain, pooled, batches: dict, args) -> dict:
    """Per batch size: plain and pooled timed alternately (tp.time_interleaved), the speed-up as the
    median of the repeat-by-repeat ratios, with its min and max."""
    out = {}
    for size, batch in batches.items():
        t = tp.time_interleaved({"plain": plain, "pooled": pooled}, batch, warmup=args.warmup, repeats=args.repeats)
        out[size] = {"plain_images_per_s": t["plain"]["images_per_second"],
                     "images_per_s": t["pooled"]["images_per_second"],
                     **paired_speedup(t["plain"]["seconds"], t["pooled"]["seconds"]), "repeats": args.repeats}
    return out


def rows_for_model(name, model, args, eval_data=None):
    device = torch.device(args.device)
    model = model.to(device).eval()
    vision = tp.patch.vision_config(model)  # CLIP/SigLIP classifiers: the vision tower's
    size = vision.image_size
    torch.manual_seed(0)
    batches = {b: torch.randn(b, vision.num_channels, size, size, device=device) for b in args.batch_sizes}
    one = next(iter(batches.values()))[:1]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    reset_peak_memory = torch.cuda.reset_peak_memory_stats if device.type == "cuda" else (lambda: None)
    plain_flops = tp.count_flops(model, one)
    plain_run = torch.compile(model, fullgraph=True, dynamic=False) if args.compile else model
    plain_acc = top1(model, *eval_data) if eval_data else None
    adapter = tp.ADAPTERS[model.config.model_type]
    num_layers = tp.num_layers(model)
    settings = [("none", None, {})]
    settings += [(m, None, {"keep": k}) for m in args.methods for k in args.keeps]
    named = {}  # named schedules count a token sequence; Swin pools in windows
    if tp.protected_tokens(model) is not None and args.schedules:
        patches = _num_patches(model, one)
        named = {s: _recipe("fidelity").schedule_settings(s, num_layers, patches) for s in args.schedules}
    settings += [(m, s, options) for m in args.methods for s, options in named.items()]
    if args.floor:
        settings += [(FLOOR, None, {"keep": k}) for k in args.keeps]
        settings += [(FLOOR, s, options) for s, options in named.items()]
    settings += [(m, None, {"target_flops": t}) for m in args.budget_methods for t in args.target_flops]
    rows = []
    for method, schedule, options in tqdm(settings, desc=name, leave=False):
        if method not in ("none", FLOOR) and method not in adapter.methods:
            continue
        target = options.get("target_flops")
        if method == "none":
            flops, acc, reducer_share, solved_keep, pooled = plain_flops, plain_acc, 0.0, 1.0, None
            tokens = tokens_per_layer(model, one)
            timing = {b: {"plain_images_per_s": tp.time_interleaved({"plain": plain_run}, x, warmup=args.warmup,
                                                                    repeats=args.repeats)["plain"]["images_per_second"],
                          "speedup": 1.0, "speedup_min": 1.0, "speedup_max": 1.0} for b, x in batches.items()}
            for t in timing.values():
                t["images_per_s"] = t["plain_images_per_s"]
        else:
            pooled = (floor_model(model, options) if method == FLOOR
                      else tp.patch_model(copy.deepcopy(model), method=method, **options, **args.options))
            solved_keep = pooled.config.token_pooling["keep"]
            flops = tp.count_flops(pooled, one)
            tokens = tokens_per_layer(pooled, one)
            acc = top1(pooled, *eval_data) if eval_data else None
            reset_peak_memory()
            pooled_run = torch.compile(pooled, fullgraph=True, dynamic=False) if args.compile else pooled
            timing = speed(plain_run, pooled_run, batches, args)
            first = next(iter(batches.values()))
            reducer_share = None
            if not args.compile:  # inside a compiled graph the reducers cannot be clocked
                with ReducerClock() as clock:
                    _, total = timed(lambda: pooled(pixel_values=first), args.repeats, sync, 0)
                reducer_share = clock.seconds / total
        ratio = flops / plain_flops
        main_timing = timing[args.batch_sizes[0]]
        rows.append({
            "model": name, "method": method, "keep": None if schedule else round(solved_keep, 4), "target_flops": target,
            "schedule": schedule, "options": args.options if method != "none" else {},
            "tokens_per_layer": tokens, "gflops": flops / 1e9, "flops_ratio": ratio,
            "images_per_s": main_timing["images_per_s"], "plain_images_per_s": main_timing["plain_images_per_s"],
            "speedup": main_timing["speedup"], "ideal_speedup": 1 / ratio,
            "speedup_of_ideal": main_timing["speedup"] * ratio,
            "timing": {str(b): {**t, "speedup_of_ideal": t["speedup"] * ratio} for b, t in timing.items()},
            "reducer_share": reducer_share, "top1": acc, "plain_top1": plain_acc,
            "finetuned_top1": finetuned_top1(args, name, method, solved_keep)
            if eval_data and method not in ("none", FLOOR) and schedule is None else None,
            "peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
        })
        del pooled
    return rows


def keep_first(tokens, sizes, k, signals) -> PoolResult:
    """The floor's "reducer": the first k tokens, nothing computed (the others are dropped)."""
    assign = torch.arange(tokens.shape[1], device=tokens.device).clamp_max(k - 1).expand(tokens.shape[:2])
    return PoolResult(tokens[:, :k], sizes[:, :k], assign)


def floor_model(model, options, signals=frozenset()):
    """The model at a schedule's token counts with no reducer at all: patched as `tome` (SDPA everywhere),
    then every pooling layer's reducer swapped for `keep_first`, which needs no attention signals; no
    proportional attention. Its speed-up is the most any method could reach at that schedule on this machine
    (the rest is matrix products running on fewer rows), so a method's speed-up / the floor's is the share
    of what was reachable. Swin uses only the assignment: each window's first k-1 tokens stay alone and the
    rest form one cluster, then the block pools, computes and unpools as for every method, so Swin's floor
    is the cost of that design with nothing spent on choosing the clusters.

    signals={"significance"}: the same, but the attention also computes the significance (patched as
    `tokenpool`, explicit softmax) that `keep_first` then ignores: the floor of the methods that need it, so
    that a method's distance to `tome` splits into its attention and its reducer."""
    signals = frozenset(signals)
    method = "tokenpool" if "significance" in signals else "tome"
    pooled = tp.patch_model(copy.deepcopy(model), method=method, proportional_attention=False, **options)
    for module in pooled.modules():
        plan = module.__dict__.get("_tokenpool")
        if plan is not None and hasattr(plan, "reducer"):
            plan.reducer = Reducer(keep_first, signals)
    return pooled


def _num_patches(model, one) -> int:
    """Patch tokens entering the first layer (the protected tokens not counted)."""
    counts = tokens_per_layer(model, one)
    return counts[0] - (tp.protected_tokens(model) or 0) if counts else 0


@functools.lru_cache(maxsize=None)
def _recipe(name: str):
    """A sibling script (recipes/<name>.py) as a module, loaded once: fidelity.py for the schedule names
    and the fidelity suite, finetune.py for the fine-tuned column."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def finetuned_top1(args, name, method, keep):
    """Top-1 after recipes/finetune.py's short fine-tune of this pooled row (same test images)."""
    if not args.finetune or (args.finetune_keeps and keep not in args.finetune_keeps) or name not in CHECKPOINT_PATHS:
        return None
    with tempfile.TemporaryDirectory() as out:
        results = _recipe("finetune").main([
            "--model_name_or_path", str(CHECKPOINT_PATHS[name]), "--dataset_name", args.dataset_name,
            "--method", method, "--keep", str(keep), "--max_train_steps", str(args.finetune_steps),
            "--max_eval_samples", str(args.eval_samples), "--output_dir", f"{out}/run", "--seed", "0"])
    return results["pooled_finetuned"]["accuracy"]


CHECKPOINT_PATHS: dict[str, Path] = {}


def plots(rows, out: Path):
    """top-1 vs GFLOPs per method (off the shelf solid, fine-tuned dashed); speed-up vs FLOPs ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    accuracy_models = sorted({r["model"] for r in rows if r["top1"] is not None})
    if accuracy_models:
        fig, axes = plt.subplots(1, len(accuracy_models), figsize=(4.2 * len(accuracy_models), 3.6), squeeze=False)
        for ax, model in zip(axes[0], accuracy_models):
            mine = [r for r in rows if r["model"] == model]
            plain = next(r for r in mine if r["method"] == "none")
            ax.axhline(plain["top1"], color="gray", lw=0.8, ls=":", label="plain")
            for i, method in enumerate(m for m in METHODS[1:] if any(r["method"] == m for r in mine)):
                pts = sorted((r["gflops"], r["top1"], r["finetuned_top1"]) for r in mine
                             if r["method"] == method and r["target_flops"] is None)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=f"C{i}", label=f"{method}")
                tuned = [(p[0], p[2]) for p in pts if p[2] is not None]
                if tuned:
                    ax.plot(*zip(*tuned), "s--", color=f"C{i}", label=f"{method}, fine-tuned")
            ax.plot([plain["gflops"]], [plain["top1"]], "k*", ms=10)
            ax.set(title=model, xlabel="GFLOPs / image", ylabel="top-1 (%)")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "accuracy_vs_flops.png", dpi=110)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(4.8, 3.8))
    pooled = [r for r in rows if r["method"] != "none"]
    for i, model in enumerate(sorted({r["model"] for r in pooled})):
        pts = [(r["flops_ratio"], r["speedup"]) for r in pooled if r["model"] == model]
        ax.scatter(*zip(*pts), color=f"C{i}", label=model, s=18)
    xs = [x / 100 for x in range(20, 101)]
    ax.plot(xs, [1 / x for x in xs], "k--", lw=1, label="ideal (1 / FLOPs ratio)")
    ax.set(xlabel="FLOPs ratio (pooled / plain)", ylabel="measured speed-up", title="speed-up vs FLOPs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "speedup_vs_flops.png", dpi=110)
    plt.close(fig)


def _tokens(counts) -> str:
    """[65, 65, 33, 17, 17, 9] -> '65>33>17>9' (the token count after each pooling step)."""
    if counts is None:
        return "–"
    return ">".join(str(c) for i, c in enumerate(counts) if i == 0 or c != counts[i - 1])


def _method(r) -> str:
    name = r["method"] + "".join(f" {k}={v}" for k, v in r.get("options", {}).items())
    name += f" {r['schedule']}" if r.get("schedule") else ""
    return name + (f" @ {r['target_flops']:.2f} FLOPs" if r["target_flops"] is not None else "")


def pivot(rows, cell, models) -> str:
    """One line per (model, method), one column per keep: the at-a-glance view of the sweep."""
    by_keep = [r for r in rows if r["method"] != "none" and r["target_flops"] is None and not r.get("schedule")]
    keeps = sorted({r["keep"] for r in by_keep})
    out = f"| model | method | {' | '.join(f'keep {k:g}' for k in keeps)} |\n|---|---|{'---|' * len(keeps)}\n"
    for model in models:
        for method in (*METHODS[1:], FLOOR):
            mine = {r["keep"]: r for r in by_keep if r["model"] == model and r["method"] == method}
            if mine:
                out += f"| {model} | {method} | {' | '.join(cell(mine[k]) if k in mine else '–' for k in keeps)} |\n"
    return out


def summary(rows) -> str:
    models = list(dict.fromkeys(r["model"] for r in rows))
    plain = {r["model"]: r for r in rows if r["method"] == "none"}
    text = ""
    scored = [m for m in models if plain[m]["top1"] is not None]
    if scored:
        text += "Top-1 (%), off the shelf (plain: " + ", ".join(f"{m} {plain[m]['top1']:.2f}" for m in scored) + ")"
        tuned = any(r["finetuned_top1"] is not None for r in rows)
        text += "; after the fine-tune in brackets" if tuned else ""
        text += ":\n\n" + pivot(rows, lambda r: f"{r['top1']:.2f}" + (
            f" ({r['finetuned_top1']:.2f})" if r["finetuned_top1"] is not None else ""), scored) + "\n"
    text += "Speed-up over the plain model (share of the ideal 1 / FLOPs ratio), first batch size:\n\n"
    text += pivot(rows, lambda r: f"{r['speedup']:.2f}x ({r['speedup_of_ideal'] * 100:.0f}%)", models)
    named = [r for r in rows if r.get("schedule")]
    if named:
        text += "\nAt named schedules (speed-up, share of the ideal):\n\n| model | method | schedule | speed-up |\n|---|---|---|---|\n"
        text += "".join(f"| {r['model']} | {r['method']} | {r['schedule']} | {r['speedup']:.2f}x "
                        f"({r['speedup_of_ideal'] * 100:.0f}%) |\n" for r in named)
    return text


def markdown(rows) -> str:
    """Every row; speed at each batch size as pooled img/s, speed-up (min-max over the paired repeats)
    and its share of the ideal."""
    sizes = list(rows[0]["timing"]) if rows else []
    speed_head = "".join(f" img/s b={b} | speed-up b={b} | of ideal b={b} |" for b in sizes)
    head = (f"| model | method | keep | tokens | GFLOPs | FLOPs ratio |{speed_head} reducer share | top-1 "
            f"| top-1 fine-tuned |\n|{'---|' * (9 + 3 * len(sizes))}\n")
    fmt = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731

    def cells(t):
        return (f" {t['images_per_s']:.1f} | {t['speedup']:.2f}x ({t['speedup_min']:.2f}-{t['speedup_max']:.2f}) | "
                f"{t['speedup_of_ideal'] * 100:.0f}% |")

    return head + "".join(
        f"| {r['model']} | {_method(r)} | {fmt(r['keep'], '.2f')} | {_tokens(r['tokens_per_layer'])} | {r['gflops']:.3f} | "
        f"{r['flops_ratio']:.3f} |{''.join(cells(t) for t in r['timing'].values())} "
        f"{'–' if r['reducer_share'] is None else format(r['reducer_share'], '.1%')} | {fmt(r['top1'], '.2f')} | "
        f"{fmt(r['finetuned_top1'], '.2f')} |\n"
        for r in rows)


def write_outputs(rows, meta, out: Path):
    """results.json, the plots and results.md of a sweep (also rebuilds the tables from a results.json)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    plots(rows, out)
    (out / "results.md").write_text(
        f"Command: `{meta['command']}`; device: {meta['device']}, batch sizes {meta['batch_sizes']} (plain and "
        f"pooled timed alternately, {meta['repeats']} repeats, median), fp32, torch {meta['torch']}"
        f"{', both torch.compile(fullgraph=True, dynamic=False)' if meta.get('compiled') else ''}; top-1 on the "
        f"first {meta['eval_samples']} test images; the sweep took {meta['wall_minutes']:.1f} min\n\n{summary(rows)}\n"
        f"Every row:\n\n{markdown(rows)}")


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    if args.suite == "fidelity":
        return _recipe("fidelity").main([*(["--output_dir", args.output_dir] if args.output_dir else []),
                                 "--threads", str(args.threads)])
    if args.suite in ("reducer_cost", "compile"):
        rows = reducer_cost_rows(args) if args.suite == "reducer_cost" else compile_rows(args)
        text = reducer_cost_markdown(rows) if args.suite == "reducer_cost" else compile_markdown(rows)
        print(text)
        if args.output_dir:
            out = Path(args.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            command = " ".join(["python", "recipes/benchmark.py", *(argv if argv is not None else sys.argv[1:])])
            (out / "results.json").write_text(json.dumps({"meta": {"command": command}, "rows": rows}, indent=2) + "\n")
            what = ("FLOPs from torch's counter on the meta device; keep=0.6, default schedule)\n\nReducer FLOPs as "
                    "a share of the plain model's" if args.suite == "reducer_cost" else
                    f"keep=0.6, {torch.get_num_threads()} threads, batch {args.batch_sizes[0]}, eager and compiled "
                    f"timed alternately, {args.repeats} repeats, median)\n\ntorch.compile(model, fullgraph=True)")
            (out / "results.md").write_text(f"Command: `{command}` ({what}:\n\n{text}")
        return rows
    models = []
    if args.suite in ("all", "checkpoints"):
        models += [(p.name, None, p) for p in sorted(CHECKPOINTS.iterdir()) if (p / "config.json").exists()]
    if args.suite in ("all", "shapes"):
        models += [(name, factory, None) for name, factory in SHAPES.items() if not args.shapes or name in args.shapes]
    CHECKPOINT_PATHS.update({name: Path(path) for name, _, path in models if path is not None})
    models += [(Path(p).name, None, p) for p in args.model_name_or_path]
    CHECKPOINT_PATHS.update({Path(p).name: Path(p) for p in args.model_name_or_path if Path(p).exists()})
    rows = []
    for name, factory, path in tqdm(models, desc="models"):
        torch.manual_seed(0)
        if factory is not None:
            model, eval_data = factory(), None
        else:
            model = tp.load_model(str(path))
            eval_data = load_eval_data(path, args)
        rows += rows_for_model(name, model, args, eval_data)
        print(markdown([r for r in rows if r["model"] == name]), flush=True)
    print(f"sweep done in {(time.perf_counter() - started) / 60:.1f} min", flush=True)
    meta = {"device": args.device if args.device != "cpu" else f"cpu ({torch.get_num_threads()} threads)",
            "batch_sizes": args.batch_sizes, "repeats": args.repeats, "warmup": args.warmup,
            "eval_samples": args.eval_samples, "torch": torch.__version__, "compiled": args.compile,
            "wall_minutes": (time.perf_counter() - started) / 60,
            "command": " ".join(["python", "recipes/benchmark.py", *(argv if argv is not None else sys.argv[1:])])}
    if args.output_dir:
        write_outputs(rows, meta, Path(args.output_dir))
    return rows


if __name__ == "__main__":
    main()
