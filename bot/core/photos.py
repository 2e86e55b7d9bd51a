"""Photo intake for /train: decode, check, orient, centre-crop and re-encode uploaded photos.

Content is judged by decoding it, never by the file name. Decoding runs in a thread so a large
upload cannot block the chat adapter's event loop. Every photo is checked, so one reply lists
everything the user has to fix.
"""

from __future__ import annotations

import asyncio
import io
import warnings
from collections import Counter
from dataclasses import dataclass

from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError
from pillow_heif import register_heif_opener

from bot.core.errors import UserError, as_typed

# HEIF: iPhones' default (HEIC). AVIF is decoded by Pillow itself. MPO: multi-picture JPEG from
# phone cameras. Thumbnails, depth maps and other auxiliary images are never used, so pillow-heif
# is told not to look for them.
register_heif_opener(thumbnails=False, depth_images=False, aux_images=False)
ACCEPTED_FORMATS = {"JPEG", "MPO", "PNG", "WEBP", "HEIF", "AVIF"}
ACCEPTED_NAMES = "JPEG, PNG, WebP, HEIC or AVIF"
"""The accepted formats as users know them, for messages."""
MAX_PIXELS = 50_000_000
"""Refuse decompression bombs: a photo may not claim more pixels than this."""
THUMBNAIL_SIDE = 16
SAME_PHOTO_TOLERANCE = 24
"""Two photos are the same photo when no sample of their 16×16 colour thumbnails differs by more
than this (of 255). Re-encoded and resized copies stay within about 15; different shots, even
of one subject on a plain background moved by 1 % of the frame, differ by 30 or more
somewhere (see tests/test_photos.py)."""
BACKGROUND = (255, 255, 255)
"""Transparent parts of a photo (a product cut-out, say) are shown on white."""
_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
"""What the model was trained on; photos with another colour profile are converted to it."""


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


@dataclass(frozen=True)
class _Prepared:
    png: bytes
    thumbnail: bytes


def count_problem(count: int, rules: PhotoRules) -> str | None:
    """Why ``count`` photos can't be used for training, or None when the number is right."""
    if count < rules.min_count:
        return (
            f"You sent {count} photo{'s' if count != 1 else ''}; "
            f"training needs {rules.min_count} to {rules.max_count} photos of the subject."
        )
    if count > rules.max_count:
        return (
            f"You sent {count} photos; training takes at most {rules.max_count}. "
            "Pick the clearest ones."
        )
    return None


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit sRGB copy of ``image``: its colour profile applied, deeper samples scaled
    down, transparency on white."""
    image = _to_srgb(image)
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _to_8_bits(image)
    if image.has_transparency_data:
        opaque = Image.new("RGBA", image.size, BACKGROUND)
        return Image.alpha_composite(opaque, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def _to_srgb(image: Image.Image) -> Image.Image:
    """``image`` converted from its embedded colour profile to sRGB: iPhones' photos are in
    Display P3, print-ready JPEGs in CMYK profiles; read as sRGB they look washed out or off.
    Without a profile, or with one that can't be used, the pixels are taken as sRGB."""
    icc = image.info.get("icc_profile")
    if not icc or image.mode not in ("RGB", "RGBA", "CMYK"):
        return image
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        mode = "RGBA" if image.mode == "RGBA" else "RGB"
        converted = ImageCms.profileToProfile(image, source, _SRGB, outputMode=mode)
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return image
    return converted if converted is not None else image


def _to_8_bits(image: Image.Image) -> Image.Image:
    # Pillow's own conversion clips at 255, turning a 16-bit grey PNG (or HEIC) white.
    if image.mode.startswith("I;16"):
        peak = 65535
    else:
        # I and F: no accepted format decodes to these, so the range is a guess: samples above
        # 255 are read as 16-bit ones.
        peak = 255 if image.getextrema()[1] <= 255 else 65535  # type: ignore[operator]
    return image.convert("F").point(lambda value: value * 255 / peak).convert("L")


def mib(size: int) -> str:
    """A file size for messages, in MiB as the limits are set: ``20 MiB``, ``1.9 MiB``."""
    return f"{size / 2**20:.1f}".removesuffix(".0") + " MiB"


def _decode(label: str, data: bytes) -> Image.Image:
    """The photo in ``data``, fully decoded and turned upright; raise UserError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in ACCEPTED_FORMATS:
                raise UserError(
                    f"{label} is a {image.format or 'unknown'} file; send {ACCEPTED_NAMES} photos."
                )
            # Image.open has read only the header: refuse a giant before decoding it.
            if image.width * image.height > MAX_PIXELS:
                raise UserError(
                    f"{label} is {image.width}×{image.height} pixels, too large to use; "
                    f"send a copy of at most {MAX_PIXELS // 1_000_000} megapixels."
                )
            image.load()
            # HEIF is turned upright by libheif while decoding (pillow-heif then resets the
            # EXIF orientation), so this is a no-op there.
            return ImageOps.exif_transpose(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UserError(
            f"{label} claims too many pixels to use; send a copy of at most "
            f"{MAX_PIXELS // 1_000_000} megapixels."
        ) from exc
    # RuntimeError: how Pillow's AVIF decoder reports a damaged file.
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        ValueError,
        EOFError,
        RuntimeError,
    ) as exc:
        raise UserError(
            f"{label} could not be read as an image: it is damaged or not a photo. "
            f"Send {ACCEPTED_NAMES} photos."
        ) from exc


def _prepare_one(label: str, upload: Upload, rules: PhotoRules) -> _Prepared:
    if len(upload.data) > rules.max_bytes:
        raise UserError(
            f"{label} is {mib(len(upload.data))}; photos may be at most "
            f"{mib(rules.max_bytes)}. Send a smaller copy."
        )
    upright = _decode(label, upload.data)
    if min(upright.size) < rules.min_side:
        raise UserError(
            f"{label} is {upright.width}×{upright.height}; photos need at least "
            f"{rules.min_side} px on the short side. Send a larger photo."
        )
    rgb = to_rgb(upright)
    square = ImageOps.fit(rgb, (rules.size, rules.size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    square.save(out, format="PNG")
    side = (THUMBNAIL_SIDE, THUMBNAIL_SIDE)
    thumbnail = ImageOps.fit(rgb, side, Image.Resampling.BOX).tobytes()
    return _Prepared(out.getvalue(), thumbnail)


def _same_photo(a: _Prepared, b: _Prepared) -> bool:
    difference = max(abs(x - y) for x, y in zip(a.thumbnail, b.thumbnail, strict=True))
    return difference <= SAME_PHOTO_TOLERANCE


def _labels(uploads: list[Upload]) -> list[str]:
    """How each upload is named in messages: its file name, chosen by the user, as code
    (``as_typed``); chat clients often call every pasted image image.png, so a name that is
    not unique gets the photo's number."""
    names = Counter(upload.filename for upload in uploads)
    return [
        as_typed(upload.filename)
        if upload.filename and names[upload.filename] == 1
        else f"photo {number}" + (f" ({as_typed(upload.filename)})" if upload.filename else "")
        for number, upload in enumerate(uploads, 1)
    ]


def _prepare_all(uploads: list[Upload], rules: PhotoRules) -> list[bytes]:
    problems: list[str] = []
    kept: list[tuple[str, _Prepared]] = []
    for label, upload in zip(_labels(uploads), uploads, strict=True):
        try:
            photo = _prepare_one(label, upload, rules)
        except UserError as exc:
            problems.append(exc.message)
            continue
        original = next((seen for seen, other in kept if _same_photo(other, photo)), None)
        if original is not None:
            problems.append(
                f"{label} looks like the same photo as {original}; send "
                f"{rules.min_count}–{rules.max_count} different photos of the subject."
            )
            continue
        kept.append((label, photo))
    if problems:
        raise UserError("\n".join(problems))
    return [photo.png for _, photo in kept]


async def prepare_photos(uploads: list[Upload], rules: PhotoRules) -> list[bytes]:
    """Check the uploads and return them as square PNGs of ``rules.size``; raise UserError
    naming every photo that can't be used (one line each) and what to do about it."""
    problem = count_problem(len(uploads), rules)
    if problem is not None:
        raise UserError(problem)
    return await asyncio.to_thread(_prepare_all, uploads, rules)
