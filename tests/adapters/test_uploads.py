"""Batches under an upload limit and smaller JPEG copies, without a chat platform."""

from __future__ import annotations

import io
import random

from PIL import Image

from bot.adapters.uploads import Attachment, plan_uploads, smaller_copy, upload_notes
from engine.images import encode_png, inspect_png, read_jpeg_metadata, read_png_metadata


def noise_png(width: int, height: int) -> bytes:
    """A PNG of random pixels (about 3 bytes a pixel) with the engine's provenance chunks."""
    image = Image.frombytes("RGB", (width, height), random.Random(1).randbytes(width * height * 3))
    return encode_png(image, {"prompt": "a red fox", "seed": "7"}, watermark=False)


def test_a_smaller_copy_is_scaled_down_when_lower_quality_is_not_enough() -> None:
    png = noise_png(900, 600)
    limit = 100_000  # JPEG noise at quality 60 is several times that at this size

    copy = smaller_copy(png, limit)

    assert copy is not None and len(copy) <= limit
    with Image.open(io.BytesIO(copy)) as image:
        assert image.format == "JPEG"
        assert image.width < 900 and abs(image.width / image.height - 1.5) < 0.01
    assert read_jpeg_metadata(copy) == read_png_metadata(png)
    # `dreambot inspect` reads the copy as it reads the PNG.
    found = inspect_png(copy)
    assert found["ai_generated"] and found["metadata"] == inspect_png(png)["metadata"]


def test_a_file_that_is_no_image_is_left_out_with_a_note() -> None:
    [[upload]] = plan_uploads([("notes.txt", b"x" * 2000)], limit=1000, max_files=10)

    assert upload == Attachment("notes.txt", None)
    assert upload_notes([upload]) == [
        "notes.txt could not be made small enough to upload here and is not attached; "
        "dreambot keeps it."
    ]


def test_batches_keep_the_order_and_both_limits() -> None:
    files = [(f"{i}.png", bytes(300)) for i in range(12)]

    by_size = plan_uploads(files, limit=1000, max_files=10)
    by_count = plan_uploads(files, limit=10_000, max_files=10)

    assert [[u.name for u in batch] for batch in by_size] == [
        ["0.png", "1.png", "2.png"],
        ["3.png", "4.png", "5.png"],
        ["6.png", "7.png", "8.png"],
        ["9.png", "10.png", "11.png"],
    ]
    assert [len(batch) for batch in by_count] == [10, 2]
    assert plan_uploads([], limit=1000, max_files=10) == [[]]  # the text alone
