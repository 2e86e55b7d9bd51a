"""Start-up wiring for a bot process: store, queue, core, the delivery worker, and its chores
(the check of jobs the queue never confirmed, queue positions, the retention sweep)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from arq import create_pool
from arq.connections import ArqRedis
from redis.exceptions import RedisError

from bot.config import Settings
from bot.connections import redis_settings, run_worker_forever, stop_worker
from bot.core.commands import Core
from bot.core.delivery import Deliverer, Sink, delivery_worker
from bot.core.retention import SWEEP_EVERY
from bot.core.store import Store
from engine.artifacts import ArtifactStore

log = logging.getLogger(__name__)

SETTLE_EVERY = 30.0
"""Seconds between checks of the jobs the queue never confirmed (``settle_unconfirmed_jobs``)."""
POSITIONS_EVERY = 10.0
"""Seconds between updates of waiting jobs' places in the queue (``show_queue_positions``)."""


@dataclass
class BotRuntime:
    """Everything a running bot process holds."""

    settings: Settings
    store: Store
    queue: ArqRedis
    core: Core


@contextlib.asynccontextmanager
async def open_core(settings: Settings, platform: str) -> AsyncIterator[BotRuntime]:
    """Open the store (migrating it) and the queue, and build the core for ``platform``."""
    store = await Store.open(settings.database_file)
    try:
        # Every enqueue names its queue (engine.api), so the pool needs no default one.
        queue = await create_pool(redis_settings(settings.redis_url))
    except BaseException:
        await store.close()
        raise
    try:
        core = Core(settings, store, ArtifactStore(settings.artifacts), queue, platform)
        yield BotRuntime(settings, store, queue, core)
    finally:
        await queue.aclose()
        await store.close()


@contextlib.asynccontextmanager
async def delivering(
    runtime: BotRuntime,
    sink: Sink,
    *,
    settle_every: float = SETTLE_EVERY,
    positions_every: float = POSITIONS_EVERY,
    sweep_every: float = SWEEP_EVERY,
) -> AsyncIterator[Deliverer]:
    """Unclaim the deliveries an earlier process left cut off mid-post (so they are posted);
    then consume the bot's result queue in this event loop while the block runs; settle the
    jobs the queue never confirmed (now, then every ``settle_every`` seconds); show waiting
    jobs their new place in the queue every ``positions_every`` seconds; and delete what is
    past its retention, now and every ``sweep_every`` seconds (``bot.core.retention``)."""
    deliverer = Deliverer(runtime.core, sink)
    await deliverer.reopen_deliveries()  # before the worker can re-run their delivery jobs
    # The worker closes its pool on the way out, so it gets its own.
    pool = await create_pool(redis_settings(runtime.settings.redis_url))
    worker = delivery_worker(deliverer, pool, runtime.core.platform)
    task = asyncio.create_task(run_worker_forever(worker, f"{runtime.core.platform} delivery"))
    chores = [
        asyncio.create_task(
            _every(settle_every, runtime.core.settle_unconfirmed_jobs, "check unconfirmed jobs")
        ),
        asyncio.create_task(
            _every(positions_every, deliverer.show_queue_positions, "update queue positions")
        ),
        asyncio.create_task(
            _every(sweep_every, runtime.core.retention.sweep, "delete what is past retention")
        ),
    ]
    try:
        yield deliverer
    finally:
        for chore in chores:
            chore.cancel()
        for chore in chores:
            with contextlib.suppress(asyncio.CancelledError):
                await chore
        await stop_worker(worker, task)


async def _every(seconds: float, chore: Callable[[], Awaitable[object]], what: str) -> None:
    """Run ``chore`` now, then every ``seconds``, until cancelled; failures are logged."""
    while True:
        try:
            await chore()
        except (RedisError, OSError) as exc:  # Redis is asked again next time
            log.warning("can't %s yet (%s); again in %.0fs", what, exc, seconds)
        except Exception:
            log.exception("%s failed; again in %.0fs", what, seconds)
        await asyncio.sleep(seconds)
