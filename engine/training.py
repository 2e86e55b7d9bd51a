"""DreamBooth training of one subject as a LoRA adapter, with class-prior preservation.

The flow follows diffusers' ``examples/dreambooth/train_dreambooth_lora.py``, read top to bottom:
prepare class priors, cache latents and prompt embeddings, add LoRA to a copy of the UNet (and,
with ``train_text_encoder``, to copies of the text encoders), run the training steps, save the
adapter. The warm pipeline is only read: its modules keep serving generation while copies train.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers
from diffusers.utils.peft_utils import recurse_remove_peft_layers
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from PIL import Image, ImageOps

from engine.generation import Generator, restore_base_weights
from engine.models import BasePipeline
from engine.text_lora import ADAPTER_METADATA_KEY, TEXT_ENCODER_NAMES, add_text_encoder_lora

LORA_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]
"""The UNet attention projections that get LoRA layers (as in diffusers' DreamBooth script)."""

UNET_PREFIX = "unet."
"""Key prefix diffusers' ``load_lora_weights`` expects for UNet LoRA weights."""

TEXT_ENCODER_LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj"]
"""The CLIP text encoder's attention projections that get LoRA layers with
``train_text_encoder`` (as in diffusers' DreamBooth LoRA scripts)."""


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
    """Also train on the mirror images (a dog facing left is the same dog facing right)."""
    random_crops: int = 0
    """Extra framings per photo, cached beside the centre crop: each zooms in by up to 15% and
    crops a random square, so the subject stays whole while its position varies."""
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 20-30% more time."""
    optimizer: str = "adamw"
    """"adamw", or "adamw8bit" (bitsandbytes, CUDA only): a quarter of the optimizer memory."""
    train_text_encoder: bool = False
    """Also train LoRA layers on the text encoder(s) (diffusers' ``--train_text_encoder``), so
    the token's embedding can move too. Off by default: more memory and time per step (the
    prompts are encoded every step instead of once) and the token overfits sooner."""
    text_encoder_learning_rate: float | None = None
    """Learning rate of the text-encoder LoRA; None: ``learning_rate``, as diffusers' SD LoRA
    script trains both with one rate."""
    compile_backend: str | None = None
    """``torch.compile`` backend for the trainable UNet copy ("inductor" to compile it), or
    None: eager. Compiled steps are faster, but the first step waits for the compilation
    (minutes on a cold cache; once per process, see README, Training). Tests pick the cheap
    "aot_eager". It changes how fast the weights are computed, not the recipe."""
    channels_last: bool = False
    """Keep the trainable UNet copy's weights and the step's latents in channels-last memory
    order, which cuDNN's half-precision convolutions on tensor cores prefer. Off until
    ``bench/gpu.sh`` (step ``sd15-train-channels-last``) measures it on a GPU; on the CPU it
    made no difference (tiny model). Like compiling, it changes speed, not the recipe."""


@dataclass
class TrainOutcome:
    """What a training run produced."""

    state_dict: dict[str, torch.Tensor]
    """LoRA weights in diffusers format (keys start with ``unet.``), on the CPU, fp32."""
    lora_config: dict[str, object]
    """The peft LoraConfig as a dict; ``save_adapter`` stores it so loading restores alpha."""
    text_encoder_lora_config: dict[str, object] | None = None
    """The text encoders' LoraConfig when they were trained (their weights are then in
    ``state_dict`` under ``text_encoder.`` / ``text_encoder_2.``), else None."""
    instance_losses: list[float] = field(default_factory=list)
    prior_losses: list[float] = field(default_factory=list)


@dataclass
class TrainState:
    """Everything needed to continue a run exactly where it stopped (a checkpoint's content).

    A run resumed from the state saved after step ``n`` takes the same steps, with the same
    noise and picks, as the uninterrupted run from step ``n + 1`` on.
    """

    step: int
    """Steps completed."""
    trainable: dict[str, torch.Tensor]
    """The trainable (LoRA) parameters by module path, on the CPU; text-encoder ones (with
    ``train_text_encoder``) prefixed ``text_encoder.`` / ``text_encoder_2.``."""
    optimizer: dict[str, Any]
    """``optimizer.state_dict()``: Adam's moments and step counts."""
    rng: torch.Tensor
    """State of the CPU generator that draws picks, noise and timesteps."""
    grad_scaler: dict[str, Any] = field(default_factory=dict)
    """``GradScaler.state_dict()`` when training in fp16, else empty."""
    instance_losses: list[float] = field(default_factory=list)
    prior_losses: list[float] = field(default_factory=list)


ProgressCallback = Callable[[int, int, float], None]
CheckpointCallback = Callable[[TrainState], None]


def instance_prompt(token: str, class_noun: str) -> str:
    """The prompt that names the subject: ``a photo of {token} {class_noun}``."""
    return f"a photo of {token} {class_noun}"


def class_prompt(class_noun: str) -> str:
    """The prompt for the subject's class, used for prior images: ``a photo of {class_noun}``."""
    return f"a photo of {class_noun}"


def native_resolution(pipe: BasePipeline) -> int:
    """The image size in pixels the base model was trained at."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def prepare_image(
    image: Image.Image,
    resolution: int,
    *,
    center_crop: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Turn a photo into a ``(3, resolution, resolution)`` float tensor in [-1, 1].

    Phone photos carry their rotation in EXIF, so it is applied first. With ``center_crop`` the
    shorter side is resized to ``resolution`` and the centre square kept; otherwise the whole
    photo is resized to the square. With a ``generator`` the crop is random instead: the
    shorter side is resized to 100-115% of ``resolution`` and a random square of it kept.
    """
    return prepare_image_and_size(image, resolution, center_crop=center_crop, generator=generator)[
        0
    ]


def prepare_image_and_size(
    image: Image.Image,
    resolution: int,
    *,
    center_crop: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, tuple[int, int, int, int, int, int]]:
    """:func:`prepare_image`, and SDXL's size/crop conditioning for the result.

    The six numbers are what SDXL was trained to be told (and what diffusers' SDXL DreamBooth
    script passes): the photo's original (height, width), the (top, left) of the crop in the
    resized photo, and the target (height, width).
    """
    image = ImageOps.exif_transpose(image).convert("RGB")
    size = (resolution, resolution)
    original = (image.height, image.width)
    top = left = 0
    if generator is not None:
        zoom = 1.0 + 0.15 * float(torch.rand((), generator=generator))
        scale = resolution * zoom / min(image.size)
        width, height = (max(resolution, round(side * scale)) for side in image.size)
        image = image.resize((width, height), resample=Image.Resampling.BICUBIC)
        left = int(torch.randint(width - resolution + 1, (), generator=generator))
        top = int(torch.randint(height - resolution + 1, (), generator=generator))
        image = image.crop((left, top, left + resolution, top + resolution))
    elif center_crop:
        scale = resolution / min(image.size)
        top = max(0, round((image.height * scale - resolution) / 2))
        left = max(0, round((image.width * scale - resolution) / 2))
        image = ImageOps.fit(image, size, method=Image.Resampling.BICUBIC)
    else:
        image = image.resize(size, resample=Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())
    return pixels.permute(2, 0, 1) / 127.5 - 1.0, (*original, top, left, resolution, resolution)


def generate_class_images(
    pipe: BasePipeline,
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
    pipe: BasePipeline,
    images: list[Image.Image],
    resolution: int,
    *,
    center_crop: bool,
    random_flip: bool,
    generator: torch.Generator,
    random_crops: int = 0,
) -> torch.Tensor:
    """Encode images to scaled VAE latents once, since the VAE is frozen.

    Augmentation happens here, so the steps pick from cached latents instead of running the
    VAE each step: ``random_crops`` extra random framings of each image (see
    :func:`prepare_image`), and with ``random_flip`` the mirror of every version.
    """
    latents, _ = cache_latents_and_sizes(
        pipe,
        images,
        resolution,
        center_crop=center_crop,
        random_flip=random_flip,
        generator=generator,
        random_crops=random_crops,
    )
    return latents


def cache_latents_and_sizes(
    pipe: BasePipeline,
    images: list[Image.Image],
    resolution: int,
    *,
    center_crop: bool,
    random_flip: bool,
    generator: torch.Generator,
    random_crops: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`cache_latents`, and SDXL's size/crop conditioning of each latent, shape
    ``(n, 6)`` (see :func:`prepare_image_and_size`; a mirrored version keeps its original's)."""
    if not images:
        return torch.empty(0), torch.empty(0, 6)
    versions = [prepare_image_and_size(im, resolution, center_crop=center_crop) for im in images]
    for _ in range(random_crops):
        versions += [prepare_image_and_size(im, resolution, generator=generator) for im in images]
    pixels = torch.stack([pixels for pixels, _ in versions])
    sizes = torch.tensor([size for _, size in versions], dtype=torch.float32)
    if random_flip:
        pixels = torch.cat([pixels, pixels.flip(-1)])
        sizes = torch.cat([sizes, sizes])
    vae = pipe.vae
    if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        # SDXL's VAE overflows in fp16 (diffusers upcasts it to decode, too).
        vae = copy.deepcopy(vae).float()
    latents = []
    with torch.no_grad():
        for chunk in pixels.split(4):  # bounded memory on large photo sets
            chunk = chunk.to(vae.device, vae.dtype)
            # One draw from the latent distribution, as diffusers' script does when caching;
            # a CPU generator keeps it reproducible on any device.
            sample = vae.encode(chunk).latent_dist.sample(generator=generator)
            latents.append(sample * vae.config.scaling_factor)
    return torch.cat(latents).float(), sizes


def encode_prompt_once(pipe: BasePipeline, prompt: str) -> torch.Tensor:
    """The frozen text encoder's embedding of ``prompt``, shape ``(1, 77, dim)`` (SDXL: both
    encoders' features side by side)."""
    return encode_prompt_pooled(pipe, prompt)[0]


def encode_prompt_pooled(
    pipe: BasePipeline, prompt: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The prompt's embedding and, for SDXL, the second encoder's pooled embedding ``(1, d)``
    that conditions the UNet beside the size/crop numbers (None for SD 1.x/2.x)."""
    device = pipe.unet.device
    with torch.no_grad(), base_text_encoders(pipe):
        if isinstance(pipe, StableDiffusionXLPipeline):
            embeds, _, pooled, _ = pipe.encode_prompt(
                prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
            return embeds, pooled
        embeds, _ = pipe.encode_prompt(prompt, device, 1, False)
    return embeds, None


@contextmanager
def base_text_encoders(pipe: BasePipeline) -> Iterator[None]:
    """Switch off any LoRA layers in ``pipe``'s text encoders meanwhile (generation may have
    left a subject's text-encoder adapter active), so prompts get the base model's embedding."""
    layers = [
        module
        for name in TEXT_ENCODER_NAMES
        if getattr(pipe, name, None) is not None
        for module in getattr(pipe, name).modules()
        if isinstance(module, BaseTunerLayer) and not module.disable_adapters
    ]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def unet_with_lora(pipe: BasePipeline, cfg: TrainConfig) -> UNet2DConditionModel:
    """A trainable copy of the base UNet with fresh LoRA layers; ``pipe.unet`` is untouched.

    The warm UNet may carry adapters that generation loaded; they are stripped from the copy
    so every subject trains on the plain base model.
    """
    restore_base_weights(pipe.unet)  # generation may have merged a subject into its weights
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
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    if cfg.channels_last:
        unet.to(memory_format=torch.channels_last)
    if cfg.compile_backend is not None:
        # In place: the module keeps its type, parameters and state-dict keys (a wrapper would
        # prefix them with ``_orig_mod.``), so LoRA saving and checkpoints see the plain UNet.
        # The compiled code is cached per process and serves every later copy of this UNet.
        # Static shapes: a run's batch and size never change, and a dynamic-shape graph is
        # slower on the CPU; another size compiles once more.
        unet.compile(backend=cfg.compile_backend, dynamic=False)
    return unet


@dataclass
class TextEncoderTraining:
    """Trainable copies of the text encoders with LoRA layers, and the two prompts' token ids.

    With ``train_text_encoder`` the prompt embeddings change every step, so instead of cached
    embeddings each step encodes the instance and class prompts through these copies.
    """

    encoders: dict[str, torch.nn.Module]
    """By pipeline attribute name (``text_encoder``, ``text_encoder_2``), in pipeline order."""
    input_ids: dict[str, torch.Tensor]
    """Each encoder's token ids of ``[instance prompt, class prompt]``, shape ``(2, 77)``."""
    attention_mask: dict[str, torch.Tensor | None]
    """The attention mask to pass, for encoders whose config asks for one (else None)."""
    sdxl: bool
    """Encode as SDXL does: both encoders' penultimate hidden states side by side, and the
    last encoder's pooled (projected) output."""
    lora_config: dict[str, object]

    def named_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The trainable LoRA parameters, prefixed with their encoder's name."""
        return {
            f"{name}.{key}": param
            for name, encoder in self.encoders.items()
            for key, param in trainable_parameters(encoder).items()
        }

    def encode(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The embeddings of ``[instance prompt, class prompt]``, shape ``(2, 77, dim)``, and
        for SDXL their pooled embeddings ``(2, d)``; the same as ``pipe.encode_prompt`` gives
        (see :func:`encode_prompt_pooled`), but with gradients to the LoRA weights."""
        embeds: list[torch.Tensor] = []
        pooled: torch.Tensor | None = None
        for name, encoder in self.encoders.items():
            ids = self.input_ids[name].to(device)
            mask = self.attention_mask[name]
            mask = None if mask is None else mask.to(device)
            if not self.sdxl:
                return encoder(ids, attention_mask=mask)[0], None
            out = encoder(ids, output_hidden_states=True)
            if out[0].ndim == 2:  # CLIPTextModelWithProjection's text_embeds
                pooled = out[0]
            embeds.append(out.hidden_states[-2])
        return torch.cat(embeds, dim=-1), pooled

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The encoders' LoRA weights in diffusers format, keys prefixed with their name."""
        return {
            f"{name}.{key}": value
            for name, encoder in self.encoders.items()
            for key, value in _diffusers_lora_weights(encoder).items()
        }


def _strip_adapters(model: torch.nn.Module) -> None:
    """Remove any LoRA layers (and their config) that generation loaded into ``model``."""
    if getattr(model, "peft_config", None):
        recurse_remove_peft_layers(model)
        del model.peft_config
        model._hf_peft_config_loaded = False


def text_encoders_with_lora(
    pipe: BasePipeline, token: str, class_noun: str, cfg: TrainConfig
) -> TextEncoderTraining:
    """Trainable copies of ``pipe``'s text encoder(s) (both for SDXL) with fresh LoRA layers on
    their attention projections; ``pipe``'s own encoders are untouched."""
    lora_config = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        init_lora_weights="gaussian",
        target_modules=TEXT_ENCODER_LORA_TARGET_MODULES,
    )
    prompts = [instance_prompt(token, class_noun), class_prompt(class_noun)]
    encoders: dict[str, torch.nn.Module] = {}
    input_ids: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor | None] = {}
    tokenizer_names = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
    for index, name in enumerate(TEXT_ENCODER_NAMES):
        base = getattr(pipe, name, None)
        if base is None:
            continue
        encoder = copy.deepcopy(base)
        _strip_adapters(encoder)
        encoder.requires_grad_(False)
        # Seeded like the UNet's LoRA, but each encoder draws its own numbers.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 1 + index)
            add_text_encoder_lora(encoder, lora_config)
        cast_training_params(encoder, dtype=torch.float32)
        if cfg.gradient_checkpointing:
            # transformers 5 renamed it (the old name warns); non-reentrant either way, so the
            # LoRA weights get gradients although the encoder's inputs need none.
            enable = getattr(encoder, "activation_checkpointing_enable", None)
            if enable is not None:
                enable()
            else:
                encoder.gradient_checkpointing_enable({"use_reentrant": False})
        encoder.train()
        tokenizer = getattr(pipe, tokenizer_names[name])
        tokens = tokenizer(
            prompts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        encoders[name] = encoder
        input_ids[name] = tokens.input_ids
        use_mask = getattr(encoder.config, "use_attention_mask", False)
        masks[name] = tokens.attention_mask if use_mask else None
    return TextEncoderTraining(
        encoders=encoders,
        input_ids=input_ids,
        attention_mask=masks,
        sdxl=isinstance(pipe, StableDiffusionXLPipeline),
        lora_config=dict(lora_config.to_dict()),
    )


def make_optimizer(
    params: list[torch.nn.Parameter] | list[dict[str, Any]], cfg: TrainConfig
) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.optimizer`` over the trainable ``params`` (a list of
    parameters, or of parameter groups that may set their own ``lr``)."""
    if cfg.optimizer == "adamw":
        # One fused kernel for all the LoRA tensors instead of a loop over them: the tiny
        # model's gradient clipping and optimizer step took 0.9 ms instead of 3.5 ms on the CPU.
        fused = True if _fused_adamw_supported(params) else None
        return torch.optim.AdamW(params, lr=cfg.learning_rate, fused=fused)
    if cfg.optimizer == "adamw8bit":
        bnb = require_bitsandbytes()
        optimizer: torch.optim.Optimizer = bnb.optim.AdamW8bit(params, lr=cfg.learning_rate)
        return optimizer
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; use 'adamw' or 'adamw8bit'")


def _fused_adamw_supported(params: list[torch.nn.Parameter] | list[dict[str, Any]]) -> bool:
    """Whether torch's fused AdamW takes every one of ``params``: floating-point tensors on the
    CPU or a CUDA GPU."""
    tensors = [
        tensor
        for item in params
        for tensor in (item["params"] if isinstance(item, dict) else [item])
    ]
    return all(
        torch.is_floating_point(tensor) and tensor.device.type in ("cpu", "cuda")
        for tensor in tensors
    )


def require_bitsandbytes() -> Any:
    """The bitsandbytes module (for 8-bit Adam), or an error that says how to install it."""
    try:
        import bitsandbytes
    except ImportError as exc:
        raise RuntimeError(
            "8-bit Adam needs bitsandbytes, which is not installed: "
            "pip install 'dreambot[engine,bnb]' (CUDA hosts only), or use the 'adamw' optimizer."
        ) from exc
    return bitsandbytes


def _autocast(device: torch.device, dtype: torch.dtype) -> AbstractContextManager[object]:
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        return torch.autocast("cuda", dtype=dtype)
    return nullcontext()


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters that train (the LoRA weights), by module path, in a stable order."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


@dataclass
class SdxlConditioning:
    """SDXL's extra UNet inputs besides the prompt embedding: the pooled text embedding of each
    prompt, and the size/crop numbers of each cached latent (rows match the latents)."""

    instance_pooled: torch.Tensor
    class_pooled: torch.Tensor
    instance_sizes: torch.Tensor
    class_sizes: torch.Tensor


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
    resume: TrainState | None = None,
    checkpoint_every: int = 0,
    on_checkpoint: CheckpointCallback | None = None,
    sdxl: SdxlConditioning | None = None,
    text: TextEncoderTraining | None = None,
) -> tuple[list[float], list[float]]:
    """Run the optimisation steps of ``cfg.steps`` on the UNet's LoRA weights.

    Each step denoises a batch of subject latents and, for prior preservation, a batch of class
    latents in one forward pass; an SDXL UNet also gets ``sdxl``'s pooled embeddings and the
    picked latents' size/crop numbers. With ``resume`` the run continues after
    ``resume.step``. Every ``checkpoint_every`` steps (and never after the last one, whose
    result is the adapter) ``on_checkpoint`` receives a :class:`TrainState` to persist.
    With ``text`` its text-encoder LoRA trains jointly: each step encodes the two prompts
    through it instead of using ``instance_embeds``, ``class_embeds`` and ``sdxl``'s pooled
    embeddings (which then only give the shapes). Returns the per-step instance and prior
    losses of the whole run, resumed part included.
    """
    device = unet.device
    # Once: diffusers' ModelMixin.dtype walks the modules on every read (ms on a LoRA UNet).
    unet_dtype = unet.dtype
    use_prior = len(class_latents) > 0 and cfg.prior_loss_weight > 0
    named = trainable_parameters(unet)
    groups: list[dict[str, Any]] = [{"params": list(named.values())}]
    if text is not None:
        text_named = text.named_parameters()
        named |= text_named
        lr = cfg.text_encoder_learning_rate or cfg.learning_rate
        groups.append({"params": list(text_named.values()), "lr": lr})
    params = list(named.values())
    optimizer = make_optimizer(groups, cfg)
    # fp16 gradients of small LoRA updates underflow without loss scaling; bf16 and fp32 do not
    # need it. The LoRA weights themselves are fp32, so unscaling them is always allowed.
    scaler = torch.amp.GradScaler(
        "cuda", enabled=device.type == "cuda" and autocast_dtype == torch.float16
    )
    # Noise, timesteps and picks come from one CPU generator: the same seed gives the same run
    # on any device, and its saved state makes a resumed run continue the same sequence.
    rng = torch.Generator().manual_seed(cfg.seed)
    num_timesteps = noise_scheduler.config.num_train_timesteps
    prediction_type = noise_scheduler.config.prediction_type
    bsz = cfg.batch_size
    instance_losses: list[float] = []
    prior_losses: list[float] = []
    # On a GPU a step's losses are copied to the host without waiting, and read once the next
    # step is queued: waiting right away would leave the GPU idle while Python queues the
    # next step. So there step n is reported during step n + 1, the last after the loop.
    pending: _PendingLosses | None = None

    def settle() -> None:
        nonlocal pending
        if pending is None:
            return
        done, instance_loss, prior_loss, loss = pending.read()
        pending = None
        instance_losses.append(instance_loss)
        if prior_loss is not None:
            prior_losses.append(prior_loss)
        if progress is not None:
            progress(done, cfg.steps, loss)

    first = 1
    if resume is not None:
        with torch.no_grad():
            for name, param in named.items():
                param.copy_(resume.trainable[name])
        optimizer.load_state_dict(resume.optimizer)
        if resume.grad_scaler:
            scaler.load_state_dict(resume.grad_scaler)
        rng.set_state(resume.rng)
        instance_losses, prior_losses = list(resume.instance_losses), list(resume.prior_losses)
        first = resume.step + 1

    for step in range(first, cfg.steps + 1):
        if should_stop is not None and should_stop():
            raise TrainingCancelled(f"training cancelled at step {step} of {cfg.steps}")
        step_embeds, step_class_embeds = instance_embeds, class_embeds
        if sdxl is not None:
            step_pooled, step_class_pooled = sdxl.instance_pooled, sdxl.class_pooled
        if text is not None:
            # The text encoders train too: encode both prompts anew, with gradients.
            with _autocast(device, autocast_dtype):
                both, both_pooled = text.encode(device)
            step_embeds, step_class_embeds = both[:1], both[1:]
            if sdxl is not None and both_pooled is not None:
                step_pooled, step_class_pooled = both_pooled[:1], both_pooled[1:]
        picks = torch.randint(len(instance_latents), (bsz,), generator=rng)
        latents = instance_latents[_to(picks, instance_latents.device)]
        embeds = step_embeds.expand(bsz, -1, -1)
        if sdxl is not None:
            pooled = step_pooled.expand(bsz, -1)
            sizes = sdxl.instance_sizes[picks]
        if use_prior:
            class_picks = torch.randint(len(class_latents), (bsz,), generator=rng)
            latents = torch.cat([latents, class_latents[_to(class_picks, class_latents.device)]])
            embeds = torch.cat([embeds, step_class_embeds.expand(bsz, -1, -1)])
            if sdxl is not None:
                pooled = torch.cat([pooled, step_class_pooled.expand(bsz, -1)])
                sizes = torch.cat([sizes, sdxl.class_sizes[class_picks]])
        added: dict[str, torch.Tensor] | None = None
        if sdxl is not None:
            added = {"text_embeds": _to(pooled, device), "time_ids": _to(sizes, device)}
        noise = torch.randn(latents.shape, generator=rng)
        timesteps = torch.randint(num_timesteps, (len(latents),), generator=rng)
        latents, noise, timesteps = _to(latents, device), _to(noise, device), _to(timesteps, device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        if cfg.channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        if prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise

        with _autocast(device, autocast_dtype):
            pred = unet(
                noisy.to(unet_dtype),
                timesteps,
                embeds.to(device, unet_dtype),
                added_cond_kwargs=added,
            ).sample
        pred, target = pred.float(), target.float()
        instance_loss = F.mse_loss(pred[:bsz], target[:bsz])
        loss = instance_loss
        prior_loss = None
        if use_prior:
            prior_loss = F.mse_loss(pred[bsz:], target[bsz:])
            loss = instance_loss + cfg.prior_loss_weight * prior_loss

        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        settle()  # the previous step's losses: it has finished or nearly
        pending = _PendingLosses(step, instance_loss, prior_loss, loss)
        if device.type != "cuda":
            settle()  # the CPU computed the step already: nothing to overlap
        if on_checkpoint is not None and checkpoint_every > 0:
            if step % checkpoint_every == 0 and step < cfg.steps:
                settle()  # the checkpoint holds every loss so far
                on_checkpoint(
                    TrainState(
                        step=step,
                        trainable={
                            name: p.detach().to("cpu", copy=True) for name, p in named.items()
                        },
                        optimizer=_to_cpu(optimizer.state_dict()),
                        rng=rng.get_state(),
                        grad_scaler=scaler.state_dict() if scaler.is_enabled() else {},
                        instance_losses=list(instance_losses),
                        prior_losses=list(prior_losses),
                    )
                )
    settle()
    return instance_losses, prior_losses


def _to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``. From the CPU to a GPU through pinned memory without waiting:
    a plain copy from pageable memory waits for all the GPU work queued before it. (Cached
    latents and embeddings already live on the GPU: nothing to copy.)"""
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


class _PendingLosses:
    """One step's losses on their way to the host: on a GPU copied into pinned memory
    behind the step's work, with an event to wait for just that copy."""

    def __init__(
        self, step: int, instance: torch.Tensor, prior: torch.Tensor | None, loss: torch.Tensor
    ) -> None:
        self.step = step
        self.has_prior = prior is not None
        values = torch.stack(
            [t.detach() for t in (instance, prior if prior is not None else loss, loss)]
        )
        self.event: torch.cuda.Event | None = None
        if values.device.type == "cuda":
            self.values = torch.empty(3, dtype=values.dtype, pin_memory=True)
            self.values.copy_(values, non_blocking=True)
            self.event = torch.cuda.Event()
            # On the stream of the losses' own GPU (the current device may be another one).
            self.event.record(torch.cuda.current_stream(values.device))
        else:
            self.values = values

    def read(self) -> tuple[int, float, float | None, float]:
        """(step, instance loss, prior loss or None, total loss), waiting for the copy."""
        if self.event is not None:
            self.event.synchronize()
        instance, prior, loss = self.values.tolist()
        return self.step, instance, prior if self.has_prior else None, loss


def _to_cpu(value: Any) -> Any:
    """A copy of a (nested) state dict with every tensor on the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: _to_cpu(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_cpu(item) for item in value)
    return value


def _diffusers_lora_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A model's LoRA weights converted to diffusers' key names, on the CPU in fp32."""
    peft_state = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
    return {
        key: value.detach().to("cpu", torch.float32).contiguous()
        for key, value in peft_state.items()
    }


def lora_state_dict(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The UNet's LoRA weights in the format ``load_lora_weights`` reads, on the CPU in fp32."""
    return {UNET_PREFIX + key: value for key, value in _diffusers_lora_weights(unet).items()}


def train_lora(
    pipe: BasePipeline,
    instance_images: list[Image.Image],
    class_images: list[Image.Image],
    token: str,
    class_noun: str,
    cfg: TrainConfig,
    *,
    progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    resume: TrainState | None = None,
    checkpoint_every: int = 0,
    on_checkpoint: CheckpointCallback | None = None,
) -> TrainOutcome:
    """Train one subject as a LoRA adapter on a copy of ``pipe``'s UNet.

    ``instance_images`` are the subject's photos, ``class_images`` the class priors (may be
    empty: then no prior-preservation loss). ``progress(step, total, loss)`` is called after
    every step; ``should_stop()`` is checked before every step and raises
    :class:`TrainingCancelled`. The VAE and text encoder are only read (with
    ``cfg.train_text_encoder`` copies of the text encoders train, and the outcome holds their
    LoRA weights too). Deterministic for a fixed ``cfg.seed`` on the CPU. ``resume``,
    ``checkpoint_every`` and ``on_checkpoint``: see :func:`train_steps`; a resumed run ends
    with the same weights as an uninterrupted one.
    """
    if not instance_images:
        raise ValueError("train_lora needs at least one instance image")
    resolution = cfg.resolution or native_resolution(pipe)
    if resolution % 8:
        raise ValueError(f"resolution must be a multiple of 8, got {resolution}")

    vae_rng = torch.Generator().manual_seed(cfg.seed)
    instance_latents, instance_sizes = cache_latents_and_sizes(
        pipe,
        instance_images,
        resolution,
        center_crop=cfg.center_crop,
        random_flip=cfg.random_flip,
        generator=vae_rng,
        random_crops=cfg.random_crops,
    )
    class_latents, class_sizes = cache_latents_and_sizes(
        pipe,
        class_images if cfg.prior_loss_weight > 0 else [],
        resolution,
        center_crop=cfg.center_crop,
        random_flip=cfg.random_flip,
        generator=vae_rng,
        random_crops=cfg.random_crops,
    )
    instance_embeds, instance_pooled = encode_prompt_pooled(
        pipe, instance_prompt(token, class_noun)
    )
    class_embeds, class_pooled = encode_prompt_pooled(pipe, class_prompt(class_noun))
    sdxl = None
    if instance_pooled is not None and class_pooled is not None:
        sdxl = SdxlConditioning(instance_pooled, class_pooled, instance_sizes, class_sizes)

    unet = unet_with_lora(pipe, cfg)
    text = None
    if cfg.train_text_encoder:
        text = text_encoders_with_lora(pipe, token, class_noun, cfg)
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
        resume=resume,
        checkpoint_every=checkpoint_every,
        on_checkpoint=on_checkpoint,
        sdxl=sdxl,
        text=text,
    )
    lora_config = unet.peft_config["default"].to_dict()
    state_dict = lora_state_dict(unet)
    if text is not None:
        state_dict |= text.state_dict()
    return TrainOutcome(
        state_dict=state_dict,
        lora_config=lora_config,
        text_encoder_lora_config=text.lora_config if text is not None else None,
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
    text_encoder_lora_config: Mapping[str, object] | None = None,
) -> None:
    """Write a LoRA adapter as one ``.safetensors`` file, atomically.

    ``metadata`` (string values) is stored in the file header, e.g. subject id and base model.
    Pass the run's ``lora_config`` (``TrainOutcome.lora_config``) so diffusers restores the
    trained alpha on load; without it the loader assumes ``alpha == rank``;
    ``text_encoder_lora_config`` (``TrainOutcome.text_encoder_lora_config``) likewise for the
    text-encoder weights, stored under each text encoder's prefix present in ``state_dict``,
    as diffusers' ``save_lora_weights`` does. The file loads
    with ``pipe.load_lora_weights(path.parent, weight_name=path.name, adapter_name=...)``.
    The data is written beside ``path`` and renamed over it, so readers never see half a file.
    """
    header = {"format": "pt"}
    for key, value in metadata.items():
        if key in header or key == ADAPTER_METADATA_KEY:
            raise ValueError(f"metadata key {key!r} is reserved")
        header[key] = str(value)
    packed: dict[str, object] = {}
    if lora_config is not None:
        packed |= {UNET_PREFIX + k: _json_safe(v) for k, v in lora_config.items()}
    if text_encoder_lora_config is not None:
        for name in TEXT_ENCODER_NAMES:
            if any(key.startswith(f"{name}.") for key in state_dict):
                packed |= {
                    f"{name}.{k}": _json_safe(v) for k, v in text_encoder_lora_config.items()
                }
    if packed:
        header[ADAPTER_METADATA_KEY] = json.dumps(packed, sort_keys=True, default=str)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tensors = {key: value.contiguous() for key, value in state_dict.items()}
    safetensors.torch.save_file(tensors, str(tmp), metadata=header)
    os.replace(tmp, path)
