"""The generation service's promises: subject switching on the warm model, multi-subject
prompts, reproducibility down to the PNG bytes, one batch per request, img2img, previews and
hot-swapping."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from PIL import Image

from engine.generation import Generator
from engine.images import encode_png, read_png_metadata
from engine.models import load_pipeline

if TYPE_CHECKING:
    from tests.engine.conftest import TrainedSubject

pytestmark = pytest.mark.model

PROMPT = "a photo of zqv dog"
FAST = {"count": 1, "seed": 5, "steps": 3}


def pixels(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(image) for image in images]).astype(np.int16)


@pytest.fixture(scope="module")
def other_subject(
    trained_subject: TrainedSubject, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A second subject's adapter: the trained one's layout with other up-projections."""
    with safetensors.safe_open(str(trained_subject.adapter), "pt") as f:
        header = f.metadata()
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    noise = torch.Generator().manual_seed(11)
    for key, value in tensors.items():
        if "lora_B" in key or "lora.up" in key:
            tensors[key] = torch.randn(value.shape, generator=noise) * value.std() * 2
    path = tmp_path_factory.mktemp("adapters") / "other.safetensors"
    safetensors.torch.save_file(tensors, str(path), metadata=header)
    return path


@pytest.fixture
def counted_loads(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts every base-model load (from a folder or a single file) while the test runs."""
    counts = {"loads": 0}
    for owner, name in [
        (DiffusionPipeline, "from_pretrained"),
        (StableDiffusionPipeline, "from_single_file"),
    ]:
        original = getattr(owner, name)

        def counting(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            counts["loads"] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counting)
    return counts


def test_switching_subjects_keeps_the_base_model_and_switching_back_reproduces(
    tiny_model_dir: Path,
    trained_subject: TrainedSubject,
    other_subject: Path,
    counted_loads: dict[str, int],
) -> None:
    pipe = load_pipeline(tiny_model_dir)
    assert counted_loads["loads"] == 1
    unet = pipe.unet
    generator = Generator(pipe)
    rex = [("rex", trained_subject.adapter, 1.0)]
    mia = [("mia", other_subject, 1.0)]

    first = pixels(generator.generate(PROMPT, adapters=rex, **FAST))
    switched = pixels(generator.generate(PROMPT, adapters=mia, **FAST))
    back = pixels(generator.generate(PROMPT, adapters=rex, **FAST))

    assert counted_loads["loads"] == 1  # no reload of the base model, ever
    assert pipe.unet is unet
    assert generator.adapter_loads == 2  # each adapter file read once, then cached
    assert np.abs(first - switched).mean() > 1.0
    assert np.array_equal(first, back)


def test_two_subject_prompt_applies_both_adapters(
    tiny_pipe: StableDiffusionPipeline, trained_subject: TrainedSubject, other_subject: Path
) -> None:
    generator = Generator(tiny_pipe)
    rex = ("rex", trained_subject.adapter, 1.0)
    mia = ("mia", other_subject, 1.0)

    only_rex = pixels(generator.generate(PROMPT, adapters=[rex], **FAST))
    only_mia = pixels(generator.generate(PROMPT, adapters=[mia], **FAST))
    both = pixels(generator.generate(PROMPT, adapters=[rex, mia], **FAST))

    assert np.abs(both - only_rex).mean() > 1.0
    assert np.abs(both - only_mia).mean() > 1.0
    assert sorted(generator.loaded_adapters) == ["mia", "rex"]


def test_same_seed_and_settings_give_byte_identical_pngs(
    tiny_pipe: StableDiffusionPipeline,
) -> None:
    metadata = {"prompt": PROMPT, "seed": "5"}
    first = [encode_png(i, metadata) for i in Generator(tiny_pipe).generate(PROMPT, **FAST)]
    again = [encode_png(i, metadata) for i in Generator(tiny_pipe).generate(PROMPT, **FAST)]
    assert first == again
    assert read_png_metadata(first[0])["dreambot:seed"] == "5"


def test_count_4_runs_as_one_batch(tiny_pipe: StableDiffusionPipeline) -> None:
    batches: list[int] = []
    hook = tiny_pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: batches.append(int(args[0].shape[0])), with_kwargs=True
    )
    try:
        images = Generator(tiny_pipe).generate(PROMPT, count=4, seed=0, steps=3)
    finally:
        hook.remove()
    assert len(images) == 4
    # One UNet call per step, each on all 4 images (twice: with and without the prompt).
    assert batches == [8, 8, 8]


def test_scheduler_is_dpm_solver_plus_plus(tiny_pipe: StableDiffusionPipeline) -> None:
    scheduler = Generator(tiny_pipe).scheduler
    assert type(scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert scheduler.config.algorithm_type == "dpmsolver++"


def test_subject_strength_scales_the_adapter(
    tiny_pipe: StableDiffusionPipeline, trained_subject: TrainedSubject
) -> None:
    generator = Generator(tiny_pipe)
    base = pixels(generator.generate(PROMPT, **FAST))
    scaled = {
        scale: pixels(
            generator.generate(PROMPT, adapters=[("rex", trained_subject.adapter, scale)], **FAST)
        )
        for scale in (0.5, 1.0)
    }
    assert 0 < np.abs(scaled[0.5] - base).mean() < np.abs(scaled[1.0] - base).mean()


def test_several_prompts_draw_one_image_each_in_one_batch(
    tiny_pipe: StableDiffusionPipeline,
) -> None:
    images = Generator(tiny_pipe).generate(["a red ball", "a blue box", "a tree"], **FAST)
    assert len(images) == 3


def test_img2img_starts_from_the_init_image_and_resizes_it(
    tiny_pipe: StableDiffusionPipeline,
) -> None:
    generator = Generator(tiny_pipe)
    [start] = generator.generate(PROMPT, **FAST)
    steps: list[tuple[int, int]] = []
    close = generator.generate(
        PROMPT,
        count=2,
        seed=9,
        steps=10,
        init_image=start,
        init_strength=0.2,
        progress=lambda step, total: steps.append((step, total)),
    )
    far = generator.generate(PROMPT, count=1, seed=9, steps=10, init_image=start, init_strength=1.0)
    [bigger] = generator.generate(
        PROMPT, count=1, seed=9, steps=10, width=128, height=96, init_image=start, init_strength=0.3
    )

    assert len(close) == 2 and steps[-1] == (2, 2)  # only the last 20% of the schedule
    start_px = pixels([start])
    assert np.abs(pixels(close[:1]) - start_px).mean() < np.abs(pixels(far) - start_px).mean()
    assert bigger.size == (128, 96)


def test_previews_come_from_the_latents_and_are_throttled(
    tiny_pipe: StableDiffusionPipeline,
) -> None:
    previews: list[tuple[int, int, tuple[int, int]]] = []
    Generator(tiny_pipe).generate(
        PROMPT,
        count=1,
        seed=0,
        steps=4,
        preview=lambda step, total, image: previews.append((step, total, image.size)),
        preview_every=0.0,
    )
    # Every step but the last (the final image follows anyway), 128 px on the long side.
    assert previews == [(1, 4, (128, 128)), (2, 4, (128, 128)), (3, 4, (128, 128))]

    previews.clear()
    Generator(tiny_pipe).generate(
        PROMPT,
        count=1,
        seed=0,
        steps=4,
        preview=lambda step, total, image: previews.append((step, total, image.size)),
        preview_every=3600.0,
    )
    assert previews == []


def test_hotswap_slots_give_the_same_images_as_named_adapters(
    tiny_model_dir: Path, trained_subject: TrainedSubject, other_subject: Path
) -> None:
    # Unmerged, as the slots are: the two paths then match bit for bit.
    plain = Generator(load_pipeline(tiny_model_dir), fuse=False)
    hot_pipe = load_pipeline(tiny_model_dir)
    hot = Generator(hot_pipe, hotswap=True, hotswap_slots=2, hotswap_rank=8)
    rex = ("rex", trained_subject.adapter, 1.0)
    mia = ("mia", other_subject, 0.7)

    for adapters in ([rex], [mia], [rex, mia], [], [rex]):
        assert np.array_equal(
            pixels(plain.generate(PROMPT, adapters=adapters, **FAST)),
            pixels(hot.generate(PROMPT, adapters=adapters, **FAST)),
        ), adapters
    # Slots are reused in place: never more than two adapters in the UNet.
    assert sorted(hot_pipe.unet.peft_config) == ["slot_0", "slot_1"]
    assert hot.loaded_adapters == ["rex", "mia"]
    assert hot.adapter_loads == 4  # a slot that already holds the subject is not reloaded
