"""Fixtures for the engine's model tests: a warm tiny pipeline and a subject to train.

``tiny_model_dir`` comes from ``tests/conftest.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from arq import create_pool
from arq.connections import RedisSettings
from diffusers import StableDiffusionPipeline
from PIL import Image, ImageDraw

from bot.config import Settings
from engine.models import load_pipeline
from engine.training import (
    TrainConfig,
    TrainOutcome,
    generate_class_images,
    save_adapter,
    train_lora,
)


@pytest.fixture(scope="session")
def tiny_pipe(tiny_model_dir: Path) -> StableDiffusionPipeline:
    """A warm CPU pipeline shared by the tests, as the engine worker shares one."""
    return load_pipeline(tiny_model_dir, device="cpu")


def red_square_photo(variant: int) -> Image.Image:
    """A distinctive subject: a red square on a blue background, shifted a little per photo."""
    image = Image.new("RGB", (256, 256), (20, 40, 200))
    shift = 8 * variant
    ImageDraw.Draw(image).rectangle([64 + shift, 64, 192 + shift, 192 - shift], fill=(220, 20, 20))
    return image


@pytest.fixture(scope="session")
def subject_photos() -> list[Image.Image]:
    """Three photos of the red-square subject."""
    return [red_square_photo(i) for i in range(3)]


LEARNING_CONFIG = TrainConfig(steps=40, learning_rate=3e-2, seed=0)
"""Enough training for the tiny random model to show learning and change its 8-bit output.

Its instance loss over the last 10 steps is 5-8% below the first 10 for seeds 0-5; at the
default 1e-4 the tiny model would not move visibly.
"""


@dataclass
class TrainedSubject:
    """The red square trained once per session, with its adapter file."""

    outcome: TrainOutcome
    adapter: Path
    token: str = "zqv"
    class_noun: str = "dog"


@pytest.fixture(scope="session")
def class_images(tiny_pipe: StableDiffusionPipeline) -> list[Image.Image]:
    """Four class-prior images from the base model."""
    return generate_class_images(tiny_pipe, "dog", 4, 64, seed=1, steps=4)


@pytest.fixture(scope="session")
def trained_subject(
    tiny_pipe: StableDiffusionPipeline,
    subject_photos: list[Image.Image],
    class_images: list[Image.Image],
    tmp_path_factory: pytest.TempPathFactory,
) -> TrainedSubject:
    """The red-square subject trained with prior preservation and saved as an adapter."""
    outcome = train_lora(tiny_pipe, subject_photos, class_images, "zqv", "dog", LEARNING_CONFIG)
    adapter = tmp_path_factory.mktemp("adapters") / "red-square.safetensors"
    metadata = {"subject": "red-square"}
    save_adapter(outcome.state_dict, adapter, metadata, lora_config=outcome.lora_config)
    return TrainedSubject(outcome, adapter)


@contextlib.asynccontextmanager
async def engine_context(settings: Settings) -> AsyncIterator[dict[str, Any]]:
    """The engine's shared ``ctx`` for ``settings``, as its workers get it: the loaded
    resources and an arq pool on the settings' Redis (closed at the end)."""
    from engine.worker import load_resources

    ctx = await load_resources(settings)
    ctx["redis"] = await create_pool(RedisSettings.from_dsn(settings.redis_url))
    try:
        yield ctx
    finally:
        await ctx["redis"].aclose()
