"""Engines that serve different base models on one Redis, each taking only its models' jobs
(and the legacy queues'); one engine serving two models trains one subject at a time."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from arq.jobs import Job as ArqJob

from bot.config import Settings
from bot.core.delivery import Delivery
from bot.core.photos import Upload
from bot.core.store import Owner
from bot.launcher import BotRuntime, delivering, open_core
from engine.api import GENERATE_QUEUE, rare_tokens_key
from tests.conftest import TEST_PLATFORM, RecordingSink, make_legacy, make_photo, make_settings
from tests.test_end_to_end import running_engine

pytestmark = pytest.mark.model

DEST = {"channel": "c1"}
QUICK = {"train_steps": 2, "class_images": 1, "sample_count": 0, "generate_steps": 2}


def settings_for(data_dir: Path, redis_url: str, models: str) -> Settings:
    """Settings on one data folder (so one artifact store) serving ``models``."""
    return make_settings(data_dir, redis_url, models=models, **QUICK)


async def wait_for_rare_tokens(runtime: BotRuntime, *models: str) -> None:
    """Until the engines published their models' rare tokens (as their workers start)."""
    async with asyncio.timeout(60):
        while not all([await runtime.queue.exists(rare_tokens_key(m)) for m in models]):
            await asyncio.sleep(0.05)


async def draw_on(runtime: BotRuntime, owner: Owner, model: str) -> str:
    """Queue an image job on ``model`` (the workspace's default for it); its job id."""
    mod = runtime.core.moderation.acting(Owner(owner.platform, owner.workspace, "mod-1"), True)
    await mod.model(model)
    receipt = await runtime.core.imagine(owner, DEST, "a cat", count=1)
    assert "No running engine" not in receipt.text
    return receipt.job_id


async def test_engines_serving_different_models_each_take_their_models_jobs(
    tmp_path: Path, redis_clean: str, owner: Owner, sink: RecordingSink
) -> None:
    data = tmp_path / "data"
    bot = settings_for(data, redis_clean, "a=tiny,b=tiny-sd2")
    async with (
        running_engine(settings_for(data, redis_clean, "a=tiny")),
        running_engine(settings_for(data, redis_clean, "b=tiny-sd2")),
        open_core(bot, TEST_PLATFORM) as runtime,
        delivering(runtime, sink),
    ):
        engines = await runtime.core.live_engines()
        assert sorted(engine.models for engine in engines) == [["a"], ["b"]]
        bob = Owner(owner.platform, owner.workspace, "bob")  # each user may have 3 jobs at once
        jobs = [
            await draw_on(runtime, who, model)
            for who, model in ((owner, "a"), (owner, "b"), (bob, "b"), (bob, "a"))
        ]
        delivered = [await sink.wait_for(job_id) for job_id in jobs]

    # Each job was drawn by the engine of its model: one that took another's would have
    # failed it ("this engine serves the base model 'a', not 'b'").
    assert sink.failures == {}
    assert all(isinstance(delivery, Delivery) for delivery in delivered)


async def test_one_engine_serving_two_models_trains_one_subject_at_a_time(
    tmp_path: Path, redis_clean: str, owner: Owner, sink: RecordingSink
) -> None:
    settings = settings_for(tmp_path / "data", redis_clean, "a=tiny,b=tiny-sd2")
    photos = [Upload(f"p{i}.jpg", make_photo(i)) for i in range(3)]
    async with (
        running_engine(settings),
        open_core(settings, TEST_PLATFORM) as runtime,
        delivering(runtime, sink),
    ):
        await wait_for_rare_tokens(runtime, "a", "b")
        # Each waits in its own model's queue, where a worker of its own takes it at once
        # when the engine has a training slot free.
        rex = await runtime.core.train(owner, DEST, "rex", "dog", photos, model="a")
        tom = await runtime.core.train(owner, DEST, "tom", "cat", photos, model="b")
        for receipt in (rex, tom):
            assert isinstance(await sink.wait_for(receipt.job_id, within=240), Delivery)
        runs = []
        for receipt in (rex, tom):
            info = await ArqJob(receipt.job_id, runtime.queue).result_info()
            assert info is not None and info.success
            runs.append((info.start_time, info.finish_time))

    first, second = sorted(runs)
    assert first[1] <= second[0], f"the trainings overlapped: {runs}"


async def test_a_job_left_on_the_legacy_queue_is_still_served(
    tmp_path: Path, redis_clean: str, owner: Owner, sink: RecordingSink
) -> None:
    settings = settings_for(tmp_path / "data", redis_clean, "a=tiny")
    async with open_core(settings, TEST_PLATFORM) as runtime, delivering(runtime, sink):
        # Queued by an older release: on the one generation queue, nothing recorded.
        receipt = await runtime.core.imagine(owner, DEST, "a cat", count=1)
        await make_legacy(runtime, receipt.job_id)
        assert await runtime.queue.zcard(GENERATE_QUEUE) == 1
        async with running_engine(settings):
            delivered = await sink.wait_for(receipt.job_id)

    assert isinstance(delivered, Delivery), delivered
