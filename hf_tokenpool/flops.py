"""Cost measurements shared by the demo, the recipe and the benchmark: FLOPs from torch's own counter
(never a hand-written formula) and images/s with warm-up and a median over repeated batches."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@torch.no_grad()
def count_flops(model: nn.Module, pixel_values: torch.Tensor) -> int:
    """FLOPs of one forward pass (torch.utils.flop_counter: matmuls, convolutions, attention)."""
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(pixel_values=pixel_values)
    finally:
        model.train(was_training)
    return counter.get_total_flops()


@torch.no_grad()
def images_per_second(model: nn.Module, pixel_values: torch.Tensor, *, warmup: int = 2, repeats: int = 5) -> float:
    """Median throughput over `repeats` timed forward passes of the batch, after `warmup` untimed ones.
    CUDA work is synchronised before each clock read."""
    was_training = model.training
    model.eval()
    sync = torch.cuda.synchronize if pixel_values.is_cuda else (lambda: None)
    times = []
    try:
        for i in range(warmup + repeats):
            sync()
            start = time.perf_counter()
            model(pixel_values=pixel_values)
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    finally:
        model.train(was_training)
    return pixel_values.shape[0] / statistics.median(times)
