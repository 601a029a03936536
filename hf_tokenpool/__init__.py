"""hf_tokenpool: Token Pooling (Marin et al., WACV 2023) for Hugging Face vision transformers: ViT, DeiT,
DINOv2, CLIP, SigLIP and Swin (SUPPORTED_CLASSES lists every class).

    import hf_tokenpool
    hf_tokenpool.patch_model(model, keep=0.6)      # in place; fewer tokens, fewer FLOPs
    hf_tokenpool.unpatch_model(model)               # the exact original back
"""

from .config import TokenPoolConfig
from .flops import count_flops, images_per_second, time_interleaved
from .patch import (
    ADAPTERS,
    SUPPORTED_CLASSES,
    from_pretrained,
    is_patched,
    load_model,
    num_layers,
    patch_model,
    protected_tokens,
    unpatch_model,
)
from .reducers import REDUCERS

__version__ = "0.1.0"

__all__ = [
    "ADAPTERS",
    "REDUCERS",
    "SUPPORTED_CLASSES",
    "TokenPoolConfig",
    "count_flops",
    "from_pretrained",
    "images_per_second",
    "is_patched",
    "load_model",
    "num_layers",
    "patch_model",
    "protected_tokens",
    "time_interleaved",
    "unpatch_model",
]
