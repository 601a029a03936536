"""Swinv2: Swin's pool -> compute -> unpool inside each window of each block (docs/swin.md, "Swinv2").

The window handling, clustering, cluster statistics, shift-region mask and unpool are Swin's
(`swin.py`); what differs is the block computed on the k cluster centres c of a window:

    res-post-norm:  h = c + LN_before(attention(c));  c' = h + LN_after(MLP(h));  x_j <- x_j + (c' - c)[cluster(j)]
    attention:      cosine(q, k) * exp(min(logit_scale, log 100)) + position bias + region/size term
    position bias:  16 * sigmoid(continuous_position_bias_mlp(log-spaced relative coordinates)), upstream's
                    table over the (2ws-1)^2 integer offsets (normalised by pretrained_window_size - 1 when
                    set), read at the offsets of the clusters' rounded mean positions

Reading the table costs what upstream's forward costs; evaluating the MLP at the clusters' exact
(fractional) offsets costs a 2 -> 512 -> heads MLP per pair of clusters in every window (more than the
block itself at k = 38) and was no more faithful on a short self-trained Fashion-MNIST Swinv2 (docs/swin.md).

Clustering features: the raw window tokens (Swinv2's attention reads them without a norm), divided by
their window's RMS. With uniform weights K-Medoids, K-Means and ToMe's cosine matching do not change
under one scale per window, and the scale puts the tokens where Swin's normed tokens are, so Swin's
region code (10 sqrt(C)) keeps clusters inside their shift region here too.

The invisible-region value is -200, not Swin's -100: upstream Swinv2 adds its shift mask twice
(Swinv2SelfAttention.forward, transformers 5.x), and its cosine logits reach +-100 (logit_scale is
clamped at log 100) plus 16 of position bias, where -100 alone would not hide a region.
Patching swaps `Swinv2Layer.__class__` only: no new parameters, `state_dict` keys unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.swinv2.modeling_swinv2 import Swinv2Layer

from .swin import (
    BlockPlan,
    SwinAdapter,
    bias_at_mean_positions,
    gather_windows,
    region_bias,
    spread_attention,
    unpool,
    window_assignment,
    window_clusters,
    window_layout,
)
from .vit import pooled_class

MASKED = -200.0  # what upstream's doubly added shift mask amounts to (module docstring)


class TokenPoolSwinv2Layer(nn.Module):
    """Replaces transformers.models.swinv2.modeling_swinv2.Swinv2Layer.forward (5.x) in pooled blocks;
    padding, cyclic shift and window partition as upstream's forward does them, then Swin's per-window
    clustering (swin.py) and the res-post-norm block on the cluster centres."""

    def forward(self, hidden_states, input_dimensions, output_attentions=False):
        plan: BlockPlan = self._tokenpool
        ws, shift = self.window_size, self.shift_size  # fixed at construction in Swinv2
        area = ws * ws
        k = int(math.floor(area * plan.keep + 0.5))
        if plan.keep >= 1.0 or k >= area:
            return super().forward(hidden_states, input_dimensions, output_attentions)
        if k < 1:
            raise ValueError(f"Swinv2 windows of {area} tokens are too small for keep={plan.keep} (it would keep "
                             f"{k}); use a larger keep")
        height, width = input_dimensions
        batch_size = hidden_states.shape[0]
        layout = window_layout(ws, shift, height, width, hidden_states.device)
        raw = gather_windows(self, hidden_states, layout, height, width)  # [B*nW, area, C], shifted windows

        # 1. cluster each window: the raw tokens at one scale per window (module docstring)
        scale = raw.detach().float().square().mean(dim=(1, 2), keepdim=True).clamp_min(1e-12).rsqrt()
        assign = window_assignment(plan, raw.detach() * scale.to(raw.dtype), layout, ws, k, batch_size)
        members, sizes, stats, centres = window_clusters(assign, k, raw, layout, batch_size)

        # 2. the res-post-norm block on the centres, with Swinv2's geometry carried over to the clusters
        bias = self._position_bias(stats, sizes, ws)  # [B*nW, heads, k, k]
        mask = region_bias(stats, sizes, layout.num_regions, plan.config.proportional_attention, MASKED)
        if mask is not None:
            bias = bias + mask.to(bias.dtype)
        attention_output, probs = self._attention(centres, bias)
        attention_output = self.drop_path(self.layernorm_before(attention_output))
        updated = centres + attention_output
        mlp_output = self.drop_path(self.layernorm_after(self.output(self.intermediate(updated))))
        delta = attention_output + mlp_output  # = c' - c

        # 3. unpool: every token receives its cluster's update
        layer_output = unpool(hidden_states, delta, assign, layout)
        if output_attentions:  # per token, as upstream returns them: [B*nW, heads, area, area]
            return layer_output, spread_attention(members, sizes, probs)
        return (layer_output,)

    def position_bias_table(self) -> torch.Tensor:
        """Upstream's [(2ws-1)^2, heads] continuous position bias: 16 * sigmoid(MLP(log-spaced offsets))."""
        attn = self.attention.self
        table = attn.continuous_position_bias_mlp(attn.relative_coords_table).view(-1, attn.num_attention_heads)
        return 16 * torch.sigmoid(table)

    def _position_bias(self, stats, sizes, ws):
        """[B*nW, heads, k, k]: the table read at the offsets of the clusters' rounded mean positions."""
        return bias_at_mean_positions(self.position_bias_table(), stats, sizes, ws)

    def _attention(self, hidden_states, bias):
        """Swinv2Attention on [B*nW, k, C] centres with a [B*nW, heads, k, k] bias; mirrors
        Swinv2SelfAttention.forward (scaled cosine attention, explicit softmax, as upstream) and
        Swinv2SelfOutput. Returns (output, probabilities before dropout)."""
        attn = self.attention.self
        b, n, _ = hidden_states.shape
        shape = (b, n, attn.num_attention_heads, attn.attention_head_size)
        q, key, v = (proj(hidden_states).view(shape).transpose(1, 2) for proj in (attn.query, attn.key, attn.value))
        scores = F.normalize(q, dim=-1) @ F.normalize(key, dim=-1).transpose(-2, -1)
        logit_scale = torch.clamp(attn.logit_scale, max=math.log(1.0 / 0.01)).exp()
        probs = F.softmax(scores * logit_scale + bias.to(scores.dtype), dim=-1)
        context = torch.matmul(attn.dropout(probs), v).permute(0, 2, 1, 3).reshape(b, n, attn.all_head_size)
        return self.attention.output(context, hidden_states), probs


class Swinv2Adapter(SwinAdapter):
    """Swin's adapter (blocks, schedules, methods, unpatch) with the Swinv2 block."""

    model_types = ("swinv2",)
    model_classes = ("Swinv2Model", "Swinv2ForImageClassification")
    layer_class = TokenPoolSwinv2Layer


pooled_class(TokenPoolSwinv2Layer, Swinv2Layer)
