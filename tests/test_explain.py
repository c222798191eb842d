"""An explanation shows exactly the neighbours classification used."""
import json

import numpy as np
import pytest
from PIL import Image

from vismem_assets.explain import QUERY_BOX, TEXT_KEY, _thumb, render, tile_box


@pytest.fixture(scope="module")
def filled(tmp_path_factory, encoder, fm_sets):
    from vismem_assets.memory import Memory

    memory = Memory(tmp_path_factory.mktemp("explain") / "home", encoder=encoder)
    memory.add(fm_sets["train"], progress=False)
    return memory


def test_png_shows_the_neighbours_classification_used(filled, fm_sets, tmp_path):
    query = sorted((fm_sets["test"] / "Sneaker").glob("*.png"))[0]
    (prediction,) = filled.classify([query], k=7, progress=False)
    out = render(prediction, query, tmp_path / "why.png")
    page = Image.open(out)
    shown = json.loads(page.text[TEXT_KEY])
    assert [n["sample_id"] for n in shown["neighbors"]] == [n.sample_id for n in prediction.neighbors]
    assert shown["label"] == prediction.label
    rgb = np.asarray(page.convert("RGB"))

    def tile(box):
        left, top, right, bottom = box
        return rgb[top:bottom, left:right]

    assert np.array_equal(tile(QUERY_BOX), np.asarray(_thumb(query)))
    for i, neighbor in enumerate(prediction.neighbors):
        # The pixels in tile i are the stored image of neighbour i, and nothing else.
        assert np.array_equal(tile(tile_box(i)), np.asarray(_thumb(neighbor.image_path))), i
    others = [n for n in filled.catalog().image_paths if filled.layout.absolute(n).as_posix()
              not in {nb.image_path for nb in prediction.neighbors}]
    assert not np.array_equal(tile(tile_box(0)), np.asarray(_thumb(filled.layout.absolute(others[0]))))


def test_html_lists_the_same_neighbours_and_votes(filled, fm_sets, tmp_path):
    query = sorted((fm_sets["test"] / "Bag").glob("*.png"))[0]
    (prediction,) = filled.classify([query], k=5, progress=False)
    text = render(prediction, query, tmp_path / "why.html").read_text()
    for n in prediction.neighbors:
        assert n.sample_id[:16] in text
    assert text.count("data:image/png;base64,") == 1 + len(prediction.neighbors)
    for label in prediction.scores:
        assert f"<td>{label}</td>" in text
    with pytest.raises(ValueError, match=".png or .html"):
        render(prediction, query, tmp_path / "why.pdf")
