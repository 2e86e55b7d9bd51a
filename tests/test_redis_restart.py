"""A Redis restart (with AOF, as deployed) loses no job and no result."""

from __future__ import annotations

from pathlib import Path

from bot.core.delivery import Delivery
from bot.core.store import Owner
from bot.launcher import delivering, open_core
from bot.redis_server import RedisServer
from engine.api import DELIVER_RESULT, GenerateResult, bot_queue
from tests.conftest import TEST_PLATFORM, RecordingSink, engine_queue, make_settings


async def test_jobs_and_results_survive_a_redis_restart(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", persistent=True).start()
    settings = make_settings(tmp_path / "data", server.url)
    owner = Owner(TEST_PLATFORM, "guild-1", "user-1")
    sink = RecordingSink()
    try:
        async with open_core(settings, TEST_PLATFORM) as runtime, delivering(runtime, sink):
            receipt = await runtime.core.imagine(owner, {}, "a lighthouse at dusk", count=1)

            server.stop()
            server.start()

            # The queued engine job is still there after the restart...
            assert await runtime.queue.zrange(engine_queue(runtime), 0, -1) == [
                receipt.job_id.encode()
            ]
            # ...and a result the engine sends now is delivered by the same bot process,
            # whose delivery worker reconnected by itself.
            result = GenerateResult(
                job_id=receipt.job_id,
                image_urls=[],
                seed=1,
                width=64,
                height=64,
                steps=1,
                seconds=0.1,
            )
            await runtime.queue.enqueue_job(
                DELIVER_RESULT, result.model_dump(), _queue_name=bot_queue(TEST_PLATFORM)
            )
            delivered = await sink.wait_for(receipt.job_id, within=30)
            assert isinstance(delivered, Delivery)
            job = await runtime.store.get_job(receipt.job_id)
            assert job is not None and job.status == "done"
    finally:
        server.stop()
