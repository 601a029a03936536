"""recipes/fidelity.py: paired fidelity to the plain model, on a tiny checkpoint and real test images."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_fmnist_vit
from hf_tokenpool.data import DEBIAN_FASHION_MNIST_DIR

import hf_tokenpool as tp

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("fidelity", ROOT / "recipes" / "fidelity.py")
fidelity = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fidelity)
needs_data = pytest.mark.skipif(not DEBIAN_FASHION_MNIST_DIR.is_dir(), reason="apt-get install dataset-fashion-mnist")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return save_fmnist_vit(tmp_path_factory.mktemp("tiny-vit"), hidden_size=64, num_hidden_layers=6,
                           num_attention_heads=2, intermediate_size=128)


def test_compare_is_paired_agreement_and_kl():
    plain = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0], [0.0, 1.0]])
    same = fidelity.compare(plain, plain, torch.tensor([0, 1, 1, 1]))
    assert same["agreement"] == 100.0 and same["kl"] == pytest.approx(0.0, abs=1e-7) and same["top1"] == 75.0
    flipped = fidelity.compare(plain, plain.flip(-1), torch.tensor([0, 1, 1, 1]))
    assert flipped["agreement"] == 0.0 and flipped["kl"] > 0
    half = fidelity.compare(plain, torch.cat([plain[:2], plain[2:].flip(-1)]), torch.tensor([0, 1, 0, 1]))
    assert half["agreement"] == 50.0 and half["agreement_se"] == pytest.approx(100 * (0.25 / 4) ** 0.5)


def test_schedule_names():
    assert fidelity.schedule_settings("steps-0.5", 6) == {"keep": 0.5}
    assert fidelity.schedule_settings("layer-0.75", 3) == {"schedule": [0.75] * 3}
    keeps = fidelity.schedule_settings("r-8", 6, num_patches=64)["schedule"]
    assert tp.TokenPoolConfig.num_tokens(64, keeps) == [56, 48, 40, 32, 24, 16]
    assert fidelity.schedule_settings("flops-0.6", 6) == {"target_flops": 0.6}
    with pytest.raises(ValueError, match="expected steps-K, layer-K, r-R or flops-F"):
        fidelity.schedule_settings("every-0.5", 6)


@pytest.mark.parametrize("argv", [["--schedules", "flops-1.5"], ["--schedules", "steps-x"],
                                  ["--official_tome", "--finetuned", "somewhere"]])
def test_bad_arguments_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        fidelity.parse_args(argv)
    assert "error" in capsys.readouterr().err


def test_official_tome_without_the_contender_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tome", None)  # import tome -> ImportError
    with pytest.raises(SystemExit, match="facebookresearch/ToMe"):
        fidelity.main(["--official_tome", "--eval_samples", "8"])


@needs_data
def test_official_tome_follows_our_tome_tokens(tmp_path):
    """On a checkpoint converted to timm, official ToMe removes the tokens our `tome` removes, and where its
    matching is the same (DeiT) it gives the same fidelity; where ToMe cannot follow (more than half of a
    layer's tokens at once) the row is left out."""
    pytest.importorskip("timm")
    pytest.importorskip("tome")
    deit = str(ROOT / "recipes" / "checkpoints" / "deit-tiny-fashion-mnist")
    rows = fidelity.main(["--model_name_or_path", deit, "--methods", "tome", "--official_tome", "--schedules",
                          "r-8", "steps-0.3", "flops-0.62", "--eval_samples", "200", "--threads", "1"])
    by = {(r["schedule"], r["method"]): r for r in rows}
    assert ("steps-0.3", "official ToMe") not in by
    for schedule in ("r-8", "flops-0.62"):
        ours, official = by[schedule, "tome"], by[schedule, "official ToMe"]
        assert official["tokens"] == ours["tokens"]
        assert official["flops_ratio"] == pytest.approx(ours["flops_ratio"], abs=0.01)
        assert official["kl"] == pytest.approx(ours["kl"], rel=0.05)


@needs_data
def test_suite_rows_and_files(tiny_checkpoint, tmp_path):
    rows = fidelity.main(["--model_name_or_path", tiny_checkpoint, "--methods", "tokenpool", "tome",
                          "--variants", "init=significance", "--schedules", "steps-0.5", "r-8",
                          "--eval_samples", "48", "--threads", "1", "--output_dir", str(tmp_path)])
    plain, pooled = rows[0], rows[1:]
    assert plain["agreement"] == 100.0 and plain["kl"] == pytest.approx(0.0, abs=1e-6)
    assert len(pooled) == 2 * 3  # two schedules x (tokenpool, tome, tokenpool [init=significance])
    for r in pooled:
        assert 0 <= r["agreement"] <= 100 and r["kl"] >= 0 and r["n"] == 48 and r["flops_ratio"] < 1
    assert {tuple(r["tokens"]) for r in pooled if r["schedule"] == "r-8"} == {(56, 48, 40, 32, 24, 16)}
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["rows"]) == len(rows) and "fidelity.py" in saved["meta"]["command"]
    assert "tokenpool [init=significance]" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "agreement_vs_flops.png").stat().st_size > 5_000


@needs_data
def test_finetuned_mode_compares_a_saved_pooled_model(tiny_checkpoint, tmp_path):
    """A saved pooled model (here: not trained further) scores exactly as the same pooling off the shelf."""
    model = tp.patch_model(tp.load_model(tiny_checkpoint), keep=0.5, method="tome")
    model.save_pretrained(tmp_path / "pooled")
    args = ["--model_name_or_path", tiny_checkpoint, "--eval_samples", "48", "--threads", "1"]
    (row,) = fidelity.main([*args, "--finetuned", str(tmp_path / "pooled")])
    off_the_shelf = fidelity.main([*args, "--methods", "tome", "--schedules", "steps-0.5"])[1]
    assert row["variant"] == "fine-tuned" and row["method"] == "tome"
    for key in ("agreement", "kl", "top1", "flops_ratio"):
        assert row[key] == pytest.approx(off_the_shelf[key])
