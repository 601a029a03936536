"""The accelerate fine-tuning recipe, end to end on a tiny model and real Fashion-MNIST images."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file

from conftest import save_fmnist_vit
from hf_tokenpool.data import DEBIAN_FASHION_MNIST_DIR

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("finetune", ROOT / "recipes" / "finetune.py")
finetune = importlib.util.module_from_spec(spec)
spec.loader.exec_module(finetune)

needs_fmnist = pytest.mark.skipif(not DEBIAN_FASHION_MNIST_DIR.is_dir(),
                                  reason="apt-get install dataset-fashion-mnist")
QUICK = ["--max_train_samples", "256", "--max_eval_samples", "101", "--per_device_train_batch_size", "32",
         "--bench_batch_size", "8", "--learning_rate", "1e-3", "--num_warmup_steps", "0"]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return save_fmnist_vit(tmp_path_factory.mktemp("tiny-vit"), hidden_size=96, num_hidden_layers=4,
                           num_attention_heads=2, intermediate_size=384)


@needs_fmnist
def test_run_writes_a_hub_ready_folder(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    results = finetune.main(["--model_name_or_path", tiny_checkpoint, "--output_dir", str(out),
                             "--max_train_steps", "4", "--distill", *QUICK])
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", "preprocessor_config.json",
                                               "all_results.json", "README.md"}
    config = json.loads((out / "config.json").read_text())
    assert config["token_pooling"]["keep"] == 0.6 and config["token_pooling"]["method"] == "tokenpool"
    saved = json.loads((out / "all_results.json").read_text())
    assert saved["train_steps"] == 4 and saved["eval_samples"] == 101 and 0 < saved["train_minutes"] < 5
    # FLOPs measured by the run: pooled below plain
    assert saved["pooled_finetuned"]["gflops"] < saved["plain"]["gflops"]
    card = ModelCard.load(out / "README.md")
    assert {"hf-tokenpool", "token-pooling"} <= set(card.data.tags)
    assert card.data.library_name == "transformers"
    assert card.data.datasets == ["zalando-datasets/fashion_mnist"]
    assert card.data.eval_results[0].metric_value == results["pooled_finetuned"]["accuracy"]
    for name in ("plain", "pooled_off_the_shelf", "pooled_finetuned"):  # every number on the card is measured
        r = saved[name]
        assert f"| {r['accuracy']:.2f} | {r['gflops']:.4f} | {r['images_per_second']:.1f} |" in card.text
    assert 'hf_tokenpool.from_pretrained("' in card.text


@needs_fmnist
def test_resume_continues_where_it_stopped(tiny_checkpoint, tmp_path):
    args = ["--model_name_or_path", tiny_checkpoint, "--max_train_steps", "4", "--checkpointing_steps", "2", *QUICK]
    finetune.main([*args, "--output_dir", str(tmp_path / "full")])
    # the same run "stopped" after step 2: keep only its first checkpoint, then resume from it
    stopped = tmp_path / "stopped"
    finetune.main([*args, "--output_dir", str(stopped)])
    for item in stopped.iterdir():
        if item.is_file():
            item.unlink()
    shutil.rmtree(stopped / "checkpoints" / "step_4")
    finetune.main([*args, "--output_dir", str(stopped), "--resume_from_checkpoint", "latest"])
    full, resumed = load_file(tmp_path / "full" / "model.safetensors"), load_file(stopped / "model.safetensors")
    assert full.keys() == resumed.keys()
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], rtol=0, atol=1e-6)
    assert json.loads((stopped / "all_results.json").read_text())["train_steps"] == 4


@needs_fmnist
def test_two_processes_give_the_same_accuracy(tiny_checkpoint, tmp_path):
    accs = []
    for n, launcher in ((1, [sys.executable]), (2, [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                                                      "--num_processes", "2", "--num_machines", "1",
                                                      "--mixed_precision", "no", "--dynamo_backend", "no"])):
        out = tmp_path / f"p{n}"
        subprocess.run([*launcher, str(ROOT / "recipes" / "finetune.py"), "--model_name_or_path", tiny_checkpoint,
                        "--output_dir", str(out), "--max_train_steps", "0", *QUICK],
                       check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        saved = json.loads((out / "all_results.json").read_text())
        assert saved["num_processes"] == n and saved["eval_samples"] == 101
        accs.append((saved["plain"]["accuracy"], saved["pooled_off_the_shelf"]["accuracy"]))
    assert accs[0] == accs[1]


@needs_fmnist
def test_push_uploads_exactly_the_folder_once(tiny_checkpoint, tmp_path, monkeypatch, capsys, caplog):
    import huggingface_hub

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo_id, exist_ok, private):
            calls.append(("create_repo", repo_id))
            return type("Url", (), {"repo_id": repo_id})()

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    out = tmp_path / "out"
    finetune.main(["--model_name_or_path", tiny_checkpoint, "--output_dir", str(out), "--max_train_steps", "2",
                   "--checkpointing_steps", "1", "--push_to_hub", "--hub_model_id", "me/tiny-tokenpool",
                   "--hub_token", "hf_SECRET123", *QUICK])
    uploads = [c[1] for c in calls if c[0] == "upload_folder"]
    assert len(uploads) == 1
    assert uploads[0]["folder_path"] == str(out) and uploads[0]["repo_id"] == "me/tiny-tokenpool"
    assert "checkpoints/*" in uploads[0]["ignore_patterns"]
    assert "hf_SECRET123" not in capsys.readouterr().out + caplog.text


def _saved_dataset(tmp_path, features, rows):
    ds = datasets.Dataset.from_dict(rows, features=datasets.Features(features))
    ds.save_to_disk(str(tmp_path / "data"))
    return str(tmp_path / "data")


IMG = [Image.new("L", (28, 28), 0), Image.new("L", (28, 28), 255)]


@pytest.mark.parametrize("extra,features,rows,message", [
    (["--label_column_name", "target"], {"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])},
     {"image": IMG, "label": [0, 1]}, r"no label column 'target'; the columns are \['image', 'label'\]"),
    (["--eval_split", "dev"], {"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])},
     {"image": IMG, "label": [0, 1]}, r"no split 'dev' .* its splits are \['train'\]"),
    (["--image_column_name", "caption"], {"image": datasets.Image(), "caption": datasets.Value("string"),
                                          "label": datasets.ClassLabel(names=["a", "b"])},
     {"image": IMG, "caption": ["x", "y"], "label": [0, 1]}, "column 'caption' holds .*not images"),
], ids=["missing-column", "unknown-split", "non-image-column"])
def test_bad_datasets_fail_before_training(tiny_checkpoint, tmp_path, extra, features, rows, message):
    data = _saved_dataset(tmp_path, features, rows)
    with pytest.raises(ValueError, match=message):
        finetune.main(["--model_name_or_path", tiny_checkpoint, "--dataset_name", data,
                       "--output_dir", str(tmp_path / "out"), *extra])
    assert not (tmp_path / "out").exists()


def test_an_empty_dataset_is_refused(tmp_path):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    one = datasets.Dataset.from_dict({"image": IMG[:1], "label": [0]}, features=features)
    args = finetune.parse_args(["--output_dir", str(tmp_path / "out")])
    with pytest.raises(ValueError, match="is empty"):
        finetune.resolve_dataset(args, datasets.DatasetDict({"train": one.select([]), "test": one.select([])}))


@pytest.mark.parametrize("argv,message", [
    (["--keep", "0"], r"--keep must be in \(0, 1\]"),
    (["--keep", "1.5"], r"--keep must be in \(0, 1\]"),
    (["--method", "dbscan"], "invalid choice: 'dbscan'"),
    (["--push_to_hub"], "--push_to_hub needs --hub_model_id"),
    (["--checkpointing_steps", "often"], "--checkpointing_steps must be an integer or 'epoch'"),
])
def test_bad_arguments_are_refused(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        finetune.parse_args(["--output_dir", str(tmp_path / "o"), *argv])
    assert re.search(message, capsys.readouterr().err)


def test_a_non_empty_output_dir_is_never_overwritten_silently(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(SystemExit):
        finetune.parse_args(["--output_dir", str(tmp_path)])
    assert "is not empty; pass --overwrite_output_dir" in capsys.readouterr().err
    assert (tmp_path / "mine.txt").read_text() == "user data"


@needs_fmnist
def test_new_head_when_classes_differ(tiny_checkpoint, tmp_path):
    rows = {"image": IMG * 8, "label": [0, 1] * 8}
    data = _saved_dataset(tmp_path, {"image": datasets.Image(), "label": datasets.ClassLabel(names=["dark", "light"])},
                          rows)
    out = tmp_path / "out"
    finetune.main(["--model_name_or_path", tiny_checkpoint, "--dataset_name", data, "--output_dir", str(out),
                   "--max_train_steps", "1", "--per_device_train_batch_size", "4", "--bench_batch_size", "2"])
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "dark", "1": "light"}
    saved = json.loads((out / "all_results.json").read_text())
    assert "held out" in ModelCard.load(out / "README.md").text and saved["eval_samples"] == 3
