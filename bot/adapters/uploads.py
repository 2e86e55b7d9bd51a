"""A result's files as chat messages can carry them: batches under an upload limit, and a
smaller JPEG copy of an image too large on its own.

Platform-free and blocking (it decodes and re-encodes images): adapters run ``plan_uploads``
in a thread. A smaller copy says where it came from as the stored PNG does
(``engine.images.encode_jpeg``: the PNG's text chunks in the JPEG's comment, the notice in its
EXIF). The stored PNG itself is never changed.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

from PIL import Image

from bot.core.errors import spoken_list
from engine.images import AI_NOTICE, encode_jpeg, text_chunks

DEFAULT_UPLOAD_LIMIT = 10 * 1024 * 1024
"""Discord's per-message upload limit for bots in a server without boosts, and in DMs."""
JPEG_QUALITIES = (90, 80, 70, 60)
MIN_SIDE = 64
"""A smaller copy is not shrunk below this many pixels on its longer side."""
MAX_ROUNDS = 8


@dataclass(frozen=True)
class Attachment:
    """One stored file as a message attaches it: as stored, as a smaller JPEG copy
    (``copy_of`` names the stored file), or not at all (``data`` is None: nothing fits)."""

    name: str
    data: bytes | None
    copy_of: str | None = None


def smaller_copy(data: bytes, limit: int) -> bytes | None:
    """An image as a JPEG of at most ``limit`` bytes with the same provenance: lower quality
    first, then smaller sizes; None if ``data`` is no image or nothing fits."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            text = text_chunks(image)
            original = image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    # Everything a bot posts as a result was generated: say so even if the chunks are missing.
    provenance = {"Software": "dreambot", "Comment": AI_NOTICE, **text}
    resized = original
    for _ in range(MAX_ROUNDS):
        for quality in JPEG_QUALITIES:
            encoded = encode_jpeg(resized, provenance, quality)
            if len(encoded) <= limit:
                return encoded
        # JPEG size grows about with the pixel count: aim under the limit in one step.
        factor = max(0.25, min(0.9, 0.9 * math.sqrt(limit / len(encoded))))
        width, height = round(resized.width * factor), round(resized.height * factor)
        if max(width, height) < MIN_SIDE or min(width, height) < 1:
            return None
        resized = original.resize((width, height), Image.Resampling.LANCZOS)
    return None


def fit_upload(name: str, data: bytes, limit: int) -> Attachment:
    """The file as stored if it fits ``limit``, else a smaller JPEG copy, else left out."""
    if len(data) <= limit:
        return Attachment(name, data)
    copy = smaller_copy(data, limit)
    if copy is None:
        return Attachment(name, None)
    return Attachment(str(PurePosixPath(name).with_suffix(".jpg")), copy, copy_of=name)


def plan_uploads(
    files: Sequence[tuple[str, bytes]], limit: int, max_files: int
) -> list[list[Attachment]]:
    """``files`` in order as messages of at most ``max_files`` files and ``limit`` bytes
    (always at least one, perhaps empty, message). Blocking: run it in a thread."""
    batches: list[list[Attachment]] = [[]]
    size = count = 0
    for name, data in files:
        upload = fit_upload(name, data, limit)
        length = len(upload.data) if upload.data is not None else 0
        attached = int(upload.data is not None)
        if count + attached > max_files or size + length > limit:
            batches.append([])
            size = count = 0
        batches[-1].append(upload)
        size += length
        count += attached
    return batches


def upload_notes(batch: list[Attachment]) -> list[str]:
    """What a message says about its files that are smaller copies or missing (one line
    each kind; none when every file is attached as stored)."""
    notes = []
    copied = [u.copy_of for u in batch if u.copy_of is not None]
    if len(copied) == 1:
        notes.append(
            f"{copied[0]} was too large to upload here, so it is attached as a smaller JPEG; "
            "dreambot keeps the full-size original with its metadata."
        )
    elif copied:
        notes.append(
            f"{spoken_list(copied)} were too large to upload here, so they are attached as smaller "
            "JPEGs; dreambot keeps the full-size originals with their metadata."
        )
    missing = [u.name for u in batch if u.data is None]
    if missing:
        notes.append(
            f"{spoken_list(missing)} could not be made small enough to upload here and "
            f"{'is' if len(missing) == 1 else 'are'} not attached; dreambot keeps "
            f"{'it' if len(missing) == 1 else 'them'}."
        )
    return notes


def not_attached_note(count: int) -> str:
    """The line that replaces images this channel refused at every size tried."""
    if count == 1:
        return (
            "The image was too large to upload here, so it is not attached; dreambot keeps "
            "the full-size original."
        )
    return (
        f"The {count} images were too large to upload here, so they are not attached; "
        "dreambot keeps the full-size originals."
    )
