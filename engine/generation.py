"""Image generation on the warm base model, with subject adapters swapped in by name."""

from __future__ import annotations

import hashlib
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
from PIL import Image

AdapterSpec = tuple[str, Path, float]
"""(adapter name, local ``.safetensors`` path, scale)."""


def _peft_name(name: str) -> str:
    # peft keeps adapters in torch ModuleDicts, whose keys may not contain "."; hashing maps any
    # subject id to a safe, stable name.
    return "subject_" + hashlib.sha1(name.encode()).hexdigest()[:16]


def _step_reporter(
    progress: Callable[[int, int], None], steps: int
) -> Callable[[StableDiffusionPipeline, int, object, dict[str, Any]], dict[str, Any]]:
    def on_step_end(
        pipe: StableDiffusionPipeline, index: int, timestep: object, kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        progress(index + 1, steps)
        return {}  # diffusers merges the returned tensors back; we change nothing

    return on_step_end


class Generator:
    """Generates images from a warm pipeline, loading each subject adapter once.

    Up to ``max_adapters`` adapters stay loaded (least recently used is dropped first), so a
    busy subject costs one file read, not one per request. Not thread-safe: one call at a time
    per pipeline (the scheduler keeps per-run state and adapters are switched per call).
    """

    def __init__(self, pipe: StableDiffusionPipeline, *, max_adapters: int = 8) -> None:
        """Wrap ``pipe``; its modules are shared, its own scheduler is left as it was."""
        if max_adapters < 1:
            raise ValueError("max_adapters must be at least 1")
        # DPM-Solver++ gives good images in ~25 steps. A second pipeline object shares the UNet,
        # VAE and text encoder but has its own scheduler, so the caller's pipeline (whose
        # scheduler config training reads) is unchanged. Not from_pipe: it casts the shared
        # modules to fp32 unless given a dtype.
        components = dict(pipe.components)
        components["scheduler"] = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        components["requires_safety_checker"] = False
        self._pipe = StableDiffusionPipeline(**components)
        self._pipe.set_progress_bar_config(disable=True)
        self._max_adapters = max_adapters
        self._loaded: OrderedDict[str, Path] = OrderedDict()  # name → file, oldest first
        self.native_size = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)

    @property
    def loaded_adapters(self) -> list[str]:
        """Names of the adapters held in memory, least recently used first."""
        return list(self._loaded)

    def generate(
        self,
        prompt: str,
        *,
        negative_prompt: str = "",
        count: int = 4,
        seed: int,
        steps: int = 25,
        guidance: float = 7.5,
        width: int | None = None,
        height: int | None = None,
        adapters: Sequence[AdapterSpec] = (),
        progress: Callable[[int, int], None] | None = None,
    ) -> list[Image.Image]:
        """Generate ``count`` images for ``prompt`` in one batch.

        The same arguments give the same images. With no ``adapters`` the output is exactly the
        base model's, whatever was generated before. ``width``/``height`` default to the
        model's native size and must be multiples of 8. ``progress(step, steps)`` is called
        after each denoising step.
        """
        width = width or self.native_size
        height = height or self.native_size
        if width % 8 or height % 8:
            raise ValueError(f"width and height must be multiples of 8, got {width}x{height}")
        if count < 1:
            raise ValueError("count must be at least 1")
        self._activate(adapters)
        device = self._pipe._execution_device
        result = self._pipe(
            prompt,
            negative_prompt=negative_prompt,
            num_images_per_prompt=count,
            num_inference_steps=steps,
            guidance_scale=guidance,
            width=width,
            height=height,
            generator=torch.Generator(device).manual_seed(seed),
            output_type="pil",
            callback_on_step_end=_step_reporter(progress, steps) if progress else None,
        )
        return list(result.images)

    def forget_adapter(self, name: str) -> None:
        """Unload adapter ``name`` if it is loaded (e.g. the subject was deleted or retrained)."""
        if self._loaded.pop(name, None) is not None:
            self._pipe.delete_adapters(_peft_name(name))

    def _activate(self, adapters: Sequence[AdapterSpec]) -> None:
        if not adapters:
            # Adapters live inside the shared UNet; switching them off restores the exact base.
            if self._unet_adapters():
                self._pipe.disable_lora()
            return
        if len(adapters) > self._max_adapters:
            raise ValueError(f"at most {self._max_adapters} adapters per generation")
        for name, path, _scale in adapters:
            self._ensure_loaded(name, Path(path))
        self._evict(keep={name for name, _, _ in adapters})
        self._pipe.enable_lora()
        self._pipe.set_adapters(
            [_peft_name(name) for name, _, _ in adapters],
            adapter_weights=[float(scale) for _, _, scale in adapters],
        )

    def _ensure_loaded(self, name: str, path: Path) -> None:
        if self._loaded.get(name) == path:
            self._loaded.move_to_end(name)
            return
        if name in self._loaded:  # same subject, new file: it was retrained
            self.forget_adapter(name)
        elif _peft_name(name) in self._unet_adapters():
            # Loaded into the shared UNet by another Generator, from a file we cannot vouch for.
            self._pipe.delete_adapters(_peft_name(name))
        with warnings.catch_warnings():
            # peft warns whenever a model gets a second adapter; holding several is the point.
            warnings.filterwarnings(
                "ignore", message="Already found a `peft_config` attribute", category=UserWarning
            )
            self._pipe.load_lora_weights(
                str(path.parent), weight_name=path.name, adapter_name=_peft_name(name)
            )
        self._loaded[name] = path

    def _evict(self, keep: set[str]) -> None:
        for name in list(self._loaded):
            if len(self._loaded) <= self._max_adapters:
                break
            if name not in keep:
                self.forget_adapter(name)

    def _unet_adapters(self) -> set[str]:
        return set(getattr(self._pipe.unet, "peft_config", None) or ())
