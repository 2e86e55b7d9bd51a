"""Optional LoRA on the text encoder(s), trained jointly with the UNet's LoRA."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import safetensors
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image

from engine.checkpoints import fingerprint
from engine.generation import Generator
from engine.models import load_pipeline
from engine.training import (
    TrainConfig,
    TrainOutcome,
    TrainState,
    class_prompt,
    encode_prompt_pooled,
    instance_prompt,
    save_adapter,
    text_encoders_with_lora,
    train_lora,
)
from tests.conftest import make_settings
from tests.engine.conftest import TrainedSubject, engine_context, red_square_photo

pytestmark = pytest.mark.model

TE = TrainConfig(steps=6, learning_rate=3e-2, seed=0, train_text_encoder=True)


def _image_difference(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, int) - np.asarray(b, int)).mean())


@pytest.fixture(scope="module")
def sdxl_pipe(tiny_sdxl_dir: Path) -> StableDiffusionXLPipeline:
    pipe = load_pipeline(tiny_sdxl_dir)
    assert isinstance(pipe, StableDiffusionXLPipeline)
    return pipe


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_untrained_text_encoder_lora_encodes_as_the_pipeline_does(
    family: str,
    tiny_pipe: StableDiffusionPipeline,
    sdxl_pipe: StableDiffusionXLPipeline,
) -> None:
    pipe = tiny_pipe if family == "sd" else sdxl_pipe
    text = text_encoders_with_lora(pipe, "zqv", "dog", TE)

    with torch.no_grad():
        embeds, pooled = text.encode(torch.device("cpu"))

    # LoRA starts as the identity (its B matrices are zero): the per-step encoding must match
    # the cached one exactly in what it computes.
    for row, prompt in enumerate([instance_prompt("zqv", "dog"), class_prompt("dog")]):
        want, want_pooled = encode_prompt_pooled(pipe, prompt)
        assert torch.allclose(embeds[row : row + 1], want, atol=1e-5)
        if want_pooled is None:
            assert pooled is None
        else:
            assert pooled is not None and torch.allclose(
                pooled[row : row + 1], want_pooled, atol=1e-5
            )
    assert set(text.encoders) == (
        {"text_encoder"} if family == "sd" else {"text_encoder", "text_encoder_2"}
    )


@dataclass
class TextEncoderSubject:
    outcome: TrainOutcome
    adapter: Path
    text_encoder_before: dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def te_subject(
    tiny_model_dir: Path,
    subject_photos: list[Image.Image],
    tmp_path_factory: pytest.TempPathFactory,
) -> TextEncoderSubject:
    """The red square trained with text-encoder LoRA, saved as an adapter."""
    pipe = load_pipeline(tiny_model_dir)
    before = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    outcome = train_lora(pipe, subject_photos, [], "zqv", "dog", TE)
    adapter = tmp_path_factory.mktemp("te-adapters") / "te.safetensors"
    save_adapter(
        outcome.state_dict,
        adapter,
        {"subject": "te"},
        lora_config=outcome.lora_config,
        text_encoder_lora_config=outcome.text_encoder_lora_config,
    )
    # The warm text encoder is only read.
    after = pipe.text_encoder.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    return TextEncoderSubject(outcome, adapter, before)


def test_the_adapter_holds_text_encoder_lora_in_diffusers_format(
    te_subject: TextEncoderSubject,
) -> None:
    with safetensors.safe_open(te_subject.adapter, framework="pt") as f:
        keys = set(f.keys())
        header = f.metadata()
    metadata = json.loads(header["lora_adapter_metadata"])
    text_keys = {k for k in keys if k.startswith("text_encoder.")}
    assert text_keys and all(k.startswith("unet.") for k in keys - text_keys) and keys - text_keys
    # diffusers' key format, on every attention projection.
    assert all(".lora_linear_layer." in k for k in text_keys)
    assert {k.split(".")[-4] for k in text_keys} == {"q_proj", "k_proj", "v_proj", "out_proj"}
    assert metadata["text_encoder.r"] == metadata["text_encoder.lora_alpha"] == 4
    assert header["subject"] == "te"
    ups = [v for k, v in te_subject.outcome.state_dict.items() if k.startswith("text_encoder.")]
    assert any(v.abs().sum() > 0 for v in ups)  # the text-encoder LoRA did train


def test_text_encoder_adapter_loads_changes_images_and_switches_off_exactly(
    tiny_model_dir: Path, te_subject: TextEncoderSubject
) -> None:
    pipe = load_pipeline(tiny_model_dir)
    generator = Generator(pipe)
    prompt = instance_prompt("zqv", "dog")
    spec = ("te", te_subject.adapter, 1.0)

    base = generator.generate(prompt, count=1, seed=0, steps=3)
    subject = generator.generate(prompt, count=1, seed=0, steps=3, adapters=[spec])
    assert set(pipe.text_encoder.peft_config) == set(pipe.unet.peft_config)
    again = generator.generate(prompt, count=1, seed=0, steps=3)

    assert _image_difference(base[0], subject[0]) > 1.0
    assert again[0].tobytes() == base[0].tobytes()
    generator.forget_adapter("te")
    assert not getattr(pipe.text_encoder, "peft_config", None)
    assert generator.generate(prompt, count=1, seed=0, steps=3)[0].tobytes() == base[0].tobytes()


def test_hotswap_slots_take_text_encoder_adapters_too(
    tiny_model_dir: Path, te_subject: TextEncoderSubject, trained_subject: TrainedSubject
) -> None:
    # diffusers cannot hot-swap text encoders; the slot's text-encoder part is replaced.
    # Unmerged, as the slots are: the two paths then match bit for bit.
    plain = Generator(load_pipeline(tiny_model_dir), fuse=False)
    hot_pipe = load_pipeline(tiny_model_dir)
    hot = Generator(hot_pipe, hotswap=True, hotswap_slots=2, hotswap_rank=8)
    te = ("te", te_subject.adapter, 1.0)
    rex = ("rex", trained_subject.adapter, 0.8)  # UNet only
    prompt = instance_prompt("zqv", "dog")

    for adapters in ([te], [rex], [te, rex], [], [rex, te]):
        want = plain.generate(prompt, count=1, seed=0, steps=3, adapters=adapters)[0]
        got = hot.generate(prompt, count=1, seed=0, steps=3, adapters=adapters)[0]
        assert got.tobytes() == want.tobytes(), adapters
    assert sorted(hot_pipe.unet.peft_config) == ["slot_0", "slot_1"]
    assert sorted(hot_pipe.text_encoder.peft_config) == ["slot_1"]


def test_text_encoder_lora_loads_with_its_alpha_and_moves_the_prompt_embedding(
    tiny_model_dir: Path, subject_photos: list[Image.Image], tmp_path: Path
) -> None:
    pipe = load_pipeline(tiny_model_dir)
    cfg = replace(TE, steps=3, rank=4, alpha=8)
    outcome = train_lora(pipe, subject_photos, [], "zqv", "dog", cfg)
    path = tmp_path / "alpha.safetensors"
    save_adapter(
        outcome.state_dict,
        path,
        {},
        lora_config=outcome.lora_config,
        text_encoder_lora_config=outcome.text_encoder_lora_config,
    )
    prompt = instance_prompt("zqv", "dog")
    before, _ = encode_prompt_pooled(pipe, prompt)

    pipe.load_lora_weights(str(tmp_path), weight_name=path.name, adapter_name="alpha")

    scalings = {
        scale
        for module in pipe.text_encoder.modules()
        if isinstance(getattr(module, "scaling", None), dict)
        for scale in module.scaling.values()
    }
    assert scalings == {2.0}
    with torch.no_grad():
        after = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
    assert not torch.allclose(before, after, atol=1e-4)
    # Training's cached (frozen) encoding ignores a text-encoder adapter left active.
    assert torch.equal(encode_prompt_pooled(pipe, prompt)[0], before)


def test_sdxl_trains_lora_on_both_text_encoders(
    sdxl_pipe: StableDiffusionXLPipeline, tmp_path: Path
) -> None:
    photos = [red_square_photo(i) for i in range(3)]
    generator = Generator(sdxl_pipe)
    priors = generator.generate("a photo of dog", count=1, seed=1, steps=2)

    outcome = train_lora(sdxl_pipe, photos, priors, "zqv", "dog", replace(TE, steps=4))
    adapter = tmp_path / "xl-te.safetensors"
    save_adapter(
        outcome.state_dict,
        adapter,
        {},
        lora_config=outcome.lora_config,
        text_encoder_lora_config=outcome.text_encoder_lora_config,
    )

    prefixes = {key.split(".", 1)[0] for key in outcome.state_dict}
    assert prefixes == {"unet", "text_encoder", "text_encoder_2"}
    assert len(outcome.prior_losses) == 4
    prompt = instance_prompt("zqv", "dog")
    base = generator.generate(prompt, count=1, seed=0, steps=3)
    subject = generator.generate(prompt, count=1, seed=0, steps=3, adapters=[("xl", adapter, 1.0)])
    again = generator.generate(prompt, count=1, seed=0, steps=3)
    assert _image_difference(base[0], subject[0]) > 1.0
    assert again[0].tobytes() == base[0].tobytes()


def test_resuming_restores_the_text_encoder_lora_and_its_optimizer_state(
    tiny_pipe: StableDiffusionPipeline, subject_photos: list[Image.Image]
) -> None:
    cfg = replace(TE, steps=4)
    saved: list[TrainState] = []
    whole = train_lora(
        tiny_pipe,
        subject_photos,
        [],
        "zqv",
        "dog",
        cfg,
        checkpoint_every=2,
        on_checkpoint=saved.append,
    )
    resumed = train_lora(tiny_pipe, subject_photos, [], "zqv", "dog", cfg, resume=saved[0])

    assert any(name.startswith("text_encoder.") for name in saved[0].trainable)
    assert len(saved[0].optimizer["param_groups"]) == 2
    assert resumed.instance_losses == pytest.approx(whole.instance_losses, rel=1e-5)
    assert resumed.state_dict.keys() == whole.state_dict.keys()
    assert all(
        torch.allclose(v, resumed.state_dict[k], atol=1e-6) for k, v in whole.state_dict.items()
    )


def test_the_flag_and_its_learning_rate_are_part_of_the_fingerprint() -> None:
    from dataclasses import asdict

    def key(cfg: TrainConfig) -> str:
        return fingerprint([b"photo"], {"config": asdict(cfg)})

    plain = TrainConfig()
    assert key(plain) != key(replace(plain, train_text_encoder=True))
    assert key(replace(plain, train_text_encoder=True)) != key(
        replace(plain, train_text_encoder=True, text_encoder_learning_rate=5e-6)
    )


async def test_the_training_job_reads_the_flag_and_stores_it_with_the_adapter(
    tmp_path: Path, redis_clean: str, tiny_model_dir: Path
) -> None:
    from engine.artifacts import local_path
    from engine.train_job import train_subject
    from tests.engine.test_training_job import train_request

    settings = make_settings(
        tmp_path / "data",
        redis_clean,
        base_model=str(tiny_model_dir),
        train_steps=2,
        class_images=0,
        sample_count=0,
        train_text_encoder=True,
        train_text_encoder_lr=1e-3,
    )
    async with engine_context(settings) as ctx:
        request = train_request(ctx, "rex")
        assert await train_subject(ctx, request.model_dump()) is not None

    adapter = local_path(request.adapter_url)
    assert adapter is not None
    with safetensors.safe_open(str(adapter), framework="pt") as f:
        keys = list(f.keys())
        header = f.metadata()
    assert any(key.startswith("text_encoder.") for key in keys)
    assert header["train_text_encoder"] == "true"
    assert "text_encoder.lora_alpha" in json.loads(header["lora_adapter_metadata"])


def test_gradient_checkpointing_trains_the_text_encoder_the_same(
    tiny_pipe: StableDiffusionPipeline, subject_photos: list[Image.Image]
) -> None:
    cfg = replace(TE, steps=2)
    plain = train_lora(tiny_pipe, subject_photos, [], "zqv", "dog", cfg)
    recomputed = train_lora(
        tiny_pipe, subject_photos, [], "zqv", "dog", replace(cfg, gradient_checkpointing=True)
    )
    text = [k for k in plain.state_dict if k.startswith("text_encoder.")]
    assert any(plain.state_dict[k].abs().sum() > 0 for k in text if ".up." in k)
    for key in text:
        assert torch.allclose(plain.state_dict[key], recomputed.state_dict[key], atol=1e-6), key
