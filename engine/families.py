"""Which Stable Diffusion family a base model belongs to, read from its files before loading.

The families differ in what training and generation must do: SD 1.x predicts the noise at
512 px; SD 2.x has 512 px "base" models predicting the noise and 768 px "-v" models
predicting the velocity (v-prediction); SDXL has two text encoders, a pooled text embedding
and size/crop conditioning at 1024 px. A diffusers folder says all of this in its configs; a
single checkpoint file shows its family in its tensor names (its prediction type and size only
in a config folder given beside it, else the family's usual values are assumed, as diffusers
does).

Nothing here imports torch or diffusers, so the engine can check every configured model
cheaply at start-up, before loading any.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

FamilyName = Literal["sd1", "sd2", "sdxl"]

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
"""Suffixes of single-file checkpoints (as distributed by most model sites)."""

FAMILY_LABELS: dict[str, str] = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}

_SDXL_PIPELINES = {"StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"}
_SD_PIPELINES = {"StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"}

# Tensor-name prefixes of the original (LDM) checkpoint layout, per text encoder.
_SDXL_SECOND_ENCODER = "conditioner.embedders.1."
_SD2_OPEN_CLIP = "cond_stage_model.model."
_SD1_CLIP = "cond_stage_model.transformer."
_LDM_UNET = "model.diffusion_model."


class ModelFormatError(ValueError):
    """The path is not a Stable Diffusion model this engine can serve; says why."""


@dataclass(frozen=True)
class ModelFamily:
    """What the engine needs to know about a base model before it trains or draws with it."""

    name: FamilyName
    prediction_type: str = "epsilon"
    """What the UNet predicts: "epsilon" (the noise) or "v_prediction" (the velocity)."""
    resolution: int = 512
    """Native image side in pixels: what the model was trained at."""

    @property
    def label(self) -> str:
        """Human-readable family name, e.g. "SD 2.x (v-prediction, 768 px)"."""
        detail = f"{self.resolution} px"
        if self.prediction_type != "epsilon":
            detail = f"{self.prediction_type.replace('_', '-')}, {detail}"
        return f"{FAMILY_LABELS[self.name]} ({detail})"

    @property
    def is_sdxl(self) -> bool:
        """Two text encoders, pooled text embeddings and size/crop conditioning."""
        return self.name == "sdxl"


def detect_family(source: str | Path, *, config: str | Path | None = None) -> ModelFamily:
    """The family of the model at ``source``: a diffusers folder or a single checkpoint file.

    For a single file, ``config`` (a diffusers folder of the same family, weights not needed)
    supplies prediction type and size when given. Raises :class:`ModelFormatError` naming the
    path when it is missing, unreadable or not a Stable Diffusion 1.x/2.x/SDXL model.
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise ModelFormatError(f"base model not found: {path}")
    if path.is_dir():
        return _family_of_folder(path)
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise ModelFormatError(
            f"base model {path} is neither a diffusers folder nor a "
            f"{'/'.join(SINGLE_FILE_SUFFIXES)} file"
        )
    name = _family_of_keys(path, checkpoint_keys(path))
    if config is not None:
        folder_family = _family_of_folder(Path(config).expanduser())
        if folder_family.name != name:
            raise ModelFormatError(
                f"base model {path} is {FAMILY_LABELS[name]} but its config folder {config} "
                f"is {FAMILY_LABELS[folder_family.name]}"
            )
        return folder_family
    # diffusers' own defaults for a bare file: SD 2.x means the 768 px v-prediction model.
    if name == "sd2":
        return ModelFamily("sd2", "v_prediction", 768)
    return ModelFamily(name, "epsilon", 1024 if name == "sdxl" else 512)


def family_from_configs(
    model_index: dict[str, Any],
    unet: dict[str, Any],
    scheduler: dict[str, Any],
    vae: dict[str, Any] | None = None,
) -> ModelFamily:
    """The family described by a diffusers folder's ``model_index.json`` and component configs."""
    pipeline = str(model_index.get("_class_name", ""))
    if pipeline in _SDXL_PIPELINES or "text_encoder_2" in model_index:
        name: FamilyName = "sdxl"
    elif pipeline in _SD_PIPELINES or not pipeline:
        # SD 2.x replaced CLIP ViT-L (768) with OpenCLIP ViT-H (1024) and uses linear
        # projections in its transformer blocks; SD 1.x has neither.
        sd2 = unet.get("cross_attention_dim") == 1024 or bool(unet.get("use_linear_projection"))
        name = "sd2" if sd2 else "sd1"
    else:
        raise ModelFormatError(f"pipeline {pipeline} is not Stable Diffusion 1.x/2.x or SDXL")
    vae_blocks = len((vae or {}).get("block_out_channels") or [0, 0, 0, 0])
    resolution = int(unet.get("sample_size") or 64) * 2 ** (vae_blocks - 1)
    prediction = str(scheduler.get("prediction_type") or "epsilon")
    return ModelFamily(name, prediction, resolution)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelFormatError(f"{path} is missing") from exc
    except (OSError, ValueError) as exc:
        raise ModelFormatError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path} is not a JSON object")
    return data


def _family_of_folder(folder: Path) -> ModelFamily:
    index_file = folder / "model_index.json"
    if not index_file.exists():
        raise ModelFormatError(f"{folder} is not a diffusers model folder (no model_index.json)")
    model_index = _read_json(index_file)
    unet = _read_json(folder / "unet" / "config.json")
    scheduler = _read_json(folder / "scheduler" / "scheduler_config.json")
    vae_file = folder / "vae" / "config.json"
    vae = _read_json(vae_file) if vae_file.exists() else None
    try:
        return family_from_configs(model_index, unet, scheduler, vae)
    except ModelFormatError as exc:
        raise ModelFormatError(f"{folder}: {exc}") from exc


def checkpoint_keys(path: Path) -> list[str]:
    """The tensor names in a single checkpoint file, read without loading the tensors where
    the format allows (a ``.safetensors`` header; a ``.ckpt`` is memory-mapped)."""
    try:
        if path.suffix.lower() == ".safetensors":
            return list(_safetensors_header(path))
        import torch  # only for .ckpt files: pickled torch archives

        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except ModelFormatError:
        raise
    except Exception as exc:  # torch raises many types for a file that is not a checkpoint
        raise ModelFormatError(f"cannot read base model {path}: {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelFormatError(f"base model {path} holds no state dict")
    return [str(key) for key in state]


def _safetensors_header(path: Path) -> dict[str, Any]:
    # The format: an 8-byte little-endian header length, then a JSON header naming every
    # tensor. Reading it directly keeps a 7 GB file closed.
    with path.open("rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise ModelFormatError(f"base model {path} is not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", raw)
        if length > 100_000_000:
            raise ModelFormatError(f"base model {path} is not a safetensors file (bad header)")
        try:
            header = json.loads(handle.read(length))
        except ValueError as exc:
            raise ModelFormatError(f"base model {path} is not a safetensors file: {exc}") from exc
    if not isinstance(header, dict):
        raise ModelFormatError(f"base model {path} is not a safetensors file (bad header)")
    header.pop("__metadata__", None)
    return header


def _family_of_keys(path: Path, keys: list[str]) -> FamilyName:
    if not any(key.startswith(_LDM_UNET) for key in keys):
        raise ModelFormatError(
            f"base model {path} is not a Stable Diffusion checkpoint in the original layout "
            f"(no {_LDM_UNET}* tensors)"
        )
    if any(key.startswith(_SDXL_SECOND_ENCODER) for key in keys):
        return "sdxl"
    if any(key.startswith(_SD2_OPEN_CLIP) for key in keys):
        return "sd2"
    if any(key.startswith(_SD1_CLIP) for key in keys):
        return "sd1"
    raise ModelFormatError(
        f"base model {path} has no text encoder this engine knows (SD 1.x CLIP, SD 2.x "
        "OpenCLIP or SDXL's two encoders)"
    )
