"""A post of a result that runs past the delivery's time limit (a chat platform that hangs) is
stopped and tried again, and on the last try the user is told in the chat instead: the result
is never dropped silently. The bot's real delivery worker (arq), real SQLite, real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.core import delivery
from bot.core.delivery import DELIVERY_TRIES, TEXT_PART, Deliverer, Delivery, file_part
from bot.core.store import Owner
from bot.launcher import BotRuntime, delivering, open_core
from engine.api import DELIVER_RESULT, GenerateResult, bot_queue
from tests.conftest import TEST_PLATFORM, RecordingSink, make_settings

TIMEOUT = 1.0
"""The delivery time limit in these tests (seconds)."""


class HangingSink(RecordingSink):
    """A chat whose first ``hangs`` posts of a result never end (until cancelled)."""

    def __init__(self, hangs: int) -> None:
        super().__init__()
        self.hangs = hangs
        self.tries = 0

    async def show_result(self, delivery: Delivery) -> None:
        self.tries += 1
        if self.tries <= self.hangs:
            await asyncio.Event().wait()
        await super().show_result(delivery)


@pytest.fixture
async def runtime(tmp_path: Path, redis_clean: str) -> AsyncIterator[BotRuntime]:
    """The core with a short delivery time limit."""
    settings = make_settings(tmp_path / "data", redis_clean, delivery_timeout=TIMEOUT)
    async with open_core(settings, TEST_PLATFORM) as runtime:
        yield runtime


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tries again after a tenth of a second instead of ten."""
    monkeypatch.setattr(delivery, "RETRY_DELAY", 0.1)


async def send_result(runtime: BotRuntime, owner: Owner, *, job_try: int | None = None) -> str:
    """Queue an image job and the engine's result of it for the bot; the job's id."""
    receipt = await runtime.core.imagine(owner, {"channel": "c1"}, "a cat", count=1)
    result = GenerateResult(
        job_id=receipt.job_id, image_urls=[], seed=1, width=64, height=64, steps=4, seconds=0.1
    )
    queued = await runtime.queue.enqueue_job(
        DELIVER_RESULT,
        result.model_dump(),
        _queue_name=bot_queue(TEST_PLATFORM),
        _job_try=job_try,
    )
    assert queued is not None
    return receipt.job_id


async def test_a_post_past_the_time_limit_is_stopped_and_posted_on_the_next_try(
    runtime: BotRuntime, owner: Owner
) -> None:
    job_id = await send_result(runtime, owner)
    sink = HangingSink(hangs=1)

    async with delivering(runtime, sink):
        posted = await sink.wait_for(job_id, within=10 * TIMEOUT)

    assert isinstance(posted, Delivery)
    assert (sink.tries, sink.result_count) == (2, 1)
    job = await runtime.store.get_job(job_id)
    assert job is not None and job.status == "done" and job.delivered_at is not None


async def test_a_post_past_the_time_limit_on_the_last_try_says_so_in_the_chat(
    runtime: BotRuntime, owner: Owner
) -> None:
    job_id = await send_result(runtime, owner, job_try=DELIVERY_TRIES)
    sink = HangingSink(hangs=DELIVERY_TRIES)

    async with delivering(runtime, sink):
        told = await sink.wait_for(job_id, within=10 * TIMEOUT)
        await asyncio.sleep(0.5)  # no other post follows

    assert told == (
        f"Your result is ready (job {job_id[:8]}), but posting it here kept failing (it took "
        "too long), so it is not shown. dreambot keeps it."
    )
    assert (sink.tries, sink.result_count) == (1, 1)
    job = await runtime.store.get_job(job_id)
    assert job is not None and job.status == "done" and job.delivered_at is not None


def test_the_delivery_time_limit_leaves_arq_room_to_tell_the_user(runtime: BotRuntime) -> None:
    worker = delivery.delivery_worker(
        delivery.Deliverer(runtime.core, RecordingSink()), runtime.queue, TEST_PLATFORM
    )
    # arq stops a job only after the deliverer has stopped its post and told the user, so a
    # timeout reaches the deliverer, never arq (which would drop the job without a word).
    assert worker.job_timeout_s is not None
    assert worker.job_timeout_s >= TIMEOUT + delivery.GIVE_UP_SECONDS


class HalfPostingSink(RecordingSink):
    """A chat that takes a result's first message, then refuses the rest."""

    async def show_result(self, delivery: Delivery) -> None:
        await delivery.parts.add(TEXT_PART, file_part("0.png"))
        raise ConnectionError("chat unreachable")


async def test_a_post_failing_on_its_last_try_says_what_is_missing_in_the_chat(
    runtime: BotRuntime, owner: Owner
) -> None:
    receipt = await runtime.core.imagine(owner, {"channel": "c1"}, "a cat", count=1)
    result = GenerateResult(
        job_id=receipt.job_id, image_urls=[], seed=1, width=64, height=64, steps=4, seconds=0.1
    ).model_dump()
    sink = HalfPostingSink()

    await Deliverer(runtime.core, sink).result(result, last_try=True)

    assert sink.failures[receipt.job_id] == (
        f"Your result is ready (job {receipt.job_id[:8]}), but posting the rest of it here kept "
        "failing (the chat platform did not take it), so it is not all shown. dreambot keeps it."
    )
    job = await runtime.store.get_job(receipt.job_id)
    assert job is not None and job.delivered_at is not None
    assert await runtime.store.posted_parts(receipt.job_id) == set()  # done with: forgotten
