"""EViT-style attentive token selection (Liang et al., ICLR 2022) as a reducer.

Keep the k - 1 tokens the class token attends to most and fuse all the others into one token, their
average weighted by class attention x size, so no patch is dropped outright.
"""

from __future__ import annotations

import torch

from .base import PoolResult, Signals, check_reduce_args, cluster_sizes, identity_result, stable_descending_order


def topk(tokens: torch.Tensor, sizes: torch.Tensor, k: int, signals: Signals) -> PoolResult:
    """Reduce [B, N, C] tokens to k: the k - 1 most attended tokens (descending attention, ties to
    the lower index), then one fused token (last row). k == 1 fuses everything into one token.
    """
    check_reduce_args(tokens, sizes, k)
    attn = signals.cls_attention
    if attn is None:
        raise ValueError("topk needs signals.cls_attention (the class token's attention to each token); got None")
    if attn.shape != tokens.shape[:2]:
        raise ValueError(f"cls_attention must be [batch, num_tokens] = {tuple(tokens.shape[:2])}, got {tuple(attn.shape)}")
    b, n, c = tokens.shape
    if k == n:
        return identity_result(tokens, sizes)

    # a deterministic choice among equal attentions, the same on every device and export format
    order = stable_descending_order(attn.detach().float())
    keep, rest = order[:, : k - 1], order[:, k - 1 :]
    assign = torch.full((b, n), k - 1, dtype=torch.long, device=tokens.device)
    assign.scatter_(1, keep, torch.arange(k - 1, device=tokens.device).expand(b, k - 1))

    kept = tokens.gather(1, keep.unsqueeze(-1).expand(b, k - 1, c))  # exact copies, not x*w/w
    x_rest = tokens.float().gather(1, rest.unsqueeze(-1).expand(b, n - k + 1, c))
    w_rest = attn.float().gather(1, rest).clamp_min(0) * sizes.float().gather(1, rest)
    # if every fused token's attention underflowed to zero, fall back to a size-weighted average
    total = w_rest.sum(-1, keepdim=True)
    w_rest = torch.where(total > 0, w_rest, sizes.float().gather(1, rest))
    fused = (x_rest * w_rest.unsqueeze(-1)).sum(1, keepdim=True) / w_rest.sum(-1, keepdim=True).unsqueeze(-1)

    out = torch.cat([kept, fused.to(tokens.dtype)], dim=1)
    new_sizes = cluster_sizes(sizes.float(), assign, k).to(sizes.dtype)
    return PoolResult(out, new_sizes, assign)
