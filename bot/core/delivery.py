"""Results coming back from the engine, delivered to the chat that asked for them.

The engine enqueues ``deliver_progress``/``deliver_result``/``deliver_failure`` jobs onto the
bot's own arq queue; the bot consumes that queue inside its event loop. Results therefore wait
safely in Redis while the bot is down and are posted once (``Store.begin_delivery``); one cut off
by a hard kill mid-post is posted after the restart, perhaps twice (at least once, never lost).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

from arq.connections import ArqRedis
from arq.worker import Retry, Worker, func

from bot.core.commands import Core
from bot.core.store import Job
from engine.api import (
    DELIVER_FAILURE,
    DELIVER_PROGRESS,
    DELIVER_RESULT,
    Failure,
    GenerateResult,
    Progress,
    TrainResult,
    bot_queue,
)

log = logging.getLogger(__name__)

PHASE_LABELS = {
    "queued": "waiting for the engine",
    "loading": "loading",
    "class-priors": "preparing class images",
    "training": "training",
    "sampling": "drawing samples",
    "generating": "drawing",
}


@dataclass(frozen=True)
class Delivery:
    """A finished job, ready for an adapter to post."""

    job: Job
    text: str
    image_urls: list[str]


class Sink(Protocol):
    """What an adapter implements to show engine updates in its chat."""

    async def show_progress(self, job: Job, text: str, progress: Progress) -> None:
        """Show or update the job's progress message (``progress.preview_url``, when set, is
        the artifact URL of a small preview of the image being drawn)."""

    async def show_result(self, delivery: Delivery) -> None:
        """Post the final result (text and images) where the job was asked for."""

    async def show_failure(self, job: Job, text: str) -> None:
        """Tell the user the job failed and what to do."""


def progress_bar(fraction: float, width: int = 16) -> str:
    """A text progress bar such as ``████████░░░░░░░░``."""
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return "█" * filled + "░" * (width - filled)


def format_eta(seconds: float) -> str:
    """``m:ss`` (or ``h:mm:ss``) for a duration in seconds."""
    whole = max(0, round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def progress_text(progress: Progress, label: str) -> str:
    """One line of progress: phase, bar, step/total, ETA."""
    phase = PHASE_LABELS.get(progress.phase, progress.phase)
    text = f"{label}: {phase}"
    if progress.total:
        text += f" {progress_bar(progress.step / progress.total)} {progress.step}/{progress.total}"
    if progress.eta_seconds is not None:
        text += f" · ETA {format_eta(progress.eta_seconds)}"
    if progress.phase == "queued" and progress.position is not None:
        text += f" (position {progress.position})"
    return text


class Deliverer:
    """Turns engine messages into store updates and calls to the adapter's sink."""

    def __init__(self, core: Core, sink: Sink) -> None:
        self.core = core
        self.sink = sink
        self._last_progress: dict[str, tuple[int, int, int, float]] = {}

    async def _label(self, job: Job) -> str:
        if job.kind == "train" and job.subject_id:
            subject = await self.core.store.get_subject(job.subject_id)
            return subject.name if subject else "training"
        if job.options.get("showcase"):
            return f"showcase of {job.options['showcase']}"
        return "your image"

    async def progress(self, payload: dict[str, Any]) -> None:
        """Handle a ``Progress`` message."""
        progress = Progress.model_validate(payload)
        job = await self.core.store.get_job(progress.job_id)
        if job is None or job.finished:
            return
        # Progress jobs may be handled out of order; never move a bar backwards. A preview
        # comes right after the plain update of its step, so it ranks just above it. While
        # a job waits, moving up the queue is progress; anything from the engine ranks above.
        phase_order = list(PHASE_LABELS).index(progress.phase)
        step = -progress.position if progress.position is not None else progress.step
        key = (phase_order, step, int(progress.preview_url is not None))
        last = self._last_progress.get(job.id)
        if last is not None and key <= last[:3]:
            return
        self._last_progress[job.id] = (*key, time.monotonic())
        if job.status == "queued" and progress.phase != "queued":
            await self.core.store.start_job(job.id)
        await self.sink.show_progress(
            job, progress_text(progress, await self._label(job)), progress
        )

    async def show_queue_positions(self) -> None:
        """Tell each job still waiting for an engine where it now stands in its queue, when
        that changed since it was last told (by its receipt, or an earlier call; a job queued
        before this process started is told once anyway). Also forgets what it kept about
        jobs that ended without a delivery here (cancelled by their owner)."""
        unfinished = await self.core.store.unfinished_jobs(self.core.platform)
        open_jobs = {job.id for job in unfinished}
        for job_id in [job_id for job_id in self._last_progress if job_id not in open_jobs]:
            del self._last_progress[job_id]
        positions = await self.core.queue_positions(unfinished)
        told = self.core.told_positions
        for job_id in [job_id for job_id in told if job_id not in positions]:
            del told[job_id]  # started, finished or gone: the engine's updates take over
        for job_id, position in positions.items():
            receipt = told.pop(job_id, None)
            if receipt is not None and job_id not in self._last_progress:
                self._last_progress[job_id] = (0, -receipt, 0, time.monotonic())
            await self.progress(
                Progress(job_id=job_id, phase="queued", position=position).model_dump()
            )

    async def result(self, payload: dict[str, Any]) -> None:
        """Handle a ``TrainResult`` or ``GenerateResult``."""
        job = await self.core.store.get_job(payload["job_id"])
        if job is None:
            log.warning("result for unknown job %s dropped", payload["job_id"])
            return
        if job.delivered_at:
            return
        # Done unless cancelled, before or just now (a cancel handled beside this result is
        # settled in one UPDATE): finished anyway after its owner, a moderator or a ban
        # cancelled it (a race, or an engine that can't stop mid-run), the owner was told it
        # was cancelled, so post nothing.
        if job.status == "cancelled" or not await self.core.store.complete_job(job.id, payload):
            log.info("result for cancelled job %s dropped", job.id)
            return
        if job.kind == "train":
            train = TrainResult.model_validate(payload)
            subject = await self.core.store.get_subject(train.subject_id)
            if subject is None:
                # Forgotten while training: don't resurrect its files.
                await self.core.artifacts.adelete_tree(
                    self.core.artifacts.url("subjects", train.subject_id)
                )
                text, images = (
                    "A subject was forgotten while it trained; its files are deleted.",
                    [],
                )
            else:
                await self.core.store.update_subject(
                    subject.id, status="ready", adapter_url=train.adapter_url, error=None
                )
                text = (
                    f"{subject.name} is ready — try /imagine a [V] {subject.class_noun} "
                    f"on the beach  ({train.steps} steps in {format_eta(train.seconds)})"
                )
                images = train.sample_urls
        else:
            generated = GenerateResult.model_validate(payload)
            text = (
                f"“{job.prompt}” · seed {generated.seed} · {generated.width}×{generated.height}"
                f" · {generated.steps} steps in {generated.seconds:.1f}s"
            )
            images = generated.image_urls
        await self._deliver_once(job, lambda: self.sink.show_result(Delivery(job, text, images)))

    async def failure(self, payload: dict[str, Any]) -> None:
        """Handle a ``Failure``."""
        failure = Failure.model_validate(payload)
        job = await self.core.store.get_job(failure.job_id)
        if job is None or job.delivered_at:
            return
        if job.status == "cancelled":
            # The moderator's notice (or the engine reporting the abort): say it once, in the
            # words the cancelling moderation action chose. Its units were already refunded.
            text = job.error or "Your job was cancelled."
            await self._deliver_once(job, lambda: self.sink.show_failure(job, text))
            return
        if job.kind == "train" and job.subject_id:
            subject = await self.core.store.get_subject(job.subject_id)
            if subject is not None:
                await self.core.store.update_subject(
                    subject.id, status="failed", error=failure.message
                )
            name = subject.name if subject else "the subject"
            text = f"Training {name} failed: {failure.message}"
        else:
            text = f"Your image could not be drawn: {failure.message}"
        await self.core.store.update_job(job.id, status="failed", error=failure.message)
        # The user didn't get what they spent quota on, so they get it back (idempotent, so
        # a retried delivery refunds once).
        await self.core.quotas.refund(job.id, "failed")
        await self._deliver_once(job, lambda: self.sink.show_failure(job, text))

    async def _deliver_once(self, job: Job, send: Any) -> None:
        # Claimed and marked in flight together: a process killed mid-post leaves the mark,
        # and the next one unclaims the job at start-up (``reopen_deliveries``), so arq's
        # re-run of this delivery job posts it. At least once: a post that went out just
        # before the kill goes out again.
        if not await self.core.store.begin_delivery(job.id):
            return
        self._last_progress.pop(job.id, None)
        try:
            await send()
        except Exception as exc:
            # Let arq retry the delivery later rather than lose the result.
            await self.core.store.abandon_delivery(job.id)
            log.exception("delivery of job %s failed; will retry", job.id)
            raise Retry(defer=10) from exc
        except asyncio.CancelledError:
            # arq runs a job cancelled mid-post again: unclaimed, so that run posts it.
            await self.core.store.abandon_delivery(job.id)
            raise
        await self.core.store.end_delivery(job.id)

    async def reopen_deliveries(self) -> None:
        """Unclaim the deliveries an earlier process of this platform left in flight (killed
        mid-post), so that arq's re-run of their delivery jobs posts them. Run at start-up,
        before the delivery worker: arq re-runs a job whose worker died only once its
        in-progress key expires (the worker's job timeout + 10 s), so that re-run comes after."""
        reopened = await self.core.store.abandon_deliveries_in_flight(self.core.platform)
        if reopened:
            log.warning("%d deliveries were cut off mid-post; they will be posted again", reopened)


async def _deliver_progress(ctx: dict[str, Any], payload: dict[str, Any]) -> None:
    await ctx["deliverer"].progress(payload)


async def _deliver_result(ctx: dict[str, Any], payload: dict[str, Any]) -> None:
    await ctx["deliverer"].result(payload)


async def _deliver_failure(ctx: dict[str, Any], payload: dict[str, Any]) -> None:
    await ctx["deliverer"].failure(payload)


def delivery_worker(deliverer: Deliverer, pool: ArqRedis, platform: str) -> Worker:
    """The arq worker that the bot runs inside its own event loop (``await worker.async_run()``)."""
    return Worker(
        functions=[
            func(_deliver_progress, name=DELIVER_PROGRESS, max_tries=1),
            func(_deliver_result, name=DELIVER_RESULT, max_tries=20),
            func(_deliver_failure, name=DELIVER_FAILURE, max_tries=20),
        ],
        queue_name=bot_queue(platform),
        redis_pool=pool,
        ctx={"deliverer": deliverer},
        handle_signals=False,
        poll_delay=0.2,
        max_jobs=4,
        keep_result=3600,
        log_results=False,
    )
