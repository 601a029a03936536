"""recipes/benchmark.py end to end on a tiny checkpoint and real Fashion-MNIST test images."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from conftest import save_fmnist_vit
from hf_tokenpool.data import DEBIAN_FASHION_MNIST_DIR

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("benchmark", ROOT / "recipes" / "benchmark.py")
benchmark = importlib.util.module_from_spec(spec)
sys.modules["benchmark"] = benchmark  # torch.compile looks functions up by their module's name
spec.loader.exec_module(benchmark)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return save_fmnist_vit(tmp_path_factory.mktemp("tiny-vit"), hidden_size=64, num_hidden_layers=6,
                           num_attention_heads=2, intermediate_size=128)


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST_DIR.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_sweep_rows_tables_and_plots(tiny_checkpoint, tmp_path):
    out = tmp_path / "bench"
    rows = benchmark.main(["--suite", "none", "--model_name_or_path", tiny_checkpoint, "--keeps", "0.5", "0.8",
                           "--target_flops", "0.7", "--eval_samples", "64", "--batch_sizes", "4", "1", "--repeats", "1",
                           "--threads", "1", "--output_dir", str(out)])
    # plain + 4 methods x 2 keeps + 1 budget row (tokenpool only)
    assert [(r["method"], r["target_flops"]) for r in rows][:1] == [("none", None)]
    assert len(rows) == 1 + 4 * 2 + 1
    plain = rows[0]
    assert plain["flops_ratio"] == 1.0 and plain["top1"] is not None
    by_key = {(r["method"], r["keep"]): r for r in rows if r["target_flops"] is None}
    assert plain["tokens_per_layer"] == [65] * 6
    for method in ("tokenpool", "kmeans", "tome", "topk"):
        # equal keep means equal token counts (pooled after layers 2, 3 and 5 of 6: 64 -> 32 -> 16 -> 8 patches)
        assert by_key[(method, 0.5)]["tokens_per_layer"] == [65, 65, 33, 17, 17, 9]
        assert by_key[(method, 0.5)]["flops_ratio"] < by_key[(method, 0.8)]["flops_ratio"] < 1.0
        assert 0 <= by_key[(method, 0.5)]["top1"] <= 100
    for r in rows:  # speed at both batch sizes, from plain and pooled timed alternately
        assert set(r["timing"]) == {"4", "1"}
        for t in r["timing"].values():
            assert t["speedup_min"] <= t["speedup"] <= t["speedup_max"] and t["images_per_s"] > 0
            assert t["speedup_of_ideal"] == pytest.approx(t["speedup"] * r["flops_ratio"])
    budget = next(r for r in rows if r["target_flops"] is not None)
    assert budget["method"] == "tokenpool" and abs(budget["flops_ratio"] - 0.7) < 0.03
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["rows"]) == len(rows) and "benchmark.py" in saved["meta"]["command"]
    assert 0 < saved["meta"]["wall_minutes"] < 5
    table = (out / "results.md").read_text().replace(Path(tiny_checkpoint).name, "tiny")
    assert table.count("\n| tiny | ") == len(rows) + 2 * 4  # every row, then the two keep-by-method views
    assert "| tiny | tome | 0.50 | 65>33>17>9 |" in table and "tokenpool @ 0.70 FLOPs" in table
    assert table.count("| model | method | keep 0.5 | keep 0.8 |") == 2
    for image in ("accuracy_vs_flops.png", "speedup_vs_flops.png"):
        assert (out / image).stat().st_size > 10_000


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit):
        benchmark.main(["--keeps", "1.5"])
    assert "--keeps must be in (0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        benchmark.main(["--option", "nonsense"])
    assert "KEY=VALUE" in capsys.readouterr().err


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST_DIR.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_finetune_column_runs_the_recipe(tiny_checkpoint, tmp_path):
    rows = benchmark.main(["--suite", "none", "--model_name_or_path", tiny_checkpoint, "--methods", "tome",
                           "--keeps", "0.5", "--target_flops", "--finetune", "--finetune_steps", "2",
                           "--eval_samples", "64", "--batch_sizes", "4", "--repeats", "1", "--threads", "1"])
    plain, pooled = rows
    assert plain["finetuned_top1"] is None
    assert 0 <= pooled["finetuned_top1"] <= 100 and pooled["top1"] is not None


def test_named_schedules_give_tomes_token_counts(tiny_checkpoint):
    rows = benchmark.main(["--suite", "none", "--model_name_or_path", tiny_checkpoint, "--methods", "tokenpool",
                           "--keeps", "--target_flops", "--schedules", "r-8", "--batch_sizes", "2", "--repeats", "1",
                           "--eval_samples", "16", "--threads", "1"])
    assert rows[1]["schedule"] == "r-8"
    assert rows[1]["tokens_per_layer"] == [65, 57, 49, 41, 33, 25]  # 8 fewer patch tokens in every layer


def test_floor_rows_have_the_schedules_token_counts_and_no_reducer(tiny_checkpoint):
    rows = benchmark.main(["--suite", "none", "--model_name_or_path", tiny_checkpoint, "--methods", "tome",
                           "--keeps", "0.5", "--target_flops", "--schedules", "r-8", "--floor", "--batch_sizes", "2",
                           "--repeats", "1", "--eval_samples", "16", "--threads", "1"])
    by = {(r["method"], r["keep"], r["schedule"]): r for r in rows}
    for keep, schedule in ((0.5, None), (None, "r-8")):
        floor, tome = by[("floor", keep, schedule)], by[("tome", keep, schedule)]
        assert floor["tokens_per_layer"] == tome["tokens_per_layer"] and floor["reducer_share"] == 0.0
        # the same token counts without the reducer's own work: a little fewer FLOPs than tome's
        assert 0.95 * tome["flops_ratio"] < floor["flops_ratio"] < tome["flops_ratio"]
    from transformers import ViTForImageClassification

    model = benchmark.floor_model(ViTForImageClassification.from_pretrained(tiny_checkpoint).eval(), {"keep": 0.5})
    plans = [layer._tokenpool for layer in benchmark.tp.ADAPTERS["vit"].layers(model)]
    assert all(p.reducer.fn is benchmark.keep_first and not p.reducer.needs for p in plans)
    assert not model.config.token_pooling["proportional_attention"]


def test_floor_with_the_significance_attention_computes_the_same_model(tiny_checkpoint):
    """The second floor spends the explicit attention (its reducer asks for the significance and ignores it):
    the same tokens and the same logits as the plain floor, which runs SDPA."""
    import torch
    from transformers import ViTForImageClassification

    plain = ViTForImageClassification.from_pretrained(tiny_checkpoint).eval()
    floor = benchmark.floor_model(plain, {"keep": 0.5})
    with_attention = benchmark.floor_model(plain, {"keep": 0.5}, signals={"significance"})
    plans = [layer._tokenpool for layer in benchmark.tp.ADAPTERS["vit"].layers(with_attention)]
    assert all(p.reducer.fn is benchmark.keep_first and p.reducer.needs == {"significance"} for p in plans)
    seen = []
    original = benchmark.keep_first

    def spy(tokens, sizes, k, signals):
        seen.append((signals.significance, tokens.shape[:2]))
        return original(tokens, sizes, k, signals)

    pixels = torch.randn(2, 3, 32, 32)
    try:  # the reducer really receives the significance: one weight per token it pools
        for p in plans:
            p.reducer = benchmark.Reducer(spy, p.reducer.needs)
        with torch.no_grad():
            out = with_attention(pixel_values=pixels).logits
    finally:
        for p in plans:
            p.reducer = benchmark.Reducer(original, p.reducer.needs)
    assert seen and all(s is not None and s.shape == shape and bool((s > 0).all()) for s, shape in seen)
    with torch.no_grad():
        torch.testing.assert_close(out, floor(pixel_values=pixels).logits, atol=1e-5, rtol=1e-5)
    one = pixels[:1]
    assert benchmark.tokens_per_layer(with_attention, one) == benchmark.tokens_per_layer(floor, one)


def test_compiled_rows_time_compiled_plain_against_compiled_pooled(tiny_checkpoint, tmp_path):
    rows = benchmark.main(["--suite", "none", "--model_name_or_path", tiny_checkpoint, "--methods", "tokenpool",
                           "--keeps", "0.5", "--target_flops", "--floor", "--compile", "--batch_sizes", "2",
                           "--repeats", "1", "--eval_samples", "16", "--threads", "1", "--output_dir", str(tmp_path)])
    assert [r["method"] for r in rows] == ["none", "tokenpool", "floor"]
    assert rows[1]["reducer_share"] is None and rows[1]["timing"]["2"]["speedup"] > 0
    assert "both torch.compile(fullgraph=True, dynamic=False)" in (tmp_path / "results.md").read_text()


def test_reducer_cost_suite_counts_on_the_meta_device(tmp_path):
    rows = benchmark.main(["--suite", "reducer_cost", "--methods", "tokenpool", "tome", "--output_dir", str(tmp_path)])
    by = {(r["patch_tokens"], r["method"], r["metric"]): r for r in rows}
    assert {r["patch_tokens"] for r in rows} == {196, 576, 1369, 4096}
    # the distance matrix of 768-d hidden states costs more than that of 64-d keys; auto stays under 1%
    assert by[(1369, "tokenpool", "tokens")]["reducer_gflops"] > 5 * by[(1369, "tokenpool", "keys")]["reducer_gflops"]
    assert all(by[(n, "tokenpool", "auto")]["reducer_share_of_plain"] < 0.01 for n in (196, 576, 1369, 4096))
    assert "| vit-b14-518 | 1369 |" in (tmp_path / "results.md").read_text()


def test_swin_floor_pools_windows_without_choosing_clusters():
    import torch
    from conftest import make
    from hf_tokenpool.adapters.swin import window_assignment, window_layout

    plain = make("swin")
    floor = benchmark.floor_model(plain, {"keep": 0.5})
    plans = [block._tokenpool for block in benchmark.tp.ADAPTERS["swin"].blocks(benchmark.tp.patch.target(
        benchmark.tp.ADAPTERS["swin"], floor))]
    assert plans and all(p.reducer.fn is benchmark.keep_first for p in plans)
    # each 4 x 4 window: its first k - 1 = 7 tokens alone, the other 9 in the last cluster
    layout = window_layout(4, 0, 16, 16, torch.device("cpu"))  # stage 1: 16 x 16 tokens, 4 x 4 windows
    assign = window_assignment(plans[0], torch.randn(2, 16, 16), layout, 4, 8, 1)
    assert assign[0].tolist() == list(range(7)) + [7] * 9
    pixels = torch.randn(2, 3, 32, 32)
    ratio = benchmark.tp.count_flops(floor, pixels[:1]) / benchmark.tp.count_flops(plain, pixels[:1])
    tome = benchmark.tp.patch_model(make("swin"), method="tome", keep=0.5)
    assert ratio < benchmark.tp.count_flops(tome, pixels[:1]) / benchmark.tp.count_flops(plain, pixels[:1]) < 1
    assert floor(pixel_values=pixels).logits.shape == (2, 5)
