#!/usr/bin/env python
"""Speed of two versions of hf_tokenpool side by side, in one process, at the same schedule.

    git worktree add /tmp/hf_tokenpool-old a34b816     # the version to compare with, checked out anywhere
    python recipes/compare_versions.py --old /tmp/hf_tokenpool-old --shape deit-s16-224 --schedule r-13 \\
        --methods tokenpool kmeans --output_dir docs/results/versions/deit-s16-224-r-13

The old checkout's `hf_tokenpool` package is imported under another name (`hf_tokenpool_old`, from a temporary
copy); both versions patch copies of one random-init model of benchmark.py's shape at the same schedule
(fidelity.py's names: steps-K, layer-K, r-R), and the plain model, then each method old and new, run in turn
on the same batch (`tp.time_interleaved`), so a change in machine load hits every contender alike. Each
speed-up is the median of its repeat-by-repeat ratios to the plain model, with min-max; each row also records
the largest difference between the old and the new version's outputs (a speed change that changed the
results shows there).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import hf_tokenpool as tp  # noqa: E402

HERE = Path(__file__).resolve().parent
OLD_NAME = "hf_tokenpool_old"


def import_old(checkout: Path):
    """The `hf_tokenpool` package of another checkout, imported as `hf_tokenpool_old` (its imports are relative,
    so a copy under another name is a separate package: its own classes, registry and adapters)."""
    source = checkout / "hf_tokenpool"
    if not (source / "__init__.py").is_file():
        raise SystemExit(f"--old {checkout}: no hf_tokenpool package there (expected {source / '__init__.py'}); "
                         "pass the root of another checkout, e.g. one made with `git worktree add DIR COMMIT`")
    if OLD_NAME in sys.modules:
        raise SystemExit(f"{OLD_NAME} is already imported in this process; compare one old version per process")
    folder = Path(tempfile.mkdtemp(prefix="hf_tokenpool_old_"))
    shutil.copytree(source, folder / OLD_NAME, ignore=shutil.ignore_patterns("__pycache__"))
    sys.path.insert(0, str(folder))
    try:
        return importlib.import_module(OLD_NAME)
    finally:
        sys.path.remove(str(folder))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", type=Path, required=True, help="root of the other checkout (it holds hf_tokenpool/)")
    p.add_argument("--shape", default="deit-s16-224", help="one of benchmark.py's shapes")
    p.add_argument("--schedule", default="r-13", help="fidelity.py's schedule name: steps-K, layer-K or r-R")
    p.add_argument("--methods", nargs="+", default=["tokenpool"], choices=tp.config.METHODS)
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[8, 1])
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--output_dir", type=Path, default=None, help="write results.json and results.md here")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or min(args.batch_sizes) < 1:
        p.error("--repeats and --batch_sizes must be >= 1 and --warmup >= 0")
    return args


def _output(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out[0]


def main(argv=None):
    args = parse_args(argv)
    sys.path.insert(0, str(HERE))
    from benchmark import SHAPES, _num_patches, _recipe, paired_row  # noqa: E402 (sibling script)

    if args.shape not in SHAPES:
        raise SystemExit(f"--shape {args.shape!r}: expected one of {sorted(SHAPES)}")
    torch.manual_seed(0)
    plain = SHAPES[args.shape]().eval()
    size = plain.config.image_size if isinstance(plain.config.image_size, int) else plain.config.image_size[0]
    one = torch.randn(1, 3, size, size)
    if tp.protected_tokens(plain) is None and not args.schedule.startswith("steps-"):
        # as in benchmark.py: r-R and layer-K count one token sequence, which a Swin stage does not have
        raise SystemExit(f"--schedule {args.schedule}: {args.shape} pools inside windows; use steps-K")
    try:
        settings = _recipe("fidelity").schedule_settings(args.schedule, tp.num_layers(plain), _num_patches(plain, one))
    except ValueError as err:
        raise SystemExit(f"--schedule: {err}") from None
    old = import_old(args.old)
    models = {"plain": plain}
    for method in args.methods:
        models[f"old {method}"] = old.patch_model(copy.deepcopy(plain), method=method, **settings)
        models[f"new {method}"] = tp.patch_model(copy.deepcopy(plain), method=method, **settings)
    flops = {name: tp.count_flops(m, one) for name, m in models.items()}
    rows = []
    for batch_size in args.batch_sizes:
        pixels = torch.randn(batch_size, 3, size, size)
        with torch.no_grad():
            outputs = {name: _output(m(pixel_values=pixels)) for name, m in models.items() if name != "plain"}
        t = tp.time_interleaved(models, pixels, warmup=args.warmup, repeats=args.repeats)
        for method in args.methods:
            difference = (outputs[f"old {method}"] - outputs[f"new {method}"]).abs().max().item()
            for version in ("old", "new"):
                name = f"{version} {method}"
                rows.append({"method": method, "version": version, "batch_size": batch_size,
                             **paired_row(t, name, "plain", flops[name] / flops["plain"]),
                             "max_abs_difference_old_new": difference})
    lines = [f"{args.shape}, schedule {args.schedule}, old = {args.old}, {args.repeats} interleaved repeats, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}", "",
             "| method | version | batch | speed-up (min-max) | of ideal | FLOPs ratio | images/s (plain) | max abs diff old-new |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['version']} | {r['batch_size']} | {r['speedup']:.3f}x ({r['speedup_min']:.2f}-"
                     f"{r['speedup_max']:.2f}) | {100 * r['speedup_of_ideal']:.0f}% | {r['flops_ratio']:.3f} | "
                     f"{r['images_per_s']:.1f} ({r['plain_images_per_s']:.1f}) | {r['max_abs_difference_old_new']:.1e} |")
    print("\n".join(lines))
    if args.output_dir:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        (args.output_dir / "results.json").write_text(json.dumps(
            {"rows": rows, "shape": args.shape, "schedule": args.schedule, "old": str(args.old),
             "repeats": args.repeats, "threads": torch.get_num_threads(), "torch": torch.__version__}, indent=2))
        (args.output_dir / "results.md").write_text("\n".join(lines) + "\n")
    return rows


if __name__ == "__main__":
    main()
