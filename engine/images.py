"""PNG encoding with provenance metadata and an optional invisible watermark; JPEG copies that
carry the same metadata.

Torch-free and numpy-free unless the watermark package is installed: the bot host uses it for
``dreambot inspect``.

Every image the engine writes says where it came from twice: readable text chunks (prompt,
seed, model, …, and the words "AI-generated") that any PNG tool shows, and, when the optional
``invisible-watermark`` package is installed (``pip install dreambot[watermark]``), a
watermark hidden in the pixels that survives a re-save without the text chunks. ``inspect_png``
(``dreambot inspect image.png``) reads both back.
"""

from __future__ import annotations

import io
import json
from typing import Any

from PIL import ExifTags, Image
from PIL.PngImagePlugin import PngInfo

AI_NOTICE = "AI-generated image (dreambot)"
KEY_PREFIX = "dreambot:"
WATERMARK = b"dreambot"
"""The payload hidden in the pixels (64 bits)."""
WATERMARK_METHOD = "dwtDct"
WATERMARK_MIN_SIDE = 256
"""The watermark library refuses images with fewer pixels than 256×256."""


def watermark_available() -> bool:
    """Whether the optional ``invisible-watermark`` package can be imported."""
    try:
        import imwatermark  # noqa: F401
    except ImportError:
        return False
    return True


def _watermarkable(image: Image.Image) -> bool:
    return image.width * image.height >= WATERMARK_MIN_SIDE**2 and min(image.size) >= 16


def add_watermark(image: Image.Image) -> Image.Image | None:
    """``image`` with the invisible watermark, or None when the package is missing or the
    image is too small to carry it (the tiny test model's 64×64 outputs)."""
    if not _watermarkable(image):
        return None
    try:
        import numpy as np
        from imwatermark import WatermarkEncoder
    except ImportError:
        return None
    encoder = WatermarkEncoder()
    encoder.set_watermark("bytes", WATERMARK)
    # The library works on BGR arrays (OpenCV's order).
    bgr = np.asarray(image.convert("RGB"))[:, :, ::-1]
    marked = encoder.encode(np.ascontiguousarray(bgr), WATERMARK_METHOD)
    return Image.fromarray(np.ascontiguousarray(marked[:, :, ::-1]))


def read_watermark(image: Image.Image) -> bytes | None:
    """The hidden payload of ``image`` (None when the package is missing or it is too small).

    The payload is always 8 bytes: equal to ``WATERMARK`` when dreambot marked the image,
    noise otherwise.
    """
    if not _watermarkable(image):
        return None
    try:
        import numpy as np
        from imwatermark import WatermarkDecoder
    except ImportError:
        return None
    decoder = WatermarkDecoder("bytes", len(WATERMARK) * 8)
    bgr = np.asarray(image.convert("RGB"))[:, :, ::-1]
    payload: bytes = decoder.decode(np.ascontiguousarray(bgr), WATERMARK_METHOD)
    return payload


def open_rgb(data: bytes) -> Image.Image:
    """Decode image bytes (any format Pillow reads) to an RGB image; OSError if unreadable."""
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def encode_png(image: Image.Image, metadata: dict[str, str], *, watermark: bool = True) -> bytes:
    """The image as PNG bytes with ``metadata`` as text chunks and an AI-generated notice.

    With ``watermark`` the pixels also carry the invisible watermark where that is possible
    (see ``add_watermark``); the chunk ``dreambot:watermark`` records whether they do.
    """
    marked = add_watermark(image) if watermark else None
    info = PngInfo()
    info.add_text("Software", "dreambot")
    info.add_text("Comment", AI_NOTICE)
    for key, value in metadata.items():
        info.add_text(f"{KEY_PREFIX}{key}", value)
    info.add_text(f"{KEY_PREFIX}watermark", WATERMARK.decode() if marked is not None else "none")
    out = io.BytesIO()
    (marked or image).save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def text_chunks(image: Image.Image) -> dict[str, str]:
    """An opened image's PNG text chunks (none for other formats)."""
    return {str(k): str(v) for k, v in getattr(image, "text", {}).items()}


def read_png_metadata(data: bytes) -> dict[str, str]:
    """The text chunks of a PNG written by ``encode_png``."""
    with Image.open(io.BytesIO(data)) as image:
        return text_chunks(image)


def encode_jpeg(image: Image.Image, provenance: dict[str, str], quality: int) -> bytes:
    """``image`` as a JPEG carrying ``provenance`` (the text chunks of the PNG it copies)."""
    exif = Image.Exif()
    exif[ExifTags.Base.ImageDescription] = provenance.get("Comment", AI_NOTICE)
    exif[ExifTags.Base.Software] = provenance.get("Software", "dreambot")
    out = io.BytesIO()
    image.save(
        out,
        format="JPEG",
        quality=quality,
        exif=exif,
        comment=json.dumps(provenance, ensure_ascii=False).encode(),
    )
    return out.getvalue()


def _jpeg_provenance(image: Image.Image) -> dict[str, str]:
    try:
        found = json.loads(image.info.get("comment", b"{}"))
    except ValueError:  # a comment that is not ours
        return {}
    return {str(k): str(v) for k, v in found.items()} if isinstance(found, dict) else {}


def read_jpeg_metadata(data: bytes) -> dict[str, str]:
    """The provenance a JPEG made by ``encode_jpeg`` carries: its PNG's text chunks."""
    with Image.open(io.BytesIO(data)) as image:
        return _jpeg_provenance(image)


def inspect_png(data: bytes) -> dict[str, Any]:
    """What an image says about its origin: its dreambot metadata (prefix dropped), whether it
    is marked AI-generated, and what the invisible watermark check found.

    ``watermark`` is "found", "not found", "not checked (image smaller than 256×256)" or
    "not checked (install invisible-watermark)".
    """
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        if image.format == "JPEG":
            text = _jpeg_provenance(image)
        else:
            text = text_chunks(image)
        if not watermark_available():
            watermark = "not checked (install invisible-watermark)"
        elif not _watermarkable(image):
            watermark = (
                f"not checked (image smaller than {WATERMARK_MIN_SIDE}×{WATERMARK_MIN_SIDE})"
            )
        else:
            watermark = "found" if read_watermark(image) == WATERMARK else "not found"
        size = image.size
    return {
        "ai_generated": "AI-generated" in text.get("Comment", ""),
        "software": text.get("Software", ""),
        "metadata": {k[len(KEY_PREFIX) :]: v for k, v in text.items() if k.startswith(KEY_PREFIX)},
        "watermark": watermark,
        "size": size,
    }


def describe_png(data: bytes) -> str:
    """``inspect_png`` as lines a person reads (for ``dreambot inspect``)."""
    found = inspect_png(data)
    width, height = found["size"]
    lines = [
        f"size: {width}×{height}",
        f"AI-generated notice: {'yes' if found['ai_generated'] else 'no'}",
    ]
    if found["software"]:
        lines.append(f"software: {found['software']}")
    for key, value in found["metadata"].items():
        if key != "watermark":
            lines.append(f"{key}: {value}")
    lines.append(f"invisible watermark: {found['watermark']}")
    return "\n".join(lines)
