"""Faster training steps: a compiled UNet copy (``TrainConfig.compile_backend``) and fused AdamW.

The engine compiles with inductor, whose first compilation takes minutes on CI's two cores, so
these tests compile with "aot_eager": Dynamo captures the UNet and AOT autograd builds its
forward and backward graphs exactly as for inductor, which then runs them without generating
code. The compiled code is cached per process, so the tests with the same shapes compile once.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image

import engine.training
from engine.train_job import recipe, train_subject
from engine.training import (
    TrainConfig,
    TrainingCancelled,
    TrainState,
    make_optimizer,
    train_lora,
    unet_with_lora,
)
from tests.engine.conftest import engine_context
from tests.engine.test_training_job import short_recipe, train_request
from tests.engine.test_training_resume import train_then_resume

pytestmark = [
    pytest.mark.model,
    # Dynamo warns as it traces: through the lru_cache in diffusers' checkpointing helper, and
    # when it reads ``.grad`` of the text encoder's output (an input of the compiled UNet).
    pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`"),
    pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf"),
]

CHEAP_BACKEND = "aot_eager"
EAGER = TrainConfig(steps=6, learning_rate=3e-2, seed=5)
COMPILED = replace(EAGER, compile_backend=CHEAP_BACKEND)


def _assert_same_training(
    compiled: engine.training.TrainOutcome, eager: engine.training.TrainOutcome
) -> None:
    # The compiled graphs may order float operations differently: close, not bit-equal.
    assert compiled.instance_losses == pytest.approx(eager.instance_losses, rel=1e-4)
    assert compiled.prior_losses == pytest.approx(eager.prior_losses, rel=1e-4)
    assert compiled.state_dict.keys() == eager.state_dict.keys()
    for key, value in eager.state_dict.items():
        assert torch.allclose(compiled.state_dict[key], value, atol=1e-5), key
    assert compiled.lora_config == eager.lora_config


def test_the_compiled_copy_stays_a_diffusers_unet_with_the_same_keys(
    tiny_pipe: StableDiffusionPipeline,
) -> None:
    eager = unet_with_lora(tiny_pipe, EAGER)
    compiled = unet_with_lora(tiny_pipe, COMPILED)

    assert type(compiled) is UNet2DConditionModel
    assert compiled._compiled_call_impl is not None and eager._compiled_call_impl is None
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    assert tiny_pipe.unet._compiled_call_impl is None  # the warm UNet is not compiled


def test_a_compiled_run_learns_what_the_eager_run_learns(
    tiny_pipe: StableDiffusionPipeline,
    subject_photos: list[Image.Image],
    class_images: list[Image.Image],
) -> None:
    eager = train_lora(tiny_pipe, subject_photos, class_images, "zqv", "dog", EAGER)
    compiled = train_lora(tiny_pipe, subject_photos, class_images, "zqv", "dog", COMPILED)

    assert len(compiled.instance_losses) == len(compiled.prior_losses) == 6
    _assert_same_training(compiled, eager)


def test_a_compiled_run_resumes_from_its_checkpoint_like_the_uninterrupted_run(
    tiny_pipe: StableDiffusionPipeline,
    subject_photos: list[Image.Image],
    class_images: list[Image.Image],
) -> None:
    saved, whole, resumed, steps_after_resume = train_then_resume(
        tiny_pipe, subject_photos, class_images, COMPILED
    )

    assert [state.step for state in saved] == [2, 4]
    assert all("_orig_mod" not in name for name in saved[0].trainable)
    assert steps_after_resume == [5, 6]
    _assert_same_training(resumed, whole)


def test_an_eager_runs_checkpoint_resumes_compiled(
    tiny_pipe: StableDiffusionPipeline,
    subject_photos: list[Image.Image],
    class_images: list[Image.Image],
) -> None:
    # The engine leaves compilation out of the run's fingerprint: turning it on between a
    # crash and the retry resumes the checkpoint.
    saved: list[TrainState] = []
    eager = train_lora(
        tiny_pipe,
        subject_photos,
        class_images,
        "zqv",
        "dog",
        EAGER,
        checkpoint_every=4,
        on_checkpoint=saved.append,
    )

    resumed = train_lora(
        tiny_pipe, subject_photos, class_images, "zqv", "dog", COMPILED, resume=saved[0]
    )

    _assert_same_training(resumed, eager)


def test_gradient_checkpointing_and_text_encoder_lora_train_the_same_compiled(
    tiny_pipe: StableDiffusionPipeline, subject_photos: list[Image.Image]
) -> None:
    cfg = replace(EAGER, steps=3, gradient_checkpointing=True, train_text_encoder=True)

    eager = train_lora(tiny_pipe, subject_photos, [], "zqv", "dog", cfg)
    compiled = train_lora(
        tiny_pipe, subject_photos, [], "zqv", "dog", replace(cfg, compile_backend=CHEAP_BACKEND)
    )

    assert any(key.startswith("text_encoder.") for key in compiled.state_dict)
    _assert_same_training(compiled, eager)


def test_a_compiled_run_stops_when_asked(
    tiny_pipe: StableDiffusionPipeline,
    subject_photos: list[Image.Image],
    class_images: list[Image.Image],
) -> None:
    done: list[int] = []

    with pytest.raises(TrainingCancelled, match="step 3 of 6"):
        train_lora(
            tiny_pipe,
            subject_photos,
            class_images,
            "zqv",
            "dog",
            COMPILED,
            progress=lambda step, total, loss: done.append(step),
            should_stop=lambda: len(done) >= 2,
        )

    assert done == [1, 2]


def test_compilation_is_left_out_of_the_fingerprint() -> None:
    plain = TrainConfig()

    assert recipe(replace(plain, compile_backend="inductor")) == recipe(plain)
    assert recipe(replace(plain, steps=10)) != recipe(plain)


async def test_the_training_job_compiles_the_unet_when_the_setting_asks(
    tmp_path: Path,
    redis_clean: str,
    tiny_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    backends: list[str | None] = []
    real_train_lora = engine.training.train_lora

    def cheaply_compiled(*args: Any, **kwargs: Any) -> Any:
        *rest, cfg = args
        backends.append(cfg.compile_backend)
        return real_train_lora(*rest, replace(cfg, compile_backend=CHEAP_BACKEND), **kwargs)

    monkeypatch.setattr(engine.training, "train_lora", cheaply_compiled)
    settings = short_recipe(tmp_path, redis_clean, tiny_model_dir, train_compile=True)
    async with engine_context(settings) as ctx:
        result = await train_subject(ctx, train_request(ctx, "rex").model_dump())

    assert result is not None and result["steps"] == 2
    assert backends == ["inductor"]


@pytest.mark.parametrize(
    ("device", "fused"), [("cpu", True), ("meta", None)], ids=["cpu", "unsupported-device"]
)
def test_adamw_is_fused_where_torch_supports_it(device: str, fused: bool | None) -> None:
    unet_params = [torch.nn.Parameter(torch.zeros(4, 2, device=device))]
    text_params = [torch.nn.Parameter(torch.zeros(2, 4, device=device))]
    groups: list[dict[str, Any]] = [{"params": unet_params}, {"params": text_params, "lr": 1e-5}]

    optimizer = make_optimizer(groups, TrainConfig())

    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["fused"] is fused
    assert [group["lr"] for group in optimizer.param_groups] == [1e-4, 1e-5]
