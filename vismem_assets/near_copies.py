"""Near-copies of forgotten images: a perceptual hash kept on the blocklist.

The blocklist's sha256 stops only the exact bytes. The same photo with one byte appended,
re-encoded, saved as JPEG or with a pixel changed has another sha256 and would be taken back.
So when a forget request is accepted, before any byte is erased, a perceptual hash of each
forgotten image is written to `blocklist_phashes` (migration 008), and ingest refuses an image
whose hash lies within MAX_DISTANCE bits of one of them (counted as `blocked`, with the
distance in its reason).

The hash (the DCT "pHash" of `imagehash.phash`, hash_size=16, plus a median filter): the
picture in grey, a 3x3 median filter (a single changed pixel is mostly filtered away), resized
to 64x64; the 16x16 lowest frequencies of its 2-D DCT; one bit per coefficient, set when it is
above their median. 256 bits, compared by Hamming distance.

Chosen by measurement on Fashion-MNIST (28x28 grey, small and alike: the hard case; a photo
has far more room between pictures). 2,000 "forgotten" training images against the other
58,000 (1.16e8 pairs): at distance <= 20, 6 pairs, 5 of them the same product photo twice in
the data set (pixel differences barely visible) and 1 two T-shirts differing in their print;
<= 24: 15 pairs; <= 16: the 5 same-photo pairs only. Near-copies of 2,000 images caught at
<= 20: appended bytes and a PNG re-encode 100% (same pixels, distance 0), JPEG quality 90
99.2% (median distance 8), one pixel inverted (255 - v) at a random place 98.2% (median 0).
A 64-bit pHash cannot separate this data: distinct images at distance 0-4 are common (1,027 of
30,000 arrivals within 4 of one of 500 forgotten images). False blocks grow with the number of
forgotten images times the number of arrivals: a distinct picture was refused by mistake once
per 1.16e8 (forgotten, arrival) pairs at this distance, 10 times at 24 (the 5 same-photo pairs
aside). Hashing costs about 0.6 ms per small image (0.26 s for a 4000x3000 JPEG, mostly its
decoding), paid by ingest only once something has been forgotten.

What keeping the hash reveals: 256 bits about the coarse layout of light and dark (a 16x16
frequency sketch of a 64x64 grey thumbnail). It cannot be inverted into the photo, and it
names nothing; but whoever holds a candidate photo can confirm that it, or a near-copy, was
forgotten here, just as with the sha256 of the exact bytes (which the blocklist also keeps).
It is what lets the memory keep its promise that the photo stays out.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from .imagesets import ImageRefused, decode_image

ALGORITHM = "phash-dct16-median3-64px-v1"   # stored per row: a changed algorithm is a new name
HASH_SIDE = 16                 # 16x16 DCT coefficients: 256 bits
RESIZE = 64                    # the grey thumbnail the DCT is taken of
WORK_SIDE = 256                # a large image is reduced to this first (the median filter's cost)
MAX_DISTANCE = 20              # <= this many differing bits (of 256) is a near-copy; see above
N_BYTES = HASH_SIDE * HASH_SIDE // 8


def _dct_rows(n: int, k: int) -> np.ndarray:
    """The first k rows of the (unnormalised) DCT-II matrix of size n: scale does not change the
    median split."""
    return np.cos(np.pi * np.arange(k)[:, None] * (2 * np.arange(n)[None, :] + 1) / (2 * n))


_DCT = _dct_rows(RESIZE, HASH_SIDE)


def hash_image(image: Image.Image) -> str:
    """The perceptual hash (hex, 64 characters) of a decoded image."""
    grey = image.convert("L")
    if max(grey.size) > WORK_SIDE:
        grey.thumbnail((WORK_SIDE, WORK_SIDE), Image.Resampling.BOX)
    grey = grey.filter(ImageFilter.MedianFilter(3)).resize((RESIZE, RESIZE), Image.Resampling.LANCZOS)
    coefficients = _DCT @ np.asarray(grey, dtype=np.float64) @ _DCT.T
    return np.packbits((coefficients > np.median(coefficients)).ravel()).tobytes().hex()


def hash_bytes(data: bytes) -> str:
    """The perceptual hash of image bytes, decoded with ingest's bounded decoder (EXIF orientation
    applied, 16-bit scaled); ImageRefused when they are not an image vismem accepts."""
    image, _ = decode_image(data)
    return hash_image(image)


def try_hash_bytes(data: bytes | None) -> tuple[str | None, str]:
    """(hash or None, a note saying what was hashed or why nothing was): for the blocklist row."""
    if not data:
        return None, "no bytes to hash (unreadable, empty or missing file)"
    try:
        return hash_bytes(data), "hashed from the image before it was erased"
    except ImageRefused as exc:
        return None, f"not hashed: {exc}"
    except MemoryError:
        raise
    except Exception as exc:  # untrusted bytes: any decoder failure means there is no picture to hash
        return None, f"not hashed: {str(exc) or type(exc).__name__}"


def distances(hashes: np.ndarray, one: str) -> np.ndarray:
    """Hamming distance of one hash (hex) to each row of packed hashes (n, N_BYTES)."""
    return np.bitwise_count(hashes ^ np.frombuffer(bytes.fromhex(one), np.uint8)).sum(axis=1)


class NearCopyBlocklist:
    """The perceptual hashes of forgotten images, to test arrivals against."""

    def __init__(self, sample_ids: list[str], hashes: list[str], max_distance: int = MAX_DISTANCE):
        self.sample_ids = list(sample_ids)
        self.max_distance = max_distance
        self.packed = (np.frombuffer(b"".join(bytes.fromhex(h) for h in hashes), np.uint8).reshape(-1, N_BYTES)
                       if hashes else np.zeros((0, N_BYTES), np.uint8))

    @classmethod
    def load(cls, con) -> "NearCopyBlocklist":
        rows = con.execute("SELECT sample_id, phash FROM blocklist_phashes WHERE phash IS NOT NULL AND algorithm = ?"
                           " ORDER BY sample_id", [ALGORITHM]).fetchall()
        return cls([r[0] for r in rows], [r[1] for r in rows])

    def __len__(self) -> int:
        return len(self.sample_ids)

    def match(self, image_hash: str) -> tuple[str, int] | None:
        """(the forgotten sample it is a near-copy of, the distance), or None."""
        if not len(self):
            return None
        d = distances(self.packed, image_hash)
        best = int(np.argmin(d))
        return (self.sample_ids[best], int(d[best])) if d[best] <= self.max_distance else None

    def check(self, data: bytes) -> str | None:
        """The reason these image bytes are refused, or None when they are no near-copy."""
        if not len(self):
            return None
        try:
            found = self.match(hash_bytes(data))
        except (ImageRefused, ValueError):
            return None  # (ingest quarantines what does not decode)
        if found is None:
            return None
        return (f"near-copy of a forgotten image (perceptual hash distance {found[1]} <= {self.max_distance}"
                f" of {HASH_SIDE * HASH_SIDE} bits)")
