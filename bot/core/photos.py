"""Photo intake for /train: decode, check, orient, centre-crop and re-encode uploaded photos.

Content is judged by decoding it, never by the file name. Decoding runs in a thread so a large
upload cannot block the chat adapter's event loop.
"""

from __future__ import annotations

import asyncio
import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from bot.core.errors import UserError

ACCEPTED_FORMATS = {"JPEG", "PNG", "WEBP", "MPO"}  # MPO: multi-picture JPEG from phone cameras
MAX_PIXELS = 50_000_000
"""Refuse decompression bombs: a photo may not claim more pixels than this."""


@dataclass(frozen=True)
class Upload:
    """A file as the user sent it."""

    filename: str
    data: bytes


@dataclass(frozen=True)
class PhotoRules:
    """Limits applied to a /train upload."""

    min_count: int = 3
    max_count: int = 20
    min_side: int = 256
    max_bytes: int = 20 * 1024 * 1024
    size: int = 512


def _prepare_one(upload: Upload, rules: PhotoRules) -> bytes:
    name = upload.filename or "a photo"
    if len(upload.data) > rules.max_bytes:
        raise UserError(
            f"{name} is {len(upload.data) / 1e6:.1f} MB; photos may be at most "
            f"{rules.max_bytes / 1e6:.0f} MB. Send a smaller copy."
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(upload.data))
            if image.format not in ACCEPTED_FORMATS:
                raise UserError(
                    f"{name} is a {image.format or 'unknown'} file; send JPEG, PNG or WebP photos."
                )
            if image.width * image.height > MAX_PIXELS:
                raise UserError(f"{name} is {image.width}×{image.height} pixels, too large to use.")
            image.load()
    except UserError:
        raise
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as exc:
        raise UserError(
            f"{name} could not be read as an image ({type(exc).__name__}); "
            "send JPEG, PNG or WebP photos."
        ) from exc
    upright = ImageOps.exif_transpose(image)
    if min(upright.size) < rules.min_side:
        raise UserError(
            f"{name} is {upright.width}×{upright.height}; photos need at least "
            f"{rules.min_side} px on the short side. Send a larger photo."
        )
    square = ImageOps.fit(
        upright.convert("RGB"), (rules.size, rules.size), Image.Resampling.LANCZOS
    )
    out = io.BytesIO()
    square.save(out, format="PNG")
    return out.getvalue()


def _prepare_all(uploads: list[Upload], rules: PhotoRules) -> list[bytes]:
    return [_prepare_one(upload, rules) for upload in uploads]


async def prepare_photos(uploads: list[Upload], rules: PhotoRules) -> list[bytes]:
    """Check the uploads and return them as square PNGs of ``rules.size``; raise UserError."""
    if len(uploads) < rules.min_count:
        raise UserError(
            f"You sent {len(uploads)} photo{'s' if len(uploads) != 1 else ''}; "
            f"training needs {rules.min_count} to {rules.max_count} photos of the subject."
        )
    if len(uploads) > rules.max_count:
        raise UserError(
            f"You sent {len(uploads)} photos; training takes at most {rules.max_count}. "
            "Pick the clearest ones."
        )
    return await asyncio.to_thread(_prepare_all, uploads, rules)
