"""What vismem reads and how it decodes it (issue 15, findings 1, 3 and 11).

- A tiny PNG with an extreme aspect ratio (60000x1, ~140 bytes) passes the pixel bound but
  would be resized to 15 360 000x256 by the encoder: it is quarantined at ingest, and the
  encoder (classify, embed, preprocessing) refuses it by name. Run under a 4 GiB address-space
  limit, so the old behaviour (a 20+ GB allocation) shows as a MemoryError, not an OOM kill.
- Special files: a FIFO named *.jpg and a symlink to /dev/zero in a label folder are refused
  ("not a regular file") by the add, by check_image, by load_image and by forget's image_hash,
  without blocking or reading without end. Run in a child with a timeout.
- 16-bit PNGs are scaled to 8 bits (not clipped to white) and EXIF orientation is applied,
  at ingest and classify alike, while the sample id stays the sha256 of the file's bytes.

Real files, the real default encoder, real subprocesses.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vismem_assets.fashion_mnist import load
from vismem_assets.imagesets import MAX_ASPECT_RATIO, SourceFile, check_image

REPO = Path(__file__).resolve().parents[1]
MEMORY_LIMIT = 4 * 1024 ** 3  # the child's address space: torch + the encoder take ~1.2 GB of it


def run_child(script: str, *args, timeout: float) -> dict:
    """Run `script` in a fresh interpreter; it prints one JSON line last. Fails on a non-zero exit."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fm_picture(index: int = 0, split: str = "test") -> np.ndarray:
    images, _ = load(split)
    return images[index]


def write_fm_set(root: Path, n: int = 3, label: str = "Bag") -> list[Path]:
    images, _ = load("test")
    (root / label).mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        paths.append(root / label / f"fm-{i}.png")
        Image.fromarray(images[i]).save(paths[-1])
    return paths


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


# ---- finding 1: decoded-size bombs -----------------------------------------------------------

BOMB_CHILD = r"""
import json, resource, sys
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))  # before anything is imported or allocated
from pathlib import Path
from PIL import Image
from vismem_assets.encoders import load_encoder
from vismem_assets.memory import Memory

set_dir, home, bombs = Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:]
encoder = load_encoder("efficientnet-lite0")
memory = Memory(home, encoder=encoder)
report = memory.add(set_dir)
out = {"added": report.ingest.added, "quarantined": report.ingest.quarantined, "n_vectors": report.n_vectors}

def error(call):
    try:
        call()
    except ValueError as exc:
        return str(exc)
    return None

out["embed"] = [error(lambda b=b: encoder.embed([b], progress=False)) for b in bombs]
out["classify"] = error(lambda: memory.classify([bombs[0]], k=1))
out["preprocessing"] = error(lambda: encoder.preprocessing(Image.new("L", (60000, 1))))
print(json.dumps(out))
"""


@pytest.mark.slow
def test_aspect_ratio_bombs_are_quarantined_and_refused_by_the_encoder_within_a_memory_limit(tmp_path):
    """60000x1 and 2x40000 PNGs of ~140 bytes: quarantined with a reason naming the bound, and
    embed/classify/preprocessing raise a ValueError naming the file and the bound, all in a
    process limited to 4 GiB (the old code resized them to ~15 GB images: MemoryError here)."""
    set_dir = tmp_path / "set"
    write_fm_set(set_dir, n=2)
    bombs = [set_dir / "Bag" / "wide.png", set_dir / "Bag" / "tall.png"]
    Image.new("L", (60000, 1), 128).save(bombs[0])
    Image.new("RGB", (2, 40000), (9, 99, 199)).save(bombs[1])
    assert max(b.stat().st_size for b in bombs) < 1000  # tiny files, and under the pixel bound
    assert 60000 * 1 < 50_000_000

    out = run_child(BOMB_CHILD, MEMORY_LIMIT, set_dir, tmp_path / "home", *bombs, timeout=300)

    assert out["added"] == 2 and out["n_vectors"] == 2
    reasons = {q["name"]: q["reason"] for q in out["quarantined"]}
    assert set(reasons) == {"Bag/wide.png", "Bag/tall.png"}
    assert all(f"{MAX_ASPECT_RATIO}:1" in r and "aspect ratio" in r for r in reasons.values()), reasons
    assert "60000x1" in reasons["Bag/wide.png"] and "2x40000" in reasons["Bag/tall.png"]
    for bomb, message in zip(bombs, out["embed"]):
        assert message and str(bomb) in message and f"{MAX_ASPECT_RATIO}:1" in message, message
    assert out["classify"] and str(bombs[0]) in out["classify"] and "aspect ratio" in out["classify"]
    assert out["preprocessing"] and "aspect-ratio bound" in out["preprocessing"]


def test_the_aspect_ratio_bound_is_inclusive_and_images_within_it_embed(tmp_path, encoder):
    """Exactly 32:1 is accepted and embeds; 33:1 is quarantined (the old code accepted both)."""
    picture = Image.fromarray(fm_picture())
    ok, wide = tmp_path / "ok.png", tmp_path / "wide.png"
    picture.resize((10 * MAX_ASPECT_RATIO, 10)).save(ok)
    picture.resize((10 * MAX_ASPECT_RATIO + 10, 10)).save(wide)

    assert check_image(SourceFile(ok, "Bag/ok.png", "Bag")).ok
    refused = check_image(SourceFile(wide, "Bag/wide.png", "Bag"))
    assert not refused.ok and f"330x10 pixels exceeds the bound of {MAX_ASPECT_RATIO}:1" in refused.reason
    assert refused.sample_id == hashlib.sha256(wide.read_bytes()).hexdigest()  # still identified, for the ledger
    assert encoder.embed([ok], progress=False).shape == (1, encoder.dim)


# ---- finding 3: special files ----------------------------------------------------------------

SPECIAL_CHILD = r"""
import json, resource, sys
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))  # /dev/zero read to the end: MemoryError, not swap
from pathlib import Path
from vismem_assets.encoders import load_encoder
from vismem_assets.encoders.base import load_image
from vismem_assets.forgetting import ForgetError, image_hash
from vismem_assets.imagesets import SourceFile, check_image
from vismem_assets.memory import Memory

set_dir, home, specials = Path(sys.argv[2]), Path(sys.argv[3]), [Path(p) for p in sys.argv[4:]]
out = {"check": [], "load": [], "hash": []}
for path in specials:  # defence in depth: what the scan refuses, an open refuses too
    out["check"].append(check_image(SourceFile(path, path.name, "Bag")).reason)
    for key, call, exc_type in (("load", load_image, ValueError), ("hash", image_hash, ForgetError)):
        try:
            call(path)
            out[key].append(None)
        except exc_type as exc:
            out[key].append(str(exc))
report = Memory(home, encoder=load_encoder("efficientnet-lite0")).add(set_dir)
out["added"], out["quarantined"] = report.ingest.added, report.ingest.quarantined
print(json.dumps(out))
"""


@pytest.mark.slow
def test_fifo_and_dev_zero_link_are_refused_without_blocking_or_reading_forever(tmp_path):
    """A FIFO named x.jpg (no writer: opening or reading it blocks) and a symlink to /dev/zero
    (stat: 0 bytes, reads forever) inside a label folder: the add finishes with both quarantined
    as 'not a regular file', and check_image, load_image and image_hash refuse them the same way.
    The old code hung on the FIFO (the child's timeout) or read /dev/zero until MemoryError."""
    set_dir = tmp_path / "set"
    write_fm_set(set_dir, n=2)
    fifo, zero = set_dir / "Bag" / "x.jpg", set_dir / "Bag" / "zero.png"
    os.mkfifo(fifo)
    zero.symlink_to("/dev/zero")

    out = run_child(SPECIAL_CHILD, MEMORY_LIMIT, set_dir, tmp_path / "home", fifo, zero, timeout=180)

    assert out["added"] == 2
    reasons = {q["name"]: q["reason"] for q in out["quarantined"]}
    assert set(reasons) == {"Bag/x.jpg", "Bag/zero.png"}
    assert "not a regular file" in reasons["Bag/x.jpg"]
    # The scan may already refuse the link as leaving the set; either way it is never read.
    assert "not a regular file" in reasons["Bag/zero.png"] or "outside the image set" in reasons["Bag/zero.png"]
    assert "FIFO" in out["check"][0] and "character device" in out["check"][1]
    for key in ("check", "load", "hash"):
        assert all(m and "not a regular file" in m for m in out[key]), (key, out[key])
    assert str(fifo) in out["load"][0] and str(zero) in out["hash"][1]


def test_reads_are_bounded_by_the_size_limit_not_by_stat(tmp_path):
    """stat's size is not trusted: /proc/self/maps is a regular file that stat says is 0 bytes
    long, yet holds more; the read stops at the limit + 1 byte and the file is refused as too
    large (the old code read it whole). A file exactly at the limit is read, one byte over not."""
    maps = Path("/proc/self/maps")
    assert maps.stat().st_size == 0
    refused = check_image(SourceFile(maps, "Bag/maps.png", "Bag"), max_bytes=64)
    assert refused.reason == "file too large: more than 64 bytes (it grew while being read)"

    picture = png_bytes(Image.fromarray(fm_picture()))
    path = tmp_path / "Bag.png"
    path.write_bytes(picture)
    assert check_image(SourceFile(path, "Bag/a.png", "Bag"), max_bytes=len(picture)).ok
    refused = check_image(SourceFile(path, "Bag/a.png", "Bag"), max_bytes=len(picture) - 1)
    assert refused.reason == f"file too large: {len(picture)} bytes > {len(picture) - 1}"


# ---- finding 11: 16-bit PNGs and EXIF orientation --------------------------------------------

def test_a_16_bit_png_embeds_like_its_8_bit_picture_at_ingest_and_classify(tmp_path, encoder, memory):
    """The same Fashion-MNIST picture as an 8-bit and a 16-bit (v * 257) PNG: the vectors agree
    (cosine > 0.99; the old decoding clipped the 16-bit one to white, cosine ~0.3). Added to a
    memory, the 16-bit file is stored under the sha256 of its bytes, and classifying the 8-bit
    picture finds it as nearest neighbour at similarity ~1."""
    pixels = fm_picture(7)
    set_dir = tmp_path / "set"
    write_fm_set(set_dir, n=3, label="Trouser")
    eight, sixteen = tmp_path / "eight.png", set_dir / "Trouser" / "sixteen.png"
    Image.fromarray(pixels).save(eight)
    Image.fromarray(pixels.astype(np.uint16) * 257).save(sixteen)
    with Image.open(sixteen) as im:
        assert im.mode.startswith("I")  # really a 16-bit PNG
    v8, v16, varray = encoder.embed([eight, sixteen, pixels.astype(np.uint16) * 257], progress=False)
    assert cosine(v8, v16) > 0.99 and cosine(v8, varray) > 0.99

    memory.add(set_dir)
    top = memory.classify([eight], k=1)[0].neighbors[0]
    assert top.sample_id == hashlib.sha256(sixteen.read_bytes()).hexdigest()
    assert top.similarity > 0.99


def test_exif_orientation_is_applied_before_encoding(tmp_path, encoder):
    """A JPEG whose pixels are stored rotated, with EXIF Orientation 6 ("rotate 90° clockwise to
    view"), embeds close to the upright picture and far from its raw (sideways) pixels."""
    upright = Image.fromarray(fm_picture(0)).resize((112, 112), Image.Resampling.BICUBIC)  # an ankle boot: not symmetric
    sideways = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    tagged, plain, raw = tmp_path / "tagged.jpg", tmp_path / "upright.jpg", tmp_path / "sideways.jpg"
    sideways.save(tagged, "JPEG", quality=95, exif=exif.tobytes())
    upright.save(plain, "JPEG", quality=95)
    sideways.save(raw, "JPEG", quality=95)

    v_tagged, v_upright, v_raw = encoder.embed([tagged, plain, raw], progress=False)
    assert cosine(v_tagged, v_upright) > 0.98
    assert cosine(v_tagged, v_raw) < cosine(v_tagged, v_upright) - 0.1
    checked = check_image(SourceFile(tagged, "Ankle_boot/tagged.jpg", "Ankle_boot"))
    assert checked.ok and checked.sample_id == hashlib.sha256(tagged.read_bytes()).hexdigest()
