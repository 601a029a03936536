"""BEiT and Data2VecVision: the ViT checks (tests/test_patch.py, tests/test_deploy.py) on tiny random models,
plus the pooled relative position bias and the size-weighted mean-pooling head (docs/beit.md)."""

import copy
import io
import pickle

import pytest
import torch
from transformers import (
    BeitConfig,
    BeitForImageClassification,
    BeitForMaskedImageModeling,
    BeitForSemanticSegmentation,
    BeitModel,
    Data2VecVisionConfig,
    Data2VecVisionForImageClassification,
    Data2VecVisionForSemanticSegmentation,
    Data2VecVisionModel,
)

import hf_tokenpool as tp
from hf_tokenpool.adapters import beit as adapter
from hf_tokenpool.config import TokenPoolConfig
from hf_tokenpool.patch import UNSUPPORTED_HEADS

torch.set_num_threads(1)

SHAPE = dict(hidden_size=32, num_hidden_layers=6, num_attention_heads=2, intermediate_size=64, image_size=32,
             patch_size=4, num_labels=5)
# name -> factory: per-layer and shared relative position bias, layer scale on and off, mean pooling and CLS
TINY = {
    "beit": lambda: BeitForImageClassification(BeitConfig(**SHAPE, use_relative_position_bias=True)),
    "beit-shared": lambda: BeitForImageClassification(BeitConfig(
        **SHAPE, use_shared_relative_position_bias=True, use_absolute_position_embeddings=True,
        use_mean_pooling=False, layer_scale_init_value=0.0)),
    "beit-base": lambda: BeitModel(BeitConfig(**SHAPE, use_relative_position_bias=True)),
    "data2vec": lambda: Data2VecVisionForImageClassification(Data2VecVisionConfig(
        **SHAPE, use_relative_position_bias=True)),
    "data2vec-shared": lambda: Data2VecVisionForImageClassification(Data2VecVisionConfig(
        **SHAPE, use_shared_relative_position_bias=True, layer_scale_init_value=0.0)),
    "data2vec-base": lambda: Data2VecVisionModel(Data2VecVisionConfig(**SHAPE, use_relative_position_bias=True)),
}
METHODS = ("tokenpool", "kmeans", "tome", "topk")
CASES = [(n, m) for n in TINY for m in METHODS]
IDS = [f"{n}-{m}" for n, m in CASES]
FAMILIES = ["beit", "data2vec"]


def make(name):
    torch.manual_seed(0)
    model = TINY[name]().eval()
    with torch.no_grad():  # as conftest.make: random init leaves near-ties that pooling would break arbitrarily
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def out_of(model, pixels, **kwargs):
    with torch.no_grad():
        out = model(pixel_values=pixels, **kwargs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture
def pixels():
    torch.manual_seed(1)
    return torch.randn(4, 3, 32, 32)


@pytest.fixture
def new_pixels():
    torch.manual_seed(7)
    return torch.randn(4, 3, 32, 32)


# ---- patching, undo, saving ------------------------------------------------------------------------

@pytest.mark.parametrize("name,method", CASES, ids=IDS)
def test_keep_one_reproduces_plain_logits(name, method, pixels):
    model = make(name)
    plain = out_of(model, pixels)
    tp.patch_model(model, keep=1.0, method=method)
    torch.testing.assert_close(out_of(model, pixels), plain, rtol=0, atol=0)


@pytest.mark.parametrize("name,method", CASES, ids=IDS)
def test_unpatch_restores_exact_model(name, method, pixels):
    model = make(name)
    plain, keys = out_of(model, pixels), list(model.state_dict())
    classes = [type(m) for m in model.modules()]
    tp.patch_model(model, keep=0.5, method=method)
    assert list(model.state_dict()) == keys
    pooled = out_of(model, pixels)  # logits, or a base model's last hidden state (its CLS row: lengths differ)
    assert (pooled[:, 0] - plain[:, 0]).abs().max() > 1e-4  # pooling really changed the computation
    tp.unpatch_model(model)
    assert [type(m) for m in model.modules()] == classes
    assert list(model.state_dict()) == keys
    assert not hasattr(model.config, "token_pooling")
    torch.testing.assert_close(out_of(model, pixels), plain, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["beit", "data2vec-shared"])
def test_save_and_from_pretrained_round_trip(name, pixels, tmp_path):
    model = tp.patch_model(make(name), keep=0.5, iterations=3)
    expected = out_of(model, pixels)
    model.save_pretrained(tmp_path)
    loaded = tp.from_pretrained(str(tmp_path))
    assert type(loaded).__name__ == type(model).__name__
    assert loaded.config.token_pooling == TokenPoolConfig(keep=0.5, iterations=3).to_dict()
    torch.testing.assert_close(out_of(loaded.eval(), pixels), expected, rtol=0, atol=1e-6)
    plain = type(model).from_pretrained(tmp_path).eval()
    tp.patch_model(plain)
    torch.testing.assert_close(out_of(plain, pixels), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name,method", CASES, ids=IDS)
def test_pickle_torch_save_and_deepcopy_round_trip(name, method, pixels):
    model = tp.patch_model(make(name), keep=0.5, method=method)
    expected = out_of(model, pixels)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for copy_ in (pickle.loads(pickle.dumps(model)), torch.load(buffer, weights_only=False), copy.deepcopy(model)):
        assert tp.is_patched(copy_)
        torch.testing.assert_close(out_of(copy_, pixels), expected, rtol=0, atol=0)
        tp.unpatch_model(copy_)
        assert type(copy_) is type(make(name))


def test_unsupported_heads_say_why():
    config = BeitConfig(**SHAPE)
    with pytest.raises(ValueError, match="masked image modelling predicts every patch"):
        tp.patch_model(BeitForMaskedImageModeling(config))
    for model in (BeitForSemanticSegmentation(BeitConfig(**{**SHAPE, "out_indices": [1, 2, 3, 4]})),
                  Data2VecVisionForSemanticSegmentation(Data2VecVisionConfig(**{**SHAPE, "out_indices": [1, 2, 3, 4]}))):
        with pytest.raises(ValueError, match="semantic segmentation reads every patch"):
            tp.patch_model(model)
    assert tp.ADAPTERS["beit"] is tp.ADAPTERS["data2vec-vision"]  # one adapter, two families
    assert "backbone's feature maps" in UNSUPPORTED_HEADS["BeitBackbone"]


def test_a_user_attention_mask_is_refused(pixels):
    model = tp.patch_model(make("beit"), keep=0.5)
    with pytest.raises(ValueError, match="attention_mask cannot be used with token pooling"):
        model.beit(pixel_values=pixels, attention_mask=torch.ones(4, 65, dtype=torch.bool))


# ---- what pooling does -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["beit", "data2vec", "beit-shared"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("location", ["before_mlp", "after_layer"])
def test_token_counts_follow_schedule(name, method, location, pixels):
    model = tp.patch_model(make(name), keep=0.6, method=method, pool_location=location)
    with torch.no_grad():
        hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states
    assert [h.shape[1] - 1 for h in hidden] == [64, 64, 38, 23, 23, 14, 14]
    sizes = model.base_model._tokenpool_state.sizes[6]
    assert sizes.shape == (4, 15) and torch.all(sizes[:, 0] == 1)  # CLS stands for itself
    torch.testing.assert_close(sizes[:, 1:].sum(-1), torch.full((4,), 64.0))  # every patch in exactly one token
    members = model.base_model._tokenpool_state.members[6]  # patch -> token map agrees with the sizes
    counted = torch.zeros(4, 14).scatter_add_(1, members, torch.ones(4, 64))
    torch.testing.assert_close(counted, sizes[:, 1:])


@pytest.mark.parametrize("name", ["beit", "data2vec-shared"])
def test_blocked_softmax_equals_one_block(name, pixels, monkeypatch):
    """The relative position bias is sliced with the query rows when the softmax runs in blocks."""
    from hf_tokenpool.adapters import vit

    expected = out_of(tp.patch_model(make(name), keep=0.5), pixels)
    monkeypatch.setattr(vit, "_BLOCK_ELEMENTS", 1)
    blocked = out_of(tp.patch_model(make(name), keep=0.5), pixels)
    torch.testing.assert_close(blocked, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_cls_passes_through_the_pooling_layer(family, pixels):
    model = make(family)
    with torch.no_grad():
        plain = model(pixel_values=pixels, output_hidden_states=True).hidden_states
        tp.patch_model(model, keep=0.5)
        pooled = model(pixel_values=pixels, output_hidden_states=True).hidden_states
    assert pooled[2].shape[1] == 1 + 32  # output of layer 1, the first pooling layer
    torch.testing.assert_close(pooled[2][:, 0], plain[2][:, 0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name,method", CASES, ids=IDS)
def test_batch_independence_and_batch_size_one(name, method, pixels):
    model = tp.patch_model(make(name), keep=0.6, method=method)
    batch = out_of(model, pixels)
    for i in range(pixels.shape[0]):
        torch.testing.assert_close(out_of(model, pixels[i : i + 1]), batch[i : i + 1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_other_resolution(family):
    model = tp.patch_model(make(family), keep=0.6)
    torch.manual_seed(2)
    with torch.no_grad():
        out = model(pixel_values=torch.randn(2, 3, 48, 48), output_hidden_states=True, interpolate_pos_encoding=True)
    assert torch.isfinite(out.logits).all()
    assert out.hidden_states[-1].shape[1] - 1 == TokenPoolConfig.num_tokens(144, [1, .6, .6, 1, .6, 1])[-1] == 31


@pytest.mark.parametrize("name,method", [(n, m) for n in ("beit", "data2vec-shared") for m in METHODS])
def test_training_gradients_reach_the_same_parameters(name, method, pixels):
    def grads(model):
        model.train()
        model(pixel_values=pixels).logits.square().mean().backward()
        return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}

    plain = grads(make(name))
    assert any("relative_position_bias_table" in n for n in plain)
    assert grads(tp.patch_model(make(name), keep=0.6, method=method)) == plain


def test_flops_fall_with_keep():
    torch.manual_seed(0)
    model = BeitForImageClassification(BeitConfig(**{**SHAPE, "hidden_size": 128, "intermediate_size": 512},
                                                  use_relative_position_bias=True)).eval()
    pixels = torch.randn(1, 3, 32, 32)
    plain = tp.count_flops(model, pixels)
    ratios = []
    for keep in (0.9, 0.7, 0.5):
        tp.patch_model(model, keep=keep)
        ratios.append(tp.count_flops(model, pixels) / plain)
        tp.unpatch_model(model)
    assert ratios == sorted(ratios, reverse=True)
    assert ratios[-1] < 0.75


# ---- the pooled relative position bias --------------------------------------------------------------

def _random_membership(b=3, n0=16, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    members = torch.cat([torch.arange(k).expand(b, k), torch.randint(0, k, (b, n0 - k), generator=g)], 1)
    members = members.gather(1, torch.rand(b, n0, generator=g).argsort(-1))  # every cluster non-empty
    sizes = torch.cat([torch.ones(b, 1), torch.zeros(b, k).scatter_add_(1, members, torch.ones(b, n0))], 1)
    return members, sizes


def test_mean_bias_is_the_size_weighted_mean_of_member_biases():
    members, sizes = _random_membership()
    bias = torch.randn(1, 2, 17, 17)
    got = adapter.mean_bias(bias, members, sizes)
    one_hot = torch.cat([torch.zeros(3, 1, 6), torch.cat([torch.zeros(3, 16, 1),
                         torch.nn.functional.one_hot(members, 5).float()], -1)], 1)
    one_hot[:, 0, 0] = 1  # CLS is its own token
    a = one_hot / sizes[:, None, :]  # A: [B, N0+1, K+1] membership normalised by size
    expected = torch.einsum("bpk,hpq,bql->bhkl", a, bias[0], a)  # A^T B A
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got[:, :, 0, 0], bias[:, :, 0, 0].expand(3, 2))  # CLS-CLS stays
    # lse: the key side is log-mean-exp over members, the query side a plain mean
    lse = adapter.mean_bias(bias, members, sizes, lse=True)
    expected_lse = torch.einsum("bpk,bhpl->bhkl", a, torch.log(torch.einsum("hpq,bql->bhpl", bias[0].exp(), a)))
    torch.testing.assert_close(lse, expected_lse)


@pytest.mark.parametrize("design", adapter.BIAS_DESIGNS)
def test_bias_of_unpooled_tokens_is_upstreams(design):
    """One patch per token (members = identity): every design gives upstream's bias exactly."""
    model = make("beit")
    module = model.beit.layers[3].relative_position_bias
    full = module((8, 8), interpolate_pos_encoding=False, dim_size=65)
    members, sizes = torch.arange(64).expand(2, 64), torch.ones(2, 65)
    if design == "position":
        got = adapter.position_bias([adapter.relative_table(module, (8, 8))], (8, 8), members, sizes)
    else:
        got = adapter.mean_bias(full, members, sizes, lse=design == "lse")
    torch.testing.assert_close(got, full.expand(2, -1, -1, -1), rtol=0, atol=1e-6)


def test_position_bias_reads_the_table_between_cluster_centres():
    model = make("beit")
    module = model.beit.layers[3].relative_position_bias
    grid = adapter.relative_table(module, (8, 8))[0]  # [H, 15, 15], offset (dy, dx) at [dy + 7, dx + 7]
    # token 0 = patches (0,0),(0,1): centre (0, 0.5); token 1 = patch (2,4); others one patch each
    members = torch.arange(64).clone()
    members[1] = 0
    members[2:] -= 1
    sizes = torch.cat([torch.ones(1), torch.zeros(63).scatter_add_(0, members, torch.ones(64))])[None]
    got = adapter.position_bias([adapter.relative_table(module, (8, 8))], (8, 8), members[None], sizes)
    t1 = members[2 * 8 + 4]
    dy, dx = 0 - 2, 0.5 - 4  # query token 0 minus key token t1
    expected = 0.5 * (grid[:, dy + 7, -4 + 7] + grid[:, dy + 7, -3 + 7])
    assert dx == -3.5
    torch.testing.assert_close(got[0, :, 1, 1 + t1], expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_relative_position_bias_is_used_after_pooling(family, pixels):
    """Changing the last layer's table (after all pooling) changes the pooled logits: the bias is not dropped."""
    model = tp.patch_model(make(family), keep=0.5)
    before = out_of(model, pixels)
    layers = model.beit.layers if family == "beit" else model.data2vec_vision.encoder.layer
    module = layers[-1].relative_position_bias if family == "beit" else layers[-1].attention.attention.relative_position_bias
    with torch.no_grad():
        module.relative_position_bias_table.add_(torch.randn_like(module.relative_position_bias_table))
    assert (out_of(model, pixels) - before).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_mean_pooling_head_weighs_tokens_by_their_patches(family, pixels):
    model = tp.patch_model(make(family), keep=0.5)
    base = model.base_model
    with torch.no_grad():
        out = base(pixel_values=pixels)
    sizes = base._tokenpool_state.sizes[6]
    tokens = out.last_hidden_state[:, 1:]
    weighted = (tokens * sizes[:, 1:, None]).sum(1) / sizes[:, 1:].sum(-1, keepdim=True)
    torch.testing.assert_close(out.pooler_output, base.pooler.layernorm(weighted))
    assert (base.pooler.layernorm(tokens.mean(1)) - out.pooler_output).abs().max() > 1e-3  # the plain mean differs


def test_pooled_bias_design_is_a_setting_of_the_adapter(pixels):
    """The three designs give different (all finite) pooled models; mean is the default (docs/beit.md)."""
    assert adapter.DEFAULT_BIAS == tp.ADAPTERS["beit"].bias == "mean"
    outs = {}
    for design in adapter.BIAS_DESIGNS:
        model = make("beit")
        adapter.BeitAdapter(bias=design).patch(model.beit, TokenPoolConfig(keep=0.5))
        outs[design] = out_of(model, pixels)
        assert torch.isfinite(outs[design]).all()
    assert (outs["mean"] - outs["position"]).abs().max() > 1e-6
    with pytest.raises(ValueError, match="unknown bias design"):
        adapter.BeitAdapter(bias="nearest")


# ---- attention maps ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["beit", "data2vec"])
@pytest.mark.parametrize("location", ["before_mlp", "after_layer"])
def test_attention_maps_one_per_layer_as_long_as_its_input(name, location, pixels):
    config_cls = BeitConfig if name == "beit" else Data2VecVisionConfig
    model_cls = BeitForImageClassification if name == "beit" else Data2VecVisionForImageClassification
    model = model_cls(config_cls(**SHAPE, use_relative_position_bias=True, attn_implementation="eager"))
    model = tp.patch_model(model.eval(), keep=0.6, pool_location=location)
    with torch.no_grad():
        out = model(pixel_values=pixels, output_attentions=True, output_hidden_states=True)
    assert len(out.attentions) == SHAPE["num_hidden_layers"]
    for attn, hidden in zip(out.attentions, out.hidden_states[:-1]):
        n = hidden.shape[1]
        assert attn.shape == (pixels.shape[0], SHAPE["num_attention_heads"], n, n)
        torch.testing.assert_close(attn.sum(-1), torch.ones(attn.shape[:-1]))
    assert len({a.shape[-1] for a in out.attentions}) == 4


# ---- deployment ----------------------------------------------------------------------------------------

DEPLOY = [("beit", m) for m in METHODS] + [("data2vec", "tokenpool"), ("beit-shared", "tokenpool")]
DEPLOY_IDS = [f"{n}-{m}" for n, m in DEPLOY]


@pytest.mark.parametrize("name,method", DEPLOY, ids=DEPLOY_IDS)
def test_no_graph_break(name, method, pixels):
    model = tp.patch_model(make(name), keep=0.5, method=method)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda px: out_of(model, px))(pixels)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize("name,method", DEPLOY, ids=DEPLOY_IDS)
def test_torch_export_equals_eager_on_new_inputs(name, method, pixels, new_pixels):
    model = tp.patch_model(make(name), keep=0.5, method=method)
    program = torch.export.export(model, (), {"pixel_values": pixels})
    with torch.no_grad():
        out = program.module()(pixel_values=new_pixels)
    torch.testing.assert_close(out.logits, out_of(model, new_pixels), rtol=0, atol=1e-4)
    assert not {"aten.equal.default", "aten._local_scalar_dense.default"} & {str(n.target) for n in program.graph.nodes}


@pytest.mark.parametrize("name,method", [("beit", "tokenpool"), ("data2vec", "tokenpool"), ("beit-shared", "tome")],
                         ids=["beit-tokenpool", "data2vec-tokenpool", "beit-shared-tome"])
def test_onnx_export_runs_in_onnxruntime(name, method, pixels, new_pixels, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = tp.patch_model(make(name), keep=0.5, method=method)
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (), str(path), kwargs={"pixel_values": pixels}, dynamo=True, verbose=False)
    session = ort.InferenceSession(str(path))
    (logits, *_) = session.run(None, {session.get_inputs()[0].name: new_pixels.numpy()})
    torch.testing.assert_close(torch.from_numpy(logits), out_of(model, new_pixels), rtol=0, atol=1e-4)
