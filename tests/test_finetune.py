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
import numpy as np
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

spec = importlib.util.spec_from_file_location("verify_card", ROOT / "recipes" / "verify_card.py")
verify_card = importlib.util.module_from_spec(spec)
spec.loader.exec_module(verify_card)

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
    # own labels: no baseline fine-tune, the plain row is the checkpoint as it is
    assert saved["baseline"] == "plain" and not saved["new_head"] and "plain_finetuned" not in saved
    # speed: plain and pooled timed interleaved, 7 forwards each, the median with its spread
    for kind, name in (("plain", "plain"), ("pooled", "pooled_off_the_shelf"), ("pooled", "pooled_finetuned")):
        s = saved["speed"][kind]
        assert s["repeats"] == 7 and s["min"] <= s["images_per_second"] <= s["max"]
        r = saved[name]  # every number on the card is measured
        assert r["images_per_second"] == s["images_per_second"]
        assert (f"| {r['accuracy']:.2f} | {r['gflops']:.4f} | {s['images_per_second']:.1f} "
                f"({s['min']:.1f}-{s['max']:.1f}) |") in card.text
    assert 'hf_tokenpool.from_pretrained("' in card.text
    assert card.data.base_model is None  # a local checkpoint folder has no Hub id
    assert str(tmp_path) not in str(card.data.to_dict()) and str(tmp_path) not in card.text
    assert card.data.model_name == "out" and card.data.eval_results[0].dataset_name == "zalando-datasets/fashion_mnist"


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
    saved = json.loads((stopped / "all_results.json").read_text())
    assert saved["train_steps"] == 4
    # the checkpoint keeps its classes and no flag says otherwise: distilled from the unpatched model
    assert saved["distill"] is True and saved["learning_rate"] == 1e-3
    assert "Distilled from the unpatched model" in (stopped / "README.md").read_text()


@needs_fmnist
def test_two_processes_give_the_same_accuracy(tiny_checkpoint, tmp_path):
    accs = []
    for n, launcher in ((1, [sys.executable]), (2, [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                                                      "--num_processes", "2", "--num_machines", "1",
                                                      "--mixed_precision", "no", "--dynamo_backend", "no"])):
        out = tmp_path / f"p{n}"
        subprocess.run([*launcher, str(ROOT / "recipes" / "finetune.py"), "--model_name_or_path", tiny_checkpoint,
                        "--output_dir", str(out), *QUICK, "--max_train_steps", "4", "--num_warmup_steps", "2"],
                       check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        saved = json.loads((out / "all_results.json").read_text())
        assert saved["num_processes"] == n and saved["eval_samples"] == 101
        accs.append((saved["plain"]["accuracy"], saved["pooled_off_the_shelf"]["accuracy"]))
        # 256 images in batches of 32 per process: 8 steps per epoch alone, 4 on each of two processes
        assert saved["steps_per_epoch"] == 8 // n
        # accelerate steps a prepared scheduler once per process: the peak comes after the warm-up's 2 optimizer
        # steps and the cosine ends at 0 after the 4th, with 1 process or 2
        assert saved["lr_after_step"] == {"2": 1e-3, "4": 0.0}
    assert accs[0] == accs[1]


class FakeHub:
    """huggingface_hub.HfApi as the recipe uses it, recording calls; `fail` names the call that raises."""

    def __init__(self, calls, fail=None, role="write"):
        self.calls, self.fail, self.role = calls, fail, role

    def __call__(self, token=None):
        self.calls.append(("token", token))
        return self

    def _maybe_fail(self, name):
        if self.fail == name:
            error = RuntimeError("401 Client Error: Unauthorized for url: https://huggingface.co/api/whoami-v2")
            error.response = type("Response", (), {"status_code": 401})()
            raise error

    def whoami(self):
        self._maybe_fail("whoami")
        self.calls.append(("whoami",))
        return {"name": "me", "auth": {"accessToken": {"role": self.role}}}

    def create_repo(self, repo_id, exist_ok, private):
        self._maybe_fail("create_repo")
        self.calls.append(("create_repo", repo_id, exist_ok))
        return type("Url", (), {"repo_id": repo_id})()

    def upload_folder(self, **kwargs):
        self._maybe_fail("upload_folder")
        self.calls.append(("upload_folder", kwargs))


@needs_fmnist
def test_push_uploads_exactly_the_folder_once(tiny_checkpoint, tmp_path, monkeypatch, capsys, caplog):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub(calls))
    out = tmp_path / "out"
    finetune.main(["--model_name_or_path", tiny_checkpoint, "--output_dir", str(out), "--max_train_steps", "2",
                   "--checkpointing_steps", "1", "--push_to_hub", "--hub_model_id", "me/tiny-tokenpool",
                   "--hub_token", "hf_SECRET123", *QUICK])
    # credentials and repo first, then one upload at the end
    assert [c[0] for c in calls if c[0] != "token"] == ["whoami", "create_repo", "upload_folder"]
    assert ("create_repo", "me/tiny-tokenpool", True) in calls
    uploads = [c[1] for c in calls if c[0] == "upload_folder"]
    assert uploads[0]["folder_path"] == str(out) and uploads[0]["repo_id"] == "me/tiny-tokenpool"
    assert "checkpoints/*" in uploads[0]["ignore_patterns"]
    assert "hf_SECRET123" not in capsys.readouterr().out + caplog.text
    assert ModelCard.load(out / "README.md").data.model_name == "me/tiny-tokenpool"


@pytest.mark.parametrize("fail,role,message", [
    ("whoami", "write", r"did not accept your credentials \(RuntimeError, HTTP 401\). Log in with `hf auth login`"),
    (None, "read", "your token is read-only"),
    ("create_repo", "write", r"cannot create or use the model repo 'me/x' as 'me' \(RuntimeError, HTTP 401\)"),
], ids=["no-credentials", "read-only-token", "repo-not-writable"])
def test_push_checks_the_hub_before_any_work(tiny_checkpoint, tmp_path, monkeypatch, fail, role, message):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub([], fail=fail, role=role))
    monkeypatch.setattr(finetune, "load_image_dataset", lambda *a: pytest.fail("loaded data before the Hub check"))
    with pytest.raises(SystemExit) as info:
        finetune.main(["--model_name_or_path", tiny_checkpoint, "--output_dir", str(tmp_path / "out"),
                       "--push_to_hub", "--hub_model_id", "me/x", "--hub_token", "hf_SECRET123"])
    assert re.search(message, str(info.value)) and "Nothing was trained" in str(info.value)
    assert "hf_SECRET123" not in str(info.value)
    assert not (tmp_path / "out").exists()


@needs_fmnist
def test_a_failed_push_keeps_the_complete_run(tiny_checkpoint, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub(calls, fail="upload_folder"))
    out = tmp_path / "my-run"
    with pytest.raises(SystemExit) as info:
        finetune.main(["--model_name_or_path", tiny_checkpoint, "--output_dir", str(out), "--max_train_steps", "1",
                       "--push_to_hub", *QUICK])  # no --hub_model_id: <user>/<output folder's name>
    assert ("create_repo", "me/my-run", True) in calls
    assert "the push to me/my-run failed (RuntimeError, HTTP 401)" in str(info.value)
    assert "hf upload me/my-run" in str(info.value)
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", "preprocessor_config.json",
                                               "all_results.json", "README.md"}
    assert ModelCard.load(out / "README.md").data.model_name == "me/my-run"


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
    (["--warmup_ratio", "1.5"], r"--warmup_ratio must be in \[0, 1\)"),
    (["--bench_repeats", "0"], "--bench_repeats must be >= 1"),
    (["--checkpointing_steps", "often"], "--checkpointing_steps must be an integer or 'epoch'"),
    (["--learning_rate", "0"], "--learning_rate must be > 0"),
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


def _image_folder(root, classes, per_class=8, size=28):
    """train/<class>/*.png, test/<class>/*.png: class k is a flat image of grey level 255 * k / (n - 1), with noise."""
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("test", max(2, per_class // 2))):
        for k, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            level = 255 * k / max(1, len(classes) - 1)
            for i in range(count):
                pixels = np.clip(level + rng.normal(0, 10, (size, size)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels, mode="L").save(root / split / name / f"{i}.png")
    return root


def _hub_cache_copy(checkpoint, tmp_path):
    """The checkpoint where huggingface_hub's cache would keep the Hub repo me/tiny-vit."""
    snapshot = tmp_path / "hub" / "models--me--tiny-vit" / "snapshots" / "0123abc"
    shutil.copytree(checkpoint, snapshot)
    return str(snapshot)


@needs_fmnist
def test_new_labels_fine_tune_the_plain_baseline_too(tiny_checkpoint, tmp_path):
    data = _image_folder(tmp_path / "my-shades", ["dark", "light"], per_class=16)
    out = tmp_path / "out"
    results = finetune.main(["--model_name_or_path", _hub_cache_copy(tiny_checkpoint, tmp_path), "--dataset_name",
                             str(data), "--output_dir", str(out), "--max_train_steps", "6", "--learning_rate", "1e-3",
                             "--per_device_train_batch_size", "8", "--bench_batch_size", "4"])
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "dark", "1": "light"}
    saved = json.loads((out / "all_results.json").read_text())
    assert saved["new_head"] and saved["baseline"] == "plain_finetuned"
    assert saved["distill"] is False and saved["learning_rate"] == 1e-3  # a new head learns from the labels
    # the same budget for both: 6 steps of 4 per epoch (32 images, batch 8), warm-up 10% of 6 rounded up
    assert saved["baseline_training"]["train_steps"] == saved["train_steps"] == 6
    assert saved["baseline_training"]["warmup_steps"] == saved["warmup_steps"] == 1
    assert saved["baseline_training"]["lr_after_step"] == saved["lr_after_step"]
    # two flat grey levels: the fine-tuned plain model separates them, the untrained head is not what is compared
    assert saved["plain_finetuned"]["accuracy"] == 100.0 and saved["pooled_finetuned"]["accuracy"] == 100.0
    card = ModelCard.load(out / "README.md")
    for label, name, kind in (("plain, fine-tuned (baseline)", "plain_finetuned", "plain"),
                              ("pooled, fine-tuned", "pooled_finetuned", "pooled")):
        r = saved[name]
        assert f"| {label} | {r['accuracy']:.2f} | {r['gflops']:.4f} | {saved['speed'][kind]['images_per_second']:.1f} (" \
            in card.text
    assert "plain (untrained head)" not in card.text and "recover" not in card.text
    assert "0.00 points above the plain, fine-tuned model's 100.00%" in card.text
    # names: the dataset by its folder's name (never the local path), base_model from the Hub cache snapshot
    assert card.data.base_model == "me/tiny-vit" and card.data.datasets is None
    assert card.data.eval_results[0].dataset_name == "my-shades" and card.data.model_name == "out"
    assert card.data.eval_results[0].metric_value == results["pooled_finetuned"]["accuracy"]
    assert str(tmp_path) not in card.text and str(tmp_path) not in str(card.data.to_dict())
    assert "held out" not in card.text and saved["eval_samples"] == 16  # the folder's own test split
    # the card and the saved model agree: reloaded as a user would, on the same split
    assert verify_card.main([str(out), "--dataset_name", str(data)]) == {
        "card_accuracy": 100.0, "reloaded_accuracy": 100.0, "agree": True}


@needs_fmnist
def test_no_plain_baseline_says_so(tiny_checkpoint, tmp_path):
    data = _image_folder(tmp_path / "shades", ["dark", "light"], per_class=4)
    args = ["--model_name_or_path", tiny_checkpoint, "--dataset_name", str(data), "--max_train_steps", "1",
            "--per_device_train_batch_size", "4", "--bench_batch_size", "2", "--bench_repeats", "1",
            "--dataset_card_name", "me/shades"]
    finetune.main([*args, "--output_dir", str(tmp_path / "out"), "--no_plain_baseline"])
    saved = json.loads((tmp_path / "out" / "all_results.json").read_text())
    assert saved["baseline"] == "plain" and "plain_finetuned" not in saved and saved["speed"]["plain"]["repeats"] == 1
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert "No plain baseline was trained" in card.text and "| plain (untrained head) |" in card.text
    assert card.data.datasets == ["me/shades"] and card.data.eval_results[0].dataset_name == "me/shades"
    with pytest.raises(ValueError, match="--distill with a new head needs the plain baseline"):
        finetune.main([*args, "--output_dir", str(tmp_path / "out2"), "--no_plain_baseline", "--distill"])


def test_hub_ids_for_the_card(tmp_path):
    assert finetune.hub_id_of("google/vit-base-patch16-224") == "google/vit-base-patch16-224"
    assert finetune.hub_id_of(str(tmp_path)) is None
    (tmp_path / "datasets--me--flowers" / "snapshots" / "abc").mkdir(parents=True)
    assert finetune.hub_id_of(str(tmp_path / "datasets--me--flowers" / "snapshots" / "abc")) == "me/flowers"
    args = finetune.parse_args(["--output_dir", str(tmp_path / "o"), "--dataset_name", str(tmp_path)])
    assert finetune.dataset_names(args) == (None, tmp_path.name)
    args = finetune.parse_args(["--output_dir", str(tmp_path / "o")])
    assert finetune.dataset_names(args) == ("zalando-datasets/fashion_mnist", "zalando-datasets/fashion_mnist")


@pytest.mark.parametrize("flags, new_head, expected", [
    ([], False, (1e-4, True)),  # own classes: recover what pooling cost, with the unpatched model as teacher
    ([], True, (3e-4, False)),  # new head: trained from the labels
    (["--learning_rate", "5e-4", "--no_distill"], False, (5e-4, False)),  # what the user says wins
    (["--distill"], True, (3e-4, True)),
])
def test_learning_rate_and_distillation_follow_the_head(flags, new_head, expected, tmp_path):
    args = finetune.parse_args(["--output_dir", str(tmp_path / "o"), *flags])
    finetune.resolve_head_defaults(args, new_head)
    assert (args.learning_rate, args.distill) == expected


def test_warmup_is_a_share_of_the_run(tmp_path):
    args = finetune.parse_args(["--output_dir", str(tmp_path / "o")])
    assert (args.warmup_ratio, args.num_warmup_steps) == (0.1, None)
    assert [finetune.warmup_steps(args, n) for n in (0, 9, 22, 220, 9375)] == [0, 1, 3, 22, 938]
    args = finetune.parse_args(["--output_dir", str(tmp_path / "o"), "--num_warmup_steps", "50"])
    assert finetune.warmup_steps(args, 22) == 50  # an explicit count wins, as in transformers' Trainer


def test_one_class_folder_is_refused_with_the_reason(tiny_checkpoint, tmp_path):
    data = tmp_path / "cats"
    (data / "cat").mkdir(parents=True)
    for i in range(3):
        IMG[0].save(data / "cat" / f"{i}.png")
    for extra in ([], ["--label_column_name", "label"]):
        with pytest.raises(ValueError, match="one sub-folder per class, at least two"):
            finetune.main(["--model_name_or_path", tiny_checkpoint, "--dataset_name", str(data),
                           "--output_dir", str(tmp_path / "out"), *extra])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("names,labels,message", [
    (["only"], [0, 0], r"has 1 class \(\['only'\]\); image classification needs at least two"),
    (["a", "b"], [1, 1], r"holds only the class \['b'\] of \['a', 'b'\]"),
], ids=["one-class-label", "one-class-present"])
def test_fewer_than_two_classes_are_refused(tiny_checkpoint, tmp_path, names, labels, message):
    data = _saved_dataset(tmp_path, {"image": datasets.Image(), "label": datasets.ClassLabel(names=names)},
                          {"image": IMG, "label": labels})
    with pytest.raises(ValueError, match=message):
        finetune.main(["--model_name_or_path", tiny_checkpoint, "--dataset_name", data,
                       "--output_dir", str(tmp_path / "out")])


@needs_fmnist
def test_unreadable_images_stop_before_training_or_are_skipped(tiny_checkpoint, tmp_path):
    data = _image_folder(tmp_path / "shades", ["dark", "light"], per_class=4)
    broken = data / "train" / "light" / "2.png"
    broken.write_bytes(broken.read_bytes()[:60])  # a truncated PNG: its header still reads
    args = ["--model_name_or_path", tiny_checkpoint, "--dataset_name", str(data), "--max_train_steps", "2",
            "--per_device_train_batch_size", "4", "--bench_batch_size", "2", "--no_plain_baseline"]
    with pytest.raises(ValueError, match=r"1 of the 8 images of split 'train' cannot be read: .*light/2\.png"):
        finetune.main([*args, "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    finetune.main([*args, "--output_dir", str(tmp_path / "out"), "--skip_unreadable_images"])
    saved = json.loads((tmp_path / "out" / "all_results.json").read_text())
    assert saved["skipped_images"] == {"train": 1, "eval": 0} and saved["train_samples"] == 7
    assert "1 unreadable image(s) were left out" in (tmp_path / "out" / "README.md").read_text()


def test_without_an_eval_split_a_seeded_share_of_train_is_held_out(tmp_path):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    train = datasets.Dataset.from_dict({"image": IMG * 10, "label": [0, 1] * 10}, features=features)
    args = finetune.parse_args(["--output_dir", str(tmp_path / "o")])
    fit, held, _, eval_split, _, _ = finetune.resolve_dataset(args, datasets.DatasetDict({"train": train}))
    assert (len(fit), len(held), eval_split) == (17, 3, "train (held out 0.15)")


def test_the_held_out_digits_folder(tmp_path):
    """recipes/make_image_folder.py: the held-out task of docs/recipe.md, 1400 train + 397 test, new class names."""
    spec = importlib.util.spec_from_file_location("make_image_folder", ROOT / "recipes" / "make_image_folder.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    counts = builder.main(["--source", "digits", "--output_dir", str(tmp_path / "digits")])
    assert sum(counts["train"].values()) == 1400 and sum(counts["test"].values()) == 397
    assert set(counts["train"].values()) == {140}
    loaded = finetune.load_image_dataset(str(tmp_path / "digits"))
    assert loaded["train"].features["label"].names == sorted(builder.DIGIT_NAMES)
    assert (len(loaded["train"]), len(loaded["test"])) == (1400, 397) and loaded["test"][0]["image"].size == (28, 28)
