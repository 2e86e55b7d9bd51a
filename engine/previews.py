"""Cheap previews of an image while it is being drawn, straight from the latents.

A Stable Diffusion latent is close to a linear function of the image's colours, so a fixed
4×3 matrix per model family turns the current latents into a rough RGB picture at 1/8 of the
final size: no VAE decode, no extra weights, microseconds on any device. The factors are the
least-squares fits the community uses for live previews (e.g. ComfyUI's latent formats).
"""

from __future__ import annotations

import io

import torch
from PIL import Image

LATENT_RGB: dict[str, tuple[list[list[float]], list[float]]] = {
    # SD 1.x and 2.x share the VAE.
    "sd": (
        [
            [0.3512, 0.2297, 0.3227],
            [0.3250, 0.4974, 0.2350],
            [-0.2829, 0.1762, 0.2721],
            [-0.2120, -0.2616, -0.7177],
        ],
        [0.0, 0.0, 0.0],
    ),
    "sdxl": (
        [
            [0.3651, 0.4232, 0.4341],
            [-0.2533, -0.0042, 0.1068],
            [0.1076, 0.1111, -0.0362],
            [-0.3165, -0.2492, -0.2188],
        ],
        [0.1084, -0.0175, -0.0011],
    ),
}
"""Per family: the (4 latent channels → RGB) matrix and an RGB bias, for values in [-1, 1]."""

PREVIEW_SIDE = 128
"""Previews are scaled to this longer side: big enough to see the composition, a few kB."""


def latents_to_preview(
    latents: torch.Tensor, family: str = "sd", max_side: int = PREVIEW_SIDE
) -> Image.Image:
    """A small RGB image from one image's latents (shape 4×h×w)."""
    factors, bias = LATENT_RGB[family]
    matrix = torch.tensor(factors, dtype=torch.float32)
    with torch.no_grad():
        values = latents.detach().float().cpu()
        rgb = torch.einsum("chw,cr->hwr", values, matrix) + torch.tensor(bias)
        pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    image = Image.fromarray(pixels)
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR)


def encode_preview(image: Image.Image) -> bytes:
    """The preview as small JPEG bytes (it is a rough picture; PNG would only be larger)."""
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=70)
    return out.getvalue()
