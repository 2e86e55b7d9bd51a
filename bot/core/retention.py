"""How long dreambot keeps what it stores, and the sweep that deletes what is past it.

Images: every image and showcase job's outputs folder in the artifact store
(``outputs/<job id>/``, its live previews included) is deleted ``DREAMBOT_KEEP_IMAGES_DAYS``
after the job ended (0: never), and the job records it (``jobs.images_deleted_at``, migration
0012), so no sweep looks at it again and Vary/Upscale of its result say the image is gone.
The images already posted in a chat are the platform's copies; a training's sample grid lives
with its subject and goes with it (/forget), not here.

Moderation records (``DREAMBOT_KEEP_MODERATION_DAYS``, 0: never): quota usage, blocked
prompts, withheld outputs and audit entries older than that, and bans that expired that long
ago.

Each bot process sweeps its own platform's rows only, so processes of different platforms on
one database never touch the same job; two of the same platform may delete one folder at once,
which is harmless (deleting is idempotent, and marking a job counts it once). A folder is
deleted before its job is marked: a process stopped in between leaves the job for the next
sweep, which finds nothing left to delete and marks it.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from bot.core.store import Job

if TYPE_CHECKING:
    from bot.core.commands import Core

log = logging.getLogger(__name__)

SWEEP_EVERY = 3600.0
"""Seconds between sweeps of a bot process (the first runs at start)."""
SWEEP_BATCH = 200
"""Jobs read from the store at a time while sweeping."""
STOPPED_WITHIN = timedelta(seconds=600)
"""How long after a job's data was deleted its outputs folder is deleted again: an image job
cancelled while it ran may still write a last preview as its engine stops, and no engine runs
one longer than this (image and showcase jobs' fixed time limit on the engine)."""


def before(days: int) -> str:
    """The store's timestamp of ``days`` days ago."""
    return (datetime.now(UTC) - timedelta(days=days)).isoformat(timespec="seconds")


def image_count(job: Job) -> int:
    """How many images a finished job's result lists (a showcase grid is one)."""
    return len((job.result or {}).get("image_urls") or [])


@dataclass(frozen=True)
class OutputsDeleted:
    """What deleting jobs' outputs folders did."""

    jobs: int = 0
    """Jobs whose folder was deleted (and which this process marked, where it marks)."""
    images: int = 0
    """The images their results listed."""
    failed: int = 0
    """Jobs whose folder the artifact store did not delete (left for the next sweep)."""


class Retention:
    """The sweeps of one bot process (its platform's rows only)."""

    def __init__(self, core: Core) -> None:
        self.core = core

    async def sweep(self) -> None:
        """Delete what is past its retention: stored images, then moderation records."""
        await self.sweep_images()
        await self.sweep_moderation_records()

    async def sweep_images(self) -> OutputsDeleted:
        """Delete the outputs folders of this platform's image and showcase jobs that ended
        more than ``keep_images_days`` ago (none with 0), and again those of jobs whose data
        their owner deleted (a running one may have written a last preview as it stopped);
        mark each. Stops at the first folder the artifact store does not delete: the next
        sweep tries again. Logs how much it deleted."""
        days = self.core.settings.keep_images_days
        # "" is before every timestamp: with 0 days, only deleted data is swept.
        ended_before = before(days) if days else ""
        deleted_before = (datetime.now(UTC) - STOPPED_WITHIN).isoformat(timespec="seconds")
        jobs = images = 0
        while True:
            batch = await self.core.store.jobs_with_stored_images(
                self.core.platform, ended_before, deleted_before, SWEEP_BATCH
            )
            done = await self.delete_outputs(batch)
            jobs, images = jobs + done.jobs, images + done.images
            if done.failed or len(batch) < SWEEP_BATCH:
                break
        if jobs:
            log.info(
                "image retention (%s): deleted the stored images of %d job(s), %d image(s) "
                "and their previews (kept %s)",
                self.core.platform,
                jobs,
                images,
                f"{days} days" if days else "until their owner deleted them",
            )
        return OutputsDeleted(jobs, images, done.failed)

    async def delete_outputs(
        self, jobs: Sequence[Job], *, unmarked: Collection[str] = ()
    ) -> OutputsDeleted:
        """Delete each job's outputs folder in the artifact store and mark the job (except
        those in ``unmarked``, which a later sweep deletes again). A folder the store does not
        delete is logged and left, unmarked, and the rest are left too (the store is likely
        down): ``failed`` counts them all."""
        artifacts = self.core.artifacts
        deleted: list[Job] = []
        for index, job in enumerate(jobs):
            try:
                await artifacts.adelete_tree(artifacts.url("outputs", job.id))
            except FileNotFoundError:
                pass  # another process of this platform deleted it just now
            except Exception as exc:  # an OSError, or a bucket client's own error
                log.warning(
                    "job %s: could not delete its stored images (%r); the next sweep tries again",
                    job.id,
                    exc,
                )
                return await self._marked(deleted, unmarked, failed=len(jobs) - index)
            deleted.append(job)
        return await self._marked(deleted, unmarked)

    async def _marked(
        self, deleted: list[Job], unmarked: Collection[str], *, failed: int = 0
    ) -> OutputsDeleted:
        marked = set(
            await self.core.store.mark_images_deleted(
                [job.id for job in deleted if job.id not in unmarked]
            )
        )
        counted = [job for job in deleted if job.id in marked or job.id in unmarked]
        return OutputsDeleted(len(counted), sum(map(image_count, counted)), failed)

    async def sweep_moderation_records(self) -> int:
        """Delete this platform's moderation records older than ``keep_moderation_days``
        (none with 0); log and return how many rows went."""
        days = self.core.settings.keep_moderation_days
        if not days:
            return 0
        deleted = await self.core.store.delete_moderation_records(self.core.platform, before(days))
        total = sum(deleted.values())
        if total:
            counts = ", ".join(f"{count} from {table}" for table, count in deleted.items() if count)
            log.info(
                "moderation retention (%s): deleted %d record(s) older than %d days (%s)",
                self.core.platform,
                total,
                days,
                counts,
            )
        return total
