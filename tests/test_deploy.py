"""Every deployment path of a patched model gives eager's numbers: torch.compile (no graph break),
torch.export, ONNX (run in onnxruntime), jit.trace on new inputs, pickle / torch.save / deepcopy,
and a meta-device forward; plus attention maps, FLOPs counted against arithmetic, and PEFT."""

import copy
import io
import pickle

import pytest
import torch
from conftest import TINY_MODELS, VIT_SHAPE, main_output, make, output_in_a_fresh_process, output_of

import hf_tokenpool as tp

CASES = [(n, m) for n in ("vit", "deit-teacher", "swin") for m in ("tokenpool", "kmeans", "tome", "topk")
         if m in tp.ADAPTERS[make(n).config.model_type].methods]
# the other families share the ViT code path: one method each, chosen to cover every reducer
CASES += [("dinov2-registers", "tokenpool"), ("clip", "topk"), ("siglip", "kmeans"), ("siglip-vision", "tome")]
IDS = [f"{n}-{m}" for n, m in CASES]


def patched(name, method, **options):
    return tp.patch_model(make(name), keep=0.5, method=method, **options)


@pytest.fixture
def new_pixels():
    torch.manual_seed(7)
    return torch.randn(4, 3, 32, 32)  # as many as `pixels`: an export or trace is made for one batch shape


@pytest.mark.parametrize("name,method", CASES, ids=IDS)
def test_no_graph_break(name, method, pixels):
    model = patched(name, method)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda px: output_of(model, px))(pixels)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize("name,method", [("vit", "tokenpool"), ("swin", "tokenpool")], ids=["vit", "swin"])
def test_torch_compile_fullgraph_equals_eager(name, method, pixels, new_pixels):
    model = patched(name, method)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    for x in (pixels, new_pixels):
        torch.testing.assert_close(output_of(compiled, x), output_of(model, x), rtol=0, atol=1e-4)


@pytest.mark.parametrize("name,method", CASES, ids=IDS)
def test_torch_export_equals_eager_on_new_inputs(name, method, pixels, new_pixels):
    model = patched(name, method)
    program = torch.export.export(model, (), {"pixel_values": pixels})
    with torch.no_grad():
        out = program.module()(pixel_values=new_pixels)
    torch.testing.assert_close(main_output(out), output_of(model, new_pixels), rtol=0, atol=1e-4)
    # no host synchronisation: no torch.equal, no .item() (aten._local_scalar_dense)
    assert not {"aten.equal.default", "aten._local_scalar_dense.default"} & {str(n.target) for n in program.graph.nodes}


@pytest.mark.parametrize("name,method", [("vit", "tokenpool"), ("deit-teacher", "tome"), ("vit", "topk"),
                                         ("swin", "tokenpool"), ("swin", "kmeans"), ("dinov2-registers", "tokenpool"),
                                         ("siglip", "tokenpool"), ("clip", "tome")],
                         ids=["vit-tokenpool", "deit-tome", "vit-topk", "swin-tokenpool", "swin-kmeans",
                              "dinov2-registers-tokenpool", "siglip-tokenpool", "clip-tome"])
def test_onnx_export_runs_in_onnxruntime(name, method, pixels, new_pixels, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = patched(name, method)
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (), str(path), kwargs={"pixel_values": pixels}, dynamo=True, verbose=False)
    session = ort.InferenceSession(str(path))
    (logits, *_) = session.run(None, {session.get_inputs()[0].name: new_pixels.numpy()})
    torch.testing.assert_close(torch.from_numpy(logits), output_of(model, new_pixels), rtol=0, atol=1e-4)


@pytest.mark.parametrize("name,method", CASES, ids=IDS)
def test_jit_trace_is_correct_on_new_inputs(name, method, pixels, new_pixels):
    model = patched(name, method)

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, pixel_values):
            return main_output(self.inner(pixel_values=pixel_values))

    with torch.no_grad():
        traced = torch.jit.trace(Logits(model), (pixels,), check_trace=False)
        torch.testing.assert_close(traced(new_pixels), output_of(model, new_pixels), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name,method", CASES, ids=IDS)
def test_pickle_torch_save_and_deepcopy_round_trip(name, method, pixels):
    model = patched(name, method)
    expected = output_of(model, pixels)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for copy_ in (pickle.loads(pickle.dumps(model)), torch.load(buffer, weights_only=False), copy.deepcopy(model)):
        assert tp.is_patched(copy_)
        torch.testing.assert_close(output_of(copy_, pixels), expected, rtol=0, atol=0)
        tp.unpatch_model(copy_)  # and the copy still unpatches to its upstream classes
        assert type(copy_) is type(make(name))


@pytest.mark.parametrize("name", ["vit", "dinov2-registers", "siglip"])
def test_a_pickled_model_loads_in_a_fresh_process(name, pixels, tmp_path):
    model = patched(name, "tokenpool")
    assert output_in_a_fresh_process(model, pixels, tmp_path) == "same"


def test_pickle_after_torch_export_still_works(pixels):
    model = patched("vit", "tokenpool")
    torch.export.export(model, (), {"pixel_values": pixels})
    torch.testing.assert_close(output_of(pickle.loads(pickle.dumps(model)), pixels), output_of(model, pixels))


@pytest.mark.parametrize("name,method", CASES, ids=IDS)
def test_meta_device_forward_gives_the_shapes(name, method):
    model = make(name).to("meta")
    tp.patch_model(model, keep=0.5, method=method)
    with torch.no_grad():
        out = main_output(model(pixel_values=torch.empty(2, 3, 32, 32, device="meta")))
    assert out.device.type == "meta" and out.shape[0] == 2
    assert out.shape == output_of(patched(name, method), torch.zeros(2, 3, 32, 32)).shape


@pytest.mark.parametrize("name", ["vit", "deit", "dinov2", "clip"])
@pytest.mark.parametrize("location", ["before_mlp", "after_layer"])
def test_attention_maps_one_per_layer_as_long_as_its_input(name, location, pixels):
    model = TINY_MODELS[name]()
    model.config._attn_implementation = "eager"  # upstream returns maps only with eager attention
    model = tp.patch_model(model.eval(), keep=0.6, pool_location=location)
    with torch.no_grad():
        out = model(pixel_values=pixels, output_attentions=True, output_hidden_states=True)
    assert len(out.attentions) == VIT_SHAPE["num_hidden_layers"]
    for attn, hidden in zip(out.attentions, out.hidden_states[:-1]):  # layer i's map is over layer i's input
        n = hidden.shape[1]
        assert attn.shape == (pixels.shape[0], VIT_SHAPE["num_attention_heads"], n, n)
        torch.testing.assert_close(attn.sum(-1), torch.ones(attn.shape[:-1]))
    assert len({a.shape[-1] for a in out.attentions}) == 4  # 64 patches, then three pooled lengths


def test_swin_attention_maps_per_stage_over_window_tokens(pixels):
    model = TINY_MODELS["swin"]()
    model.config._attn_implementation = "eager"
    plain = model.eval()(pixel_values=pixels, output_attentions=True).attentions
    tp.patch_model(model, keep=0.5)
    with torch.no_grad():
        pooled = model(pixel_values=pixels, output_attentions=True).attentions
    assert [a.shape for a in pooled] == [a.shape for a in plain] and len(plain) == 2
    for attn in pooled:  # each cluster's attention spread over its members: rows still sum to one
        torch.testing.assert_close(attn.sum(-1), torch.ones(attn.shape[:-1]))


def test_sdpa_model_returns_no_maps_like_upstream(pixels):
    model = tp.patch_model(make("vit"), keep=0.5)
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        assert model(pixel_values=pixels, output_attentions=True).attentions in (None, ())


def test_a_user_attention_mask_is_refused(pixels):
    model = patched("vit", "tokenpool")
    with pytest.raises(ValueError, match="attention_mask cannot be used with token pooling"):
        model(pixel_values=pixels, attention_mask=torch.ones(pixels.shape[0], 65, dtype=torch.bool))


def test_flops_match_arithmetic_of_a_small_vit():
    """count_flops = linear layers + attention matmuls (SDPA counted on CPU too) + patch conv + head."""
    from transformers import ViTConfig, ViTForImageClassification

    c, layers, inter, size, patch, labels = 64, 3, 128, 32, 4, 7
    model = ViTForImageClassification(ViTConfig(hidden_size=c, num_hidden_layers=layers, num_attention_heads=4,
                                                intermediate_size=inter, image_size=size, patch_size=patch,
                                                num_labels=labels)).eval()
    n = (size // patch) ** 2 + 1
    per_layer = 2 * n * (4 * c * c + 2 * c * inter) + 2 * 2 * n * n * c  # q, k, v, o + MLP; q k^T and p v
    expected = layers * per_layer + 2 * (n - 1) * c * 3 * patch * patch + 2 * c * labels
    assert tp.count_flops(model, torch.zeros(1, 3, size, size)) == expected


def test_time_interleaved_rotates_the_turn_and_pairs_rounds():
    """Every round starts one model later (A B C, B C A, C A B, ...): each model follows every other equally
    often; "seconds" holds one entry per timed round, in round order; training flags come back as they were."""
    calls = []

    class Recorder(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, pixel_values):
            calls.append(self.name)
            return pixel_values

    models = {name: Recorder(name) for name in "abc"}
    models["a"].eval()  # a module starts in training mode: one of each
    timed = tp.time_interleaved(models, torch.zeros(2, 3, 4, 4), warmup=1, repeats=4)
    assert "".join(calls) == "abc" + "bca" + "cab" + "abc" + "bca"
    assert {name: r["repeats"] for name, r in timed.items()} == {"a": 4, "b": 4, "c": 4}
    assert all(len(r["seconds"]) == 4 and r["min"] <= r["images_per_second"] <= r["max"] for r in timed.values())
    assert models["b"].training and not models["a"].training


def test_peft_wrapped_model_is_accepted(pixels):
    peft = pytest.importorskip("peft")
    model = make("vit")
    plain = output_of(model, pixels)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert not tp.is_patched(wrapped)
    tp.patch_model(wrapped, keep=0.5)
    assert tp.is_patched(wrapped)
    with torch.no_grad():
        assert wrapped(pixel_values=pixels).logits.shape == plain.shape
    tp.unpatch_model(wrapped)
    torch.testing.assert_close(output_of(wrapped, pixels), plain)  # LoRA starts at zero: same logits
