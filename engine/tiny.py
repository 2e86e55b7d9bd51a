"""A tiny random Stable Diffusion 1.x-shaped model, built offline.

No machine here can download weights, so tests and the default demo use this model instead.
It is saved as an ordinary diffusers folder and loaded by the same code as a real base model:
it draws noise, but every line of the real pipeline runs.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

MODEL_MAX_LENGTH = 77
"""Token length the tokenizer pads/truncates to, as in real SD 1.x models."""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable unicode table, which CLIP's byte-level BPE vocabulary uses."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def _write_tokenizer_files(folder: Path) -> None:
    """Write a byte-level vocab (each byte char, its ``</w>`` form, the two specials) and an
    empty merges file: every text tokenizes (into single bytes) without any learned BPE."""
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")


def _build_pipeline(scratch: Path, seed: int) -> StableDiffusionPipeline:
    """Assemble the random pipeline in memory; ``scratch`` holds the tokenizer's source files."""
    torch.manual_seed(seed)  # the random weights are the model: make them reproducible
    # transformers 5's CLIPTokenizer takes in-memory vocab/merges in __init__; from_pretrained
    # is the stable way to build it from vocab.json + merges.txt across versions.
    _write_tokenizer_files(scratch)
    tokenizer = CLIPTokenizer.from_pretrained(str(scratch), model_max_length=MODEL_MAX_LENGTH)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-5,
            num_attention_heads=4,
            num_hidden_layers=5,
            vocab_size=len(tokenizer),
            max_position_embeddings=MODEL_MAX_LENGTH,
            projection_dim=32,
        )
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_model(path: Path, *, seed: int = 0) -> Path:
    """Build the tiny random model into ``path`` (a diffusers folder) and return ``path``.

    Idempotent: a folder that already has ``model_index.json`` is left as it is. The model is
    built in a temporary folder beside ``path`` and renamed into place, so a half-built folder
    never looks finished (and two builders racing leave one complete model).
    """
    path = Path(path)
    if (path / "model_index.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        with tempfile.TemporaryDirectory() as scratch:
            pipe = _build_pipeline(Path(scratch), seed)
            pipe.save_pretrained(staging, safe_serialization=True)
        try:
            os.rename(staging, path)
        except OSError:
            # Someone else finished first (or an empty folder is in the way): keep a finished
            # model, replace an unfinished one.
            if (path / "model_index.json").exists():
                return path
            shutil.rmtree(path, ignore_errors=True)
            os.rename(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path
