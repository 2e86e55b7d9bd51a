"""Aspect ratios mapped to sizes a base model draws well. Torch-free.

A model draws best at about the pixel count it was trained at (its native square: 64 for the
tiny test model, 512 for SD 1.x, 768 for SD 2.x, 1024 for SDXL), so every aspect keeps that
area and rounds its sides to the multiples the model's latents need: 64 px for real models
(the UNet halves the latent three times), 8 px for anything smaller than 512.
"""

from __future__ import annotations

import math

from engine.api import ASPECT_RATIOS, Aspect


def size_multiple(native: int) -> int:
    """The multiple both sides are rounded to for a model of native side ``native``."""
    return 64 if native >= 512 else 8


def aspect_size(aspect: Aspect, native: int) -> tuple[int, int]:
    """(width, height) for ``aspect`` on a model whose native size is ``native``×``native``.

    >>> aspect_size("portrait", 512), aspect_size("wide", 1024)
    ((448, 640), (1344, 768))
    """
    across, down = ASPECT_RATIOS[aspect]
    multiple = size_multiple(native)
    ratio = across / down
    width = native * math.sqrt(ratio)
    height = native / math.sqrt(ratio)

    def snap(side: float) -> int:
        return max(multiple, round(side / multiple) * multiple)

    return snap(width), snap(height)
