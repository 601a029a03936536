"""BEiT and Data2VecVision: pool the token sequence inside chosen encoder layers, as for ViT.

Data path (docs/beit.md has the design and its measurements):

    pixels -> embeddings (CLS + patches [+ absolute positions]) -> layer 0 .. layer L-1 -> pooler -> head
                                                                 |
        a layer: LN -> attention (+ relative position bias, per layer and/or shared) -> lambda_1 x -> +
            -> [pool here: location="before_mlp"] -> LN -> MLP -> lambda_2 x -> + -> [or here: "after_layer"]
        pooling = the shared ViT step (`pool_tokens`: split off CLS -> reducer -> concat)

What BEiT adds over ViT is geometry inside attention: every layer adds a relative position bias
B[h, p, q] that looks up the offset between patches p and q. After pooling, a token stands for a
set of patches, so every later layer needs a bias between *sets*. The per-forward state therefore
keeps, for every image, which current token each original patch belongs to (`members`, [B, N0],
composed from each reducer's `assign`), and a layer after pooling builds its bias from it:

    "mean" (default): the size-weighted mean of the member patches' biases, B_c = A^T B A with A the
        [N0, K] membership normalised by cluster size (a scatter-add over the full bias; CLS rows and
        columns of a mean of constants stay what they were);
    "lse": the same, but the key side is a log-mean-exp (exact for keys that stand for equal tokens);
    "position": the bias looked up (bilinearly in the relative-position table) at the offset between
        the clusters' mean positions, as the Swin adapter does.

BEiT's mean-pooling head averages the patch tokens; after pooling it averages them weighted by the
patches each token stands for. Layer scale (lambda_1, lambda_2) multiplies the pooled tokens as it does
the plain ones. A layer before any pooling runs upstream's own forward, so keep=1 is the plain model
bit for bit. Data2VecVision is the same model under other names (and older code: separate
query/key/value and output modules, an encoder loop that collects the outputs): `Family` names the parts.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.beit import modeling_beit
from transformers.models.data2vec import modeling_data2vec_vision as modeling_d2v

from ..config import TokenPoolConfig
from ..reducers import REDUCERS
from .vit import LayerPlan, PoolState, attention_with_signals, pool_tokens, pooled_class, restore_class, swap_class

PROTECTED_TOKENS = 1  # CLS; never pooled
BIAS_DESIGNS = ("mean", "lse", "position")
DEFAULT_BIAS = "mean"  # docs/beit.md: measured against "position" and "lse"


@dataclass
class BeitPoolState(PoolState):
    """PoolState plus `members[i]`: [B, N0] the current token (among the patch tokens) each original
    patch belongs to on entering layer i (None while nothing was pooled). `record` stays on: the
    shared `pool_tokens` step hands its assignment over through `assignments`."""

    record: bool = True
    members: dict[int, torch.Tensor | None] = field(default_factory=dict)

    def __getstate__(self):
        return {**super().__getstate__(), "record": True, "members": {}}


@dataclass
class BeitLayerPlan(LayerPlan):
    bias: str = DEFAULT_BIAS
    layer_bias: nn.Module | None = None  # this layer's relative position bias module (per-layer tables)
    shared_bias: nn.Module | None = None  # the encoder's shared one
    patch_size: int = 16


# ---- the pooled relative position bias: pure functions over the full bias / the table ----------------


def full_bias(modules, window, interpolate_pos_encoding: bool, n: int) -> torch.Tensor | None:
    """[1, H, n, n] sum of upstream's relative position biases (per-layer and shared) over the original
    CLS + patch grid (n = 1 + Wh * Ww), or None when the model has none."""
    bias = None
    for module in modules:
        if module is not None:
            b = module(window, interpolate_pos_encoding=interpolate_pos_encoding, dim_size=n)
            bias = b if bias is None else bias + b
    return bias


def mean_bias(bias: torch.Tensor, members: torch.Tensor, sizes: torch.Tensor, lse: bool = False) -> torch.Tensor:
    """[B, H, K+1, K+1] bias between the current tokens: the mean over query members of the mean (or, with
    lse, the log-mean-exp) over key members of the full [1, H, N0+1, N0+1] bias.

    members: [B, N0] current patch-token index (0..K-1) of each original patch; sizes: [B, K+1] patches
    per current token, CLS first (size 1). Two scatter-adds over the full bias (O(H N0^2) additions,
    no dense [N0, K] product), nothing data-dependent."""
    b, n0 = members.shape
    h, k1 = bias.shape[1], sizes.shape[1]
    n = n0 + 1
    index = torch.cat([members.new_zeros(b, 1), members + 1], dim=1)  # CLS stays token 0
    full = bias.float().expand(b, h, n, n)
    if lse:
        full = full.exp()
    cols = full.new_zeros(b, h, n, k1).scatter_add_(-1, index[:, None, None, :].expand(b, h, n, n), full)
    cols = cols / sizes.float()[:, None, None, :]
    if lse:
        cols = cols.log()
    rows = cols.new_zeros(b, h, k1, k1).scatter_add_(-2, index[:, None, :, None].expand(b, h, n, k1), cols)
    return rows / sizes.float()[:, None, :, None]


def relative_table(module: nn.Module, window) -> tuple[torch.Tensor, torch.Tensor]:
    """The module's relative-position table at `window` as ([H, 2Wh-1, 2Ww-1], [H, 3]: cls->token,
    token->cls, cls->cls), resized the way upstream's forward resizes it for another window."""
    table = module.relative_position_bias_table
    heads = table.shape[-1]
    grid, cls = table[:-3], table[-3:].transpose(0, 1)
    old_h, old_w = 2 * module.window_size[0] - 1, 2 * module.window_size[1] - 1
    new_h, new_w = 2 * window[0] - 1, 2 * window[1] - 1
    if (new_h, new_w) == (old_h, old_w):
        return grid.reshape(old_h, old_w, heads).permute(2, 0, 1), cls
    # as upstream (BeitRelativePositionBias.forward), including its (width, height) reshape
    old = grid.reshape(1, old_w, old_h, -1).permute(0, 3, 1, 2)
    new = F.interpolate(old, size=(new_h, new_w), mode="bilinear")
    return new.permute(0, 2, 3, 1).reshape(new_h, new_w, heads).permute(2, 0, 1), cls


def position_bias(tables, window, members: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """[B, H, K+1, K+1] bias read bilinearly from the tables at the offset between the mean (fractional)
    positions of the current tokens' member patches; CLS rows and columns from the tables' CLS entries.
    At integer positions (one patch per token) it is upstream's lookup exactly."""
    wh, ww = window
    b, n0 = members.shape
    k = sizes.shape[1] - 1
    grid = sum(t[0].float() for t in tables)  # [H, 2Wh-1, 2Ww-1]
    cls = sum(t[1].float() for t in tables)  # [H, 3]
    heads = grid.shape[0]
    q = torch.arange(n0, device=members.device)
    coords = torch.stack([q // ww, q % ww], dim=-1).float()  # [N0, 2] (row, col) of each patch
    pos = coords.new_zeros(b, k, 2).scatter_add_(1, members[..., None].expand(b, n0, 2), coords.expand(b, n0, 2))
    pos = pos / sizes[:, 1:, None].float()
    offset = pos[:, :, None, :] - pos[:, None, :, :]  # [B, K, K, 2] query minus key, as upstream
    flat = grid.reshape(heads, -1)

    def corners(value, size):  # value in [0, size - 1]: lower index, upper index, upper weight
        low = value.floor().clamp(0, max(size - 2, 0))
        return low.long(), (low + 1).clamp(max=size - 1).long(), value - low

    y0, y1, wy = corners(offset[..., 0] + (wh - 1), 2 * wh - 1)
    x0, x1, wx = corners(offset[..., 1] + (ww - 1), 2 * ww - 1)
    width = 2 * ww - 1
    patch = sum(flat[:, yi * width + xi].permute(1, 0, 2, 3) * w.unsqueeze(1)  # [B, H, K, K]
                for yi, xi, w in ((y0, x0, (1 - wy) * (1 - wx)), (y0, x1, (1 - wy) * wx),
                                  (y1, x0, wy * (1 - wx)), (y1, x1, wy * wx)))
    top = torch.cat([cls[:, 2].view(1, heads, 1, 1).expand(b, heads, 1, 1),
                     cls[:, 0].view(1, heads, 1, 1).expand(b, heads, 1, k)], dim=-1)
    rest = torch.cat([cls[:, 1].view(1, heads, 1, 1).expand(b, heads, k, 1), patch], dim=-1)
    return torch.cat([top, rest], dim=2)


def pooled_bias(plan: BeitLayerPlan, window, interpolate_pos_encoding, members, sizes, n0: int):
    """The relative position bias this layer adds, over its current tokens: upstream's full bias while
    nothing was pooled, else the plan's design over the pooled tokens. None for a model without one."""
    modules = [m for m in (plan.layer_bias, plan.shared_bias) if m is not None]
    if not modules:
        return None
    if members is None:
        return full_bias(modules, window, interpolate_pos_encoding, n0 + 1)
    if plan.bias == "position":
        return position_bias([relative_table(m, window) for m in modules], window, members, sizes)
    bias = full_bias(modules, window, interpolate_pos_encoding, n0 + 1)
    return mean_bias(bias, members, sizes, lse=plan.bias == "lse")


# ---- one block, shared by both families ---------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """Where a BEiT-like model keeps its parts."""

    model_type: str
    modeling: object
    prefix: str  # class-name prefix in `modeling`
    layers: str  # attribute path of the layer list on the base model
    shared_bias: str  # attribute path of the shared relative position bias (None when unused)

    def get(self, base, path):
        for name in path.split("."):
            base = getattr(base, name, None)
        return base


BEIT = Family("beit", modeling_beit, "Beit", "layers", "shared_position_bias")
DATA2VEC = Family("data2vec-vision", modeling_d2v, "Data2VecVision", "encoder.layer", "encoder.relative_position_bias")


def _block(layer, hidden_states, resolution, interpolate_pos_encoding, want_probs, attend, parts):
    """Copied from transformers.models.beit.modeling_beit.BeitLayer.forward (5.x; Data2VecVisionLayer is
    the same computation). Changed lines are marked `# tokenpool:`. Returns (hidden_states, probs)."""
    plan: BeitLayerPlan = layer._tokenpool
    state: BeitPoolState = plan.state
    sizes = state.sizes.get(plan.index) if plan.index > 0 else None  # tokenpool: sizes and members in
    members = state.members.get(plan.index) if plan.index > 0 else None
    pools = plan.keep < 1.0
    before_mlp = plan.config.pool_location == "before_mlp"
    window = (resolution[0] // plan.patch_size, resolution[1] // plan.patch_size)
    n0 = window[0] * window[1]
    # tokenpool: the relative position bias over the current tokens, plus log(size) per pooled key
    bias = pooled_bias(plan, window, interpolate_pos_encoding, members, sizes, n0)
    if sizes is not None and plan.config.proportional_attention:
        log_sizes = sizes.log()[:, None, None, :]
        bias = log_sizes if bias is None else bias + log_sizes
    bias = None if bias is None else bias.to(hidden_states.dtype)
    needs = plan.reducer.needs if pools else frozenset()

    residual = hidden_states
    hidden_states, probs, signals = attend(layer.layernorm_before(hidden_states), bias, needs, want_probs)
    hidden_states = parts.attention_dropout(layer, hidden_states)
    if layer.lambda_1 is not None:
        hidden_states = layer.lambda_1 * hidden_states
    hidden_states = layer.drop_path(hidden_states) + residual

    if pools and before_mlp:  # tokenpool: reduce between attention and MLP
        hidden_states, sizes, members = _pool(hidden_states, sizes, members, signals, plan, n0)

    residual = hidden_states
    hidden_states = parts.mlp(layer, layer.layernorm_after(hidden_states))
    if layer.lambda_2 is not None:
        hidden_states = layer.lambda_2 * hidden_states
    hidden_states = layer.drop_path(hidden_states) + residual

    if pools and not before_mlp:  # tokenpool: reduce after the whole layer
        hidden_states, sizes, members = _pool(hidden_states, sizes, members, signals, plan, n0)
    state.sizes[plan.index + 1] = sizes  # tokenpool: sizes and members out
    state.members[plan.index + 1] = members
    return hidden_states, probs


def _pool(hidden_states, sizes, members, signals, plan: BeitLayerPlan, n0: int):
    """The shared ViT pooling step, plus the composed patch -> token map."""
    state = plan.state
    state.assignments.pop(plan.index, None)
    hidden_states, sizes = pool_tokens(hidden_states, sizes, signals, plan)
    assign = state.assignments.get(plan.index)  # None: this step kept every token
    if assign is not None:
        if members is None:
            members = assign
        else:
            members = assign.gather(1, members)
    return hidden_states, sizes, members


def _untouched(layer) -> bool:
    """Nothing pooled before this layer and it pools nothing itself: upstream's own forward applies. Not
    under torch.export: torch 2.13's ONNX exporter fails to decompose upstream's SDPA with the bias (it
    cannot export the plain HF BEiT either), so there every layer takes the explicit-softmax path."""
    plan = layer._tokenpool
    if torch.compiler.is_exporting():
        return False
    return plan.keep >= 1.0 and (plan.index == 0 or plan.state.sizes.get(plan.index) is None)


def _mark_untouched(layer) -> None:
    plan = layer._tokenpool
    plan.state.sizes[plan.index + 1] = None
    plan.state.members[plan.index + 1] = None


class _BeitParts:
    @staticmethod
    def attention_dropout(layer, x):
        return layer.dropout(x)

    @staticmethod
    def mlp(layer, x):
        return layer.dropout(layer.mlp(x))


class _Data2VecParts:
    @staticmethod
    def attention_dropout(layer, x):
        return layer.attention.output.dropout(x)  # after output.dense, which attention_with_signals applies

    @staticmethod
    def mlp(layer, x):
        return layer.output(layer.intermediate(x))


class TokenPoolBeitAttentionMixin(nn.Module):
    """BeitAttention subclass: upstream's forward unless the layer passes a pooled bias, then the same
    attention with that bias and the reducer's signals. Still the module's forward, so transformers'
    `output_attentions` hooks record its index-1 output."""

    def forward(self, hidden_states, attention_mask=None, tokenpool_bias=None, tokenpool_needs=None, **kwargs):
        if tokenpool_needs is None:
            out, probs = super().forward(hidden_states, attention_mask, **kwargs)
            return out, probs
        explicit = self.config._attn_implementation == "eager" or torch.compiler.is_exporting()  # see _untouched
        return attention_with_signals(self, hidden_states, tokenpool_bias, tokenpool_needs, want_probs=explicit)


class TokenPoolBeitLayerMixin(nn.Module):
    def forward(self, hidden_states, attention_mask=None, interpolate_pos_encoding=False, resolution=None, **kwargs):
        if _untouched(self):
            _mark_untouched(self)
            return super().forward(hidden_states, attention_mask, interpolate_pos_encoding, resolution, **kwargs)

        def attend(x, bias, needs, want_probs):  # tokenpool: the bias is rebuilt per layer; the mask dropped
            out, probs, signals = self.attention(x, None, tokenpool_bias=bias, tokenpool_needs=needs, **kwargs)
            return out, probs, signals

        hidden_states, _ = _block(self, hidden_states, resolution, interpolate_pos_encoding, None, attend, _BeitParts)
        return hidden_states


class TokenPoolData2VecVisionAttentionMixin(nn.Module):
    """Data2VecVisionAttention subclass that answers to BeitAttention's names (q_proj, ..., o_proj, head_dim,
    scaling), so the shared `attention_with_signals` runs it. Properties only: nothing is added to it."""

    q_proj = property(lambda self: self.attention.query)
    k_proj = property(lambda self: self.attention.key)
    v_proj = property(lambda self: self.attention.value)
    o_proj = property(lambda self: self.output.dense)
    head_dim = property(lambda self: self.attention.attention_head_size)
    scaling = property(lambda self: self.attention.attention_head_size ** -0.5)
    attention_dropout = property(lambda self: self.attention.dropout.p)


class TokenPoolData2VecVisionLayerMixin(nn.Module):
    def forward(self, hidden_states, output_attentions=False, relative_position_bias=None,
                interpolate_pos_encoding=False, resolution=None):
        if _untouched(self):
            _mark_untouched(self)
            return super().forward(hidden_states, output_attentions, relative_position_bias,
                                   interpolate_pos_encoding, resolution)
        # upstream returns maps only from its eager attention, and only when asked
        eager = not isinstance(self.attention.attention, modeling_d2v.Data2VecVisionSdpaSelfAttention)

        def attend(x, bias, needs, want_probs):  # explicit softmax under torch.export: see _untouched
            explicit = want_probs or torch.compiler.is_exporting()
            return attention_with_signals(self.attention, x, bias, needs, want_probs=explicit)

        # tokenpool: the encoder's shared bias is rebuilt over the current tokens (plan.shared_bias)
        hidden_states, probs = _block(self, hidden_states, resolution, interpolate_pos_encoding,
                                      bool(output_attentions) and eager, attend, _Data2VecParts)
        return (hidden_states, probs) if output_attentions else (hidden_states,)


class TokenPoolBeitPoolerMixin(nn.Module):
    """BeitPooler / Data2VecVisionPooler subclass: with mean pooling, a pooled token counts for its patches."""

    def forward(self, hidden_states):
        sizes = self._tokenpool_state.sizes.get(self._tokenpool_num_layers)
        if sizes is None or self.layernorm is None:
            return super().forward(hidden_states)
        weights = sizes[:, PROTECTED_TOKENS:, None].to(hidden_states.dtype)
        mean = (hidden_states[:, PROTECTED_TOKENS:] * weights).sum(1) / weights.sum(1)
        return self.layernorm(mean)


class TokenPoolBeitModelMixin(nn.Module):
    """BeitModel subclass: refuses an attention mask, which cannot follow merged tokens."""

    def forward(self, *args, **kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > self._tokenpool_mask_position:
            mask = args[self._tokenpool_mask_position]
        if mask is not None:
            raise ValueError("attention_mask cannot be used with token pooling: tokens are merged, so a per-token "
                             "mask no longer applies. Call without attention_mask, or unpatch_model(model) first.")
        return super().forward(*args, **kwargs)


def _model_class(cls: type) -> type:
    sub = pooled_class(TokenPoolBeitModelMixin, cls)
    if "_tokenpool_mask_position" not in sub.__dict__:
        sub._tokenpool_mask_position = list(inspect.signature(cls.forward).parameters).index("attention_mask") - 1
    return sub


class BeitAdapter:
    """BEiT and Data2VecVision: one design, the parts named per family."""

    model_types = ("beit", "data2vec-vision")
    methods = ("tokenpool", "kmeans", "tome", "topk")
    method_note = "all reducers apply"
    model_classes = (
        "BeitModel", "BeitForImageClassification",
        "Data2VecVisionModel", "Data2VecVisionForImageClassification",
    )
    families = {f.model_type: f for f in (BEIT, DATA2VEC)}

    def __init__(self, bias: str = DEFAULT_BIAS):
        if bias not in BIAS_DESIGNS:
            raise ValueError(f"unknown bias design {bias!r}; accepted: {', '.join(BIAS_DESIGNS)}")
        self.bias = bias

    def layers(self, base):
        return self.families[base.config.model_type].get(base, self.families[base.config.model_type].layers)

    def num_layers(self, base) -> int:
        return len(self.layers(base))

    @staticmethod
    def protected_tokens(base) -> int:
        return PROTECTED_TOKENS

    def patch(self, base, config: TokenPoolConfig) -> None:
        family = self.families[base.config.model_type]
        layers = self.layers(base)
        keeps = config.layer_keeps(len(layers))
        state = BeitPoolState()
        reducer = REDUCERS[config.method]
        shared = family.get(base, family.shared_bias) if base.config.use_shared_relative_position_bias else None
        for i, (layer, keep) in enumerate(zip(layers, keeps)):
            if family is BEIT:
                own = layer.relative_position_bias
            else:
                own = layer.attention.attention.relative_position_bias if layer.attention.attention.has_relative_position_bias else None
            layer._tokenpool = BeitLayerPlan(index=i, keep=keep, protected=PROTECTED_TOKENS, reducer=reducer,
                                             config=config, state=state, bias=self.bias, layer_bias=own,
                                             shared_bias=shared, patch_size=base.config.patch_size)
            swap_class(layer, TokenPoolBeitLayerMixin if family is BEIT else TokenPoolData2VecVisionLayerMixin)
            swap_class(layer.attention, TokenPoolBeitAttentionMixin if family is BEIT else TokenPoolData2VecVisionAttentionMixin)
        if base.pooler is not None:
            base.pooler._tokenpool_state = state
            base.pooler._tokenpool_num_layers = len(layers)
            swap_class(base.pooler, TokenPoolBeitPoolerMixin)
        base._tokenpool_state = state
        if family is BEIT:
            base.__class__ = _model_class(type(base))

    def unpatch(self, base) -> None:
        for layer in self.layers(base):
            restore_class(layer, "_tokenpool")
            restore_class(layer.attention)
        if base.pooler is not None:
            restore_class(base.pooler, "_tokenpool_state", "_tokenpool_num_layers")
        if hasattr(type(base), "_tokenpool_original"):
            restore_class(base, "_tokenpool_state")
        else:
            base.__dict__.pop("_tokenpool_state", None)

    @staticmethod
    def is_patched(base) -> bool:
        return "_tokenpool_state" in base.__dict__


# the subclasses exist at import, so a pickled model loads in a fresh process
_model_class(modeling_beit.BeitModel)
for _family, _mixins in ((BEIT, (TokenPoolBeitLayerMixin, TokenPoolBeitAttentionMixin)),
                         (DATA2VEC, (TokenPoolData2VecVisionLayerMixin, TokenPoolData2VecVisionAttentionMixin))):
    pooled_class(_mixins[0], getattr(_family.modeling, f"{_family.prefix}Layer"))
    pooled_class(_mixins[1], getattr(_family.modeling, f"{_family.prefix}Attention"))
    pooled_class(TokenPoolBeitPoolerMixin, getattr(_family.modeling, f"{_family.prefix}Pooler"))
