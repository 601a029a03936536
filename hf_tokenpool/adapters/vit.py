"""ViT and DeiT: pool the token sequence inside chosen encoder layers.

Data path (everything a reader needs is in this file and `reducers/`):

    pixels -> embeddings (CLS [+ distillation] + patches) -> layer 0 .. layer L-1 -> layernorm -> head
                                                             |
        a pooling layer: attention (probabilities only if the reducer needs them)
            -> [pool here: location="before_mlp", ToMe's place] -> MLP -> [or here: "after_layer"]
        pooling = split off the protected tokens -> reducer(patch tokens, sizes, k, signals) -> concat

Patching swaps the `__class__` of the base model, each encoder layer and its attention to a subclass
defined here; no parameter or buffer is added, so `state_dict` keys never change. The subclasses are
module-level names (`TokenPoolViTLayer`, ...), so a patched model pickles and `torch.save`s. The little
per-forward state (how many patches each token stands for) lives in one `PoolState` shared by the
layers of a model. Nothing in the forward reads a tensor's value on the host, so a patched model
compiles without graph breaks and exports (torch.export, ONNX).
"""

from __future__ import annotations

import inspect
import math
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.deit import modeling_deit
from transformers.models.vit import modeling_vit

try:
    from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
except ImportError:  # transformers versions without the registry record by hooks alone
    _CAN_RECORD_REGISTRY = None

from ..config import TokenPoolConfig
from ..reducers import REDUCERS, Reducer, Signals

PROTECTED_TOKENS = {"vit": 1, "deit": 2}  # CLS; CLS + distillation token. Never pooled.
_PROBABILITY_SIGNALS = frozenset({"significance", "cls_attention"})


@dataclass
class PoolState:
    """Shared by all patched layers of one model. `sizes[i]`: [B, N] patches per token entering layer i
    (None while nothing was pooled). Keyed by layer so that a gradient-checkpointing recompute of layer i
    reads the same input sizes again. `record` keeps each layer's assignment for visualisation."""

    sizes: dict[int, torch.Tensor | None] = field(default_factory=dict)
    record: bool = False
    assignments: dict[int, torch.Tensor] = field(default_factory=dict)

    def __getstate__(self):
        # per-forward tensors are not part of a model (after torch.export they are fake tensors that
        # cannot be pickled): a pickled, saved or deep-copied model starts with an empty state
        return {"sizes": {}, "record": self.record, "assignments": {}}


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


def attention_with_signals(attn: nn.Module, hidden_states, bias, needs: frozenset[str], want_probs: bool):
    """ViTAttention/DeiTAttention forward that also returns the signals a reducer asked for.

    Explicit softmax only where probabilities are needed (significance, CLS attention, or an `eager`
    model returning its attention maps); SDPA everywhere else. Mirrors
    transformers.models.vit.modeling_vit.ViTAttention.forward (5.x). Returns (output, probs, signals).
    """
    b, n, _ = hidden_states.shape
    q, k, v = project_qkv(attn, hidden_states)
    dropout = attn.attention_dropout if attn.training else 0.0
    signals, probs = Signals(), None
    if want_probs or needs & _PROBABILITY_SIGNALS:
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
    out = attn.o_proj(out.transpose(1, 2).contiguous().reshape(b, n, -1))
    return out, (probs if want_probs else None), signals


class TokenPoolModel(nn.Module):
    """Base-model subclass (ViTModel, DeiTModel): refuses an attention mask, which cannot follow merged
    tokens, and otherwise runs upstream's forward. The mask that upstream builds itself when none is
    given (it does so under torch.export) sees every token, so the layers may drop it."""

    def forward(self, *args, **kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > self._tokenpool_mask_position:
            mask = args[self._tokenpool_mask_position]
        if mask is not None:
            raise ValueError("attention_mask cannot be used with token pooling: tokens are merged, so a per-token "
                             "mask no longer applies. Call without attention_mask, or unpatch_model(model) first.")
        return super().forward(*args, **kwargs)


class TokenPoolAttention(nn.Module):
    """Attention subclass: the same forward, plus the proportional-attention bias and the signals.
    Still the module's forward, so transformers' `output_attentions` hooks record its index-1 output."""

    def forward(self, hidden_states, attention_mask=None, tokenpool_bias=None, tokenpool_needs=frozenset(), **kwargs):
        eager = self.config._attn_implementation == "eager"
        if tokenpool_bias is None and not tokenpool_needs:
            out, probs = super().forward(hidden_states, None, **kwargs)  # untouched upstream path
            return out, probs, Signals()
        return attention_with_signals(self, hidden_states, tokenpool_bias, tokenpool_needs, want_probs=eager)


class TokenPoolLayer(nn.Module):
    """Copied from transformers.models.vit.modeling_vit.ViTLayer.forward (5.x; DeiTLayer is identical).
    Changed lines are marked `# tokenpool:`."""

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        plan: LayerPlan = self._tokenpool
        sizes = plan.state.sizes.get(plan.index) if plan.index > 0 else None  # tokenpool: sizes in
        pools = plan.keep < 1.0
        before_mlp = plan.config.pool_location == "before_mlp"
        # tokenpool: a token standing for s patches gets log(s) added to its attention logits
        bias = None
        if sizes is not None and plan.config.proportional_attention:
            bias = sizes.log().to(hidden_states.dtype)[:, None, None, :]
        needs = plan.reducer.needs if pools else frozenset()

        # Self Attention
        residual = hidden_states
        hidden_states = self.layernorm_before(hidden_states)
        # tokenpool: the mask is dropped (TokenPoolModel refuses a user's mask) and the signals come back
        hidden_states, _, signals = self.attention(hidden_states, None, tokenpool_bias=bias, tokenpool_needs=needs, **kwargs)
        hidden_states = self.dropout(hidden_states)
        hidden_states = hidden_states + residual

        if pools and before_mlp:  # tokenpool: reduce between attention and MLP (ToMe's place)
            hidden_states, sizes = pool_tokens(hidden_states, sizes, signals, plan)

        # Fully Connected
        residual = hidden_states
        hidden_states = self.layernorm_after(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = self.dropout(hidden_states)
        hidden_states = hidden_states + residual

        if pools and not before_mlp:  # tokenpool: reduce after the whole layer
            hidden_states, sizes = pool_tokens(hidden_states, sizes, signals, plan)
        plan.state.sizes[plan.index + 1] = sizes  # tokenpool: sizes out
        return hidden_states


def pool_tokens(hidden_states, sizes, signals: Signals, plan: LayerPlan):
    p = plan.protected
    b, n, _ = hidden_states.shape
    if sizes is None:
        sizes = hidden_states.new_ones(b, n, dtype=torch.float32)
    n_pool = n - p
    k = int(math.floor(n_pool * plan.keep + 0.5))
    if k < 1:
        raise ValueError(
            f"token pooling in layer {plan.index} would keep {k} of {n_pool} patch tokens: the images are "
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


def pooled_class(mixin: type, cls: type) -> type:
    """The subclass `TokenPool<Upstream>` of (mixin, cls), created once and kept as a module-level name
    of the mixin's module, so pickle finds it by name. Made at import for the upstream classes each
    adapter patches, so a pickled model loads in a fresh process; a user's own subclass of an upstream
    class gets one at patch time (picklable within that process)."""
    module = sys.modules[mixin.__module__]
    name = f"TokenPool{cls.__name__}"
    existing = module.__dict__.get(name)
    if existing is not None and existing.__mro__[1:3] == (mixin, cls):
        return existing
    if existing is not None:  # same upstream name from another module: disambiguate
        name = f"TokenPool{cls.__name__}__{cls.__module__.replace('.', '_')}"
        if name in module.__dict__:
            return module.__dict__[name]
    attrs = {"_tokenpool_original": cls, "__module__": module.__name__, "__qualname__": name}
    if mixin is TokenPoolModel:
        attrs["_tokenpool_mask_position"] = list(inspect.signature(cls.forward).parameters).index("attention_mask") - 1
    sub = type(name, (mixin, cls), attrs)
    setattr(module, name, sub)
    if _CAN_RECORD_REGISTRY is not None and getattr(cls, "_can_record_outputs", None) is not None:
        # transformers looks up what output_hidden_states/output_attentions record by str(model class)
        dict.__setitem__(_CAN_RECORD_REGISTRY, str(sub), cls._can_record_outputs)
    return sub


def swap_class(module: nn.Module, mixin: type) -> None:
    module.__class__ = pooled_class(mixin, type(module))


def restore_class(module: nn.Module, *attributes: str) -> None:
    module.__class__ = module._tokenpool_original
    for name in attributes:
        module.__dict__.pop(name, None)


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
            swap_class(layer, TokenPoolLayer)
            swap_class(layer.attention, TokenPoolAttention)
        base._tokenpool_state = state
        swap_class(base, TokenPoolModel)

    def unpatch(self, base) -> None:
        for layer in base.layers:
            restore_class(layer, "_tokenpool")
            restore_class(layer.attention)
        restore_class(base, "_tokenpool_state")

    @staticmethod
    def is_patched(base) -> bool:
        return "_tokenpool_state" in base.__dict__


for _module in (modeling_vit, modeling_deit):
    _prefix = "ViT" if _module is modeling_vit else "DeiT"
    pooled_class(TokenPoolModel, getattr(_module, f"{_prefix}Model"))
    pooled_class(TokenPoolLayer, getattr(_module, f"{_prefix}Layer"))
    pooled_class(TokenPoolAttention, getattr(_module, f"{_prefix}Attention"))
