"""DINOv2 and CLIP encoders on tiny randomly initialised models saved with `save_pretrained`:
the vector is the right tensor of the real model, the id follows the weights, and nothing
ever reaches for the network."""
from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

from vismem_assets.encoders import load_encoder  # noqa: E402
from vismem_assets.encoders.base import Preprocessing, load_image, sha256_files  # noqa: E402
from vismem_assets.encoders.hf import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD  # noqa: E402


def save_dinov2(path, seed=0):
    torch.manual_seed(seed)
    config = transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
    )
    transformers.Dinov2Model(config).save_pretrained(path)
    return path


def save_clip(path, seed=0):
    """A full CLIPModel (text tower included), the way public CLIP checkpoints are published."""
    torch.manual_seed(seed)
    config = transformers.CLIPConfig(
        text_config=dict(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
            vocab_size=64, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
        ),
        projection_dim=16,
    )
    transformers.CLIPModel(config).save_pretrained(path)
    return path


def images(n=5, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (40 + 3 * i, 50 - 2 * i, 3), dtype=np.uint8) for i in range(n)]


def batch_of(pre: Preprocessing, items) -> torch.Tensor:
    return torch.from_numpy(np.stack([pre(load_image(x)) for x in items]))


def unit(x: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(x.float(), dim=1).numpy()


def assert_unit_rows(vecs, n, dim):
    assert vecs.shape == (n, dim) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
    return save_dinov2(tmp_path_factory.mktemp("models") / "tiny-dinov2")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_clip(tmp_path_factory.mktemp("models") / "tiny-clip")


@pytest.mark.slow
def test_dinov2_vector_is_the_last_layer_class_token(dinov2_dir):
    enc = load_encoder(f"dinov2:{dinov2_dir}")
    assert enc.name == "dinov2:tiny-dinov2" and enc.dim == 32
    # No preprocessor config: DINOv2 defaults at the model's own image_size.
    assert enc.preprocessing == Preprocessing(size=32, crop_fraction=224 / 256, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    imgs = images()
    vecs = enc.embed(imgs)
    assert_unit_rows(vecs, len(imgs), 32)

    model = transformers.Dinov2Model.from_pretrained(dinov2_dir, local_files_only=True).eval()
    with torch.no_grad():
        hidden = model(pixel_values=batch_of(enc.preprocessing, imgs)).last_hidden_state
    np.testing.assert_allclose(vecs, unit(hidden[:, 0]), atol=1e-5)
    # The class token, not the mean of the patch tokens.
    assert not np.allclose(vecs, unit(hidden[:, 1:].mean(dim=1)), atol=1e-3)


def test_clip_vector_is_the_projected_image_embedding(clip_dir):
    enc = load_encoder(f"clip:{clip_dir}")
    assert enc.name == "clip:tiny-clip"
    assert enc.dim == 16  # projection_dim, not the vision hidden size (32)
    assert enc.preprocessing == Preprocessing(size=32, crop_fraction=1.0, mean=CLIP_MEAN, std=CLIP_STD)
    imgs = images(seed=1)
    vecs = enc.embed(imgs)
    assert_unit_rows(vecs, len(imgs), 16)

    model = transformers.CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval()
    with torch.no_grad():
        feats = model.get_image_features(pixel_values=batch_of(enc.preprocessing, imgs))
    # transformers 5 returns a model output here (projected features in pooler_output); 4 a tensor.
    feats = feats if torch.is_tensor(feats) else feats.pooler_output
    np.testing.assert_allclose(vecs, unit(feats), atol=1e-5)


def test_pil_array_and_path_inputs_give_the_same_vector(dinov2_dir, tmp_path):
    enc = load_encoder(f"dinov2:{dinov2_dir}")
    array = images(1, seed=2)[0]
    png = tmp_path / "img.png"
    Image.fromarray(array).save(png)
    vecs = enc.embed([Image.fromarray(array), array, png, str(png)])
    assert_unit_rows(vecs, 4, enc.dim)
    np.testing.assert_allclose(vecs, np.repeat(vecs[:1], 4, axis=0), atol=1e-6)


def test_preprocessor_config_is_followed_like_the_hf_processor(tmp_path):
    model_dir = save_dinov2(tmp_path / "with-processor")
    mean, std = (0.1, 0.2, 0.3), (0.3, 0.2, 0.1)
    # The torchvision-free processor; DINOv2 checkpoints name BitImageProcessor in this file.
    processor = transformers.BitImageProcessorPil(
        size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}, image_mean=mean, image_std=std
    )
    processor.save_pretrained(model_dir)
    enc = load_encoder(f"dinov2:{model_dir}")
    assert enc.preprocessing == Preprocessing(size=32, crop_fraction=32 / 40, mean=mean, std=std, resample="bicubic")

    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 80, 3), dtype=np.uint8))
    ours = enc.preprocessing(image)
    theirs = processor(images=image, return_tensors="np")["pixel_values"][0]
    assert ours.shape == theirs.shape == (3, 32, 32)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_legacy_clip_preprocessor_json(tmp_path):
    """Older CLIP checkpoints (openai/clip-vit-*) store plain ints for size and crop_size."""
    model_dir = save_clip(tmp_path / "legacy-clip")
    legacy = {
        "crop_size": 32, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD), "resample": 2, "size": 36,
    }
    (model_dir / "preprocessor_config.json").write_text(json.dumps(legacy))
    enc = load_encoder(f"clip:{model_dir}")
    assert enc.preprocessing == Preprocessing(
        size=32, crop_fraction=32 / 36, mean=CLIP_MEAN, std=CLIP_STD, resample="bilinear"
    )
    assert_unit_rows(enc.embed(images(2)), 2, 16)


def test_id_names_the_weights_and_the_model_family(tmp_path, dinov2_dir, clip_dir):
    a = load_encoder(f"dinov2:{save_dinov2(tmp_path / 'seed0' / 'tiny', seed=0)}")
    b = load_encoder(f"dinov2:{save_dinov2(tmp_path / 'seed1' / 'tiny', seed=1)}")
    assert a.weights_sha256 == sha256_files([tmp_path / "seed0" / "tiny" / "model.safetensors"])
    assert a.weights_sha256[:16] in a.id
    assert a.name == b.name and a.preprocessing == b.preprocessing
    assert a.weights_sha256 != b.weights_sha256 and a.id != b.id and a.slug != b.slug
    assert not np.allclose(a.embed(images(2)), b.embed(images(2)), atol=1e-3)

    # Same weights in another directory: same hash.
    assert load_encoder(f"dinov2:{dinov2_dir}").weights_sha256 == a.weights_sha256

    dino, clip = load_encoder(f"dinov2:{dinov2_dir}"), load_encoder(f"clip:{clip_dir}")
    assert dino.id.startswith("dinov2:") and clip.id.startswith("clip:") and dino.id != clip.id


def test_kind_must_match_the_checkpoint(dinov2_dir, tmp_path):
    with pytest.raises(ValueError, match="'dinov2' model, not a clip"):
        load_encoder(f"clip:{dinov2_dir}")
    # And a CLIP checkpoint is no DINOv2.
    with pytest.raises(ValueError, match="not a dinov2"):
        load_encoder(f"dinov2:{save_clip(tmp_path / 'clip-as-dino')}")


def test_repo_name_resolves_from_the_local_cache(tmp_path, monkeypatch, no_network):
    """A repo name is looked up in the HF cache layout (refs/main -> snapshots/<commit>), offline."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--vismem-tests--tiny-dinov2"
    save_dinov2(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    enc = load_encoder("dinov2:vismem-tests/tiny-dinov2")
    assert enc.name == "dinov2:vismem-tests/tiny-dinov2"
    assert enc.weights_sha256 == sha256_files([repo / "snapshots" / commit / "model.safetensors"])
    assert_unit_rows(enc.embed(images(2)), 2, 32)


@pytest.fixture
def no_network(monkeypatch):
    """Offline mode on, and any socket connection fails loudly."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("kind", ["dinov2", "clip"])
def test_missing_sources_fail_clearly_and_offline(kind, tmp_path, no_network):
    for source in (str(tmp_path / "no-such-model"), "vismem-tests/never-downloaded-model"):
        with pytest.raises(FileNotFoundError, match="never downloaded at run time") as err:
            load_encoder(f"{kind}:{source}")
        message = str(err.value)
        assert source in message and f"hf download {source}" in message and "save_pretrained" in message

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_encoder(f"{kind}:{empty}")

    no_weights = tmp_path / "config-only"
    no_weights.mkdir()
    (no_weights / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no .*weights"):
        load_encoder(f"{kind}:{no_weights}")
