"""Resumable, idempotent training: checkpoints, resuming, and an engine killed mid-training."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from bot.core.delivery import Delivery
from bot.core.photos import Upload
from bot.core.store import Owner
from bot.launcher import delivering, open_core
from engine.artifacts import ArtifactStore, local_path
from engine.checkpoints import (
    finished_adapter,
    load_checkpoint,
    safetensors_metadata,
    save_checkpoint,
)
from engine.training import TrainConfig, TrainOutcome, TrainState, save_adapter, train_lora
from tests.conftest import TEST_PLATFORM, RecordingSink, make_photo, make_settings

pytestmark = pytest.mark.model

SIX_STEPS = TrainConfig(steps=6, learning_rate=3e-2, seed=3)


def train_then_resume(
    pipe: StableDiffusionPipeline,
    photos: list[Image.Image],
    priors: list[Image.Image],
    cfg: TrainConfig,
) -> tuple[list[TrainState], TrainOutcome, TrainOutcome, list[int]]:
    """A whole run with a checkpoint every 2 steps, and a second run resumed from the second
    checkpoint: (checkpoints, whole run, resumed run, steps the resumed run reported)."""
    saved: list[TrainState] = []
    whole = train_lora(
        pipe, photos, priors, "zqv", "dog", cfg, checkpoint_every=2, on_checkpoint=saved.append
    )
    steps_after_resume: list[int] = []
    resumed = train_lora(
        pipe,
        photos,
        priors,
        "zqv",
        "dog",
        cfg,
        resume=saved[1],
        progress=lambda step, total, loss: steps_after_resume.append(step),
    )
    return saved, whole, resumed, steps_after_resume


def test_a_resumed_run_ends_exactly_like_an_uninterrupted_one(
    tiny_pipe: StableDiffusionPipeline,
    subject_photos: list[Image.Image],
    class_images: list[Image.Image],
) -> None:
    saved, whole, resumed, steps_after_resume = train_then_resume(
        tiny_pipe, subject_photos, class_images, SIX_STEPS
    )

    # No checkpoint after the last step: the adapter is that step's result.
    assert [state.step for state in saved] == [2, 4]
    assert steps_after_resume == [5, 6]
    assert resumed.instance_losses == whole.instance_losses
    assert resumed.prior_losses == whole.prior_losses
    assert resumed.state_dict.keys() == whole.state_dict.keys()
    assert all(torch.equal(v, resumed.state_dict[k]) for k, v in whole.state_dict.items())


def test_checkpoints_round_trip_and_belong_to_one_run(
    tiny_pipe: StableDiffusionPipeline, subject_photos: list[Image.Image], tmp_path: Path
) -> None:
    saved: list[TrainState] = []
    train_lora(
        tiny_pipe,
        subject_photos,
        [],
        "zqv",
        "dog",
        replace(SIX_STEPS, steps=3),
        checkpoint_every=2,
        on_checkpoint=saved.append,
    )
    artifacts = ArtifactStore(tmp_path.as_uri())
    url = artifacts.url("subjects", "s1", "training-checkpoint.pt")

    save_checkpoint(artifacts, url, "run-a", saved[0])
    loaded = load_checkpoint(artifacts, url, "run-a")

    assert loaded is not None and loaded.step == 2
    assert loaded.trainable.keys() == saved[0].trainable.keys()
    assert all(torch.equal(v, loaded.trainable[k]) for k, v in saved[0].trainable.items())
    assert torch.equal(loaded.rng, saved[0].rng)
    assert loaded.instance_losses == saved[0].instance_losses
    assert load_checkpoint(artifacts, url, "run-b") is None  # another run's checkpoint
    assert load_checkpoint(artifacts, artifacts.url("nothing.pt"), "run-a") is None
    artifacts.put_bytes(url, b"not a checkpoint")
    assert load_checkpoint(artifacts, url, "run-a") is None
    assert [p.name for p in (tmp_path / "subjects" / "s1").iterdir()] == ["training-checkpoint.pt"]


def test_only_a_whole_adapter_with_the_runs_fingerprint_counts_as_finished(
    tmp_path: Path,
) -> None:
    artifacts = ArtifactStore(tmp_path.as_uri())
    path = tmp_path / "adapter.safetensors"
    weights = {"unet.a.lora_A.weight": torch.ones(4, 8), "unet.a.lora_B.weight": torch.ones(8, 4)}
    save_adapter(weights, path, {"fingerprint": "run-a", "token": "zqv"})
    url = path.as_uri()

    assert safetensors_metadata(path.read_bytes())["token"] == "zqv"
    assert finished_adapter(artifacts, url, "run-a")
    assert not finished_adapter(artifacts, url, "run-b")
    assert not finished_adapter(artifacts, (tmp_path / "missing.safetensors").as_uri(), "run-a")
    path.write_bytes(path.read_bytes()[:-10])  # half written
    assert not finished_adapter(artifacts, url, "run-a")


# An engine process killed mid-training and started again.

RESUMABLE = {
    "train_steps": 40,
    "train_checkpoint_steps": 10,
    "train_learning_rate": 1e-2,
    "class_images": 2,
    "sample_count": 0,
    "generate_steps": 2,
    "job_lease_seconds": 3,
}


def _start_engine(env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "bot.cli", "engine"],
            env=env,
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _stop(engine: subprocess.Popen[bytes]) -> None:
    if engine.poll() is None:
        engine.terminate()
        try:
            engine.wait(30)
        except subprocess.TimeoutExpired:
            engine.kill()
            engine.wait()


async def test_an_engine_killed_mid_training_resumes_from_its_checkpoint_once(
    tmp_path: Path, redis_clean: str, tiny_model_dir: Path, sink: RecordingSink
) -> None:
    settings = make_settings(
        tmp_path / "data", redis_clean, base_model=str(tiny_model_dir), **RESUMABLE
    )
    env = {
        **os.environ,
        "DREAMBOT_REDIS_URL": redis_clean,
        "DREAMBOT_DATA_DIR": str(tmp_path / "data"),
        "DREAMBOT_BASE_MODEL": str(tiny_model_dir),
        "DREAMBOT_PROGRESS_INTERVAL": "0",
        **{f"DREAMBOT_{key.upper()}": str(value) for key, value in RESUMABLE.items()},
    }
    owner = Owner(TEST_PLATFORM, "guild-1", "user-9")
    photos = [Upload(f"rex{i}.jpg", make_photo(i)) for i in range(3)]
    first_log, second_log = tmp_path / "engine-1.log", tmp_path / "engine-2.log"
    engine = _start_engine(env, tmp_path, first_log)
    try:
        async with open_core(settings, TEST_PLATFORM) as runtime, delivering(runtime, sink):
            receipt = await runtime.core.train(owner, {}, "rex", "dog", photos)
            subject = await runtime.store.find_subject(owner, "rex")
            assert subject is not None
            checkpoint = local_path(
                runtime.core.artifacts.url("subjects", subject.id, "training-checkpoint.pt")
            )
            assert checkpoint is not None
            deadline = time.monotonic() + 120
            while not checkpoint.exists():
                assert engine.poll() is None, first_log.read_text()[-3000:]
                assert time.monotonic() < deadline, first_log.read_text()[-3000:]
                await asyncio.sleep(0.05)

            engine.send_signal(signal.SIGKILL)
            engine.wait(30)
            assert receipt.job_id not in sink.results
            engine = _start_engine(env, tmp_path, second_log)

            trained = await sink.wait_for(receipt.job_id, within=180)
            assert isinstance(trained, Delivery), trained
            assert "rex is ready" in trained.text
            await asyncio.sleep(1.0)  # a second answer would arrive by now
            assert sink.result_count == 1
            subject = await runtime.store.find_subject(owner, "rex")
            assert subject is not None and subject.status == "ready"
            adapter = local_path(subject.adapter_url or "")
            assert adapter is not None and adapter.is_file()
            assert not checkpoint.exists()  # the finished job cleans up after itself
    finally:
        _stop(engine)
    first, second = first_log.read_text(), second_log.read_text()
    assert "trained steps" not in first
    assert "resuming training from step" in second, second[-3000:]
    resumed_from = int(second.split("resuming training from step ")[1].split()[0])
    assert resumed_from >= RESUMABLE["train_checkpoint_steps"]
    assert f"trained steps {resumed_from + 1} to 40" in second
