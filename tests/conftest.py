from pathlib import Path

import pytest
import torch
from transformers import (
    CLIPConfig,
    CLIPForImageClassification,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    DeiTModel,
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersForImageClassification,
    SiglipConfig,
    SiglipForImageClassification,
    SiglipVisionConfig,
    SiglipVisionModel,
    SwinConfig,
    SwinForImageClassification,
    SwinModel,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

torch.set_num_threads(min(2, torch.get_num_threads()))

VIT_SHAPE = dict(hidden_size=32, num_hidden_layers=6, num_attention_heads=2, intermediate_size=64,
                 image_size=32, patch_size=4, num_labels=5)
DINO_SHAPE = dict(hidden_size=32, num_hidden_layers=6, num_attention_heads=2, mlp_ratio=2, image_size=32,
                  patch_size=4, num_labels=5)
TOWER_SHAPE = {k: v for k, v in VIT_SHAPE.items() if k != "num_labels"}  # CLIP / SigLIP vision towers
SWIN_SHAPE = dict(image_size=32, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4,
                  num_labels=5)

# name -> factory of a tiny random model (seeded), covering every supported class.
TINY_MODELS = {
    "vit": lambda: ViTForImageClassification(ViTConfig(**VIT_SHAPE)),
    "vit-base": lambda: ViTModel(ViTConfig(**VIT_SHAPE)),
    "deit": lambda: DeiTForImageClassification(DeiTConfig(**VIT_SHAPE)),
    "deit-teacher": lambda: DeiTForImageClassificationWithTeacher(DeiTConfig(**VIT_SHAPE)),
    "deit-base": lambda: DeiTModel(DeiTConfig(**VIT_SHAPE)),
    "swin": lambda: SwinForImageClassification(SwinConfig(**SWIN_SHAPE)),
    "swin-base": lambda: SwinModel(SwinConfig(**SWIN_SHAPE)),
    "dinov2": lambda: Dinov2ForImageClassification(Dinov2Config(**DINO_SHAPE)),
    "dinov2-base": lambda: Dinov2Model(Dinov2Config(**DINO_SHAPE)),
    "dinov2-registers": lambda: Dinov2WithRegistersForImageClassification(
        Dinov2WithRegistersConfig(**DINO_SHAPE, num_register_tokens=4)),
    "clip": lambda: CLIPForImageClassification(CLIPConfig(vision_config=TOWER_SHAPE, num_labels=5)),
    "clip-vision": lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**TOWER_SHAPE)),
    "siglip": lambda: SiglipForImageClassification(SiglipConfig(vision_config=TOWER_SHAPE, num_labels=5)),
    "siglip-vision": lambda: SiglipVisionModel(SiglipVisionConfig(**TOWER_SHAPE)),
}


def make(name: str):
    torch.manual_seed(0)
    model = TINY_MODELS[name]().eval()
    # Random init leaves LayerNorm at identity and tokens nearly alike; perturb every parameter a bit so
    # that pooling decisions are not degenerate ties.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def main_output(out):
    """Logits, else the image embedding (CLIP's projection), else the last hidden state."""
    for name in ("logits", "image_embeds", "last_hidden_state"):
        if getattr(out, name, None) is not None:
            return getattr(out, name)
    raise AssertionError(f"no output in {type(out).__name__}")


def output_of(model, pixels, **kwargs):
    with torch.no_grad():
        return main_output(model(pixel_values=pixels, **kwargs))


def output_in_a_fresh_process(model, pixels, folder) -> str:
    """torch.save the model, load it in a new Python process and compare its output with this process's:
    returns "same" or the child's error. The child runs at this process's thread count (a CI machine with
    more cores would otherwise split the matmul reductions differently); the float tolerance still catches
    a lost or altered patch, which moves these tiny models' outputs by 0.03 and more."""
    import subprocess
    import sys

    torch.save(model, folder / "model.pt")
    torch.save(pixels, folder / "pixels.pt")
    torch.save(output_of(model, pixels), folder / "expected.pt")
    code = (f"import torch, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from conftest import output_of; "
            f"torch.set_num_threads({torch.get_num_threads()}); "
            f"m = torch.load('{folder}/model.pt', weights_only=False).eval(); "
            f"x = torch.load('{folder}/pixels.pt'); e = torch.load('{folder}/expected.pt'); "
            "torch.testing.assert_close(output_of(m, x), e); print('same')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    return result.stdout.strip() or result.stderr[-2000:]


@pytest.fixture
def pixels():
    torch.manual_seed(1)
    return torch.randn(4, 3, 32, 32)


def save_fmnist_vit(folder, **shape):
    """A random ViT with Fashion-MNIST's ten class names and an image processor, saved as an HF folder."""
    from transformers import ViTImageProcessor

    from hf_tokenpool.data import FASHION_MNIST_CLASSES

    torch.manual_seed(0)
    id2label = dict(enumerate(FASHION_MNIST_CLASSES))
    config = ViTConfig(**{**shape, "image_size": 32, "patch_size": 4, "id2label": id2label,
                          "label2id": {v: k for k, v in id2label.items()}})
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)
    return str(folder)
