"""DINOv2 and CLIP image encoders through `transformers`, strictly offline.

A source is a directory written by `save_pretrained` or a Hugging Face repo name already in
the local cache. Nothing is downloaded here: a run must never depend on the network, and
weights that change behind a name would silently change every vector.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .base import Encoder, Preprocessing, sha256_files

KINDS = ("dinov2", "clip")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
# Defaults when a model comes without preprocessor_config.json: (mean, std, crop_fraction).
DEFAULTS = {"dinov2": (IMAGENET_MEAN, IMAGENET_STD, 224 / 256), "clip": (CLIP_MEAN, CLIP_STD, 1.0)}
# preprocessor configs store PIL's integer resampling codes.
PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def resolve_source(source: str) -> tuple[Path, str]:
    """A directory or a cached repo name -> (model directory, identifier for the encoder name)."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} holds no config.json: pass a directory written by `save_pretrained` "
                "(config.json plus *.safetensors or *.bin weights)"
            )
        return path, path.resolve().name

    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE
    from huggingface_hub.errors import HFValidationError

    try:
        # local_files_only: look in the cache, never ask the Hub.
        return Path(snapshot_download(source, local_files_only=True)), source
    except (FileNotFoundError, HFValidationError) as exc:  # LocalEntryNotFoundError is a FileNotFoundError
        raise FileNotFoundError(
            f"model {source!r} is neither a directory nor in the local Hugging Face cache ({HF_HUB_CACHE}). "
            "Models are never downloaded at run time: download it beforehand on a machine with network "
            f"(`hf download {source}`, or `huggingface-cli download {source}`) and bring the cache over "
            "(HF_HOME/HF_HUB_CACHE), or pass a directory holding config.json and the weights written by "
            "`save_pretrained`."
        ) from exc


def _edge(value) -> int | None:
    """HF sizes come as an int (old configs) or a dict: shortest_edge, or height/width."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return int(value)
    if "shortest_edge" in value:
        return int(value["shortest_edge"])
    if "height" in value and "width" in value:
        return min(int(value["height"]), int(value["width"]))
    return None


def preprocessing_for(directory: Path, kind: str, image_size: int) -> Preprocessing:
    """The model's own preprocessor_config.json mapped onto `Preprocessing`, else the family's
    defaults at the model's configured image_size (tiny test models use small sizes)."""
    mean, std, crop_fraction = DEFAULTS[kind]
    path = directory / "preprocessor_config.json"
    if not path.is_file():
        return Preprocessing(size=int(image_size), crop_fraction=crop_fraction, mean=mean, std=std, resample="bicubic")
    cfg = json.loads(path.read_text())
    short = _edge(cfg.get("size"))
    crop = _edge(cfg.get("crop_size")) if cfg.get("do_center_crop", True) else None
    size = crop or short or int(image_size)
    if cfg.get("do_normalize", True):
        mean = tuple(float(m) for m in cfg.get("image_mean", mean))
        std = tuple(float(s) for s in cfg.get("image_std", std))
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    resample = cfg.get("resample", 3)
    resample = PIL_RESAMPLE.get(resample, "bicubic") if isinstance(resample, int) else str(resample).lower()
    return Preprocessing(size=size, crop_fraction=size / short if short else 1.0, mean=mean, std=std, resample=resample)


def _load_model(kind: str, directory: Path) -> tuple[torch.nn.Module, int, int]:
    """(model in eval mode and float32, configured image size, feature dim)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    if kind == "dinov2":
        cls, expected = transformers.Dinov2Model, ("dinov2",)
    else:
        cls, expected = transformers.CLIPVisionModelWithProjection, ("clip", "clip_vision_model")
        if config.model_type == "clip":
            # A full CLIP checkpoint keeps projection_dim on the top config; in transformers 5 the
            # vision sub-config does not inherit it (it would default to 512 and fail to load).
            config.vision_config.projection_dim = config.projection_dim
            config = config.vision_config
    if config.model_type not in expected:
        raise ValueError(f"{directory} holds a {config.model_type!r} model, not a {kind} one")

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # a full CLIP checkpoint reports its text tower as unexpected
    try:
        model, info = cls.from_pretrained(
            directory, config=config, local_files_only=True, dtype=torch.float32, output_loading_info=True
        )
    finally:
        transformers.logging.set_verbosity(verbosity)
    if info["missing_keys"] or info["mismatched_keys"]:
        # transformers would fill these randomly: vectors from such a model mean nothing.
        bad = sorted(map(str, [*info["missing_keys"], *info["mismatched_keys"]]))
        raise ValueError(f"{directory}: weights do not fit {cls.__name__}; missing or mismatched: {bad[:5]}")
    dim = config.hidden_size if kind == "dinov2" else config.projection_dim
    return model.eval(), int(config.image_size), int(dim)


class HFImageEncoder(Encoder):
    """DINOv2: last layer's class token (after the final layernorm). CLIP: projected image_embeds."""

    def __init__(self, kind: str, source: str):
        if kind not in KINDS:
            raise ValueError(f"unknown transformers encoder kind {kind!r}: use one of {KINDS}")
        directory, identifier = resolve_source(source)
        weights = [*directory.glob("*.safetensors"), *directory.glob("*.bin")]
        if not weights:
            raise FileNotFoundError(f"{directory} holds no *.safetensors or *.bin weights")
        self.kind = kind
        self.name = f"{kind}:{identifier}"
        self.weights_sha256 = sha256_files(weights)
        self.model, image_size, self.dim = _load_model(kind, directory)
        self.preprocessing = preprocessing_for(directory, kind, image_size)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=batch.to(torch.float32))
        return out.last_hidden_state[:, 0] if self.kind == "dinov2" else out.image_embeds


def load_hf_encoder(kind: str, source: str) -> Encoder:
    """`kind` is 'dinov2' or 'clip'; `source` a save_pretrained directory or a cached repo name."""
    return HFImageEncoder(kind, source)
