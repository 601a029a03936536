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
