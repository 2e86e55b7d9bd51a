"""The engine's arq workers: keep the base models warm, train subjects, generate images.

Run with ``dreambot engine``. One engine process serves a training and a generation queue for
each base model it serves (and the legacy pair every engine serves, ``engine.api``), with one
worker each, all sharing one ``ctx`` built in ``startup``: a warm pipeline per configured base
model, the artifact store and the GPU scheduler that lets generations in
between training chunks. While it runs, the engine keeps a heartbeat key in Redis (see
``keep_heartbeat``) that tells the bot it is there and which models it serves.
Job functions (``engine.train_job``, ``engine.generate_job``) take ``ctx`` and a plain payload
(see ``engine.api``), run torch work in a thread, and always answer on the request's reply
queue with a result or a ``Failure`` whose message a user can read.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix
from arq.worker import Worker, get_kwargs
from redis.exceptions import RedisError

from bot.config import TINY_MODEL_FOLDERS, ConfigError, Settings, load_settings
from bot.connections import redis_settings, run_worker_forever
from engine.api import (
    ENGINE_HEARTBEAT_SECONDS,
    ENGINE_HEARTBEAT_TTL_SECONDS,
    ENGINES_KEY,
    GENERATE_QUEUE,
    TRAIN_QUEUE,
    EngineHeartbeat,
    EngineJob,
    engine_alive_key,
    engine_queues,
)
from engine.artifacts import ArtifactStore
from engine.generate_job import GENERATE_JOB_TIMEOUT, generate, showcase
from engine.gpu import GpuScheduler
from engine.rare_tokens import publish_rare_tokens
from engine.reporting import fail_payload
from engine.train_job import train_subject

log = logging.getLogger(__name__)


async def load_resources(settings: Settings) -> dict[str, Any]:
    """Load every configured base model once and build the resources every job shares.

    Every model's path is checked before any is loaded, so a typo in the configuration fails
    the start (with the path in the message) instead of the first job, and quickly. ``ctx``
    gets ``models`` (name → :class:`~engine.models.ServedModel`; jobs find theirs with
    :func:`engine.models.served_model`; the configured default comes first) and ``safety``
    (the :class:`~engine.safety.SafetyChecker` of ``DREAMBOT_SAFETY_CHECKER``, or None).
    """
    from engine.generation import Generator
    from engine.models import (
        ServedModel,
        check_model,
        default_dtype,
        load_pipeline,
        resolve_device,
    )
    from engine.safety import SafetyCheckerError, configured_checker
    from engine.tiny import build_tiny_named
    from engine.train_job import model_key

    if settings.train_optimizer == "adamw8bit":
        from engine.training import require_bitsandbytes

        try:
            require_bitsandbytes()
        except RuntimeError as exc:  # refuse to start rather than fail every training
            raise ConfigError(f"DREAMBOT_TRAIN_OPTIMIZER: {exc}") from exc
    device = resolve_device(settings.device)  # a device this torch can't use: before any model
    families = {}
    for name in settings.model_names:
        entry = settings.model_entry(name)
        source = settings.model_source(name)
        if entry.path in TINY_MODEL_FOLDERS:
            await asyncio.to_thread(build_tiny_named, entry.path, source)
        families[name] = await asyncio.to_thread(check_model, source, config=entry.config)
    # After the models' paths are checked and before they load: a wrong checker folder fails
    # the start quickly too.
    try:
        safety = await asyncio.to_thread(configured_checker, settings, device)
    except SafetyCheckerError as exc:
        raise ConfigError(f"DREAMBOT_SAFETY_CHECKER: {exc}") from exc
    # Generation hot-swaps adapters to keep a compiled UNet's graph; on the CPU the plain path.
    hotswap = (settings.lora_hotswap or settings.compile_unet) and device.startswith("cuda")
    models: dict[str, ServedModel] = {}
    for name, family in families.items():
        entry, source = settings.model_entry(name), settings.model_source(name)
        started = time.monotonic()
        pipe = await asyncio.to_thread(
            load_pipeline, source, device=device, dtype=default_dtype(device), config=entry.config
        )
        log.info(
            "loaded model '%s' (%s) from %s on %s in %.1fs",
            name,
            family.label,
            source,
            device,
            time.monotonic() - started,
        )
        generator = Generator(
            pipe,
            max_adapters=settings.adapter_cache_size,
            hotswap=hotswap,
            compile=settings.compile_unet and device.startswith("cuda"),
            fuse=settings.fuse_lora,
        )
        models[name] = ServedModel(name, source, model_key(entry.path), family, pipe, generator)
    return {
        "settings": settings,
        "artifacts": ArtifactStore(settings.artifacts),
        "models": models,
        "safety": safety,  # the SafetyChecker, or None: see engine.safety
        "device": device,
        "cache_dir": settings.data_dir / "engine-cache",
        "gpu": GpuScheduler(),
        "running_jobs": {},  # job id → EngineJob, kept by ``leased`` for the heartbeat
    }


async def startup(ctx: dict[str, Any]) -> None:
    """arq on_startup: load the shared resources unless another worker already did, then
    announce the engine (its heartbeat) once its models are warm."""
    if "models" not in ctx:
        ctx.update(await load_resources(ctx.get("settings") or load_settings()))
    if not ctx.get("rare_tokens_published"):  # once per engine, by whichever worker is first
        ctx["rare_tokens_published"] = True
        pipes = {name: model.pipe for name, model in ctx["models"].items()}
        await publish_rare_tokens(ctx["redis"], pipes)
    pruner: asyncio.Task[None] | None = ctx.get("cache_pruner")
    if pruner is None or pruner.done():
        ctx["cache_pruner"] = asyncio.create_task(keep_cache_pruned(ctx))
    heartbeat: asyncio.Task[None] | None = ctx.get("heartbeat")
    if heartbeat is None or heartbeat.done():  # a worker restarted after a Redis outage
        identity = engine_identity(ctx)
        ctx["heartbeat"] = asyncio.create_task(keep_heartbeat(ctx, identity))
        log.info(
            "engine %s on %s (pid %d, %s) serves %s",
            identity.engine_id,
            identity.host,
            identity.pid,
            identity.device,
            ", ".join(identity.models),
        )


async def shutdown(ctx: dict[str, Any]) -> None:
    """arq on_shutdown: take the engine's heartbeat down and stop pruning its cache
    (whichever worker closes first: the engine is going away); nothing else to release
    beyond memory."""
    pruner: asyncio.Task[None] | None = ctx.pop("cache_pruner", None)
    if pruner is not None:
        pruner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pruner
    await stop_heartbeat(ctx)


CACHE_PRUNE_SECONDS = 3600.0
"""How often an engine prunes its cache of remote artifacts (``ArtifactStore.prune_cache``)."""


async def keep_cache_pruned(ctx: dict[str, Any], every: float = CACHE_PRUNE_SECONDS) -> None:
    """At start and then every ``every`` seconds, delete the engine's cached copies of remote
    artifacts that are gone from the store (deleted subjects' adapters: their owners asked
    for them to go) or that no job used for a week."""
    artifacts: ArtifactStore = ctx["artifacts"]
    while True:
        try:
            removed = await asyncio.to_thread(artifacts.prune_cache, ctx["cache_dir"])
            if removed:
                log.info("engine cache: %d copies of deleted or unused artifacts removed", removed)
        except Exception:  # never let the chore end the engine; try again next time
            log.exception("engine cache: pruning failed")
        await asyncio.sleep(every)


# The engine's heartbeat. A job waiting in the queue looks the same whether an engine is about
# to take it or none is running at all; the heartbeat key tells them apart. It lives
# ENGINE_HEARTBEAT_TTL_SECONDS and is renewed every ENGINE_HEARTBEAT_SECONDS from the event
# loop (torch work runs in threads, so a long training does not stall it): an engine that dies
# without a clean shutdown drops out within one TTL.


def engine_identity(ctx: dict[str, Any]) -> EngineHeartbeat:
    """This engine's heartbeat without its running jobs: a fresh id, where it runs, the models
    (``ctx["models"]``) it serves and its safety checker's folder. Kept in ``ctx["engine"]``."""
    identity: EngineHeartbeat | None = ctx.get("engine")
    if identity is None:
        safety = ctx.get("safety")
        identity = EngineHeartbeat(
            engine_id=uuid.uuid4().hex[:8],
            host=socket.gethostname(),
            pid=os.getpid(),
            device=_device_label(ctx["device"]),
            models=list(ctx["models"]),
            safety_checker=str(safety.source) if safety is not None else None,
            started_at=datetime.now(UTC),
        )
        ctx["engine"] = identity
    return identity


def _device_label(device: str) -> str:
    if not device.startswith("cuda"):
        return device
    import torch

    try:
        return f"{device} ({torch.cuda.get_device_name(device)})"
    except (RuntimeError, AssertionError):  # no usable CUDA after all: say what was asked
        return device


async def write_heartbeat(redis: ArqRedis, heartbeat: EngineHeartbeat, ttl: float) -> None:
    """Store ``heartbeat`` under its engine's key for ``ttl`` seconds and list the engine in
    ``ENGINES_KEY``, in one transaction."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.set(
            engine_alive_key(heartbeat.engine_id), heartbeat.model_dump_json(), px=int(ttl * 1000)
        )
        pipe.sadd(ENGINES_KEY, heartbeat.engine_id)
        await pipe.execute()


async def keep_heartbeat(
    ctx: dict[str, Any],
    identity: EngineHeartbeat,
    *,
    interval: float = ENGINE_HEARTBEAT_SECONDS,
    ttl: float = ENGINE_HEARTBEAT_TTL_SECONDS,
) -> None:
    """Write this engine's heartbeat now and every ``interval`` seconds until cancelled, with
    the jobs it runs (``ctx["running_jobs"]``, kept by ``leased``). Uses ``ctx["redis"]``, the
    connection its workers share. A Redis outage is logged once and ridden out."""
    failing = False
    while True:
        running: dict[str, EngineJob] = ctx.get("running_jobs", {})
        jobs = sorted(running.values(), key=lambda job: job.started_at)
        try:
            await write_heartbeat(ctx["redis"], identity.model_copy(update={"jobs": jobs}), ttl)
        except (RedisError, OSError) as exc:
            if not failing:
                log.warning("engine %s: could not renew its heartbeat: %s", identity.engine_id, exc)
            failing = True
        else:
            if failing:
                log.info("engine %s: heartbeat renewed again", identity.engine_id)
            failing = False
        await asyncio.sleep(interval)


async def stop_heartbeat(ctx: dict[str, Any]) -> None:
    """Stop the heartbeat ``startup`` began and delete its key, so the bot stops counting this
    engine at once rather than after the key's TTL. Does nothing if none runs."""
    heartbeat: asyncio.Task[None] | None = ctx.pop("heartbeat", None)
    if heartbeat is None:
        return
    heartbeat.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await heartbeat
    identity: EngineHeartbeat | None = ctx.get("engine")
    if identity is None:
        return
    try:
        async with ctx["redis"].pipeline(transaction=True) as pipe:
            pipe.delete(engine_alive_key(identity.engine_id))
            pipe.srem(ENGINES_KEY, identity.engine_id)
            await pipe.execute()
    except (RedisError, OSError) as exc:  # its key expires on its own
        log.warning("engine %s: could not delete its heartbeat: %s", identity.engine_id, exc)


# A job's lease. arq marks a running job with an "in progress" key that keeps every other
# worker off it until the key expires; by default it lives for the job timeout (hours for a
# training), so a job whose engine died would wait that long to run again. Instead the key
# lives ``job_lease_seconds`` and the engine running the job renews it while the job runs: a
# crashed engine's job is picked up again within one lease by any engine on the queue, and
# resumes from its checkpoint.


async def _renew_lease(redis: ArqRedis, job_id: str, seconds: int) -> None:
    key = in_progress_key_prefix + job_id
    while True:
        await asyncio.sleep(seconds / 3)
        try:
            await redis.pexpire(key, seconds * 1000)
        except (RedisError, OSError) as exc:  # keep trying: the lease outlives a short outage
            log.warning("could not renew the lease of job %s: %s", job_id, exc)


JobFunction = Callable[[dict[str, Any], dict[str, Any]], Awaitable[dict[str, Any] | None]]


ENGINE_TRIES = 3
"""How many times an engine job is started (its first run, then again each time an engine died
or shut down during it) before it is answered with a Failure instead of being run again."""

GAVE_UP = (
    f"the engine stopped {ENGINE_TRIES} times while running it (it crashed or was restarted), "
    "so it was given up. Try again, and tell a moderator if it keeps happening."
)


def leased(function: JobFunction) -> JobFunction:
    """``function`` as an arq job that renews its lease (its in-progress key) while it runs,
    and is listed in ``ctx["running_jobs"]`` (what the engine's heartbeat reports) meanwhile.

    The renewal lives inside the job's own task and stops in a ``finally``, so it ends exactly
    when the job does, however it ends (result, failure, abort, shutdown); arq's on_job_end
    hook is not reached on every path. arq deletes the key as it records the outcome.

    A job started more than ``ENGINE_TRIES`` times is answered with a Failure and not run: arq
    itself would drop it past its ``max_tries`` without a word to the bot (the workers' arq
    ``max_tries`` is one more, so that this try reaches the job).
    """

    @functools.wraps(function)
    async def job(ctx: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any] | None:
        if ctx.get("job_try", 1) > ENGINE_TRIES:
            log.error(
                "job %s: cut short in each of its %d runs; given up", ctx["job_id"], ENGINE_TRIES
            )
            await fail_payload(ctx["redis"], payload, GAVE_UP)
            return None
        seconds = ctx["settings"].job_lease_seconds
        job_id = ctx["job_id"]
        renewal = asyncio.create_task(_renew_lease(ctx["redis"], job_id, seconds))
        # What the heartbeat reports as running (the dict is shared with ctx's other copies).
        running: dict[str, EngineJob] = ctx.get("running_jobs", {})
        running[job_id] = EngineJob(
            job_id=job_id, kind=function.__name__, started_at=datetime.now(UTC)
        )
        try:
            return await function(ctx, payload)
        finally:
            running.pop(job_id, None)
            renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewal

    return job


RESULT_KEPT_SECONDS = 24 * 3600
"""How long arq keeps a finished engine job's result key: as long as arq keeps an unread
message in the bot's queue (a day), so a bot back from an outage that long can still tell that
a job it could not confirm did run (``Core.settle_unconfirmed_jobs``) while its result waits in
its queue; a retry with the same job id is refused as long."""


class TrainWorkerSettings:
    """arq settings of a training worker (attributes are ``arq.Worker`` keyword arguments);
    ``engine_workers`` sets each one's queue."""

    functions = (leased(train_subject),)
    queue_name = TRAIN_QUEUE
    on_startup = startup
    on_shutdown = shutdown
    max_jobs = 1  # one training at a time per GPU (shared by all models: see engine_workers)
    job_timeout = 3 * 3600
    keep_result = RESULT_KEPT_SECONDS
    max_tries = ENGINE_TRIES + 1  # the last try only answers (see ``leased``)
    poll_delay = 0.2
    allow_abort_jobs = True


class GenerateWorkerSettings:
    """arq settings of a generation worker."""

    functions = (leased(generate), leased(showcase))
    queue_name = GENERATE_QUEUE
    on_startup = startup
    on_shutdown = shutdown
    # Several may wait for the GPU at once; each runs as one batch when its turn comes.
    max_jobs = 4
    job_timeout = GENERATE_JOB_TIMEOUT
    keep_result = RESULT_KEPT_SECONDS
    max_tries = ENGINE_TRIES + 1  # the last try only answers (see ``leased``)
    poll_delay = 0.1
    allow_abort_jobs = True


class SharedSlotsWorker(Worker):
    """An arq worker whose job slots are shared with the engine's other workers of its kind.

    An engine runs one worker per queue (each served model's, and the legacy one), but its GPU
    takes one training and a few generations at a time, whichever queues they come from. arq
    has no option for that, so this leans on one detail of ``arq.Worker`` (0.28): it takes a
    slot of ``self.sem`` before starting a job and gives it back when the job ends (or does not
    start after all). Here ``self.sem`` is one semaphore shared by the workers (arq's own has a
    spare slot beyond ``max_jobs``, and only its per-worker ``job_counter`` enforces the
    limit). ``start_jobs`` starts one job at a time and stops while the slots are all taken,
    rather than wait for one: a waiting worker would neither poll nor see aborts meanwhile.
    ``tests/test_model_queues.py`` fails if arq changes this.
    """

    def __init__(self, *, slots: asyncio.BoundedSemaphore, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sem = slots

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """Start what the shared slots allow of ``job_ids``, in order (arq's ``start_jobs``
        one job at a time)."""
        for job_id in job_ids:
            if self.job_counter >= self.max_jobs or self.sem.locked():
                return
            await super().start_jobs([job_id])


def engine_workers(
    settings: Settings, ctx: dict[str, Any] | None = None, **overrides: Any
) -> list[Worker]:
    """One engine process's workers, sharing one ``ctx``: a training and a generation worker
    for each served model's queues (``settings.model_names``), and for the legacy queues.

    The training workers share one slot (one training at a time in the engine, whatever its
    model) and the generation workers ``GenerateWorkerSettings.max_jobs`` slots."""
    shared = ctx if ctx is not None else {"settings": settings}
    connection = redis_settings(settings.redis_url)
    workers: list[Worker] = []
    plan: list[tuple[type[TrainWorkerSettings | GenerateWorkerSettings], str, dict[str, Any]]] = [
        (TrainWorkerSettings, "train", {"job_timeout": settings.job_timeout}),
        (GenerateWorkerSettings, "generate", {}),
    ]
    for worker_settings, kind, options in plan:
        slots = asyncio.BoundedSemaphore(worker_settings.max_jobs)
        for queue in engine_queues(settings.model_names, kind):
            arguments = get_kwargs(worker_settings)  # type: ignore[arg-type]
            worker = SharedSlotsWorker(
                slots=slots,
                **{
                    **arguments,
                    "queue_name": queue,
                    "redis_settings": connection,
                    "ctx": shared,
                    **options,
                    **overrides,
                },
            )
            # arq's in-progress key, renewed by leased jobs (see above); arq has no option for it.
            worker.in_progress_timeout_s = settings.job_lease_seconds
            workers.append(worker)
    return workers


async def run_engine(settings: Settings) -> None:
    """Load the models, then serve their queues (and the legacy ones) until cancelled."""
    ctx = await load_resources(settings)
    workers = engine_workers(settings, ctx, handle_signals=False)
    try:
        await asyncio.gather(
            *(run_worker_forever(worker, f"engine {worker.queue_name}") for worker in workers)
        )
    finally:
        # Cancels running jobs: a training stops at its next step and is retried (resuming
        # from its checkpoint) by whichever engine takes it next.
        for worker in workers:
            with contextlib.suppress(asyncio.CancelledError):
                await worker.close()
