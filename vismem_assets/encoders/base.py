"""The encoder contract: images in, L2-normalised float32 rows out, with an id that names
the exact weights and preprocessing so vectors of two encoders never mix."""
from __future__ import annotations

import hashlib
import os
import re
from abc import ABC, abstractmethod
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..imagesets import (MAX_ASPECT_RATIO, MAX_BYTES, ImageRefused, check_dimensions, decode_image,
                         normalise_decoded, read_bounded)

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

    @cached_property
    def lut(self) -> np.ndarray:
        """(3, 256) float32: the scaled value of every uint8 level, per channel.

        Computed with exactly the float32 operations of `(x / 255 - mean) / std`, so looking
        values up gives the same bits as computing them, at a fraction of the cost.
        """
        levels = np.arange(256, dtype=np.float32) / 255.0
        mean = np.asarray(self.mean, np.float32)[:, None]
        std = np.asarray(self.std, np.float32)[:, None]
        return np.ascontiguousarray((levels[None, :] - mean) / std)

    def __call__(self, image: Image.Image, out: np.ndarray | None = None) -> np.ndarray:
        """One image -> float32 CHW array (written into `out` when given).

        Refuses (ValueError) an aspect ratio beyond MAX_ASPECT_RATIO: the resize below would be
        unbounded (a 60000x1 image becomes 15 360 000x256). `load_image` already refuses such an
        image by name; this guards callers that pass a PIL image here directly."""
        w, h = image.size
        if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
            raise ValueError(f"image of {w}x{h} pixels exceeds the aspect-ratio bound of {MAX_ASPECT_RATIO}:1 "
                             f"(resizing its short side to {round(self.size / self.crop_fraction)} would make a huge "
                             f"image); crop it to at most {MAX_ASPECT_RATIO}:1")
        # A grey image is resized as one band: converting to RGB only copies it three times and
        # PIL resamples each band alike, so the result is the same as resizing the RGB copy.
        if image.mode != "L":
            image = image.convert("RGB")
        w, h = image.size
        short = round(self.size / self.crop_fraction)
        scale = short / min(w, h)
        resized = (max(self.size, round(w * scale)), max(self.size, round(h * scale)))
        image = image.resize(resized, getattr(Image.Resampling, self.resample.upper()))
        left = (resized[0] - self.size) // 2
        top = (resized[1] - self.size) // 2
        pixels = np.asarray(image)[top : top + self.size, left : left + self.size]  # the centre crop
        if out is None:
            out = np.empty((3, self.size, self.size), dtype=np.float32)
        lut = self.lut
        for c in range(3):
            np.take(lut[c], pixels if pixels.ndim == 2 else pixels[:, :, c], out=out[c], mode="clip")
        return out


def load_image(item) -> Image.Image:
    """Accept a PIL image, an HxW(x3) uint8 (or HxW uint16) array or a path; ValueError naming it
    when it cannot be used.

    The decoding of ingest and classify alike (`imagesets.decode_image`): a path is read as a
    regular file of at most MAX_BYTES, its size checked before decoding, EXIF orientation
    applied and 16-bit grey scaled to 8 bits. Images and arrays get the same orientation,
    16-bit scaling and aspect-ratio bound.
    """
    if isinstance(item, (Image.Image, np.ndarray)):
        image = item if isinstance(item, Image.Image) else Image.fromarray(item)
        try:
            check_dimensions(*image.size, max_pixels=None)  # decoded already: only the resize is bounded
        except ImageRefused as exc:
            raise ValueError(f"image[{image.size[0]}x{image.size[1]}] cannot be embedded: {exc}") from None
        return normalise_decoded(image)
    try:
        image, _ = decode_image(read_bounded(item, MAX_BYTES))
    except (OSError, ValueError) as exc:  # RefusedFile is an OSError, ImageRefused a ValueError
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise ValueError(f"{item} is not a readable image: {reason}") from exc
    return image


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
    # Batches decoded ahead of the one being encoded: 1 keeps at most two batches in memory.
    prefetch_batches: int = 1

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

    def prepare(self, images: Sequence) -> torch.Tensor:
        """Decode and preprocess a few images into one (n, 3, H, W) float32 batch."""
        size = self.preprocessing.size
        batch = np.empty((len(images), 3, size, size), dtype=np.float32)
        for i, item in enumerate(images):
            self.preprocessing(load_image(item), out=batch[i])
        return torch.from_numpy(batch)

    def runtime_info(self) -> dict:
        """How `forward` runs in this process (backend, threads); loads the model if needed."""
        return {"backend": "torch", "threads": torch.get_num_threads()}

    def overlaps(self) -> bool:
        """Whether `embed` decodes on a helper thread by default: only where a core is left over
        beside the forward's threads. On 2 cores with a 2-thread forward the two only wait for
        each other (measured: overlapped 0.82-0.87 of the bare forward, sequential 0.86-0.95)."""
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return cores > int(self.runtime_info().get("threads") or 1)

    def embed(self, images: Sequence, progress: bool | None = None, desc: str = "embedding",
              overlap: bool | None = None) -> np.ndarray:
        """Images (PIL, arrays or paths) -> float32 (n, dim), each row of unit L2 norm.

        With `overlap` (the default when there is more than one batch and `overlaps()`) a
        helper thread decodes and preprocesses batch i+1 while the model encodes batch i; PIL's
        decoders and resampling and numpy release the GIL, so the two really run at once. The
        rows, their order and the errors are those of the sequential path: an unreadable image
        raises the same ValueError naming it.
        """
        n = len(images)
        out = np.empty((n, self.dim), dtype=np.float32)
        show = n > self.batch_size if progress is None else progress
        starts = range(0, n, self.batch_size)
        overlap = len(starts) > 1 and self.overlaps() if overlap is None else overlap
        batches = self._batches(images, starts) if overlap else (
            (start, self.prepare(images[start : start + self.batch_size])) for start in starts)
        with tqdm(total=n, desc=desc, unit="img", disable=not show) as bar, torch.inference_mode(), \
                closing(batches):
            for start, batch in batches:
                feats = self.forward(batch).float()
                out[start : start + len(batch)] = torch.nn.functional.normalize(feats, dim=1).numpy()
                bar.update(len(batch))
        return out

    def _batches(self, images: Sequence, starts: range) -> Iterator[tuple[int, torch.Tensor]]:
        """(start, batch) in order, each prepared on a helper thread ahead of its use."""
        ahead = max(1, int(self.prefetch_batches))
        todo = iter(starts)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="vismem-decode") as pool:
            pending: deque = deque()

            def submit() -> None:
                start = next(todo, None)
                if start is not None:
                    pending.append((start, pool.submit(self.prepare, images[start : start + self.batch_size])))

            try:
                for _ in range(ahead):
                    submit()
                while pending:
                    start, future = pending.popleft()
                    batch = future.result()  # re-raises the worker's error (a ValueError naming the image)
                    submit()  # decode the next batch while the caller encodes this one
                    yield start, batch
            finally:
                for _, future in pending:  # an error or an abandoned loop: decode nothing more
                    future.cancel()


def encoder_slug(encoder_id: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", encoder_id.split("@", 1)[0]).strip("-")
    return f"{name}-{hashlib.sha256(encoder_id.encode()).hexdigest()[:12]}"


class EncoderMismatchError(ValueError):
    """Vectors of two different encoders were about to be mixed."""
