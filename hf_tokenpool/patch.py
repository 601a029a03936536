"""The front door: `patch_model`, `unpatch_model`, `from_pretrained`, and the one adapter registry."""

from __future__ import annotations

import dataclasses
import math

import torch
import transformers
from torch import nn

from .adapters.beit import BeitAdapter
from .adapters.clip import CLIP
from .adapters.dinov2 import DINOV2
from .adapters.siglip import SIGLIP
from .adapters.swin import SwinAdapter
from .adapters.swinv2 import Swinv2Adapter
from .adapters.vit import VIT, ViTAdapter
from .config import CONFIG_KEY, TokenPoolConfig
from .flops import count_flops



def _by_type(adapter) -> dict:
    return dict.fromkeys(adapter.model_types, adapter)


# model_type -> adapter, one line per family; an unknown type raises with this list.
ADAPTERS = {
    **_by_type(ViTAdapter(VIT)),  # vit, deit
    **_by_type(ViTAdapter(DINOV2)),  # dinov2, dinov2_with_registers
    **_by_type(ViTAdapter(CLIP)),  # clip, clip_vision_model
    **_by_type(ViTAdapter(SIGLIP)),  # siglip, siglip_vision_model
    "swin": SwinAdapter(),
    "swinv2": Swinv2Adapter(),
    **_by_type(BeitAdapter()),  # beit, data2vec-vision
}
SUPPORTED_CLASSES = tuple(dict.fromkeys(name for a in ADAPTERS.values() for name in a.model_classes))
# Heads that need every token back, and why they cannot be pooled.
UNSUPPORTED_HEADS = {
    "ViTForMaskedImageModeling": "masked image modelling reconstructs every patch, so no token may be pooled",
    "DeiTForMaskedImageModeling": "masked image modelling reconstructs every patch, so no token may be pooled",
    "SwinForMaskedImageModeling": "masked image modelling reconstructs every patch, so no token may be pooled",
    "SwinBackbone": "a backbone's feature maps are read by a downstream head; only classification is supported",
    "Swinv2ForMaskedImageModeling": "masked image modelling reconstructs every patch, so no token may be pooled",
    "Swinv2Backbone": "a backbone's feature maps are read by a downstream head; only classification is supported",
    "BeitForMaskedImageModeling": "masked image modelling predicts every patch's visual token, so no token may be pooled",
    "BeitForSemanticSegmentation": "semantic segmentation reads every patch of four layers back as feature maps",
    "BeitBackbone": "a backbone's feature maps are read by a downstream head; only classification is supported",
    "Data2VecVisionForSemanticSegmentation": "semantic segmentation reads every patch of four layers back as feature maps",
}
_OPTION_NAMES = tuple(f.name for f in dataclasses.fields(TokenPoolConfig))


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (`get_peft_model(model, LoraConfig(...))`), else model."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _adapter_and_base(model: nn.Module):
    model = unwrap(model)
    name = getattr(type(model), "_tokenpool_original", type(model)).__name__
    if name in UNSUPPORTED_HEADS:
        raise ValueError(f"{name} cannot be patched: {UNSUPPORTED_HEADS[name]}. "
                         f"Supported classes: {', '.join(SUPPORTED_CLASSES)}")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    adapter = ADAPTERS.get(model_type)
    if adapter is None or name not in adapter.model_classes:
        raise ValueError(f"{name} (model_type={model_type!r}) is not supported by hf_tokenpool. Supported "
                         f"model types: {', '.join(sorted(ADAPTERS))}; classes: {', '.join(SUPPORTED_CLASSES)}")
    return adapter, target(adapter, model)


def target(adapter, model: nn.Module) -> nn.Module:
    """What an adapter patches: the whole model for the plain-ViT families (`whole_model`: the vision
    tower may sit inside CLIPModel, and heads that average tokens are patched too), else the base model."""
    return model if getattr(adapter, "whole_model", False) else model.base_model


def num_layers(model: nn.Module) -> int:
    """Encoder layers (Swin: blocks) that a schedule has one entry for."""
    adapter, base = _adapter_and_base(model)
    return adapter.num_layers(base)


def protected_tokens(model: nn.Module) -> int | None:
    """Leading tokens that are never pooled (CLS, distillation token, registers; 0 for SigLIP), or None
    for windowed models (Swin), which pool inside windows and keep their grid between blocks."""
    adapter, base = _adapter_and_base(model)
    return adapter.protected_tokens(base) if hasattr(adapter, "protected_tokens") else None


def is_patched(model: nn.Module) -> bool:
    adapter, base = _adapter_and_base(model)
    return adapter.is_patched(base)


def patch_model(model: nn.Module, keep: float | None = None, method: str | None = None, **options) -> nn.Module:
    """Add token pooling to a `transformers` vision model (docs/families.md lists them), in place; returns it.

    keep: fraction of tokens kept at each pooling step (default 0.6). method: "tokenpool" (default),
    "kmeans", "tome" or "topk". options: any other `TokenPoolConfig` field (pool_after, schedule,
    target_flops, proportional_attention, iterations, output), or `config=TokenPoolConfig(...)`.
    With no settings at all, a model whose config carries pooling settings (saved by a patched model)
    gets those back. Patching a patched model raises: call `unpatch_model` first.
    """
    adapter, base = _adapter_and_base(model)
    wrapper, model = model, unwrap(model)
    if adapter.is_patched(base):
        raise ValueError("this model is already patched with token pooling "
                         f"({getattr(model.config, CONFIG_KEY, None)}); call unpatch_model(model) first to change it")
    config = options.pop("config", None)
    unknown = set(options) - set(_OPTION_NAMES)
    if unknown:
        raise TypeError(f"unknown token pooling option(s) {sorted(unknown)}; accepted: {', '.join(_OPTION_NAMES)}")
    settings = {k: v for k, v in dict(options, keep=keep, method=method).items() if v is not None}
    if config is not None:
        if settings:
            raise TypeError("pass either config=TokenPoolConfig(...) or individual settings, not both")
        config = config if isinstance(config, TokenPoolConfig) else TokenPoolConfig.from_dict(dict(config))
    elif not settings and getattr(model.config, CONFIG_KEY, None):
        config = TokenPoolConfig.from_dict(dict(getattr(model.config, CONFIG_KEY)))
    else:
        config = TokenPoolConfig(**settings)
    if config.method not in adapter.methods:
        raise ValueError(f"method {config.method!r} is not available for {model.config.model_type}: "
                         f"{adapter.method_note}. Accepted there: {', '.join(adapter.methods)}")
    if config.target_flops is not None:
        config = dataclasses.replace(config, keep=_solve_keep(model, adapter, base, config))
    adapter.patch(base, config)
    setattr(model.config, CONFIG_KEY, config.to_dict())
    return wrapper


def unpatch_model(model: nn.Module) -> nn.Module:
    """Give the exact original model back (same classes, same logits, same state_dict keys)."""
    adapter, base = _adapter_and_base(model)
    if not adapter.is_patched(base):
        raise ValueError("this model is not patched with token pooling; nothing to undo")
    adapter.unpatch(base)
    if hasattr(base.config, CONFIG_KEY):
        delattr(base.config, CONFIG_KEY)
    return model


def vision_config(model: nn.Module):
    """The config with the image settings (image_size, num_channels): CLIP's and SigLIP's vision_config,
    else the model's own."""
    return getattr(model.config, "vision_config", model.config)


def _dummy_pixels(model: nn.Module) -> torch.Tensor:
    config = vision_config(model)
    size = config.image_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    param = next(model.parameters())
    return torch.zeros(1, config.num_channels, height, width, dtype=param.dtype, device=param.device)


def _solve_keep(model, adapter, base, config: TokenPoolConfig) -> float:
    """Largest keep whose FLOPs (torch's counter, one image at the config's size) fit the budget."""
    pixels = _dummy_pixels(model)
    plain = count_flops(model, pixels)

    def ratio(keep: float) -> float | None:
        adapter.patch(base, dataclasses.replace(config, keep=keep, target_flops=None))
        try:
            return count_flops(model, pixels) / plain
        except ValueError:  # keep so small that a step would keep no token
            return None
        finally:
            adapter.unpatch(base)

    if config.target_flops >= 1.0:
        return 1.0
    lo, hi = 0.0, 1.0  # ratio(hi) > target is the loop invariant, lo is feasible (or 0)
    for _ in range(20):
        mid = (lo + hi) / 2
        r = ratio(mid)
        if r is not None and r <= config.target_flops:
            lo = mid
        else:
            hi = mid
    if lo == 0.0 or ratio(lo) is None:
        # the smallest keep that still leaves a token at every step gives the cheapest reachable cost
        bad, good = 0.0, 1.0
        for _ in range(20):
            mid = (bad + good) / 2
            bad, good = (bad, mid) if ratio(mid) is not None else (mid, good)
        raise ValueError(f"target_flops={config.target_flops} cannot be reached with this schedule: the cheapest "
                         f"reachable is about {ratio(good):.3f} (keep={good:.3f}); pool at more layers or raise "
                         "target_flops")
    return math.floor(lo * 1e4) / 1e4  # round down: rounding up could overshoot the budget


def load_model(name_or_path: str, **hf_kwargs) -> nn.Module:
    """Load a checkpoint with the class its config.json names when that class is supported (so a
    DeiT-with-teacher checkpoint keeps both heads), else `AutoModelForImageClassification`.
    Safetensors only; remote code is never run. No pooling is applied."""
    if hf_kwargs.pop("trust_remote_code", False):
        raise ValueError("hf_tokenpool never runs remote code: trust_remote_code=True is refused")
    hub_keys = ("revision", "cache_dir", "token", "local_files_only", "subfolder", "force_download")
    model_config = transformers.AutoConfig.from_pretrained(
        name_or_path, **{k: hf_kwargs[k] for k in hub_keys if k in hf_kwargs})
    architecture = (model_config.architectures or [None])[0]
    if architecture in SUPPORTED_CLASSES:
        cls = getattr(transformers, architecture)
    else:
        cls = transformers.AutoModelForImageClassification
    if not any(k in hf_kwargs for k in ("num_labels", "id2label")):
        hf_kwargs["config"] = model_config
    return cls.from_pretrained(name_or_path, use_safetensors=True, **hf_kwargs)


def from_pretrained(name_or_path: str, pooling: TokenPoolConfig | dict | None = None, **hf_kwargs) -> nn.Module:
    """Load a ViT/DeiT/Swin checkpoint (Hub id or local folder) and apply token pooling.

    The settings are `pooling` when given, else the ones saved in its config.json by a patched model.
    hf_kwargs go to `transformers`' `from_pretrained` (revision, dtype, token, ...). Safetensors only;
    remote code is never run.
    """
    model = load_model(name_or_path, **hf_kwargs)
    if pooling is None and not getattr(model.config, CONFIG_KEY, None):
        raise ValueError(f"{name_or_path} carries no token pooling settings in its config.json; pass "
                         "pooling=TokenPoolConfig(...) or load it with transformers and call patch_model(model, ...)")
    return patch_model(model, config=pooling) if pooling is not None else patch_model(model)
