"""The engine's GPU paths on the tiny models: half-precision training, 8-bit Adam, hot-swapping.

Skipped without CUDA (CI has none); `bench/gpu.sh` runs them on a lent GPU. They need only
torch/diffusers/peft (no Redis, no bot), so they also run with ``--noconftest``.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.generation import Generator
from engine.models import load_pipeline
from engine.tiny import build_tiny_model, build_tiny_sdxl_model
from engine.training import TrainConfig, save_adapter, train_lora

pytestmark = [
    pytest.mark.model,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _photos(count: int, colour: tuple[int, int, int]) -> list[Image.Image]:
    rng = np.random.default_rng(sum(colour))
    photos = []
    for _ in range(count):
        pixels = rng.integers(0, 60, size=(80, 80, 3), dtype=np.uint8)
        pixels[20:60, 20:60] = colour
        photos.append(Image.fromarray(pixels))
    return photos


def _train(pipe: object, steps: int = 6, **cfg: object) -> tuple[list[float], dict[str, object]]:
    config = TrainConfig(steps=steps, class_images=2, seed=0, **cfg)  # type: ignore[arg-type]
    outcome = train_lora(pipe, _photos(3, (230, 40, 40)), _photos(2, (40, 40, 230)), "sks", "toy",
                         config)  # type: ignore[arg-type]  # fmt: skip
    return outcome.instance_losses + outcome.prior_losses, outcome.__dict__


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("gpu") / "tiny")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_training_keeps_lora_weights_in_fp32(tiny: Path, dtype: torch.dtype) -> None:
    """fp16 base weights with fp32 LoRA weights and a grad scaler: no "Attempting to unscale
    FP16 gradients" error, finite losses, fp32 adapter weights."""
    pipe = load_pipeline(tiny, device="cuda", dtype=dtype)
    losses, outcome = _train(pipe)
    assert losses and all(math.isfinite(loss) for loss in losses)
    weights = outcome["state_dict"]
    assert weights and all(t.dtype == torch.float32 for t in weights.values())  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "options",
    [{"gradient_checkpointing": True}, {"train_text_encoder": True}, {"channels_last": True}],
    ids=str,
)
def test_gpu_training_options(tiny: Path, options: dict[str, object]) -> None:
    pipe = load_pipeline(tiny, device="cuda")
    losses, _ = _train(pipe, **options)
    assert all(math.isfinite(loss) for loss in losses)


# Inductor warns as it compiles (an lru_cache traced through in diffusers' checkpointing
# helper); the suite turns warnings into errors.
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compiled_training_learns_what_eager_training_learns(
    tiny: Path, dtype: torch.dtype
) -> None:
    """DREAMBOT_TRAIN_COMPILE on a GPU: inductor's graphs in half precision (fp16 with the grad
    scaler and fused AdamW) give losses close to the eager run's."""
    pipe = load_pipeline(tiny, device="cuda", dtype=dtype)
    eager, _ = _train(pipe, steps=6)
    compiled, _ = _train(pipe, steps=6, compile_backend="inductor")
    assert all(math.isfinite(loss) for loss in compiled)
    assert compiled == pytest.approx(eager, rel=0.05, abs=1e-3)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="no bitsandbytes")
def test_eight_bit_adam_trains(tiny: Path) -> None:
    pipe = load_pipeline(tiny, device="cuda")
    losses, _ = _train(pipe, steps=10, optimizer="adamw8bit")
    assert all(math.isfinite(loss) for loss in losses)


def test_sdxl_trains_on_gpu(tmp_path: Path) -> None:
    pipe = load_pipeline(build_tiny_sdxl_model(tmp_path / "xl"), device="cuda")
    losses, _ = _train(pipe)
    assert all(math.isfinite(loss) for loss in losses)


def _adapters(pipe: object, folder: Path) -> list[tuple[str, Path]]:
    adapters = []
    for seed, (name, colour) in enumerate([("a", (230, 40, 40)), ("b", (40, 230, 40))]):
        cfg = TrainConfig(steps=8, prior_loss_weight=0.0, class_images=0, seed=seed,
                          learning_rate=1e-2)  # fmt: skip
        outcome = train_lora(pipe, _photos(3, colour), [], "sks", "toy", cfg)  # type: ignore[arg-type]
        path = folder / f"{name}.safetensors"
        save_adapter(outcome.state_dict, path, {}, lora_config=outcome.lora_config)
        adapters.append((name, path))
    return adapters


def _pixels(generator: Generator, adapter: tuple[str, Path] | None) -> np.ndarray:
    adapters = [] if adapter is None else [(adapter[0], adapter[1], 1.0)]
    (image,) = generator.generate("a photo of sks toy", count=1, seed=3, steps=4,
                                  adapters=adapters)  # fmt: skip
    return np.asarray(image, dtype=np.int16)


# Dynamo and inductor warn as they compile (an lru_cache traced through in diffusers'
# upsampling, torch.jit deprecations); the suite turns warnings into errors.
@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
@pytest.mark.parametrize("compile_unet", [False, True], ids=["hotswap", "hotswap+compile"])
def test_hotswap_switches_subjects_and_back(tiny: Path, tmp_path: Path, compile_unet: bool) -> None:
    """Slots swap weights in place: A, B and A again; A comes back (bf16 kernels may differ
    in the last bit, so a small tolerance) and B differs from A. Compiled, a swap does not
    compile the UNet again."""
    pipe = load_pipeline(tiny, device="cuda")
    a, b = _adapters(pipe, tmp_path)
    generator = Generator(pipe, hotswap=True, compile=compile_unet)
    base = _pixels(generator, None)
    first_a = _pixels(generator, a)
    compiled_frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with_b = _pixels(generator, b)
    again_a = _pixels(generator, a)
    assert np.abs(first_a - base).mean() > 1
    assert np.abs(with_b - first_a).mean() > 1
    assert np.abs(again_a - first_a).mean() < 1
    assert generator.adapter_loads == 3
    if compile_unet:
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiled_frames


def test_merged_subjects_on_gpu_match_unmerged_and_restore_the_base(
    tiny: Path, tmp_path: Path
) -> None:
    """Half precision: a merged adapter draws what the unmerged one draws (up to rounding), and
    switching away restores the base weights bit for bit."""
    pipe = load_pipeline(tiny, device="cuda")
    a, b = _adapters(pipe, tmp_path)
    base_weights = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    merged, plain = Generator(pipe), Generator(load_pipeline(tiny, device="cuda"), fuse=False)
    base = _pixels(merged, None)
    first_a = _pixels(merged, a)
    assert np.abs(first_a - _pixels(plain, a)).mean() < 1
    assert np.abs(first_a - base).mean() > 1
    _pixels(merged, b)
    assert np.array_equal(_pixels(merged, a), first_a)
    assert np.array_equal(_pixels(merged, None), base)
    restored = {k.replace(".base_layer", ""): v for k, v in pipe.unet.state_dict().items()}
    assert all(torch.equal(v, restored[k]) for k, v in base_weights.items())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_safety_checker_screens_in_half_precision(tiny: Path, dtype: torch.dtype) -> None:
    """The engine's checker loads in the models' half precision on CUDA and flags as in fp32:
    nothing with the tiny checker's thresholds, everything once they are below any cosine."""
    from engine.safety import load_safety_checker, screen

    checker = load_safety_checker(tiny, device="cuda", dtype=dtype)
    assert checker.model.dtype == dtype
    images = _photos(3, (200, 120, 40))
    assert screen(checker, images) == images
    with torch.no_grad():
        checker.model.concept_embeds_weights.fill_(-2.0)
    assert screen(checker, images) == [None, None, None]
