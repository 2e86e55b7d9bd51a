"""The ``generate`` job on an in-process engine: previews off the GPU thread, cancelling a job
that waits for the GPU, and the lease of a job an engine shutdown interrupts."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from arq import ArqRedis, create_pool
from arq.connections import RedisSettings
from arq.constants import in_progress_key_prefix
from arq.jobs import Job as ArqJob
from arq.worker import Worker

import engine.generate_job
from bot.connections import run_worker_forever, stop_worker
from engine.api import GENERATE, GenerateRequest, cancel_key
from engine.artifacts import ArtifactStore, local_path
from engine.generate_job import generate
from tests.conftest import engine_queue, make_settings

pytestmark = pytest.mark.model

REPLY_QUEUE = "dreambot:bot:generate-test"


@pytest.fixture
async def engine_ctx(
    tmp_path: Path, redis_clean: str, tiny_model_dir: Path
) -> AsyncIterator[dict[str, Any]]:
    """The engine's shared ``ctx``, loaded once, as its workers get it (without ``redis``:
    a worker sets its own)."""
    from engine.worker import load_resources

    settings = make_settings(
        tmp_path / "data", redis_clean, base_model=str(tiny_model_dir), generate_steps=4
    )
    yield await load_resources(settings)


@pytest.fixture
async def redis(redis_clean: str) -> AsyncIterator[ArqRedis]:
    pool = await create_pool(RedisSettings.from_dsn(redis_clean))
    try:
        yield pool
    finally:
        await pool.aclose()


def a_request(ctx: dict[str, Any], job_id: str, **changes: Any) -> GenerateRequest:
    values: dict[str, Any] = {
        "job_id": job_id,
        "reply_queue": REPLY_QUEUE,
        "prompt": "a red fox",
        "count": 1,
        "seed": 1,
        "output_url": ctx["artifacts"].url("outputs", job_id),
        "base_model": ctx["settings"].base_model,
        "previews": False,
    }
    return GenerateRequest(**{**values, **changes})


async def _wait_for(condition: Callable[[], bool], within: float = 30.0) -> None:
    async with asyncio.timeout(within):
        while not condition():
            await asyncio.sleep(0.02)


async def test_previews_are_stored_while_the_image_is_drawn_and_reported_once_stored(
    engine_ctx: dict[str, Any], redis: ArqRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    drawn = threading.Event()
    waited: list[bool] = []

    class SlowStore(ArtifactStore):
        """A store whose preview uploads take until the drawing has finished."""

        def put_bytes(self, url: str, data: bytes) -> None:
            if "/previews/" in url:
                waited.append(drawn.wait(10))
            super().put_bytes(url, data)

    draw = engine.generate_job.draw

    def draw_then_tell(*args: Any, **kwargs: Any) -> Any:
        images = draw(*args, **kwargs)
        drawn.set()
        return images

    monkeypatch.setattr(engine.generate_job, "draw", draw_then_tell)
    ctx = {
        **engine_ctx,
        "redis": redis,
        "artifacts": SlowStore(engine_ctx["artifacts"].base_url),
        "settings": engine_ctx["settings"].model_copy(update={"preview_interval": 1e-6}),
    }
    request = a_request(ctx, "job-previews", previews=True)

    result = await generate(ctx, request.model_dump())

    assert result is not None
    # Drawing went on while the first preview was still being uploaded (the GPU was not held
    # up by the store) ...
    assert len(waited) == 3 and all(waited)  # steps 1-3 of 4; the last step is the image
    # ... and each preview was reported only once it was stored, before the result.
    reported = []
    for job_id in await redis.zrange(REPLY_QUEUE, 0, -1):
        info = await ArqJob(job_id.decode(), redis, _queue_name=REPLY_QUEUE).info()
        assert info is not None
        if info.args[0].get("preview_url"):
            reported.append(info.args[0]["preview_url"])
    assert len(reported) == 3
    for url in reported:
        path = local_path(url)
        assert path is not None and path.is_file()


@contextlib.asynccontextmanager
async def generation_worker(ctx: dict[str, Any]) -> AsyncIterator[Worker]:
    """The engine's generation worker, running in this event loop on ``ctx``."""
    from engine.worker import engine_workers

    queue = engine_queue(ctx["settings"])
    workers = engine_workers(ctx["settings"], ctx, handle_signals=False)
    [worker] = [worker for worker in workers if worker.queue_name == queue]
    task = asyncio.create_task(run_worker_forever(worker, worker.queue_name))
    try:
        yield worker
    finally:
        await stop_worker(worker, task)


@pytest.mark.parametrize("how", ["arq abort", "cancel key"])
async def test_a_generation_cancelled_while_it_waits_for_the_gpu_leaves_at_once(
    engine_ctx: dict[str, Any], redis: ArqRedis, how: str
) -> None:
    gpu = engine_ctx["gpu"]
    request = a_request(engine_ctx, "job-waiting")
    async with generation_worker(engine_ctx) as worker:
        with gpu.training():  # a long training holds the GPU throughout
            await redis.enqueue_job(
                GENERATE,
                request.model_dump(),
                _job_id=request.job_id,
                _queue_name=engine_queue(engine_ctx["settings"]),
            )
            await _wait_for(lambda: gpu._generations_waiting == 1)
            job = ArqJob(request.job_id, redis, _queue_name=engine_queue(engine_ctx["settings"]))
            if how == "arq abort":
                assert await job.abort(timeout=5, poll_delay=0.05)
            else:
                await redis.set(cancel_key(request.job_id), "testing", ex=60)
                assert await job.result(timeout=5, poll_delay=0.05) is None
                answers = await redis.zrange(REPLY_QUEUE, 0, -1)
                assert answers == [f"{request.job_id}:deliver_failure".encode()]
            # The job's slot is free again while the training still holds the GPU.
            assert gpu._generations_waiting == 0 and len(worker.job_tasks) == 0
        output = local_path(request.output_url)
        assert output is not None and not output.exists()


async def test_an_engine_shutdown_leaves_no_lease_renewal_behind(
    engine_ctx: dict[str, Any], redis: ArqRedis
) -> None:
    engine_ctx["settings"] = engine_ctx["settings"].model_copy(update={"job_lease_seconds": 1})
    gpu = engine_ctx["gpu"]
    request = a_request(engine_ctx, "job-leased")
    key = in_progress_key_prefix + request.job_id
    async with generation_worker(engine_ctx) as worker:
        with gpu.training():
            await redis.enqueue_job(
                GENERATE,
                request.model_dump(),
                _job_id=request.job_id,
                _queue_name=engine_queue(engine_ctx["settings"]),
            )
            await _wait_for(lambda: gpu._generations_waiting == 1)
            await asyncio.sleep(2.5)  # more than two leases: only renewals keep the key
            assert await redis.exists(key)
            await worker.close()  # the engine shuts down: arq cancels the running job

    renewals = [
        t
        for t in asyncio.all_tasks()
        if any(name in repr(t.get_coro()) for name in ("_renew_lease", "keep_heartbeat"))
    ]
    assert renewals == []
    assert not await redis.exists(key)
