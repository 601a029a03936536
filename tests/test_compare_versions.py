"""recipes/compare_versions.py: two versions of hf_tokenpool timed side by side in one process."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("compare_versions", ROOT / "recipes" / "compare_versions.py")
versions = importlib.util.module_from_spec(spec)
spec.loader.exec_module(versions)


def test_a_folder_without_the_package_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="no hf_tokenpool package there"):
        versions.main(["--old", str(tmp_path), "--repeats", "1"])


@pytest.mark.parametrize("argv", [["--repeats", "0"], ["--batch_sizes", "0"], ["--methods", "nope"], []])
def test_bad_arguments_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        versions.parse_args(argv if argv == [] else ["--old", "x", *argv])  # [] lacks the required --old
    assert "error" in capsys.readouterr().err


def test_a_per_layer_schedule_on_windowed_swin_is_refused(tmp_path):
    """Swin pools inside windows: r-R would count a token sequence it does not have (and pooled nothing)."""
    with pytest.raises(SystemExit, match="pools inside windows; use steps-K"):
        versions.main(["--old", str(tmp_path), "--shape", "swin-t-224", "--schedule", "r-13", "--repeats", "1"])


def test_this_checkout_against_itself_gives_the_same_outputs_and_paired_rows(tmp_path):
    """The same code imported twice: outputs equal, one row per version and batch size, the old package a
    separate copy (its own classes), and the tokens pooled at the schedule asked for."""
    rows = versions.main(["--old", str(ROOT), "--shape", "deit-s16-224", "--schedule", "steps-0.5",
                          "--methods", "tokenpool", "--batch_sizes", "1", "--repeats", "1", "--warmup", "0",
                          "--output_dir", str(tmp_path)])
    assert [(r["version"], r["batch_size"]) for r in rows] == [("old", 1), ("new", 1)]
    for r in rows:
        assert r["max_abs_difference_old_new"] == 0.0
        assert r["speedup_min"] <= r["speedup"] <= r["speedup_max"] and 0.4 < r["flops_ratio"] < 0.6
    assert rows[0]["flops_ratio"] == rows[1]["flops_ratio"]
    assert sys.modules["hf_tokenpool_old"].patch_model is not sys.modules["hf_tokenpool"].patch_model
    assert (tmp_path / "results.md").read_text().count("| tokenpool |") == 2
