"""Swinv2: what tests/test_patch.py and tests/test_deploy.py check for Swin, on tiny random Swinv2 models,
plus the Swinv2 geometry (continuous position bias, pretrained_window_sizes, the doubled shift mask)."""

import copy
import io
import pickle

import pytest
import torch
from conftest import SWIN_SHAPE, output_in_a_fresh_process, output_of
from transformers import (
    Swinv2Backbone,
    Swinv2Config,
    Swinv2ForImageClassification,
    Swinv2ForMaskedImageModeling,
    Swinv2Model,
)

import hf_tokenpool as tp
from hf_tokenpool.adapters.swin import window_layout
from hf_tokenpool.adapters.swinv2 import MASKED, TokenPoolSwinv2Layer
from hf_tokenpool.config import TokenPoolConfig

SHAPE = dict(SWIN_SHAPE)  # 32 x 32 images, patch 2: a 16 x 16 grid in windows of 4 x 4, then 8 x 8
TINY = {
    "swinv2": lambda **kw: Swinv2ForImageClassification(Swinv2Config(**{**SHAPE, **kw})),
    "swinv2-base": lambda **kw: Swinv2Model(Swinv2Config(**{**SHAPE, **kw})),
    "swinv2-pretrained-ws": lambda **kw: Swinv2ForImageClassification(
        Swinv2Config(**{**SHAPE, "pretrained_window_sizes": [8, 8], **kw})),
}
METHODS = tp.ADAPTERS["swinv2"].methods
CASES = [(n, m) for n in ("swinv2", "swinv2-base") for m in METHODS]
IDS = [f"{n}-{m}" for n, m in CASES]


def make(name="swinv2", **config):
    """As conftest.make: seeded, every parameter perturbed so that pooling decisions are not ties."""
    torch.manual_seed(0)
    model = TINY[name](**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def patched(method="tokenpool", name="swinv2", **options):
    return tp.patch_model(make(name), **{"keep": 0.5, "method": method, **options})


@pytest.fixture
def new_pixels():
    torch.manual_seed(7)
    return torch.randn(4, 3, 32, 32)


def test_registered_with_its_methods():
    assert tp.ADAPTERS["swinv2"].methods == tp.ADAPTERS["swin"].methods == ("tokenpool", "kmeans", "tome")
    assert {"Swinv2Model", "Swinv2ForImageClassification"} <= set(tp.SUPPORTED_CLASSES)
    with pytest.raises(ValueError, match="Swin has no class token"):
        tp.patch_model(make(), method="topk")


# ---- patch / unpatch / save, as tests/test_patch.py for Swin ------------------------------------------

@pytest.mark.parametrize("name", ["swinv2", "swinv2-base", "swinv2-pretrained-ws"])
@pytest.mark.parametrize("method", METHODS)
def test_keep_one_reproduces_plain_logits(name, method, pixels):
    model = make(name)
    plain = output_of(model, pixels)
    tp.patch_model(model, keep=1.0, method=method)
    torch.testing.assert_close(output_of(model, pixels), plain, rtol=0, atol=0)


@pytest.mark.parametrize("name,method", CASES, ids=IDS)
def test_unpatch_restores_exact_model(name, method, pixels):
    model = make(name)
    plain, keys = output_of(model, pixels), list(model.state_dict())
    classes = [type(m) for m in model.modules()]
    tp.patch_model(model, keep=0.5, method=method)
    assert list(model.state_dict()) == keys  # no parameter or buffer added while patched
    assert (output_of(model, pixels) - plain).abs().max() > 1e-3  # pooling really changed the computation
    tp.unpatch_model(model)
    assert [type(m) for m in model.modules()] == classes
    assert list(model.state_dict()) == keys
    assert not hasattr(model.config, "token_pooling")
    torch.testing.assert_close(output_of(model, pixels), plain, rtol=0, atol=0)


def test_save_and_from_pretrained_round_trip(pixels, tmp_path):
    model = patched(iterations=3)
    expected = output_of(model, pixels)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = tp.from_pretrained(str(tmp_path))
    assert type(loaded).__name__ == type(model).__name__ == "Swinv2ForImageClassification"
    assert loaded.config.token_pooling == TokenPoolConfig(keep=0.5, iterations=3).to_dict()
    torch.testing.assert_close(output_of(loaded.eval(), pixels), expected, rtol=0, atol=1e-6)
    plain = Swinv2ForImageClassification.from_pretrained(tmp_path).eval()
    tp.patch_model(plain)  # the saved settings re-applied
    torch.testing.assert_close(output_of(plain, pixels), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name,method", CASES, ids=IDS)
def test_batch_independence_and_batch_size_one(name, method, pixels):
    model = tp.patch_model(make(name), keep=0.6, method=method)
    batch = output_of(model, pixels)
    for i in range(pixels.shape[0]):
        torch.testing.assert_close(output_of(model, pixels[i : i + 1]), batch[i : i + 1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("keep,k", [(0.6, 10), (0.5, 8), (0.3, 5)])
def test_blocks_compute_on_k_cluster_centres_per_window(keep, k, pixels):
    model = tp.patch_model(make(), keep=keep)
    seen = []
    hooks = [block.attention.self.query.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape)))
             for block in tp.ADAPTERS["swinv2"].blocks(model.base_model)]
    with torch.no_grad():
        hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states
    for hook in hooks:
        hook.remove()
    b = pixels.shape[0]
    # 16 windows of 16 tokens in stage 1, 4 in stage 2; the grid itself is kept between blocks
    assert seen == [(b * 16, k, 16)] * 2 + [(b * 4, k, 32)] * 2
    assert [h.shape[1] for h in hidden] == [256, 64, 64]


def test_pool_after_pools_only_there(pixels):
    model = make()
    plain = output_of(model, pixels)
    tp.patch_model(model, keep=0.5, pool_after=[3])
    blocks = tp.ADAPTERS["swinv2"].blocks(model.base_model)
    assert [b._tokenpool.keep for b in blocks] == [1.0, 1.0, 1.0, 0.5]
    assert all(isinstance(b, TokenPoolSwinv2Layer) for b in blocks)
    assert (output_of(model, pixels) - plain).abs().max() > 1e-3
    with pytest.raises(ValueError, match="names a layer past the last one"):
        tp.patch_model(make(), keep=0.5, pool_after=[99])


@pytest.mark.parametrize("size", [48, 36])  # 36: a 18 x 18 grid, padded to windows of 4 (and 9 x 9 after merging)
def test_other_resolution(size):
    model = tp.patch_model(make(), keep=0.6)
    torch.manual_seed(2)
    pixels = torch.randn(2, 3, size, size)
    with torch.no_grad():
        out = model(pixel_values=pixels, output_hidden_states=True)
    assert torch.isfinite(out.logits).all()
    grid = size // 2
    assert [h.shape[1] for h in out.hidden_states] == [grid * grid, ((grid + 1) // 2) ** 2, ((grid + 1) // 2) ** 2]


def test_bf16(pixels):
    model = patched(keep=0.6)
    reference = output_of(model, pixels)
    model.to(torch.bfloat16)
    logits = output_of(model, pixels.to(torch.bfloat16))
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), reference, rtol=0, atol=0.1)


@pytest.mark.parametrize("method", METHODS)
def test_training_gradients_reach_the_same_parameters(method, pixels):
    def grads(model):
        model.train()
        model(pixel_values=pixels).logits.square().mean().backward()
        return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}

    plain = grads(make())
    assert "swinv2.encoder.layers.0.blocks.0.attention.self.logit_scale" in plain
    assert grads(patched(method, keep=0.6)) == plain


def test_flops_fall_with_keep():
    torch.manual_seed(0)
    pixels = torch.randn(1, 3, 32, 32)
    model = Swinv2ForImageClassification(Swinv2Config(**{**SHAPE, "embed_dim": 64})).eval()
    plain = tp.count_flops(model, pixels)
    ratios = []
    for keep in (0.9, 0.7, 0.5):
        tp.patch_model(model, keep=keep)
        ratios.append(tp.count_flops(model, pixels) / plain)
        tp.unpatch_model(model)
    assert ratios == sorted(ratios, reverse=True)
    # projections and MLP on 8 of 16 tokens per window (0.5), attention on 8 x 8 of 16 x 16 (0.25); patch
    # embedding, merging, position-bias MLP, head and the clustering itself are not halved
    assert 0.45 < ratios[-1] < 0.65


@pytest.mark.parametrize("model", [
    lambda: Swinv2ForMaskedImageModeling(Swinv2Config(**{**SHAPE, "encoder_stride": 16})),
    lambda: Swinv2Backbone(Swinv2Config(**{**SHAPE, "out_features": ["stage2"]})),
], ids=["masked-image-modeling", "backbone"])
def test_unsupported_heads_say_why(model):
    with pytest.raises(ValueError, match="reconstructs every patch|feature maps are read by a downstream head"):
        tp.patch_model(model())


# ---- the Swinv2 geometry between clusters --------------------------------------------------------------

@pytest.mark.parametrize("name", ["swinv2", "swinv2-pretrained-ws"])
def test_singleton_clusters_get_upstreams_position_bias_and_mask(name):
    """With every token its own cluster, the bias between clusters is upstream's: the continuous position
    bias at each pair's offset (normalised by pretrained_window_size when set), plus the shift mask that
    upstream adds twice (-200)."""
    from hf_tokenpool.adapters.swin import region_bias

    model = tp.patch_model(make(name), keep=0.5)
    block = tp.ADAPTERS["swinv2"].blocks(model.base_model)[1]  # shifted block of stage 1
    attn, ws = block.attention.self, block.window_size
    assert block.shift_size == 2 and ws == 4
    layout = window_layout(ws, block.shift_size, 16, 16, "cpu")
    num_windows, area = layout.stats.shape[:2]
    sizes = torch.ones(num_windows, area)
    with torch.no_grad():
        bias = block._position_bias(layout.stats, sizes, ws)
        table = 16 * torch.sigmoid(attn.continuous_position_bias_mlp(attn.relative_coords_table))
    expected = table.view(-1, attn.num_attention_heads)[attn.relative_position_index.view(-1)]
    expected = expected.view(area, area, -1).permute(2, 0, 1)
    torch.testing.assert_close(bias, expected.expand(num_windows, -1, -1, -1), rtol=0, atol=0)
    mask = region_bias(layout.stats, sizes, layout.num_regions, True, MASKED)[:, 0]
    upstream = block.get_attn_mask(16, 16, torch.float32)  # 0 / -100 per pair; added twice upstream
    torch.testing.assert_close(mask, 2 * upstream, rtol=0, atol=0)
    if name == "swinv2-pretrained-ws":  # the normalisation by pretrained_window_size - 1 = 7, not ws - 1 = 3
        farthest = torch.log2(torch.tensor(1 + 8 * 3 / 7)) / 3  # offset 3 of 7, log-spaced as upstream
        torch.testing.assert_close(attn.relative_coords_table.abs().max(), farthest)


# ---- deployment, as tests/test_deploy.py for Swin -------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_no_graph_break(method, pixels):
    model = patched(method)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda px: output_of(model, px))(pixels)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_torch_compile_fullgraph_equals_eager(pixels, new_pixels):
    model = patched()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    for x in (pixels, new_pixels):
        torch.testing.assert_close(output_of(compiled, x), output_of(model, x), rtol=0, atol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_torch_export_equals_eager_on_new_inputs(method, pixels, new_pixels):
    model = patched(method)
    program = torch.export.export(model, (), {"pixel_values": pixels})
    with torch.no_grad():
        out = program.module()(pixel_values=new_pixels)
    torch.testing.assert_close(out.logits, output_of(model, new_pixels), rtol=0, atol=1e-4)
    assert not {"aten.equal.default", "aten._local_scalar_dense.default"} & {str(n.target) for n in program.graph.nodes}


@pytest.mark.parametrize("method", ["tokenpool", "kmeans"])
def test_onnx_export_runs_in_onnxruntime(method, pixels, new_pixels, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = patched(method)
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (), str(path), kwargs={"pixel_values": pixels}, dynamo=True, verbose=False)
    session = ort.InferenceSession(str(path))
    (logits, *_) = session.run(None, {session.get_inputs()[0].name: new_pixels.numpy()})
    torch.testing.assert_close(torch.from_numpy(logits), output_of(model, new_pixels), rtol=0, atol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_jit_trace_is_correct_on_new_inputs(method, pixels, new_pixels):
    model = patched(method)

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, pixel_values):
            return self.inner(pixel_values=pixel_values).logits

    with torch.no_grad():
        traced = torch.jit.trace(Logits(model), (pixels,), check_trace=False)
        torch.testing.assert_close(traced(new_pixels), output_of(model, new_pixels), rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_pickle_torch_save_and_deepcopy_round_trip(method, pixels):
    model = patched(method)
    expected = output_of(model, pixels)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for copy_ in (pickle.loads(pickle.dumps(model)), torch.load(buffer, weights_only=False), copy.deepcopy(model)):
        assert tp.is_patched(copy_)
        torch.testing.assert_close(output_of(copy_, pixels), expected, rtol=0, atol=0)
        tp.unpatch_model(copy_)
        assert type(copy_) is Swinv2ForImageClassification


def test_a_pickled_model_loads_in_a_fresh_process(pixels, tmp_path):
    model = patched()
    assert output_in_a_fresh_process(model, pixels, tmp_path) == "same"


@pytest.mark.parametrize("method", METHODS)
def test_meta_device_forward_gives_the_shapes(method):
    model = make().to("meta")
    tp.patch_model(model, keep=0.5, method=method)
    with torch.no_grad():
        out = model(pixel_values=torch.empty(2, 3, 32, 32, device="meta"))
    assert out.logits.shape == (2, 5) and out.logits.device.type == "meta"


def test_attention_maps_per_stage_over_window_tokens(pixels):
    """Upstream Swinv2 always computes explicit attention and returns each stage's last map; pooled maps
    have the same shapes, each cluster's attention spread over its members."""
    model = make()
    with torch.no_grad():
        plain = model(pixel_values=pixels, output_attentions=True).attentions
        tp.patch_model(model, keep=0.5)
        out = model(pixel_values=pixels, output_attentions=True, output_hidden_states=True)
    assert [a.shape for a in out.attentions] == [a.shape for a in plain] == [(64, 2, 16, 16), (16, 4, 16, 16)]
    for attn in out.attentions:
        torch.testing.assert_close(attn.sum(-1), torch.ones(attn.shape[:-1]))
    assert [h.shape for h in out.reshaped_hidden_states] == [(4, 16, 16, 16), (4, 32, 8, 8), (4, 32, 8, 8)]
