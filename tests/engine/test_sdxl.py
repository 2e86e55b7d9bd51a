"""The SDXL code path on the tiny SDXL-shaped model: two text encoders, pooled embeddings and
size/crop conditioning in training, adapters in generation, and jobs routed by model name."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors
from diffusers import StableDiffusionXLPipeline
from PIL import Image

import engine.generation
from engine.api import GenerateRequest, GenerateResult, TrainRequest
from engine.artifacts import ArtifactStore, local_path
from engine.generate_job import generate
from engine.generation import Generator
from engine.models import load_pipeline, served_model
from engine.reporting import EngineError
from engine.train_job import train_subject
from engine.training import (
    TrainConfig,
    encode_prompt_pooled,
    prepare_image_and_size,
    save_adapter,
    train_lora,
)
from tests.conftest import make_settings
from tests.engine.conftest import engine_context, red_square_photo
from tests.engine.test_training_job import train_request

pytestmark = pytest.mark.model

REPLY_QUEUE = "dreambot:bot:sdxl-test"


@pytest.fixture(scope="module")
def sdxl_pipe(tiny_sdxl_dir: Path) -> StableDiffusionXLPipeline:
    pipe = load_pipeline(tiny_sdxl_dir)
    assert isinstance(pipe, StableDiffusionXLPipeline)
    return pipe


def test_size_and_crop_conditioning_describes_the_photo_and_its_crop() -> None:
    wide = Image.new("RGB", (300, 100))

    _, centre = prepare_image_and_size(wide, 64)
    _, squashed = prepare_image_and_size(wide, 64, center_crop=False)

    # Resized to 192x64, the centre 64 starts 64 px from the left.
    assert centre == (100, 300, 0, 64, 64, 64)
    assert squashed == (100, 300, 0, 0, 64, 64)


def test_sdxl_prompts_give_both_encoders_features_and_a_pooled_embedding(
    sdxl_pipe: StableDiffusionXLPipeline,
) -> None:
    embeds, pooled = encode_prompt_pooled(sdxl_pipe, "a photo of zqv dog")

    assert embeds.shape == (1, 77, 32 + 64)
    assert pooled is not None and pooled.shape == (1, 32)


def test_sdxl_previews_use_the_sdxl_latent_colours(
    sdxl_pipe: StableDiffusionXLPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    families: list[str] = []
    to_preview = engine.generation.latents_to_preview

    def recording(latents: Any, family: str = "sd", **kwargs: Any) -> Image.Image:
        families.append(family)
        return to_preview(latents, family, **kwargs)

    monkeypatch.setattr(engine.generation, "latents_to_preview", recording)
    Generator(sdxl_pipe).generate(
        "a photo of a dog",
        count=1,
        seed=0,
        steps=2,
        preview=lambda step, total, image: None,
        preview_every=0.0,
    )

    assert families == ["sdxl"]  # SD 1.x factors would give the SDXL latents wrong colours


def test_sdxl_model_trains_and_its_adapter_changes_the_images(
    sdxl_pipe: StableDiffusionXLPipeline, tmp_path: Path
) -> None:
    photos = [red_square_photo(i) for i in range(3)]
    generator = Generator(sdxl_pipe)
    priors = generator.generate("a photo of dog", count=2, seed=1, steps=2)
    cfg = TrainConfig(steps=6, learning_rate=3e-2, seed=0, random_flip=True)

    outcome = train_lora(sdxl_pipe, photos, priors, "zqv", "dog", cfg)
    adapter = tmp_path / "xl.safetensors"
    save_adapter(outcome.state_dict, adapter, {}, lora_config=outcome.lora_config)

    assert len(outcome.instance_losses) == len(outcome.prior_losses) == 6
    assert all(key.startswith("unet.") for key in outcome.state_dict)
    base = generator.generate("a photo of zqv dog", count=1, seed=0, steps=3)
    subject = generator.generate(
        "a photo of zqv dog", count=1, seed=0, steps=3, adapters=[("rex", adapter, 1.0)]
    )
    again = generator.generate("a photo of zqv dog", count=1, seed=0, steps=3)
    varied = generator.generate(
        "a photo of zqv dog",
        count=1,
        seed=0,
        steps=4,
        adapters=[("rex", adapter, 1.0)],
        init_image=subject[0],
        init_strength=0.5,
    )
    difference = np.abs(np.asarray(base[0], int) - np.asarray(subject[0], int)).mean()
    assert difference > 1.0
    assert again[0].tobytes() == base[0].tobytes()
    assert varied[0].size == (64, 64)


@pytest.fixture
async def two_model_ctx(
    tmp_path: Path, redis_clean: str, tiny_model_dir: Path, tiny_sdxl_dir: Path
) -> AsyncIterator[dict[str, Any]]:
    """An engine serving the tiny SD model (default) and the tiny SDXL model as "xl"."""
    settings = make_settings(
        tmp_path / "data",
        redis_clean,
        models={"sd": str(tiny_model_dir), "xl": str(tiny_sdxl_dir)},
        train_steps=2,
        class_images=2,
        generate_steps=2,
        sample_count=1,
    )
    async with engine_context(settings) as ctx:
        yield ctx


def _train_request(ctx: dict[str, Any], subject_id: str, model: str) -> TrainRequest:
    return train_request(ctx, subject_id, base_model=model, reply_queue=REPLY_QUEUE)


async def test_jobs_are_routed_to_the_model_they_name(two_model_ctx: dict[str, Any]) -> None:
    ctx = two_model_ctx
    request = _train_request(ctx, "rex", "xl")

    trained = await train_subject(ctx, request.model_dump())

    assert trained is not None and len(trained["sample_urls"]) == 1
    adapter = local_path(request.adapter_url)
    assert adapter is not None
    with safetensors.safe_open(str(adapter), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["base_model"] == "xl" and metadata["base_model_family"] == "sdxl"
    priors = local_path(ctx["artifacts"].url("priors"))
    assert priors is not None
    assert [p.name for p in priors.iterdir()] == [ctx["models"]["xl"].key]

    artifacts: ArtifactStore = ctx["artifacts"]
    drawn = await generate(
        ctx,
        GenerateRequest(
            job_id="job-draw",
            reply_queue=REPLY_QUEUE,
            prompt="a photo of zqv dog",
            count=1,
            seed=0,
            steps=2,
            adapters=[{"name": "rex", "url": request.adapter_url}],  # type: ignore[list-item]
            output_url=artifacts.url("outputs", "job-draw"),
            base_model="xl",
            previews=False,
        ).model_dump(),
    )
    assert drawn is not None
    assert GenerateResult.model_validate(drawn).width == 64


async def test_a_job_for_a_model_not_served_fails_listing_the_served_ones(
    two_model_ctx: dict[str, Any],
) -> None:
    ctx = two_model_ctx
    answer = await train_subject(ctx, _train_request(ctx, "rex", "sd3").model_dump())

    assert answer is None
    replies = await ctx["redis"].zrange(REPLY_QUEUE, 0, -1)
    assert [r for r in replies if r.endswith(b":deliver_failure")] == [b"job-rex:deliver_failure"]
    with pytest.raises(EngineError, match="serves the base models 'sd', 'xl', not 'sd3'"):
        served_model(ctx, "sd3")
