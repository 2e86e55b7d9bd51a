"""Per-model engine queues: each job waits in its base model's queue (so engines serving
different models share one Redis), and everything that reads the queues finds it there, or on
the legacy queue for a job queued before per-model queues. A real Redis; no engine runs
(tests/engine/test_engines_per_model.py runs them on the tiny models)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.worker import func

from bot.config import Settings
from bot.core.errors import UserError
from bot.core.photos import Upload
from bot.core.store import Owner
from bot.launcher import BotRuntime
from engine.api import (
    GENERATE_QUEUE,
    LEGACY_QUEUES,
    TRAIN_QUEUE,
    generate_queue,
    train_queue,
)
from engine.worker import SharedSlotsWorker, engine_workers
from tests.conftest import (
    TEST_PLATFORM,
    configure_second_model,
    engine_queue,
    make_legacy,
    make_photo,
)

DEST = {"channel": "c1"}
BOB = Owner(TEST_PLATFORM, "guild-1", "bob")  # another user: each may have 3 jobs at once


def photos() -> list[Upload]:
    return [Upload(f"p{i}.jpg", make_photo(i)) for i in range(3)]


async def members(redis: ArqRedis, queue: str) -> list[str]:
    return [job_id.decode() for job_id in await redis.zrange(queue, 0, -1)]


@pytest.fixture
def two_models(runtime: BotRuntime) -> BotRuntime:
    """The runtime with a second model, ``xl``, beside the default one."""
    configure_second_model(runtime.settings)
    return runtime


async def draw_on(runtime: BotRuntime, owner: Owner, model: str, prompt: str = "a cat") -> str:
    """Queue an image job on ``model`` (made the workspace's default for it); its job id."""
    mod = runtime.core.moderation.acting(Owner(owner.platform, owner.workspace, "mod-1"), True)
    await mod.model(model)
    return (await runtime.core.imagine(owner, DEST, prompt, count=1)).job_id


# Queueing.


async def test_each_job_waits_in_its_models_queue_which_its_row_records(
    two_models: BotRuntime, owner: Owner
) -> None:
    core, redis, default = two_models.core, two_models.queue, two_models.settings.base_model
    trained = await core.train(owner, DEST, "rex", "dog", photos(), model="xl")
    drawn = await core.imagine(owner, DEST, "a cat", count=1)

    assert await members(redis, train_queue("xl")) == [trained.job_id]
    assert await members(redis, generate_queue(default)) == [drawn.job_id]
    for queue in (TRAIN_QUEUE, GENERATE_QUEUE, train_queue(default), generate_queue("xl")):
        assert await redis.zcard(queue) == 0
    for receipt, queue in ((trained, train_queue("xl")), (drawn, generate_queue(default))):
        job = await two_models.store.get_job(receipt.job_id)
        assert job is not None and job.options["queue"] == queue


async def test_a_place_in_the_queue_counts_only_the_jobs_of_the_same_model(
    two_models: BotRuntime, owner: Owner
) -> None:
    core, default = two_models.core, two_models.settings.base_model
    first = await draw_on(two_models, owner, default)
    second = await draw_on(two_models, owner, default)
    other = await core.imagine(BOB, DEST, "a dog", count=1)  # still the default model
    on_xl = await draw_on(two_models, BOB, "xl")

    assert other.position == 3
    unfinished = await core.store.unfinished_jobs(owner.platform)
    assert await core.queue_positions(unfinished) == {
        first: 1,
        second: 2,
        other.job_id: 3,
        on_xl: 1,
    }
    assert f"{on_xl[:8]}  image “a cat”  waiting #1 in the queue" in await core.jobs_text(BOB)


async def test_a_receipt_for_a_model_no_engine_serves_says_the_job_waits(
    two_models: BotRuntime, owner: Owner
) -> None:
    from bot.core.commands import engine_note
    from tests.test_engine_presence import heartbeat

    note = engine_note([heartbeat([two_models.settings.base_model])], "xl")
    assert "No running engine serves the model xl" in note
    assert "this job waits until one that does starts" in note


# Cancelling.


async def test_cancel_takes_a_waiting_job_out_of_its_models_queue(
    two_models: BotRuntime, owner: Owner
) -> None:
    kept = await draw_on(two_models, owner, two_models.settings.base_model)
    cancelled = await draw_on(two_models, owner, "xl", "a red fox")

    cancellation = await two_models.core.cancel(owner, cancelled[:8])

    assert "taken out of the queue" in cancellation.text
    assert await two_models.queue.zcard(generate_queue("xl")) == 0
    assert await members(two_models.queue, engine_queue(two_models)) == [kept]


async def test_a_moderator_cancel_of_a_training_on_another_model_takes_it_out(
    two_models: BotRuntime, owner: Owner
) -> None:
    trained = await two_models.core.train(owner, DEST, "rex", "dog", photos(), model="xl")
    mod = two_models.core.moderation.acting(Owner(owner.platform, owner.workspace, "mod-1"), True)

    reply = await mod.cancel(trained.job_id[:8])

    assert reply.startswith(f"Cancelled job {trained.job_id[:8]} of user-1 (taken out of")
    assert await two_models.queue.zcard(train_queue("xl")) == 0


async def test_a_job_queued_before_per_model_queues_is_found_on_the_legacy_queue(
    runtime: BotRuntime, owner: Owner
) -> None:
    core = runtime.core
    old = await core.imagine(owner, DEST, "a cat", count=1)
    await make_legacy(runtime, old.job_id)
    new = await core.imagine(owner, DEST, "a dog", count=1)

    unfinished = await core.store.unfinished_jobs(owner.platform)
    assert await core.queue_positions(unfinished) == {old.job_id: 1, new.job_id: 1}
    await core.store.mark_unconfirmed(old.job_id)
    assert await core.settle_unconfirmed_jobs() == 0  # found where it is: not reported lost

    cancellation = await core.cancel(owner, old.job_id[:8])

    assert "taken out of the queue" in cancellation.text
    assert await runtime.queue.zcard(GENERATE_QUEUE) == 0
    assert await members(runtime.queue, engine_queue(runtime)) == [new.job_id]


# Counting.


async def test_mod_status_and_the_full_queue_count_every_models_queues(
    two_models: BotRuntime, owner: Owner
) -> None:
    core = two_models.core
    core.settings.max_queue = 4
    await core.train(owner, DEST, "rex", "dog", photos(), model="xl")
    legacy = await core.imagine(owner, DEST, "a cat", count=1)
    await make_legacy(two_models, legacy.job_id)
    await core.imagine(BOB, DEST, "a dog", count=1)
    await draw_on(two_models, BOB, "xl")
    mod = core.moderation.acting(Owner(owner.platform, owner.workspace, "mod-1"), True)

    status = await mod.status()

    assert (
        "Queues (all workspaces): Trainings: 1 waiting, 0 running. "
        "Image jobs: 3 waiting, 0 running."
    ) in status
    with pytest.raises(UserError, match="I'm busy: 4 jobs are waiting"):
        await core.imagine(BOB, DEST, "a bird", count=1)


# The engine's side.


async def test_an_engine_serves_its_models_queues_and_the_legacy_ones(settings: Settings) -> None:
    configure_second_model(settings)
    workers = engine_workers(settings, {"settings": settings}, handle_signals=False)

    queues = [worker.queue_name for worker in workers]
    default = settings.base_model
    assert queues == [
        TRAIN_QUEUE,
        train_queue(default),
        train_queue("xl"),
        GENERATE_QUEUE,
        generate_queue(default),
        generate_queue("xl"),
    ]
    assert generate_queue("other") not in queues  # a model it lacks: its jobs wait for another
    trainers, generators = workers[:3], workers[3:]
    # One training at a time in the engine, at most four image jobs, whatever their model.
    assert len({id(worker.sem) for worker in trainers}) == 1 and trainers[0].sem._value == 1
    assert len({id(worker.sem) for worker in generators}) == 1 and generators[0].sem._value == 4
    assert set(LEGACY_QUEUES.values()) <= set(queues)


async def test_workers_sharing_slots_never_run_more_jobs_at_once_than_the_slots(
    redis_clean: str,
) -> None:
    """Pins the arq internals ``SharedSlotsWorker`` relies on (``Worker.sem``, taken in
    ``start_jobs``): two workers with one shared slot run their four jobs one at a time."""
    running, most = 0, 0

    async def work(ctx: dict[str, Any]) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.05)  # long enough for another worker to start a job meanwhile
        running -= 1

    pool = await create_pool(RedisSettings.from_dsn(redis_clean))
    try:
        for queue in ("test:one", "test:two"):
            for n in range(2):
                await pool.enqueue_job("work", _job_id=f"{queue}:{n}", _queue_name=queue)
        slot = asyncio.BoundedSemaphore(1)
        workers = [
            SharedSlotsWorker(
                slots=slot,
                functions=[func(work, name="work")],
                queue_name=queue,
                redis_pool=pool,
                burst=True,
                poll_delay=0.01,
                max_jobs=1,
                handle_signals=False,
            )
            for queue in ("test:one", "test:two")
        ]
        async with asyncio.timeout(20):
            await asyncio.gather(*(worker.async_run() for worker in workers))

        assert sum(worker.jobs_complete for worker in workers) == 4
        assert most == 1
        assert slot._value == 1  # every slot given back
    finally:
        await pool.aclose()
