"""Loading a base model: the same code serves a real checkpoint and the tiny test model."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
"""Suffixes of single-file checkpoints (as distributed by most model sites)."""


class ModelLoadError(RuntimeError):
    """The base model could not be loaded; the message names the path and the reason."""


def resolve_device(name: str) -> str:
    """Turn a configured device name into a torch device string ("auto" picks cuda if present)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def default_dtype(device: str) -> torch.dtype:
    """The dtype to run a base model in on ``device``.

    fp32 on the CPU (half precision is slow or unsupported there); on a GPU bf16 where the card
    supports it (no overflow in the VAE, unlike fp16), fp16 otherwise.
    """
    if not device.startswith("cuda"):
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_pipeline(
    source: str | Path,
    *,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    config: str | Path | None = None,
) -> StableDiffusionPipeline:
    """Load a Stable Diffusion pipeline from a local diffusers folder or a single checkpoint file.

    Nothing is downloaded (``local_files_only``). ``dtype`` defaults to
    :func:`default_dtype` for ``device``. A single file carries weights only: diffusers takes
    the component configs (and tokenizer) from ``config``, a local diffusers folder of the same
    family (weights not needed), or else from the Hugging Face cache. Raises
    :class:`ModelLoadError` naming ``source`` when the path is missing or cannot be read as a
    model.
    """
    path = Path(source).expanduser()
    device = resolve_device(device)
    dtype = dtype or default_dtype(device)
    if not path.exists():
        raise ModelLoadError(f"base model not found: {path}")
    try:
        if path.is_dir():
            pipe = StableDiffusionPipeline.from_pretrained(
                path,
                dtype=dtype,
                local_files_only=True,
                safety_checker=None,
                requires_safety_checker=False,
            )
        elif path.suffix.lower() in SINGLE_FILE_SUFFIXES:
            # diffusers still tries the Hub for configs it cannot find locally despite
            # local_files_only; set HF_HUB_OFFLINE=1 on hosts without network.
            pipe = StableDiffusionPipeline.from_single_file(
                str(path),
                dtype=dtype,
                local_files_only=True,
                config=str(config) if config is not None else None,
            )
        else:
            raise ModelLoadError(
                f"base model {path} is neither a diffusers folder nor a "
                f"{'/'.join(SINGLE_FILE_SUFFIXES)} file"
            )
    except ModelLoadError:
        raise
    except Exception as exc:  # diffusers raises many types (OSError, ValueError, KeyError...)
        raise ModelLoadError(f"cannot load base model {path}: {exc}") from exc
    pipe = pipe.to(device)
    # Progress goes to the chat through our own callbacks; tqdm bars only clutter worker logs.
    pipe.set_progress_bar_config(disable=True)
    return pipe
