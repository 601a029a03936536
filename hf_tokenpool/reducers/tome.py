"""ToMe bipartite soft matching (Bolya et al., ICLR 2023) as a reducer.

Tokens at even positions form set A, odd positions set B (positions among the pooled tokens: the official
code counts the protected ones too, so with one class token its two sets are these swapped, with a class and a
distillation token the same; docs/fidelity.md, section 6). Each A token finds its most similar B
token (cosine similarity of the attention keys); the r best-matched A tokens are merged into their B
match by size-weighted average, the other A tokens are kept. One round can remove at most |A| =
ceil(N/2) tokens, so a larger reduction runs further rounds on the result (a loop over rounds, a
handful at most, never over images).
"""

from __future__ import annotations

import torch

from .base import (
    PoolResult,
    Signals,
    check_reduce_args,
    identity_result,
    stable_descending_order,
    weighted_mean,
)


def _match_round(keys: torch.Tensor, r: int) -> torch.Tensor:
    """One round of bipartite matching on [B, n, D] keys, removing r <= ceil(n/2) tokens.

    Returns assign [B, n] into n - r rows laid out as [kept A tokens in their original order, then
    every B token in its original order] (ToMe's layout, except that ToMe leaves the kept A tokens in
    score order; original order keeps neighbouring patches together and makes the result readable).
    """
    b, n, _ = keys.shape
    metric = keys / keys.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    a, bb = metric[:, ::2], metric[:, 1::2]
    n_a, n_b = a.shape[1], bb.shape[1]
    best, match = (a @ bb.transpose(1, 2)).max(-1)  # [B, n_a]: each A token's best B partner
    order = stable_descending_order(best)  # ties go to the lower index
    n_kept = n_a - r
    kept = order[:, r:].sort(dim=-1).values  # the kept A tokens in their original order (distinct indices)
    # kept A tokens take rows 0 .. n_kept - 1 in that order; merged ones their B match's row
    a_assign = (n_kept + match).scatter(1, kept, torch.arange(n_kept, device=keys.device).expand(b, n_kept))
    b_assign = n_kept + torch.arange(n_b, device=keys.device).expand(b, n_b)
    # interleave back to the token order: A at even positions, B at odd ones (A has one more when n is odd)
    pairs = torch.stack([a_assign[:, :n_b], b_assign], dim=2).view(b, 2 * n_b)
    return pairs if n_a == n_b else torch.cat([pairs, a_assign[:, n_b:]], dim=1)


def tome(tokens: torch.Tensor, sizes: torch.Tensor, k: int, signals: Signals) -> PoolResult:
    """Merge [B, N, C] tokens down to k by (repeated) bipartite soft matching on signals.keys.

    Output rows: for a single round, the kept A tokens (even input positions, original order) then
    the B tokens (odd positions, original order), each B row being the size-weighted mean of itself
    and the A tokens merged into it. Several rounds compose their assignments; the output tokens are
    always the size-weighted means of the original tokens of each final group (a size-weighted mean
    of size-weighted means is exactly that), computed once in float32 and cast back.
    """
    check_reduce_args(tokens, sizes, k)
    if signals.keys is None:
        raise ValueError("tome needs signals.keys (attention keys averaged over heads); got None")
    if signals.keys.dim() != 3 or signals.keys.shape[:2] != tokens.shape[:2]:
        raise ValueError(f"keys must be [batch, num_tokens, dim] with batch, num_tokens = {tuple(tokens.shape[:2])}, got {tuple(signals.keys.shape)}")
    b, n, _ = tokens.shape
    if k == n:
        return identity_result(tokens, sizes)

    size_w = sizes.float()
    with torch.no_grad():  # matching is discrete; gradients flow through the final means
        keys = signals.keys.detach().float()
        cur_sizes, assign, cur = size_w.detach(), None, n
        while cur > k:
            r = min(cur - k, (cur + 1) // 2)
            step = _match_round(keys, r)
            cur -= r
            assign = step if assign is None else step.gather(1, assign)
            if cur > k:  # the next round's metric: keys merged the same size-weighted way as the tokens
                keys, cur_sizes = weighted_mean(keys, cur_sizes, step, cur, with_totals=True)

    # the size-weighted means, and their total sizes: the merged tokens' sizes
    out, new_sizes = weighted_mean(tokens.float(), size_w, assign, k, with_totals=True)
    return PoolResult(out.to(tokens.dtype), new_sizes.to(sizes.dtype), assign)
