"""Image datasets for the recipes, offline first.

`load_image_dataset("fashion_mnist")` reads the Debian package `dataset-fashion-mnist`
(/usr/share/datasets/fashion-mnist/*.gz) once, turns it into a `datasets.DatasetDict` and keeps
an Arrow copy under a cache folder, so later calls are a `load_from_disk` away. Only when those
files are absent does it try the Hub copy (`zalando-datasets/fashion_mnist`).

`to_pixel_values(split, image_processor)` is the fast path that fine-tuning and benchmark
scripts share: it gives the same tensors the image processor would give image by image (same
RGB conversion, same PIL resize, same rescale and normalisation), but builds them in one go.

`find_unreadable_images(split)` decodes every image of a split once and names those PIL cannot
read, so a recipe can refuse (or drop) them before training rather than crash mid-epoch.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import datasets

FASHION_MNIST_NAMES = ("fashion_mnist", "fashion-mnist", "zalando-datasets/fashion_mnist")
FASHION_MNIST_HUB_ID = "zalando-datasets/fashion_mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
# Per-pixel statistics of the 60000 training images (grayscale, after /255); the recipes
# replicate them to the 3 channels the models see.
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530

# Where the Debian package `dataset-fashion-mnist` puts the files. Module-level so tests can
# point it somewhere else.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def default_cache_dir() -> Path:
    """`$HF_TOKENPOOL_CACHE` if set, else ~/.cache/hf_tokenpool/fashion_mnist."""
    env = os.environ.get("HF_TOKENPOOL_CACHE")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/hf_tokenpool/fashion_mnist").expanduser()


def _read_idx(path: Path) -> np.ndarray:
    """Parse an idx file (gzip): magic 0x00 0x00 dtype ndim, then ndim big-endian uint32 sizes."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte idx file (header {data[:4]!r})")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {array.size} bytes")
    return array.reshape(shape)


def _fashion_mnist_features() -> datasets.Features:
    return datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=FASHION_MNIST_CLASSES)}
    )


def _fashion_mnist_from_idx(directory: Path) -> datasets.DatasetDict:
    splits = {}
    for split, (images_file, labels_file) in _SPLIT_FILES.items():
        images = _read_idx(directory / images_file)
        labels = _read_idx(directory / labels_file)
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{directory}: {images.shape[0]} images but {labels.shape[0]} labels")
        splits[split] = datasets.Dataset.from_dict(
            {"image": [Image.fromarray(img, mode="L") for img in images], "label": labels.tolist()},
            features=_fashion_mnist_features(),
        )
    return datasets.DatasetDict(splits)


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (
        (path / "dataset_info.json").is_file() and (path / "state.json").is_file()
    )


def _as_dataset_dict(ds) -> datasets.DatasetDict:
    if isinstance(ds, datasets.DatasetDict):
        return ds
    if isinstance(ds, datasets.Dataset):
        return datasets.DatasetDict({"train": ds})
    raise ValueError(f"expected a Dataset or DatasetDict, got {type(ds).__name__}")


def _load_fashion_mnist(cache_dir) -> datasets.DatasetDict:
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if _is_saved_dataset(cache):
        return datasets.load_from_disk(str(cache))

    if all((DEBIAN_FASHION_MNIST_DIR / f).is_file() for pair in _SPLIT_FILES.values() for f in pair):
        dataset = _fashion_mnist_from_idx(DEBIAN_FASHION_MNIST_DIR)
        # Write aside, then move into place: a crash mid-write never leaves a cache that the
        # next call would take for a complete one.
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.", dir=cache.parent))
        try:
            dataset.save_to_disk(str(tmp / "data"))
            if cache.exists():  # an empty or broken folder from elsewhere; ours are complete
                shutil.rmtree(cache)
            os.replace(tmp / "data", cache)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return datasets.load_from_disk(str(cache))

    try:
        return _as_dataset_dict(datasets.load_dataset(FASHION_MNIST_HUB_ID))
    except Exception as err:
        raise RuntimeError(
            f"Fashion-MNIST is not available: the Debian files are not in {DEBIAN_FASHION_MNIST_DIR} "
            f"and the Hub copy {FASHION_MNIST_HUB_ID!r} could not be loaded ({type(err).__name__}: {err}). "
            "Either `apt-get install dataset-fashion-mnist`, or be online so that "
            f"datasets.load_dataset({FASHION_MNIST_HUB_ID!r}) can download it."
        ) from err


def load_image_dataset(name_or_path: str = "fashion_mnist", *, cache_dir=None) -> datasets.DatasetDict:
    """Load an image-classification dataset as a `DatasetDict` with `image` and `label` columns.

    Accepted `name_or_path`:
    - "fashion_mnist" (or "fashion-mnist", "zalando-datasets/fashion_mnist"): the Debian files,
      cached as Arrow under `cache_dir` (default `$HF_TOKENPOOL_CACHE` or
      ~/.cache/hf_tokenpool/fashion_mnist); the Hub copy only when those files are absent;
    - a folder written by `save_to_disk` (Dataset or DatasetDict);
    - a folder of images (`imagefolder` layout: one sub-folder per class, or split folders);
    - a Hub dataset id.
    A lone `Dataset` comes back as `DatasetDict({"train": dataset})`.
    """
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path).strip():
        raise ValueError(
            f"load_image_dataset() got {name_or_path!r}; expected 'fashion_mnist', a folder written "
            "by save_to_disk, a folder of images, or a Hub dataset id"
        )
    name = str(name_or_path)
    if name.lower() in FASHION_MNIST_NAMES:
        return _load_fashion_mnist(cache_dir)

    path = Path(name).expanduser()
    if path.is_dir():
        if _is_saved_dataset(path):
            return _as_dataset_dict(datasets.load_from_disk(str(path)))
        if not any(p.is_file() for p in path.rglob("*")):
            raise ValueError(
                f"load_image_dataset() got the folder {name!r}, which holds no files; expected a folder "
                "written by save_to_disk (dataset_dict.json, or dataset_info.json + state.json) or a "
                "folder of images"
            )
        return _as_dataset_dict(datasets.load_dataset("imagefolder", data_dir=str(path)))
    if path.exists():
        raise ValueError(
            f"load_image_dataset() got {name!r}, which is a file; expected 'fashion_mnist', a dataset "
            "folder (save_to_disk or images) or a Hub dataset id"
        )
    if name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1):
        raise ValueError(
            f"load_image_dataset() got {name!r}: no such folder, and it does not look like a Hub id "
            "('name' or 'owner/name'); expected 'fashion_mnist', an existing dataset folder or a Hub id"
        )
    return _as_dataset_dict(datasets.load_dataset(name))


def _size_of(image_processor) -> tuple[int, int]:
    size = image_processor.size
    if "height" in size and "width" in size:
        return int(size["height"]), int(size["width"])
    if "shortest_edge" in size:
        edge = int(size["shortest_edge"])
        return edge, edge
    raise ValueError(f"to_pixel_values() supports size with height/width, got {size}")


def to_uint8_pixels(dataset_split, image_processor, image_column: str = "image") -> torch.Tensor:
    """All images as uint8 [N, 3, H, W]: RGB conversion and the processor's own PIL resize.

    This is the part of the image processor that changes pixel values in 8 bits; doing it here
    with the very same PIL call keeps the fast path equal to the processor (no interpolation
    difference). Rescale and normalise are then one tensor expression (see `normalize_pixels`).
    """
    height, width = _size_of(image_processor)
    do_resize = getattr(image_processor, "do_resize", True)
    resample = getattr(image_processor, "resample", Image.BILINEAR)
    out = np.empty((len(dataset_split), height, width, 3), dtype=np.uint8)
    for i, image in enumerate(dataset_split[image_column]):
        image = image.convert("RGB")
        if do_resize and image.size != (width, height):
            image = image.resize((width, height), resample=resample)
        out[i] = np.asarray(image)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def normalize_pixels(pixels: torch.Tensor, image_processor) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float32 as the processor would: rescale, then (x - mean) / std."""
    x = pixels.float()
    if getattr(image_processor, "do_rescale", True):
        x = x * float(image_processor.rescale_factor)
    if getattr(image_processor, "do_normalize", True):
        mean = torch.tensor(image_processor.image_mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(image_processor.image_std, dtype=torch.float32).view(-1, 1, 1)
        x = (x - mean) / std
    return x


def to_pixel_values(
    dataset_split, image_processor, *, image_column: str = "image", label_column: str = "label"
) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole split as (pixel_values float32 [N, 3, H, W], labels int64 [N]).

    Equal to `image_processor([img.convert("RGB") for img in split["image"]])` up to float
    rounding, but much faster; use it for evaluation and benchmarks.
    """
    pixels = to_uint8_pixels(dataset_split, image_processor, image_column=image_column)
    labels = torch.tensor(dataset_split[label_column], dtype=torch.long)
    return normalize_pixels(pixels, image_processor), labels


def find_unreadable_images(dataset_split, image_column: str = "image") -> list[tuple[int, str, str]]:
    """Every row of `image_column` that PIL cannot decode, as (row, where, why), checked before training.

    `where` is the image's file path when the dataset has one (an image folder), else "row N". Each image
    is decoded in full (`Image.load`), so truncated files are found too, not only bad headers; this reads
    every image once (about a millisecond for a small one).
    """
    raw = dataset_split.cast_column(image_column, datasets.Image(decode=False))
    bad = []
    for start in range(0, len(raw), 1000):
        for offset, value in enumerate(raw[start : start + 1000][image_column]):
            row = start + offset
            path = (value or {}).get("path")
            try:
                if not value or (value.get("bytes") is None and not path):
                    raise ValueError("no image in this row")
                source = io.BytesIO(value["bytes"]) if value.get("bytes") is not None else path
                with Image.open(source) as image:
                    image.load()
            except Exception as err:  # PIL raises several types (UnidentifiedImageError, OSError, SyntaxError)
                bad.append((row, path or f"row {row}", f"{type(err).__name__}: {err}"))
    return bad
