"""Explanations a person can look at: the query beside the neighbours that decided it, each
with its label, similarity, vote weight and pruning factor, and the final vote per label.

PNG pages are laid out on a fixed grid with PIL (tile i of the neighbours sits at a known
place), and carry the explanation as JSON in a PNG text chunk, so a program can check that
the picture shows exactly the neighbours classification used. HTML pages inline every image.
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from .encoders.base import load_image

TILE = 128          # pixels per image tile
CAPTION = 46        # pixels of text under each neighbour tile
COLUMNS = 5
MARGIN = 12
BAR_ROW = 18
LEGEND_ROW = 18
LEGEND_FONT = 12    # a little larger than the captions: it is read, not scanned
SWATCH = 10
TEXT_KEY = "vismem:explanation"
SAME, OTHER = "green", "firebrick"   # border of a neighbour with the predicted label / with another

# What each vote strategy gives a neighbour before pruning (voting.py).
STRATEGY_WEIGHT = {"rank": "1/(2 + rank)", "softmax": "exp(sim/0.07)", "distance": "exp(-(1 - sim))",
                   "plurality": "1"}


def legend(strategy: str = "rank") -> list[tuple[str | None, str]]:
    """How to read a page, line by line: (border colour it explains, or None; text)."""
    weight = STRATEGY_WEIGHT.get(strategy, f"the {strategy} weight")
    return [
        (SAME, "green border: the neighbour's label is the prediction"),
        (OTHER, "red border: the neighbour has another label"),
        (None, "#0 Coat: the neighbour's rank (#0 = nearest) and its stored label"),
        (None, "sim 0.912: cosine similarity to the query (1 = the same image)"),
        (None, f"w 0.500: the neighbour's vote = its {strategy} weight {weight} x its pruning factor"
               " x its user weight (vismem weight; 1 unless set)"),
        (None, "x1.00: pruning factor (1 = trusted, below 1 = down-weighted as unreliable, 0 = excluded)"),
        (None, "bars: each label's summed vote, the longest wins; confidence = its share of all votes"),
    ]


# The same as text (the gallery's markdown, the HTML page).
LEGEND = [text for _, text in legend()]


def tile_box(i: int) -> tuple[int, int, int, int]:
    """Where neighbour i's image sits on the page (left, top, right, bottom)."""
    row, col = divmod(i, COLUMNS)
    left = MARGIN + col * (TILE + MARGIN)
    top = 2 * MARGIN + TILE + 40 + row * (TILE + CAPTION + MARGIN)
    return left, top, left + TILE, top + TILE


QUERY_BOX = (MARGIN, MARGIN, MARGIN + TILE, MARGIN + TILE)


def _thumb(image) -> Image.Image:
    return load_image(image).convert("RGB").resize((TILE, TILE), Image.Resampling.NEAREST)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: float) -> list[str]:
    """Words into lines no wider than `width` pixels."""
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and draw.textlength(candidate, font=font) > width:
            lines.append(line)
            candidate = word
        line = candidate
    return lines + ([line] if line else [])


def render_png(prediction, query_image, out: str | Path, strategy: str = "rank") -> Path:
    """`strategy`: the vote that made the prediction, named in the legend."""
    font = ImageFont.load_default()
    n = len(prediction.neighbors)
    rows = max(1, -(-n // COLUMNS))
    votes = sorted(prediction.scores.items(), key=lambda kv: -kv[1])
    width = MARGIN + COLUMNS * (TILE + MARGIN)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    key_font = ImageFont.load_default(size=LEGEND_FONT)
    text_x = MARGIN + SWATCH + 6
    key = [(colour, line) for colour, text in legend(strategy)
           for line in _wrap(measure, text, key_font, width - text_x - MARGIN)]
    legend_top = tile_box(0)[1] + rows * (TILE + CAPTION + MARGIN) + len(votes) * BAR_ROW + MARGIN
    height = legend_top + (len(key) + 1) * LEGEND_ROW + 2 * MARGIN
    page = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(page)
    page.paste(_thumb(query_image), QUERY_BOX[:2])
    x = QUERY_BOX[2] + MARGIN
    draw.text((x, MARGIN), f"query: {Path(str(prediction.path)).name}", fill="black", font=font)
    verdict = prediction.label if prediction.label is not None else "(no vote)"
    draw.text((x, MARGIN + 18), f"prediction: {verdict}", fill="black", font=font)
    draw.text((x, MARGIN + 36), f"confidence: {prediction.confidence:.2f}", fill="black", font=font)
    draw.text((MARGIN, QUERY_BOX[3] + 14), f"{n} nearest neighbours (best first):", fill="black", font=font)
    for i, nb in enumerate(prediction.neighbors):
        left, top, right, bottom = tile_box(i)
        page.paste(_thumb(nb.image_path), (left, top))
        color = SAME if nb.label == prediction.label else OTHER
        draw.rectangle((left - 2, top - 2, right + 1, bottom + 1), outline=color, width=2)
        draw.text((left, bottom + 3), f"#{nb.rank} {nb.label}", fill=color, font=font)
        draw.text((left, bottom + 17), f"sim {nb.similarity:.3f}", fill="black", font=font)
        draw.text((left, bottom + 31), f"w {nb.weight:.3f} x{nb.pruning_factor:.2f}", fill="black", font=font)
    top = tile_box(0)[1] + rows * (TILE + CAPTION + MARGIN)
    best = max((s for _, s in votes), default=1.0) or 1.0
    for j, (label, score) in enumerate(votes):
        y = top + j * BAR_ROW
        draw.text((MARGIN, y), label[:16], fill="black", font=font)
        bar = int((width - 220) * score / best)
        draw.rectangle((130, y + 2, 130 + bar, y + BAR_ROW - 4),
                       fill="green" if label == prediction.label else "lightgray")
        draw.text((136 + bar, y), f"{score:.3f}", fill="black", font=font)
    draw.line((MARGIN, legend_top - MARGIN // 2, width - MARGIN, legend_top - MARGIN // 2), fill="lightgray")
    draw.text((MARGIN, legend_top), "How to read this page", fill="black", font=key_font)
    shown = set()
    for j, (colour, line) in enumerate(key, start=1):
        y = legend_top + j * LEGEND_ROW
        if colour and colour not in shown:  # a bordered swatch in the colour it explains
            shown.add(colour)
            draw.rectangle((MARGIN, y + 2, MARGIN + SWATCH, y + 2 + SWATCH), outline=colour, width=2)
        draw.text((text_x, y), line, fill="black", font=key_font)
    info = PngInfo()
    info.add_text(TEXT_KEY, json.dumps(prediction.to_dict(), default=str))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    page.save(out, pnginfo=info)
    return out


def _data_uri(image) -> str:
    buf = io.BytesIO()
    _thumb(image).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def render_html(prediction, query_image, out: str | Path) -> Path:
    rows = "\n".join(
        f"<tr class='{'same' if nb.label == prediction.label else 'other'}'><td>{nb.rank}</td>"
        f"<td><img src='{_data_uri(nb.image_path)}' width='{TILE}'></td><td>{html.escape(nb.label)}</td>"
        f"<td>{nb.similarity:.4f}</td><td>{nb.weight:.4f}</td><td>{nb.pruning_factor:.3f}</td>"
        f"<td><code>{nb.sample_id[:16]}…</code></td></tr>" for nb in prediction.neighbors)
    votes = "\n".join(f"<tr><td>{html.escape(label)}</td><td>{score:.4f}</td></tr>"
                      for label, score in sorted(prediction.scores.items(), key=lambda kv: -kv[1]))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>vismem: why {html.escape(str(prediction.label))}</title>
<style>body{{font-family:sans-serif;margin:1.5em}} td,th{{padding:4px 10px;text-align:left}}
tr.same td{{background:#e8f5e9}} tr.other td{{background:#fdecea}}</style></head><body>
<h1>{html.escape(str(prediction.label))} <small>(confidence {prediction.confidence:.2f})</small></h1>
<p><img src="{_data_uri(query_image)}" width="{TILE}"><br>query: {html.escape(str(prediction.path))}</p>
<p><small>{"<br>".join(html.escape(line.replace(" border:", " row:")) for line in LEGEND)}</small></p>
<h2>Vote per label</h2><table><tr><th>label</th><th>vote</th></tr>{votes}</table>
<h2>Neighbours</h2><table><tr><th>rank</th><th>image</th><th>label</th><th>similarity</th><th>vote weight</th>
<th>pruning factor</th><th>sample</th></tr>{rows}</table>
<script type="application/json" id="explanation">{html.escape(json.dumps(prediction.to_dict(), default=str))}</script>
</body></html>"""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    return out


def render(prediction, query_image, out: str | Path, strategy: str = "rank") -> Path:
    """PNG or HTML, by the file's suffix. `strategy`: the vote that made the prediction (PNG legend)."""
    suffix = Path(out).suffix.lower()
    if suffix == ".png":
        return render_png(prediction, query_image, out, strategy=strategy)
    if suffix in (".html", ".htm"):
        return render_html(prediction, query_image, out)
    raise ValueError(f"explanations are written as .png or .html, not {suffix or 'no suffix'}")
