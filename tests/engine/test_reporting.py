"""The engine's progress reports: what the ETA a user sees is based on."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import engine.reporting
from engine.reporting import ProgressReporter


class RecordingRedis:
    """Keeps the progress payloads a reporter enqueues (the ETA is what is under test)."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    async def enqueue_job(self, function: str, payload: dict[str, Any], **_: Any) -> None:
        self.sent.append(payload)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def reporter_with_clock(monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Clock, RecordingRedis]:
    clock = Clock()
    monkeypatch.setattr(engine.reporting.time, "monotonic", clock)
    redis = RecordingRedis()
    reporter = ProgressReporter(
        redis,  # type: ignore[arg-type]
        asyncio.get_running_loop(),
        "bot:test",
        "job-1",
        interval=0,
    )
    return reporter, clock, redis


async def test_eta_of_a_resumed_training_counts_only_the_steps_it_timed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    report, clock, redis = await reporter_with_clock(monkeypatch)
    report("training", 300, 400)  # resumed from a checkpoint after step 300
    clock.now += 10.0
    report("training", 310, 400)  # ten steps in ten seconds: 90 to go, 90 seconds
    await asyncio.sleep(0)
    assert redis.sent[0]["eta_seconds"] is None
    assert redis.sent[1]["eta_seconds"] == pytest.approx(90.0)


async def test_eta_of_a_phase_is_unknown_until_a_step_was_timed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    report, clock, redis = await reporter_with_clock(monkeypatch)
    report("generating", 1, 25)
    clock.now += 2.0
    report("generating", 3, 25)  # two steps in two seconds
    await asyncio.sleep(0)
    assert redis.sent[0]["eta_seconds"] is None
    assert redis.sent[1]["eta_seconds"] == pytest.approx(22.0)


async def test_a_job_past_its_time_limit_is_answered_with_a_failure() -> None:
    from pydantic import BaseModel

    from engine.api import DELIVER_FAILURE
    from engine.reporting import answer_job

    class Request(BaseModel):
        job_id: str = "job-2"
        reply_queue: str = "bot:test"

    class Sent(RecordingRedis):
        async def enqueue_job(self, function: str, payload: dict[str, Any], **_: Any) -> None:
            self.sent.append({"function": function, **payload})

    async def slow() -> BaseModel:
        await asyncio.sleep(30)
        raise AssertionError("the time limit should have stopped this")

    failed: list[bool] = []

    async def on_failure() -> None:
        failed.append(True)

    redis = Sent()
    answer = await answer_job(
        redis,  # type: ignore[arg-type]
        Request(),  # type: ignore[arg-type]
        slow,
        on_failure,
        time_limit=0.1,
    )
    assert answer is None and failed == [True]
    [sent] = redis.sent
    assert sent["function"] == DELIVER_FAILURE and sent["job_id"] == "job-2"
    assert "ran longer than the engine's limit" in sent["message"]


async def test_running_out_of_gpu_memory_is_answered_in_plain_words(redis_clean: str) -> None:
    import torch
    from arq import create_pool
    from pydantic import BaseModel

    from bot.connections import redis_settings
    from engine.api import DELIVER_FAILURE
    from engine.reporting import OUT_OF_MEMORY, answer_job

    class Request(BaseModel):
        job_id: str = "job-3"
        reply_queue: str = "dreambot:bot:test"

    async def too_big() -> BaseModel:
        # The exception CUDA's allocator raises (a subclass of RuntimeError).
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    redis = await create_pool(redis_settings(redis_clean))
    try:
        assert await answer_job(redis, Request(), too_big) is None
        [sent] = await redis.queued_jobs(queue_name="dreambot:bot:test")
    finally:
        await redis.aclose()
    assert sent.function == DELIVER_FAILURE
    [failure] = sent.args
    assert failure["job_id"] == "job-3" and failure["message"] == OUT_OF_MEMORY
    assert "internal error" not in failure["message"]
    assert "OutOfMemoryError" in failure["detail"]
