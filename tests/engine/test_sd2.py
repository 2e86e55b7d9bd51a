"""The SD 2.x code path on the tiny SD 2.x-shaped model: it is detected as SD 2.x with
v-prediction, training targets the velocity, a trained adapter changes its images, and it
round-trips through a single checkpoint file with an OpenCLIP-layout text encoder."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline

from engine.families import ModelFamily, detect_family
from engine.generation import Generator
from engine.models import load_pipeline
from engine.tiny import build_tiny_sd2_model, save_single_file
from engine.training import (
    TrainConfig,
    encode_prompt_once,
    save_adapter,
    train_lora,
    train_steps,
    unet_with_lora,
)
from tests.engine.conftest import red_square_photo

pytestmark = pytest.mark.model

PROMPT = "a photo of zqv dog"


@pytest.fixture(scope="module")
def tiny_sd2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd2_model(tmp_path_factory.mktemp("models") / "tiny-sd2")


@pytest.fixture(scope="module")
def sd2_pipe(tiny_sd2_dir: Path) -> StableDiffusionPipeline:
    pipe = load_pipeline(tiny_sd2_dir)
    assert isinstance(pipe, StableDiffusionPipeline)
    return pipe


def test_tiny_sd2_model_is_detected_as_sd2_with_v_prediction(
    tiny_sd2_dir: Path, sd2_pipe: StableDiffusionPipeline, tmp_path: Path
) -> None:
    family = detect_family(tiny_sd2_dir)

    assert family == ModelFamily("sd2", "v_prediction", 64)
    assert family.label == "SD 2.x (v-prediction, 64 px)"
    assert sd2_pipe.unet.config.use_linear_projection
    # Wider than the tiny SD 1.x encoder (32), as OpenCLIP ViT-H is wider than CLIP ViT-L.
    assert encode_prompt_once(sd2_pipe, PROMPT).shape == (1, 77, 64)
    assert Generator(sd2_pipe).scheduler.config.prediction_type == "v_prediction"
    base = build_tiny_sd2_model(tmp_path / "sd2-base", v_prediction=False)
    assert detect_family(base) == ModelFamily("sd2", "epsilon", 64)


def _first_step_loss(
    pipe: StableDiffusionPipeline, scheduler: DDPMScheduler, latents: torch.Tensor
) -> float:
    cfg = TrainConfig(steps=1, seed=0, batch_size=1)
    embeds = encode_prompt_once(pipe, PROMPT)
    no_priors = latents[:0]
    losses, _ = train_steps(
        unet_with_lora(pipe, cfg),
        scheduler,
        latents,
        no_priors,
        embeds,
        embeds,
        cfg,
        autocast_dtype=torch.float32,
    )
    return losses[0]


def test_training_on_a_v_prediction_model_targets_the_velocity(
    sd2_pipe: StableDiffusionPipeline,
) -> None:
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    v_scheduler = DDPMScheduler.from_config(sd2_pipe.scheduler.config)
    eps_scheduler = DDPMScheduler.from_config(v_scheduler.config, prediction_type="epsilon")

    v_loss = _first_step_loss(sd2_pipe, v_scheduler, latents)
    eps_loss = _first_step_loss(sd2_pipe, eps_scheduler, latents)

    # Step 1 by hand: train_steps' draws from its seeded CPU generator (pick, noise,
    # timestep), and the base UNet's prediction (fresh LoRA layers add exactly zero).
    rng = torch.Generator().manual_seed(0)
    picked = latents[torch.randint(len(latents), (1,), generator=rng)]
    noise = torch.randn(picked.shape, generator=rng)
    timesteps = torch.randint(v_scheduler.config.num_train_timesteps, (1,), generator=rng)
    noisy = v_scheduler.add_noise(picked, noise, timesteps)
    with torch.no_grad():
        pred = sd2_pipe.unet(noisy, timesteps, encode_prompt_once(sd2_pipe, PROMPT)).sample
    velocity = v_scheduler.get_velocity(picked, noise, timesteps)

    assert math.isfinite(v_loss) and math.isfinite(eps_loss)
    assert v_loss == pytest.approx(F.mse_loss(pred, velocity).item(), rel=1e-5)
    assert eps_loss == pytest.approx(F.mse_loss(pred, noise).item(), rel=1e-5)
    assert v_loss != pytest.approx(eps_loss, rel=1e-3)


def test_sd2_model_trains_and_its_adapter_changes_the_images(
    tiny_sd2_dir: Path, tmp_path: Path
) -> None:
    pipe = load_pipeline(tiny_sd2_dir)  # its own: generation loads the adapter into it
    photos = [red_square_photo(i) for i in range(3)]
    cfg = TrainConfig(steps=6, learning_rate=3e-2, seed=0)

    outcome = train_lora(pipe, photos, [], "zqv", "dog", cfg)
    adapter = tmp_path / "sd2.safetensors"
    save_adapter(outcome.state_dict, adapter, {}, lora_config=outcome.lora_config)

    assert len(outcome.instance_losses) == 6
    assert all(math.isfinite(loss) for loss in outcome.instance_losses)
    generator = Generator(pipe)
    base = generator.generate(PROMPT, count=1, seed=0, steps=3)
    subject = generator.generate(PROMPT, count=1, seed=0, steps=3, adapters=[("rex", adapter, 1.0)])
    again = generator.generate(PROMPT, count=1, seed=0, steps=3)
    assert subject[0].size == (64, 64)
    difference = np.abs(np.asarray(base[0], int) - np.asarray(subject[0], int)).mean()
    assert difference > 1.0
    assert again[0].tobytes() == base[0].tobytes()


def test_sd2_single_file_with_open_clip_encoder_loads_offline_with_the_same_weights(
    tiny_sd2_dir: Path, sd2_pipe: StableDiffusionPipeline, tmp_path: Path
) -> None:
    file = save_single_file(tiny_sd2_dir, tmp_path / "sd2.safetensors")

    # A bare file is assumed to be the 768 px v-prediction model, as diffusers assumes.
    assert detect_family(file) == ModelFamily("sd2", "v_prediction", 768)
    assert detect_family(file, config=tiny_sd2_dir) == ModelFamily("sd2", "v_prediction", 64)
    pipe = load_pipeline(file, config=tiny_sd2_dir)
    for component in ("unet", "vae", "text_encoder"):
        expected = getattr(sd2_pipe, component).state_dict()
        loaded = getattr(pipe, component).state_dict()
        assert loaded.keys() == expected.keys()
        assert all(torch.equal(loaded[k], expected[k]) for k in expected), component
    a = Generator(pipe).generate(PROMPT, count=1, seed=3, steps=2)
    b = Generator(sd2_pipe).generate(PROMPT, count=1, seed=3, steps=2)
    assert a[0].tobytes() == b[0].tobytes()


async def test_the_engine_builds_and_serves_tiny_sd2_by_name(tmp_path: Path) -> None:
    """``tiny-sd2`` as a model path builds the tiny SD 2.x model on first use, like ``tiny``."""
    from engine.models import served_model
    from engine.worker import load_resources
    from tests.conftest import make_settings

    settings = make_settings(
        tmp_path / "data", "redis://127.0.0.1:1/0", models="v=tiny-sd2", base_model="v"
    )
    ctx = await load_resources(settings)
    model = served_model(ctx, "v")
    assert model.source == tmp_path / "data" / "models" / "tiny-sd2"
    assert model.family == ModelFamily("sd2", "v_prediction", 64)
