"""The safety checker: Stable Diffusion's NSFW classifier, run on the images the engine posts.

Stable Diffusion 1.x/2.x folders ship the classifier their pipelines run (diffusers'
``StableDiffusionSafetyChecker``: a CLIP vision model whose image embedding is compared with
17 concept embeddings and 3 "special care" ones, each with its own threshold) beside its CLIP
preprocessor. The engine loads one checker at start (``DREAMBOT_SAFETY_CHECKER``) and loads
its pipelines without one, since a pipeline would only black out what it flags: the jobs
(``engine.generate_job``) instead screen the finished images, the previews and the showcase
cells, and withhold what is flagged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image

from bot.config import Settings

if TYPE_CHECKING:  # imported where a checker is loaded: the jobs import this module too
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

log = logging.getLogger(__name__)

MODEL_SUBFOLDER = "safety_checker"
PROCESSOR_SUBFOLDER = "feature_extractor"
"""Where a diffusers Stable Diffusion folder keeps the checker and its preprocessor."""


class SafetyCheckerError(RuntimeError):
    """The configured safety checker can't be used; the message names its folder."""


@dataclass
class SafetyChecker:
    """A loaded safety checker and its preprocessor, on the engine's device."""

    source: Path
    """The folder it was loaded from (what the engine's heartbeat reports)."""
    model: StableDiffusionSafetyChecker
    processor: CLIPImageProcessor

    def flagged(self, images: Sequence[Image.Image]) -> list[bool]:
        """Which of ``images`` the checker flags as NSFW, in one batched call (blocking: run
        it in the torch thread, which holds the GPU)."""
        if not images:
            return []
        batch = self.processor(
            images=[image.convert("RGB") for image in images], return_tensors="pt"
        )
        pixels = batch.pixel_values.to(device=self.model.device, dtype=self.model.dtype)
        with torch.inference_mode():
            # The checker also blacks out the flagged entries of ``images``; only its flags are
            # wanted here, so it gets a copy of the pixels to overwrite.
            _, flags = self.model(clip_input=pixels, images=pixels.clone())
        return [bool(flag) for flag in flags]


def screen(
    checker: SafetyChecker | None, images: Sequence[Image.Image]
) -> list[Image.Image | None]:
    """``images`` with each one ``checker`` flags replaced by None (withheld); all of them as
    they are when there is no checker (none configured, or the job asked for no check)."""
    if checker is None:
        return list(images)
    flags = checker.flagged(images)
    return [None if flag else image for image, flag in zip(images, flags, strict=True)]


def has_checker(folder: Path) -> bool:
    """Whether ``folder`` is laid out like a diffusers SD folder that ships a checker."""
    return (folder / MODEL_SUBFOLDER).is_dir() and (folder / PROCESSOR_SUBFOLDER).is_dir()


def checker_folder(settings: Settings) -> Path | None:
    """The folder ``DREAMBOT_SAFETY_CHECKER`` names: None for ``off``; for ``auto`` the first
    configured base model (the default first) that is a diffusers folder with a checker
    (real SD 1.x/2.x folders; SDXL and single files have none), else None; otherwise the path
    itself, or :class:`SafetyCheckerError` when there is nothing there."""
    if settings.safety_checker == "off":
        return None
    if settings.safety_checker == "auto":
        sources = (settings.model_source(name) for name in settings.model_names)
        return next((source for source in sources if has_checker(source)), None)
    folder = Path(settings.safety_checker).expanduser()
    if not folder.is_dir():
        raise SafetyCheckerError(f"no safety checker at {folder}: no such folder")
    return folder


def load_safety_checker(folder: Path, *, device: str, dtype: torch.dtype) -> SafetyChecker:
    """Load the checker in ``folder`` onto ``device`` in ``dtype``: a diffusers SD folder
    (``safety_checker/`` and ``feature_extractor/``) or one folder holding both the checker
    (``config.json`` and weights) and its ``preprocessor_config.json``, as
    CompVis/stable-diffusion-safety-checker is published. Nothing is downloaded; a folder that
    can't be read as a checker raises :class:`SafetyCheckerError` naming it."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    # diffusers' checker warns that it returns black images in place of the flagged ones; the
    # engine withholds them instead, and logs that itself.
    logging.getLogger(StableDiffusionSafetyChecker.__module__).setLevel(logging.ERROR)
    if has_checker(folder):
        model_folder, processor_folder = folder / MODEL_SUBFOLDER, folder / PROCESSOR_SUBFOLDER
    else:
        model_folder = processor_folder = folder
    try:
        model = StableDiffusionSafetyChecker.from_pretrained(model_folder, local_files_only=True)
        processor = CLIPImageProcessor.from_pretrained(processor_folder, local_files_only=True)
    except Exception as exc:  # transformers raises many types (OSError, ValueError, ...)
        raise SafetyCheckerError(f"cannot load the safety checker from {folder}: {exc}") from exc
    # transformers wraps PreTrainedModel.to in a decorator that mypy reads as unbound.
    model = model.to(device=device, dtype=dtype).eval()  # type: ignore[call-arg]
    return SafetyChecker(folder, model, processor)


def configured_checker(settings: Settings, device: str) -> SafetyChecker | None:
    """The checker ``DREAMBOT_SAFETY_CHECKER`` asks for, loaded onto ``device`` in the models'
    dtype (``engine.models.default_dtype``), or None; logs which it is (blocking)."""
    from engine.models import default_dtype

    folder = checker_folder(settings)
    if folder is None:
        if settings.safety_checker == "off":
            log.info("no safety checker (DREAMBOT_SAFETY_CHECKER=off): images are not checked")
        else:
            log.warning(
                "no safety checker: no base model folder has %s/ and %s/, and "
                "DREAMBOT_SAFETY_CHECKER names none; images are not checked",
                MODEL_SUBFOLDER,
                PROCESSOR_SUBFOLDER,
            )
        return None
    started = time.monotonic()
    checker = load_safety_checker(folder, device=device, dtype=default_dtype(device))
    log.info(
        "safety checker loaded from %s on %s in %.1fs", folder, device, time.monotonic() - started
    )
    return checker
