"""What the chat adapters (Discord, Slack) do alike, with no platform in it: answering a
command with its text or its error, each job's one progress message, a result's files."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

from bot.adapters.throttle import EditThrottle
from bot.core.commands import Receipt
from bot.core.delivery import Delivery, PostedParts
from bot.core.errors import UserError
from bot.core.store import Job, Store
from engine.artifacts import ArtifactStore

log = logging.getLogger(__name__)

Ref = TypeVar("Ref")
"""How a platform names a message: Discord's message id, Slack's ``ts``."""

Post = Callable[[str, dict[str, Any], str], Awaitable[Ref | None]]
"""Post a job's progress message (job id, destination, text); None if the channel refuses."""


def fit(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, marked with an ellipsis when cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


MAX_REPLY_PARTS = 5
"""How many messages one command's reply may take: a Slack ``response_url`` takes five."""
FENCE = "```"
_LEFT_OUT_ROOM = 60  # kept free in the last part for the note on what was left out


def split_text(text: str, limit: int, max_parts: int = MAX_REPLY_PARTS) -> list[str]:
    """``text`` as messages of at most ``limit`` characters, cut between lines (a line longer
    than a message is cut with an ellipsis). A code block cut in two is closed at the end of
    one message and opened again at the start of the next, so none is left open. Lines beyond
    ``max_parts`` messages are left out, and the last message says how many."""
    lines = text.split("\n")
    parts: list[str] = []
    current: list[str] = []
    in_code = False  # whether ``current`` ends inside a code block

    def closed(part: list[str], ends_in_code: bool) -> str:
        return "\n".join([*part, FENCE] if ends_in_code else part)

    def room_in_part(index: int) -> int:
        if len(parts) < max_parts - 1:
            return limit
        # The last message keeps room for the note on what is left out, unless all fits.
        ends_in_code = in_code != (sum(line.count(FENCE) for line in lines[index:]) % 2 == 1)
        everything = closed([*current, *lines[index:]], ends_in_code)
        return limit if len(everything) <= limit else limit - _LEFT_OUT_ROOM

    room = room_in_part(0)
    index = 0
    while index < len(lines):
        line = lines[index]
        code_after = in_code != (line.count(FENCE) % 2 == 1)
        closing = len(FENCE) + 1 if code_after else 0
        if len("\n".join([*current, line])) + closing > room:
            if current and current != [FENCE]:
                parts.append(closed(current, in_code))
                current = [FENCE] if in_code else []
                if len(parts) == max_parts:
                    break
                room = room_in_part(index)
                continue
            # A line that fills a message on its own: cut it.
            line = fit(line, room - len("\n".join([*current, ""])) - closing)
        current.append(line)
        in_code = code_after
        index += 1
    if index < len(lines):
        left = len(lines) - index
        parts[-1] += f"\n… {left} more line{'s' if left != 1 else ''} not shown."
    elif current:
        parts.append(closed(current, in_code))
    return parts or [text]


Answer = TypeVar("Answer")
"""What a command answers: its text, or a platform's text with buttons."""


async def command_reply(work: Callable[[], Awaitable[Answer]], what: str) -> Answer | str:
    """Run a command's ``work``: its answer, the message of a UserError, or (for anything
    else, logged as ``what`` with a reference) a short apology carrying that reference."""
    try:
        return await work()
    except UserError as exc:
        return exc.message
    except Exception:
        return apology(what)


def queue_place(receipt: Receipt) -> str:
    """How a job's first progress message says where it is: its place in the queue, or that
    the queue has not confirmed it (``Receipt.confirmed``)."""
    if receipt.confirmed:
        return f"(position {receipt.position})"
    return "(sent; the queue has not confirmed it yet)"


CANCELLED_BY_OWNER = "⊘ cancelled by you."
"""How a job's progress message ends when its owner cancelled it (the reply says the rest)."""


def ending_mark(job: Job) -> str:
    """The sign before the notice of a job that ended without a result: ⊘ when it was
    cancelled (by a moderator, a ban, a deleted subject), ✗ when it failed."""
    return "⊘" if job.status == "cancelled" else "✗"


def ending_note(job: Job) -> str:
    """How the progress message of a job that ended without a result is closed, pointing to
    the notice below it."""
    return (
        f"{ending_mark(job)} {'cancelled' if job.status == 'cancelled' else 'failed'} — see below."
    )


def apology(what: str) -> str:
    """Log the exception being handled as ``what`` with a fresh reference, and return the
    short apology carrying that reference which the user sees instead of a traceback."""
    ref = uuid.uuid4().hex[:8]
    log.exception("%s failed (ref %s)", what, ref)
    return f"Sorry, something went wrong on my side (ref {ref}). Try again in a minute."


async def result_files(
    artifacts: ArtifactStore, delivery: Delivery
) -> tuple[list[tuple[str, bytes]], str | None]:
    """A result's images as (file name, bytes), and the generation job whose Reroll / Vary /
    Upscale buttons go under them (None for a training or a showcase grid). A result whose
    every image the safety filter withheld has none: its buttons are Reroll alone (Vary and
    Upscale go per image)."""
    job = delivery.job
    contents = await asyncio.gather(*(artifacts.aget_bytes(url) for url in delivery.image_urls))
    files = [
        (url.rsplit("/", 1)[-1], data)
        for url, data in zip(delivery.image_urls, contents, strict=True)
    ]
    # A showcase grid can't be rerolled or varied (the core says so); no buttons for it.
    redo = job.kind == "generate" and not job.options.get("showcase")
    return files, job.id if redo else None


def by_dm_note(channel: str, parts: PostedParts) -> str:
    """The line that opens a result (or notice) sent by DM because its channel refused it:
    ``channel`` as the platform links it, ``parts`` what the channel took before it refused."""
    if parts:
        return f"I couldn't post all of it in {channel}, so here is the rest:"
    return f"I couldn't post in {channel}, so here it is:"


def log_undelivered(logger: logging.Logger, job: Job, reason: object, text: str) -> None:
    """Log a result that neither the job's channel nor a DM to its user would take."""
    logger.error(
        "job %s: result could not be delivered to channel %s nor by DM to user %s (%s); it was: %s",
        job.id,
        job.destination.get("channel_id"),
        job.destination.get("user_id"),
        reason,
        text,
    )


CLOSED_KEPT = 10_000
"""How many closed progress messages an adapter remembers, so that late updates of their jobs
leave them closed."""


class ProgressMessages(Generic[Ref]):
    """Each job's one progress message: posted once, then edited (throttled by ``edits``).

    Its reference is kept here and in the job's destination under ``key``, which is where a
    restarted bot finds it (``parse`` reads it back from the JSON). None means the channel
    refused one: progress is best effort.
    """

    def __init__(
        self, store: Store, edits: EditThrottle, key: str, parse: Callable[[Any], Ref]
    ) -> None:
        self.store, self.edits, self.key, self.parse = store, edits, key, parse
        self.refs: dict[str, Ref | None] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        # The jobs whose message was closed lately, oldest first: an update of one that was
        # on its way when the job ended must not reopen it (a restarted bot learns from the
        # store that the job ended, so the newest few suffice).
        self._closed: dict[str, None] = {}

    def _lock(self, job_id: str) -> asyncio.Lock:
        return self._locks.setdefault(job_id, asyncio.Lock())

    async def _remember(self, job_id: str, ref: Ref | None) -> None:
        self.refs[job_id] = ref
        if ref is None:
            return
        try:
            await self.store.update_job_destination(job_id, {self.key: ref})
        except Exception:
            # Best effort: without it a restarted bot posts a new progress message.
            log.warning("job %s: progress message %s not stored", job_id, self.key, exc_info=True)

    async def post_queued(
        self, job_id: str, destination: dict[str, Any], content: str, post: Post[Ref]
    ) -> None:
        """Post the message a job starts with, unless an update posted one first."""
        try:
            async with self._lock(job_id):
                if job_id not in self.refs and job_id not in self._closed:
                    await self._remember(job_id, await post(job_id, destination, content))
        except Exception:
            # The job is queued whatever happens here; the next progress update tries again.
            log.warning("job %s: progress message not posted", job_id, exc_info=True)

    async def update(
        self,
        job: Job,
        content: str,
        post: Post[Ref],
        edit: Callable[[Ref], Awaitable[None]],
    ) -> None:
        """Post the job's progress message once, then ``edit`` it (throttled); nothing once
        the message is closed."""
        async with self._lock(job.id):
            if job.id in self._closed:
                return
            if job.id not in self.refs:
                known = job.destination.get(self.key)
                if known is None:
                    await self._remember(job.id, await post(job.id, job.destination, content))
                    return
                self.refs[job.id] = self.parse(known)
        if self.refs.get(job.id) is not None:
            await self.edits.submit(job.id, lambda: self._edit_open(job.id, edit))

    async def _edit_open(self, job_id: str, edit: Callable[[Ref], Awaitable[None]]) -> None:
        """Send an edit the throttle let through, unless the message was closed (or went)
        meanwhile; under the job's lock, so that closing waits for an edit under way."""
        async with self._lock(job_id):
            ref = self.refs.get(job_id)
            if ref is not None and job_id not in self._closed:
                await edit(ref)

    def gone(self, job_id: str) -> None:
        """The job's progress message can no longer be edited: stop trying."""
        self.refs[job_id] = None

    async def finish(self, job: Job, close: Callable[[Ref], Awaitable[None]]) -> None:
        """Forget the job's progress message, closing it with ``close`` first (best effort:
        the result is already posted). Later updates of the job leave it closed."""
        # Under the job's lock: a post still under way ends first (so its message is the one
        # closed), and no edit waiting in the throttle is sent after the close.
        async with self._lock(job.id):
            self.edits.forget(job.id)
            self._closed[job.id] = None
            while len(self._closed) > CLOSED_KEPT:
                del self._closed[next(iter(self._closed))]
            ref = self.refs.pop(job.id) if job.id in self.refs else job.destination.get(self.key)
            if ref is not None:
                try:
                    await close(self.parse(ref))
                except Exception:
                    log.warning("job %s: progress message not closed", job.id, exc_info=True)
        self._locks.pop(job.id, None)
