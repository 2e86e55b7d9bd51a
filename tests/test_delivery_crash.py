"""A bot process killed hard (SIGKILL, OOM, power loss) while it posts a result loses nothing:
the next process posts it (at least once). Real bot process, real SQLite, real Redis."""

from __future__ import annotations

import asyncio
import sys
import textwrap
from pathlib import Path

import aiosqlite
import pytest
from arq.constants import in_progress_key_prefix
from arq.worker import Retry

from bot.config import Settings
from bot.core.delivery import Deliverer, Delivery
from bot.core.store import Owner
from bot.launcher import BotRuntime, delivering, open_core
from engine.api import DELIVER_RESULT, GenerateResult, bot_queue
from tests.conftest import TEST_PLATFORM, RecordingSink

# A bot whose sink starts posting a result (saying so in a file) and never finishes.
BOT_STUCK_IN_A_POST = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from bot.config import Settings
    from bot.launcher import delivering, open_core

    class StuckSink:
        async def show_progress(self, job, text, progress):
            pass

        async def show_result(self, delivery):
            Path(sys.argv[4]).write_text(delivery.job.id)
            await asyncio.Event().wait()

        async def show_failure(self, job, text):
            pass

    async def main() -> None:
        redis_url, data_dir, platform, posting = sys.argv[1:]
        settings = Settings(_env_file=None, redis_url=redis_url, data_dir=data_dir)
        async with open_core(settings, platform) as runtime:
            async with delivering(runtime, StuckSink()):
                await asyncio.Event().wait()

    asyncio.run(main())
    """
)


async def in_flight(db: aiosqlite.Connection, job_id: str) -> bool:
    """Whether the job's delivery is recorded as claimed but not finished (migration 0006)."""
    async with db.execute(
        "SELECT 1 FROM deliveries_in_flight WHERE job_id = ?", (job_id,)
    ) as cursor:
        return await cursor.fetchone() is not None


async def test_a_result_whose_bot_was_killed_mid_post_is_posted_once_after_the_restart(
    settings: Settings, owner: Owner, tmp_path: Path
) -> None:
    async with open_core(settings, TEST_PLATFORM) as runtime:
        receipt = await runtime.core.imagine(owner, {"channel": "c1"}, "a cat", count=1)
        result = GenerateResult(
            job_id=receipt.job_id, image_urls=[], seed=1, width=64, height=64, steps=4, seconds=0.1
        )
        delivery_job = await runtime.queue.enqueue_job(
            DELIVER_RESULT, result.model_dump(), _queue_name=bot_queue(TEST_PLATFORM)
        )
        assert delivery_job is not None

    posting = tmp_path / "posting"
    bot = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        BOT_STUCK_IN_A_POST,
        settings.redis_url,
        str(settings.data_dir),
        TEST_PLATFORM,
        str(posting),
    )
    try:
        async with asyncio.timeout(20):  # until the bot has claimed the result and is posting
            while not posting.exists():
                await asyncio.sleep(0.05)
        bot.kill()
        await bot.wait()
    finally:
        if bot.returncode is None:
            bot.kill()
            await bot.wait()

    async with open_core(settings, TEST_PLATFORM) as runtime:
        job = await runtime.store.get_job(receipt.job_id)
        assert job is not None and job.delivered_at is not None  # claimed by the killed bot
        assert await in_flight(runtime.store.db, receipt.job_id)
        # arq re-runs a job whose worker died once its in-progress key expires (the delivery
        # worker's job timeout + 10 s, 310 s); here it expires now.
        await runtime.queue.delete(in_progress_key_prefix + delivery_job.job_id)

        sink = RecordingSink()
        async with delivering(runtime, sink):
            delivered = await sink.wait_for(receipt.job_id, within=10)
            assert isinstance(delivered, Delivery) and delivered.job.id == receipt.job_id
            await asyncio.sleep(1.0)  # a second post would come within a few polls
        assert sink.result_count == 1
        job = await runtime.store.get_job(receipt.job_id)
        assert job is not None and job.status == "done" and job.delivered_at is not None
        assert not await in_flight(runtime.store.db, receipt.job_id)


class RefusingSink(RecordingSink):
    """A sink whose chat refuses every result (the platform is down)."""

    async def show_result(self, delivery: Delivery) -> None:
        raise ConnectionError("chat unreachable")


async def test_a_post_that_fails_is_unclaimed_and_not_left_in_flight(
    runtime: BotRuntime, owner: Owner
) -> None:
    receipt = await runtime.core.imagine(owner, {"channel": "c1"}, "a cat", count=1)
    result = GenerateResult(
        job_id=receipt.job_id, image_urls=[], seed=1, width=64, height=64, steps=4, seconds=0.1
    ).model_dump()

    with pytest.raises(Retry):
        await Deliverer(runtime.core, RefusingSink()).result(result)
    job = await runtime.store.get_job(receipt.job_id)
    assert job is not None and job.delivered_at is None
    assert not await in_flight(runtime.store.db, receipt.job_id)

    sink = RecordingSink()
    await Deliverer(runtime.core, sink).result(result)  # arq's retry
    assert sink.result_count == 1
    job = await runtime.store.get_job(receipt.job_id)
    assert job is not None and job.delivered_at is not None
    assert not await in_flight(runtime.store.db, receipt.job_id)
