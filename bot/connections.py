"""Redis connections that ride out a Redis restart, for the bot and the engine."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from arq.connections import RedisSettings
from arq.worker import Worker
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger(__name__)


def redis_settings(url: str) -> RedisSettings:
    """arq settings for ``url`` whose commands retry briefly on a dropped connection, so the
    first command after a Redis restart reconnects instead of failing."""
    settings = RedisSettings.from_dsn(url)
    settings.retry_on_error = [RedisConnectionError, RedisTimeoutError]
    settings.retry = Retry(ExponentialBackoff(cap=2.0, base=0.1), retries=5)
    return settings


async def run_worker_forever(
    worker: Worker, name: str, *, first_delay: float = 0.5, max_delay: float = 30.0
) -> None:
    """Run ``worker`` in this event loop; when Redis goes away, wait and start polling again.

    arq's poll loop ends with the first connection error; without this a Redis restart would
    silently stop deliveries (bot) or job intake (engine). Jobs and results wait in Redis (AOF
    in deployment) meanwhile, so nothing is lost, only delayed.
    """
    delay = first_delay
    while True:
        started = time.monotonic()
        try:
            await worker.async_run()
            return
        except (RedisError, OSError, EOFError) as exc:
            if time.monotonic() - started > 60:
                delay = first_delay  # it ran fine for a while: a fresh outage
            log.warning("%s lost Redis (%s); trying again in %.1fs", name, exc, delay)
        except Exception:
            # Anything else ending the poll loop would silently stop the worker: log it loudly
            # and keep serving; the jobs themselves are safe in Redis.
            log.exception("%s stopped unexpectedly; restarting in %.1fs", name, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, max_delay)


async def stop_worker(worker: Worker, task: asyncio.Task[None]) -> None:
    """Stop a worker started with ``run_worker_forever``: no new jobs, let running ones end,
    then close it. (arq's ``close()`` alone cancels jobs mid-finish and raises from them.)"""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await asyncio.gather(*worker.tasks.values(), return_exceptions=True)
    await worker.close()
