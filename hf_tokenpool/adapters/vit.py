"""The plain-ViT families (ViT, DeiT; DINOv2, CLIP, SigLIP in their own small files): pool the token
sequence inside chosen encoder layers.

Data path (everything a reader needs is in this file and `reducers/`):

    pixels -> embeddings (protected tokens + patches) -> layer 0 .. layer L-1 -> [norm] -> head
                                                         |
        a pooling layer: attention (probabilities only if the reducer needs them)
            -> [pool here: location="before_mlp", ToMe's place] -> MLP -> [or here: "after_layer"]
        pooling = split off the protected tokens -> reducer(patch tokens, sizes, k, signals) -> concat

These families share one pre-norm block, x + out1(attn(norm1(x))), then x + out2(mlp(norm2(x))); they
differ only in names (`norm1` is `layernorm_before`, `norm1` or `layer_norm1`; `out1` is dropout,
DINOv2's layer scale and drop path, or nothing), in their protected tokens (CLS, DeiT's distillation
token, DINOv2's registers, none for SigLIP), in where the vision tower sits (inside CLIPModel, ...)
and in heads that average tokens. A `Family` records those differences; `TokenPoolLayer` is one
forward for all of them. Heads that average tokens get a size-weighted mean (`token_mean`).

Patching swaps the `__class__` of the tower, each encoder layer, its attention and such heads to a
subclass defined here or in the family's file; no parameter or buffer is added, so `state_dict` keys
never change. The subclasses are module-level names (`TokenPoolViTLayer`, ...), so a patched model
pickles and `torch.save`s. The little per-forward state (how many patches each token stands for)
lives in one `PoolState` shared by the layers of a model. Nothing in the forward reads a tensor's
value on the host, so a patched model compiles without graph breaks and exports (torch.export, ONNX).
"""

from __future__ import annotations

import inspect
import math
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.models.deit import modeling_deit
from transformers.models.vit import modeling_vit

try:
    from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
except ImportError:  # transformers versions without the registry record by hooks alone
    _CAN_RECORD_REGISTRY = None

from ..config import TokenPoolConfig
from ..reducers import REDUCERS, Reducer, Signals


@dataclass
class PoolState:
    """Shared by all patched layers of one model. `sizes[i]`: [B, N] patches per token entering layer i
    (None while nothing was pooled). Keyed by layer so that a gradient-checkpointing recompute of layer i
    reads the same input sizes again. `record` keeps each layer's assignment for visualisation."""

    sizes: dict[int, torch.Tensor | None] = field(default_factory=dict)
    record: bool = False
    assignments: dict[int, torch.Tensor] = field(default_factory=dict)
    num_layers: int = 0

    def output_sizes(self) -> torch.Tensor | None:
        """[B, N] patches per token of the encoder's output (None when nothing was pooled)."""
        return self.sizes.get(self.num_layers)

    def __getstate__(self):
        # per-forward tensors are not part of a model (after torch.export they are fake tensors that
        # cannot be pickled): a pickled, saved or deep-copied model starts with an empty state
        return {"sizes": {}, "record": self.record, "assignments": {}, "num_layers": self.num_layers}


@dataclass(frozen=True)
class Family:
    """What one plain-ViT family calls things. Defaults are ViT's names."""

    model_types: tuple[str, ...]
    model_classes: tuple[str, ...]  # the classes patch_model accepts
    towers: tuple[type, ...]  # upstream classes whose encoder layers are pooled, found inside the model
    protected: dict[str, int]  # the tower config's model_type -> leading tokens never pooled (CLS, ...)
    registers: str | None = None  # config attribute with more protected tokens (DINOv2's registers)
    layers: str = "layers"  # attribute path of the layer list in the tower
    norm1: str = "layernorm_before"
    attention: str = "attention"
    attention_out: tuple[str, ...] = ("dropout",)  # applied to the attention output before the residual
    norm2: str = "layernorm_after"
    mlp: str = "mlp"
    mlp_out: tuple[str, ...] = ("dropout",)
    heads: tuple[tuple[type, type], ...] = ()  # (upstream class, mixin): heads that average tokens
    methods: tuple[str, ...] = ("tokenpool", "kmeans", "tome", "topk")
    method_note: str = "all reducers apply"


@dataclass
class LayerPlan:
    index: int
    keep: float  # 1.0: this layer does not pool
    protected: int
    reducer: Reducer
    config: TokenPoolConfig
    state: PoolState
    family: Family | None = None  # names of the layer's parts (None: ViT's)


def project_qkv(attn: nn.Module, hidden_states: torch.Tensor):
    """q, k, v as [B, heads, N, head_dim] from an upstream attention module's q/k/v projections
    (ViTAttention, DeiTAttention and SwinAttention share these names)."""
    shape = (*hidden_states.shape[:2], -1, attn.head_dim)
    return (proj(hidden_states).view(shape).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))


# Logits in one block of the explicit softmax (2 MB in float32): blocks of whole images while an image's
# [heads, N, N] logits fit, else of one image's query rows, so that the working set stays in cache. A block
# of rows re-reads all keys and values, so row blocks take 4x as many (best of 32-256 rows at 577 and 1370
# tokens, batch 1 and 8).
_BLOCK_ELEMENTS = 2**19


def softmax_attention(q, k, v, bias, scaling: float, dropout: float, needs: frozenset[str], return_probs: bool = False):
    """softmax(q k^T * scaling + bias) v, explicitly, plus the signals that need the probabilities:
    (output, probs or None, signals).

    One fused `torch.softmax` over the logits (in float32), then P v; the significance is P's column sums
    over heads and queries. The work runs in blocks of whole images or of query rows (`_BLOCK_ELEMENTS`)
    unless the probabilities themselves are returned (`return_probs`, one block). At 1370 tokens (DINOv2-S/14
    at 518 px, batch 8) query-row blocks took tokenpool from 0.96x to 1.61x the plain model's speed
    (docs/results.md, "Changes measured against the previous code"). The fused softmax replaced exp in place,
    row sums and a rescaled (e v) / z: fewer operations per block (measured effect in docs/results.md, "The
    significance attention as one fused softmax").
    Block sizes depend on shapes only, so the loops trace, compile and export like one block."""
    b, h, n, _ = q.shape
    per_image = h * n * n
    images = b if return_probs else max(1, min(b, _BLOCK_ELEMENTS // per_image))
    rows = n if return_probs or per_image <= _BLOCK_ELEMENTS else max(16, 4 * _BLOCK_ELEMENTS // (h * n))
    q = q * scaling
    outs, probs, significance, cls_attention = [], None, [], []
    for first in range(0, b, images):
        image_outs, received = [], None
        qi, ki, vi = q[first:first + images], k[first:first + images], v[first:first + images]
        bi = None if bias is None else bias[first:first + images] if bias.shape[0] > 1 else bias
        for start in range(0, n, rows):
            logits = torch.matmul(qi[:, :, start:start + rows], ki.transpose(2, 3)).float()
            if bi is not None:
                logits += bi[..., start:start + rows, :] if bi.shape[-2] > 1 else bi
            attn = logits.softmax(dim=-1)
            # Signals come from the attention the model actually computes, before dropout; no gradient
            # flows through the choice of clusters.
            if "significance" in needs:  # received: over queries, then heads
                part = attn.detach().sum(dim=2).sum(dim=1)
                received = part if received is None else received + part
            if "cls_attention" in needs and start == 0:
                cls_attention.append(attn.detach()[:, :, 0].mean(1))
            attn = attn.to(q.dtype)
            if return_probs:
                probs = attn
            image_outs.append(torch.matmul(F.dropout(attn, p=dropout, training=dropout > 0), vi))
        outs.append(image_outs[0] if len(image_outs) == 1 else torch.cat(image_outs, dim=2))
        significance.append(received)
    signals = Signals()
    if "significance" in needs:
        signals.significance = significance[0] if len(significance) == 1 else torch.cat(significance)
    if "cls_attention" in needs:
        signals.cls_attention = cls_attention[0] if len(cls_attention) == 1 else torch.cat(cls_attention)
    return (outs[0] if len(outs) == 1 else torch.cat(outs)), probs, signals


def class_token_attention(q, k, bias, scaling: float) -> torch.Tensor:
    """[B, N]: the class token's attention to every token, averaged over heads: row 0 of
    softmax(q k^T * scaling + bias), before dropout, without gradient (as `softmax_attention` gives it).
    Computed on its own, the rest of the attention stays with SDPA: for `topk`, 6% faster on DeiT-S at r = 13,
    batch 8 (3% at batch 1) than the explicit softmax over all N rows (docs/results.md, section 2)."""
    logits = torch.matmul(q[:, :, :1].detach() * scaling, k.detach().transpose(2, 3)).float()  # [B, h, 1, N]
    if bias is not None:
        logits = logits + bias[..., :1, :].detach()
    return logits.softmax(dim=-1)[:, :, 0].mean(1)


def attention_with_signals(attn: nn.Module, hidden_states, bias, needs: frozenset[str], want_probs: bool):
    """ViTAttention's forward (and DINOv2's, CLIP's, SigLIP's, which differ only in names) that also
    returns the signals a reducer asked for.

    Explicit softmax only where probabilities are needed (significance, or an `eager` model returning its
    attention maps); SDPA everywhere else, plus the class token's row alone where only that is needed. Mirrors
    transformers.models.vit.modeling_vit.ViTAttention.forward (5.x). Returns (output, probs, signals).
    """
    b, n, _ = hidden_states.shape
    q, k, v = project_qkv(attn, hidden_states)
    scaling = attn.scaling if hasattr(attn, "scaling") else attn.scale  # ViT, DINOv2 / CLIP, SigLIP
    out_proj = attn.o_proj if hasattr(attn, "o_proj") else attn.out_proj
    dropout = (attn.attention_dropout if hasattr(attn, "attention_dropout") else attn.dropout) if attn.training else 0.0
    if want_probs or "significance" in needs:
        out, probs, signals = softmax_attention(q, k, v, bias, scaling, dropout, needs, return_probs=want_probs)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=scaling)
        probs, signals = None, Signals()
        if "cls_attention" in needs:  # one row of probabilities, not N: SDPA does the rest
            signals.cls_attention = class_token_attention(q, k, bias, scaling)
    if "keys" in needs:
        signals.keys = k.detach().mean(1)
    out = out_proj(out.transpose(1, 2).contiguous().reshape(b, n, -1))
    return out, probs, signals


class TokenPoolModel(nn.Module):
    """Tower subclass (ViTModel, Dinov2Model, CLIPVisionModel, ...): refuses an attention mask, which
    cannot follow merged tokens, and otherwise runs upstream's forward. The mask that upstream builds
    itself when none is given (it does so under torch.export) sees every token, so the layers may drop it."""

    def forward(self, *args, **kwargs):
        mask = kwargs.get("attention_mask")
        position = self._tokenpool_mask_position
        if mask is None and position is not None and len(args) > position:
            mask = args[position]
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
    """The pre-norm block of every plain-ViT family, as transformers.models.vit.modeling_vit.ViTLayer.forward
    (5.x) writes it, with the family's names (DINOv2Layer, CLIPEncoderLayer and SiglipEncoderLayer compute
    the same). Changed lines are marked `# tokenpool:`."""

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        plan: LayerPlan = self._tokenpool
        names = plan.family or VIT
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
        hidden_states = getattr(self, names.norm1)(hidden_states)
        # tokenpool: the mask is dropped (TokenPoolModel refuses a user's mask) and the signals come back
        hidden_states, _, signals = getattr(self, names.attention)(
            hidden_states, None, tokenpool_bias=bias, tokenpool_needs=needs, **kwargs)
        for name in names.attention_out:  # dropout; DINOv2: layer scale, drop path
            hidden_states = getattr(self, name)(hidden_states)
        hidden_states = hidden_states + residual

        if pools and before_mlp:  # tokenpool: reduce between attention and MLP (ToMe's place)
            hidden_states, sizes = pool_tokens(hidden_states, sizes, signals, plan)

        # Fully Connected
        residual = hidden_states
        hidden_states = getattr(self, names.norm2)(hidden_states)
        hidden_states = getattr(self, names.mlp)(hidden_states)
        for name in names.mlp_out:
            hidden_states = getattr(self, name)(hidden_states)
        hidden_states = hidden_states + residual

        if pools and not before_mlp:  # tokenpool: reduce after the whole layer
            hidden_states, sizes = pool_tokens(hidden_states, sizes, signals, plan)
        plan.state.sizes[plan.index + 1] = sizes  # tokenpool: sizes out
        return hidden_states


def token_mean(tokens: torch.Tensor, sizes: torch.Tensor | None) -> torch.Tensor:
    """Mean over dim 1 of [B, N, C] tokens, each weighted by the patches it stands for ([B, N]; None: a
    plain mean), so a head that averages tokens sees the average of the patches, as before pooling."""
    if sizes is None:
        return tokens.mean(dim=1)
    w = sizes.to(tokens.dtype).unsqueeze(-1)
    return (tokens * w).sum(dim=1) / w.sum(dim=1)


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
    options = plan.config.reducer_options(plan.reducer.options)
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
        parameters = list(inspect.signature(cls.forward).parameters)
        attrs["_tokenpool_mask_position"] = (parameters.index("attention_mask") - 1
                                             if "attention_mask" in parameters else None)
    if issubclass(cls, PreTrainedModel):
        # a pooled model class loads the upstream model: type(model).from_pretrained(...) gives what
        # transformers would give, and patch_model applies pooling
        attrs["from_pretrained"] = classmethod(lambda _, *args, **kwargs: cls.from_pretrained(*args, **kwargs))
    sub = type(name, (mixin, cls), attrs)
    if issubclass(cls, PreTrainedModel):
        sub.__name__ = cls.__name__  # save_pretrained writes config.architectures from __name__; pickle uses __qualname__
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
    """One adapter per plain-ViT `Family`. It receives the whole model (`whole_model`): the tower can sit
    inside another model (CLIPModel.vision_model) and heads that average tokens are patched as well."""

    whole_model = True

    def __init__(self, family: Family):
        self.family = family
        self.model_types, self.model_classes = family.model_types, family.model_classes
        self.methods, self.method_note = family.methods, family.method_note

    def tower(self, model: nn.Module) -> nn.Module:
        for module in model.modules():
            if isinstance(module, self.family.towers):
                return module
        raise ValueError(f"{type(model).__name__} has no {' or '.join(t.__name__ for t in self.family.towers)} inside")

    def layers(self, model: nn.Module) -> nn.ModuleList:
        layers = self.tower(model)
        for name in self.family.layers.split("."):
            layers = getattr(layers, name)
        return layers

    def num_layers(self, model) -> int:
        return len(self.layers(model))

    def protected_tokens(self, model) -> int:
        config = self.tower(model).config
        registers = getattr(config, self.family.registers, 0) if self.family.registers else 0
        return self.family.protected[config.model_type] + registers

    def patch(self, model, config: TokenPoolConfig) -> None:
        tower, layers = self.tower(model), self.layers(model)
        keeps = config.layer_keeps(len(layers))
        state = PoolState(num_layers=len(layers))
        reducer = REDUCERS[config.method]
        protected = self.protected_tokens(model)
        for i, (layer, keep) in enumerate(zip(layers, keeps)):
            layer._tokenpool = LayerPlan(i, keep, protected, reducer, config, state, self.family)
            swap_class(layer, TokenPoolLayer)
            swap_class(getattr(layer, self.family.attention), TokenPoolAttention)
        tower._tokenpool_state = state
        swap_class(tower, TokenPoolModel)
        for module in model.modules():  # heads that average tokens read the sizes from the tower's state
            mixin = next((m for cls, m in self.family.heads if type(module) is cls), None)
            if mixin is not None:
                module._tokenpool_state = state
                swap_class(module, mixin)

    def unpatch(self, model) -> None:
        for layer in self.layers(model):
            restore_class(layer, "_tokenpool")
            restore_class(getattr(layer, self.family.attention))
        for module in model.modules():
            if hasattr(type(module), "_tokenpool_original") and "_tokenpool_state" in module.__dict__:
                restore_class(module, "_tokenpool_state")

    def is_patched(self, model) -> bool:
        return "_tokenpool_state" in self.tower(model).__dict__


def predefine(tower: type, layer: type, attention: type, heads: tuple[tuple[type, type], ...] = ()) -> None:
    """Create the pooled subclasses of one family's upstream classes at import, so that a pickled model
    loads in a fresh process (the heads' subclasses live in the mixin's module)."""
    pooled_class(TokenPoolModel, tower)
    pooled_class(TokenPoolLayer, layer)
    pooled_class(TokenPoolAttention, attention)
    for cls, mixin in heads:
        pooled_class(mixin, cls)


VIT = Family(
    model_types=("vit", "deit"),
    model_classes=("ViTModel", "ViTForImageClassification",
                   "DeiTModel", "DeiTForImageClassification", "DeiTForImageClassificationWithTeacher"),
    towers=(modeling_vit.ViTModel, modeling_deit.DeiTModel),
    protected={"vit": 1, "deit": 2},  # CLS (+ DeiT's distillation token)
)

predefine(modeling_vit.ViTModel, modeling_vit.ViTLayer, modeling_vit.ViTAttention)
predefine(modeling_deit.DeiTModel, modeling_deit.DeiTLayer, modeling_deit.DeiTAttention)
