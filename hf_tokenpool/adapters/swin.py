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
padding. Patching swaps `SwinLayer.__class__` only: no new parameters, `state_dict` keys unchanged.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.swin.modeling_swin import window_partition, window_reverse

from ..config import TokenPoolConfig
from ..reducers import REDUCERS, Reducer, Signals
from ..reducers.base import cluster_sizes, weighted_mean

NUM_REGIONS = 18  # 9 shifted-window regions, each either real tokens or padding


@dataclass
class BlockPlan:
    keep: float
    reducer: Reducer
    config: TokenPoolConfig


@functools.lru_cache(maxsize=None)
def _spread_prior(ws: int, device) -> torch.Tensor:
    """Farthest-point order over a ws x ws window, as a score in (0, 1]: with uniform weights the
    reducers start from the top-scored tokens, so their initial centres are spread over the window."""
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij"), -1).view(-1, 2).float()
    dist = (coords - coords.mean(0)).norm(dim=-1)
    order = [int(dist.argmin())]
    nearest = (coords - coords[order[0]]).norm(dim=-1)
    for _ in range(ws * ws - 1):
        nxt = int(nearest.argmax())
        order.append(nxt)
        nearest = torch.minimum(nearest, (coords - coords[nxt]).norm(dim=-1))
    score = torch.empty(ws * ws)
    score[torch.tensor(order)] = torch.linspace(1.0, 1.0 / (ws * ws), ws * ws)
    return score.to(device)


class TokenPoolSwinLayer(nn.Module):
    """Replaces transformers.models.swin.modeling_swin.SwinLayer.forward (5.x) in pooled blocks; the
    window handling (set_shift_and_window_size, maybe_pad, cyclic_shift, window_partition) is upstream's."""

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
        batch_size, _, channels = hidden_states.shape

        def to_windows(grid):  # [B, H, W, C'] -> [B * num_windows, area, C'] in this block's shifted frame
            grid, _ = self.maybe_pad(grid, height, width)
            return window_partition(self.cyclic_shift(grid), ws).reshape(-1, area, grid.shape[-1])

        raw = to_windows(hidden_states.view(batch_size, height, width, channels))
        normed = to_windows(self.layernorm_before(hidden_states).view(batch_size, height, width, channels))
        height_pad, width_pad = math.ceil(height / ws) * ws, math.ceil(width / ws) * ws
        regions = self._regions(height, width, height_pad, width_pad, hidden_states.device)  # [nW, area]
        regions = regions.repeat(batch_size, 1)  # windows are batch-major, like window_partition's output
        region_code = F.one_hot(regions, NUM_REGIONS).to(normed.dtype)

        # 1. cluster each window (features: normed tokens + a region code that keeps regions apart)
        ones = normed.new_ones(normed.shape[:2], dtype=torch.float32)
        if plan.config.method == "tome":
            signals, features = Signals(keys=normed), normed
        else:
            prior = _spread_prior(ws, normed.device)
            signals = Signals(significance=1.0 + 1e-3 * prior.expand_as(ones))
            features = torch.cat([normed, region_code * 10.0 * math.sqrt(channels)], dim=-1)
        options = {name: getattr(plan.config, name) for name in plan.reducer.options}
        assign = plan.reducer.fn(features, ones, k, signals, **options).assign  # [B*nW, area]
        centres = weighted_mean(raw, ones, assign, k)  # [B*nW, k, C]
        sizes = cluster_sizes(ones, assign, k)

        # 2. the block on the centres, with Swin's geometry carried over to the clusters
        bias = self._cluster_bias(assign, k, sizes, region_code, ws, plan.config.proportional_attention)
        attn_input = self.layernorm_before(centres)
        attention_output = self._attention(attn_input, bias)
        updated = centres + self.drop_path(self.dropout(attention_output))
        updated = self.dropout(self.mlp(self.layernorm_after(updated))) + updated

        # 3. unpool: every token receives its cluster's update
        update = (updated - centres).gather(1, assign.unsqueeze(-1).expand(-1, -1, channels))
        windows = (raw + update).view(-1, ws, ws, channels)
        grid = self.cyclic_shift(window_reverse(windows, ws, height_pad, width_pad), reverse=True)
        grid = grid[:, :height, :width, :].contiguous()
        return grid.view(batch_size, height * width, channels), None

    def _regions(self, height, width, height_pad, width_pad, device) -> torch.Tensor:
        """Region id of every window position: the shifted-window region (as upstream get_attn_mask
        numbers them), plus 9 for padding positions."""
        ws, shift = self.window_size, self.shift_size
        h_idx, w_idx = torch.arange(height_pad, device=device), torch.arange(width_pad, device=device)
        if shift > 0:
            h_region = (h_idx >= height_pad - ws).long() + (h_idx >= height_pad - shift).long()
            w_region = (w_idx >= width_pad - ws).long() + (w_idx >= width_pad - shift).long()
        else:
            h_region, w_region = torch.zeros_like(h_idx), torch.zeros_like(w_idx)
        region = (h_region[:, None] * 3 + w_region[None, :])[None, :, :, None]  # already in the shifted frame
        pad = ((h_idx >= height)[:, None] | (w_idx >= width)[None, :]).long()[None, :, :, None]
        pad = self.cyclic_shift(pad)  # padding is defined in the unshifted frame
        ids = region + 9 * pad
        return window_partition(ids, ws).reshape(-1, ws * ws)

    def _cluster_bias(self, assign, k, sizes, region_code, ws, proportional):
        """[B*nW, heads, k, k] additive attention bias between clusters."""
        rpb = self.attention.relative_position_bias
        coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij"), -1)
        coords = coords.view(1, -1, 2).to(sizes.dtype).to(assign.device).expand(assign.shape[0], -1, -1)
        centre = weighted_mean(coords, torch.ones_like(coords[..., 0]), assign, k).round().long()  # [W, k, 2]
        rel = centre[:, :, None, :] - centre[:, None, :, :] + (ws - 1)
        index = rel[..., 0] * (2 * ws - 1) + rel[..., 1]  # upstream's flat relative index
        table = rpb.relative_position_bias_table  # [(2ws-1)^2, heads]
        bias = table[index].permute(0, 3, 1, 2)  # [W, heads, k, k]
        # members of each key cluster per region; the query cluster's region is its majority region
        counts = region_code.new_zeros(assign.shape[0], k, NUM_REGIONS).scatter_add_(
            1, assign.unsqueeze(-1).expand(-1, -1, NUM_REGIONS), region_code)
        query_region = counts.argmax(-1)  # [W, k]
        visible = counts.gather(2, query_region[:, None, :].expand(-1, k, -1)).transpose(1, 2)  # [W, q, key]
        if not proportional:
            visible = visible / sizes[:, None, :]
        mask = torch.where(visible > 0, visible.clamp_min(1e-6).log(), torch.full_like(visible, -100.0))
        return (bias + mask[:, None].to(bias.dtype))

    def _attention(self, hidden_states, bias):
        """SwinAttention's projections and SDPA, with a [W, heads, k, k] bias (mirrors SwinAttention.forward)."""
        attn = self.attention
        b, n, _ = hidden_states.shape
        shape = (b, n, -1, attn.head_dim)
        q = attn.q_proj(hidden_states).view(shape).transpose(1, 2)
        key = attn.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = attn.v_proj(hidden_states).view(shape).transpose(1, 2)
        dropout = attn.attention_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, key, v, attn_mask=bias.to(q.dtype), dropout_p=dropout,
                                             scale=attn.scaling)
        return attn.o_proj(out.transpose(1, 2).reshape(b, n, -1))


_SUBCLASSES: dict[type, type] = {}


class SwinAdapter:
    model_types = ("swin",)
    model_classes = ("SwinModel", "SwinForImageClassification")
    methods = ("tokenpool", "kmeans", "tome")
    method_note = "topk keeps what the class token attends to, and Swin has no class token"

    @staticmethod
    def blocks(base) -> list[nn.Module]:
        return [block for stage in base.encoder.layers for block in stage.blocks]

    def num_layers(self, base) -> int:
        return len(self.blocks(base))

    def patch(self, base, config: TokenPoolConfig) -> None:
        blocks = self.blocks(base)
        if config.schedule is not None:
            keeps = config.layer_keeps(len(blocks))  # one keep per block
        elif config.pool_after is not None:
            keeps = [config.keep if i in config.pool_after else 1.0 for i in range(len(blocks))]
        else:
            keeps = [config.keep] * len(blocks)  # every block computes on pooled windows
        reducer = REDUCERS[config.method]
        for block, keep in zip(blocks, keeps):
            cls = type(block)
            if cls not in _SUBCLASSES:
                _SUBCLASSES[cls] = type(f"TokenPool{cls.__name__}", (TokenPoolSwinLayer, cls),
                                        {"_tokenpool_original": cls})
            block._tokenpool = BlockPlan(keep, reducer, config)
            block.__class__ = _SUBCLASSES[cls]

    def unpatch(self, base) -> None:
        for block in self.blocks(base):
            block.__class__ = block._tokenpool_original
            block.__dict__.pop("_tokenpool", None)

    def is_patched(self, base) -> bool:
        return any("_tokenpool" in block.__dict__ for block in self.blocks(base))
