"""Fashion-MNIST from the Debian package `dataset-fashion-mnist`, written out as image
folders `<set>/<label>/<n>.png` — the layout a user's own image sets have."""
from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from .settings import current as current_settings

CLASSES = ("T-shirt_top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot")
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


class DatasetMissing(FileNotFoundError):
    pass


def read_idx(path: Path) -> np.ndarray:
    """The idx format: magic (2 zero bytes, dtype code, n dims), big-endian dims, raw data."""
    with gzip.open(path) as f:
        raw = f.read()
    if raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise ValueError(f"{path} is not an idx file of unsigned bytes")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(images (n, 28, 28) uint8, labels (n,) uint8) of 'train' or 'test'."""
    data_dir = current_settings().fashion_mnist  # VISMEM_FASHION_MNIST
    images, labels = (data_dir / name for name in FILES[split])
    if not images.exists():
        raise DatasetMissing(
            f"Fashion-MNIST is not at {data_dir}. Install it with `sudo apt-get install dataset-fashion-mnist` "
            "(or `make setup` as root), or point VISMEM_FASHION_MNIST at a folder holding the four idx .gz files"
        )
    return read_idx(images), read_idx(labels)


def sample_indices(labels: np.ndarray, n: int, seed: int, classes: tuple[int, ...] | None = None,
                   exclude: np.ndarray | None = None) -> np.ndarray:
    """n indices, balanced over the chosen classes, reproducible from the seed."""
    classes = tuple(range(len(CLASSES))) if classes is None else classes
    rng = np.random.default_rng(seed)
    per_class = [n // len(classes) + (i < n % len(classes)) for i in range(len(classes))]
    picked = []
    for c, m in zip(classes, per_class):
        pool = np.flatnonzero(labels == c)
        if exclude is not None:
            pool = np.setdiff1d(pool, exclude)
        picked.append(rng.choice(pool, size=m, replace=False))
    return np.sort(np.concatenate(picked))


def write_image_folders(out: Path, split: str, n: int, seed: int = 0, classes: tuple[int, ...] | None = None,
                        exclude: np.ndarray | None = None) -> np.ndarray:
    """Write n images of a split as `out/<label>/<split>-<index>.png`; returns the indices used."""
    images, labels = load(split)
    idx = sample_indices(labels, n, seed, classes, exclude)
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    for i in idx:
        folder = out / CLASSES[labels[i]]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(folder / f"{split}-{i:05d}.png")
    return idx
