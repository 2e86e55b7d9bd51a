"""Image generation on the warm base model, with subject adapters swapped in by name."""

from __future__ import annotations

import hashlib
import time
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from peft.tuners.tuners_utils import BaseTunerLayer
from PIL import Image

from engine.previews import latents_to_preview
from engine.text_lora import load_lora_file

AdapterSpec = tuple[str, Path, float]
"""(adapter name, local ``.safetensors`` path, scale)."""

PreviewSink = Callable[[int, int, Image.Image], None]
"""Called with (step, total steps, small preview image) while an image is being drawn."""


def _peft_name(name: str) -> str:
    # peft keeps adapters in torch ModuleDicts, whose keys may not contain "."; hashing maps any
    # subject id to a safe, stable name.
    return "subject_" + hashlib.sha1(name.encode()).hexdigest()[:16]


def _slot_name(index: int) -> str:
    return f"slot_{index}"


@contextmanager
def _quiet_peft() -> Iterator[None]:
    # peft warns whenever a model gets a second adapter; holding several is the point.
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="Already found a `peft_config` attribute", category=UserWarning
        )
        yield


FusedKey = tuple[tuple[str, str, float], ...]
"""(adapter name, file, scale) of each adapter merged into a UNet."""


@dataclass
class _Merged:
    """A LoRA layer whose adapters are merged into its base layer, which stands in its place."""

    layer: BaseTunerLayer
    parent: torch.nn.Module
    attr: str
    saved: tuple[torch.Tensor, torch.Tensor | None]
    """The base layer's (weight, bias) before the merge."""


class _Fused:
    """Which adapters are merged into a UNet's weights, and the base weights they replaced."""

    def __init__(self) -> None:
        self.key: FusedKey = ()
        """The merged adapters; empty while the UNet holds its base weights."""
        self.merged: list[_Merged] = []
        self.backup: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        """Module name → copy of its base layer's (weight, bias), made before its first merge
        and kept for later ones (the base weights never change)."""


# Per UNet, not per Generator: every Generator on a pipeline (the engine's, the class priors',
# evaluation's) shares the UNet, so each must see what the others merged into it. Weak keys:
# the state goes with its UNet. Not a UNet attribute, so training's deep copy leaves it out.
_FUSED: weakref.WeakKeyDictionary[torch.nn.Module, _Fused] = weakref.WeakKeyDictionary()


def restore_base_weights(unet: torch.nn.Module) -> None:
    """Take merged adapters back out of ``unet``: its LoRA layers return to their places and
    its weights become the base weights again, bit for bit, from the copies made before
    merging (subtracting the adapters again would leave rounding residue). Call before
    anything that reads the base weights or the LoRA layers itself (training copies the
    UNet); generation does it on its own."""
    fused = _FUSED.get(unet)
    if fused is None or not fused.key:
        return
    with torch.no_grad():
        for merged in fused.merged:
            setattr(merged.parent, merged.attr, merged.layer)
            base = merged.layer.get_base_layer()
            weight, bias = merged.saved
            base.weight.copy_(weight)
            if bias is not None:
                base.bias.copy_(bias)
            merged.layer.merged_adapters = []
    fused.key, fused.merged = (), []


def _fuse(unet: torch.nn.Module, key: FusedKey, names: list[str]) -> None:
    """Merge the adapters ``names`` (active, their weights set) into ``unet``'s base weights
    and put each base layer in its LoRA layer's place, so the UNet runs as fast as the base
    (a merged peft layer still costs a Python call per layer and step)."""
    fused = _FUSED.setdefault(unet, _Fused())
    if fused.key:
        raise RuntimeError("adapters are merged already: restore_base_weights() first")
    fused.key = key  # from here on, an error restores what was merged so far
    try:
        with torch.no_grad():
            for name, module in list(unet.named_modules()):
                if not isinstance(module, BaseTunerLayer):
                    continue
                wanted = [n for n in names if n in getattr(module, "lora_A", {})]
                if not wanted:
                    continue
                base = module.get_base_layer()
                saved = fused.backup.get(name)
                if saved is None:
                    bias = getattr(base, "bias", None)
                    saved = (
                        base.weight.detach().clone(),
                        bias.detach().clone() if bias is not None else None,
                    )
                    fused.backup[name] = saved
                parent_name, _, attr = name.rpartition(".")
                merged = _Merged(module, unet.get_submodule(parent_name), attr, saved)
                fused.merged.append(merged)  # first: a merge that fails half-way is undone too
                module.merge(adapter_names=wanted)
                setattr(merged.parent, attr, base)
    except BaseException:
        restore_base_weights(unet)
        raise


class AdapterLoadError(ValueError):
    """An adapter file could not be loaded (truncated, damaged, not a LoRA of this model); the
    pipeline is left as it was."""


class _StepHook:
    """The pipeline's per-step callback: progress, and now and then a latent preview."""

    def __init__(
        self,
        total: int,
        progress: Callable[[int, int], None] | None,
        preview: PreviewSink | None,
        preview_every: float,
        family: str,
    ) -> None:
        self.total, self.progress, self.preview = total, progress, preview
        self.preview_every = preview_every
        self.family = family
        """Which latent-to-RGB factors the previews use (``engine.previews.LATENT_RGB``)."""
        self._last_preview = time.monotonic()  # the first preview after one interval

    def __call__(
        self, pipe: Any, index: int, timestep: object, kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        step = index + 1
        if self.progress is not None:
            self.progress(step, self.total)
        now = time.monotonic()
        if (
            self.preview is not None
            and step < self.total
            and now - self._last_preview >= self.preview_every
            and "latents" in kwargs
        ):
            self._last_preview = now
            image = latents_to_preview(kwargs["latents"][0], self.family)
            self.preview(step, self.total, image)
        return {}  # diffusers merges the returned tensors back; we change nothing


class Generator:
    """Generates images from a warm pipeline, loading each subject adapter once.

    Up to ``max_adapters`` adapters stay loaded (least recently used is dropped first), so a
    busy subject costs one file read, not one per request. Not thread-safe: one call at a time
    per pipeline (the scheduler keeps per-run state and adapters are switched per call).

    With ``hotswap`` (for a compiled UNet on a GPU) the UNet instead holds ``hotswap_slots``
    fixed adapter slots whose weights are replaced in place (diffusers' LoRA hot-swapping),
    so switching subjects never changes the UNet's structure and a ``torch.compile``d UNet is
    not recompiled; each switch then reads the adapter file again (small, and in the OS cache).
    ``compile`` compiles the UNet after the first adapter is loaded (the first generation with
    a subject pays the warm-up).

    Otherwise, with ``fuse`` (the default), the adapters of a generation are merged into the
    UNet's weights while it runs: the same images as running them beside the base layers, up
    to rounding, but with no LoRA work per step (run beside them, a subject took 0.854 s of a
    512 px image against 0.548 s without one, on an H200). The merge is undone from saved
    copies of the base weights when the next generation wants other adapters or none; a
    generation with the same adapters reuses it. The copies cost the memory of the attention
    projections that the adapters touch.
    """

    def __init__(
        self,
        pipe: StableDiffusionPipeline | StableDiffusionXLPipeline,
        *,
        max_adapters: int = 8,
        hotswap: bool = False,
        hotswap_slots: int = 4,
        hotswap_rank: int = 64,
        compile: bool = False,
        fuse: bool = True,
    ) -> None:
        """Wrap ``pipe``; its modules are shared, its own scheduler is left as it was."""
        if max_adapters < 1 or hotswap_slots < 1:
            raise ValueError("max_adapters and hotswap_slots must be at least 1")
        # DPM-Solver++ (multistep, 2nd order) gives good images in ~25 steps. A second pipeline
        # object shares the UNet, VAE and text encoder but has its own scheduler, so the
        # caller's pipeline (whose scheduler config training reads) is unchanged. Not from_pipe:
        # it casts the shared modules to fp32 unless given a dtype.
        components = dict(pipe.components)
        components["scheduler"] = DPMSolverMultistepScheduler.from_config(
            pipe.scheduler.config, algorithm_type="dpmsolver++", solver_order=2
        )
        text2img: Any
        img2img: Any
        if isinstance(pipe, StableDiffusionXLPipeline):
            # Same loop, two text encoders; our PNG writer watermarks (optionally) instead.
            text2img, img2img = StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline
            components["add_watermarker"] = False
            self._latent_family = "sdxl"
        else:
            text2img, img2img = StableDiffusionPipeline, StableDiffusionImg2ImgPipeline
            components["requires_safety_checker"] = False
            self._latent_family = "sd"
        self._pipe = text2img(**components)
        self._pipe.set_progress_bar_config(disable=True)
        # img2img (Vary, Upscale) on the very same modules and scheduler.
        self._img2img = img2img(**components)
        self._img2img.set_progress_bar_config(disable=True)
        self._max_adapters = max_adapters
        self._loaded: OrderedDict[str, Path] = OrderedDict()  # name → file, oldest first
        self._hotswap = hotswap
        self._slots: list[tuple[str, Path] | None] = [None] * hotswap_slots
        self._hotswap_rank = hotswap_rank
        self._compile = compile
        self._compiled = False
        self._fuse = fuse and not hotswap
        self.adapter_loads = 0
        """How many adapter files were read into the UNet (for tests and metrics)."""
        self.native_size = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)

    @property
    def scheduler(self) -> Any:
        """The sampler used for generation (DPM-Solver++)."""
        return self._pipe.scheduler

    @property
    def loaded_adapters(self) -> list[str]:
        """Names of the adapters held in memory, least recently used first."""
        if self._hotswap:
            return [slot[0] for slot in self._slots if slot is not None]
        return list(self._loaded)

    def generate(
        self,
        prompt: str | Sequence[str],
        *,
        negative_prompt: str = "",
        count: int = 4,
        seed: int,
        steps: int = 25,
        guidance: float = 7.5,
        width: int | None = None,
        height: int | None = None,
        adapters: Sequence[AdapterSpec] = (),
        init_image: Image.Image | None = None,
        init_strength: float = 0.5,
        progress: Callable[[int, int], None] | None = None,
        preview: PreviewSink | None = None,
        preview_every: float = 2.0,
    ) -> list[Image.Image]:
        """Generate ``count`` images for ``prompt`` (or for each of several prompts) in one batch.

        The same arguments give the same images. With no ``adapters`` the output is exactly the
        base model's, whatever was generated before. ``width``/``height`` default to the
        model's native size and must be multiples of 8. With ``init_image`` (img2img, for
        Vary and Upscale) the image is resized to that size and redrawn from ``init_strength``
        of the way through the noise schedule (0.3: close to it, 1: ignores it).
        ``progress(step, steps)`` is called after each denoising step and ``preview(step,
        steps, image)`` at most every ``preview_every`` seconds with a cheap latent preview.
        """
        width = width or self.native_size
        height = height or self.native_size
        if width % 8 or height % 8:
            raise ValueError(f"width and height must be multiples of 8, got {width}x{height}")
        if count < 1:
            raise ValueError("count must be at least 1")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        self._activate(adapters)
        device = self._pipe._execution_device
        common: dict[str, Any] = {
            "prompt": prompts,
            "negative_prompt": [negative_prompt] * len(prompts),
            "num_images_per_prompt": count,
            "num_inference_steps": steps,
            "guidance_scale": guidance,
            "generator": torch.Generator(device).manual_seed(seed),
            "output_type": "pil",
        }
        if init_image is None:
            total = steps
            hook = _StepHook(total, progress, preview, preview_every, self._latent_family)
            result = self._pipe(**common, width=width, height=height, callback_on_step_end=hook)
        else:
            # diffusers runs int(steps * strength) of the schedule's last steps.
            total = min(int(steps * init_strength), steps)
            if total < 1:
                raise ValueError("init_strength × steps must be at least 1")
            start = init_image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
            hook = _StepHook(total, progress, preview, preview_every, self._latent_family)
            result = self._img2img(
                **common,
                image=[start] * (len(prompts) * count),
                strength=init_strength,
                callback_on_step_end=hook,
            )
        return list(result.images)

    def forget_adapter(self, name: str) -> None:
        """Unload adapter ``name`` if it is loaded (e.g. the subject was deleted or retrained)."""
        if self._hotswap:
            # The slot keeps its weights until reused, but is never activated for ``name``.
            self._slots = [None if s and s[0] == name else s for s in self._slots]
            return
        if self._loaded.pop(name, None) is not None:
            restore_base_weights(self._pipe.unet)  # its weights may be merged in
            self._pipe.delete_adapters(_peft_name(name))

    def _activate(self, adapters: Sequence[AdapterSpec]) -> None:
        if self._hotswap:
            self._activate_slots(adapters)
            return
        unet = self._pipe.unet
        key: FusedKey = tuple((name, str(path), float(scale)) for name, path, scale in adapters)
        fused = _FUSED.get(unet)
        if fused is not None and fused.key:
            if self._fuse and key == fused.key:
                for name, _, _ in adapters:  # merged already, by this Generator or another
                    if name in self._loaded:
                        self._loaded.move_to_end(name)
                return
            # Loading, deleting and switching adapters all need the unmerged layers.
            restore_base_weights(unet)
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
        names = [_peft_name(name) for name, _, _ in adapters]
        self._pipe.enable_lora()
        self._pipe.set_adapters(names, adapter_weights=[float(scale) for _, _, scale in adapters])
        if self._fuse:
            _fuse(unet, key, names)

    def _activate_slots(self, adapters: Sequence[AdapterSpec]) -> None:
        """Hot-swap mode: put the adapters into slots 0..n-1, give unused slots weight 0.

        The set of active adapters never changes once a slot exists (only weights and the
        slots' tensors do), so a compiled UNet keeps its graph.
        """
        if len(adapters) > len(self._slots):
            raise ValueError(f"at most {len(self._slots)} adapters per generation")
        for index, (name, path, _scale) in enumerate(adapters):
            wanted = (name, Path(path))
            if self._slots[index] == wanted:
                continue
            slot = _slot_name(index)
            exists = slot in self._unet_adapters()
            if not self._unet_adapters():
                # Must precede the first load: pads every slot to one rank so any subject fits.
                self._pipe.enable_lora_hotswap(target_rank=self._hotswap_rank)
            try:
                with _quiet_peft():
                    load_lora_file(self._pipe, wanted[1], slot, hotswap=exists)
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:
                self._slots[index] = None  # its weights may be half replaced: load it anew
                raise AdapterLoadError(f"cannot load adapter {name} from {path}: {exc}") from exc
            self.adapter_loads += 1
            self._slots[index] = wanted
        slots = [_slot_name(i) for i in range(len(self._slots))]
        present = [slot for slot in slots if slot in self._unet_adapters()]
        if not present:
            return  # nothing was ever loaded: the UNet is the plain base
        scales = {_slot_name(i): float(scale) for i, (_, _, scale) in enumerate(adapters)}
        self._pipe.enable_lora()
        self._pipe.set_adapters(present, adapter_weights=[scales.get(s, 0.0) for s in present])
        if self._compile and not self._compiled:
            # In place (nn.Module.compile): the UNet stays a diffusers model, so the LoRA
            # loaders still find its adapters; both pipelines share it.
            self._pipe.unet.compile(mode="reduce-overhead", fullgraph=True)
            self._compiled = True

    def _ensure_loaded(self, name: str, path: Path) -> None:
        if self._loaded.get(name) == path:
            self._loaded.move_to_end(name)
            return
        if name in self._loaded:  # same subject, new file: it was retrained
            self.forget_adapter(name)
        elif _peft_name(name) in self._unet_adapters():
            # Loaded into the shared UNet by another Generator, from a file we cannot vouch for.
            self._pipe.delete_adapters(_peft_name(name))
        try:
            with _quiet_peft():
                self._pipe.load_lora_weights(
                    str(path.parent), weight_name=path.name, adapter_name=_peft_name(name)
                )
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:
            if _peft_name(name) in self._unet_adapters():  # what a load half done left behind
                self._pipe.delete_adapters(_peft_name(name))
            raise AdapterLoadError(f"cannot load adapter {name} from {path}: {exc}") from exc
        self.adapter_loads += 1
        self._loaded[name] = path

    def _evict(self, keep: set[str]) -> None:
        for name in list(self._loaded):
            if len(self._loaded) <= self._max_adapters:
                break
            if name not in keep:
                self.forget_adapter(name)

    def _unet_adapters(self) -> set[str]:
        return set(getattr(self._pipe.unet, "peft_config", None) or ())
