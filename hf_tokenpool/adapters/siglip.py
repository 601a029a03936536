"""SigLIP's vision tower: the plain-ViT adapter with SigLIP's names.

SigLIP has no CLS token: every token is pool-able, and `topk` (which keeps what CLS attends to) does
not apply. Two heads read all tokens, and both weigh a pooled token by the patches it stands for:
SiglipForImageClassification's mean is size-weighted, and the attention-pooling head (a learned probe
attending over the tokens, SigLIP's image embedding) gets proportional attention, log(size) added to
its logits, exactly as if each patch were still there.
"""

from __future__ import annotations

from torch import nn
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.models.siglip import modeling_siglip as siglip

from .vit import Family, predefine, token_mean


class TokenPoolSiglipClassifier(nn.Module):
    """SiglipForImageClassification.forward (transformers 5.x) with a size-weighted token mean. Changed
    lines are marked `# tokenpool:`."""

    def forward(self, pixel_values=None, labels=None, interpolate_pos_encoding: bool = False, **kwargs):
        outputs = self.vision_model(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, **kwargs)
        sequence_output = outputs.last_hidden_state
        sequence_output = token_mean(sequence_output, self._tokenpool_state.output_sizes())  # tokenpool
        logits = self.classifier(sequence_output)
        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config)
        return ImageClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                     attentions=outputs.attentions)


class TokenPoolSiglipAttentionHead(nn.Module):
    """SiglipMultiheadAttentionPoolingHead.forward (transformers 5.x) with proportional attention: the
    probe's logit for a token standing for s patches gets log(s). Changed lines are marked `# tokenpool:`."""

    def forward(self, hidden_state):
        batch_size = hidden_state.shape[0]
        probe = self.probe.repeat(batch_size, 1, 1)
        sizes = self._tokenpool_state.output_sizes()  # tokenpool: [B, N] or None (nothing pooled)
        mask = None
        if sizes is not None:  # float mask added to the logits, one row per (image, head)
            heads = self.attention.num_heads
            mask = sizes.log().to(hidden_state.dtype).repeat_interleave(heads, dim=0)[:, None, :]
        hidden_state = self.attention(probe, hidden_state, hidden_state, attn_mask=mask)[0]
        residual = hidden_state
        hidden_state = self.layernorm(hidden_state)
        hidden_state = residual + self.mlp(hidden_state)
        return hidden_state[:, 0]


HEADS = ((siglip.SiglipForImageClassification, TokenPoolSiglipClassifier),
         (siglip.SiglipMultiheadAttentionPoolingHead, TokenPoolSiglipAttentionHead))

SIGLIP = Family(
    model_types=("siglip", "siglip_vision_model"),
    model_classes=("SiglipVisionModel", "SiglipModel", "SiglipForImageClassification"),
    towers=(siglip.SiglipVisionModel,),
    protected={"siglip_vision_model": 0},  # no CLS: every token is pool-able
    layers="encoder.layers",
    norm1="layer_norm1", attention="self_attn", attention_out=(),
    norm2="layer_norm2", mlp_out=(),
    heads=HEADS,
    methods=("tokenpool", "kmeans", "tome"),
    method_note="topk keeps what the class token attends to, and SigLIP has no class token",
)

predefine(siglip.SiglipVisionModel, siglip.SiglipEncoderLayer, siglip.SiglipAttention, HEADS)
