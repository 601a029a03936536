"""recipes/compare_official_tome.py: the side-by-side speed comparison with the official ToMe code.

Official ToMe (and timm) are not dependencies: without them the script must say what to install; with
them (a user's machine) it must time both at the same token schedule."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("compare_official_tome", ROOT / "recipes" / "compare_official_tome.py")
compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare)


def test_without_the_contender_it_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tome", None)  # import tome -> ImportError
    with pytest.raises(SystemExit, match="facebookresearch/ToMe"):
        compare.main(["--repeats", "1"])


@pytest.mark.parametrize("argv", [["--r", "0"], ["--repeats", "0"], ["--batch_sizes", "0"], ["--methods", "nope"],
                                  ["--shape", "swin-t-224"]])
def test_bad_arguments_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        compare.parse_args(argv)
    assert "error" in capsys.readouterr().err


def test_same_schedule_and_paired_ratios_with_official_tome(tmp_path):
    pytest.importorskip("timm")
    pytest.importorskip("tome")
    rows = compare.main(["--methods", "tome", "--batch_sizes", "2", "--repeats", "1", "--warmup", "0",
                         "--output_dir", str(tmp_path)])
    by_name = {r["contender"]: r for r in rows}
    assert by_name["official ToMe"]["tokens_after_each_layer"] == by_name["hf_tokenpool tome"]["tokens_after_each_layer"]
    assert by_name["official ToMe"]["tokens_after_each_layer"][:3] == [185, 172, 159]
    assert by_name["official ToMe"]["relative_to_official"] == 1.0
    for r in rows:
        assert r["speedup_min"] <= r["speedup"] <= r["speedup_max"] and 0.5 < r["flops_ratio"] < 0.7
    assert (tmp_path / "results.md").read_text().count("| hf_tokenpool tome | 2 |") == 1
    for r in rows:  # both pool: some of each forward goes to choosing and merging the tokens
        assert 0 < r["pooling_ms"] < r["forward_ms"]


def test_timing_calls_counts_time_inside_the_named_functions_once_and_restores_them(monkeypatch):
    import types

    clock = [0.0]  # a fake clock: each function advances it by its own cost
    monkeypatch.setattr(compare, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    def advance(seconds):
        clock[0] += seconds

    ns = types.SimpleNamespace()
    ns.inner = lambda: advance(2)
    ns.outer = lambda: (advance(3), ns.inner())  # a timed call that calls another timed one
    originals = (ns.inner, ns.outer)
    with compare.timing_calls(ns, ["inner", "outer"]) as spent:
        ns.outer()  # 5 inside outer, inner's 2 of them not added twice
        advance(100)  # outside every timed call
        ns.inner()  # 2 more
    assert spent[0] == 7
    assert (ns.inner, ns.outer) == originals


def test_pooling_times_split_a_patched_forward():
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    import hf_tokenpool as tp

    vit = sys.modules["hf_tokenpool.adapters.vit"]
    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=32,
                       patch_size=4)
    model = tp.patch_model(ViTForImageClassification(config).eval(), keep=0.5)
    x = torch.randn(2, 3, 32, 32)
    original = vit.pool_tokens
    split = compare.pooling_times({"m": (lambda: model(pixel_values=x), vit, ["pool_tokens"])}, warmup=1, repeats=3)
    assert vit.pool_tokens is original
    assert 0 < split["m"]["pooling_ms"] < split["m"]["forward_ms"]


def _tiny(kind: str, **overrides):
    import torch
    from transformers import (DeiTConfig, DeiTForImageClassification, DeiTForImageClassificationWithTeacher,
                              SwinConfig, SwinForImageClassification, ViTConfig, ViTForImageClassification)

    torch.manual_seed(0)
    shape = dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=3, intermediate_size=96, image_size=32,
                 patch_size=8, num_labels=5, **overrides)
    if kind == "vit":
        return ViTForImageClassification(ViTConfig(**shape)).eval()
    if kind == "deit":
        return DeiTForImageClassificationWithTeacher(DeiTConfig(**shape)).eval()
    if kind == "deit-cls":
        return DeiTForImageClassification(DeiTConfig(**shape)).eval()
    return SwinForImageClassification(SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                                                 num_heads=[1, 2], window_size=4, num_labels=5)).eval()


def test_timm_twin_refuses_what_it_cannot_convert():
    with pytest.raises(ValueError, match="ViTForImageClassification or DeiTForImageClassificationWithTeacher"):
        compare.timm_twin(_tiny("swin"), None)
    with pytest.raises(ValueError, match="got DeiTForImageClassification$"):  # reads the class token alone
        compare.timm_twin(_tiny("deit-cls"), None)
    with pytest.raises(ValueError, match="hidden_act is 'relu'"):
        compare.timm_twin(_tiny("vit", hidden_act="relu"), None)


@pytest.mark.parametrize("kind", ["vit", "deit"])
def test_timm_twin_computes_the_same_logits(kind):
    """The timm copy official ToMe patches must be the same model: same logits, class (and distillation) token."""
    import torch

    timm = pytest.importorskip("timm")
    model = _tiny(kind)
    twin = compare.timm_twin(model, timm)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(pixel_values=x).logits, atol=1e-5, rtol=1e-5)
    assert twin.num_prefix_tokens == (2 if kind == "deit" else 1)


def test_equal_flops_times_three_steps_at_official_tomes_flops():
    pytest.importorskip("timm")
    pytest.importorskip("tome")
    rows = compare.main(["--methods", "tome", "tokenpool", "--equal_flops", "--batch_sizes", "2", "--repeats", "1",
                         "--warmup", "0"])
    by_name = {r["contender"]: r for r in rows}
    official, steps = by_name["official ToMe, three steps"], by_name["hf_tokenpool tome, three steps"]
    assert official["tokens_after_each_layer"] == steps["tokens_after_each_layer"]
    assert len(set(steps["tokens_after_each_layer"][:-1])) == 4  # the plain count, then three steps
    for name in ("hf_tokenpool tome, three steps", "hf_tokenpool tokenpool, three steps", "official ToMe, three steps"):
        assert by_name[name]["flops_ratio"] == pytest.approx(by_name["official ToMe"]["flops_ratio"], abs=0.01)
