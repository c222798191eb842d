"""The encoder contract: images in, L2-normalised float32 rows out, with an id that names
the exact weights and preprocessing so vectors of two encoders never mix."""
from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

ImageLike = "Image.Image | np.ndarray | str | Path"


@dataclass(frozen=True)
class Preprocessing:
    """Resize (shorter side to size/crop_fraction), centre crop `size`, scale to mean/std.

    Pure PIL + numpy on purpose: torchvision does not import beside the CPU torch here.
    """

    size: int = 224
    crop_fraction: float = 0.875
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    resample: str = "bicubic"

    @property
    def tag(self) -> str:
        mean = ",".join(f"{m:g}" for m in self.mean)
        std = ",".join(f"{s:g}" for s in self.std)
        return f"rgb-{self.resample}-{self.size}c{self.crop_fraction:g}-mean{mean}-std{std}"

    def __call__(self, image: Image.Image) -> np.ndarray:
        """One image -> float32 CHW array."""
        image = image.convert("RGB")
        w, h = image.size
        short = round(self.size / self.crop_fraction)
        scale = short / min(w, h)
        resized = (max(self.size, round(w * scale)), max(self.size, round(h * scale)))
        image = image.resize(resized, getattr(Image.Resampling, self.resample.upper()))
        left = (resized[0] - self.size) // 2
        top = (resized[1] - self.size) // 2
        image = image.crop((left, top, left + self.size, top + self.size))
        x = np.asarray(image, dtype=np.float32) / 255.0
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1))


def load_image(item) -> Image.Image:
    """Accept a PIL image, an HxW(x3) uint8 array or a path."""
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, np.ndarray):
        return Image.fromarray(item)
    try:
        with Image.open(item) as im:
            im.load()
            return im.copy()
    except (OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"{item} is not a readable image: {exc}") from exc


def sha256_files(paths: Iterable[Path]) -> str:
    """Hash of the weight files, in name order, so the same weights always give the same id."""
    h = hashlib.sha256()
    for p in sorted(Path(p) for p in paths):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


class Encoder(ABC):
    """A frozen image encoder.

    Subclasses set `name`, `dim`, `weights_sha256`, `preprocessing` and implement `forward`
    on a preprocessed NCHW batch; `embed` does decoding, batching, progress and normalisation.
    """

    name: str
    dim: int
    weights_sha256: str
    preprocessing: Preprocessing
    batch_size: int = 32

    @property
    def id(self) -> str:
        """name@weights-hash:preprocessing — part of every embedding and index version."""
        return f"{self.name}@{self.weights_sha256[:16]}:{self.preprocessing.tag}"

    @property
    def slug(self) -> str:
        """Filesystem-safe folder name for this encoder's embeddings and indexes."""
        return encoder_slug(self.id)

    @abstractmethod
    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """(n, 3, H, W) preprocessed -> (n, dim) raw features."""

    def embed(self, images: Sequence, progress: bool | None = None, desc: str = "embedding") -> np.ndarray:
        """Images (PIL, arrays or paths) -> float32 (n, dim), each row of unit L2 norm."""
        n = len(images)
        out = np.empty((n, self.dim), dtype=np.float32)
        show = n > self.batch_size if progress is None else progress
        with tqdm(total=n, desc=desc, unit="img", disable=not show) as bar, torch.inference_mode():
            for start in range(0, n, self.batch_size):
                chunk = images[start : start + self.batch_size]
                batch = torch.from_numpy(np.stack([self.preprocessing(load_image(x)) for x in chunk]))
                feats = self.forward(batch).float()
                out[start : start + len(chunk)] = torch.nn.functional.normalize(feats, dim=1).numpy()
                bar.update(len(chunk))
        return out


def encoder_slug(encoder_id: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", encoder_id.split("@", 1)[0]).strip("-")
    return f"{name}-{hashlib.sha256(encoder_id.encode()).hexdigest()[:12]}"


class EncoderMismatchError(ValueError):
    """Vectors of two different encoders were about to be mixed."""
