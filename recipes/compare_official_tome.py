#!/usr/bin/env python
"""Speed side by side with the official ToMe code (facebookresearch/ToMe on timm), at the same token schedule.

    pip install timm "git+https://github.com/facebookresearch/ToMe"   # the contender; not a dependency
    python recipes/compare_official_tome.py --output_dir docs/results/official-tome

The same shape twice, random init (--shape deit-s16-224: timm's `deit_small_distilled_patch16_224`
against transformers' `DeiTForImageClassificationWithTeacher`; vit-b16-224: `vit_base_patch16_224` against
`ViTForImageClassification`), each plain and patched, timm's by official ToMe (`tome.patch.timm`, proportional
attention, `model.r = R`), transformers' by hf_tokenpool at the `r-R` schedule (the same tokens per layer,
checked: the rows record them). All the models run in turn on the same batch (timm plain,
official ToMe, HF plain, then each hf_tokenpool method; warm-up, then `--repeats` rounds), so a change in
machine load hits every contender alike; each pooled model's speed-up is the median of its repeat-by-repeat
ratios to its own plain model, with min-max, and its share of the ideal 1 / (FLOPs ratio) uses FLOPs from
torch's counter (attention included). Official ToMe's code is not part of hf_tokenpool: install it yourself.

Then, in separate rounds so that the speed above is timed untouched, where the pooling's own time goes: the
milliseconds per forward spent choosing and merging the tokens (official ToMe: `bipartite_soft_matching` and
`merge_wavg`; hf_tokenpool: `pool_tokens`, which splits off the protected tokens, runs the reducer and joins
them again), medians over `--repeats` forwards. The rest of a pooled forward is the model itself on fewer
tokens, plus, for methods that need the attention probabilities, the explicit softmax.

With --floors, two more transformers contenders at the same token counts, neither choosing tokens (each layer
keeps its first k, see benchmark.floor_model): `floor` runs SDPA, `floor + significance` also computes the
attention each token receives and ignores it. A method that needs that signal (`tokenpool`, `kmeans`) loses
floor -> floor + significance to its attention and floor + significance -> itself to its reducer, all timed
in the same interleaved rounds.

With --equal_flops, the comparison a user makes when choosing a setting rather than a reducer: each method
also on hf_tokenpool's default schedule (three pooling steps) at the keep that costs official ToMe's FLOPs ratio
at r = R (`target_flops`), and official ToMe at those three steps too (`model.r` as a per-layer list, the
tokens our `tome` removes there; checked). Their fidelity at the same settings is recipes/fidelity.py's
(`--official_tome`, schedules `r-R` and `flops-F`), on checkpoints converted to timm by `timm_twin`.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import hf_tokenpool as tp  # noqa: E402

HERE = Path(__file__).resolve().parent
# benchmark.py's shape name -> the timm model of the same shape (ToMe's own benchmarks use these)
TIMM_MODELS = {"deit-s16-224": "deit_small_distilled_patch16_224", "vit-b16-224": "vit_base_patch16_224"}


def _import_contender():
    try:
        import timm
        import tome
    except ImportError as err:
        raise SystemExit(f"this comparison needs timm and the official ToMe package ({err}); install them with\n"
                         '  pip install timm "git+https://github.com/facebookresearch/ToMe"') from None
    return timm, tome


class PixelValues(nn.Module):
    """A timm model called as transformers models are (`model(pixel_values=...)`), for the shared timers."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values)


def official_tome(plain: nn.Module, tome, r) -> nn.Module:
    """A copy of timm model `plain` patched by official ToMe (proportional attention) with `model.r = r`: an int,
    or a list of the tokens each layer removes."""
    model = copy.deepcopy(plain)
    tome.patch.timm(model)
    model.r = r
    return model


@torch.no_grad()
def timm_twin(model: nn.Module, timm) -> nn.Module:
    """timm's VisionTransformer (or its distilled DeiT) with the weights of a transformers ViT / distilled DeiT:
    the model official ToMe patches, computing the same logits (checked by the caller). Plain ViTs with a class
    token only (no pooler, GELU); anything else is refused."""
    from functools import partial

    cfg, name = model.config, type(model).__name__
    # (DeiTForImageClassification reads the class token alone of a distilled DeiT: no timm model does that; the
    # Hub's non-distilled DeiTs are ViTForImageClassification)
    if name not in ("ViTForImageClassification", "DeiTForImageClassificationWithTeacher"):
        raise ValueError(f"official ToMe runs on timm's ViT / distilled DeiT: a ViTForImageClassification or "
                         f"DeiTForImageClassificationWithTeacher can be converted, got {name}")
    if cfg.hidden_act != "gelu":
        raise ValueError(f"timm's ViT uses the exact GELU; this model's hidden_act is {cfg.hidden_act!r}")
    distilled = name.endswith("WithTeacher")
    base = getattr(model, model.base_model_prefix)
    cls = timm.models.deit.VisionTransformerDistilled if distilled else timm.models.vision_transformer.VisionTransformer
    twin = cls(img_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=cfg.num_channels,
               num_classes=cfg.num_labels, embed_dim=cfg.hidden_size, depth=cfg.num_hidden_layers,
               num_heads=cfg.num_attention_heads, mlp_ratio=cfg.intermediate_size / cfg.hidden_size,
               qkv_bias=cfg.qkv_bias, norm_layer=partial(nn.LayerNorm, eps=cfg.layer_norm_eps)).eval()
    emb = base.embeddings
    state = {"cls_token": emb.cls_token, "pos_embed": emb.position_embeddings,
             "patch_embed.proj.weight": emb.patch_embeddings.projection.weight,
             "patch_embed.proj.bias": emb.patch_embeddings.projection.bias,
             "norm.weight": base.layernorm.weight, "norm.bias": base.layernorm.bias}
    if distilled:
        state |= {"dist_token": emb.distillation_token,
                  "head.weight": model.cls_classifier.weight, "head.bias": model.cls_classifier.bias,
                  "head_dist.weight": model.distillation_classifier.weight,
                  "head_dist.bias": model.distillation_classifier.bias}
    else:
        state |= {"head.weight": model.classifier.weight, "head.bias": model.classifier.bias}
    for i, layer in enumerate(base.layers):
        a = layer.attention
        state |= {f"blocks.{i}.norm1.weight": layer.layernorm_before.weight,
                  f"blocks.{i}.norm1.bias": layer.layernorm_before.bias,
                  f"blocks.{i}.attn.qkv.weight": torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
                  f"blocks.{i}.attn.qkv.bias": torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]),
                  f"blocks.{i}.attn.proj.weight": a.o_proj.weight, f"blocks.{i}.attn.proj.bias": a.o_proj.bias,
                  f"blocks.{i}.norm2.weight": layer.layernorm_after.weight,
                  f"blocks.{i}.norm2.bias": layer.layernorm_after.bias,
                  f"blocks.{i}.mlp.fc1.weight": layer.mlp.fc1.weight, f"blocks.{i}.mlp.fc1.bias": layer.mlp.fc1.bias,
                  f"blocks.{i}.mlp.fc2.weight": layer.mlp.fc2.weight, f"blocks.{i}.mlp.fc2.bias": layer.mlp.fc2.bias}
    twin.load_state_dict({k: v.detach().clone() for k, v in state.items()})  # strict: every weight, once
    return twin


@torch.no_grad()
def tokens_entering(blocks, run) -> list[int]:
    counts = []
    hooks = [b.register_forward_pre_hook(lambda m, args: counts.append(args[0].shape[1])) for b in blocks]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return counts


@contextmanager
def timing_calls(module, names: list[str]):
    """Replace module-level functions `names` of `module` by timed wrappers for the duration; yields the list
    that collects the seconds spent inside them (calls made from within a timed call are not counted twice)."""
    spent, depth, originals = [0.0], [0], {name: getattr(module, name) for name in names}

    def timed(fn):
        def wrapper(*args, **kwargs):
            depth[0] += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    spent[0] += time.perf_counter() - start
        return wrapper

    for name, fn in originals.items():
        setattr(module, name, timed(fn))
    try:
        yield spent
    finally:
        for name, fn in originals.items():
            setattr(module, name, fn)


@torch.no_grad()
def pooling_times(runs: dict, warmup: int, repeats: int) -> dict[str, dict]:
    """runs: {name: (run, module, function names)}. Runs each `run()` in turn, `repeats` rounds, with the named
    module-level functions timed; returns {name: {"forward_ms", "pooling_ms"}}, medians per forward. The turn
    rotates from round to round, as in `time_interleaved` (a fixed order biases the timings by ~2%)."""
    for run, _, _ in runs.values():
        for _ in range(warmup):
            run()
    totals, inside = {name: [] for name in runs}, {name: [] for name in runs}
    order = list(runs)
    for i in range(repeats):
        for name in order[i % len(order):] + order[:i % len(order)]:
            run, module, names = runs[name]
            with timing_calls(module, names) as spent:
                start = time.perf_counter()
                run()
                totals[name].append(time.perf_counter() - start)
            inside[name].append(spent[0])
    return {name: {"forward_ms": 1e3 * statistics.median(totals[name]), "pooling_ms": 1e3 * statistics.median(inside[name])}
            for name in runs}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="deit-s16-224", choices=list(TIMM_MODELS),
                   help="benchmark.py's shape, timed against the timm model of the same shape")
    p.add_argument("--r", type=int, default=13, help="tokens merged per layer (ToMe's r; hf_tokenpool's r-R schedule)")
    p.add_argument("--methods", nargs="+", default=["tome", "tokenpool"], choices=tp.config.METHODS)
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[8, 1])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--floors", action="store_true",
                   help="also time transformers' model at the same token counts with no reducer (`floor`: SDPA, each "
                        "layer keeps its first tokens) and with no reducer but the significance attention "
                        "(`floor + significance`): how a method's distance to `tome` splits into attention and reducer")
    p.add_argument("--equal_flops", action="store_true",
                   help="also time every method on hf_tokenpool's default three-step schedule at official ToMe's "
                        "FLOPs ratio (`target_flops`), and official ToMe at those three steps (`model.r` as a list)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--output_dir", type=Path, default=None, help="write results.json and results.md here")
    args = p.parse_args(argv)
    if args.r < 1 or args.repeats < 1 or args.warmup < 0 or min(args.batch_sizes) < 1:
        p.error("--r, --repeats and --batch_sizes must be >= 1 and --warmup >= 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    timm, tome = _import_contender()
    if args.threads:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, str(HERE))
    from benchmark import SHAPES, _recipe, floor_model, paired_row, tokens_per_layer  # noqa: E402 (sibling script)

    torch.manual_seed(0)
    timm_plain = timm.create_model(TIMM_MODELS[args.shape], pretrained=False).eval()
    official = official_tome(timm_plain, tome, args.r)
    hf_plain = SHAPES[args.shape]().eval()
    num_layers = hf_plain.config.num_hidden_layers
    schedule = _recipe("fidelity").schedule_settings(f"r-{args.r}", num_layers,
                                                     (hf_plain.config.image_size // hf_plain.config.patch_size) ** 2)
    ours = {m: tp.patch_model(SHAPES[args.shape]().eval(), method=m, **schedule) for m in args.methods}
    for m in ours.values():
        m.load_state_dict(hf_plain.state_dict())
    if args.floors:
        ours["floor"] = floor_model(hf_plain, schedule)
        ours["floor + significance"] = floor_model(hf_plain, schedule, signals={"significance"})
    officials = {"official ToMe": official}
    one = torch.randn(1, 3, 224, 224)
    if args.equal_flops:
        # every method on the default three steps at official ToMe's FLOPs, and official ToMe at our `tome`'s
        # three-step tokens (model.r as a list: the tokens each layer removes)
        target = tp.count_flops(PixelValues(official), one) / tp.count_flops(PixelValues(timm_plain), one)
        for m in args.methods:
            ours[f"{m}, three steps"] = tp.patch_model(SHAPES[args.shape]().eval(), method=m, target_flops=target)
            ours[f"{m}, three steps"].load_state_dict(hf_plain.state_dict())
        steps = ours.get("tome, three steps")
        if steps is None:
            steps = tp.patch_model(copy.deepcopy(hf_plain), method="tome", target_flops=target)
        entering = tokens_per_layer(steps, one)
        removed = [a - b for a, b in zip(entering, entering[1:])] + [0]
        officials["official ToMe, three steps"] = official_tome(timm_plain, tome, removed)

    models = {"timm plain": PixelValues(timm_plain), **{n: PixelValues(m) for n, m in officials.items()},
              "HF plain": hf_plain, **{f"hf_tokenpool {m}": model for m, model in ours.items()}}
    baseline = {**{n: "timm plain" for n in officials}, **{f"hf_tokenpool {m}": "HF plain" for m in ours}}
    flops = {name: tp.count_flops(m, one) for name, m in models.items()}
    tokens = {**{n: tokens_entering(m.blocks, lambda m=m: m(one)) for n, m in officials.items()},
              **{f"hf_tokenpool {m}": tokens_per_layer(model, one) for m, model in ours.items()}}
    if args.equal_flops and tokens["official ToMe, three steps"] != entering:
        raise RuntimeError(f"official ToMe did not follow the three-step tokens {entering}: "
                           f"{tokens['official ToMe, three steps']}")
    # counts after each layer's reduction (both pool between attention and MLP, so layer i's MLP runs on them)
    tokens = {name: t[1:] + [None] for name, t in tokens.items()}
    rows = []
    for batch_size in args.batch_sizes:
        pixels = torch.randn(batch_size, 3, 224, 224)
        t = tp.time_interleaved(models, pixels, warmup=args.warmup, repeats=args.repeats)
        for name, base in baseline.items():
            rows.append({"contender": name, "batch_size": batch_size,
                         **paired_row(t, name, base, flops[name] / flops[base]), "tokens_after_each_layer": tokens[name]})
        # where the pooling's own time goes, timed apart from the speed above (the pooled models in turn)
        vit = sys.modules["hf_tokenpool.adapters.vit"]
        where = {**{n: (sys.modules["tome.patch.timm"], ["bipartite_soft_matching", "merge_wavg"]) for n in officials},
                 **{f"hf_tokenpool {m}": (vit, ["pool_tokens"]) for m in ours}}
        runs = {name: (lambda model=models[name]: model(pixel_values=pixels), *where[name]) for name in baseline}
        split = pooling_times(runs, args.warmup, args.repeats)
        for row in rows[-len(baseline):]:
            row.update(split[row["contender"]])
    official_speedup = {r["batch_size"]: r["speedup"] for r in rows if r["contender"] == "official ToMe"}
    for r in rows:
        r["relative_to_official"] = r["speedup"] / official_speedup[r["batch_size"]]
    lines = [f"{args.shape} ({TIMM_MODELS[args.shape]} in timm), r = {args.r} per layer, {args.repeats} interleaved repeats, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}, timm {timm.__version__}", "",
             "| contender | batch | speed-up (min-max) | ideal | share of ideal | vs official ToMe | images/s (plain) "
             "| pooling, ms of a forward |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['contender']} | {r['batch_size']} | {r['speedup']:.2f}x ({r['speedup_min']:.2f}-"
                     f"{r['speedup_max']:.2f}) | {r['ideal_speedup']:.2f}x | {100 * r['speedup_of_ideal']:.0f}% | "
                     f"{r['relative_to_official']:.3f} | {r['images_per_s']:.1f} ({r['plain_images_per_s']:.1f}) | "
                     f"{r['pooling_ms']:.2f} of {r['forward_ms']:.1f} |")
    lines += ["", "Tokens after each layer: " + "; ".join(f"{n}: {t[:-1]}" for n, t in tokens.items())]
    print("\n".join(lines))
    if args.output_dir:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        (args.output_dir / "results.json").write_text(json.dumps(
            {"rows": rows, "shape": args.shape, "timm_model": TIMM_MODELS[args.shape], "r": args.r,
             "repeats": args.repeats, "threads": torch.get_num_threads(),
             "torch": torch.__version__, "timm": timm.__version__}, indent=2))
        (args.output_dir / "results.md").write_text("\n".join(lines) + "\n")
    return rows


if __name__ == "__main__":
    main()
