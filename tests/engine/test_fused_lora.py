"""Generation merges a request's adapters into the UNet and takes them out again exactly."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft.tuners.lora import Linear as LoraLinear

from engine.generation import Generator, restore_base_weights
from engine.models import load_pipeline
from engine.training import TrainConfig, unet_with_lora
from tests.engine.test_generation import FAST, PROMPT, pixels

if TYPE_CHECKING:
    from tests.engine.conftest import TrainedSubject

pytestmark = pytest.mark.model


@pytest.fixture()
def pipe(tiny_model_dir: Path) -> StableDiffusionPipeline:
    """A pipeline of its own: these tests count merges and compare every weight."""
    return load_pipeline(tiny_model_dir)


@pytest.fixture()
def two_files(trained_subject: TrainedSubject, tmp_path: Path) -> tuple[Path, Path]:
    """The trained adapter under two subject names (two adapters with the same weights)."""
    files = (tmp_path / "rex.safetensors", tmp_path / "mia.safetensors")
    for file in files:
        shutil.copy(trained_subject.adapter, file)
    return files


def base_weights(pipe: StableDiffusionPipeline) -> dict[str, torch.Tensor]:
    """Every UNet weight under its name without peft's ``base_layer.`` (absent before a load)."""
    return {
        key.replace(".base_layer", ""): value.clone()
        for key, value in pipe.unet.state_dict().items()
        if "lora_" not in key
    }


def count_merges(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the adapter names of every LoRA layer merge from now on."""
    merges: list[str] = []
    merge = LoraLinear.merge

    def counting(self: LoraLinear, *args: object, **kwargs: object) -> None:
        merges.extend(kwargs.get("adapter_names") or ["?"])  # type: ignore[arg-type]
        merge(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(LoraLinear, "merge", counting)
    return merges


def test_merged_adapters_draw_what_unmerged_ones_draw(
    pipe: StableDiffusionPipeline, tiny_model_dir: Path, two_files: tuple[Path, Path]
) -> None:
    rex, mia = two_files
    requests = [
        [("rex", rex, 1.0)],
        [("rex", rex, 0.6), ("mia", mia, 0.5)],  # two subjects, with weights
    ]
    unmerged = Generator(load_pipeline(tiny_model_dir), fuse=False)
    base = pixels(Generator(pipe).generate(PROMPT, **FAST))
    for adapters in requests:
        fused = pixels(Generator(pipe).generate(PROMPT, adapters=adapters, **FAST))
        plain = pixels(unmerged.generate(PROMPT, adapters=adapters, **FAST))
        # The same image up to rounding: far closer to each other than to the base image.
        assert np.abs(fused - plain).mean() < 0.5
        assert np.abs(fused - base).mean() > 3.0


def test_the_base_weights_come_back_bit_for_bit(
    pipe: StableDiffusionPipeline, two_files: tuple[Path, Path]
) -> None:
    rex, mia = two_files
    generator = Generator(pipe)
    generator.generate(PROMPT, count=1, seed=0, steps=1)
    before = base_weights(pipe)

    generator.generate(PROMPT, count=1, seed=0, steps=1, adapters=[("rex", rex, 0.8)])
    merged = base_weights(pipe)
    generator.generate(PROMPT, count=1, seed=0, steps=1, adapters=[("mia", mia, 1.3)])
    restore_base_weights(pipe.unet)
    after = base_weights(pipe)

    assert before.keys() == merged.keys() == after.keys()
    assert any(not torch.equal(before[k], merged[k]) for k in before)  # it did merge
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_the_same_adapters_again_reuse_the_merge_and_others_remerge(
    pipe: StableDiffusionPipeline, two_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    rex, mia = two_files
    generator = Generator(pipe)
    merges = count_merges(monkeypatch)

    first = pixels(generator.generate(PROMPT, adapters=[("rex", rex, 0.5)], **FAST))
    layers = len(merges)
    again = pixels(generator.generate(PROMPT, adapters=[("rex", rex, 0.5)], **FAST))
    assert len(merges) == layers > 0  # no second merge for the same request
    assert np.array_equal(first, again)

    stronger = pixels(generator.generate(PROMPT, adapters=[("rex", rex, 1.0)], **FAST))
    other = pixels(generator.generate(PROMPT, adapters=[("mia", mia, 0.5)], **FAST))
    back = pixels(generator.generate(PROMPT, adapters=[("rex", rex, 0.5)], **FAST))
    assert len(merges) == 4 * layers  # a new scale or subject merges anew
    assert not np.array_equal(first, stronger)
    assert np.array_equal(first, other)  # same weights under another name
    assert np.array_equal(first, back)


def test_a_generator_without_adapters_sees_the_base_another_merged_into(
    pipe: StableDiffusionPipeline, two_files: tuple[Path, Path]
) -> None:
    engine, priors = Generator(pipe), Generator(pipe)  # e.g. the class-prior generator
    base = pixels(priors.generate(PROMPT, **FAST))
    engine.generate(PROMPT, adapters=[("rex", two_files[0], 1.0)], **FAST)
    assert np.array_equal(pixels(priors.generate(PROMPT, **FAST)), base)


def test_forgetting_a_merged_subject_restores_the_base(
    pipe: StableDiffusionPipeline, two_files: tuple[Path, Path]
) -> None:
    generator = Generator(pipe)
    base = pixels(generator.generate(PROMPT, **FAST))
    before = base_weights(pipe)
    generator.generate(PROMPT, adapters=[("rex", two_files[0], 1.0)], **FAST)

    generator.forget_adapter("rex")

    assert not getattr(pipe.unet, "peft_config", None)
    after = base_weights(pipe)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert np.array_equal(pixels(generator.generate(PROMPT, **FAST)), base)


def test_a_merge_that_fails_half_way_is_rolled_back(
    pipe: StableDiffusionPipeline, two_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    generator = Generator(pipe)
    base = pixels(generator.generate(PROMPT, **FAST))
    before = base_weights(pipe)
    merge, calls = LoraLinear.merge, [0]

    def failing(self: LoraLinear, *args: object, **kwargs: object) -> None:
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("out of memory")
        merge(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(LoraLinear, "merge", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        generator.generate(PROMPT, adapters=[("rex", two_files[0], 1.0)], **FAST)
    monkeypatch.setattr(LoraLinear, "merge", merge)

    after = base_weights(pipe)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert np.array_equal(pixels(generator.generate(PROMPT, **FAST)), base)
    # and the subject still works
    fused = pixels(generator.generate(PROMPT, adapters=[("rex", two_files[0], 1.0)], **FAST))
    assert np.abs(fused - base).mean() > 3.0


def test_training_copies_the_base_even_right_after_a_merged_generation(
    pipe: StableDiffusionPipeline, two_files: tuple[Path, Path]
) -> None:
    generator = Generator(pipe)
    generator.generate(PROMPT, count=1, seed=0, steps=1)
    before = base_weights(pipe)
    generator.generate(PROMPT, count=1, seed=0, steps=1, adapters=[("rex", two_files[0], 1.0)])

    copy = unet_with_lora(pipe, TrainConfig(steps=1))

    copied = {
        key.replace(".base_layer", ""): value
        for key, value in copy.state_dict().items()
        if "lora_" not in key
    }
    assert copied.keys() == before.keys()
    assert all(torch.equal(before[k], copied[k]) for k in before)
