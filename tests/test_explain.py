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


def test_png_and_html_carry_a_legend_of_colours_and_numbers(filled, fm_sets, tmp_path):
    from PIL import ImageColor

    from vismem_assets.explain import BAR_ROW, CAPTION, COLUMNS, LEGEND, MARGIN, OTHER, SAME, SWATCH, TILE, legend

    query = sorted((fm_sets["test"] / "Shirt").glob("*.png"))[0]
    (prediction,) = filled.classify([query], k=10, progress=False)
    rgb = np.asarray(Image.open(render(prediction, query, tmp_path / "why.png")).convert("RGB"))
    rows = -(-len(prediction.neighbors) // COLUMNS)
    legend_top = tile_box(0)[1] + rows * (TILE + CAPTION + MARGIN) + len(prediction.scores) * BAR_ROW + MARGIN
    swatches = rgb[legend_top:, MARGIN:MARGIN + SWATCH + 1].reshape(-1, 3)
    # Under the vote bars, a swatch in each border colour explains it.
    for colour in (SAME, OTHER):
        assert (swatches == ImageColor.getrgb(colour)).all(axis=1).any(), colour
    assert rgb.shape[0] > legend_top + len(legend()) * 12  # room for every line of it
    assert any("1/(2 + rank)" in text for _, text in legend("rank"))
    assert any("exp(sim/0.07)" in text for _, text in legend("softmax"))
    assert [text.split(":")[0] for text in LEGEND][:2] == ["green border", "red border"]
    page = render(prediction, query, tmp_path / "why.html").read_text()
    assert "w 0.500: the neighbour&#x27;s vote" in page and "green row:" in page
