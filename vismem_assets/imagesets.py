"""Reading image sets: a folder `<set>/<label>/*.<ext>` or a manifest (CSV/parquet, path,label),
and checking each file so that a bad one is quarantined with a reason instead of failing the set."""
from __future__ import annotations

import hashlib
import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import polars as pl
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}
ACCEPTED_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif"}
MAX_BYTES = 64 * 1024 * 1024       # a single image file larger than this is refused
MAX_PIXELS = 50_000_000            # decompression-bomb guard, checked before decoding
SET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ImageSetError(ValueError):
    """The set as a whole cannot be read (missing folder, malformed manifest, bad name)."""


@dataclass(frozen=True)
class SourceFile:
    path: Path          # where to read it
    name: str           # its name inside the set (a label folder + file name, or the manifest path)
    label: str | None


@dataclass(frozen=True)
class CheckedImage:
    source: SourceFile
    sample_id: str | None = None     # sha256 of the bytes; None when they could not be read
    data: bytes | None = None
    format: str | None = None        # store extension: jpg, png, ...
    width: int | None = None
    height: int | None = None
    n_bytes: int | None = None
    reason: str | None = None        # why it is quarantined; None when good

    @property
    def ok(self) -> bool:
        return self.reason is None


def check_set_name(name: str) -> str:
    if not SET_NAME.match(name or ""):
        raise ImageSetError(
            f"image set name {name!r} is not usable: use letters, digits, '.', '_' or '-' (at most 128), "
            "starting with a letter or digit; pass --name to choose one"
        )
    return name


def read_image_set(source: Path) -> list[SourceFile]:
    """Files of a set: a folder of label folders, or a manifest file with path,label columns."""
    source = Path(source)
    if source.is_dir():
        return scan_folder(source)
    if source.is_file():
        return read_manifest(source)
    raise ImageSetError(f"{source} does not exist: give a folder <set>/<label>/<images> or a CSV/parquet manifest")


def scan_folder(root: Path) -> list[SourceFile]:
    """Every non-hidden file in each label folder; files at the top level (like _READY) are not images."""
    labels = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not labels:
        raise ImageSetError(
            f"{root} has no label folders: lay images out as {root.name}/<label>/<image files>, or give a manifest"
        )
    files = []
    for label_dir in labels:
        for path in sorted(label_dir.rglob("*")):
            if path.name.startswith(".") or path.is_dir():
                continue
            files.append(SourceFile(path=path, name=path.relative_to(root).as_posix(), label=label_dir.name))
    return files


def read_manifest(path: Path) -> list[SourceFile]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            frame = pl.read_csv(path, infer_schema=False)
        elif suffix == ".parquet":
            frame = pl.read_parquet(path)
        else:
            raise ImageSetError(f"manifest {path} must be .csv or .parquet (with columns path,label)")
    except ImageSetError:
        raise
    except Exception as exc:  # polars raises several types for unreadable files
        raise ImageSetError(f"manifest {path} could not be read: {exc}") from exc
    missing = {"path", "label"} - set(frame.columns)
    if missing:
        raise ImageSetError(
            f"manifest {path} lacks column(s) {sorted(missing)}; it has {frame.columns}. "
            "A manifest needs a 'path' column (absolute, or relative to the manifest) and a 'label' column"
        )
    files = []
    for row_path, label in frame.select(pl.col("path").cast(pl.String), pl.col("label").cast(pl.String)).iter_rows():
        if not row_path:
            raise ImageSetError(f"manifest {path} has a row with an empty path")
        resolved = Path(row_path) if Path(row_path).is_absolute() else path.parent / row_path
        label = label.strip() if label else None
        files.append(SourceFile(path=resolved, name=row_path, label=label or None))
    return files


def check_image(source: SourceFile, max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS) -> CheckedImage:
    """Read, hash and fully decode one file; any problem becomes a quarantine reason."""
    try:
        size = source.path.stat().st_size
        if size > max_bytes:
            return CheckedImage(source, reason=f"file too large: {size} bytes > {max_bytes}")
        data = source.path.read_bytes()
    except OSError as exc:
        return CheckedImage(source, reason=f"unreadable: {exc.strerror or exc}")
    sample_id = hashlib.sha256(data).hexdigest()

    def bad(reason: str) -> CheckedImage:
        return CheckedImage(source, sample_id=sample_id, data=data, n_bytes=len(data), reason=reason)

    if not data:
        return bad("empty file (0 bytes)")
    if source.label is None:
        return bad("no label")
    if source.path.suffix.lower() not in IMAGE_EXTENSIONS:
        return bad(f"unsupported file type {source.path.suffix or '(no extension)'}; accepted: {sorted(IMAGE_EXTENSIONS)}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
                if im.format not in ACCEPTED_FORMATS:
                    return bad(f"unsupported image format {im.format}")
                if width * height > max_pixels:
                    return bad(f"decompression bomb: {width}x{height} pixels exceeds {max_pixels}")
                im.load()
                im.convert("RGB")
                fmt = ACCEPTED_FORMATS[im.format]
    except UnidentifiedImageError:
        return bad("not an image (unrecognised content)")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return bad(f"decompression bomb: {exc}")
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        return bad(f"corrupt or truncated image: {exc}")
    return CheckedImage(source, sample_id=sample_id, data=data, format=fmt, width=width, height=height,
                        n_bytes=len(data))
