"""Full-size mode: the real Stable Diffusion 1.5 and SDXL architectures with random weights.

Nothing is downloaded: the UNets, VAEs and text encoders are built from the published configs
written out below (the ``config.json`` files of runwayml/stable-diffusion-v1-5 and
stabilityai/stable-diffusion-xl-base-1.0), with random weights. Speed and memory depend on the
architecture, not on the weight values, so the time per step and the peak memory are those of a
real LoRA DreamBooth run. The
tokenizer is the tiny model's byte-level one (the real CLIP vocabulary is not on disk); it
still pads every prompt to 77 tokens, so the text encoder does the real amount of work.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

SD15_UNET = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
}

SD15_VAE = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

SD15_TEXT_ENCODER = {  # CLIP ViT-L/14's text tower
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "vocab_size": 49408,
}

SD15_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
}

SD15_RESOLUTION = 512


SDXL_UNET = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}

SDXL_VAE = {**SD15_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}

SDXL_TEXT_ENCODER_2 = {  # OpenCLIP ViT-bigG/14's text tower, with its projection
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
    "vocab_size": 49408,
}

SDXL_SCHEDULER = {**SD15_SCHEDULER, "timestep_spacing": "leading"}

SAFETY_CHECKER_VISION = {  # CLIP ViT-L/14's vision tower
    "hidden_act": "quick_gelu",
    "hidden_size": 1024,
    "image_size": 224,
    "intermediate_size": 4096,
    "layer_norm_eps": 1e-05,
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "patch_size": 14,
}
"""The classifier of CompVis/stable-diffusion-safety-checker (what SD 1.x/2.x folders ship in
``safety_checker/``): this vision tower, projected to 768 dimensions."""

RESOLUTIONS = {"sd15": SD15_RESOLUTION, "sdxl": 1024}
"""Each architecture's native training and generation size in pixels."""
NAMES = {"sd15": "SD 1.5", "sdxl": "SDXL"}


def _text_config(tokenizer: CLIPTokenizer, shape: dict[str, object]) -> CLIPTextConfig:
    return CLIPTextConfig(
        **shape,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_random(
    arch: str, tokenizer_dir: Path, *, device: str, dtype: torch.dtype, seed: int = 0
) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """The ``arch`` ("sd15" or "sdxl") pipeline with random weights on ``device`` in ``dtype``.

    The modules are created on ``device`` (random initialisation of SDXL's 3.5 billion weights
    takes a minute on a CPU, a second on a GPU), then cast to ``dtype``.
    """
    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    with torch.device(device):
        if arch == "sd15":
            pipe: StableDiffusionPipeline | StableDiffusionXLPipeline = StableDiffusionPipeline(
                vae=AutoencoderKL(**SD15_VAE),
                text_encoder=CLIPTextModel(_text_config(tokenizer, SD15_TEXT_ENCODER)),
                tokenizer=tokenizer,
                unet=UNet2DConditionModel(**SD15_UNET),
                scheduler=DDPMScheduler(**SD15_SCHEDULER),
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        elif arch == "sdxl":
            pipe = StableDiffusionXLPipeline(
                vae=AutoencoderKL(**SDXL_VAE),
                text_encoder=CLIPTextModel(_text_config(tokenizer, SD15_TEXT_ENCODER)),
                text_encoder_2=CLIPTextModelWithProjection(
                    _text_config(tokenizer, SDXL_TEXT_ENCODER_2)
                ),
                tokenizer=tokenizer,
                tokenizer_2=tokenizer,
                unet=UNet2DConditionModel(**SDXL_UNET),
                scheduler=DDPMScheduler(**SDXL_SCHEDULER),
                add_watermarker=False,
            )
        else:
            raise ValueError(f"unknown architecture {arch!r}; use one of {sorted(RESOLUTIONS)}")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


def save_random(arch: str, tokenizer_dir: Path, folder: Path, *, device: str) -> Path:
    """Build the ``arch`` pipeline with random weights on ``device``, in the engine's dtype
    there, and save it as the diffusers folder ``folder`` (for code that loads a model by
    path: the trainers' child processes, the generation benchmark)."""
    from engine.models import default_dtype

    pipe = build_random(arch, tokenizer_dir, device=device, dtype=default_dtype(device))
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def save_random_safety_checker(folder: Path, *, device: str) -> Path:
    """The safety checker's architecture (``SAFETY_CHECKER_VISION``) with random weights and
    CLIP's 224 px preprocessor, saved as one folder in the layout of
    CompVis/stable-diffusion-safety-checker (``engine.safety`` loads it). Random concept
    embeddings and thresholds: it flags what it flags, and costs what the real one costs."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    torch.manual_seed(0)
    with torch.device(device):
        checker = StableDiffusionSafetyChecker(
            CLIPConfig(vision_config=SAFETY_CHECKER_VISION, projection_dim=768)
        )
    checker.save_pretrained(folder)
    # CLIP's defaults: shortest side to 224, centre crop 224, CLIP's mean and deviation.
    CLIPImageProcessor().save_pretrained(folder)
    return folder
