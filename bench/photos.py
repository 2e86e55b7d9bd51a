"""Synthetic subject photos: the same distinctive shape, framed differently in each photo."""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw


def subject_photos(count: int, size: int, *, seed: int = 0) -> list[Image.Image]:
    """``count`` photos of one "subject" (a red disc with a yellow square) on varied backgrounds.

    Sizes are larger than the training resolution so both trainers resize and crop.
    """
    rng = random.Random(seed)
    photos = []
    for _ in range(count):
        background = tuple(rng.randrange(60, 200) for _ in range(3))
        image = Image.new("RGB", (size, size), background)
        draw = ImageDraw.Draw(image)
        radius = rng.randrange(size // 5, size // 3)
        cx, cy = (rng.randrange(radius, size - radius) for _ in range(2))
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=(220, 30, 30))
        half = radius // 2
        draw.rectangle((cx - half // 2, cy - half // 2, cx + half, cy + half), fill=(250, 220, 0))
        photos.append(image)
    return photos


def save_photos(images: list[Image.Image], folder: Path, prefix: str) -> list[Path]:
    """Write ``images`` as PNG files into ``folder`` (created) and return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = folder / f"{prefix}-{i:03d}.png"
        image.save(path)
        paths.append(path)
    return paths


def load_photos(folder: Path) -> list[Image.Image]:
    """Every image file in ``folder``, in name order, fully read into memory."""
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return images
