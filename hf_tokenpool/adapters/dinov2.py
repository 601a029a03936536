"""DINOv2 and DINOv2 with registers: the plain-ViT adapter with DINOv2's names.

Protected: CLS and the register tokens (they sit right after CLS). The block adds layer scale and drop
path to each branch. The image classifier reads [CLS, mean of the patch tokens]; after pooling that
mean is size-weighted, so a pooled token counts for the patches it stands for.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.models.dinov2 import modeling_dinov2 as d2
from transformers.models.dinov2_with_registers import modeling_dinov2_with_registers as d2r

from .vit import Family, predefine, token_mean


class TokenPoolDinov2Classifier(nn.Module):
    """Dinov2(WithRegisters)ForImageClassification.forward (transformers 5.x) with a size-weighted
    patch mean. Changed lines are marked `# tokenpool:`."""

    def forward(self, pixel_values=None, labels=None, attention_mask=None, **kwargs):
        outputs = self.base_model(pixel_values, attention_mask=attention_mask, **kwargs)
        sequence_output = outputs.last_hidden_state
        cls_token = sequence_output[:, 0]
        first = 1 + getattr(self.config, "num_register_tokens", 0)  # DINOv2 with registers: skip them too
        sizes = self._tokenpool_state.output_sizes()  # tokenpool: patches per token, or None
        patch_mean = token_mean(sequence_output[:, first:], None if sizes is None else sizes[:, first:])
        logits = self.classifier(torch.cat([cls_token, patch_mean], dim=1))
        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config, **kwargs)
        return ImageClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                     attentions=outputs.attentions)


HEADS = ((d2.Dinov2ForImageClassification, TokenPoolDinov2Classifier),
         (d2r.Dinov2WithRegistersForImageClassification, TokenPoolDinov2Classifier))

DINOV2 = Family(
    model_types=("dinov2", "dinov2_with_registers"),
    model_classes=("Dinov2Model", "Dinov2ForImageClassification",
                   "Dinov2WithRegistersModel", "Dinov2WithRegistersForImageClassification"),
    towers=(d2.Dinov2Model, d2r.Dinov2WithRegistersModel),
    protected={"dinov2": 1, "dinov2_with_registers": 1},  # CLS
    registers="num_register_tokens",  # they sit right after CLS
    layers="encoder.layer",
    norm1="norm1", attention_out=("layer_scale1", "drop_path"),
    norm2="norm2", mlp_out=("layer_scale2", "drop_path"),
    heads=HEADS,
)

predefine(d2.Dinov2Model, d2.Dinov2Layer, d2.Dinov2Attention, HEADS[:1])
predefine(d2r.Dinov2WithRegistersModel, d2r.Dinov2WithRegistersLayer, d2r.Dinov2WithRegistersAttention, HEADS[1:])
