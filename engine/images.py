"""PNG encoding with provenance metadata. Torch-free."""

from __future__ import annotations

import io

from PIL import Image
from PIL.PngImagePlugin import PngInfo

AI_NOTICE = "AI-generated image (dreambot)"


def encode_png(image: Image.Image, metadata: dict[str, str]) -> bytes:
    """The image as PNG bytes with ``metadata`` as text chunks and an AI-generated notice."""
    info = PngInfo()
    info.add_text("Software", "dreambot")
    info.add_text("Comment", AI_NOTICE)
    for key, value in metadata.items():
        info.add_text(f"dreambot:{key}", value)
    out = io.BytesIO()
    image.save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def read_png_metadata(data: bytes) -> dict[str, str]:
    """The text chunks of a PNG written by ``encode_png``."""
    with Image.open(io.BytesIO(data)) as image:
        return {str(k): str(v) for k, v in getattr(image, "text", {}).items()}
