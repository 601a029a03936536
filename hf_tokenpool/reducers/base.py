"""The one signature every reducer shares.

A reducer is a pure tensor function. It knows nothing about models: it takes the pool-able tokens of a
batch (protected tokens such as CLS and the distillation token are cut off by the adapter before the
call and never reach a reducer), how many original patches each token already stands for, the number
of tokens to keep, and whichever attention signals it declared it needs; it returns the reduced tokens,
their sizes, and which output each input went to.

    reducer(tokens [B, N, C], sizes [B, N], k, signals, **options) -> PoolResult

Every image in the batch is reduced independently (no Python loop over images, no statistic shared
across the batch), so an image's output never depends on its neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Signals:
    """Attention-derived inputs a reducer may ask for (only the ones it declares are computed).

    significance: [B, N] total attention each token *receives*, summed over heads and over all
        queries (PoWER-BERT / Token Pooling). Needs explicit attention probabilities.
    keys: [B, N, D] attention keys averaged over heads (ToMe's similarity metric). Free under SDPA.
    cls_attention: [B, N] attention the class token pays to each token, averaged over heads (EViT).
        Needs the class token's row of the attention probabilities.
    """

    significance: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    cls_attention: torch.Tensor | None = None


@dataclass
class PoolResult:
    tokens: torch.Tensor | None  # [B, k, C] the reduced tokens (None only for tokenpool's output="assign")
    sizes: torch.Tensor | None  # [B, k] how many original patches each output token stands for (float)
    assign: torch.Tensor  # [B, N] long in [0, k): the output token each input token was pooled into


def check_reduce_args(tokens: torch.Tensor, sizes: torch.Tensor, k: int) -> None:
    if tokens.dim() != 3:
        raise ValueError(f"tokens must be [batch, num_tokens, channels], got shape {tuple(tokens.shape)}")
    if sizes.shape != tokens.shape[:2]:
        raise ValueError(f"sizes must be [batch, num_tokens] = {tuple(tokens.shape[:2])}, got {tuple(sizes.shape)}")
    n = tokens.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"cannot keep k={k} tokens out of {n}: k must be in [1, {n}]")


def _exporting() -> bool:
    return torch.compiler.is_exporting()


def stable_descending_order(values: torch.Tensor) -> torch.Tensor:
    """[B, N] indices that sort each row of `values` [B, N] descending, ties going to the lower index.

    torch.topk promises no order among equal values; a stable sort gives this order, but has no ONNX
    counterpart. So under torch.export (which the ONNX exporter runs) the order is built from ranks
    instead: token i's rank is the number of tokens that come before it (larger, or equal at a lower
    index), and the ranks are a permutation that one scatter inverts (O(N^2) comparisons, nothing
    data-dependent). Eager and torch.compile use the stable sort (O(N log N), ~60x faster at N=196);
    both give the same order, so a result is the same on every device and export format.
    """
    if not _exporting():
        return torch.sort(values, dim=-1, descending=True, stable=True).indices
    return _inverse_permutation(stable_descending_rank(values))


def stable_descending_rank(values: torch.Tensor) -> torch.Tensor:
    """[B, N] rank of each value in its row, descending, ties to the lower index (0 = first); the
    inverse permutation of `stable_descending_order`."""
    if not _exporting():
        return _inverse_permutation(stable_descending_order(values))
    n = values.shape[-1]
    v_i, v_j = values.unsqueeze(-1), values.unsqueeze(-2)  # [B, i, j]
    idx = torch.arange(n, device=values.device)
    before = (v_j > v_i) | ((v_j == v_i) & (idx.view(1, n) < idx.view(n, 1)))  # j comes before i
    return before.sum(-1)


def _inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    idx = torch.arange(perm.shape[-1], device=perm.device)
    return torch.empty_like(perm).scatter_(-1, perm, idx.expand_as(perm))


def identity_result(tokens: torch.Tensor, sizes: torch.Tensor) -> PoolResult:
    """k == N: nothing to pool; every token is its own cluster."""
    b, n, _ = tokens.shape
    assign = torch.arange(n, device=tokens.device).expand(b, n)
    return PoolResult(tokens, sizes, assign)


def weighted_mean(tokens: torch.Tensor, weights: torch.Tensor, assign: torch.Tensor, k: int,
                  with_totals: bool = False):
    """Per-image weighted cluster means: out[b, c] = sum_{i: assign=c} w_i x_i / sum_{i: assign=c} w_i;
    with_totals: (means, the clusters' total weights [B, k]), e.g. the merged sizes when w is the sizes."""
    b, n, c = tokens.shape
    w = weights.to(tokens.dtype)
    # one index_add over the flattened [B * k] clusters: about 2x faster on CPU than scatter_add_ with a
    # [B, N, C] index
    flat = (assign + torch.arange(0, b * k, k, device=assign.device).unsqueeze(1)).reshape(-1)
    num = tokens.new_zeros(b * k, c).index_add_(0, flat, (tokens * w.unsqueeze(-1)).reshape(b * n, c))
    den = w.new_zeros(b * k).index_add_(0, flat, w.reshape(-1))
    # divided in place: no second [B * k, C] buffer (these small passes add up between a model's layers)
    means = num.div_(den.clamp_min(torch.finfo(tokens.dtype).tiny).unsqueeze(-1)).view(b, k, c)
    return (means, den.view(b, k)) if with_totals else means


def cluster_sizes(sizes: torch.Tensor, assign: torch.Tensor, k: int) -> torch.Tensor:
    return sizes.new_zeros(sizes.shape[0], k).scatter_add_(1, assign, sizes)
