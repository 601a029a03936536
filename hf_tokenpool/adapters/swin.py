"""Swin: pool -> compute -> unpool inside each window of each block.

Window attention needs the full H x W grid, and `SwinPatchMerging` needs it again before every
downsampling, so the grid is kept at every block boundary (docs/swin.md has the picture):

    window tokens x [A]  --cluster-->  k centres c  --the block (LN, window attention, LN, MLP)-->  c'
    each token gets its cluster's update:  x_j <- x_j + (c' - c)[cluster(j)]

Attention and MLP then run on k = round(A * keep) tokens per window instead of A. The attention
between clusters keeps Swin's geometry: the relative position bias is read at each cluster's mean
position, and the shifted-window mask becomes log(number of members of key cluster d that the query
cluster c may see), which is exact for clusters inside one region and also gives proportional
attention. Clustering features carry a large region code, so clusters do not straddle shift regions or
padding. Clustering iterations (tokenpool, kmeans) are capped at SWIN_MAX_ITERATIONS = 1 in Swin windows:
with hf_tokenpool 0.1's spread-out start a 49-token window was already within ~0.2% of the converged
K-Medoids objective and top-1 of the Fashion-MNIST Swin checkpoint at keep=0.6 was no lower (2000 test
images: 83.2% with 1, 82.5% with 2 and 5 iterations), and each iteration is ~10 batched ops over
thousands of windows. The start is now the merge-cost one (reducers/tokenpool.py; the spread prior
breaks ties among Swin's uniform weights), which made pooled Swin far more faithful (docs/fidelity.md).

Speed (docs/swin.md, "Speed"): the registered reducers run as Swin-specific versions of the same
algorithms (window_kmedoids, window_kmeans, window_tome), the shape-only layouts are cached, the grid goes
into windows and back by one gather each (`gather_windows`, `unpool`: the shift and partition permutation is
a cached constant), attention is an explicit softmax on contiguous heads, and the shift mask is -1000 rather
than -100 (no denormals).
Patching swaps `SwinLayer.__class__` only: no new parameters, `state_dict` keys unchanged.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.swin.modeling_swin import SwinLayer, window_partition

from ..config import TokenPoolConfig
from ..reducers import REDUCERS, Reducer, Signals
from ..reducers.base import stable_descending_order, stable_descending_rank, weighted_mean
from ..reducers.kmeans import kmeans as _kmeans
from ..reducers.tokenpool import tokenpool as _tokenpool
from ..reducers.tome import _match_round
from ..reducers.tome import tome as _tome
from .vit import pooled_class, project_qkv, restore_class, swap_class

SWIN_MAX_ITERATIONS = 1  # `iterations` is min(config.iterations, this) in Swin windows (module docstring)
# The attention bias between clusters of different shift regions. Upstream's -100 leaves probabilities of
# ~e^-100 = 4e-44, float32 denormals, which make the next matmul (and upstream's own) up to ~10x slower on
# CPU; at -1000 they are exact zeros, a difference below 1e-43 in every probability.
SWIN_MASKED = -1000.0


@dataclass
class BlockPlan:
    keep: float
    reducer: Reducer
    config: TokenPoolConfig
    priors: dict[int, tuple[float, ...]]  # window size -> spread prior, computed at patch time


@functools.lru_cache(maxsize=None)
def spread_prior(ws: int) -> tuple[float, ...]:
    """Farthest-point order over a ws x ws window, as a score in (0, 1] per position (row-major): with
    uniform weights the reducers start from the top-scored tokens, so their initial centres are spread
    over the window. Plain Python (no tensors), so it can be cached and computed at patch time."""
    coords = [(r, c) for r in range(ws) for c in range(ws)]
    centre = (ws - 1) / 2
    first = min(range(len(coords)), key=lambda i: math.dist(coords[i], (centre, centre)))
    order, nearest = [first], [math.dist(p, coords[first]) for p in coords]
    for _ in range(len(coords) - 1):
        nxt = max(range(len(coords)), key=lambda i: nearest[i])  # first maximum, as argmax
        order.append(nxt)
        nearest = [min(d, math.dist(p, coords[nxt])) for d, p in zip(nearest, coords)]
    area = ws * ws
    step = (1.0 / area - 1.0) / max(area - 1, 1)
    score = [0.0] * area
    for rank, i in enumerate(order):
        score[i] = 1.0 + rank * step
    return tuple(score)


_CONSTANTS: dict = {}


def cached(key, make):
    """Shape-only tensors, made once per key in eager mode (every block of a stage shares them). Under
    torch.compile / torch.export / jit.trace they are made afresh, so that they become constants of the
    graph (a tensor cached during tracing would be a fake one). Made outside inference mode, so a later
    forward that records gradients may use them."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return make()
    value = _CONSTANTS.get(key)
    if value is None:
        with torch.inference_mode(False), torch.no_grad():
            value = _CONSTANTS[key] = make()
    return value


@dataclass(frozen=True)
class WindowLayout:
    """Per-(window size, shift, grid) constants of a block, from tensor ops on shapes only (so they
    trace, compile and export as constants), cached per (window size, shift, grid, device) in eager mode.

    pad: [nW, area] bool, True at padding positions, or None when the grid needs no padding.
    num_regions: the number of region ids in use (1: every window is a single region).
    region_code: [nW, area, num_regions] float32 one-hot of each position's region id (shift region x
        real/padding, numbered as upstream's get_attn_mask numbers the shift regions); None if 1 region.
    stats: [nW, area, 2 + R + 1] float32: each position's (row, col) in the window, then region_code
        (R = num_regions columns, none with 1 region), then a 1, so that one matmul with the cluster
        one-hot gives every cluster's coordinate sums, region counts and size.
    apart: [nW, area, area] float32, 1 where two positions have different region ids (None if 1 region):
        the squared distance that Swin's region code adds between them, in units of 2 x code scale^2.
    window_gather: [nW * area] long, the (padded) grid position of every window position: upstream's
        cyclic shift then window_partition, as one gather (`gather_windows`).
    grid_gather: [height * width] long, the window position of every (unpadded) grid position: the inverse,
        for window_reverse then the reverse shift as one gather (`unpool`).
    """

    pad: torch.Tensor | None
    num_regions: int
    region_code: torch.Tensor | None
    stats: torch.Tensor
    window_gather: torch.Tensor
    grid_gather: torch.Tensor
    apart: torch.Tensor | None = None


def window_layout(ws: int, shift: int, height: int, width: int, device) -> WindowLayout:
    return cached(("layout", ws, shift, height, width, str(device)),
                  lambda: _window_layout(ws, shift, height, width, device))


def _window_layout(ws: int, shift: int, height: int, width: int, device) -> WindowLayout:
    height_pad, width_pad = math.ceil(height / ws) * ws, math.ceil(width / ws) * ws
    padded = height_pad != height or width_pad != width
    shift_regions = 9 if shift > 0 else 1
    num_regions = shift_regions * (2 if padded else 1)
    coords = torch.stack(torch.meshgrid(torch.arange(ws, device=device), torch.arange(ws, device=device),
                                        indexing="ij"), -1).view(1, -1, 2).float()
    num_windows = (height_pad // ws) * (width_pad // ws)
    coords = torch.cat([coords, torch.ones_like(coords[..., :1])], dim=-1).expand(num_windows, -1, -1)
    grid = torch.arange(height_pad * width_pad, device=device).view(1, height_pad, width_pad, 1)
    if shift > 0:  # SwinLayer.cyclic_shift
        grid = torch.roll(grid, shifts=(-shift, -shift), dims=(1, 2))
    window_gather = window_partition(grid, ws).reshape(-1)
    inverse = torch.empty_like(window_gather).scatter_(0, window_gather,
                                                       torch.arange(window_gather.numel(), device=device))
    grid_gather = inverse.view(height_pad, width_pad)[:height, :width].reshape(-1)  # padding dropped
    gathers = dict(window_gather=window_gather, grid_gather=grid_gather)
    if num_regions == 1:
        return WindowLayout(pad=None, num_regions=1, region_code=None, stats=coords.contiguous(), **gathers)
    h_idx, w_idx = torch.arange(height_pad, device=device), torch.arange(width_pad, device=device)
    if shift > 0:  # upstream get_attn_mask's regions, already in the shifted frame
        h_region = (h_idx >= height_pad - ws).long() + (h_idx >= height_pad - shift).long()
        w_region = (w_idx >= width_pad - ws).long() + (w_idx >= width_pad - shift).long()
    else:
        h_region, w_region = torch.zeros_like(h_idx), torch.zeros_like(w_idx)
    region = (h_region[:, None] * 3 + w_region[None, :])[None, :, :, None]
    pad = ((h_idx >= height)[:, None] | (w_idx >= width)[None, :]).long()[None, :, :, None]
    if shift > 0:  # padding is defined in the unshifted frame (SwinLayer.cyclic_shift)
        pad = torch.roll(pad, shifts=(-shift, -shift), dims=(1, 2))
    ids = window_partition(region + shift_regions * pad, ws).reshape(num_windows, ws * ws)
    code = (ids.unsqueeze(-1) == torch.arange(num_regions, device=device)).float()
    return WindowLayout(pad=ids >= shift_regions if padded else None, num_regions=num_regions,
                        region_code=code, stats=torch.cat([coords[..., :2], code, coords[..., 2:]], dim=-1),
                        apart=(ids.unsqueeze(2) != ids.unsqueeze(1)).float(), **gathers)


def gather_windows(layer: nn.Module, hidden_states: torch.Tensor, layout: WindowLayout, height: int, width: int):
    """[B*nW, area, C]: window_partition(cyclic_shift(maybe_pad(grid))) of [B, H*W, C] tokens, as upstream's
    Swin and Swinv2 layers partition them, in one gather instead of a copy per step (padding still pads)."""
    batch_size, _, channels = hidden_states.shape
    source = hidden_states
    if layout.pad is not None:
        source = layer.maybe_pad(hidden_states.view(batch_size, height, width, channels), height, width)[0]
    area = layout.stats.shape[1]
    return source.reshape(batch_size, -1, channels).index_select(1, layout.window_gather).view(-1, area, channels)


def unpool(hidden_states: torch.Tensor, delta: torch.Tensor, assign: torch.Tensor, layout: WindowLayout):
    """[B, H*W, C]: every token plus its cluster's update, x_j + delta[window(j), cluster(j)], in grid order:
    window_reverse, the reverse shift and the crop of (windows + each token's update) as one gather of delta's
    rows and one add on the block's own input, which holds the same values as the windows (bit-identical to
    the former one-hot^T @ delta product, whose every column picked exactly one row)."""
    batch_size, _, channels = hidden_states.shape
    num_windows, k = delta.shape[:2]
    rows = assign + torch.arange(num_windows, device=assign.device).unsqueeze(1) * k  # [B*nW, area]
    rows = rows.view(batch_size, -1).index_select(1, layout.grid_gather)  # [B, H*W]
    update = delta.reshape(-1, channels).index_select(0, rows.reshape(-1)).view_as(hidden_states)
    return hidden_states + update.to(hidden_states.dtype)


@dataclass(frozen=True)
class UniformWeights:
    """Swin's clustering weights over a ws x ws window, the same for every window: 1 + 1e-3 x the spread
    prior (uniform, the prior breaking ties), as float32 [area], with what the reducers derive from them.

    order: [area] the positions by descending weight (ties to the lower index); kmeans starts at its first k.
    later: [area, area] float32, 0 where position i comes before j in that order and +inf elsewhere
        ([j, i]): added to the distances, its row minimum is j's distance to the nearest token before it.
    """

    weights: torch.Tensor
    order: torch.Tensor
    later: torch.Tensor


def uniform_weights(ws: int, device) -> UniformWeights:
    def make():
        w = 1.0 + 1e-3 * torch.tensor(spread_prior(ws), device=device)
        rank = stable_descending_rank(w[None])[0]
        before = rank.unsqueeze(0) < rank.unsqueeze(1)  # [j, i]: i comes before j
        later = torch.zeros(w.numel(), w.numel(), device=device).masked_fill(~before, float("inf"))
        return UniformWeights(weights=w, order=stable_descending_order(w[None])[0], later=later)
    return cached(("weights", ws, str(device)), make)


# ---- per-window clustering, shared with the Swinv2 adapter (swinv2.py) --------------------------------

def window_assignment(plan: BlockPlan, points: torch.Tensor, layout: WindowLayout, ws: int, k: int,
                      batch_size: int) -> torch.Tensor:
    """[B*nW, area] cluster of every window token. points: [B*nW, area, C] the clustering features (Swin:
    the normed tokens; also ToMe's keys). Uniform weights with the spread prior breaking their ties, and a
    large region code appended so that clusters keep to one shift region (and off padding).

    The registered reducers run as Swin-specific versions of the same algorithms (`window_kmedoids`,
    `window_kmeans`, `window_tome`): with weights that are the same in every window, their start and
    ranks are constants, and only the assignment is needed. A reducer function swapped in from outside
    (an ablation binding its options) runs as it is."""
    iterations = min(SWIN_MAX_ITERATIONS if plan.config.iterations is None else plan.config.iterations,
                     SWIN_MAX_ITERATIONS)
    fn = plan.reducer.fn
    if fn is _tokenpool:
        return window_kmedoids(points, layout, ws, k, iterations, batch_size)
    if fn is _kmeans:
        return window_kmeans(region_features(points, layout, batch_size), ws, k, iterations)
    if fn is _tome:
        return window_tome(points, k)
    ones = points.new_ones(points.shape[:2], dtype=torch.float32)
    options = plan.config.reducer_options(plan.reducer.options)
    if "iterations" in plan.reducer.options:
        options["iterations"] = iterations
    if plan.config.method == "tome":
        signals, features = Signals(keys=points), points
    else:
        prior = plan.priors.get(ws) or spread_prior(ws)  # patch time covers the usual window sizes
        signals = Signals(significance=1.0 + 1e-3 * torch.tensor(prior, device=points.device).expand_as(ones))
        features = region_features(points, layout, batch_size)
        if "metric" in options:
            options["metric"] = "tokens"  # the points (+ region code) are the features here
        if plan.config.method == "tokenpool":
            options["output"] = "assign"  # only the assignment: the adapters average the raw tokens
    return plan.reducer.fn(features, ones, k, signals, **options).assign


def region_code_scale(channels: int) -> float:
    """Swin's region code: one-hot x 10 sqrt(C), far beyond the spread of normed tokens (2 C apart)."""
    return 10.0 * math.sqrt(channels)


def region_features(points: torch.Tensor, layout: WindowLayout, batch_size: int) -> torch.Tensor:
    """The points with the scaled region code appended (the points themselves with a single region)."""
    if layout.region_code is None:
        return points
    code = (layout.region_code * region_code_scale(points.shape[-1])).to(points.dtype)
    return torch.cat([points, code.repeat(batch_size, 1, 1)], dim=-1)


def first_k_descending(values: torch.Tensor, k: int) -> torch.Tensor:
    """The first k of reducers.base.stable_descending_order (ties to the lower index): a stable sort,
    or under torch.export (no ONNX counterpart of a stable sort) the O(N^2) ranks."""
    if torch.compiler.is_exporting():
        rank = stable_descending_rank(values)
        idx = torch.arange(values.shape[-1], device=values.device)
        return torch.empty_like(rank).scatter_(-1, rank, idx.expand_as(rank))[:, :k]
    return torch.sort(values, dim=-1, descending=True, stable=True).indices[:, :k]


def nearest_medoid(dist: torch.Tensor, medoids: torch.Tensor) -> torch.Tensor:
    """reducers.tokenpool._nearest over a window's few medoids: every token to its nearest medoid (the
    first medoid on ties, where _nearest takes the lowest token index), each medoid forced into its own
    cluster. `min().indices` is argmin's first minimum, and faster on CPU."""
    num, area, _ = dist.shape
    k = medoids.shape[1]
    assign = dist.gather(2, medoids.unsqueeze(1).expand(num, area, k)).min(-1).indices
    return assign.scatter(1, medoids, torch.arange(k, device=dist.device).expand(num, k))


@torch.no_grad()
def window_kmedoids(points: torch.Tensor, layout: WindowLayout, ws: int, k: int, iterations: int,
                    batch_size: int) -> torch.Tensor:
    """tokenpool's K-Medoids (reducers/tokenpool.py: merge-cost start, `iterations` update rounds) on the
    points of every window with Swin's uniform weights and region code, returning the assignment.

    The same algorithm in fewer and cheaper operations: the squared norms are the Gram matrix's diagonal
    (so the diagonal distances are exact zeros); the region code enters as the squared distance it adds
    (2 x scale^2 between regions) instead of as appended features; the weight order is a constant, so the
    merge costs are one masked row minimum; an update round's costs sum_{j in c} w_j D[j, m] are one
    batched matmul of the weighted one-hot with the distances, +inf outside the cluster. Equal to the
    reducer up to float rounding."""
    x = points.detach().float()
    num, area, channels = x.shape
    uniform = uniform_weights(ws, x.device)
    w = uniform.weights
    gram = torch.bmm(x, x.transpose(1, 2))
    sq = gram.diagonal(dim1=1, dim2=2)
    dist = sq.unsqueeze(2) + sq.unsqueeze(1)  # |x_j|^2 + |x_m|^2 (- 2 x_j.x_m below): exact zeros on the diagonal
    if layout.apart is not None:
        apart = layout.apart * (2.0 * region_code_scale(channels) ** 2)
        dist.view(batch_size, -1, area, area).add_(apart)
    dist = dist.sub_(gram, alpha=2).clamp_min_(0)
    merge = w * (dist + uniform.later).amin(-1)  # w_j x distance to the nearest token before j
    medoids = first_k_descending(merge, k)
    assign = nearest_medoid(dist, medoids)
    for _ in range(iterations):
        index = assign.unsqueeze(1)
        weighted = torch.zeros(num, k, area, device=x.device).scatter_(1, index, w.expand(num, 1, area))
        outside = torch.full((num, k, area), float("inf"), device=x.device).scatter_(1, index, 0.0)
        # [c, m] = sum_{j in c} w_j D[j, m], +inf where m is not in c: m's row is its cost as c's medoid
        cost = torch.baddbmm(outside, weighted, dist)
        medoids = cost.min(-1).indices
        assign = nearest_medoid(dist, medoids)
    return assign


@torch.no_grad()
def window_kmeans(features: torch.Tensor, ws: int, k: int, iterations: int) -> torch.Tensor:
    """reducers/kmeans.py (anchored weighted K-Means) on the features of every window with Swin's uniform
    weights, returning the assignment: the start (the k heaviest) is a constant, the weighted means are
    one batched matmul with the weighted one-hot, and the final means are not computed. Equal to the
    reducer up to float rounding."""
    x = features.detach().float()
    num, area, _ = x.shape
    uniform = uniform_weights(ws, x.device)
    w = uniform.weights
    arange_k = torch.arange(k, device=x.device).expand(num, k)
    anchors = uniform.order[:k]
    sq = (x * x).sum(-1, keepdim=True)

    def sq_dist(centres):  # [num, area, k]
        return torch.baddbmm(sq + (centres * centres).sum(-1).unsqueeze(1), x, centres.transpose(1, 2),
                             alpha=-2).clamp_min_(0)

    assign = sq_dist(x.index_select(1, anchors)).min(-1).indices.scatter(1, anchors.expand(num, k), arange_k)
    for _ in range(iterations):
        weighted = torch.zeros(num, k, area, device=x.device).scatter_(1, assign.unsqueeze(1), w.expand(num, 1, area))
        dist = sq_dist(torch.bmm(weighted, x) / weighted.sum(-1, keepdim=True))
        own = weighted.transpose(1, 2) > 0  # [num, area, k]: the previous membership
        anchors_now = torch.where(own, dist, float("inf")).min(1).indices  # [num, k]
        assign = dist.min(-1).indices.scatter(1, anchors_now, arange_k)
    return assign


@torch.no_grad()
def window_tome(points: torch.Tensor, k: int) -> torch.Tensor:
    """reducers/tome.py's (repeated) bipartite matching on the points of every window, returning the
    assignment only (the merged tokens are not computed)."""
    keys = points.detach().float()
    num, cur = keys.shape[:2]
    sizes, assign = None, None
    while cur > k:
        r = min(cur - k, (cur + 1) // 2)
        step = _match_round(keys, r)
        cur -= r
        assign = step if assign is None else step.gather(1, assign)
        if cur > k:  # the next round's metric: keys merged the same size-weighted way as the tokens
            sizes = keys.new_ones(num, keys.shape[1]) if sizes is None else sizes
            keys, sizes = weighted_mean(keys, sizes, step, cur, with_totals=True)
    return assign


def window_clusters(assign: torch.Tensor, k: int, raw: torch.Tensor, layout: WindowLayout, batch_size: int):
    """From the [B*nW, area] assignment: members [B*nW, k, area] (one-hot, raw's dtype), sizes [B*nW, k]
    (float32, every cluster non-empty), stats [B*nW, k, 2 + regions + 1] (coordinate sums, region counts,
    sizes) and the centres [B*nW, k, C] (cluster means of raw), all by batched matmuls with the one-hot."""
    num_windows, area, _ = raw.shape
    one_hot = torch.zeros(num_windows, k, area, dtype=torch.float32, device=raw.device)
    one_hot.scatter_(1, assign.unsqueeze(1), 1.0)  # [B*nW, k, area]
    stats = torch.matmul(one_hot.view(batch_size, -1, k, area), layout.stats).view(num_windows, k, -1)
    sizes = stats[..., -1]
    members = one_hot if raw.dtype == torch.float32 else one_hot.to(raw.dtype)
    centres = torch.bmm(members, raw) / sizes.unsqueeze(-1).to(raw.dtype)
    return members, sizes, stats, centres


def mean_positions(stats: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """[B*nW, k, 2] float (row, col) of each cluster's mean position in its window."""
    return stats[..., :2] / sizes.unsqueeze(-1)


def bias_at_mean_positions(table: torch.Tensor, stats, sizes, ws: int) -> torch.Tensor:
    """[B*nW, heads, k, k] (contiguous): a [(2ws-1)^2, heads] relative-position table read at the offsets of
    the clusters' rounded mean positions."""
    span = 2 * ws - 1
    centre = mean_positions(stats, sizes).round_()  # [W, k, 2], integers
    flat = centre[..., 0] * span + centre[..., 1]
    # upstream's flat relative index (dy + ws - 1) * (2ws - 1) + (dx + ws - 1), from flat positions
    index = (flat.unsqueeze(2) - flat.unsqueeze(1) + (ws - 1) * (2 * ws)).long()  # [W, k, k]
    bias = table.index_select(0, index.view(-1)).view(*index.shape, -1)  # [W, k, k, heads]
    return bias.permute(0, 3, 1, 2).contiguous()  # [W, heads, k, k]


def region_bias(stats, sizes, num_regions: int, proportional: bool, masked: float = -100.0):
    """The float32 attention-bias term for the shift mask and proportional attention, broadcastable to
    [B*nW, heads, k, k], or None when there is none: log(members of key cluster d in the query cluster's
    majority region), or that count divided by d's size without proportional attention; `masked` where it is 0
    (log 0 = -inf clamped: every non-zero count is >= 1, a fraction >= 1 / area, so far above `masked`)."""
    k = sizes.shape[1]
    if num_regions == 1:  # every key member is visible to every query cluster
        return sizes.log()[:, None, None, :] if proportional else None
    # members of each key cluster per region; the query cluster's region is its majority region
    counts = stats[..., 2:2 + num_regions]  # [W, k, regions]
    query_region = counts.argmax(-1)  # [W, k]
    visible = counts.gather(2, query_region[:, None, :].expand(-1, k, -1)).transpose(1, 2)  # [W, q, key]
    if not proportional:
        visible = visible / sizes[:, None, :]
    return visible.log().clamp_min(masked)[:, None]


def spread_attention(members: torch.Tensor, sizes: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Per-token attention maps [B*nW, heads, area, area] from the clusters' [B*nW, heads, k, k]: each
    cluster's attention spread evenly over its members (rows still sum to one)."""
    return members.transpose(1, 2)[:, None] @ probs @ (members / sizes.unsqueeze(-1))[:, None]


class TokenPoolSwinLayer(nn.Module):
    """Replaces transformers.models.swin.modeling_swin.SwinLayer.forward (5.x) in pooled blocks; the
    window handling is upstream's (set_shift_and_window_size, maybe_pad; cyclic_shift and window_partition as
    one gather, `gather_windows`).

    Everything a window needs is computed once per block from the [windows, k, area] one-hot of the
    cluster assignment: batched matmuls give the cluster means, sizes, mean positions and region counts;
    the unpool gathers each token's cluster update straight into grid order (`unpool`). Region ids,
    positions, the spread prior and the window gathers depend only on (window size, shift, grid) and are
    cached.
    """

    def forward(self, hidden_states, input_dimensions, always_partition=False, **kwargs):
        plan: BlockPlan = self._tokenpool
        if not always_partition:
            self.set_shift_and_window_size(input_dimensions)
        ws = self.window_size
        area = ws * ws
        k = int(math.floor(area * plan.keep + 0.5))
        if plan.keep >= 1.0 or k >= area:
            return super().forward(hidden_states, input_dimensions, always_partition=True, **kwargs)
        if k < 1:
            raise ValueError(f"Swin windows of {area} tokens are too small for keep={plan.keep} (it would keep "
                             f"{k}); use a larger keep")
        height, width = input_dimensions
        batch_size = hidden_states.shape[0]
        layout = window_layout(ws, self.shift_size, height, width, hidden_states.device)
        raw = gather_windows(self, hidden_states, layout, height, width)  # [B*nW, area, C]
        normed = self.layernorm_before(raw)  # per token, so the same as normalising before partitioning
        if layout.pad is not None:  # ... except that padding positions hold zeros, not LayerNorm(0)
            normed = normed.masked_fill(layout.pad.repeat(batch_size, 1).unsqueeze(-1), 0.0)

        # 1. cluster each window (features: normed tokens + a region code that keeps regions apart)
        assign = window_assignment(plan, normed, layout, ws, k, batch_size)
        members, sizes, stats, centres = window_clusters(assign, k, raw, layout, batch_size)

        # 2. the block on the centres, with Swin's geometry carried over to the clusters
        bias = self._cluster_bias(stats, sizes, ws, layout.num_regions, plan.config.proportional_attention)
        want_probs = self.attention.config._attn_implementation == "eager"  # upstream returns maps only then
        attention_output, probs = self._attention(self.layernorm_before(centres), bias, want_probs)
        attention_output = self.drop_path(self.dropout(attention_output))
        updated = centres + attention_output
        delta = attention_output + self.dropout(self.mlp(self.layernorm_after(updated)))  # = updated' - centres

        # 3. unpool: every token receives its cluster's update
        attn_weights = None
        if want_probs:
            # per token: each cluster's attention spread evenly over its members, [B*nW, heads, area, area]
            attn_weights = spread_attention(members, sizes, probs)
        return unpool(hidden_states, delta, assign, layout), attn_weights

    def _cluster_bias(self, stats, sizes, ws, num_regions, proportional):
        """[B*nW, heads, k, k] additive attention bias between clusters.

        The relative position bias is read at the clusters' rounded mean positions; the mask term is
        log(members of key cluster d in the query cluster's majority region), or that count divided by
        d's size without proportional attention (SWIN_MASKED where it is 0, upstream's -100 in effect)."""
        table = self.attention.relative_position_bias.relative_position_bias_table  # [(2ws-1)^2, heads]
        bias = bias_at_mean_positions(table, stats, sizes, ws)
        mask = region_bias(stats, sizes, num_regions, proportional, SWIN_MASKED)
        return bias if mask is None else bias.add_(mask.to(bias.dtype))  # bias is a fresh tensor

    def _attention(self, hidden_states, bias, want_probs: bool):
        """SwinAttention's projections and attention, with a [W, heads, k, k] bias (mirrors
        SwinAttention.forward), as an explicit softmax over the few dozen clusters of a window: about twice
        as fast as SDPA with a float mask at these sizes on CPU, it gives the probabilities for
        `output_attentions`, and it exports (torch 2.13's ONNX exporter fails to decompose SDPA in Swin's
        windows; it cannot export the plain HF Swin either)."""
        attn = self.attention
        b, n, _ = hidden_states.shape
        # [b * heads, n, head_dim], contiguous: batched matmuls on the strided views are several times slower
        q, key, v = (t.reshape(-1, n, attn.head_dim) for t in project_qkv(attn, hidden_states))
        heads = q.shape[0] // b
        logits = torch.baddbmm(bias.to(q.dtype).reshape(-1, n, n), q, key.transpose(1, 2), alpha=attn.scaling)
        probs = logits.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
        dropout = attn.attention_dropout if self.training else 0.0
        out = torch.bmm(F.dropout(probs, p=dropout, training=self.training), v).view(b, heads, n, -1)
        probs = probs.view(b, heads, n, n) if want_probs else None
        return attn.o_proj(out.transpose(1, 2).reshape(b, n, -1)), probs


class SwinAdapter:
    model_types = ("swin",)
    model_classes = ("SwinModel", "SwinForImageClassification")
    methods = ("tokenpool", "kmeans", "tome")
    method_note = "topk keeps what the class token attends to, and Swin has no class token"
    layer_class = TokenPoolSwinLayer  # the pooled block (Swinv2Adapter swaps in its own)

    @staticmethod
    def blocks(base) -> list[nn.Module]:
        return [block for stage in base.encoder.layers for block in stage.blocks]

    def num_layers(self, base) -> int:
        return len(self.blocks(base))

    def patch(self, base, config: TokenPoolConfig) -> None:
        blocks = self.blocks(base)
        if config.schedule is not None or config.pool_after is not None:
            keeps = config.layer_keeps(len(blocks))  # one keep per block; checks pool_after's range
        else:
            keeps = [config.keep] * len(blocks)  # every block computes on pooled windows
        reducer = REDUCERS[config.method]
        for block, keep in zip(blocks, keeps):
            sizes = {block.window_size, min(block.input_resolution)}  # upstream shrinks ws to a small grid
            priors = {ws: spread_prior(ws) for ws in sizes if ws <= block.window_size}
            block._tokenpool = BlockPlan(keep, reducer, config, priors)
            swap_class(block, self.layer_class)

    def unpatch(self, base) -> None:
        for block in self.blocks(base):
            restore_class(block, "_tokenpool")

    def is_patched(self, base) -> bool:
        return any("_tokenpool" in block.__dict__ for block in self.blocks(base))


pooled_class(TokenPoolSwinLayer, SwinLayer)
