"""patch_model / unpatch_model / from_pretrained on tiny random models of every supported class."""

import dataclasses

import pytest
import torch
from conftest import SWIN_SHAPE, TINY_MODELS, VIT_SHAPE, make, output_of
from transformers import (AutoModelForImageClassification, BertConfig, BertModel, SwinConfig, ViTConfig,
                          ViTForMaskedImageModeling)

import hf_tokenpool as tp
from hf_tokenpool.config import TokenPoolConfig, default_pool_after

ALL = list(TINY_MODELS)
VIT_LIKE = [n for n in ALL if tp.protected_tokens(make(n)) is not None]  # pool a token sequence


def methods_for(name):
    return tp.ADAPTERS[make(name).config.model_type].methods


CASES = [(n, m) for n in ALL for m in ("tokenpool", "kmeans", "tome", "topk") if m in methods_for(n)]


@pytest.mark.parametrize("name,method", CASES, ids=[f"{n}-{m}" for n, m in CASES])
def test_keep_one_reproduces_plain_logits(name, method, pixels):
    model = make(name)
    plain = output_of(model, pixels)
    tp.patch_model(model, keep=1.0, method=method)
    torch.testing.assert_close(output_of(model, pixels), plain, rtol=0, atol=0)


@pytest.mark.parametrize("name,method", CASES, ids=[f"{n}-{m}" for n, m in CASES])
def test_unpatch_restores_exact_model(name, method, pixels):
    model = make(name)
    plain, keys = output_of(model, pixels), list(model.state_dict())
    classes = [type(m) for m in model.modules()]
    tp.patch_model(model, keep=0.5, method=method)
    assert list(model.state_dict()) == keys  # no parameter or buffer added while patched
    assert not torch.equal(output_of(model, pixels), plain)  # pooling really changed the computation
    tp.unpatch_model(model)
    assert [type(m) for m in model.modules()] == classes
    assert list(model.state_dict()) == keys
    assert not hasattr(model.config, "token_pooling")
    torch.testing.assert_close(output_of(model, pixels), plain, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["vit", "vit-base", "deit-teacher", "swin", "dinov2-registers", "clip", "siglip-vision"])
def test_save_and_from_pretrained_round_trip(name, pixels, tmp_path):
    import json

    model = tp.patch_model(make(name), keep=0.5, iterations=3)
    expected = output_of(model, pixels)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    # config.json names the upstream class, whether or not the top-level class was swapped
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [type(make(name)).__name__]
    loaded = tp.from_pretrained(str(tmp_path))
    assert type(loaded).__name__ == type(model).__name__
    assert loaded.config.token_pooling == TokenPoolConfig(keep=0.5, iterations=3).to_dict()
    torch.testing.assert_close(output_of(loaded.eval(), pixels), expected, rtol=0, atol=1e-6)
    # a plain transformers load gives the unpatched model; patch_model() with no settings re-applies them
    plain = type(model).from_pretrained(tmp_path).eval()
    tp.patch_model(plain)
    torch.testing.assert_close(output_of(plain, pixels), expected, rtol=0, atol=1e-6)


SEQUENCE_CASES = [(n, m) for n, m in CASES if n in VIT_LIKE]


@pytest.mark.parametrize("name,method", SEQUENCE_CASES, ids=[f"{n}-{m}" for n, m in SEQUENCE_CASES])
def test_token_counts_follow_schedule(name, method, pixels):
    model = tp.patch_model(make(name), keep=0.6, method=method)
    with torch.no_grad():
        hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states
    p = tp.protected_tokens(model)
    keeps = TokenPoolConfig(keep=0.6).layer_keeps(VIT_SHAPE["num_hidden_layers"])
    expected = [64] + TokenPoolConfig.num_tokens(64, keeps)
    assert [h.shape[1] - p for h in hidden] == expected
    assert default_pool_after(6) == [1, 2, 4] and expected == [64, 64, 38, 23, 23, 14, 14]


def test_default_schedule_of_a_12_layer_encoder():
    keeps = TokenPoolConfig(keep=0.6).layer_keeps(12)
    assert [i for i, k in enumerate(keeps) if k < 1] == [2, 5, 8]  # after layers 3, 6 and 9
    assert TokenPoolConfig.num_tokens(196, keeps)[-1] == 43
    assert sorted(set(TokenPoolConfig.num_tokens(196, keeps))) == [43, 71, 118, 196]


def test_explicit_per_layer_schedule(pixels):
    model = tp.patch_model(make("vit"), schedule=[0.9] * 6)  # pool after every layer, as in the paper
    with torch.no_grad():
        hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states
    assert [h.shape[1] - 1 for h in hidden] == [64, 58, 52, 47, 42, 38, 34]


@pytest.mark.parametrize("name", ["vit", "deit-teacher", "dinov2-registers"])
def test_protected_tokens_pass_through(name, pixels):
    model = make(name)
    p = tp.protected_tokens(model)
    assert p == {"vit": 1, "deit-teacher": 2, "dinov2-registers": 5}[name]
    with torch.no_grad():
        plain = model(pixel_values=pixels, output_hidden_states=True).hidden_states
        tp.patch_model(model, keep=0.5)
        pooled = model(pixel_values=pixels, output_hidden_states=True).hidden_states
    first = default_pool_after(6)[0] + 1  # output of the first pooling layer
    assert pooled[first].shape[1] == p + 32
    # equal up to float rounding: the pooling layer computes explicit softmax attention instead of SDPA
    torch.testing.assert_close(pooled[first][:, :p], plain[first][:, :p], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name,method", CASES, ids=[f"{n}-{m}" for n, m in CASES])
def test_batch_independence_and_batch_size_one(name, method, pixels):
    model = tp.patch_model(make(name), keep=0.6, method=method)
    batch = output_of(model, pixels)
    for i in range(pixels.shape[0]):
        torch.testing.assert_close(output_of(model, pixels[i : i + 1]), batch[i : i + 1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["vit", "deit-teacher", "swin"])
def test_other_resolution(name):
    model = tp.patch_model(make(name), keep=0.6)
    torch.manual_seed(2)
    pixels = torch.randn(2, 3, 48, 48)
    kwargs = {} if name == "swin" else {"interpolate_pos_encoding": True}
    with torch.no_grad():
        out = model(pixel_values=pixels, output_hidden_states=True, **kwargs)
    assert torch.isfinite(out.logits).all()
    if name != "swin":
        p = tp.protected_tokens(model)
        assert out.hidden_states[-1].shape[1] - p == TokenPoolConfig.num_tokens(144, model_keeps(model))[-1]


def model_keeps(model):
    return TokenPoolConfig.from_dict(model.config.token_pooling).layer_keeps(model.config.num_hidden_layers)


@pytest.mark.parametrize("name", ["vit", "deit-teacher", "swin"])
def test_bf16(name, pixels):
    model = tp.patch_model(make(name), keep=0.6)
    reference = output_of(model, pixels)
    model.to(torch.bfloat16)
    logits = output_of(model, pixels.to(torch.bfloat16))
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), reference, rtol=0, atol=0.1)


@pytest.mark.parametrize("name,method", CASES, ids=[f"{n}-{m}" for n, m in CASES])
def test_training_gradients_reach_the_same_parameters(name, method, pixels):
    def grads(model):
        model.train()
        out = model(pixel_values=pixels)
        (out.logits if hasattr(out, "logits") else out.last_hidden_state).square().mean().backward()
        return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}

    plain = grads(make(name))
    assert grads(tp.patch_model(make(name), keep=0.6, method=method)) == plain


def test_gradient_checkpointing_gives_the_same_gradients(pixels):
    def grad_of(checkpointing):
        model = tp.patch_model(make("vit"), keep=0.5)
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        model(pixel_values=pixels).logits.square().mean().backward()
        return model.vit.layers[0].mlp.fc1.weight.grad

    torch.testing.assert_close(grad_of(True), grad_of(False))


@pytest.mark.parametrize("name", ["vit", "deit-teacher", "swin"])
def test_flops_fall_with_keep(name):
    # a wider model than the other tests: at width 32 the clustering's own matmuls rival a layer's
    torch.manual_seed(0)
    pixels = torch.randn(1, 3, 32, 32)
    cls = type(make(name))
    shape = dict(embed_dim=64) if name == "swin" else dict(hidden_size=128, intermediate_size=512)
    model = cls(type(make(name).config)(**{**(SWIN_SHAPE if name == "swin" else VIT_SHAPE), **shape})).eval()
    plain = tp.count_flops(model, pixels)
    ratios = []
    for keep in (0.9, 0.7, 0.5):
        tp.patch_model(model, keep=keep)
        ratios.append(tp.count_flops(model, pixels) / plain)
        tp.unpatch_model(model)
    assert ratios == sorted(ratios, reverse=True)
    assert ratios[-1] < 0.8


def test_target_flops_is_solved_into_keep():
    pixels = torch.zeros(1, 3, 32, 32)
    model = make("vit")
    plain = tp.count_flops(model, pixels)
    tp.patch_model(model, target_flops=0.7)
    solved = model.config.token_pooling
    ratio = tp.count_flops(model, pixels) / plain
    assert solved["target_flops"] == 0.7 and 0 < solved["keep"] < 1
    assert 0.6 < ratio <= 0.7
    with pytest.raises(ValueError, match="cannot be reached") as err:
        tp.patch_model(make("vit"), target_flops=0.05)
    # the message names the cheapest reachable cost, which is really reachable (and far below 1.00)
    cheapest = float(str(err.value).split("cheapest reachable is about ")[1].split(" ")[0])
    assert 0.05 < cheapest < 0.5
    tp.patch_model(model := make("vit"), target_flops=min(1.0, cheapest + 0.02))
    assert tp.count_flops(model, pixels) / plain <= cheapest + 0.02


@pytest.mark.parametrize("pool_after", [1, [], [1.5], [True], "2"])
def test_pool_after_must_be_a_list_of_layer_indices(pool_after):
    with pytest.raises(ValueError, match="pool_after must be a non-empty list of 0-based layer indices"):
        tp.patch_model(make("vit"), pool_after=pool_after)


@pytest.mark.parametrize("name", ["vit", "swin"])
def test_pool_after_past_the_last_layer_is_refused(name):
    model = make(name)
    with pytest.raises(ValueError, match="names a layer past the last one"):
        tp.patch_model(model, keep=0.5, pool_after=[99])
    assert not hasattr(model.config, "token_pooling")  # nothing was applied or recorded


def test_swin_pool_after_pools_only_there(pixels):
    model = make("swin")
    plain = output_of(model, pixels)
    tp.patch_model(model, keep=0.5, pool_after=[3])
    blocks = tp.ADAPTERS["swin"].blocks(model.base_model)
    assert [b._tokenpool.keep for b in blocks] == [1.0, 1.0, 1.0, 0.5]
    assert not torch.equal(output_of(model, pixels), plain)


# ---- bad input: each a clear error ----------------------------------------------------------------

@pytest.mark.parametrize("keep", [0, -0.5, 1.5, "0.5", True])
def test_keep_out_of_range(keep):
    with pytest.raises(ValueError, match=r"keep must be a number in \(0, 1\]"):
        tp.patch_model(make("vit"), keep=keep)


@pytest.mark.parametrize("iterations", [-1, 1.5, True, "2"])
def test_iterations_must_be_a_count(iterations):
    with pytest.raises(ValueError, match="iterations must be an integer >= 0"):
        TokenPoolConfig(iterations=iterations)


def test_zero_iterations_is_the_start_and_one_assignment():
    """iterations=0: every token goes to the nearest of the merge-cost start's medoids, nothing moves."""
    from hf_tokenpool.reducers import Signals
    from hf_tokenpool.reducers.tokenpool import merge_costs, pairwise_sq_dist, stable_descending_order, tokenpool

    torch.manual_seed(3)
    x, w = torch.randn(2, 20, 8), torch.rand(2, 20) + 0.1
    result = tokenpool(x, torch.ones(2, 20), 7, Signals(significance=w), iterations=0, metric="tokens")
    dist = pairwise_sq_dist(x)
    medoids = stable_descending_order(merge_costs(dist, w))[:, :7]
    expected = dist.gather(2, medoids.unsqueeze(1).expand(2, 20, 7)).argmin(-1)
    assert torch.equal(result.assign, expected)
    assert result.assign.unique(dim=None).numel() == 7


@pytest.mark.parametrize("name", ["vit", "swin"])
@pytest.mark.parametrize("method, rounds", [("tokenpool", 1), ("kmeans", 5)])
def test_default_iterations_are_the_methods_own(name, method, rounds):
    """iterations=None (the default) leaves the rounds to the method: tokenpool 1, kmeans 5 (capped at 1 in
    Swin windows); a config that names the count gives the same model, one that names another does not."""
    torch.manual_seed(0)
    pixels = torch.randn(3, 3, 32, 32)
    out = {iterations: output_of(tp.patch_model(make(name), keep=0.5, method=method, iterations=iterations), pixels)
           for iterations in (None, rounds, 0)}
    assert TokenPoolConfig().iterations is None
    assert torch.equal(out[None], out[rounds])
    assert not torch.allclose(out[None], out[0], atol=1e-6)


def test_unknown_method_and_option():
    with pytest.raises(ValueError, match="unknown method 'dbscan'; accepted methods: tokenpool, kmeans, tome, topk"):
        tp.patch_model(make("vit"), method="dbscan")
    with pytest.raises(TypeError, match="unknown token pooling option"):
        tp.patch_model(make("vit"), kep=0.5)


def test_topk_needs_a_class_token():
    with pytest.raises(ValueError, match="Swin has no class token"):
        tp.patch_model(make("swin"), method="topk")


def test_unsupported_models():
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(ValueError, match="not supported.*Supported model types: ") as err:
        tp.patch_model(bert)
    types = str(err.value).split("model types: ")[1].split(";")[0].split(", ")
    assert types == sorted(tp.ADAPTERS) and {"vit", "deit", "dinov2", "clip", "siglip", "swin"} <= set(types)
    listed = str(err.value).split("classes: ")[1].split(", ")
    assert len(listed) == len(set(listed)) == len(tp.SUPPORTED_CLASSES)  # each class named once
    mim = ViTForMaskedImageModeling(ViTConfig(**{**VIT_SHAPE, "encoder_stride": 4}))
    with pytest.raises(ValueError, match="masked image modelling reconstructs every patch"):
        tp.patch_model(mim)


def test_patching_twice_is_refused_until_unpatched(pixels):
    model = tp.patch_model(make("vit"), keep=0.6)
    with pytest.raises(ValueError, match="already patched.*unpatch_model"):
        tp.patch_model(model, keep=0.5)
    tp.unpatch_model(model)
    tp.patch_model(model, keep=0.5)
    assert model.config.token_pooling["keep"] == 0.5
    with pytest.raises(ValueError, match="not patched"):
        tp.unpatch_model(make("vit"))


def test_images_too_small_for_the_schedule():
    model = tp.patch_model(make("vit"), keep=0.1)
    with pytest.raises(ValueError, match="too small for keep=0.1"):
        output_of(model, torch.randn(1, 3, 8, 8), interpolate_pos_encoding=True)


def test_from_pretrained_refuses_remote_code_and_missing_settings(tmp_path):
    make("vit").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="never runs remote code"):
        tp.from_pretrained(str(tmp_path), trust_remote_code=True)
    with pytest.raises(ValueError, match="carries no token pooling settings"):
        tp.from_pretrained(str(tmp_path))
    model = tp.from_pretrained(str(tmp_path), pooling={"keep": 0.7, "method": "tome"})
    assert model.config.token_pooling["method"] == "tome"
    assert isinstance(AutoModelForImageClassification.from_pretrained(tmp_path), type(make("vit")))


def test_settings_saved_before_pool_location_existed_come_back_as_trained():
    legacy = {"iterations": 5, "keep": 0.6, "method": "tokenpool", "output": "mean", "pool_after": None,
              "proportional_attention": True, "schedule": None, "target_flops": None}  # hf_tokenpool 0.1
    config = TokenPoolConfig.from_dict(legacy)
    assert (config.pool_location, config.metric) == ("after_layer", "tokens")
    assert TokenPoolConfig.from_dict(TokenPoolConfig().to_dict()) == TokenPoolConfig()


def test_config_round_trips_and_rejects_unknown_keys():
    config = TokenPoolConfig(keep=0.7, method="kmeans", schedule=None, iterations=2)
    assert TokenPoolConfig.from_dict(config.to_dict()) == config
    assert list(config.to_dict()) == sorted(config.to_dict())
    assert all(f.metadata.get("help") for f in dataclasses.fields(TokenPoolConfig))
    with pytest.raises(ValueError, match="unknown token pooling settings"):
        TokenPoolConfig.from_dict({"keep": 0.5, "ratio": 2})


def test_api_doc_lists_every_setting():
    """docs/api.md documents every TokenPoolConfig field and every exported function."""
    import dataclasses
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    for f in dataclasses.fields(TokenPoolConfig):
        assert f"| `{f.name}` |" in doc, f"docs/api.md misses TokenPoolConfig.{f.name}"
    for name in tp.__all__:
        assert f"`{name}" in doc, f"docs/api.md misses hf_tokenpool.{name}"


@pytest.mark.parametrize("height, width, ws, shift", [(16, 16, 4, 0), (16, 16, 4, 2), (18, 13, 4, 2), (7, 7, 7, 0),
                                                     (10, 15, 5, 2)])
def test_swin_window_gathers_equal_upstreams_partition_and_reverse(height, width, ws, shift):
    """gather_windows = window_partition(cyclic_shift(maybe_pad(grid))); unpool = the windows plus each
    token's cluster update, window_reverse'd, shifted back and cropped, exactly (padding and shift included)."""
    from transformers.models.swin.modeling_swin import SwinLayer, window_partition, window_reverse

    from hf_tokenpool.adapters.swin import gather_windows, unpool, window_layout

    torch.manual_seed(0)
    config = SwinConfig(embed_dim=8, num_heads=[2], window_size=ws)
    layer = SwinLayer(config, dim=8, input_resolution=(height, width), num_heads=2, shift_size=shift)
    layer.set_shift_and_window_size((height, width))
    ws, shift = layer.window_size, layer.shift_size
    x = torch.randn(2, height * width, 8)
    layout = window_layout(ws, shift, height, width, x.device)
    grid, _ = layer.maybe_pad(x.view(2, height, width, 8), height, width)
    expected = window_partition(layer.cyclic_shift(grid), ws).reshape(-1, ws * ws, 8)
    assert torch.equal(gather_windows(layer, x, layout, height, width), expected)

    k = 3
    assign = torch.randint(0, k, expected.shape[:2])
    delta = torch.randn(expected.shape[0], k, 8)
    windows = expected + delta.gather(1, assign.unsqueeze(-1).expand(-1, -1, 8))
    back = layer.cyclic_shift(window_reverse(windows.view(-1, ws, ws, 8), ws, *grid.shape[1:3]), reverse=True)
    assert torch.equal(unpool(x, delta, assign, layout), back[:, :height, :width].reshape(2, -1, 8))


@pytest.mark.parametrize("budget", [1, 2**12, 2**19], ids=["rows-and-images", "images", "one-block"])
@pytest.mark.parametrize("bias_shape", [None, "per-image", "per-head"])
def test_explicit_attention_equals_a_plain_softmax(budget, bias_shape, monkeypatch):
    """adapters.vit.softmax_attention (exp in place, output divided by the row sums, in blocks of images or
    query rows) against softmax(q k^T s + bias) v written plainly: the output, the significance (attention
    received over heads and queries), the CLS attention, the probabilities, and the gradients."""
    from hf_tokenpool.adapters import vit

    monkeypatch.setattr(vit, "_BLOCK_ELEMENTS", budget)
    torch.manual_seed(0)
    b, h, n, d = 3, 4, 37, 8
    q, k, v = (torch.randn(b, h, n, d, requires_grad=True) for _ in range(3))
    bias = {None: None, "per-image": torch.rand(b, 1, 1, n).log(), "per-head": torch.randn(1, h, n, n)}[bias_shape]
    logits = q @ k.transpose(2, 3) * 0.3 + (0 if bias is None else bias)
    probs = logits.softmax(-1)
    expected = probs @ v
    needs = frozenset({"significance", "cls_attention"})
    for return_probs in (False, True):
        out, p, signals = vit.softmax_attention(q, k, v, bias, 0.3, 0.0, needs, return_probs=return_probs)
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(signals.significance, probs.detach().sum(dim=(1, 2)))
        torch.testing.assert_close(signals.cls_attention, probs.detach()[:, :, 0].mean(1))
        assert (p is None) != return_probs
        if return_probs:
            torch.testing.assert_close(p, probs)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    for got, want in zip(grads, torch.autograd.grad(expected.square().sum(), (q, k, v))):
        torch.testing.assert_close(got, want)
    half, _, _ = vit.softmax_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), bias, 0.3, 0.0, needs)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), expected, atol=3e-2, rtol=3e-2)
    # the class token's row alone (topk's signal next to SDPA): the same as row 0 of the full softmax
    row = vit.class_token_attention(q, k, bias, 0.3)
    torch.testing.assert_close(row, probs.detach()[:, :, 0].mean(1))
    assert not row.requires_grad and row.shape == (b, n)
