"""Near-copies of forgotten images: a perceptual hash kept on the blocklist.

The blocklist's sha256 stops only the exact bytes. The same photo with one byte appended,
re-encoded, saved as JPEG or with a pixel changed has another sha256 and would be taken back.
So when a forget request is accepted, before any byte is erased, a perceptual hash of each
forgotten image is written to `blocklist_phashes` (migration 008), and ingest refuses an image
whose hash lies within MAX_DISTANCE bits of one of them (counted as `blocked`, its reason
giving the distance). An image the memory already holds stays (the forget did not name it).

The hash (the DCT "pHash" of `imagehash.phash` at hash_size=16, plus a median filter): the
picture upright in grey, a 3x3 median filter (a single changed pixel is mostly filtered away),
resized to 64x64; the 16x16 lowest frequencies of its 2-D DCT; one bit per coefficient, set
when it is above their median. 256 bits, compared by Hamming distance.

MAX_DISTANCE = 20 of 256 bits, chosen by measurement on Fashion-MNIST (28x28 grey, small and
alike: the hard case; photos lie much farther apart). 2,000 "forgotten" training images
against the other 58,000 (1.16e8 pairs):
- pairs at distance <= 16: 5, each the same product photo twice in the data set (the pixel
  differences barely visible); <= 20: 6 (plus two T-shirts that differ only in their print);
  <= 24: 15; <= 28: 46. A false block is about one in 10^8 pairs at 20, ten at 24, so it
  grows with (images forgotten) x (images arriving).
- near-copies of those 2,000 caught at <= 20: a byte appended and a PNG re-encode 100%
  (same pixels: distance 0), JPEG quality 90 99.2% (median distance 8), one pixel inverted
  (255 - v) at a random place 98.2% (median 0; a pixel changed by 64 levels 99.7%).
- a 64-bit pHash cannot separate this data: 1,027 of 30,000 distinct arrivals lay within 4
  bits of one of 500 forgotten images.
What it does not catch: crops, rotations, mirror images, a changed frame or heavy edits (a
perceptual hash compares the picture as it is laid out). Cost: about 0.3-0.6 ms to hash a
small image (0.26 s for a 4000x3000 JPEG, mostly decoding), and a 256-bit XOR per forgotten
image per arrival; ingest pays both only once something has been forgotten.

What keeping the hash reveals: 256 bits about the coarse layout of light and dark (a 16x16
frequency sketch of a 64x64 grey thumbnail). It cannot be inverted into the photo and names
nothing; but whoever holds a candidate photo can confirm that it, or a near-copy, was
forgotten here, as the sha256 of the exact bytes (also kept) confirms the exact file. It is
kept for good, by design, so that the photo stays out.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFilter

from .imagesets import ImageRefused, decode_image

if TYPE_CHECKING:
    from .ledger import Session

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


def pack(hashes: list[str]) -> np.ndarray:
    """Hex hashes as rows of 64-bit words (n, N_BYTES // 8): four XORs and popcounts a pair."""
    return np.frombuffer(b"".join(bytes.fromhex(h) for h in hashes), np.uint64).reshape(-1, N_BYTES // 8)


def distances(packed: np.ndarray, one: str) -> np.ndarray:
    """Hamming distance of one hash (hex) to each row of `pack`ed hashes (the four words summed
    column by column: twice as fast as a sum over axis 1)."""
    counts = np.bitwise_count(packed ^ pack([one]))
    return counts[:, 0].astype(np.int32) + counts[:, 1] + counts[:, 2] + counts[:, 3]


class NearCopyBlocklist:
    """The perceptual hashes of forgotten images, to test arrivals against."""

    def __init__(self, sample_ids: list[str], hashes: list[str], max_distance: int = MAX_DISTANCE):
        self.sample_ids = list(sample_ids)
        self.max_distance = max_distance
        self.packed = pack(list(hashes))

    @classmethod
    def load(cls, session: Session) -> NearCopyBlocklist:
        """The hashes the ledger keeps for this ALGORITHM."""
        return cls(*session.forgetting.near_copy_hashes(ALGORITHM))

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
