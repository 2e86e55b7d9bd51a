"""What dreambot keeps about a person, shown and deleted on request: /mydata, /mydata delete
(once its owner confirmed: the adapters ask) and a moderator's /mod delete-user-data.

Kept about a user in a workspace: their subjects (rows, and under ``subjects/<id>/`` in the
artifact store their photos, adapter and sample grid), their jobs' images (``outputs/<job
id>/``, previews included, until the retention sweep deletes them: ``bot.core.retention``)
and their jobs' rows, whose prompts and options let Reroll draw a result again. Deleting it all
deletes each subject as /forget does (its sharing ends; every job drawing it, anyone's, stops,
refunded and told), cancels their waiting and running jobs (refunded), deletes their jobs'
images, and replaces the prompts, options and messages of their jobs (``Store.redact_jobs``).

Kept for moderation (``store.MODERATION_TABLES``): quota usage, blocked prompts, the safety
filter's withheld outputs, the audit log, and bans. Moderators need them to act on abuse (a
user must not be able to erase the record of what they tried); none holds a photo or an image,
and they go after ``DREAMBOT_KEEP_MODERATION_DAYS``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bot.core.errors import UserError, spoken_list
from bot.core.moderation import when
from bot.core.retention import OutputsDeleted
from bot.core.store import Ban, Job, Owner, StoredData

if TYPE_CHECKING:
    from bot.core.commands import Core

OWN_NOTE = "Cancelled: you deleted your data here with /mydata delete."
"""What the jobs a user's own deletion cancelled say (their messages are replaced by it)."""
MODERATOR_NOTE = "Your job was cancelled: a moderator deleted your data here."
"""What the jobs a moderator's deletion cancelled say; their owner is told it where they
asked for them."""


def _same(text: str, _job: Job) -> str:
    """``text``, whichever job it is said of."""
    return text


def counted(count: int, one: str, many: str | None = None) -> str:
    """``1 job``, ``3 jobs``: a count with its noun."""
    return f"{count} {one if count == 1 else many or one + 's'}"


@dataclass(frozen=True)
class DataDeletion:
    """What deleting a user's data did (``PersonalData.delete``)."""

    owner: Owner
    subjects: list[str]
    """The names of the subjects deleted."""
    unshared: list[str]
    """Those of them that were shared with someone."""
    cancelled: list[Job]
    """Their waiting or running jobs, cancelled (as they were: an adapter closes their
    progress messages when the user deleted their own data)."""
    stopped: int
    """Other users' image jobs drawing their subjects, stopped."""
    outputs: OutputsDeleted
    """Their jobs' stored images, deleted."""
    redacted: int
    """Their jobs whose prompts, options and messages were replaced."""

    @property
    def nothing(self) -> bool:
        """Whether there was nothing to delete."""
        return not (self.subjects or self.cancelled or self.outputs.jobs or self.redacted)


class PersonalData:
    """/mydata and the deletion of a user's data, for one bot process."""

    def __init__(self, core: Core) -> None:
        self.core = core

    async def summary(self, owner: Owner) -> str:
        """/mydata: what is stored about the caller in this workspace and for how long,
        what is kept for moderation and why, and how to delete it. Banned users may ask."""
        core, syntax = self.core, self.core.syntax
        data = await core.store.stored_data(owner)
        subjects = await core.store.list_subjects(owner)
        notes = await core.sharing.share_notes(owner)
        lines = ["What dreambot keeps about you here:"]
        if subjects:
            described = ", ".join(
                f"{s.name} ({s.class_noun}, {s.status}, {counted(s.photo_count, 'photo')}"
                + (f"; {notes[s.id]}" if s.id in notes else "")
                + ")"
                for s in subjects
            )
            lines.append(
                f"  Subjects ({len(subjects)}): {described}. Each keeps its photos, adapter and "
                f"sample images until you delete it ({syntax.name('forget')})."
            )
        else:
            lines.append("  Subjects: none.")
        if data.images:
            stored = (
                f"{data.images} stored, of {counted(data.image_jobs, 'job')}, the oldest from "
                f"{when(data.images_since or '')} (with the live previews drawn on the way)"
            )
        else:
            stored = "none stored"
        lines.append(f"  Images: {stored}. {self._images_kept()}")
        lines.append(
            f"  Prompts: those of your {counted(data.prompts, 'image job')}, with their "
            "options, so that Reroll can draw them again."
            if data.prompts
            else "  Prompts: none."
        )
        jobs = syntax.name("jobs")
        lines.append(
            f"  Jobs waiting or running: {data.active_jobs} ({jobs})."
            if data.active_jobs
            else "  Jobs waiting or running: none."
        )
        ban = await core.store.active_ban(owner)
        lines.append(
            f"Kept for moderation, also after {syntax.hint('mydata', ('delete', True))}, "
            "because moderators need them to act on abuse (none holds a photo or an image): "
            f"{self._moderation_records(data, ban)}. {self._moderation_kept()}"
        )
        lines.append(
            f"`{syntax.hint('mydata', ('delete', True))}` deletes your subjects, images and "
            "prompts and cancels your jobs; you confirm first."
        )
        return "\n".join(lines)

    async def deletion_preview(self, owner: Owner) -> str:
        """What /mydata delete would delete, for the caller to confirm (the adapter adds how:
        a button, or a word to type). UserError when there is nothing to delete."""
        data = await self.core.store.stored_data(owner)
        subjects = await self.core.store.list_subjects(owner)
        shares = await self.core.store.subject_shares(owner)
        if not subjects and not data.deletable:
            raise UserError(
                "You have nothing stored here to delete: no subjects, images, prompts or jobs. "
                f"(Kept for moderation: {self._moderation_records(data, None)}.)"
            )
        lines = ["This deletes what dreambot keeps about you here, and can't be undone:"]
        if subjects:
            names = spoken_list([s.name for s in subjects])
            shared = [s.name for s in subjects if s.id in shares]
            ending = (
                f"; the sharing of {spoken_list(shared)} ends, and others' jobs drawing "
                f"{'it' if len(shared) == 1 else 'them'} stop"
                if shared
                else ""
            )
            files = (
                "subject {} with its photos, adapter"
                if len(subjects) == 1
                else "subjects {} with their photos, adapters"
            )
            lines.append(f"  your {files.format(names)} and sample images{ending}")
        if data.images:
            lines.append(f"  your {counted(data.images, 'stored image')}")
        if data.prompts:
            lines.append(f"  the prompts and options of your {counted(data.prompts, 'image job')}")
        if data.active_jobs:
            it = "it" if data.active_jobs == 1 else "they"
            lines.append(
                f"  and it cancels your {counted(data.active_jobs, 'waiting or running job')} "
                f"(what {it} took from your quota is given back)"
            )
        lines.append(
            "The images already posted in the chat are the platform's copies and stay. Kept "
            f"for moderation: {self._moderation_records(data, None)}."
        )
        return "\n".join(lines)

    async def delete_from_button(
        self, owner: Owner, button_user: str, *, mention: Callable[[str], str] = str
    ) -> DataDeletion:
        """The "Delete everything" button under a /mydata delete preview, pressed by
        ``owner``: only the user it was shown to (``button_user``) may press it."""
        if owner.user_id != button_user:
            raise UserError(
                f"Only {mention(button_user)} can delete their data with this button: it is "
                "theirs. Nothing was changed."
            )
        return await self.delete(owner)

    async def delete(self, owner: Owner, *, by_moderator: bool = False) -> DataDeletion:
        """Delete what is stored about ``owner`` in their workspace (see the module's
        docstring); a banned user may too. ``by_moderator``: a moderator's deletion, whose
        cancelled jobs are told to their owner where they asked for them (a user deleting
        their own sees the reply, and their adapter closes the jobs' progress messages)."""
        core, store = self.core, self.core.store
        note = MODERATOR_NOTE if by_moderator else OWN_NOTE
        cancelled, still_running = await self._cancel_jobs(owner, note, by_moderator)
        subjects = await store.list_subjects(owner)
        shares = await store.subject_shares(owner)
        stopped = 0
        for subject in subjects:
            # Their own jobs are cancelled already: the jobs told are other users'.
            why = (
                f"a moderator deleted {subject.name}"
                if by_moderator
                else f"{subject.name} was deleted by its owner"
            )
            deletion = await core.delete_subject(
                subject, training_message=note, why=functools.partial(_same, why)
            )
            stopped += deletion.images_stopped
        # A job queued while this ran.
        more, more_running = await self._cancel_jobs(owner, note, by_moderator)
        cancelled += more
        still_running |= more_running
        stored = [
            job
            for job in await store.user_jobs(owner)
            if job.kind == "generate" and job.images_deleted_at is None
        ]
        # A job stopped while it ran may still write a last preview: it stays unmarked, and
        # the sweep deletes its folder again once its engine has surely stopped.
        outputs = await core.retention.delete_outputs(stored, unmarked=still_running)
        redacted = await store.redact_jobs(owner, note)
        return DataDeletion(
            owner,
            [s.name for s in subjects],
            [s.name for s in subjects if s.id in shares],
            cancelled,
            stopped,
            outputs,
            redacted,
        )

    async def _cancel_jobs(
        self, owner: Owner, note: str, tell_owner: bool
    ) -> tuple[list[Job], set[str]]:
        """Cancel the owner's waiting and running jobs (refunded); return them, and the ids of
        those an engine may still be running."""
        cancelled, running = [], set()
        store = self.core.store
        for job in await store.active_jobs(owner.platform, owner.workspace, owner.user_id):
            state = await self.core.moderation.cancel_job(job, note, tell_owner=tell_owner)
            if state is None:
                continue
            cancelled.append(job)
            if state in ("running", "unreachable"):
                running.add(job.id)
        return cancelled, running

    def deleted_text(self, deletion: DataDeletion, *, you: bool = True) -> str:
        """The reply to a deletion: to the user (``you``), or to the moderator who did it."""
        owner = deletion.owner
        their, them = ("your", "you") if you else ("their", owner.user_id)
        if deletion.nothing:
            has = "You had" if you else f"{owner.user_id} had"
            return f"{has} nothing stored here, so nothing was deleted."
        what = []
        if deletion.subjects:
            noun = "subject" if len(deletion.subjects) == 1 else "subjects"
            what.append(
                f"{their} {noun} {spoken_list(deletion.subjects)} (photos, adapters and "
                "sample images)"
            )
        if deletion.outputs.images:
            what.append(counted(deletion.outputs.images, "stored image"))
        if deletion.redacted:
            what.append(f"the prompts and options of {their} {counted(deletion.redacted, 'job')}")
        lines = [f"Deleted what dreambot kept about {them} here: {spoken_list(what)}."]
        if deletion.cancelled:
            jobs = counted(len(deletion.cancelled), "waiting or running job")
            it = "it" if len(deletion.cancelled) == 1 else "they"
            lines.append(
                f"Cancelled your {jobs}; what {it} took from your quota is given back."
                if you
                else f"Cancelled {jobs} of theirs; they were told, and refunded."
            )
        if deletion.unshared:
            are = "is" if len(deletion.unshared) == 1 else "are"
            lines.append(f"{spoken_list(deletion.unshared)} {are} no longer shared with anyone.")
        if deletion.stopped:
            lines.append(
                f"Stopped {counted(deletion.stopped, 'image job')} of others drawing {their} "
                "subjects; their owners were told, and refunded."
            )
        if deletion.outputs.failed:
            lines.append(
                f"The images of {counted(deletion.outputs.failed, 'job')} could not be deleted "
                "just now (the artifact store did not answer); the hourly sweep deletes them."
            )
        if you:
            lines.append(
                "The images already posted in the chat are the platform's copies and stay: "
                "delete those messages there. Kept for moderation: your quota usage, blocked "
                "prompts, withheld-image records and moderators' actions about you "
                f"(see {self.core.syntax.name('mydata')})."
            )
        else:
            lines.append(
                "Their quota usage, blocked prompts, withheld-image records and the audit log "
                "stay, for moderation."
            )
        return "\n".join(lines)

    def _images_kept(self) -> str:
        days = self.core.settings.keep_images_days
        kept = (
            f"Each job's images are deleted {counted(days, 'day')} after it ended"
            if days
            else "Images are kept until you delete them"
        )
        return f"{kept}; the copies posted in the chat are the platform's and stay."

    def _moderation_kept(self) -> str:
        days = self.core.settings.keep_moderation_days
        if not days:
            return "They are kept without a time limit."
        return f"Each is deleted {counted(days, 'day')} after it was made."

    @staticmethod
    def _moderation_records(data: StoredData, ban: Ban | None) -> str:
        """The moderation records about a user, as /mydata lists them."""
        items = []
        if data.quota_records:
            items.append(
                f"{counted(data.quota_records, 'quota usage record')} (what each of your "
                "jobs spent)"
            )
        if data.blocked_prompts:
            items.append(f"{counted(data.blocked_prompts, 'blocked prompt')} (with its text)")
        if data.withheld_outputs:
            items.append(
                f"{counted(data.withheld_outputs, 'result')} whose images the safety filter "
                "withheld (with its prompt)"
            )
        if data.audit_entries:
            items.append(f"{counted(data.audit_entries, 'moderator action')} about you")
        if ban is not None:
            until = f"until {when(ban.expires_at)}" if ban.expires_at else "until lifted"
            items.append(f"your ban ({until})")
        return spoken_list(items) if items else "nothing about you so far"
