"""Loading base models: the same code serves real checkpoints and the tiny test models.

A base model is a local diffusers folder or a single ``.safetensors``/``.ckpt`` checkpoint of
the Stable Diffusion 1.x, 2.x or SDXL family (see ``engine.families``); its family picks the
pipeline class. The engine serves several named models at once, each with its own warm
pipeline and :class:`~engine.generation.Generator` (:class:`ServedModel`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from engine.families import (
    SINGLE_FILE_SUFFIXES,
    ModelFamily,
    ModelFormatError,
    detect_family,
)

if TYPE_CHECKING:
    from engine.generation import Generator

__all__ = [
    "SINGLE_FILE_SUFFIXES",
    "BasePipeline",
    "DeviceError",
    "ModelLoadError",
    "ServedModel",
    "default_dtype",
    "load_pipeline",
    "resolve_device",
    "served_model",
]

BasePipeline = StableDiffusionPipeline | StableDiffusionXLPipeline
"""A loaded base model: SD 1.x/2.x or SDXL text-to-image pipeline."""


class ModelLoadError(RuntimeError):
    """The base model could not be loaded; the message names the path and the reason."""


class DeviceError(RuntimeError):
    """The configured device can't be used by this machine's torch; the message says why."""


def resolve_device(name: str) -> str:
    """The torch device string for a configured device name, checked.

    "auto" is the device accelerate's ``PartialState`` places work on: a CUDA GPU, Apple's
    MPS, Intel's XPU or another accelerator torch was built for, else the CPU. A named device
    ("cpu", "cuda", "cuda:1", "mps", …) must be one this torch build can use, or
    :class:`DeviceError` says so before any model is loaded.
    """
    if name == "auto":
        from accelerate import PartialState

        return str(PartialState().device)
    try:
        torch.empty(0, device=torch.device(name))
    except (RuntimeError, AssertionError, NotImplementedError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DeviceError(
            f"device {name!r} can't be used here ({reason}). Set DREAMBOT_DEVICE to 'auto' "
            "(the GPU or other accelerator torch finds, else the CPU), 'cpu', or a device "
            "this machine has, e.g. 'cuda:0'."
        ) from exc
    return name


def default_dtype(device: str) -> torch.dtype:
    """The dtype to run a base model in on ``device``.

    fp32 on the CPU (half precision is slow or unsupported there); on a CUDA GPU bf16 where the
    card supports it (no overflow in the VAE, unlike fp16), fp16 otherwise. Other accelerators
    (MPS, XPU) get fp32 too: half precision is measured on CUDA only.
    """
    if not device.startswith("cuda"):
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def check_model(source: str | Path, *, config: str | Path | None = None) -> ModelFamily:
    """The family of the model at ``source``, or :class:`ModelLoadError` naming the path."""
    try:
        return detect_family(source, config=config)
    except ModelFormatError as exc:
        raise ModelLoadError(str(exc)) from exc


def load_pipeline(
    source: str | Path,
    *,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    config: str | Path | None = None,
) -> BasePipeline:
    """Load a base model from a local diffusers folder or a single checkpoint file.

    The family (``engine.families``) picks the pipeline: ``StableDiffusionXLPipeline`` for
    SDXL, ``StableDiffusionPipeline`` for SD 1.x/2.x. Nothing is downloaded
    (``local_files_only``). ``dtype`` defaults to :func:`default_dtype` for ``device``. A single
    file carries weights only: diffusers takes the component configs (and tokenizers) from
    ``config``, a local diffusers folder of the same family (weights not needed), or else from
    the Hugging Face cache. Raises :class:`ModelLoadError` naming ``source`` when the path is
    missing or cannot be read as a model.
    """
    path = Path(source).expanduser()
    device = resolve_device(device)
    dtype = dtype or default_dtype(device)
    family = check_model(path, config=config)
    pipeline_class: Any = StableDiffusionXLPipeline if family.is_sdxl else StableDiffusionPipeline
    # SDXL pipelines have no safety checker; SD ones must be told not to want one: the engine
    # runs its own on what it posts (engine.safety), where a pipeline's would only black out.
    extra: dict[str, Any] = (
        {}
        if family.is_sdxl
        else {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    )
    try:
        if path.is_dir():
            pipe = pipeline_class.from_pretrained(path, dtype=dtype, local_files_only=True, **extra)
        else:
            # diffusers still tries the Hub for configs it cannot find locally despite
            # local_files_only; set HF_HUB_OFFLINE=1 on hosts without network.
            pipe = pipeline_class.from_single_file(
                str(path),
                dtype=dtype,
                local_files_only=True,
                config=str(config) if config is not None else None,
                **extra,
            )
    except Exception as exc:  # diffusers raises many types (OSError, ValueError, KeyError...)
        raise ModelLoadError(f"cannot load base model {path}: {exc}") from exc
    pipe = pipe.to(device)
    # Progress goes to the chat through our own callbacks; tqdm bars only clutter worker logs.
    pipe.set_progress_bar_config(disable=True)
    loaded: BasePipeline = pipe
    return loaded


@dataclass
class ServedModel:
    """One configured base model, loaded and warm in an engine."""

    name: str
    """The name jobs use for it (``TrainRequest.base_model``): a ``DREAMBOT_MODELS`` key."""
    source: Path
    """Its local diffusers folder or checkpoint file."""
    key: str
    """Short stable name for caches (class priors) keyed per model."""
    family: ModelFamily
    pipe: BasePipeline
    generator: Generator


def served_model(ctx: dict[str, Any], name: str) -> ServedModel:
    """The model ``name`` that this engine serves, or an ``EngineError`` listing the served
    ones (a job for a model this engine was not configured with)."""
    from engine.reporting import EngineError

    models: dict[str, ServedModel] = ctx["models"]
    try:
        return models[name]
    except KeyError:
        served = ", ".join(f"'{n}'" for n in models)
        raise EngineError(
            f"this engine serves the base model{'s' if len(models) > 1 else ''} {served}, "
            f"not '{name}'."
        ) from None
