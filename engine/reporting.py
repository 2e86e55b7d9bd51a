"""Talking back to the bot from an engine job: progress, results, failures, cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

from arq import Retry
from arq.connections import ArqRedis
from pydantic import BaseModel, ValidationError
from redis.exceptions import RedisError

from engine.api import (
    DELIVER_FAILURE,
    DELIVER_PROGRESS,
    DELIVER_RESULT,
    Failure,
    Progress,
    cancel_key,
)
from engine.artifacts import ArtifactWriteError

log = logging.getLogger(__name__)

RequestT = TypeVar("RequestT", bound=BaseModel)


class EngineError(Exception):
    """A job failure whose message can be shown to the user as is."""


class JobCancelled(Exception):
    """A moderator (or the user) cancelled the job while it ran."""


class ProgressReporter:
    """Sends throttled ``Progress`` messages to the bot; callable from a worker thread."""

    def __init__(
        self,
        redis: ArqRedis,
        loop: asyncio.AbstractEventLoop,
        reply_queue: str,
        job_id: str,
        interval: float,
    ) -> None:
        self.redis, self.loop, self.reply_queue, self.job_id = redis, loop, reply_queue, job_id
        self.interval = interval
        self._lock = threading.Lock()
        self._sent = 0
        self._run = uuid.uuid4().hex[:8]
        self._last_sent = 0.0
        self._phase = ""
        self._phase_started = time.monotonic()
        self._phase_first_step = 0

    def __call__(
        self,
        phase: str,
        step: int = 0,
        total: int = 0,
        loss: float | None = None,
        preview_url: str | None = None,
    ) -> None:
        """Report ``step`` of ``total`` in ``phase``; sent at most every ``interval`` seconds,
        and always at a phase change, the last step, or with a preview (throttled by its
        maker).

        The ETA extrapolates the pace of the steps taken since the phase's first report, so a
        phase that starts part-way (a training resumed from its checkpoint) is not credited
        with steps it did not time.
        """
        now = time.monotonic()
        with self._lock:
            if phase != self._phase:
                self._phase, self._phase_started, self._phase_first_step = phase, now, step
            elif step < total and now - self._last_sent < self.interval and not preview_url:
                return
            eta = None
            timed = step - self._phase_first_step
            if total and step >= total:
                eta = 0.0
            elif total and timed > 0:
                eta = (now - self._phase_started) / timed * (total - step)
            self._last_sent = now
            self._sent += 1
            progress = Progress(
                job_id=self.job_id,
                phase=phase,  # type: ignore[arg-type,unused-ignore]
                step=step,
                total=total,
                eta_seconds=eta,
                loss=loss,
                preview_url=preview_url,
            )
            # Unique per run: a retried job's reporter starts counting again, and arq ignores
            # a job id it has seen (the first run's progress results are kept for a while).
            job_key = f"{self.job_id}:progress:{self._run}:{self._sent}"
        coro = self.redis.enqueue_job(
            DELIVER_PROGRESS,
            progress.model_dump(),
            _job_id=job_key,
            _queue_name=self.reply_queue,
            _expires=600,
        )
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            self.loop.create_task(coro)
        else:
            asyncio.run_coroutine_threadsafe(coro, self.loop)


ANSWER_RETRY_SECONDS = 120.0
"""How long a job keeps trying to send its answer while Redis does not take it (a restart, a
network cut; the job's lease is renewed meanwhile) before it hands itself back to arq."""

ANSWER_RETRY_DEFER_SECONDS = 30.0
"""How long arq waits before running again a job whose answer could not be sent."""


async def reply(
    redis: ArqRedis,
    function: str,
    reply_queue: str,
    job_id: str,
    payload: dict[str, Any],
    *,
    retry_for: float = ANSWER_RETRY_SECONDS,
) -> None:
    """Enqueue a bot job answering ``job_id``; its arq id makes a repeated answer a no-op.

    The answer is all the user gets of the job's work, so while Redis does not take it, it is
    tried again for ``retry_for`` seconds. After that arq's ``Retry`` is raised: arq then runs
    the job again later (a training answers from its finished adapter) instead of recording
    it as done with its answer lost.
    """
    deadline = time.monotonic() + retry_for
    delay = 0.5
    while True:
        try:
            await redis.enqueue_job(
                function, payload, _job_id=f"{job_id}:{function}", _queue_name=reply_queue
            )
            return
        except (RedisError, OSError) as exc:
            if time.monotonic() + delay > deadline:
                log.error("job %s: could not send its answer, it will run again: %s", job_id, exc)
                raise Retry(defer=ANSWER_RETRY_DEFER_SECONDS) from exc
            log.warning(
                "job %s: could not send its answer (%s); trying again in %.1fs", job_id, exc, delay
            )
        await asyncio.sleep(delay)
        delay = min(delay * 2, 10.0)


async def send_result(redis: ArqRedis, reply_queue: str, job_id: str, result: Any) -> None:
    """Answer with a result model."""
    await reply(redis, DELIVER_RESULT, reply_queue, job_id, result.model_dump())


async def send_failure(redis: ArqRedis, reply_queue: str, job_id: str, exc: BaseException) -> None:
    """Answer with a ``Failure``: the message of an EngineError, else a short apology."""
    if isinstance(exc, EngineError):
        message = str(exc)
    elif isinstance(exc, JobCancelled):
        message = "it was cancelled."
    elif _out_of_memory(exc):
        log.warning("job %s: out of GPU memory: %s", job_id, exc)
        message = OUT_OF_MEMORY
    elif isinstance(exc, ArtifactWriteError):
        log.error("job %s: the artifact store refused a write", job_id, exc_info=exc)
        message = STORE_REFUSED
    else:
        log.error("job %s failed", job_id, exc_info=exc)
        message = (
            f"the engine hit an internal error (job {job_id}). It is logged; try again, and "
            "tell a moderator if it keeps happening."
        )
    failure = Failure(job_id=job_id, message=message, detail=repr(exc)[:2000])
    await reply(redis, DELIVER_FAILURE, reply_queue, job_id, failure.model_dump())


OUT_OF_MEMORY = (
    "the GPU ran out of memory (another job may have been using it). Try again in a few "
    "minutes; for pictures, fewer images (count) or a smaller shape help. Tell a moderator if "
    "it keeps happening: gradient checkpointing (DREAMBOT_TRAIN_GRADIENT_CHECKPOINTING) or "
    "DREAMBOT_FUSE_LORA=false save memory."
)


STORE_REFUSED = (
    "the engine could not save its files (the artifact store may be full or read-only), so "
    "the job did not finish. Try again later, and tell a moderator if it keeps happening."
)

UNREADABLE_REQUEST = (
    "the engine could not read this request (the bot and the engine may be of different "
    "releases), so nothing was done. Tell a moderator."
)


async def read_request(redis: ArqRedis, model: type[RequestT], payload: Any) -> RequestT | None:
    """``payload`` as a ``model`` request; None once a request the engine cannot read (a bot
    of another release sent it) is answered with a Failure instead of being dropped."""
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        log.error("unreadable %s: %s", model.__name__, exc)
        await fail_payload(redis, payload, UNREADABLE_REQUEST, detail=str(exc))
        return None


async def fail_payload(redis: ArqRedis, payload: Any, message: str, detail: str = "") -> None:
    """Answer the job that ``payload`` (an engine job's raw argument) asks for with a
    ``Failure``, reading only its job id and reply queue; a payload without them can only be
    logged."""
    named = payload if isinstance(payload, dict) else {}
    job_id, reply_queue = named.get("job_id"), named.get("reply_queue")
    if not isinstance(job_id, str) or not isinstance(reply_queue, str):
        log.error("cannot answer a request that names no job or reply queue: %.500r", payload)
        return
    failure = Failure(job_id=job_id, message=message, detail=detail[:2000])
    await reply(redis, DELIVER_FAILURE, reply_queue, job_id, failure.model_dump())


def _out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError)


def release_gpu_memory() -> None:
    """Give the CUDA caching allocator's free blocks back after a failed job, so that what a
    job that ran out of memory held is not kept from the next one (no-op without CUDA)."""
    import torch

    if torch.cuda.is_available():  # empty_cache does nothing before CUDA is first used
        torch.cuda.empty_cache()


class JobRequest(Protocol):
    """What a job's payload names so that it can be answered: the job and the reply queue."""

    @property
    def job_id(self) -> str: ...

    @property
    def reply_queue(self) -> str: ...


def job_reporter(ctx: dict[str, Any], request: JobRequest) -> ProgressReporter:
    """The progress reporter for a job run on the worker's loop, at the configured interval."""
    return ProgressReporter(
        ctx["redis"],
        asyncio.get_running_loop(),
        request.reply_queue,
        request.job_id,
        ctx["settings"].progress_interval,
    )


TIME_LIMIT_MARGIN = 15.0
"""Seconds before arq's job timeout at which a job stops itself and answers (see answer_job)."""


async def answer_job(
    redis: ArqRedis,
    request: JobRequest,
    work: Callable[[], Awaitable[BaseModel]],
    on_failure: Callable[[], Awaitable[None]] | None = None,
    *,
    time_limit: float | None = None,
) -> dict[str, Any] | None:
    """Run a job's work and answer the bot with its result, or with a ``Failure`` (then run
    ``on_failure``). Return what arq stores as the job's result: the result's dict, or None.

    An abort by arq (``asyncio.CancelledError``) is not answered: the bot has told the owner.
    An answer Redis does not take is tried again, then the job handed back to arq (``reply``).
    ``time_limit`` should end the work a little before arq's own job timeout: arq's timeout
    arrives as a cancellation that would go unanswered (and arq does not retry it), while
    this one is answered with a ``Failure`` the user can read.
    """
    try:
        try:
            async with asyncio.timeout(time_limit):
                result = await work()
        except TimeoutError as exc:
            minutes = (time_limit or 0) / 60
            raise EngineError(
                f"it ran longer than the engine's limit of {minutes:.0f} minutes and was "
                "stopped. Try fewer steps or images, or ask a moderator to raise the limit."
            ) from exc
    except Exception as exc:
        await send_failure(redis, request.reply_queue, request.job_id, exc)
        out_of_memory = _out_of_memory(exc)
        del exc  # its traceback holds the failed job's tensors
        if out_of_memory:
            release_gpu_memory()
        if on_failure is not None:
            await on_failure()
        return None
    await send_result(redis, request.reply_queue, request.job_id, result)
    return result.model_dump()


class CancelWatch:
    """Whether a running job was cancelled, readable from the job's torch thread.

    Set when the job's cancel key appears in Redis (``/mod cancel``) or when arq aborts the
    job's task; the training loop checks it between steps.
    """

    def __init__(self) -> None:
        self.event = threading.Event()

    @property
    def cancelled(self) -> bool:
        """True once the job should stop."""
        return self.event.is_set()

    def raise_if_cancelled(self) -> None:
        """Raise JobCancelled if the job should stop."""
        if self.event.is_set():
            raise JobCancelled

    @contextlib.asynccontextmanager
    async def watching(
        self, redis: ArqRedis, job_id: str, every: float = 1.0
    ) -> AsyncIterator[CancelWatch]:
        """Poll the job's cancel key while the block runs.

        A Redis error only skips one poll. When the block ends the poll is asked to stop and
        awaited (for a few seconds at most) rather than cancelled mid-command, which could
        leave a half-opened Redis connection behind.
        """
        stop = asyncio.Event()

        async def poll() -> None:
            while not (self.event.is_set() or stop.is_set()):
                try:
                    if await redis.exists(cancel_key(job_id)):
                        self.event.set()
                        return
                except (RedisError, OSError) as exc:
                    log.warning("could not read the cancel key of job %s: %s", job_id, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), every)

        task = asyncio.create_task(poll())
        try:
            yield self
        finally:
            stop.set()
            try:
                await asyncio.wait_for(asyncio.shield(task), 5)
            except TimeoutError:  # Redis hangs: give up on the poll
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task


async def cancel_requested(redis: ArqRedis, job_id: str) -> bool:
    """Whether the job's cancel key is set: a moderator (or the user) stopped it for good, as
    opposed to an engine shutting down (the job is then run again). False when Redis cannot
    be asked."""
    try:
        return bool(await redis.exists(cancel_key(job_id)))
    except (RedisError, OSError) as exc:
        log.warning("could not read the cancel key of job %s: %s", job_id, exc)
        return False


async def run_in_thread(watch: CancelWatch, function: Any, *args: Any, **kwargs: Any) -> Any:
    """Run blocking torch work in a thread. If arq aborts the job meanwhile, tell the thread
    to stop (it checks ``watch`` between steps) and wait for it before re-raising, so two
    torch jobs never overlap on the GPU."""
    task = asyncio.ensure_future(asyncio.to_thread(function, *args, **kwargs))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        watch.event.set()
        with contextlib.suppress(BaseException):
            await task
        raise
