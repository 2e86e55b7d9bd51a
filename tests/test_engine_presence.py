"""Whether an engine is there: its heartbeat in Redis, the receipt's note when none is (or none
serves the job's model), and /mod status. A real Redis throughout; the engine's workers run
without loading a model (they only announce one), so these tests stay fast."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from arq.constants import in_progress_key_prefix

from bot.config import Settings
from bot.connections import run_worker_forever, stop_worker
from bot.core.commands import NO_ENGINE_NOTE
from bot.core.moderation import MOD_HELP, Moderator, NotModerator
from bot.core.photos import Upload
from bot.core.store import Owner
from bot.launcher import BotRuntime
from engine.api import (
    ENGINE_HEARTBEAT_TTL_SECONDS,
    ENGINES_KEY,
    EngineHeartbeat,
    EngineJob,
    engine_alive_key,
)
from engine.artifacts import ArtifactStore
from engine.worker import (
    engine_workers,
    keep_heartbeat,
    leased,
    stop_heartbeat,
    write_heartbeat,
)
from tests.conftest import configure_second_model, make_photo, queued

DEST = {"channel": "c1"}


def heartbeat(
    models: Sequence[str], engine_id: str = "e1", jobs: Sequence[EngineJob] = ()
) -> EngineHeartbeat:
    return EngineHeartbeat(
        engine_id=engine_id,
        host="gpu-1",
        pid=4242,
        device="cuda (NVIDIA H100)",
        models=list(models),
        started_at=datetime.now(UTC) - timedelta(hours=3, minutes=2),
        jobs=list(jobs),
    )


def engine_ctx(settings: Settings, redis: Any = None) -> dict[str, Any]:
    """An engine's shared ``ctx`` as ``load_resources`` builds it, without loading the models:
    only their names matter to the heartbeat (and the rare tokens count as published)."""
    ctx: dict[str, Any] = {
        "settings": settings,
        "models": dict.fromkeys(settings.model_names),
        "artifacts": ArtifactStore(settings.artifacts),
        "cache_dir": settings.data_dir / "engine-cache",
        "device": "cpu",
        "running_jobs": {},
        "rare_tokens_published": True,
    }
    if redis is not None:
        ctx["redis"] = redis
    return ctx


@contextlib.asynccontextmanager
async def running_workers(ctx: dict[str, Any]) -> AsyncIterator[None]:
    """The engine's two arq workers on ``ctx``, started and cleanly stopped as in
    ``run_engine`` (their startup and shutdown hooks run)."""
    workers = engine_workers(ctx["settings"], ctx, handle_signals=False)
    tasks = [asyncio.create_task(run_worker_forever(w, w.queue_name)) for w in workers]
    try:
        yield
    finally:
        for worker, task in zip(workers, tasks, strict=True):
            await stop_worker(worker, task)


async def wait_for_engines(runtime: BotRuntime, count: int) -> list[EngineHeartbeat]:
    async with asyncio.timeout(10):
        while len(engines := await runtime.core.live_engines()) != count:
            await asyncio.sleep(0.02)
    return engines


def heartbeat_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if "keep_heartbeat" in repr(t.get_coro())]


@pytest.fixture
def mod(runtime: BotRuntime, owner: Owner) -> Moderator:
    return runtime.core.moderation.acting(Owner(owner.platform, owner.workspace, "mod-1"), True)


# The heartbeat.


async def test_a_started_engine_announces_itself_until_it_shuts_down(
    runtime: BotRuntime, settings: Settings
) -> None:
    configure_second_model(settings)
    async with running_workers(engine_ctx(settings)):
        [engine] = await wait_for_engines(runtime, 1)
        assert engine.models == ["tiny", "xl"]
        assert (engine.host, engine.pid, engine.device) == (
            socket.gethostname(),
            os.getpid(),
            "cpu",
        )
        assert engine.jobs == []
        key = engine_alive_key(engine.engine_id)
        ttl = await runtime.queue.pttl(key)
        assert 0 < ttl <= ENGINE_HEARTBEAT_TTL_SECONDS * 1000
        assert len(heartbeat_tasks()) == 1  # one per engine, not one per worker
    # A clean shutdown takes the key down at once, not after its TTL.
    assert not await runtime.queue.exists(key)
    assert await runtime.queue.smembers(ENGINES_KEY) == set()
    assert heartbeat_tasks() == []
    assert await runtime.core.live_engines() == []


async def test_the_heartbeat_is_renewed_and_reports_the_jobs_running(
    runtime: BotRuntime, settings: Settings
) -> None:
    ctx = engine_ctx(settings, runtime.queue)
    identity = heartbeat(["tiny"])
    ctx["engine"] = identity
    ctx["heartbeat"] = asyncio.create_task(keep_heartbeat(ctx, identity, interval=0.05, ttl=0.3))
    [engine] = await wait_for_engines(runtime, 1)
    assert engine.engine_id == identity.engine_id
    await asyncio.sleep(0.8)  # more than two TTLs: only renewals keep it
    assert len(await runtime.core.live_engines()) == 1

    release = asyncio.Event()

    async def generate(ctx: dict[str, Any], payload: dict[str, Any]) -> None:
        await release.wait()

    job = asyncio.create_task(leased(generate)({**ctx, "job_id": "job-1"}, {}))
    async with asyncio.timeout(5):
        while not (await runtime.core.live_engines())[0].jobs:
            await asyncio.sleep(0.02)
    [engine] = await runtime.core.live_engines()
    assert [(j.job_id, j.kind) for j in engine.jobs] == [("job-1", "generate")]
    release.set()
    await job
    async with asyncio.timeout(5):
        while (await runtime.core.live_engines())[0].jobs:
            await asyncio.sleep(0.02)

    await stop_heartbeat(ctx)
    assert not await runtime.queue.exists(engine_alive_key(identity.engine_id))
    assert heartbeat_tasks() == []


async def test_an_expired_heartbeat_counts_as_gone(runtime: BotRuntime) -> None:
    await write_heartbeat(runtime.queue, heartbeat(["tiny"], "crashed"), ttl=0.2)
    assert len(await runtime.core.live_engines()) == 1
    await asyncio.sleep(0.4)  # the engine died without a clean shutdown: no renewal

    assert await runtime.core.live_engines() == []
    assert await runtime.queue.smembers(ENGINES_KEY) == set()  # its id left the list too


# The receipt's note.


async def test_a_job_queued_with_no_engine_running_says_so_and_still_waits(
    runtime: BotRuntime, owner: Owner
) -> None:
    receipt = await runtime.core.imagine(owner, DEST, "a red fox", count=1)

    assert receipt.text.endswith("queued (position 1).\n" + NO_ENGINE_NOTE)
    assert receipt.confirmed and receipt.position == 1
    assert await queued(runtime.queue) == 1
    job = await runtime.store.get_job(receipt.job_id)
    assert job is not None and job.status == "queued"


async def test_a_training_queued_with_no_engine_running_says_so(
    runtime: BotRuntime, owner: Owner
) -> None:
    photos = [Upload(f"rex{i}.jpg", make_photo(i)) for i in range(3)]
    receipt = await runtime.core.train(owner, DEST, "rex", "dog", photos)

    assert receipt.text.endswith("I'll post progress here.\n" + NO_ENGINE_NOTE)
    assert await queued(runtime.queue) == 1


async def test_a_job_for_a_model_no_running_engine_serves_names_the_model(
    runtime: BotRuntime, settings: Settings, owner: Owner
) -> None:
    configure_second_model(settings)
    await write_heartbeat(runtime.queue, heartbeat(["xl"]), ttl=30)

    receipt = await runtime.core.imagine(owner, DEST, "a red fox", count=1)

    assert NO_ENGINE_NOTE not in receipt.text
    assert "No running engine serves the model tiny (they serve xl)" in receipt.text
    assert await queued(runtime.queue) == 1


async def test_a_job_an_engine_can_take_gets_no_note(
    runtime: BotRuntime, settings: Settings, owner: Owner
) -> None:
    configure_second_model(settings)
    await write_heartbeat(runtime.queue, heartbeat(["xl"], "e1"), ttl=30)
    await write_heartbeat(runtime.queue, heartbeat(["tiny"], "e2"), ttl=30)

    receipt = await runtime.core.imagine(owner, DEST, "a red fox", count=1)

    assert receipt.text.endswith("queued (position 1).")


async def test_engines_that_cant_be_read_add_nothing_to_the_receipt(
    runtime: BotRuntime, owner: Owner
) -> None:
    await runtime.queue.set(ENGINES_KEY, "not a set")  # Redis answers WRONGTYPE

    receipt = await runtime.core.imagine(owner, DEST, "a red fox", count=1)

    assert receipt.text.endswith("queued (position 1).")
    assert await queued(runtime.queue) == 1


# /mod status.


async def test_mod_status_with_no_engine_says_so_with_the_queue_lengths(
    runtime: BotRuntime, owner: Owner, mod: Moderator
) -> None:
    first = await runtime.core.imagine(owner, DEST, "a red fox", count=1)
    await runtime.core.imagine(owner, DEST, "a blue fox", count=1)
    await runtime.queue.set(in_progress_key_prefix + first.job_id, b"1")  # an engine took it

    text = await mod.status()

    assert text.splitlines() == [
        "No engine is running: queued jobs wait until one starts.",
        "Queues (all workspaces): Trainings: 0 waiting, 0 running. "
        "Image jobs: 1 waiting, 1 running.",
    ]


async def test_mod_status_lists_the_engines_and_what_they_run(
    runtime: BotRuntime, settings: Settings, owner: Owner, mod: Moderator
) -> None:
    configure_second_model(settings)
    mine = await runtime.core.imagine(owner, DEST, "a red fox", count=1)
    since = datetime.now(UTC) - timedelta(minutes=4)
    # A job that ended since the engine's last heartbeat is not shown as running.
    ended = await runtime.core.imagine(owner, DEST, "a hen", count=1)
    await runtime.store.update_job(ended.job_id, status="done")
    jobs = [
        EngineJob(job_id=mine.job_id, kind="generate", started_at=since),
        EngineJob(job_id=ended.job_id, kind="generate", started_at=since),
        EngineJob(job_id="f" * 32, kind="train_subject", started_at=since),
    ]
    await write_heartbeat(runtime.queue, heartbeat(["tiny"], "e1", jobs), ttl=30)

    text = await runtime.core.mod(mod.owner, True, "status")

    lines = text.splitlines()
    assert lines[0] == "Engines running (1):"
    assert lines[1].startswith("  e1, cuda (NVIDIA H100): models tiny; no safety checker; up since")
    assert lines[1].endswith("(3h 2m)")
    # Only this workspace's job is named; the other one is only counted.
    assert lines[2] == f"    busy: image {mine.job_id[:8]} (4m); training of another workspace (4m)"
    assert lines[3] == "No running engine serves xl: jobs for it wait until one does."
    assert "Image jobs: 2 waiting" in lines[4]
    assert "/mod status" in MOD_HELP


async def test_mod_status_is_refused_to_others(runtime: BotRuntime, owner: Owner) -> None:
    await write_heartbeat(runtime.queue, heartbeat(["tiny"]), ttl=30)
    with pytest.raises(NotModerator):
        await runtime.core.mod(owner, False, "status")


@pytest.mark.model
async def test_a_real_engine_is_seen_while_it_runs_and_missed_once_it_stops(
    runtime: BotRuntime, settings: Settings, owner: Owner, tiny_model_dir: Path
) -> None:
    from tests.test_end_to_end import running_engine

    settings.base_model = str(tiny_model_dir)
    async with running_engine(settings) as (ctx, _):
        [engine] = await wait_for_engines(runtime, 1)
        assert engine.engine_id == ctx["engine"].engine_id
        assert engine.models == [str(tiny_model_dir)] and engine.device == "cpu"
        assert await runtime.queue.exists(engine_alive_key(engine.engine_id))
        served = await runtime.core.imagine(owner, DEST, "a red fox", count=1, steps=1)
        assert served.text.endswith(")."), served.text  # no note
    assert not await runtime.queue.exists(engine_alive_key(engine.engine_id))
    assert heartbeat_tasks() == []

    waiting = await runtime.core.imagine(owner, DEST, "a red fox", count=1, steps=1)
    assert waiting.text.endswith(NO_ENGINE_NOTE)
