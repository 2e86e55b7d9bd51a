"""The whole loop on one machine: core → arq/Redis → engine (tiny model) → delivery."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from arq.constants import expires_extra_ms, result_key_prefix
from arq.worker import Worker
from PIL import Image

from bot.config import Settings
from bot.connections import run_worker_forever, stop_worker
from bot.core.delivery import Delivery
from bot.core.photos import Upload
from bot.core.store import Owner
from bot.launcher import delivering, open_core
from engine.api import rare_tokens_key
from engine.artifacts import local_path
from engine.images import read_png_metadata
from engine.tiny import TINY_WORDS
from tests.conftest import TEST_PLATFORM, RecordingSink, make_photo, make_settings

pytestmark = pytest.mark.model

# Small but real: enough steps for the adapter to visibly change the tiny model's output.
FAST_TRAINING = {
    "train_steps": 30,
    "train_learning_rate": 1e-2,
    "class_images": 2,
    "sample_count": 1,
    "generate_steps": 4,
}


@contextlib.asynccontextmanager
async def running_engine(settings: Settings) -> AsyncIterator[tuple[dict[str, Any], list[Worker]]]:
    """The engine's workers running in this event loop (as `dreambot engine` runs them)."""
    from engine.worker import engine_workers, load_resources

    ctx = await load_resources(settings)
    workers = engine_workers(settings, ctx, handle_signals=False)
    tasks = [asyncio.create_task(run_worker_forever(w, w.queue_name)) for w in workers]
    try:
        yield ctx, workers
    finally:
        for worker, task in zip(workers, tasks, strict=True):
            await stop_worker(worker, task)


@pytest.fixture
def e2e_settings(tmp_path: Path, redis_clean: str, tiny_model_dir: Path) -> Settings:
    return make_settings(
        tmp_path / "data", redis_clean, base_model=str(tiny_model_dir), **FAST_TRAINING
    )


@pytest.fixture
async def engine(e2e_settings: Settings) -> AsyncIterator[list[Worker]]:
    """The engine's arq worker, running in this event loop on the tiny model."""
    async with running_engine(e2e_settings) as (_, workers):
        yield workers


def _pixels(url: str) -> np.ndarray:
    path = local_path(url)
    assert path is not None and path.is_file()
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


async def test_train_then_imagine_with_v_applies_the_subjects_adapter(
    e2e_settings: Settings, engine: list[Worker], sink: RecordingSink
) -> None:
    owner = Owner(TEST_PLATFORM, "guild-1", "user-1")
    photos = [Upload(f"rex{i}.jpg", make_photo(i)) for i in range(3)]
    async with open_core(e2e_settings, TEST_PLATFORM) as runtime, delivering(runtime, sink):
        core = runtime.core
        key = rare_tokens_key(e2e_settings.base_model)
        for _ in range(200):  # the engine publishes its rare tokens as its workers start
            if await runtime.queue.exists(key):
                break
            await asyncio.sleep(0.05)
        # The engine announces itself as its workers start: the receipt has nothing to add.
        [engine_seen] = await core.live_engines()
        assert engine_seen.models == [e2e_settings.base_model]
        receipt = await core.train(owner, {"channel": "c"}, "rex", "dog", photos)
        assert receipt.text.endswith("I'll post progress here.")
        trained = await sink.wait_for(receipt.job_id, within=240)
        assert isinstance(trained, Delivery), trained
        assert "rex is ready" in trained.text and "/imagine a [V] dog" in trained.text
        subject = await runtime.store.find_subject(owner, "rex")
        assert subject is not None and subject.status == "ready"
        # The engine published the tiny vocabulary's rare words; the token is one of them.
        assert subject.token in TINY_WORDS and subject.token not in ("sun", "hat")
        adapter = local_path(subject.adapter_url or "")
        assert adapter is not None and adapter.is_file() and adapter.suffix == ".safetensors"
        assert len(trained.image_urls) == 1
        phases = {p.phase for job_id, _, p in sink.progress if job_id == receipt.job_id}
        assert {"class-priors", "training"} <= phases

        with_subject = await core.imagine(owner, {}, "a [V] dog on the beach", count=2, seed=42)
        without = await core.imagine(
            owner, {}, f"a {subject.token} dog on the beach", count=2, seed=42
        )
        first = await sink.wait_for(with_subject.job_id, within=120)
        second = await sink.wait_for(without.job_id, within=120)
        assert isinstance(first, Delivery) and isinstance(second, Delivery)
        assert len(first.image_urls) == len(second.image_urls) == 2
        for url in first.image_urls:
            assert _pixels(url).shape == (64, 64, 3)
        # Same prompt text and seed: only the adapter differs, so the pixels must.
        difference = np.abs(_pixels(first.image_urls[0]) - _pixels(second.image_urls[0]))
        assert difference.mean() > 1.0
        metadata = read_png_metadata(await core.artifacts.aget_bytes(first.image_urls[0]))
        assert metadata["dreambot:seed"] == "42"
        assert metadata["dreambot:subjects"] == subject.id
        job = await runtime.store.get_job(with_subject.job_id)
        assert job is not None and job.status == "done" and job.delivered_at


async def test_results_wait_in_redis_while_the_bot_is_away(
    e2e_settings: Settings, engine: list[Worker], sink: RecordingSink
) -> None:
    owner = Owner(TEST_PLATFORM, "guild-1", "user-2")
    async with open_core(e2e_settings, TEST_PLATFORM) as runtime:
        receipt = await runtime.core.imagine(owner, {}, "a red ball", count=1, seed=1)
        # No delivery worker runs: the engine finishes and its result waits in Redis.
        for _ in range(600):
            if await runtime.queue.zcard(f"dreambot:bot:{TEST_PLATFORM}"):
                break
            await asyncio.sleep(0.1)
    async with open_core(e2e_settings, TEST_PLATFORM) as runtime, delivering(runtime, sink):
        delivered = await sink.wait_for(receipt.job_id, within=60)
        assert isinstance(delivered, Delivery)
        await asyncio.sleep(0.5)
        assert sink.result_count == 1
        # The engine keeps the job's result key a day, as long as arq keeps an unread message
        # in the bot's queue: a bot away that long can still tell the job ran.
        kept_ms = await runtime.queue.pttl(result_key_prefix + receipt.job_id)
        assert kept_ms > expires_extra_ms - 3_600_000


def test_shell_through_a_pipe_trains_then_imagines(
    tmp_path: Path, redis_clean: str, tiny_model_dir: Path
) -> None:
    photo_dir = tmp_path / "photos"
    photo_dir.mkdir()
    for i in range(3):
        (photo_dir / f"rex{i}.jpg").write_bytes(make_photo(i))
    env = {
        **os.environ,
        "DREAMBOT_REDIS_URL": redis_clean,
        "DREAMBOT_DATA_DIR": str(tmp_path / "data"),
        "DREAMBOT_BASE_MODEL": str(tiny_model_dir),
        "DREAMBOT_PHOTO_SIZE": "64",
        "DREAMBOT_PROGRESS_INTERVAL": "0",
        **{f"DREAMBOT_{key.upper()}": str(value) for key, value in FAST_TRAINING.items()},
    }
    script = (
        "\n".join(
            [
                "/help",
                f"/train rex dog {photo_dir}/rex0.jpg {photo_dir}/rex1.jpg {photo_dir}/rex2.jpg",
                "/subjects",
                "/imagine a [V] dog wearing a hat --count 2 --seed 7",
                "/imagine [nobody] at sea",
            ]
        )
        + "\n"
    )
    engine_log = tmp_path / "engine.log"
    with engine_log.open("wb") as log:
        engine = subprocess.Popen(
            [sys.executable, "-m", "bot.cli", "engine"],
            env=env,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        shell = subprocess.run(
            [sys.executable, "-m", "bot.cli", "shell"],
            input=script,
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=240,
        )
    finally:
        engine.terminate()
        engine.wait(30)
    assert "rex is ready" in shell.stdout, engine_log.read_text()[-3000:]
    out = shell.stdout
    assert shell.returncode == 0, shell.stderr
    assert "queued (position 1)" in out
    assert "rex is ready" in out
    assert "training" in out  # progress lines
    assert "seed 7" in out
    assert "no subject called `nobody`" in out
    pngs = [Path(line.strip()) for line in out.splitlines() if line.strip().endswith(".png")]
    assert len(pngs) == 1 + 2  # the training sample (the showcase grid), two generated images
    sizes = []
    for png in pngs:
        assert png.is_file()
        with Image.open(png) as image:
            sizes.append(image.size)
    assert sizes[0][0] > 64 and sizes[1:] == [(64, 64), (64, 64)]


async def _wait_for_phase(sink: RecordingSink, job_id: str, phase: str, within: float = 60) -> None:
    async with asyncio.timeout(within):
        while not any(j == job_id and p.phase == phase for j, _, p in sink.progress):
            await asyncio.sleep(0.05)


@pytest.fixture
def long_training(tmp_path: Path, redis_clean: str, tiny_model_dir: Path) -> Settings:
    return make_settings(
        tmp_path / "data",
        redis_clean,
        base_model=str(tiny_model_dir),
        **{**FAST_TRAINING, "train_steps": 150, "train_chunk_steps": 5},
    )


async def test_a_generation_runs_between_training_chunks(
    long_training: Settings, sink: RecordingSink
) -> None:
    owner = Owner(TEST_PLATFORM, "guild-1", "user-3")
    photos = [Upload(f"rex{i}.jpg", make_photo(i)) for i in range(3)]
    async with running_engine(long_training) as (ctx, _):
        async with open_core(long_training, TEST_PLATFORM) as runtime, delivering(runtime, sink):
            training = await runtime.core.train(owner, {}, "rex", "dog", photos)
            await _wait_for_phase(sink, training.job_id, "training")
            drawing = await runtime.core.imagine(owner, {}, "a lighthouse", count=1, seed=3)
            drawn = await sink.wait_for(drawing.job_id, within=120)
            assert isinstance(drawn, Delivery)
            # The generation finished while the training was still going.
            assert training.job_id not in sink.results
            assert ctx["gpu"].yields >= 1
            trained = await sink.wait_for(training.job_id, within=240)
            assert isinstance(trained, Delivery) and "rex is ready" in trained.text
            steps = [
                p.step
                for j, _, p in sink.progress
                if j == training.job_id and p.phase == "training"
            ]
            assert max(steps) == 150


async def test_cancelling_a_running_training_stops_it_and_writes_no_adapter(
    long_training: Settings, sink: RecordingSink
) -> None:
    owner = Owner(TEST_PLATFORM, "guild-1", "user-4")
    photos = [Upload(f"rex{i}.jpg", make_photo(i)) for i in range(3)]
    settings = long_training.model_copy(update={"train_checkpoint_steps": 5})
    async with running_engine(settings) as (_, workers):
        async with open_core(settings, TEST_PLATFORM) as runtime, delivering(runtime, sink):
            receipt = await runtime.core.train(owner, {}, "rex", "dog", photos)
            await _wait_for_phase(sink, receipt.job_id, "training")
            found = await runtime.store.find_subject(owner, "rex")
            assert found is not None
            checkpoint = local_path(
                runtime.core.artifacts.url("subjects", found.id, "training-checkpoint.pt")
            )
            assert checkpoint is not None
            async with asyncio.timeout(60):
                while not checkpoint.exists():
                    await asyncio.sleep(0.02)
            moderator = Owner(TEST_PLATFORM, "guild-1", "mod")
            mod = runtime.core.moderation.acting(moderator, True)
            reply = await mod.cancel(receipt.job_id[:8], "testing cancel")
            assert "running" in reply
            told = await sink.wait_for(receipt.job_id, within=60)
            assert isinstance(told, str) and "testing cancel" in told
            # The engine stops at its next step and never writes the adapter.
            async with asyncio.timeout(30):
                trainers = [w for w in workers if "train_subject" in w.functions]
                while sum(w.jobs_complete + w.jobs_failed for w in trainers) < 1:
                    await asyncio.sleep(0.1)
            subject = await runtime.store.find_subject(owner, "rex")
            assert subject is not None and subject.status == "failed"
            adapter = local_path(
                runtime.core.artifacts.url("subjects", subject.id, "adapter.safetensors")
            )
            assert adapter is not None and not adapter.exists()
            assert not checkpoint.exists()  # cancelled for good: nothing left to resume
            steps = [
                p.step for j, _, p in sink.progress if j == receipt.job_id and p.phase == "training"
            ]
            assert max(steps) < 150


@pytest.fixture
def two_model_settings(
    tmp_path: Path, redis_clean: str, tiny_model_dir: Path, tiny_sdxl_dir: Path
) -> Settings:
    # As DREAMBOT_MODELS would say it; the first, sd, is the default.
    return make_settings(
        tmp_path / "data",
        redis_clean,
        models=f"sd={tiny_model_dir},xl={tiny_sdxl_dir}",
        **FAST_TRAINING,
    )


def _native_size(model_dir: Path) -> int:
    """A diffusers folder's native image side: UNet sample size × the VAE's scale factor."""
    unet = json.loads((model_dir / "unet" / "config.json").read_text())
    vae = json.loads((model_dir / "vae" / "config.json").read_text())
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


async def test_a_subject_trained_on_the_sdxl_model_is_drawn_on_it(
    two_model_settings: Settings, tiny_sdxl_dir: Path, sink: RecordingSink
) -> None:

    settings = two_model_settings
    assert settings.model_names == ["sd", "xl"] and settings.base_model == "sd"
    owner = Owner(TEST_PLATFORM, "guild-1", "user-5")
    photos = [Upload(f"rex{i}.jpg", make_photo(i)) for i in range(3)]
    async with running_engine(settings):
        async with open_core(settings, TEST_PLATFORM) as runtime, delivering(runtime, sink):
            core = runtime.core
            receipt = await core.train(owner, {}, "rex", "dog", photos, model="xl")
            trained = await sink.wait_for(receipt.job_id, within=120)
            assert isinstance(trained, Delivery), trained
            assert "rex is ready" in trained.text
            subject = await runtime.store.find_subject(owner, "rex")
            assert subject is not None and subject.status == "ready"
            assert subject.base_model == "xl"

            with_subject = await core.imagine(owner, {}, "a [V] dog on the beach", count=1, seed=5)
            # A prompt without subjects is drawn on the workspace's default model: make it xl,
            # so the comparison below differs only by the adapter.
            moderator = Owner(owner.platform, owner.workspace, "mod")
            assert "now xl" in await core.mod(moderator, True, "model xl")
            without = await core.imagine(
                owner, {}, f"a {subject.token} dog on the beach", count=1, seed=5
            )
            first = await sink.wait_for(with_subject.job_id, within=60)
            second = await sink.wait_for(without.job_id, within=60)
            assert isinstance(first, Delivery) and isinstance(second, Delivery)
            assert len(first.image_urls) == len(second.image_urls) == 1
            # Drawn on xl (the subject's model, not the default sd), at its native size.
            side = _native_size(tiny_sdxl_dir)
            for delivery in (first, second):
                job = await runtime.store.get_job(delivery.job.id)
                assert job is not None and job.status == "done"
                assert _pixels(delivery.image_urls[0]).shape == (side, side, 3)
                png = await core.artifacts.aget_bytes(delivery.image_urls[0])
                assert read_png_metadata(png)["dreambot:model"] == "xl"
            metadata = read_png_metadata(await core.artifacts.aget_bytes(first.image_urls[0]))
            assert metadata["dreambot:subjects"] == subject.id and metadata["dreambot:seed"] == "5"
            # Same seed and text: only the adapter differs, so the pixels must.
            difference = np.abs(_pixels(first.image_urls[0]) - _pixels(second.image_urls[0]))
            assert difference.mean() > 1.0


async def test_the_workspaces_safety_switch_flows_through_a_real_engine(
    e2e_settings: Settings, engine: list[Worker], sink: RecordingSink
) -> None:
    # The engine loads the tiny model's safety checker, which never flags anything: this shows
    # the workspace's switch reaching the engine either way, and moderators seeing its checker.
    owner = Owner(TEST_PLATFORM, "guild-1", "user-1")
    async with open_core(e2e_settings, TEST_PLATFORM) as runtime, delivering(runtime, sink):
        mod = runtime.core.moderation.acting(Owner(TEST_PLATFORM, "guild-1", "mod-1"), True)
        for _ in range(200):  # the engine announces itself as its workers start
            if await runtime.core.live_engines():
                break
            await asyncio.sleep(0.05)
        assert (await mod.safety()).startswith(
            "The safety filter is on here: images the engines' safety checker flags are withheld"
        )
        [engine_line] = [line for line in (await mod.status()).splitlines() if "models" in line]
        assert "; safety checker " in engine_line
        for enabled in (True, False):
            await mod.safety(enabled)
            receipt = await runtime.core.imagine(owner, {}, "a red fox", count=2, seed=3)
            done = await sink.wait_for(receipt.job_id, within=120)
            assert isinstance(done, Delivery), done
            assert len(done.image_urls) == 2
            assert done.text.startswith("“a red fox” · seed 3 · 64×64 · ")
            assert "withheld" not in done.text
            assert (await runtime.store.usage(owner)).images == 2 * (2 - enabled)


async def test_images_a_flagging_checker_withholds_never_reach_the_chat(
    tmp_path: Path, redis_clean: str, tiny_model_dir: Path, sink: RecordingSink
) -> None:
    """A safety checker that flags everything, through the real engine and delivery: no image
    is stored or posted, the result says why, the units come back, moderators see it; with
    the workspace's filter off the same prompt's images come through."""
    import torch

    from engine.safety import load_safety_checker

    flagging = tmp_path / "flagging-checker"
    checker = load_safety_checker(tiny_model_dir, device="cpu", dtype=torch.float32)
    with torch.no_grad():  # every concept's threshold below any cosine similarity
        checker.model.concept_embeds_weights.fill_(-2.0)
    checker.model.save_pretrained(flagging / "safety_checker")
    checker.processor.save_pretrained(flagging / "feature_extractor")
    settings = make_settings(
        tmp_path / "data",
        redis_clean,
        base_model=str(tiny_model_dir),
        safety_checker=str(flagging),
        **FAST_TRAINING,
    )
    owner = Owner(TEST_PLATFORM, "guild-1", "user-1")
    async with running_engine(settings):
        async with open_core(settings, TEST_PLATFORM) as runtime, delivering(runtime, sink):
            receipt = await runtime.core.imagine(owner, {}, "a red fox", count=2, seed=3)
            withheld = await sink.wait_for(receipt.job_id, within=120)
            assert isinstance(withheld, Delivery), withheld
            assert withheld.image_urls == []
            assert withheld.text == (
                "“a red fox” · seed 3: the safety filter withheld all 2 images, so nothing is "
                "posted; they are given back to your quota. Try another prompt."
            )
            outputs = local_path(runtime.core.artifacts.url("outputs", receipt.job_id))
            assert outputs is not None and not list(outputs.glob("*.png"))
            assert (await runtime.store.usage(owner)).images == 0
            mod = runtime.core.moderation.acting(Owner(TEST_PLATFORM, "guild-1", "mod-1"), True)
            assert "user-1  safety filter withheld all 2 images: “a red fox”" in (
                await mod.blocked_attempts()
            )

            await mod.safety(False)
            receipt = await runtime.core.imagine(owner, {}, "a red fox", count=2, seed=3)
            shown = await sink.wait_for(receipt.job_id, within=120)
            assert isinstance(shown, Delivery), shown
            assert len(shown.image_urls) == 2 and "withheld" not in shown.text
            assert (await runtime.store.usage(owner)).images == 2
