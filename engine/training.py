"""DreamBooth training of one subject as a LoRA adapter, with class-prior preservation.

The flow follows diffusers' ``examples/dreambooth/train_dreambooth_lora.py``, read top to bottom:
prepare class priors, cache latents and prompt embeddings, add LoRA to a copy of the UNet, run
the training steps, save the adapter. The warm pipeline is only read: its UNet keeps serving
generation while a copy trains.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image, ImageOps

from engine.generation import Generator

LORA_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]
"""The UNet attention projections that get LoRA layers (as in diffusers' DreamBooth script)."""

UNET_PREFIX = "unet."
"""Key prefix diffusers' ``load_lora_weights`` expects for UNet LoRA weights."""

ADAPTER_METADATA_KEY = "lora_adapter_metadata"
"""safetensors metadata key under which diffusers stores the LoraConfig (rank, alpha...)."""


class TrainingCancelled(Exception):
    """Training stopped early because ``should_stop()`` returned true."""


@dataclass
class TrainConfig:
    """Every knob of one DreamBooth LoRA training run."""

    steps: int = 400
    learning_rate: float = 1e-4
    rank: int = 4
    alpha: int = 4
    """``lora_alpha``: the LoRA update is scaled by alpha / rank."""
    prior_loss_weight: float = 1.0
    class_images: int = 50
    batch_size: int = 1
    resolution: int | None = None
    """Training image size in pixels; None means the model's native size."""
    seed: int = 0
    center_crop: bool = True
    """Crop the centre square after resizing; False squashes the whole photo into the square."""
    random_flip: bool = False
    max_grad_norm: float = 1.0


@dataclass
class TrainOutcome:
    """What a training run produced."""

    state_dict: dict[str, torch.Tensor]
    """LoRA weights in diffusers format (keys start with ``unet.``), on the CPU, fp32."""
    lora_config: dict[str, object]
    """The peft LoraConfig as a dict; ``save_adapter`` stores it so loading restores alpha."""
    instance_losses: list[float] = field(default_factory=list)
    prior_losses: list[float] = field(default_factory=list)


ProgressCallback = Callable[[int, int, float], None]


def instance_prompt(token: str, class_noun: str) -> str:
    """The prompt that names the subject: ``a photo of {token} {class_noun}``."""
    return f"a photo of {token} {class_noun}"


def class_prompt(class_noun: str) -> str:
    """The prompt for the subject's class, used for prior images: ``a photo of {class_noun}``."""
    return f"a photo of {class_noun}"


def native_resolution(pipe: StableDiffusionPipeline) -> int:
    """The image size in pixels the base model was trained at."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def prepare_image(image: Image.Image, resolution: int, *, center_crop: bool = True) -> torch.Tensor:
    """Turn a photo into a ``(3, resolution, resolution)`` float tensor in [-1, 1].

    Phone photos carry their rotation in EXIF, so it is applied first. With ``center_crop`` the
    shorter side is resized to ``resolution`` and the centre square kept; otherwise the whole
    photo is resized to the square.
    """
    image = ImageOps.exif_transpose(image).convert("RGB")
    size = (resolution, resolution)
    if center_crop:
        image = ImageOps.fit(image, size, method=Image.Resampling.BICUBIC)
    else:
        image = image.resize(size, resample=Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())
    return pixels.permute(2, 0, 1) / 127.5 - 1.0


def generate_class_images(
    pipe: StableDiffusionPipeline,
    class_noun: str,
    count: int,
    resolution: int,
    *,
    seed: int,
    steps: int = 25,
    batch: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> list[Image.Image]:
    """Draw ``count`` class-prior images of ``class_noun`` from the base model (no adapters).

    Batch ``i`` uses seed ``seed + i``, so the same arguments give the same images. Caching
    them per (base model, class noun) is the caller's job. ``progress(done, count)`` is called
    after each batch. The pipeline must not be generating for anyone else meanwhile.
    """
    generator = Generator(pipe)
    images: list[Image.Image] = []
    for index, start in enumerate(range(0, count, batch)):
        images += generator.generate(
            class_prompt(class_noun),
            count=min(batch, count - start),
            seed=seed + index,
            steps=steps,
            width=resolution,
            height=resolution,
        )
        if progress is not None:
            progress(len(images), count)
    return images


def cache_latents(
    pipe: StableDiffusionPipeline,
    images: list[Image.Image],
    resolution: int,
    *,
    center_crop: bool,
    random_flip: bool,
    generator: torch.Generator,
) -> torch.Tensor:
    """Encode images to scaled VAE latents once, since the VAE is frozen.

    With ``random_flip`` the mirrored images are encoded too (the batch is doubled), so the
    training steps can pick either version without running the VAE again.
    """
    if not images:
        return torch.empty(0)
    pixels = torch.stack([prepare_image(im, resolution, center_crop=center_crop) for im in images])
    if random_flip:
        pixels = torch.cat([pixels, pixels.flip(-1)])
    vae = pipe.vae
    latents = []
    with torch.no_grad():
        for chunk in pixels.split(4):  # bounded memory on large photo sets
            chunk = chunk.to(vae.device, vae.dtype)
            # One draw from the latent distribution, as diffusers' script does when caching;
            # a CPU generator keeps it reproducible on any device.
            sample = vae.encode(chunk).latent_dist.sample(generator=generator)
            latents.append(sample * vae.config.scaling_factor)
    return torch.cat(latents).float()


def encode_prompt_once(pipe: StableDiffusionPipeline, prompt: str) -> torch.Tensor:
    """The frozen text encoder's embedding of ``prompt``, shape ``(1, 77, dim)``."""
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(prompt, pipe.unet.device, 1, False)
    return embeds


def unet_with_lora(pipe: StableDiffusionPipeline, cfg: TrainConfig) -> UNet2DConditionModel:
    """A trainable copy of the base UNet with fresh LoRA layers; ``pipe.unet`` is untouched.

    The warm UNet may carry adapters that generation loaded; they are stripped from the copy
    so every subject trains on the plain base model.
    """
    unet = copy.deepcopy(pipe.unet)
    if getattr(unet, "peft_config", None):
        unet.unload_lora()
    unet.requires_grad_(False)
    lora_config = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        init_lora_weights="gaussian",
        target_modules=LORA_TARGET_MODULES,
    )
    # LoRA init draws from the global RNG; fork it so the run is seeded without side effects.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        unet.add_adapter(lora_config)
    # The trainable LoRA weights stay fp32 even when the base runs in half precision.
    cast_training_params(unet, dtype=torch.float32)
    unet.train()
    return unet


def _autocast(device: torch.device, dtype: torch.dtype) -> AbstractContextManager[object]:
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        return torch.autocast("cuda", dtype=dtype)
    return nullcontext()


def train_steps(
    unet: UNet2DConditionModel,
    noise_scheduler: DDPMScheduler,
    instance_latents: torch.Tensor,
    class_latents: torch.Tensor,
    instance_embeds: torch.Tensor,
    class_embeds: torch.Tensor,
    cfg: TrainConfig,
    *,
    autocast_dtype: torch.dtype,
    progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[list[float], list[float]]:
    """Run ``cfg.steps`` optimisation steps on the UNet's LoRA weights.

    Each step denoises a batch of subject latents and, for prior preservation, a batch of class
    latents in one forward pass. Returns the per-step instance and prior losses.
    """
    device = unet.device
    use_prior = len(class_latents) > 0 and cfg.prior_loss_weight > 0
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate)
    # Noise, timesteps and picks come from one CPU generator: the same seed gives the same run
    # on any device.
    rng = torch.Generator().manual_seed(cfg.seed)
    num_timesteps = noise_scheduler.config.num_train_timesteps
    prediction_type = noise_scheduler.config.prediction_type
    bsz = cfg.batch_size
    instance_losses: list[float] = []
    prior_losses: list[float] = []

    for step in range(1, cfg.steps + 1):
        if should_stop is not None and should_stop():
            raise TrainingCancelled(f"training cancelled at step {step} of {cfg.steps}")
        picks = torch.randint(len(instance_latents), (bsz,), generator=rng)
        latents = instance_latents[picks]
        embeds = instance_embeds.expand(bsz, -1, -1)
        if use_prior:
            class_picks = torch.randint(len(class_latents), (bsz,), generator=rng)
            latents = torch.cat([latents, class_latents[class_picks]])
            embeds = torch.cat([embeds, class_embeds.expand(bsz, -1, -1)])
        noise = torch.randn(latents.shape, generator=rng)
        timesteps = torch.randint(num_timesteps, (len(latents),), generator=rng)
        latents, noise, timesteps = latents.to(device), noise.to(device), timesteps.to(device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        if prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise

        with _autocast(device, autocast_dtype):
            pred = unet(noisy.to(unet.dtype), timesteps, embeds.to(device)).sample
        pred, target = pred.float(), target.float()
        instance_loss = F.mse_loss(pred[:bsz], target[:bsz])
        loss = instance_loss
        if use_prior:
            prior_loss = F.mse_loss(pred[bsz:], target[bsz:])
            loss = instance_loss + cfg.prior_loss_weight * prior_loss
            prior_losses.append(prior_loss.item())
        instance_losses.append(instance_loss.item())

        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if progress is not None:
            progress(step, cfg.steps, loss.item())
    return instance_losses, prior_losses


def lora_state_dict(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The UNet's LoRA weights in the format ``load_lora_weights`` reads, on the CPU in fp32."""
    peft_state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    return {
        UNET_PREFIX + key: value.detach().to("cpu", torch.float32).contiguous()
        for key, value in peft_state.items()
    }


def train_lora(
    pipe: StableDiffusionPipeline,
    instance_images: list[Image.Image],
    class_images: list[Image.Image],
    token: str,
    class_noun: str,
    cfg: TrainConfig,
    *,
    progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainOutcome:
    """Train one subject as a LoRA adapter on a copy of ``pipe``'s UNet.

    ``instance_images`` are the subject's photos, ``class_images`` the class priors (may be
    empty: then no prior-preservation loss). ``progress(step, total, loss)`` is called after
    every step; ``should_stop()`` is checked before every step and raises
    :class:`TrainingCancelled`. The VAE and text encoder are only read. Deterministic for a
    fixed ``cfg.seed`` on the CPU.
    """
    if not instance_images:
        raise ValueError("train_lora needs at least one instance image")
    resolution = cfg.resolution or native_resolution(pipe)
    if resolution % 8:
        raise ValueError(f"resolution must be a multiple of 8, got {resolution}")

    vae_rng = torch.Generator().manual_seed(cfg.seed)
    instance_latents = cache_latents(
        pipe,
        instance_images,
        resolution,
        center_crop=cfg.center_crop,
        random_flip=cfg.random_flip,
        generator=vae_rng,
    )
    class_latents = cache_latents(
        pipe,
        class_images if cfg.prior_loss_weight > 0 else [],
        resolution,
        center_crop=cfg.center_crop,
        random_flip=cfg.random_flip,
        generator=vae_rng,
    )
    instance_embeds = encode_prompt_once(pipe, instance_prompt(token, class_noun))
    class_embeds = encode_prompt_once(pipe, class_prompt(class_noun))

    unet = unet_with_lora(pipe, cfg)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    instance_losses, prior_losses = train_steps(
        unet,
        noise_scheduler,
        instance_latents,
        class_latents,
        instance_embeds,
        class_embeds,
        cfg,
        autocast_dtype=pipe.unet.dtype,
        progress=progress,
        should_stop=should_stop,
    )
    lora_config = unet.peft_config["default"].to_dict()
    return TrainOutcome(
        state_dict=lora_state_dict(unet),
        lora_config=lora_config,
        instance_losses=instance_losses,
        prior_losses=prior_losses,
    )


def _json_safe(value: object) -> object:
    if isinstance(value, set | frozenset):
        return sorted(value)
    return value


def save_adapter(
    state_dict: Mapping[str, torch.Tensor],
    path: Path,
    metadata: Mapping[str, str],
    *,
    lora_config: Mapping[str, object] | None = None,
) -> None:
    """Write a LoRA adapter as one ``.safetensors`` file, atomically.

    ``metadata`` (string values) is stored in the file header, e.g. subject id and base model.
    Pass the run's ``lora_config`` (``TrainOutcome.lora_config``) so diffusers restores the
    trained alpha on load; without it the loader assumes ``alpha == rank``. The file loads
    with ``pipe.load_lora_weights(path.parent, weight_name=path.name, adapter_name=...)``.
    The data is written beside ``path`` and renamed over it, so readers never see half a file.
    """
    header = {"format": "pt"}
    for key, value in metadata.items():
        if key in header or key == ADAPTER_METADATA_KEY:
            raise ValueError(f"metadata key {key!r} is reserved")
        header[key] = str(value)
    if lora_config is not None:
        packed = {UNET_PREFIX + k: _json_safe(v) for k, v in lora_config.items()}
        header[ADAPTER_METADATA_KEY] = json.dumps(packed, sort_keys=True, default=str)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tensors = {key: value.contiguous() for key, value in state_dict.items()}
    safetensors.torch.save_file(tensors, str(tmp), metadata=header)
    os.replace(tmp, path)
