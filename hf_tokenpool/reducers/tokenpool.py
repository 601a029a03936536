"""Token Pooling with weighted K-Medoids (WK-Medoids), the variant Marin et al. found best.

Tokens are clustered by squared Euclidean distance, each token weighted by its significance (the
attention it receives), and every cluster is replaced by one token. Medoids are restricted to real
tokens, so the pairwise distance matrix is computed once per call and every iteration after that is
a gather, a batched matmul and an argmin: no Python loop over images.
"""

from __future__ import annotations

import torch

from .base import PoolResult, Signals, check_reduce_args, cluster_sizes, identity_result, weighted_mean

OUTPUTS = ("mean", "medoid", "assign")  # "assign" is for adapters (Swin), not a config setting


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


def heaviest(weights: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [B, k] of the k largest weights, ties going to the lower index.

    torch.topk does not promise an order among equal values; a stable descending sort does, so the
    initialisation (and thus the whole result) is deterministic and the same on every device.
    """
    return weights.sort(dim=-1, descending=True, stable=True).indices[:, :k]


def _nearest(dist: torch.Tensor, medoids: torch.Tensor) -> torch.Tensor:
    """Assign every token to its nearest medoid; each medoid is forced into its own cluster.

    Forcing matters only when two medoids are at distance 0 from each other (duplicate tokens): the
    argmin would give both to the first, leaving an empty cluster and an output row standing for
    nothing. Medoids are always distinct tokens, so the forced entries never conflict.
    """
    b, n, _ = dist.shape
    k = medoids.shape[1]
    to_medoids = dist.gather(2, medoids.unsqueeze(1).expand(b, n, k))  # [B, N, k]
    assign = to_medoids.argmin(-1)
    return assign.scatter(1, medoids, torch.arange(k, device=dist.device).expand(b, k))


def tokenpool(
    tokens: torch.Tensor,
    sizes: torch.Tensor,
    k: int,
    signals: Signals,
    *,
    iterations: int = 5,
    output: str = "mean",
) -> PoolResult:
    """Reduce [B, N, C] tokens to k clusters by significance-weighted K-Medoids.

    output="mean": each cluster becomes the significance-weighted mean of its members (the point that
        minimises the same weighted squared error the clustering minimises, and differentiable with
        respect to every member). Sizes are *not* multiplied into the weight: significance is measured
        on the current tokens, whose attention already reflects how much they stand for, and the
        sizes are carried separately in PoolResult.sizes.
    output="medoid": each cluster becomes its medoid token, as in the public re-implementation.
    output="assign": only the assignment is computed; the result's tokens and sizes are None (for an
        adapter that pools other tensors than the clustering features, as Swin does).
    iterations: assignment/update rounds after the top-k-by-weight initialisation (the paper reports
        convergence in about 5); the loop stops early once no medoid moves in the whole batch.
    """
    check_reduce_args(tokens, sizes, k)
    if output not in OUTPUTS:
        raise ValueError(f"tokenpool output must be one of {OUTPUTS}, got {output!r}")
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    w = significance_weights(signals, tokens, "tokenpool")
    b, n, _ = tokens.shape
    if k == n:
        return identity_result(tokens, sizes)

    with torch.no_grad():  # the clustering itself is discrete; gradients flow through the output only
        x = tokens.detach().float()  # bf16 distances would tie far too often
        sq = (x * x).sum(-1)
        dist = torch.baddbmm(sq.unsqueeze(2) + sq.unsqueeze(1), x, x.transpose(1, 2), alpha=-2).clamp_min_(0)
        dist.diagonal(dim1=1, dim2=2).zero_()  # exact zeros where rounding of the expansion would not give them

        medoids = heaviest(w, k)  # [B, k] token indices
        for _ in range(iterations):
            assign = _nearest(dist, medoids)
            # member_w[b, c, j] = w_j if token j is in cluster c else 0 (laid out [B, k, N] so the
            # argmin below runs over the contiguous last dim)
            member_w = w.new_zeros(b, k, n).scatter_(1, assign.unsqueeze(1), w.unsqueeze(1))
            # cost[b, c, m] = sum_{j in c} w_j D[j, m]: the weighted cost of making token m the medoid
            # of cluster c (D is symmetric); only members of c are candidates.
            cost = member_w @ dist
            cost.masked_fill_(member_w == 0, float("inf"))  # weights are > 0, so 0 means "not a member"
            new = cost.argmin(-1)  # [B, k]; every cluster holds its forced medoid, so none is empty
            if torch.equal(new, medoids):
                break
            medoids = new
        assign = _nearest(dist, medoids)

    if output == "assign":
        return PoolResult(None, None, assign)
    if output == "mean":
        out = weighted_mean(tokens.float(), w, assign, k).to(tokens.dtype)
    else:
        out = tokens.gather(1, medoids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    new_sizes = cluster_sizes(sizes.float(), assign, k).to(sizes.dtype)
    return PoolResult(out, new_sizes, assign)
