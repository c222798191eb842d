"""ONNX Runtime for a torch encoder: exported once from the same weights, cached, checked.

The exported graph computes exactly the torch `forward` (pooled features, before
normalisation) with a dynamic batch axis. It is cached under `onnx_cache_dir()`, keyed by
the weights' sha256, the exporter (torch version, TorchScript-based) and the opset:

    <cache>/<key>.json                 manifest: model file, its sha256, parity result
    <cache>/<key>-<sha256[:16]>.onnx   the model, named by its own content

Both are written atomically, the model first, so a manifest only ever names a complete file;
two processes exporting at once each write a whole file and the last manifest wins.

At first use of an exported file, ONNX Runtime's output is compared with torch's on a few
inputs (max abs difference of the L2-normalised features must be at most
`PARITY_TOLERANCE`); the result goes into the manifest, and the check runs again whenever the
torch or onnxruntime version differs from the one recorded. Every load verifies the file's
sha256 against the manifest, so a damaged or swapped file is re-exported, never used.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..atomic import write_bytes_atomic
from ..settings import current as current_settings

log = logging.getLogger(__name__)

OPSET = 17
EXPORTER = "torchscript"  # torch.onnx.export(dynamo=False): needs only `onnx`, not onnxscript
GRAPH_VERSION = 1  # bump when the exported graph changes for the same weights
PARITY_TOLERANCE = 1e-4
INPUT, OUTPUT = "pixels", "features"

exports = 0  # exports done by this process (tests check that the cache is reused)


class ParityError(RuntimeError):
    """ONNX Runtime's features differ from torch's by more than the tolerance."""


def onnx_cache_dir() -> Path:
    """$VISMEM_CACHE/onnx, else $XDG_CACHE_HOME/vismem/onnx, else ~/.cache/vismem/onnx (the
    process's settings: an encoder is loaded deep inside, not handed them)."""
    return current_settings().cache_root() / "onnx"


def available_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def default_threads() -> int:
    """Intra-op threads: $VISMEM_ONNX_THREADS if set, else every core available to the process."""
    value = current_settings().onnx_threads
    return max(1, value) if value is not None else available_cores()


def versions() -> dict[str, str]:
    import onnxruntime

    return {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__}


def cache_key(name: str, weights_sha256: str) -> str:
    raw = f"{name}-{weights_sha256[:16]}-torch{torch.__version__}-{EXPORTER}-opset{OPSET}-g{GRAPH_VERSION}"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", raw)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def export_onnx(module: torch.nn.Module, size: int) -> bytes:
    """The module as ONNX bytes: input (batch, 3, size, size) float32, output (batch, dim)."""
    global exports
    dummy = torch.zeros(2, 3, size, size)
    with tempfile.TemporaryDirectory(prefix="vismem-onnx-") as tmp, warnings.catch_warnings():
        # The legacy exporter announces its deprecation and notes constant-folding limits;
        # neither changes the graph's results, which the parity check verifies anyway.
        warnings.simplefilter("ignore")
        path = Path(tmp) / "model.onnx"
        torch.onnx.export(
            module.eval(), (dummy,), str(path), dynamo=False, opset_version=OPSET,
            input_names=[INPUT], output_names=[OUTPUT],
            dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
            do_constant_folding=True, export_params=True,
        )
        data = path.read_bytes()
    exports += 1
    return data


def make_session(model: bytes, threads: int):
    """A CPU session: `threads` intra-op threads, one inter-op thread, all graph optimisations,
    and worker threads that sleep rather than spin between operators."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1  # the graph is one chain of convolutions: nothing to run side by side
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning workers burn the core that decodes the next batch (Encoder.embed overlaps the two)
    # and lose whole time slices on a shared machine; measured here (2 cores, other jobs running)
    # the bare forward was as fast or faster without it, and the overlapped path clearly faster.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])


def parity_inputs(preprocess: Callable[[np.ndarray], np.ndarray], size: int) -> np.ndarray:
    """Four inputs: two structured images through the real preprocessing, two of noise."""
    yy, xx = np.mgrid[0:300, 0:400].astype(np.float32)
    rings = 127.5 + 127.5 * np.sin(np.hypot(yy - 140, xx - 210) / 9.0)
    stripes = 127.5 + 127.5 * np.cos(xx / 13.0 + yy / 29.0)
    images = [np.dstack([rings, stripes, (rings + stripes) / 2]), np.dstack([stripes, 255 - rings, rings])]
    real = [preprocess(np.clip(im, 0, 255).astype(np.uint8)) for im in images]
    noise = np.random.default_rng(0).uniform(-1, 1, (2, 3, size, size)).astype(np.float32)
    return np.concatenate([np.stack(real), noise])


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def parity(session, module: torch.nn.Module, inputs: np.ndarray) -> float:
    """Max abs difference of normalised features, ONNX against torch, over batches of 1 and n-1."""
    with torch.inference_mode():
        expected = _unit(module(torch.from_numpy(inputs)).float().numpy())
    got = np.concatenate([session.run([OUTPUT], {INPUT: inputs[:1]})[0],
                          session.run([OUTPUT], {INPUT: inputs[1:]})[0]])
    if got.shape != expected.shape:
        return math.inf
    return float(np.abs(_unit(got) - expected).max())


@dataclass
class OnnxFeatures:
    """A ready ONNX Runtime session computing an encoder's raw features."""

    session: object
    path: Path | None
    threads: int
    manifest: dict = field(default_factory=dict)
    exported: bool = False  # exported in this process (else read from the cache)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([OUTPUT], {INPUT: np.ascontiguousarray(batch, dtype=np.float32)})[0]

    def info(self) -> dict:
        return {"backend": "onnx", "threads": self.threads, "inter_op_threads": 1, "spinning": False,
                "model": str(self.path),
                "exported": self.exported, "parity_max_abs_diff": self.manifest.get("parity", {}).get("max_abs_diff"),
                "onnxruntime": self.manifest.get("parity", {}).get("onnxruntime")}


def _read_cached(directory: Path, key: str) -> tuple[dict, bytes] | tuple[None, str]:
    """(manifest, model bytes) when the cache holds an intact model, else (None, why not)."""
    manifest_path = directory / f"{key}.json"
    if not manifest_path.is_file():
        return None, "not cached yet"
    try:
        manifest = json.loads(manifest_path.read_text())
        data = (directory / manifest["model"]).read_bytes()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, f"cache unreadable ({exc})"
    if sha256_bytes(data) != manifest.get("sha256"):
        return None, f"cached model {manifest['model']} does not match its recorded sha256 (damaged or replaced)"
    return manifest, data


def _write_manifest(directory: Path, key: str, manifest: dict) -> None:
    write_bytes_atomic(directory / f"{key}.json", (json.dumps(manifest, indent=2) + "\n").encode())


def _prune(directory: Path, key: str, keep: str, older_than_s: float = 600.0) -> None:
    """Remove this key's other model files once they are old enough to be no one's fresh export."""
    now = time.time()
    for path in directory.glob(f"{key}-*.onnx"):
        try:
            if path.name != keep and now - path.stat().st_mtime > older_than_s:
                path.unlink()
        except OSError:
            pass


def load_onnx_features(name: str, weights_sha256: str, module: Callable[[], torch.nn.Module], size: int,
                       preprocess: Callable[[np.ndarray], np.ndarray], cache_dir: Path | None = None,
                       threads: int | None = None) -> OnnxFeatures:
    """The cached ONNX model of `module()` (exported if missing or damaged), parity-checked.

    `module` is called only when torch is needed (export or parity check). Raises ParityError
    when ONNX Runtime's features differ from torch's by more than PARITY_TOLERANCE.
    """
    directory = Path(cache_dir) if cache_dir is not None else onnx_cache_dir()
    threads = threads or default_threads()
    key = cache_key(name, weights_sha256)
    now = versions()

    manifest, cached = _read_cached(directory, key)
    if manifest is not None:
        try:
            session = make_session(cached, threads)
        except Exception as exc:  # intact bytes ONNX Runtime refuses: export again
            manifest, cached = None, f"cached model rejected by onnxruntime ({exc})"
    exported = manifest is None
    if exported:
        log.info("exporting %s to ONNX in %s: %s", name, directory, cached)  # `cached` says why
        data = export_onnx(module(), size)
        digest = sha256_bytes(data)
        model_name = f"{key}-{digest[:16]}.onnx"
        manifest = {"model": model_name, "sha256": digest, "name": name, "weights_sha256": weights_sha256,
                    "exporter": f"torch-{torch.__version__}-{EXPORTER}", "opset": OPSET, "graph_version": GRAPH_VERSION,
                    "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        try:
            write_bytes_atomic(directory / model_name, data)
            path = directory / model_name
        except OSError as exc:  # an unwritable cache costs the export each time, nothing else
            warnings.warn(f"could not cache the ONNX model in {directory}: {exc}", RuntimeWarning, stacklevel=2)
            path = None
        session = make_session(data, threads)
    else:
        path = directory / manifest["model"]

    checked = manifest.get("parity") or {}
    if checked.get("torch") != now["torch"] or checked.get("onnxruntime") != now["onnxruntime"] \
            or checked.get("tolerance") != PARITY_TOLERANCE:
        diff = parity(session, module(), parity_inputs(preprocess, size))
        manifest["parity"] = checked = {**now, "max_abs_diff": diff, "tolerance": PARITY_TOLERANCE,
                                        "passed": bool(diff <= PARITY_TOLERANCE),
                                        "checked_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if path is not None:
            try:
                _write_manifest(directory, key, manifest)
                if exported:
                    _prune(directory, key, keep=manifest["model"])
            except OSError as exc:
                warnings.warn(f"could not write the ONNX cache manifest in {directory}: {exc}", RuntimeWarning,
                              stacklevel=2)
    if not checked.get("passed"):
        raise ParityError(
            f"ONNX Runtime {now['onnxruntime']} differs from torch {now['torch']} on {name}: max abs difference "
            f"of normalised features {checked.get('max_abs_diff'):.3g} > {PARITY_TOLERANCE:g} (model {path})"
        )
    return OnnxFeatures(session=session, path=path, threads=threads, manifest=manifest, exported=exported)
