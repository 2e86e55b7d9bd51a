"""A compiled UNet with hot-swapped subjects, on the CPU (the engine enables it on GPUs only,
but the Generator's code path is the same): switching subjects never compiles again."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from engine.generation import Generator
from engine.models import load_pipeline
from engine.training import TrainConfig, save_adapter, train_lora

pytestmark = [
    pytest.mark.model,
    # Dynamo and inductor warn as they compile; the suite turns warnings into errors.
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning"),
]


def _square(colour: tuple[int, int, int], shift: int) -> Image.Image:
    image = Image.new("RGB", (64, 64), (20, 40, 200))
    ImageDraw.Draw(image).rectangle([16 + shift, 16, 48 + shift, 48], fill=colour)
    return image


def test_compiled_unet_switches_subjects_without_recompiling(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    pipe = load_pipeline(tiny_model_dir)  # its own: compiling changes the UNet in place
    adapters = []
    for seed, colour in enumerate([(220, 20, 20), (20, 220, 20)]):
        photos = [_square(colour, shift) for shift in (0, 4, 8)]
        cfg = TrainConfig(steps=8, learning_rate=3e-2, prior_loss_weight=0.0, seed=seed)
        outcome = train_lora(pipe, photos, [], "zqv", "toy", cfg)
        path = tmp_path / f"subject-{seed}.safetensors"
        save_adapter(outcome.state_dict, path, {}, lora_config=outcome.lora_config)
        adapters.append((f"subject-{seed}", path, 1.0))
    generator = Generator(pipe, hotswap=True, compile=True)

    def draw(adapter: tuple[str, Path, float]) -> np.ndarray:
        (image,) = generator.generate("a zqv toy", count=1, seed=3, steps=2, adapters=[adapter])
        return np.asarray(image, dtype=np.int16)

    first = draw(adapters[0])  # compiles
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    second = draw(adapters[1])
    again = draw(adapters[0])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert np.abs(second - first).mean() > 1
    assert np.array_equal(again, first)
    assert generator.adapter_loads == 3
