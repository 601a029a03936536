"""Token reducers: pure functions over [B, N, C], one file each, one registry.

`REDUCERS[name]` gives the function and the attention signals it needs, so an adapter computes
attention probabilities only where a reducer asks for them and keeps SDPA everywhere else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .base import PoolResult, Signals
from .kmeans import kmeans
from .tokenpool import tokenpool
from .tome import tome
from .topk import topk


@dataclass(frozen=True)
class Reducer:
    fn: Callable[..., PoolResult]
    needs: frozenset[str]  # subset of {"significance", "keys", "cls_attention"}
    options: frozenset[str] = frozenset()  # keyword options the function accepts


REDUCERS: dict[str, Reducer] = {
    "tokenpool": Reducer(tokenpool, frozenset({"significance", "keys"}), frozenset({"iterations", "output", "metric"})),
    "kmeans": Reducer(kmeans, frozenset({"significance", "keys"}), frozenset({"iterations", "metric"})),
    "tome": Reducer(tome, frozenset({"keys"})),
    "topk": Reducer(topk, frozenset({"cls_attention"})),
}

__all__ = ["REDUCERS", "PoolResult", "Reducer", "Signals"]
