"""Reading image sets: a folder `<set>/<label>/*.<ext>` or a manifest (CSV/parquet, path,label),
and checking each file so that a bad one is quarantined with a reason instead of failing the set."""
from __future__ import annotations

import errno
import hashlib
import io
import os
import re
import stat
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}
ACCEPTED_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif"}
MAX_BYTES = 64 * 1024 * 1024       # a single image file larger than this is refused
MAX_PIXELS = 50_000_000            # decompression-bomb guard, checked before decoding
# Longest side / shortest side. Encoders resize the short side to ~256 px, so a 60000x1 PNG of a
# few hundred bytes would become a 15 360 000x256 image (tens of GB); at 32:1 the resize stays under
# 8192x256 (~8 MB). Photos, phone panoramas (<= ~12:1) and web banners (~11:1) all fit.
MAX_ASPECT_RATIO = 32
SET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
LABEL_MAX = 128
LABEL_RULE = ("a label is 1-128 characters after Unicode NFC and stripping surrounding spaces; "
              "not '.' or '..', no '/', '\\' or control character (newline, tab, NUL...), not starting with '-'")
# Reasons for files refused before any byte is read (they are listed in quarantine, never copied).
OUTSIDE = "outside the image set: refused, not read"


class ImageSetError(ValueError):
    """The set as a whole cannot be read (missing folder, malformed manifest, bad name)."""


class LabelError(ValueError):
    """A label that breaks LABEL_RULE."""


@dataclass(frozen=True)
class SourceFile:
    path: Path          # where to read it
    name: str           # its name inside the set (a label folder + file name, or the manifest path)
    label: str | None
    refused: str | None = None  # why it must not be read at all (outside the set, not a regular file, bad label)


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


def check_label(raw: str) -> str:
    """The label to store: NFC-normalised, surrounding spaces stripped. Raises LabelError naming
    the rule it breaks: labels become file-system-like names in reports and exports, and a label
    such as '..', 'a/b', '-rf' or one with a newline is a mistake or an attack, never a class."""
    label = unicodedata.normalize("NFC", raw)
    label = label.strip("".join(ch for ch in set(label) if unicodedata.category(ch) == "Zs"))
    if not label:
        why = "it is empty"
    elif label in (".", ".."):
        why = "'.' and '..' are not labels"
    elif "/" in label or "\\" in label:
        why = "it contains '/' or '\\'"
    elif any(unicodedata.category(ch) == "Cs" for ch in label):
        why = "it holds bytes that are not UTF-8"  # a folder name decoded with surrogateescape
    elif any(unicodedata.category(ch) in ("Cc", "Zl", "Zp") for ch in label):
        why = "it contains a control character"
    elif label.startswith("-"):
        why = "it starts with '-'"
    elif len(label) > LABEL_MAX:
        why = f"it is longer than {LABEL_MAX} characters"
    else:
        return label
    shown = repr(raw[:40]) + ("..." if len(raw) > 40 else "")
    raise LabelError(f"label {shown} refused: {why} ({LABEL_RULE}); fix it and add the set again")


def read_image_set(source: Path, root: Path | None = None) -> list[SourceFile]:
    """Files of a set: a folder of label folders, or a manifest file with path,label columns.
    `root` (manifests only): the folder the manifest's paths must stay under (default: its own)."""
    source = Path(source)
    if source.is_dir():
        if root is not None:
            raise ImageSetError(f"{source} is a folder: --root applies to manifests only "
                                "(a folder set reads only the files inside its own folder)")
        return scan_folder(source)
    if source.is_file():
        return read_manifest(source, root)
    raise ImageSetError(f"{source} does not exist: give a folder <set>/<label>/<images> or a CSV/parquet manifest")


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return kind
    return "not a regular file"


def _not_regular(mode: int) -> str:
    return f"not a regular file ({_file_kind(mode)}): refused, not read"


def _resolve_inside(path: Path, inside: Path) -> tuple[Path | None, str | None]:
    """(the real path of a regular file under `inside`, None), or (None, why it is refused).
    Only metadata is looked at here: nothing refused is ever opened."""
    try:
        target = Path(os.path.realpath(path))
    except (OSError, ValueError):  # ValueError: a NUL byte in a manifest path
        return None, "not a usable path: refused, not read"
    if not target.is_relative_to(inside):
        return None, OUTSIDE
    try:
        mode = os.stat(target).st_mode
    except OSError as exc:
        if os.path.islink(path):
            return None, f"unreadable: broken symlink ({exc.strerror or exc})"
        return target, None  # a missing manifest row: check_image reports it unreadable
    if stat.S_ISDIR(mode):
        return None, "a symlink to a folder: not followed (put the files themselves in the label folder)"
    if not stat.S_ISREG(mode):
        return None, _not_regular(mode)
    return target, None


def scan_folder(root: Path) -> list[SourceFile]:
    """Regular files in each label folder (recursively), walked with lstat and never through a
    folder symlink. A file symlink is followed only to a regular file inside the set; anything
    else found (links leaving the set, folder links, FIFOs, devices, files under a refused label)
    is listed with a `refused` reason and never read. Hidden entries and files at the top level
    (like _READY) are skipped."""
    root = Path(root)
    inside = Path(os.path.realpath(root))
    files: list[SourceFile] = []
    n_label_folders = 0
    for entry in _entries(root):
        if entry.is_symlink():
            if os.path.isdir(entry.path):  # a label folder linked from elsewhere: reported, not walked
                _, why = _resolve_inside(Path(entry.path), inside)
                files.append(SourceFile(Path(entry.path), entry.name, None, refused=why))
            continue
        if not entry.is_dir(follow_symlinks=False):
            continue
        n_label_folders += 1
        try:
            label, label_refused = check_label(entry.name), None
        except LabelError as exc:
            label, label_refused = None, str(exc)
        _walk(root, Path(entry.path), label, label_refused, inside, files)
    if not n_label_folders and not files:
        raise ImageSetError(
            f"{root} has no label folders: lay images out as {root.name}/<label>/<image files>, or give a manifest"
        )
    return files


def _entries(folder: Path) -> list[os.DirEntry]:
    with os.scandir(folder) as it:
        return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)


def _walk(root: Path, folder: Path, label: str | None, label_refused: str | None, inside: Path,
          out: list[SourceFile]) -> None:
    try:
        entries = _entries(folder)
    except OSError as exc:
        out.append(SourceFile(folder, folder.relative_to(root).as_posix(), label,
                              refused=f"unreadable folder: {exc.strerror or exc}"))
        return
    for entry in entries:
        path = Path(entry.path)
        name = path.relative_to(root).as_posix()
        try:
            mode = os.lstat(path).st_mode
        except OSError as exc:
            out.append(SourceFile(path, name, label, refused=f"unreadable: {exc.strerror or exc}"))
            continue
        if stat.S_ISDIR(mode):
            _walk(root, path, label, label_refused, inside, out)
        elif stat.S_ISLNK(mode):
            target, why = _resolve_inside(path, inside)
            # Read through the resolved path: what was checked is what gets opened.
            out.append(SourceFile(target or path, name, label, refused=why or label_refused))
        elif stat.S_ISREG(mode):
            out.append(SourceFile(path, name, label, refused=label_refused))
        else:
            out.append(SourceFile(path, name, label, refused=_not_regular(mode)))


def read_manifest(path: Path, root: Path | None = None) -> list[SourceFile]:
    """Rows of a manifest. A row's path is taken relative to the manifest's folder (or absolute)
    and must resolve, symlinks followed, under `root` (default: the manifest's folder): rows that
    leave it are refused, never read. An empty label is 'no label'; a label breaking LABEL_RULE
    is refused."""
    path = Path(path)
    if root is not None and not Path(root).is_dir():
        raise ImageSetError(f"--root {root} is not a folder: give the folder the manifest's paths must stay under")
    inside = Path(os.path.realpath(root if root is not None else path.parent))
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
    for row_path, raw_label in frame.select(pl.col("path").cast(pl.String), pl.col("label").cast(pl.String)).iter_rows():
        if not row_path:
            raise ImageSetError(f"manifest {path} has a row with an empty path")
        given = Path(row_path) if Path(row_path).is_absolute() else path.parent / row_path
        target, refused = _resolve_inside(given, inside)
        label = None
        if raw_label and raw_label.strip():  # empty: quarantined later as 'no label'
            try:
                label = check_label(raw_label)
            except LabelError as exc:
                refused = refused or str(exc)
        if refused == OUTSIDE:
            refused += (" (a manifest's paths stay under --root)" if root is not None else
                        " (a manifest's paths stay under its folder; pass --root DIR to allow a wider one)")
        files.append(SourceFile(path=target or given, name=row_path, label=label, refused=refused))
    return files


def check_source(source: SourceFile, **limits) -> CheckedImage:
    """check_image, except that a refused file is quarantined with its reason and never opened."""
    if source.refused:
        return CheckedImage(source, reason=source.refused)
    return check_image(source, **limits)


class RefusedFile(OSError):
    """A path vismem will not read: not a regular file, or more bytes than allowed. Its text is
    the quarantine reason."""


def read_bounded(path: str | os.PathLike, max_bytes: int = MAX_BYTES, follow_links: bool = True) -> bytes:
    """The bytes of a regular file of at most `max_bytes`, or RefusedFile saying why not.

    Every file vismem reads from a user goes through here. stat's size is not trusted (a link to
    /dev/zero says 0 bytes, a file can grow): the read itself stops at max_bytes + 1. The path is
    opened with O_NONBLOCK, so a FIFO swapped in after the stat cannot block, and the open
    descriptor is checked again with fstat: only a regular file is read. Without `follow_links`
    (a set's files, already resolved inside the set) the open refuses a link swapped in since.
    """
    mode = os.stat(path).st_mode  # follows links: the kind of thing that would be opened
    if not stat.S_ISREG(mode):
        raise RefusedFile(_not_regular(mode))
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    if not follow_links:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow_links:
            raise RefusedFile("a symlink appeared while the set was read: refused, not read") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RefusedFile(_not_regular(st.st_mode))
        if st.st_size > max_bytes:
            raise RefusedFile(f"file too large: {st.st_size} bytes > {max_bytes}")
        chunks, n = [], 0
        while n <= max_bytes:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - n))
            if not chunk:
                break
            chunks.append(chunk)
            n += len(chunk)
        if n > max_bytes:
            raise RefusedFile(f"file too large: more than {max_bytes} bytes (it grew while being read)")
        return b"".join(chunks)
    finally:
        os.close(fd)


class ImageRefused(ValueError):
    """Bytes that do not decode to an image vismem accepts. Its text is the quarantine reason."""


def check_dimensions(width: int, height: int, max_pixels: int | None = MAX_PIXELS,
                     max_aspect: int = MAX_ASPECT_RATIO) -> None:
    """Refuse sizes whose decoding (max_pixels; None: already decoded) or resizing (max_aspect)
    would cost unbounded memory."""
    if width < 1 or height < 1:
        raise ImageRefused(f"empty image: {width}x{height} pixels")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageRefused(f"decompression bomb: {width}x{height} pixels exceeds {max_pixels}")
    if max(width, height) > max_aspect * min(width, height):
        raise ImageRefused(
            f"extreme aspect ratio: {width}x{height} pixels exceeds the bound of {max_aspect}:1 (resizing its short "
            f"side for the encoder would make a huge image); crop it to at most {max_aspect}:1")


# EXIF orientation -> the transposition that makes the picture upright (as PIL.ImageOps.exif_transpose).
_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
                5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                8: Image.Transpose.ROTATE_90}
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def normalise_decoded(image: Image.Image) -> Image.Image:
    """An image as the encoder must see it: upright (EXIF orientation applied) and 16-bit grey
    scaled to 8 bits. Anything else is returned as it is, so ordinary images embed unchanged."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # PIL warns of each corrupt EXIF entry it skips
            orientation = image.getexif().get(0x0112, 1)
    except Exception:  # a corrupt EXIF block: its pixels are still fine, only the tag is lost
        orientation = 1
    if image.mode in _SIXTEEN_BIT:
        # convert("L"/"RGB") clips 16-bit values at 255 (a white picture); the high byte is the
        # 8-bit value (as PIL does for 16-bit RGB PNGs) and inverts the usual v * 257 widening.
        values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
        image = Image.fromarray((values >> 8).astype(np.uint8))
    method = _ORIENTATION.get(orientation) if isinstance(orientation, int) else None
    return image.transpose(method) if method is not None else image


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS, max_aspect: int = MAX_ASPECT_RATIO
                 ) -> tuple[Image.Image, str]:
    """(image, store extension) of image bytes, or ImageRefused with the reason.

    The one decoder: ingest checks with it and the encoder embeds what it returns (through
    `encoders.base.load_image`), so a file accepted here is one the encoder can embed, within
    bounded memory. The size is checked from the header, before any pixel is decoded.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # PIL's notes on corrupt EXIF entries it skips
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                if im.format not in ACCEPTED_FORMATS:
                    raise ImageRefused(f"unsupported image format {im.format}")
                check_dimensions(*im.size, max_pixels=max_pixels, max_aspect=max_aspect)
                im.load()
                fmt = ACCEPTED_FORMATS[im.format]
                image = normalise_decoded(im)
                return (im.copy() if image is im else image), fmt
    except ImageRefused:
        raise
    except UnidentifiedImageError:
        raise ImageRefused("not an image (unrecognised content)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRefused(f"decompression bomb: {exc}") from None
    except MemoryError:
        raise
    except Exception as exc:  # untrusted bytes: any decoder failure (struct.error, IndexError...) is a bad file
        raise ImageRefused(f"corrupt or truncated image: {str(exc) or type(exc).__name__}") from None


def check_image(source: SourceFile, max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS) -> CheckedImage:
    """Read (bounded, regular files only), hash and fully decode one file as the encoder will;
    any problem becomes a quarantine reason."""
    try:
        data = read_bounded(source.path, max_bytes, follow_links=False)
    except RefusedFile as exc:
        return CheckedImage(source, reason=str(exc))
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
        image, fmt = decode_image(data, max_pixels)
        image.convert("RGB")  # what the encoder's preprocessing does next
    except ImageRefused as exc:
        return bad(str(exc))
    except MemoryError:
        raise
    except Exception as exc:
        return bad(f"corrupt or truncated image: {str(exc) or type(exc).__name__}")
    width, height = image.size
    return CheckedImage(source, sample_id=sample_id, data=data, format=fmt, width=width, height=height,
                        n_bytes=len(data))
