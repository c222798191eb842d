"""The ONNX Runtime backend of the default encoder gives torch's vectors, is exported once and
cached by weights hash (a damaged cache is re-exported), and embedding overlaps decoding with
encoding without changing a single bit of the result, its order or its errors."""
from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from vismem_assets.encoders import load_encoder, onnx_backend
from vismem_assets.encoders.base import Preprocessing, load_image
from vismem_assets.encoders.efficientnet import EfficientNetLite0

skimage_data = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
def onnx_encoder(onnx_cache):
    encoder = EfficientNetLite0(backend="onnx", cache_dir=onnx_cache)
    assert encoder.backend == "onnx"
    return encoder


@pytest.fixture(scope="module")
def torch_encoder(onnx_encoder):
    encoder = EfficientNetLite0(backend="torch")
    encoder.model = onnx_encoder.model  # the same weights, loaded once
    return encoder


@pytest.fixture(scope="module")
def real_images(fm_sets):
    """Fashion-MNIST PNG paths (grey, 28 x 28) and two colour photographs."""
    paths = sorted(fm_sets["test"].rglob("*.png"))[:14]
    return [*paths[:7], skimage_data.chelsea(), *paths[7:], Image.fromarray(skimage_data.coffee())]


def cached_files(directory):
    return sorted(directory.glob("*.onnx")), sorted(directory.glob("*.json"))


# ---- parity with torch ---------------------------------------------------------------------------


def test_onnx_vectors_equal_torch_vectors_on_real_images(onnx_encoder, torch_encoder, real_images):
    a = onnx_encoder.embed(real_images, progress=False)
    b = torch_encoder.embed(real_images, progress=False)
    assert a.shape == b.shape == (len(real_images), 1280) and a.dtype == b.dtype == np.float32
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert np.abs(a - b).max() <= 1e-5
    info = onnx_encoder.runtime_info()
    assert info["backend"] == "onnx" and info["inter_op_threads"] == 1
    assert info["threads"] == onnx_backend.available_cores()
    assert info["parity_max_abs_diff"] <= 1e-5


def test_raw_features_match_torch_for_any_batch_size(onnx_encoder, torch_encoder, real_images):
    batch = onnx_encoder.prepare(real_images[:5])
    with torch.inference_mode():
        expected = torch_encoder.forward(batch).numpy()
        for rows in (slice(0, 1), slice(0, 5), slice(2, 5)):
            got = onnx_encoder.forward(batch[rows]).numpy()
            assert got.shape == expected[rows].shape
            assert np.abs(got - expected[rows]).max() <= 1e-4 * np.abs(expected).max()


# ---- selection and identity ----------------------------------------------------------------------


def test_both_backends_have_the_same_id_and_the_spec_chooses(onnx_encoder, torch_encoder, onnx_cache):
    exports = onnx_backend.exports
    forced = load_encoder("efficientnet-lite0:torch")
    assert forced.backend == "torch" and forced.runtime_info()["backend"] == "torch"
    assert forced.onnx is None and onnx_backend.exports == exports  # nothing exported for torch
    assert load_encoder("efficientnet-lite0").requested_backend == "auto"
    assert load_encoder("efficientnet-lite0:onnx").requested_backend == "onnx"
    ids = {e.id for e in (onnx_encoder, torch_encoder, forced, load_encoder("efficientnet-lite0"),
                          load_encoder("efficientnet-lite0:onnx"))}
    assert len(ids) == 1
    assert {load_encoder(s).slug for s in ("efficientnet-lite0", "efficientnet-lite0:torch")} == {onnx_encoder.slug}
    assert EfficientNetLite0(backend="auto", cache_dir=onnx_cache).backend == "onnx"
    with pytest.raises(ValueError, match="unknown encoder spec"):
        load_encoder("efficientnet-lite0:tensorflow")


# ---- the cache -----------------------------------------------------------------------------------


def test_the_cache_is_reused(onnx_encoder, onnx_cache):
    (model,), (manifest,) = cached_files(onnx_cache)
    mtime = model.stat().st_mtime_ns
    exports = onnx_backend.exports
    again = EfficientNetLite0(backend="onnx", cache_dir=onnx_cache)
    assert again.backend == "onnx"
    assert onnx_backend.exports == exports and not again.onnx.exported
    assert again.onnx.path == model and model.stat().st_mtime_ns == mtime
    recorded = json.loads(manifest.read_text())
    assert recorded["weights_sha256"] == onnx_encoder.weights_sha256 and recorded["opset"] == onnx_backend.OPSET
    assert recorded["parity"]["passed"] and recorded["parity"]["max_abs_diff"] <= onnx_backend.PARITY_TOLERANCE
    assert onnx_encoder.weights_sha256[:16] in model.name  # keyed by the weights hash


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_cached_model_is_detected_and_exported_again(onnx_encoder, onnx_cache, tmp_path, real_images,
                                                               damage):
    cache = tmp_path / "cache"
    shutil.copytree(onnx_cache, cache)
    (model,), _ = cached_files(cache)
    data = bytearray(model.read_bytes())
    if damage == "flip":  # same size, a few weights changed
        data[len(data) // 2: len(data) // 2 + 64] = bytes(b ^ 0x5A for b in data[len(data) // 2: len(data) // 2 + 64])
        model.write_bytes(bytes(data))
    else:
        model.write_bytes(bytes(data[: len(data) // 3]))
    exports = onnx_backend.exports
    fresh = EfficientNetLite0(backend="onnx", cache_dir=cache)
    assert fresh.backend == "onnx" and fresh.onnx.exported and onnx_backend.exports == exports + 1
    manifest = json.loads(next(cache.glob("*.json")).read_text())
    assert onnx_backend.sha256_bytes((cache / manifest["model"]).read_bytes()) == manifest["sha256"]
    assert np.abs(fresh.embed(real_images[:3]) - onnx_encoder.embed(real_images[:3])).max() <= 1e-6


def test_failed_parity_falls_back_to_torch_and_says_so(onnx_cache, tmp_path, monkeypatch, real_images, torch_encoder):
    cache = tmp_path / "cache"
    shutil.copytree(onnx_cache, cache)
    # A tolerance nothing can meet: the recorded check no longer applies, and the new one fails.
    monkeypatch.setattr(onnx_backend, "PARITY_TOLERANCE", -1.0)
    exports = onnx_backend.exports
    auto = EfficientNetLite0(backend="auto", cache_dir=cache)
    auto.model = torch_encoder.model
    with pytest.warns(RuntimeWarning, match="running eager torch.*ParityError"):
        assert auto.backend == "torch"
    assert "differs from torch" in auto.backend_note and auto.runtime_info()["backend"] == "torch"
    assert onnx_backend.exports == exports  # the intact cached file was checked, not exported again
    assert not json.loads(next(cache.glob("*.json")).read_text())["parity"]["passed"]
    assert np.array_equal(auto.embed(real_images[:2]), torch_encoder.embed(real_images[:2]))
    with pytest.raises(onnx_backend.ParityError, match="max abs difference"):
        EfficientNetLite0(backend="onnx", cache_dir=cache).forward(torch.zeros(1, 3, 224, 224))


def test_without_onnxruntime_auto_runs_torch(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now fails
    auto = EfficientNetLite0(backend="auto", cache_dir=tmp_path)
    with pytest.warns(RuntimeWarning, match="running eager torch: ModuleNotFoundError.*onnxruntime"):
        assert auto.backend == "torch"
    with pytest.raises(ImportError):
        EfficientNetLite0(backend="onnx", cache_dir=tmp_path).onnx
    assert not list(tmp_path.iterdir())


# ---- overlapped decoding -------------------------------------------------------------------------


def test_overlapped_embed_equals_sequential_keeps_order_and_bounds_memory(onnx_encoder, real_images, monkeypatch):
    monkeypatch.setattr(onnx_encoder, "batch_size", 4)  # 16 images: 4 batches
    sequential = onnx_encoder.embed(real_images, overlap=False)

    prepare, forward = onnx_encoder.prepare, onnx_encoder.forward
    state = {"prepared": 0, "encoded": 0, "most_in_flight": 0, "threads": set()}
    lock = threading.Lock()

    def counting_prepare(chunk):
        batch = prepare(chunk)
        with lock:
            state["prepared"] += 1
            state["threads"].add(threading.current_thread().name)
            state["most_in_flight"] = max(state["most_in_flight"], state["prepared"] - state["encoded"])
        return batch

    def counting_forward(batch):
        with lock:
            state["encoded"] += 1
        return forward(batch)

    monkeypatch.setattr(onnx_encoder, "prepare", counting_prepare)
    monkeypatch.setattr(onnx_encoder, "forward", counting_forward)
    overlapped = onnx_encoder.embed(real_images, overlap=True)
    assert np.array_equal(overlapped, sequential)
    assert state["prepared"] == state["encoded"] == 4
    assert all(name.startswith("vismem-decode") for name in state["threads"])
    assert state["most_in_flight"] <= 2  # the batch being encoded and the one being decoded

    # Order: embedding the images reversed gives the same rows reversed (up to batch composition).
    reversed_rows = onnx_encoder.embed(real_images[::-1], overlap=True)
    assert np.abs(reversed_rows[::-1] - sequential).max() <= 1e-5
    assert not [t for t in threading.enumerate() if t.name.startswith("vismem-decode")]


def test_embed_overlaps_by_default_only_where_a_core_is_left_over(onnx_encoder, real_images, monkeypatch):
    """Decoding on a helper thread pays only beside a forward that leaves a core free; on the
    2-core machine this was written on, with a 2-thread forward, it made both wait."""
    monkeypatch.setattr(onnx_encoder, "batch_size", 4)
    cores = len(os.sched_getaffinity(0))
    decoded_ahead = []
    batches = onnx_encoder._batches
    monkeypatch.setattr(onnx_encoder, "_batches", lambda *a: decoded_ahead.append(1) or batches(*a))
    for threads, overlaps in ((cores, False), (cores - 1, cores > 1)):
        monkeypatch.setattr(onnx_encoder, "runtime_info", lambda t=threads: {"backend": "onnx", "threads": t})
        decoded_ahead.clear()
        onnx_encoder.embed(real_images)
        assert onnx_encoder.overlaps() is overlaps and bool(decoded_ahead) is overlaps


@pytest.mark.parametrize("overlap", [True, False])
def test_a_bad_image_in_the_middle_raises_a_value_error_naming_it(onnx_encoder, real_images, tmp_path, monkeypatch,
                                                                 overlap):
    monkeypatch.setattr(onnx_encoder, "batch_size", 4)
    bad = tmp_path / "broken-scan.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a PNG")
    images = [*real_images[:9], bad, *real_images[9:]]
    with pytest.raises(ValueError, match=r"broken-scan\.png is not a readable image"):
        onnx_encoder.embed(images, overlap=overlap)
    assert not [t for t in threading.enumerate() if t.name.startswith("vismem-decode")]


# ---- preprocessing ------------------------------------------------------------------------------


def reference_preprocessing(pre: Preprocessing, image: Image.Image) -> np.ndarray:
    """The straightforward formulation (RGB, resize, crop, scale): the fast path must equal it bit for bit."""
    image = image.convert("RGB")
    w, h = image.size
    short = round(pre.size / pre.crop_fraction)
    scale = short / min(w, h)
    resized = (max(pre.size, round(w * scale)), max(pre.size, round(h * scale)))
    image = image.resize(resized, getattr(Image.Resampling, pre.resample.upper()))
    left, top = (resized[0] - pre.size) // 2, (resized[1] - pre.size) // 2
    image = image.crop((left, top, left + pre.size, top + pre.size))
    x = np.asarray(image, dtype=np.float32) / 255.0
    x = (x - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def test_preprocessing_is_bit_identical_to_the_reference(real_images):
    rng = np.random.default_rng(0)
    pres = [Preprocessing(), Preprocessing(size=32, crop_fraction=1.0, mean=(0.485, 0.456, 0.406),
                                           std=(0.229, 0.224, 0.225), resample="bilinear"),
            Preprocessing(size=48, resample="lanczos"), Preprocessing(size=40, resample="nearest")]
    for pre in pres:
        for _ in range(4):
            h, w = rng.integers(12, 300, 2)
            rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            for image in (Image.fromarray(rgb), Image.fromarray(rgb[:, :, 0]), Image.fromarray(rgb).convert("RGBA"),
                          Image.fromarray(rgb).convert("P")):
                got = pre(image)
                assert got.dtype == np.float32 and got.flags.c_contiguous
                assert np.array_equal(got, reference_preprocessing(pre, image)), (image.mode, pre)
    for item in real_images:
        image = load_image(item)
        assert np.array_equal(Preprocessing()(image), reference_preprocessing(Preprocessing(), image))


def test_forced_onnx_does_not_warn(onnx_cache):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert EfficientNetLite0(backend="onnx", cache_dir=onnx_cache).backend == "onnx"
