"""Token Pooling with weighted K-Means (WK-Means).

Same weights (significance) and the same initialisation (the k most significant tokens) as
WK-Medoids, but centres are free points: each round assigns tokens to the nearest centre and moves
every centre to the weighted mean of its members. Distances to k centres are recomputed every round
(a [B, N, D] x [B, D, k] matmul), which is what makes it dearer than K-Medoids per iteration.
"""

from __future__ import annotations

import torch

from .base import PoolResult, Signals, check_reduce_args, cluster_sizes, identity_result, weighted_mean
from .tokenpool import cluster_argmin, clustering_features, heaviest, significance_weights


def _sq_dist(x: torch.Tensor, x_sq: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """[B, N, k] squared Euclidean distances, float32, given the points' squared norms x_sq [B, N] (computed
    once per call: the points do not move between rounds). One fused product-and-add per round."""
    c_sq = (centres * centres).sum(-1)
    return torch.baddbmm(x_sq.unsqueeze(2) + c_sq.unsqueeze(1), x, centres.transpose(1, 2), alpha=-2).clamp_min_(0)


def kmeans(tokens: torch.Tensor, sizes: torch.Tensor, k: int, signals: Signals, *, iterations: int = 5,
           metric: str = "auto") -> PoolResult:
    """Reduce [B, N, C] tokens to the k centres of significance-weighted K-Means.

    Every cluster keeps an *anchor*: one member forced into it at the next assignment (at first its
    initial token, then the member of its previous cluster nearest to the updated centre). Anchors
    come from disjoint clusters, so they never collide, and no cluster can ever come out empty: an
    empty cluster would be an output token that stands for no patch at all (size 0). In the ordinary
    case the anchor is nearest to its own centre anyway, so the forcing changes nothing.

    metric: cluster the tokens ("tokens"), the head-averaged keys ("keys", signals.keys), or "auto"
        (tokens while N <= channels, see tokenpool.clustering_features).
    The output tokens are the significance-weighted means of the final clusters (differentiable with
    respect to the tokens). All `iterations` rounds always run: no early exit, no host sync.
    """
    check_reduce_args(tokens, sizes, k)
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    w = significance_weights(signals, tokens, "kmeans")
    features = clustering_features(tokens, signals, metric, "kmeans")
    b, n, _ = tokens.shape
    if k == n:
        return identity_result(tokens, sizes)

    with torch.no_grad():
        x, wd = features, w.detach()
        x_sq = (x * x).sum(-1)
        arange_k = torch.arange(k, device=tokens.device).expand(b, k)
        anchors = heaviest(w, k)  # [B, k]
        centres = x.gather(1, anchors.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        # min().indices: argmin's first minimum, 2-4x faster on CPU
        assign = _sq_dist(x, x_sq, centres).min(-1).indices.scatter(1, anchors, arange_k)
        for _ in range(iterations):
            centres = weighted_mean(x, wd, assign, k)
            dist = _sq_dist(x, x_sq, centres)
            # each cluster's next anchor: the member of its previous cluster nearest to the updated centre,
            # a scatter-min over each token's distance to its own centre (O(N), not a masked [N, k] pass)
            anchors = cluster_argmin(dist.gather(2, assign.unsqueeze(-1)).squeeze(-1), assign, k)
            assign = dist.min(-1).indices.scatter(1, anchors, arange_k)

    out = weighted_mean(tokens.float(), w, assign, k).to(tokens.dtype)
    new_sizes = cluster_sizes(sizes.float(), assign, k).to(sizes.dtype)
    return PoolResult(out, new_sizes, assign)
