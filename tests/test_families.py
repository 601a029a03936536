"""DINOv2 (with registers), CLIP and SigLIP: what differs from ViT. The shared checks (keep=1 is the
identity, unpatch is exact, batch independence, gradients, token counts) run on these families too,
in test_patch.py and test_deploy.py, through conftest.TINY_MODELS."""

import sys
from pathlib import Path

import pytest
import torch
from conftest import TOWER_SHAPE, make, output_of
from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

import hf_tokenpool as tp


def unpool(tokens, state, protected):
    """Each original patch gets the pooled token it ended in: [B, p + K, C] -> [B, p + N0, C], by
    composing the assignments recorded at every pooling step."""
    n0 = state.sizes_in_patches
    origin = torch.arange(n0).expand(tokens.shape[0], n0)
    for i in sorted(state.assignments):
        origin = state.assignments[i].gather(1, origin)
    body = tokens[:, protected:].gather(1, origin.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    return torch.cat([tokens[:, :protected], body], dim=1)


def pooled_sequence(model, pixels, method):
    """The tower's output sequence and its unpooled version (every patch back in place)."""
    tp.patch_model(model, keep=0.5, method=method)
    adapter = tp.ADAPTERS[model.config.model_type]
    tower = adapter.tower(model)
    state = tower._tokenpool_state
    state.record = True
    with torch.no_grad():
        sequence = tower(pixel_values=pixels).last_hidden_state
    state.sizes_in_patches = 64
    p = tp.protected_tokens(model)
    assert sequence.shape[1] < p + 64  # pooled
    full = unpool(sequence, state, p)
    assert full.shape[1] == p + 64
    sizes = state.output_sizes()
    torch.testing.assert_close(sizes[:, p:].sum(-1), torch.full((pixels.shape[0],), 64.0))
    return sequence, full


def upstream_head(name, model, sequence):
    """What upstream's classifier computes from the tower's output sequence (plain means)."""
    if name.startswith("dinov2"):
        p = tp.protected_tokens(model)
        return model.classifier(torch.cat([sequence[:, 0], sequence[:, p:].mean(1)], dim=1))
    return model.classifier(sequence[:, 1:].mean(1) if name == "clip" else sequence.mean(1))


@pytest.mark.parametrize("method", ["tokenpool", "tome"])
@pytest.mark.parametrize("name", ["dinov2", "dinov2-registers", "clip", "siglip"])
def test_heads_that_average_tokens_count_each_patch(name, method, pixels):
    """The pooled classifier equals upstream's classifier on the sequence unpooled to its patches: a
    pooled token counts for the patches it stands for (and not as one token)."""
    model = make(name)
    sequence, full = pooled_sequence(model, pixels, method)
    with torch.no_grad():
        logits = model(pixel_values=pixels).logits
        torch.testing.assert_close(logits, upstream_head(name, model, full), rtol=0, atol=1e-5)
        assert (upstream_head(name, model, sequence) - logits).abs().max() > 1e-3


@pytest.mark.parametrize("method", ["tokenpool", "kmeans", "tome"])
def test_siglip_attention_pooling_head_is_proportional(method, pixels):
    """SigLIP's probe attending over pooled tokens (log-size bias) equals upstream's head attending
    over every patch: proportional attention is exact here."""
    model = make("siglip-vision")
    _, full = pooled_sequence(model, pixels, method)
    with torch.no_grad():
        pooled = model(pixel_values=pixels).pooler_output
        head = model.head
        expected = type(head)._tokenpool_original.forward(head, full)
    torch.testing.assert_close(pooled, expected, rtol=0, atol=1e-5)


# the methods whose layers run the explicit softmax (topk computes only the class token's row next to SDPA;
# its blocked path is unit-tested in test_patch.py)
@pytest.mark.parametrize("name, method", [(n, m) for n in ["vit", "deit", "dinov2-registers", "clip", "siglip"]
                                          for m in ["tokenpool", "kmeans"]])
def test_blocked_softmax_equals_one_block(name, method, pixels, monkeypatch):
    """The explicit softmax that gives the significance runs in blocks of query rows at long sequences;
    forced into blocks of one image and 16 rows here (65 tokens), the pooled model is the one-block model."""
    from hf_tokenpool.adapters import vit

    expected = output_of(tp.patch_model(make(name), keep=0.5, method=method), pixels)
    monkeypatch.setattr(vit, "_BLOCK_ELEMENTS", 1)
    blocked = output_of(tp.patch_model(make(name), keep=0.5, method=method), pixels)
    torch.testing.assert_close(blocked, expected, rtol=0, atol=1e-5)


def test_siglip_has_no_class_token_so_topk_is_refused():
    assert tp.protected_tokens(make("siglip")) == 0
    with pytest.raises(ValueError, match="SigLIP has no class token"):
        tp.patch_model(make("siglip"), method="topk")


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_image_text_models_pool_the_vision_tower_only(family, pixels):
    torch.manual_seed(0)
    text = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=99)
    model = (CLIPModel(CLIPConfig(vision_config=TOWER_SHAPE, text_config=text)) if family == "clip"
             else SiglipModel(SiglipConfig(vision_config=TOWER_SHAPE, text_config=text))).eval()
    ids = torch.randint(0, 99, (3, 7))
    with torch.no_grad():
        plain_image = model.get_image_features(pixel_values=pixels).pooler_output
        plain_text = model.get_text_features(input_ids=ids).pooler_output
        tp.patch_model(model, keep=0.5)
        image = model.get_image_features(pixel_values=pixels).pooler_output
        text_after = model.get_text_features(input_ids=ids).pooler_output
        out = model(input_ids=ids, pixel_values=pixels)
    torch.testing.assert_close(text_after, plain_text, rtol=0, atol=0)  # the text tower is untouched
    assert image.shape == plain_image.shape and not torch.allclose(image, plain_image)
    assert out.logits_per_image.shape == (pixels.shape[0], 3)
    # logits_per_image is built from the pooled image embeddings
    image_norm = image / image.norm(dim=-1, keepdim=True)
    text_norm = text_after / text_after.norm(dim=-1, keepdim=True)
    scale = model.logit_scale.exp()
    bias = model.logit_bias if family == "siglip" else 0
    torch.testing.assert_close(out.logits_per_image, image_norm @ text_norm.T * scale + bias, rtol=1e-4, atol=1e-4)
    assert tp.count_flops(model, pixels[:1]) < 0.8 * tp.count_flops(tp.unpatch_model(model), pixels[:1])


def test_clip_zero_shot_pipeline_runs_on_the_pooled_model(tmp_path):
    """pipeline("zero-shot-image-classification") on a pooled CLIPModel, with a tiny offline tokenizer."""
    import json

    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPTokenizer, pipeline

    words = ["a", "photo", "of", "cat", "dog"]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{f"{w}</w>": i + 2 for i, w in enumerate(words)}}
    for letter in "acdfghopt":
        vocab.setdefault(letter, len(vocab))
        vocab.setdefault(f"{letter}</w>", len(vocab))
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    torch.manual_seed(0)
    text = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                vocab_size=len(vocab), max_position_embeddings=77)
    model = tp.patch_model(CLIPModel(CLIPConfig(vision_config=TOWER_SHAPE, text_config=text)).eval(), keep=0.5)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    classify = pipeline("zero-shot-image-classification", model=model, tokenizer=tokenizer, image_processor=processor)
    result = classify(Image.new("RGB", (40, 40), (120, 30, 200)), candidate_labels=["cat", "dog"])
    assert sorted(r["label"] for r in result) == ["cat", "dog"]
    assert abs(sum(r["score"] for r in result) - 1) < 1e-5


def test_vit_checkpoint_maps_exactly_onto_dinov2():
    """recipes/pretrain.py starts the DINOv2 checkpoint from the ViT one: with layer scale 1 the mapped
    model computes the same logits (layer-norm epsilon aside)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "recipes"))
    import pretrain
    from accelerate import PartialState
    from transformers import ViTConfig, ViTForImageClassification

    PartialState()
    torch.manual_seed(0)
    vit = ViTForImageClassification(ViTConfig(hidden_size=192, num_hidden_layers=6, num_attention_heads=3,
                                              intermediate_size=768, image_size=32, patch_size=4, num_labels=10,
                                              layer_norm_eps=1e-6)).eval()
    for model_type in ("dinov2", "clip", "siglip", "dinov2_with_registers"):
        args = pretrain.parse_args(["--model_type", model_type, "--output_dir", "unused"])
        model = pretrain.build_model(args, {i: str(i) for i in range(10)})
        mapped = pretrain.vit_weights_as(model_type, vit.state_dict())
        assert set(mapped) <= set(model.state_dict())
        model.load_state_dict({**model.state_dict(), **mapped})
        if model_type == "dinov2":
            x = torch.randn(2, 3, 32, 32)
            with torch.no_grad():
                torch.testing.assert_close(model.eval()(pixel_values=x).logits, vit(pixel_values=x).logits,
                                           rtol=0, atol=1e-4)
