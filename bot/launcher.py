"""Start-up wiring for a bot process: store, queue, core, the delivery worker, and the check
of jobs the queue never confirmed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from arq import create_pool
from arq.connections import ArqRedis
from redis.exceptions import RedisError

from bot.config import Settings
from bot.connections import redis_settings, run_worker_forever, stop_worker
from bot.core.commands import Core
from bot.core.delivery import Deliverer, Sink, delivery_worker
from bot.core.store import Store
from engine.artifacts import ArtifactStore

log = logging.getLogger(__name__)

SETTLE_EVERY = 30.0
"""Seconds between checks of the jobs the queue never confirmed (``settle_unconfirmed_jobs``)."""


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
    runtime: BotRuntime, sink: Sink, *, settle_every: float = SETTLE_EVERY
) -> AsyncIterator[Deliverer]:
    """Consume the bot's result queue in this event loop while the block runs, and settle the
    jobs the queue never confirmed: now, then every ``settle_every`` seconds."""
    deliverer = Deliverer(runtime.core, sink)
    # The worker closes its pool on the way out, so it gets its own.
    pool = await create_pool(redis_settings(runtime.settings.redis_url))
    worker = delivery_worker(deliverer, pool, runtime.core.platform)
    task = asyncio.create_task(run_worker_forever(worker, f"{runtime.core.platform} delivery"))
    settling = asyncio.create_task(_settle_forever(runtime.core, settle_every))
    try:
        yield deliverer
    finally:
        settling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await settling
        await stop_worker(worker, task)


async def _settle_forever(core: Core, every: float) -> None:
    while True:
        try:
            await core.settle_unconfirmed_jobs()
        except (RedisError, OSError) as exc:  # the rows wait; Redis is asked again next time
            log.warning("can't check unconfirmed jobs yet (%s); again in %.0fs", exc, every)
        except Exception:
            log.exception("checking unconfirmed jobs failed; again in %.0fs", every)
        await asyncio.sleep(every)
