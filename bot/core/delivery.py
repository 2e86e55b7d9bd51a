"""Results coming back from the engine, delivered to the chat that asked for them.

The engine enqueues ``deliver_progress``/``deliver_result``/``deliver_failure`` jobs onto the
bot's own arq queue; the bot consumes that queue inside its event loop. Results therefore wait
safely in Redis while the bot is down and are posted once (``Store.begin_delivery``). A post
that fails, or takes longer than ``Settings.delivery_timeout``, is tried again later, up to
``DELIVERY_TRIES`` times in all; the last try that fails tells the user instead. A result
posted as several messages is posted part by part (``PostedParts``): a try after a failure
posts only the parts not yet in the chat. One cut off by a hard kill mid-post is posted after
the restart, its message under way perhaps twice (at least once, never lost). When the channel
refuses a result (or the rest of one), the adapter sends it by DM instead, the DM's first
message carrying the text again with a line saying why it came there (``PostedParts.by_dm``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from arq.connections import ArqRedis
from arq.worker import Retry, Worker, func

from bot.core.commands import SHOWCASE_CELLS, Core, Redraw, images_label
from bot.core.moderation import draws_images, withheld_phrase
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

DELIVERY_TRIES = 20
"""How many times arq runs a result's (or a failure's) delivery job before giving up."""
RETRY_DELAY = 10.0
"""Seconds before a failed (or timed-out) delivery is tried again."""
GIVE_UP_SECONDS = 45.0
"""How long the last try may take to tell the user, once the post itself has failed; arq's own
time limit is the delivery's plus this and a margin, so arq never cuts a delivery off (it would
drop it without a word)."""

TEXT_PART = "text"
"""A result's text, as a ``PostedParts`` name (the first message carries it)."""
BUTTONS_PART = "buttons"
"""A result's Reroll / Vary / Upscale buttons, when they go in a message of their own."""
DM_TEXT_PART = "text:dm"
"""A result's text as sent by DM once its channel refused it (``PostedParts.by_dm``)."""


def file_part(name: str) -> str:
    """A result's file, by name, as a ``PostedParts`` name."""
    return f"file:{name}"


class PostedParts:
    """Which parts of one result are in the chat already: its text (``TEXT_PART``), each file
    (``file_part``) and its buttons (``BUTTONS_PART``).

    An adapter that posts a result as several messages skips what this holds and ``add``s what
    each message carried once it is posted; so when a later message fails and the delivery
    runs again, only the rest is posted. The deliverer's come from the store and are recorded
    there as they are added (migration 0007); a bare one is kept in memory only.

    ``text`` names the part the text is recorded as where these parts are being posted:
    ``TEXT_PART`` in the job's channel, ``DM_TEXT_PART`` in the DM that replaces it.
    """

    def __init__(
        self,
        posted: Iterable[str] = (),
        record: Callable[[Sequence[str]], Awaitable[None]] | None = None,
        *,
        text: str = TEXT_PART,
    ) -> None:
        self._posted = set(posted)
        self._record = record
        self.text = text

    def by_dm(self) -> PostedParts:
        """The same parts, for posting the rest of the result by DM once its channel refused
        it: a file or the buttons posted in either place are not posted again, but the text
        counts only once it went by DM, so that the DM's first message carries it and stands
        on its own. What is added to one is added to both (and recorded as before)."""
        view = PostedParts(record=self._record, text=DM_TEXT_PART)
        view._posted = self._posted  # shared, not copied
        return view

    def __contains__(self, part: object) -> bool:
        return part in self._posted

    def __bool__(self) -> bool:
        return bool(self._posted)

    def unposted(self, files: Sequence[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        """The ``(name, data)`` files not posted yet, in order."""
        return [(name, data) for name, data in files if file_part(name) not in self._posted]

    async def add(self, *parts: str) -> None:
        """Record that these parts are now in the chat."""
        new = [part for part in dict.fromkeys(parts) if part not in self._posted]
        if new and self._record is not None:
            await self._record(new)
        self._posted.update(new)


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
    parts: PostedParts = field(default_factory=PostedParts)
    """What an earlier try of this delivery already posted: post the rest, and add to it."""


class Sink(Protocol):
    """What an adapter implements to show engine updates in its chat."""

    async def show_progress(self, job: Job, text: str, progress: Progress) -> None:
        """Show or update the job's progress message (``progress.preview_url``, when set, is
        the artifact URL of a small preview of the image being drawn)."""

    async def show_result(self, delivery: Delivery) -> None:
        """Post the final result (text and images) where the job was asked for: only the parts
        ``delivery.parts`` lacks, adding each part to it as soon as it is posted."""

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
        return images_label(draws_images(job))

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

    async def result(self, payload: dict[str, Any], *, last_try: bool = False) -> None:
        """Handle a ``TrainResult`` or ``GenerateResult``. On the ``last_try`` a post that
        fails is replaced by a note saying so."""
        job = await self.core.store.get_job(payload["job_id"])
        if job is None:
            log.warning("result for unknown job %s dropped", payload["job_id"])
            return
        if job.delivered_at:
            return
        if job.data_deleted_at is not None:
            # Its owner deleted their data while an earlier try was posting it (that try
            # failed: its images are gone too): nothing of it may be posted any more.
            log.info("result for job %s dropped: its data was deleted", job.id)
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
                took = f"{train.steps} steps in {format_eta(train.seconds)}"
                text = await self.core.ready_text(subject, took)
                images = train.sample_urls
                if train.withheld:
                    # The training itself succeeded: nothing is refunded, moderators are told.
                    await self.core.store.record_withheld(
                        job, "samples", train.withheld, total=None, prompt=subject.name
                    )
                    text += f"\n{samples_withheld_note(train.withheld)}"
        else:
            generated = GenerateResult.model_validate(payload)
            if generated.withheld:
                await self._record_withheld(job, generated)
            text = result_text(job, generated)
            images = generated.image_urls
        await self._deliver_once(
            job,
            lambda parts: self.sink.show_result(Delivery(job, text, images, parts)),
            last_try,
            note=functools.partial(_not_posted_note, job),
        )

    async def _record_withheld(self, job: Job, generated: GenerateResult) -> None:
        """Log the images (a showcase: grid cells) the safety checker withheld, for moderators,
        and give their units back (one per image or cell), once however often the delivery
        is tried."""
        showcase = job.options.get("showcase")
        await self.core.store.record_withheld(
            job,
            "showcase" if showcase else "images",
            generated.withheld,
            total=_withheld_total(job, generated),
            prompt=str(showcase or job.prompt or ""),
            negative_prompt=str(job.options.get("negative_prompt") or ""),
            refund=generated.withheld,
        )

    async def failure(self, payload: dict[str, Any], *, last_try: bool = False) -> None:
        """Handle a ``Failure``. On the ``last_try`` a post that fails is logged and given up."""
        failure = Failure.model_validate(payload)
        job = await self.core.store.get_job(failure.job_id)
        if job is None or job.delivered_at:
            return
        if job.status == "cancelled":
            # The moderator's notice (or the engine reporting the abort): say it once, in the
            # words the cancelling moderation action chose. Its units were already refunded.
            text = job.error or "Your job was cancelled."
            await self._deliver_once(job, lambda _: self.sink.show_failure(job, text), last_try)
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
        await self._deliver_once(job, lambda _: self.sink.show_failure(job, text), last_try)

    async def _deliver_once(
        self,
        job: Job,
        post: Callable[[PostedParts], Awaitable[None]],
        last_try: bool = False,
        *,
        note: Callable[[PostedParts, bool], str] | None = None,
    ) -> None:
        """Claim the job's delivery and ``post`` it within ``delivery_timeout``, with the
        parts an earlier try posted. A post that fails or times out is tried again later
        (arq's ``Retry``), unless this is the ``last_try``: then the user gets the ``note``
        (given what was posted, and whether it timed out), if there is one, and it is logged."""
        # Claimed and marked in flight together: a process killed mid-post leaves the mark,
        # and the next one unclaims the job at start-up (``reopen_deliveries``), so arq's
        # re-run of this delivery job posts it. At least once: a message that went out just
        # before the kill goes out again.
        store = self.core.store
        if not await store.begin_delivery(job.id):
            return
        self._last_progress.pop(job.id, None)
        parts = PostedParts(
            await store.posted_parts(job.id), functools.partial(store.record_posted_parts, job.id)
        )
        deadline = asyncio.timeout(self.core.settings.delivery_timeout)
        try:
            async with deadline:
                await post(parts)
        except Exception as exc:
            # Our own deadline comes out as TimeoutError (the post was cancelled), told apart
            # from a platform library's timeouts, which are failures like any other.
            timed_out = deadline.expired()
            limit = self.core.settings.delivery_timeout
            why = f" (took longer than {limit:g} s)" if timed_out else ""
            if last_try:
                log.exception("delivery of job %s failed on its last try%s", job.id, why)
                if note is not None:
                    await self._tell(job, note(parts, timed_out))
                await store.end_delivery(job.id)  # stays claimed: nothing more is posted
                return
            # Unclaimed, so that arq's next try posts it (the parts posted so far are kept).
            await store.abandon_delivery(job.id)
            log.exception("delivery of job %s failed%s; will retry", job.id, why)
            raise Retry(defer=RETRY_DELAY) from exc
        except asyncio.CancelledError:
            # arq runs a job cancelled mid-post (the bot stopping) again: unclaimed, so that
            # run posts it.
            await store.abandon_delivery(job.id)
            raise
        await store.end_delivery(job.id)

    async def _tell(self, job: Job, text: str) -> None:
        """Post a note about a job whose result could not be posted (within
        ``GIVE_UP_SECONDS``; logged if that fails too)."""
        try:
            async with asyncio.timeout(GIVE_UP_SECONDS):
                await self.sink.show_failure(job, text)
        except Exception:
            log.exception("job %s: the note that its result was not posted failed too", job.id)

    async def reopen_deliveries(self) -> None:
        """Unclaim the deliveries an earlier process of this platform left in flight (killed
        mid-post), so that arq's re-run of their delivery jobs posts them. Run at start-up,
        before the delivery worker: arq re-runs a job whose worker died only once its
        in-progress key expires (the worker's job timeout + 10 s), so that re-run comes after."""
        reopened = await self.core.store.abandon_deliveries_in_flight(self.core.platform)
        if reopened:
            log.warning("%d deliveries were cut off mid-post; they will be posted again", reopened)


def result_text(job: Job, generated: GenerateResult) -> str:
    """An image result's text: ``“prompt” · seed 7 · 512×512 · 25 steps in 3.1s``, with what
    a Vary or an Upscale did after the prompt, and what the safety filter withheld after it
    all (given back to the quota). With every image withheld, why nothing is posted."""
    redraw = Redraw.from_options(job.options)
    total = _withheld_total(job, generated)
    head = [f"“{job.prompt}”"]
    if redraw is not None:
        head.append(redraw.caption(total))
    showcase = bool(job.options.get("showcase"))
    if generated.withheld and not generated.image_urls and not showcase:
        what = withheld_phrase("images", generated.withheld, total)
        them = "it is" if total == 1 else "they are"
        if redraw is None or not redraw.plain_resize:
            head.append(f"seed {generated.seed}")
        return (
            f"{' · '.join(head)}: the safety filter withheld {what}, so nothing is posted; "
            f"{them} given back to your quota. Try another prompt."
        )
    size = f"{generated.width}×{generated.height}"
    if redraw is not None and redraw.plain_resize:
        # Nothing was drawn: no seed or steps to speak of.
        tail = [f"{size} in {generated.seconds:.1f}s"]
    else:
        tail = [
            f"seed {generated.seed}",
            size,
            f"{generated.steps} steps in {generated.seconds:.1f}s",
        ]
    text = " · ".join([*head, *tail])
    if generated.withheld:
        what = withheld_phrase("showcase" if showcase else "images", generated.withheld, total)
        grey = "grey tiles; " if showcase else ""
        text += f" · {what} withheld by the safety filter ({grey}given back to your quota)"
    return text


def samples_withheld_note(withheld: int) -> str:
    """The line a training's ready message adds when the safety filter withheld cells of its
    sample grid (nothing is refunded: the training itself succeeded)."""
    return (
        f"The safety filter withheld {withheld_phrase('samples', withheld, None)} of the "
        "sample grid (the grey tiles)."
    )


def _withheld_total(job: Job, generated: GenerateResult) -> int:
    """How many images (a showcase: grid cells) the job drew, withheld ones included."""
    if job.options.get("showcase"):
        return SHOWCASE_CELLS
    return len(generated.image_urls) + generated.withheld


def _not_posted_note(job: Job, parts: PostedParts, timed_out: bool) -> str:
    """What the user is told when the last try at posting a job's result failed."""
    why = "it took too long" if timed_out else "the chat platform did not take it"
    if parts:
        return (
            f"Your result is ready (job {job.id[:8]}), but posting the rest of it here kept "
            f"failing ({why}), so it is not all shown. dreambot keeps it."
        )
    return (
        f"Your result is ready (job {job.id[:8]}), but posting it here kept failing ({why}), "
        "so it is not shown. dreambot keeps it."
    )


async def _deliver_progress(ctx: dict[str, Any], payload: dict[str, Any]) -> None:
    await ctx["deliverer"].progress(payload)


async def _deliver_result(ctx: dict[str, Any], payload: dict[str, Any]) -> None:
    await ctx["deliverer"].result(payload, last_try=ctx["job_try"] >= DELIVERY_TRIES)


async def _deliver_failure(ctx: dict[str, Any], payload: dict[str, Any]) -> None:
    await ctx["deliverer"].failure(payload, last_try=ctx["job_try"] >= DELIVERY_TRIES)


def delivery_worker(deliverer: Deliverer, pool: ArqRedis, platform: str) -> Worker:
    """The arq worker that the bot runs inside its own event loop (``await worker.async_run()``).

    Its job time limit is the delivery's own (``delivery_timeout``) plus ``GIVE_UP_SECONDS``
    and a margin: the deliverer stops a post that runs long and has it tried again, or tells
    the user; arq would fail the job on its TimeoutError and never run it again. A worker that
    dies mid-job leaves its in-progress key for this limit + 10 s, so a killed bot's cut-off
    delivery runs again that long after the kill.
    """
    job_timeout = deliverer.core.settings.delivery_timeout + GIVE_UP_SECONDS + 15
    return Worker(
        functions=[
            func(_deliver_progress, name=DELIVER_PROGRESS, max_tries=1),
            func(_deliver_result, name=DELIVER_RESULT, max_tries=DELIVERY_TRIES),
            func(_deliver_failure, name=DELIVER_FAILURE, max_tries=DELIVERY_TRIES),
        ],
        queue_name=bot_queue(platform),
        redis_pool=pool,
        ctx={"deliverer": deliverer},
        handle_signals=False,
        poll_delay=0.2,
        max_jobs=4,
        job_timeout=job_timeout,
        keep_result=3600,
        log_results=False,
    )
