"""Images in data rows and requests: read from whatever a row holds, checked, as RGB PIL images.

A row names an image as a file path (relative to the data file's folder, or ``package:NAME/path`` inside an
installed package), raw bytes (a parquet column), a
``{"bytes": ..., "path": ...}`` record (what ``datasets.Image`` stores), or a ``data:image/...;base64,`` URL (what
OpenAI clients send). A video is a list of frames, each one of those. Every failure is an ``ImageError`` that
says which image of which row and why, so a stage can stop on it or skip the row and count it.
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from swiftk.kernel.errors import DataError

# The content parts of a multimodal message that carry pixels, and the key each keeps them under.
IMAGE_PARTS = {"image": "image", "image_url": "image_url", "video": "video"}
MODES = {"RGB", "RGBA", "L", "LA", "P", "CMYK", "I;16", "I", "F", "1", "YCbCr", "LAB", "HSV"}


class ImageError(DataError):
    """An image that cannot be read: missing file, not an image, undecodable bytes, an unsupported mode."""


def load_image(value: Any, base: Path | None = None, where: str = "") -> Image.Image:
    """``value`` as an RGB image, fully decoded now (so a truncated file fails here, not in a later batch).

    ``base`` is the folder relative paths start from (the data file's); ``where`` names the row in messages."""
    image = open_image(value, base, where)
    try:
        image.load()
    except (OSError, ValueError) as exc:
        raise ImageError(f"{where}: {describe(value)} is damaged: {exc}") from None
    if image.mode not in MODES:
        raise ImageError(f"{where}: {describe(value)} has pixel mode {image.mode!r}, which cannot be turned into RGB")
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or "transparency" in image.info:
        # Transparent pixels over white, as a viewer shows them: converting drops alpha to whatever colour is stored.
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def open_image(value: Any, base: Path | None, where: str) -> Image.Image:
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return open_bytes(value["bytes"], where, "its bytes")
        if value.get("path"):
            return open_image(str(value["path"]), base, where)
        if "url" in value:  # OpenAI's {"type": "image_url", "image_url": {"url": ...}}
            return open_image(value["url"], base, where)
        raise ImageError(f"{where}: image record {sorted(value)} has neither 'bytes' nor 'path' nor 'url'")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return open_bytes(bytes(value), where, "its bytes")
    if not isinstance(value, str) or not value:
        raise ImageError(f"{where}: an image must be a path, bytes, a data: URL or a {{'bytes', 'path'}} record, "
                         f"not {type(value).__name__}")
    if value.startswith("data:"):
        header, _, payload = value.partition(",")
        if ";base64" not in header:
            raise ImageError(f"{where}: a data: URL image must be base64 ('data:image/png;base64,...')")
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ImageError(f"{where}: the data: URL's base64 does not decode: {exc}") from None
        return open_bytes(raw, where, "the data: URL")
    if value.startswith(("http://", "https://")):
        raise ImageError(f"{where}: image {value} is a web address; swiftk reads images offline. Download it and "
                         f"name the file, or send it as a data: URL")
    if value.startswith("package:"):  # a file inside an installed package (easy-vqa's images), as model ids allow
        from swiftk.kernel.errors import ModelLoadError
        from swiftk.kernel.model import resolve_source

        try:
            value = resolve_source(value)
        except ModelLoadError as exc:
            raise ImageError(f"{where}: {exc}") from None
    path = Path(value).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    if not path.is_file():
        raise ImageError(f"{where}: image file {path} does not exist (relative paths start at the data file's folder)")
    try:
        return Image.open(path)
    except (UnidentifiedImageError, OSError) as exc:
        raise ImageError(f"{where}: {path} is not an image PIL can read: {exc}") from None


def open_bytes(raw: bytes, where: str, what: str) -> Image.Image:
    try:
        return Image.open(io.BytesIO(raw))
    except (UnidentifiedImageError, OSError) as exc:
        raise ImageError(f"{where}: {what} ({len(raw)} bytes) are not an image PIL can read: {exc}") from None


def describe(value: Any) -> str:
    if isinstance(value, str) and not value.startswith("data:"):
        return f"image {value}"
    return "the image"


def part_images(part: dict[str, Any]) -> list[Any]:
    """The image values a content part carries: one for ``image``/``image_url``, the frames of a ``video``."""
    kind = part.get("type")
    value = part.get(IMAGE_PARTS.get(str(kind), ""), part.get("url"))
    if kind == "video":
        return list(value) if isinstance(value, (list, tuple)) else [value]
    return [value]
