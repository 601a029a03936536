"""ViT and DeiT: pool the token sequence after chosen encoder layers.

Data path (everything a reader needs is in this file and `reducers/`):

    pixels -> embeddings (CLS [+ distillation] + patches) -> layer 0 .. layer L-1 -> layernorm -> head
                                                             |
        a pooling layer: attention (probabilities only if the reducer needs them) -> MLP ->
        split off the protected tokens -> reducer(patch tokens, sizes, k, signals) -> concat

Patching swaps the `__class__` of each encoder layer and its attention to a subclass defined here;
no parameter or buffer is added, so `state_dict` keys never change. The little per-forward state
(how many patches each token stands for) lives in one `PoolState` shared by the layers of a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TokenPoolConfig
from ..reducers import REDUCERS, Reducer, Signals

PROTECTED_TOKENS = {"vit": 1, "deit": 2}  # CLS; CLS + distillation token. Never pooled.


@dataclass
class PoolState:
    """Shared by all patched layers of one model. `sizes[i]`: [B, N] patches per token entering layer i
    (None while nothing was pooled). Keyed by layer so that a gradient-checkpointing recompute of layer i
    reads the same input sizes again. `record` keeps each layer's assignment for visualisation."""

    sizes: dict[int, torch.Tensor | None] = field(default_factory=dict)
    record: bool = False
    assignments: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class LayerPlan:
    index: int
    keep: float  # 1.0: this layer does not pool
    protected: int
    reducer: Reducer
    config: TokenPoolConfig
    state: PoolState


def project_qkv(attn: nn.Module, hidden_states: torch.Tensor):
    """q, k, v as [B, heads, N, head_dim] from an upstream attention module's q/k/v projections
    (ViTAttention, DeiTAttention and SwinAttention share these names)."""
    shape = (*hidden_states.shape[:2], -1, attn.head_dim)
    return (proj(hidden_states).view(shape).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))


def _attention_with_signals(attn: nn.Module, hidden_states, bias, needs: frozenset[str]):
    """ViTAttention/DeiTAttention forward that also returns the signals a reducer asked for.

    Explicit softmax only when probabilities are needed (significance, CLS attention); otherwise SDPA.
    Mirrors transformers.models.vit.modeling_vit.ViTAttention.forward (5.x).
    """
    b, n, _ = hidden_states.shape
    q, k, v = project_qkv(attn, hidden_states)
    dropout = attn.attention_dropout if attn.training else 0.0
    signals, probs = Signals(), None
    if needs & {"significance", "cls_attention"}:
        logits = torch.matmul(q, k.transpose(2, 3)) * attn.scaling
        if bias is not None:
            logits = logits + bias
        probs = logits.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
        # Signals come from the attention the model actually computes, before dropout; no gradient
        # flows through the choice of clusters.
        if "significance" in needs:
            signals.significance = probs.detach().float().sum(dim=(1, 2))  # received: over heads and queries
        if "cls_attention" in needs:
            signals.cls_attention = probs.detach()[:, :, 0, :].float().mean(1)
        out = torch.matmul(F.dropout(probs, p=dropout, training=attn.training), v)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=attn.scaling)
    if "keys" in needs:
        signals.keys = k.detach().mean(1)
    out = attn.o_proj(out.transpose(1, 2).reshape(b, n, -1))
    return out, probs, signals


class TokenPoolAttention(nn.Module):
    """Attention subclass: the same forward, plus optional proportional-attention bias and signals.
    Its forward is still the module's forward, so `output_attentions` hooks keep recording it."""

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        bias, needs = getattr(self, "_tokenpool_call", (None, frozenset()))
        if bias is None and not needs:
            return super().forward(hidden_states, attention_mask, **kwargs)  # untouched upstream path
        if attention_mask is not None:
            raise ValueError("attention_mask cannot be combined with token pooling (tokens are merged)")
        out, probs, self._tokenpool_signals = _attention_with_signals(self, hidden_states, bias, needs)
        return out, probs


class TokenPoolLayer(nn.Module):
    """Copied from transformers.models.vit.modeling_vit.ViTLayer.forward (5.x; DeiTLayer is identical).
    Changed lines are marked `# tokenpool:`."""

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        plan: LayerPlan = self._tokenpool
        sizes = plan.state.sizes.get(plan.index) if plan.index > 0 else None  # tokenpool: sizes in
        pools = plan.keep < 1.0
        # tokenpool: a token standing for s patches gets log(s) added to its attention logits
        bias = None
        if sizes is not None and plan.config.proportional_attention:
            bias = sizes.log().to(hidden_states.dtype)[:, None, None, :]
        self.attention._tokenpool_call = (bias, plan.reducer.needs if pools else frozenset())

        # Self Attention
        residual = hidden_states
        hidden_states = self.layernorm_before(hidden_states)
        hidden_states, _ = self.attention(hidden_states, attention_mask, **kwargs)
        hidden_states = self.dropout(hidden_states)
        hidden_states = hidden_states + residual

        # Fully Connected
        residual = hidden_states
        hidden_states = self.layernorm_after(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = self.dropout(hidden_states)
        hidden_states = hidden_states + residual

        if pools:  # tokenpool: reduce the patch tokens after the block
            signals = self.attention.__dict__.pop("_tokenpool_signals")
            hidden_states, sizes = _pool(hidden_states, sizes, signals, plan)
        plan.state.sizes[plan.index + 1] = sizes  # tokenpool: sizes out
        return hidden_states


def _pool(hidden_states, sizes, signals: Signals, plan: LayerPlan):
    p = plan.protected
    b, n, _ = hidden_states.shape
    if sizes is None:
        sizes = hidden_states.new_ones(b, n, dtype=torch.float32)
    n_pool = n - p
    k = int(math.floor(n_pool * plan.keep + 0.5))
    if k < 1:
        raise ValueError(
            f"token pooling after layer {plan.index} would keep {k} of {n_pool} patch tokens: the images are "
            f"too small for keep={plan.keep}; use larger images, a larger keep or fewer pooling steps"
        )
    if k == n_pool:
        return hidden_states, sizes
    cut = Signals(**{name: None if t is None else t[:, p:] for name, t in vars(signals).items()})
    options = {name: getattr(plan.config, name) for name in plan.reducer.options}
    result = plan.reducer.fn(hidden_states[:, p:], sizes[:, p:], k, cut, **options)
    if plan.state.record:
        plan.state.assignments[plan.index] = result.assign
    hidden_states = torch.cat([hidden_states[:, :p], result.tokens.to(hidden_states.dtype)], dim=1)
    sizes = torch.cat([sizes[:, :p], result.sizes.to(sizes.dtype)], dim=1)
    return hidden_states, sizes


_SUBCLASSES: dict[tuple[type, type], type] = {}


def _subclass(mixin: type, cls: type) -> type:
    """One cached subclass per upstream class, e.g. TokenPoolViTLayer(TokenPoolLayer, ViTLayer)."""
    key = (mixin, cls)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(f"TokenPool{cls.__name__}", (mixin, cls), {"_tokenpool_original": cls})
    return _SUBCLASSES[key]


class ViTAdapter:
    """ViT and DeiT share everything but the number of protected tokens."""

    model_types = ("vit", "deit")
    methods = ("tokenpool", "kmeans", "tome", "topk")
    method_note = "all reducers apply"
    model_classes = (
        "ViTModel", "ViTForImageClassification",
        "DeiTModel", "DeiTForImageClassification", "DeiTForImageClassificationWithTeacher",
    )

    @staticmethod
    def num_layers(base) -> int:
        return len(base.layers)

    def patch(self, base, config: TokenPoolConfig) -> None:
        keeps = config.layer_keeps(len(base.layers))
        state = PoolState()
        reducer = REDUCERS[config.method]
        protected = PROTECTED_TOKENS[base.config.model_type]
        for i, (layer, keep) in enumerate(zip(base.layers, keeps)):
            layer._tokenpool = LayerPlan(i, keep, protected, reducer, config, state)
            layer.__class__ = _subclass(TokenPoolLayer, type(layer))
            layer.attention.__class__ = _subclass(TokenPoolAttention, type(layer.attention))
        base._tokenpool_state = state

    def unpatch(self, base) -> None:
        for layer in base.layers:
            for module in (layer, layer.attention):
                module.__class__ = module._tokenpool_original
                for name in ("_tokenpool", "_tokenpool_call", "_tokenpool_signals"):
                    module.__dict__.pop(name, None)
        base.__dict__.pop("_tokenpool_state", None)

    @staticmethod
    def is_patched(base) -> bool:
        return "_tokenpool_state" in base.__dict__
