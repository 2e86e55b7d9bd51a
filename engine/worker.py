"""The engine's arq workers: keep the base model warm, train subjects, generate images.

Run with ``dreambot engine``. One engine process serves two arq queues, training and
generation, with one worker each sharing one ``ctx`` built in ``startup``: the warm pipeline,
the artifact store and the GPU scheduler that lets generations in between training chunks.
Job functions (``engine.train_job``, ``engine.generate_job``) take ``ctx`` and a plain payload
(see ``engine.api``), run torch work in a thread, and always answer on the request's reply
queue with a result or a ``Failure`` whose message a user can read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from arq.connections import RedisSettings
from arq.worker import Worker, create_worker

from bot.config import TINY_MODEL, Settings, load_settings
from engine.api import GENERATE_QUEUE, TRAIN_QUEUE
from engine.artifacts import ArtifactStore
from engine.generate_job import generate
from engine.gpu import GpuScheduler
from engine.train_job import train_subject

log = logging.getLogger(__name__)


async def load_resources(settings: Settings) -> dict[str, Any]:
    """Load the base model once and build the resources every job shares."""
    from engine.generation import Generator
    from engine.models import default_dtype, load_pipeline, resolve_device
    from engine.tiny import build_tiny_model

    source = settings.base_model_source
    if settings.base_model == TINY_MODEL:
        await asyncio.to_thread(build_tiny_model, source)
    device = resolve_device(settings.device)
    started = time.monotonic()
    pipe = await asyncio.to_thread(
        load_pipeline, source, device=device, dtype=default_dtype(device)
    )
    log.info("loaded %s on %s in %.1fs", source, device, time.monotonic() - started)
    return {
        "settings": settings,
        "artifacts": ArtifactStore(settings.artifacts),
        "pipe": pipe,
        "generator": Generator(pipe),
        "device": device,
        "cache_dir": settings.data_dir / "engine-cache",
        "gpu": GpuScheduler(),
    }


async def startup(ctx: dict[str, Any]) -> None:
    """arq on_startup: load the shared resources unless another worker already did."""
    if "pipe" not in ctx:
        ctx.update(await load_resources(ctx.get("settings") or load_settings()))


async def shutdown(ctx: dict[str, Any]) -> None:
    """arq on_shutdown: nothing to release beyond memory."""


class TrainWorkerSettings:
    """arq settings of the training worker (attributes are ``arq.Worker`` keyword arguments)."""

    functions = (train_subject,)
    queue_name = TRAIN_QUEUE
    on_startup = startup
    on_shutdown = shutdown
    max_jobs = 1  # one training at a time per GPU
    job_timeout = 3 * 3600
    keep_result = 3600
    max_tries = 3
    poll_delay = 0.2
    allow_abort_jobs = True


class GenerateWorkerSettings:
    """arq settings of the generation worker."""

    functions = (generate,)
    queue_name = GENERATE_QUEUE
    on_startup = startup
    on_shutdown = shutdown
    # Several may wait for the GPU at once; each runs as one batch when its turn comes.
    max_jobs = 4
    job_timeout = 600
    keep_result = 3600
    max_tries = 3
    poll_delay = 0.1
    allow_abort_jobs = True


def engine_workers(
    settings: Settings, ctx: dict[str, Any] | None = None, **overrides: Any
) -> list[Worker]:
    """The training and generation workers of one engine process, sharing one ``ctx``."""
    shared = ctx if ctx is not None else {"settings": settings}
    redis_settings = RedisSettings.from_dsn(settings.redis_url)
    return [
        create_worker(
            TrainWorkerSettings,  # type: ignore[arg-type]
            redis_settings=redis_settings,
            job_timeout=settings.job_timeout,
            ctx=shared,
            **overrides,
        ),
        create_worker(
            GenerateWorkerSettings,  # type: ignore[arg-type]
            redis_settings=redis_settings,
            ctx=shared,
            **overrides,
        ),
    ]


async def run_engine(settings: Settings) -> None:
    """Load the model, then serve both queues until cancelled."""
    ctx = await load_resources(settings)
    workers = engine_workers(settings, ctx, handle_signals=False)
    try:
        await asyncio.gather(*(worker.async_run() for worker in workers))
    finally:
        for worker in workers:
            await worker.close()
