"""hf_tokenpool.data: the offline Fashion-MNIST loader, its Arrow cache, other sources, errors."""

import time

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import ViTImageProcessor

from hf_tokenpool import data
from hf_tokenpool.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    load_image_dataset,
    to_pixel_values,
)

needs_debian_files = pytest.mark.skipif(
    not data.DEBIAN_FASHION_MNIST_DIR.is_dir(),
    reason=f"{data.DEBIAN_FASHION_MNIST_DIR} is absent (apt-get install dataset-fashion-mnist)",
)


@pytest.fixture(scope="module")
def fashion_cache(tmp_path_factory):
    """Parse the Debian files once for the module into a fresh cache folder."""
    if not data.DEBIAN_FASHION_MNIST_DIR.is_dir():
        pytest.skip(f"{data.DEBIAN_FASHION_MNIST_DIR} is absent (apt-get install dataset-fashion-mnist)")
    cache = tmp_path_factory.mktemp("cache") / "fashion_mnist"
    dataset = load_image_dataset("fashion_mnist", cache_dir=cache)
    return cache, dataset


@needs_debian_files
def test_fashion_mnist_from_debian_files(fashion_cache):
    _, dataset = fashion_cache
    assert isinstance(dataset, datasets.DatasetDict)
    assert sorted(dataset) == ["test", "train"]
    assert (dataset["train"].num_rows, dataset["test"].num_rows) == (60000, 10000)
    for split in dataset.values():
        assert isinstance(split.features["image"], datasets.Image)
        assert split.features["label"].names == FASHION_MNIST_CLASSES
    image = dataset["test"][0]["image"]
    assert image.mode == "L" and image.size == (28, 28)
    # First test image of Fashion-MNIST is an ankle boot; the classes are balanced.
    assert dataset["test"][0]["label"] == FASHION_MNIST_CLASSES.index("Ankle boot")
    assert np.bincount(dataset["test"]["label"]).tolist() == [1000] * 10
    assert np.bincount(dataset["train"]["label"]).tolist() == [6000] * 10


@needs_debian_files
@pytest.mark.parametrize("alias", ["fashion-mnist", "zalando-datasets/fashion_mnist", "Fashion_MNIST"])
def test_second_call_reuses_arrow_cache(fashion_cache, alias, monkeypatch):
    cache, first = fashion_cache
    assert (cache / "dataset_dict.json").is_file()
    assert not any(p.name.startswith(".") for p in cache.parent.iterdir()), "temp folder left behind"

    def no_reparse(*_):
        raise AssertionError("the idx files were parsed again although the cache exists")

    monkeypatch.setattr(data, "_fashion_mnist_from_idx", no_reparse)
    start = time.perf_counter()
    again = load_image_dataset(alias, cache_dir=cache)
    assert time.perf_counter() - start < 3.0
    assert again["train"].num_rows == 60000
    assert again["test"][123]["label"] == first["test"][123]["label"]
    assert np.array_equal(np.asarray(again["test"][123]["image"]), np.asarray(first["test"][123]["image"]))


@needs_debian_files
def test_default_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKENPOOL_CACHE", str(tmp_path / "here"))
    assert data.default_cache_dir() == tmp_path / "here"


def test_clear_error_without_files_or_hub(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "missing")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def offline(*args, **kwargs):  # what load_dataset does offline, without trying the network
        raise ConnectionError("offline mode is enabled")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError) as info:
        load_image_dataset("fashion_mnist", cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert "online" in message and "zalando-datasets/fashion_mnist" in message
    assert not (tmp_path / "cache").exists()


def test_hub_fallback_when_debian_files_are_absent(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "missing")
    calls = []
    fake = datasets.Dataset.from_dict({"label": [0]})
    monkeypatch.setattr(datasets, "load_dataset", lambda name, **kw: calls.append((name, kw)) or fake)
    result = load_image_dataset("fashion_mnist", cache_dir=tmp_path / "cache")
    assert calls == [("zalando-datasets/fashion_mnist", {})]  # never trust_remote_code
    assert list(result) == ["train"]


def _write_images(folder, names, count=3):
    for class_index, name in enumerate(names):
        (folder / name).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(np.full((28, 28), 40 * class_index + i, dtype=np.uint8), mode="L").save(
                folder / name / f"{i}.png"
            )


def test_local_imagefolder(tmp_path):
    _write_images(tmp_path / "images", ["bag", "coat"])
    dataset = load_image_dataset(str(tmp_path / "images"))
    assert list(dataset) == ["train"]
    assert dataset["train"].num_rows == 6
    assert dataset["train"].features["label"].names == ["bag", "coat"]
    assert dataset["train"][0]["image"].size == (28, 28)


def test_local_save_to_disk_folders(tmp_path):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    images = [Image.fromarray(np.full((8, 8), v, dtype=np.uint8), mode="L") for v in (0, 255)]
    single = datasets.Dataset.from_dict({"image": images, "label": [0, 1]}, features=features)
    single.save_to_disk(str(tmp_path / "single"))
    loaded = load_image_dataset(str(tmp_path / "single"))
    assert isinstance(loaded, datasets.DatasetDict) and list(loaded) == ["train"]
    assert loaded["train"]["label"] == [0, 1]

    datasets.DatasetDict({"train": single, "test": single}).save_to_disk(str(tmp_path / "dict"))
    loaded = load_image_dataset(tmp_path / "dict")
    assert sorted(loaded) == ["test", "train"]
    assert loaded["test"].features["label"].names == ["a", "b"]


@pytest.mark.parametrize(
    "bad, match",
    [("", "got ''"), ("./no/such/folder", "no such folder"), ("a/b/c", "no such folder")],
    ids=["empty", "missing-relative-folder", "three-part-name"],
)
def test_bad_names_raise_value_error(bad, match):
    with pytest.raises(ValueError, match=match) as info:
        load_image_dataset(bad)
    assert "fashion_mnist" in str(info.value)


def test_file_and_empty_folder_raise_value_error(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        load_image_dataset(str(tmp_path / "file.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no files"):
        load_image_dataset(str(tmp_path / "empty"))


def test_to_pixel_values_equals_the_image_processor():
    processor = ViTImageProcessor(
        size={"height": 32, "width": 32}, image_mean=[FASHION_MNIST_MEAN] * 3, image_std=[FASHION_MNIST_STD] * 3
    )
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), mode="L") for _ in range(8)]
    split = datasets.Dataset.from_dict(
        {"image": images, "label": list(range(8))},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}),
    )
    pixel_values, labels = to_pixel_values(split, processor)
    expected = processor([img.convert("RGB") for img in images], return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (8, 3, 32, 32) and pixel_values.dtype == torch.float32
    torch.testing.assert_close(pixel_values, expected, atol=1e-5, rtol=0)
    assert labels.tolist() == list(range(8))


def test_find_unreadable_images_names_each_bad_file(tmp_path):
    _write_images(tmp_path / "images", ["bag", "coat"], count=4)
    truncated = tmp_path / "images" / "coat" / "1.png"
    truncated.write_bytes(truncated.read_bytes()[:50])  # the header still reads; decoding the pixels fails
    (tmp_path / "images" / "bag" / "3.png").write_bytes(b"not an image at all")
    split = load_image_dataset(str(tmp_path / "images"))["train"]
    bad = data.find_unreadable_images(split)
    assert sorted(where.split("images/")[1] for _, where, _ in bad) == ["bag/3.png", "coat/1.png"]
    assert all(split.cast_column("image", datasets.Image(decode=False))[row]["image"]["path"] == where
               for row, where, _ in bad)
    assert sorted(why.split(":")[0] for _, _, why in bad) == ["OSError", "UnidentifiedImageError"]
    # the good ones decode: nothing is flagged in a clean folder
    _write_images(tmp_path / "clean", ["bag", "coat"])
    assert data.find_unreadable_images(load_image_dataset(str(tmp_path / "clean"))["train"]) == []


def test_find_unreadable_images_in_memory_rows():
    good = Image.fromarray(np.zeros((4, 4), dtype=np.uint8), mode="L")
    split = datasets.Dataset.from_dict({"picture": [good, {"bytes": b"\x89PNG\r\n\x1a\nbroken", "path": None}, good]},
                                       features=datasets.Features({"picture": datasets.Image()}))
    bad = data.find_unreadable_images(split, "picture")
    assert [(row, where) for row, where, _ in bad] == [(1, "row 1")]
