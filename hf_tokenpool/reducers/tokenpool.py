"""Token Pooling with weighted K-Medoids (WK-Medoids), the variant Marin et al. found best.

Tokens are clustered by squared Euclidean distance, each token weighted by its significance (the
attention it receives), and every cluster is replaced by one token. Medoids are restricted to real
tokens, so the pairwise distance matrix is computed once per call. The search starts from the tokens
that are dearest to fold into a more significant neighbour (`merge_costs`), not from the most
significant ones: that start is what makes it more faithful than ToMe (docs/fidelity.md).

Cost. The distances are one [N, D] x [D, N] product per image, with D the clustering features: the
hidden states while N <= C, else the head-averaged attention keys (metric="auto"; ToMe's metric,
64-d for ViT-B instead of 768-d). An update round is one masked [N, N] reduction, or, with more tokens
than features (long sequences, clustered on keys), none: for squared Euclidean distances the cost of
making member m its cluster's medoid is
sum_{j in c} w_j |x_j - x_m|^2 = sum_{j in c} w_j |x_j - mu_c|^2 + W_c |x_m - mu_c|^2 (mu_c the cluster's
weighted mean, W_c its weight), so the new medoid is the member nearest to mu_c: O(N D). Each
cluster's best member is a scatter-min, O(N), then the assignment to the new medoids (a row minimum
over the medoids' columns).

Deployability. A fixed number of rounds, no early exit and no data-dependent Python branch: nothing
in here synchronises with the host, so it compiles without graph breaks, exports (torch.export,
ONNX) and traces. K-Medoids reaches a fixed point (the same medoids give the same assignment), so
the rounds after convergence change nothing and the result equals an early-exit loop's.
"""

from __future__ import annotations

import torch

from .base import (
    PoolResult,
    Signals,
    check_reduce_args,
    cluster_sizes,
    identity_result,
    stable_descending_order,
    stable_descending_rank,
    weighted_mean,
)

OUTPUTS = ("mean", "medoid", "assign")  # "assign" is for adapters (Swin), not a config setting
METRICS = ("auto", "tokens", "keys")
INITS = ("merge_cost", "significance")


def significance_weights(signals: Signals, tokens: torch.Tensor, name: str) -> torch.Tensor:
    """The per-token weight of WK-Medoids / WK-Means, float32 [B, N], every entry > 0.

    A floor of 1e-6 x the image's mean weight keeps a token whose significance underflowed to zero
    from giving its cluster a 0/0 mean (a lone such token then stands for itself) while changing
    nothing measurable elsewhere; an image whose weights are all zero falls back to uniform weights.
    """
    w = signals.significance
    if w is None:
        raise ValueError(f"{name} needs signals.significance (the attention each token receives); got None")
    if w.shape != tokens.shape[:2]:
        raise ValueError(f"significance must be [batch, num_tokens] = {tuple(tokens.shape[:2])}, got {tuple(w.shape)}")
    w = w.float().clamp_min(0)  # no detach: a mean may pass gradient into the attention too
    mean = w.mean(-1, keepdim=True)
    return torch.where(mean > 0, torch.maximum(w, 1e-6 * mean), torch.ones_like(w))


def clustering_features(tokens: torch.Tensor, signals: Signals, metric: str, name: str) -> torch.Tensor:
    """The float32 [B, N, D] points that are clustered: the tokens themselves, or the head-averaged keys.

    "auto" takes the tokens while there are no more tokens than channels, else the keys: the distance
    matrix costs 2 N^2 D FLOPs, about N / (12 C) of a layer's own 24 N C^2, so with D = C it stays
    under ~1% of the model only while N <= C (docs/fidelity.md has the measured trade-off).
    """
    if metric not in METRICS:
        raise ValueError(f"{name} metric must be one of {METRICS}, got {metric!r}")
    if metric == "auto":
        metric = "tokens" if tokens.shape[1] <= tokens.shape[2] or signals.keys is None else "keys"
    if metric == "tokens":
        return tokens.detach().float()
    if signals.keys is None:
        raise ValueError(f"{name} with metric='keys' needs signals.keys (attention keys averaged over heads); got None")
    if signals.keys.dim() != 3 or signals.keys.shape[:2] != tokens.shape[:2]:
        raise ValueError(f"keys must be [batch, num_tokens, dim] with batch, num_tokens = {tuple(tokens.shape[:2])}, "
                         f"got {tuple(signals.keys.shape)}")
    return signals.keys.detach().float()


def heaviest(weights: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [B, k] of the k largest weights, ties going to the lower index.

    A deterministic order (see `stable_descending_order`) makes the initialisation, and thus the whole
    result, the same on every device and in every export format.
    """
    return stable_descending_order(weights)[:, :k]


def pairwise_sq_dist(x: torch.Tensor) -> torch.Tensor:
    """[B, N, N] squared Euclidean distances of float32 [B, N, D] points, exact zeros on the diagonal.

    |x_j|^2 + |x_m|^2 - 2 x_j.x_m from one Gram matrix, updated in place: the squared norms are its
    diagonal, so the diagonal is (-2 g + g) + g = 0 exactly, and no [B, N, D] product is formed (at 196
    tokens, batch 8, 0.95 ms instead of 1.2 ms)."""
    gram = torch.bmm(x, x.transpose(1, 2))
    sq = gram.diagonal(dim1=1, dim2=2).clone()
    return gram.mul_(-2).add_(sq.unsqueeze(2)).add_(sq.unsqueeze(1)).clamp_min_(0)


def _nearest(dist: torch.Tensor, medoids: torch.Tensor) -> torch.Tensor:
    """Assign every token to its nearest medoid (the lowest token index on ties); each medoid is forced
    into its own cluster.

    The row minimum runs over all N columns with +inf added at the tokens that are not medoids, then a
    token index is mapped to its cluster: cheaper than gathering the [B, N, k] distances to the medoids.
    Forcing matters only when two medoids are at distance 0 from each other (duplicate tokens): the
    minimum would give both to the first, leaving an empty cluster and an output row standing for
    nothing. Medoids are always distinct tokens, so the forced entries never conflict.
    """
    b, n, _ = dist.shape
    k = medoids.shape[1]
    clusters = torch.arange(k, device=dist.device).expand(b, k)
    off = dist.new_full((b, 1, n), float("inf")).scatter_(2, medoids.unsqueeze(1), 0.0)
    nearest = (dist + off).min(-1).indices  # the first minimum, as argmin (and faster on CPU)
    cluster_of = torch.zeros(b, n, dtype=torch.long, device=dist.device).scatter_(1, medoids, clusters)
    return cluster_of.gather(1, nearest).scatter_(1, medoids, clusters)


def merge_costs(dist: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """[B, N] cost of folding each token into its nearest more significant token: w_j min_{i before j} D[j, i]
    (order: significance, ties to the lower index). The most significant token can fold nowhere (inf)."""
    rank = stable_descending_rank(w).to(torch.int32)  # int32 compares faster than int64 on CPU
    before = rank.unsqueeze(1) < rank.unsqueeze(2)  # [B, j, i]: i is more significant than j
    # a tensor fill rather than a Python scalar: 2x faster at N=196 on CPU
    nearest = torch.where(before, dist, dist.new_tensor(float("inf"))).amin(-1)
    return w * nearest


def cluster_argmin(cost: torch.Tensor, assign: torch.Tensor, k: int) -> torch.Tensor:
    """[B, k]: in every cluster, the member with the lowest cost (the lowest index on ties), in O(N)."""
    n = cost.shape[1]
    inf = cost.new_full((cost.shape[0], k), float("inf"))
    lowest = inf.scatter_reduce(1, assign, cost, "amin")
    index = torch.arange(n, device=cost.device).expand_as(assign)
    candidates = torch.where(cost == lowest.gather(1, assign), index, n)
    return torch.full_like(lowest, n, dtype=torch.long).scatter_reduce(1, assign, candidates, "amin")


def kmedoids(x: torch.Tensor, dist: torch.Tensor, w: torch.Tensor, k: int, iterations: int, init: str = "merge_cost"):
    """Weighted K-Medoids of float32 [B, N, D] points `x` with squared distances `dist` [B, N, N]:
    (medoids [B, k], assign [B, N]).

    Started from the k tokens with the largest merge costs (init="merge_cost") or the k heaviest
    ("significance"); each round assigns every token to its nearest medoid, then moves each medoid to
    the member m with the lowest cost sum_{j in cluster} w_j D[j, m]. That cost is a masked column sum
    of the weighted distances while N <= D; with more tokens than features, the member nearest to the
    cluster's weighted mean (module docstring), O(N D) instead of O(N^2). Both equal the dense cost's
    choice up to float rounding.
    """
    n, d = x.shape[1:]
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    medoids = heaviest(w, k) if init == "significance" else stable_descending_order(merge_costs(dist, w))[:, :k]
    assign = _nearest(dist, medoids)
    dense = n <= d
    weighted = w.unsqueeze(2) * dist if dense and iterations else None  # [B, j, m] = w_j D[j, m], once
    for _ in range(iterations):
        if dense:
            same = assign.unsqueeze(2) == assign.unsqueeze(1)  # [B, j, m]: j and m share a cluster
            cost = torch.where(same, weighted, dist.new_tensor(0.0)).sum(1)  # [B, m]
        else:
            means = weighted_mean(x, w, assign, k)  # [B, k, D]
            cost = (x - means.gather(1, assign.unsqueeze(-1).expand_as(x))).square().sum(-1)  # W_c |x_m - mu_c|^2 / W_c
        medoids = cluster_argmin(cost, assign, k)
        assign = _nearest(dist, medoids)
    return medoids, assign


def tokenpool(
    tokens: torch.Tensor,
    sizes: torch.Tensor,
    k: int,
    signals: Signals,
    *,
    iterations: int = 1,
    output: str = "mean",
    metric: str = "auto",
    size_weighted: bool = False,
    init: str = "merge_cost",
) -> PoolResult:
    """Reduce [B, N, C] tokens to k clusters by significance-weighted K-Medoids.

    metric="keys": cluster the head-averaged attention keys (signals.keys); "tokens": the tokens.
    output="mean": each cluster becomes the significance-weighted mean of its members (the point that
        minimises the weighted squared error the clustering minimises); differentiable with respect to
        every member. Sizes are not multiplied in: a token's significance already grows with the
        patches it stands for (proportional attention), and weighting by size x significance measured
        no better (docs/fidelity.md).
    output="medoid": each cluster becomes its medoid token, as in the public re-implementation.
    output="assign": only the assignment is computed; the result's tokens and sizes are None (for an
        adapter that pools other tensors than the clustering features, as Swin does).
    iterations: assignment/update rounds after the merge-cost start; always run in full (see the module
        docstring). The paper reports convergence in about 5; from the merge-cost start, 0, 1, 2 and 5
        rounds were equally faithful on every schedule measured (docs/fidelity.md), so the default is 1.
    init="merge_cost": the k tokens that are dearest to fold into a more significant neighbour start as
        medoids (see `merge_costs`); "significance": the k most significant (the public re-implementation).
    size_weighted: weigh the output mean by significance x size (an ablation, docs/fidelity.md).
    """
    check_reduce_args(tokens, sizes, k)
    if output not in OUTPUTS:
        raise ValueError(f"tokenpool output must be one of {OUTPUTS}, got {output!r}")
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    w = significance_weights(signals, tokens, "tokenpool")
    x = clustering_features(tokens, signals, metric, "tokenpool")
    if k == tokens.shape[1]:
        return identity_result(tokens, sizes)

    with torch.no_grad():  # the clustering itself is discrete; gradients flow through the output only
        medoids, assign = kmedoids(x, pairwise_sq_dist(x), w.detach(), k, iterations, init)

    if output == "assign":
        return PoolResult(None, None, assign)
    if output == "mean":
        out = weighted_mean(tokens.float(), w * sizes.float() if size_weighted else w, assign, k).to(tokens.dtype)
    else:
        out = tokens.gather(1, medoids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    new_sizes = cluster_sizes(sizes.float(), assign, k).to(sizes.dtype)
    return PoolResult(out, new_sizes, assign)
