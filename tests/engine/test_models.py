"""Base models: family detection, single-file checkpoints, and failing early on bad paths."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from bot.config import Settings
from engine.families import ModelFamily, ModelFormatError, detect_family
from engine.generation import Generator
from engine.models import DeviceError, ModelLoadError, load_pipeline, resolve_device, served_model
from engine.tiny import save_single_file
from tests.conftest import make_settings

pytestmark = pytest.mark.model


@pytest.fixture(scope="session")
def tiny_single_file(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD model as one .safetensors in the original (LDM) layout."""
    return save_single_file(tiny_model_dir, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


def sd2_like(folder: Path, destination: Path) -> Path:
    """A copy of the tiny model whose configs say SD 2.x 768-v: OpenCLIP-width cross attention
    with linear projections, v-prediction, a 96-latent (768 px with SD's VAE) sample size."""
    shutil.copytree(folder, destination)
    unet_config = destination / "unet" / "config.json"
    unet = json.loads(unet_config.read_text())
    unet.update(use_linear_projection=True, sample_size=96)
    unet_config.write_text(json.dumps(unet))
    vae_config = destination / "vae" / "config.json"
    vae = json.loads(vae_config.read_text())
    vae["block_out_channels"] = [128, 256, 512, 512]
    vae_config.write_text(json.dumps(vae))
    scheduler_config = destination / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(scheduler_config.read_text())
    scheduler["prediction_type"] = "v_prediction"
    scheduler_config.write_text(json.dumps(scheduler))
    return destination


def test_families_are_read_from_diffusers_folders(
    tiny_model_dir: Path, tiny_sdxl_dir: Path, tmp_path: Path
) -> None:
    assert detect_family(tiny_model_dir) == ModelFamily("sd1", "epsilon", 64)
    assert detect_family(tiny_sdxl_dir) == ModelFamily("sdxl", "epsilon", 64)
    sd2 = detect_family(sd2_like(tiny_model_dir, tmp_path / "sd2"))
    assert sd2 == ModelFamily("sd2", "v_prediction", 768)
    assert sd2.label == "SD 2.x (v-prediction, 768 px)"


def test_families_are_read_from_single_file_tensor_names(
    tiny_model_dir: Path, tiny_sdxl_dir: Path, tiny_single_file: Path, tmp_path: Path
) -> None:
    # A bare file gets its family's usual size; its config folder, when given, the real one.
    assert detect_family(tiny_single_file) == ModelFamily("sd1", "epsilon", 512)
    assert detect_family(tiny_single_file, config=tiny_model_dir).resolution == 64
    sdxl_file = save_single_file(tiny_sdxl_dir, tmp_path / "xl.safetensors")
    assert detect_family(sdxl_file).name == "sdxl"
    with pytest.raises(ModelFormatError, match="SDXL but its config folder"):
        detect_family(sdxl_file, config=tiny_model_dir)


def test_single_file_checkpoint_loads_offline_with_the_same_weights_and_generates(
    tiny_model_dir: Path, tiny_single_file: Path
) -> None:
    pipe = load_pipeline(tiny_single_file, config=tiny_model_dir)
    reference = load_pipeline(tiny_model_dir)  # not the shared one: tests load adapters into it

    for component in ("unet", "vae", "text_encoder"):
        expected = getattr(reference, component).state_dict()
        loaded = getattr(pipe, component).state_dict()
        assert loaded.keys() == expected.keys()
        assert all(torch.equal(loaded[k], expected[k]) for k in expected), component
    a = Generator(pipe).generate("a photo of a dog", count=1, seed=3, steps=2)
    b = Generator(reference).generate("a photo of a dog", count=1, seed=3, steps=2)
    assert a[0].tobytes() == b[0].tobytes()


def test_sdxl_single_file_loads_as_an_sdxl_pipeline(tiny_sdxl_dir: Path, tmp_path: Path) -> None:
    file = save_single_file(tiny_sdxl_dir, tmp_path / "xl.safetensors")
    pipe = load_pipeline(file, config=tiny_sdxl_dir)
    reference = load_pipeline(tiny_sdxl_dir)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    for component in ("unet", "text_encoder", "text_encoder_2"):
        expected = getattr(reference, component).state_dict()
        loaded = getattr(pipe, component).state_dict()
        assert all(torch.equal(loaded[k], expected[k]) for k in expected), component


def test_a_garbage_checkpoint_file_fails_naming_its_path(tmp_path: Path) -> None:
    garbage = tmp_path / "model.safetensors"
    garbage.write_bytes(b"\x00" * 16 + b"definitely not a model")
    with pytest.raises(ModelLoadError, match=str(garbage)):
        load_pipeline(garbage)
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not a pickle either")
    with pytest.raises(ModelLoadError, match=str(ckpt)):
        load_pipeline(ckpt)


def test_a_checkpoint_of_something_else_fails_naming_its_path(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    other = tmp_path / "lora.safetensors"
    save_file({"unet.down.lora_A.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(ModelLoadError, match=f"{other}.*not a Stable Diffusion checkpoint"):
        load_pipeline(other)


def engine_settings(tmp_path: Path, **values: object) -> Settings:
    return make_settings(tmp_path / "data", "redis://127.0.0.1:1/0", **values)


async def test_engine_start_fails_on_a_missing_model_naming_its_path(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    from engine.worker import load_resources

    missing = tmp_path / "models" / "sd15"
    settings = engine_settings(tmp_path, models={"tiny": str(tiny_model_dir), "sd15": str(missing)})
    with pytest.raises(ModelLoadError, match=f"not found: {missing}"):
        await load_resources(settings)


async def test_engine_start_fails_on_a_garbage_model_file_naming_its_path(tmp_path: Path) -> None:
    from engine.worker import load_resources

    garbage = tmp_path / "sd15.safetensors"
    garbage.write_text("{}")
    with pytest.raises(ModelLoadError, match=str(garbage)):
        await load_resources(engine_settings(tmp_path, base_model=str(garbage)))


def test_auto_device_is_where_accelerate_places_work() -> None:
    from accelerate import PartialState

    assert resolve_device("auto") == str(PartialState().device)
    if not torch.cuda.is_available():
        assert resolve_device("auto") == "cpu"
    assert resolve_device("cpu") == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:1", "bogus"])
def test_a_device_this_torch_cannot_use_is_refused_with_the_reason(name: str) -> None:
    with pytest.raises(DeviceError, match=f"device '{name}' can't be used here") as refused:
        resolve_device(name)
    assert "DREAMBOT_DEVICE" in str(refused.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
async def test_engine_start_fails_on_an_unusable_device_before_loading_models(
    tmp_path: Path,
) -> None:
    from engine.worker import load_resources

    # The model path doesn't exist: the device is checked first.
    settings = engine_settings(tmp_path, base_model=str(tmp_path / "no-model"), device="cuda")
    with pytest.raises(DeviceError, match="Torch not compiled with CUDA enabled"):
        await load_resources(settings)


async def test_engine_serves_every_configured_model_by_name(
    tmp_path: Path, tiny_model_dir: Path, tiny_sdxl_dir: Path
) -> None:
    from engine.worker import load_resources

    settings = engine_settings(
        tmp_path, models=f"sd={tiny_model_dir},xl={tiny_sdxl_dir}", base_model="xl"
    )
    ctx = await load_resources(settings)

    assert list(ctx["models"]) == ["xl", "sd"]
    assert ctx["models"]["xl"].family.is_sdxl and not ctx["models"]["sd"].family.is_sdxl
    assert "pipe" not in ctx and "pipes" not in ctx and "generator" not in ctx
    assert type(served_model(ctx, "sd").pipe).__name__ == "StableDiffusionPipeline"
    assert ctx["models"]["sd"].key != ctx["models"]["xl"].key
