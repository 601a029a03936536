"""CLIP's vision tower: the plain-ViT adapter with CLIP's names.

Only the vision tower is pooled (in CLIPModel, CLIPVisionModel(WithProjection) and
CLIPForImageClassification); the text tower is untouched. Protected: CLS, whose post-layernorm
state is the image embedding, so `get_image_features`, `logits_per_image` and the zero-shot pipeline
work unchanged. CLIPForImageClassification averages the patch tokens: size-weighted after pooling.
"""

from __future__ import annotations

from torch import nn
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.models.clip import modeling_clip as clip

from .vit import Family, predefine, token_mean


class TokenPoolCLIPClassifier(nn.Module):
    """CLIPForImageClassification.forward (transformers 5.x) with a size-weighted patch mean. Changed
    lines are marked `# tokenpool:`."""

    def forward(self, pixel_values=None, labels=None, **kwargs):
        outputs = self.vision_model(pixel_values, **kwargs)
        sequence_output = outputs.last_hidden_state
        sizes = self._tokenpool_state.output_sizes()  # tokenpool: patches per token, or None
        sequence_output = token_mean(sequence_output[:, 1:, :], None if sizes is None else sizes[:, 1:])
        logits = self.classifier(sequence_output)
        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config)
        return ImageClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                     attentions=outputs.attentions)


HEADS = ((clip.CLIPForImageClassification, TokenPoolCLIPClassifier),)

CLIP = Family(
    model_types=("clip", "clip_vision_model"),
    model_classes=("CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPModel", "CLIPForImageClassification"),
    towers=(clip.CLIPVisionModel,),
    protected={"clip_vision_model": 1},  # CLS
    layers="encoder.layers",
    norm1="layer_norm1", attention="self_attn", attention_out=(),
    norm2="layer_norm2", mlp_out=(),
    heads=HEADS,
)

predefine(clip.CLIPVisionModel, clip.CLIPEncoderLayer, clip.CLIPAttention, HEADS)
