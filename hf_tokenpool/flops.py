"""Cost measurements shared by the recipe and the benchmark: FLOPs from torch's own counter (never a
hand-written formula) and speed measured with contenders interleaved.

FLOPs: `torch.utils.flop_counter` has formulas for the CUDA SDPA kernels but none for CPU's fused
kernel (`aten._scaled_dot_product_flash_attention_for_cpu`), so on CPU it silently counts 0 FLOPs for
every `F.scaled_dot_product_attention` call while counting an explicit `softmax(q k^T) v` in full.
`count_flops` registers torch's own SDPA formula for that kernel too, so attention is counted the same
way on every device and whichever way a layer computes it.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

_aten = torch.ops.aten


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# The formulas torch lacks, in FlopCounterMode's custom_mapping form (functions of the argument shapes).
MISSING_FLOP_FORMULAS = {
    _aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flop,
}


def flop_counter_mode(**kwargs) -> FlopCounterMode:
    """`FlopCounterMode` that also counts CPU's fused SDPA kernel (see the module docstring)."""
    return FlopCounterMode(display=False, custom_mapping=dict(MISSING_FLOP_FORMULAS), **kwargs)


def image_forward(model: nn.Module, pixel_values: torch.Tensor):
    """One forward on images: `get_image_features` for image-text models (CLIPModel, SiglipModel, whose
    forward also needs text), the model itself otherwise."""
    if hasattr(model, "get_text_features") and hasattr(model, "get_image_features"):
        return model.get_image_features(pixel_values=pixel_values)
    return model(pixel_values=pixel_values)


@torch.no_grad()
def count_flops(model: nn.Module, pixel_values: torch.Tensor) -> int:
    """FLOPs of one forward pass on images (image-text models: their image features): matmuls,
    convolutions and attention (SDPA on every device), as counted by torch.utils.flop_counter.
    Element-wise work (softmax, norms, activations) is not counted."""
    was_training = model.training
    model.eval()
    try:
        with flop_counter_mode() as counter:
            image_forward(model, pixel_values)
    finally:
        model.train(was_training)
    return counter.get_total_flops()


def _timed_forward(model: nn.Module, pixel_values: torch.Tensor, sync) -> float:
    sync()
    start = time.perf_counter()
    image_forward(model, pixel_values)
    sync()
    return time.perf_counter() - start


@torch.no_grad()
def time_interleaved(models: dict[str, nn.Module], pixel_values: torch.Tensor, *, warmup: int = 1,
                     repeats: int = 7) -> dict[str, dict]:
    """Images/s of several models on the same batch, timed in turn so that a change in machine load hits
    every contender alike. Each model first runs `warmup` untimed forwards.

    The turn rotates from one round to the next (A B C, B C A, C A B, ...), so that every model follows every
    other one equally often: in a fixed order a model that runs right after another with the same token
    counts finds the allocator and caches ready for its shapes, and an identical copy timed after the
    original came out about 2% faster (DeiT-S, r = 13, batch 1 and 8; none of that left with the rotation).

    Returns {name: {"images_per_second": median, "min": slowest, "max": fastest, "repeats": n,
    "seconds": [each timed forward]}} (the spread as images/s of the slowest and fastest of the n timed
    forwards; "seconds" in timing order, so that ratios can be paired repeat by repeat). CUDA work is
    synchronised around each clock read.
    """
    if not models:
        raise ValueError("time_interleaved needs at least one model")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    sync = torch.cuda.synchronize if pixel_values.is_cuda else (lambda: None)
    modes = {name: m.training for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    try:
        for m in models.values():
            m.eval()
        names = list(models)
        for i in range(warmup + repeats):
            start = i % len(names)
            for name in names[start:] + names[:start]:
                t = _timed_forward(models[name], pixel_values, sync)
                if i >= warmup:
                    times[name].append(t)
    finally:
        for name, m in models.items():
            m.train(modes[name])
    batch = pixel_values.shape[0]
    return {name: {"images_per_second": batch / statistics.median(ts), "min": batch / max(ts),
                   "max": batch / min(ts), "repeats": len(ts), "seconds": ts} for name, ts in times.items()}


def images_per_second(model: nn.Module, pixel_values: torch.Tensor, *, warmup: int = 2, repeats: int = 7) -> float:
    """Median throughput of one model over `repeats` timed forwards after `warmup` untimed ones.
    To compare two models, use `time_interleaved`: timings taken apart are not comparable."""
    return time_interleaved({"model": model}, pixel_values, warmup=warmup, repeats=repeats)["model"]["images_per_second"]
