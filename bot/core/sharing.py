"""Sharing subjects on purpose: ``/share <name> <user|everyone>`` and ``/unshare``.

A subject belongs to one user; nobody else can draw it unless its owner shares it, with one
user of the same workspace or with everyone there (``subject_shares``). Sharing lets others
use the subject in their prompts (``[name]``, or ``[token]`` where names collide; see
``bot.core.prompts.SubjectLookup``) and ``/showcase``, paid from their own quota; it gives
them nothing else (no Reroll of the owner's images, no /forget). Only the owner shares and
unshares; deleting the subject ends its sharing. What was promised holds for jobs already
queued: unsharing stops the waiting and running image jobs of those who can no longer draw the
subject, deleting it stops every job drawing it (``Sharing.stop_jobs_drawing``), and a redo of
images whose subject is gone or no longer shared says so (``Sharing.check_redrawable``).

Platform-free like the rest of the core: adapters pass a user id (or ``EVERYONE``), and
render mentions with ``Core.mention``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import aiosqlite

from bot.core.errors import UserError, as_typed, spoken_list
from bot.core.moderation import describe_job, parse_user, was_were
from bot.core.prompts import SubjectLookup
from bot.core.store import EVERYONE, Job, Owner, Subject
from bot.core.syntax import TEXT_SYNTAX, CommandSyntax

if TYPE_CHECKING:
    from bot.core.commands import Core

SHAREABLE = ("queued", "training", "ready")
"""A subject can be shared from the moment its training is queued; a failed one can't."""
EVERYONE_WORDS = frozenset({"everyone", "@everyone", "<!everyone>", "all"})
"""How a text command names everyone in the workspace (Slack sends ``@everyone`` as
``<!everyone>``)."""


def drawn_subjects(job: Job) -> dict[str, str]:
    """The subjects an image job draws: subject id → its name when the job was queued
    (``options["subjects"]``; a job queued before they were recorded there: the subject of
    its ``subject_id``, name unknown). Nothing for a training."""
    if job.kind == "train":
        return {}
    recorded = job.options.get("subjects")
    if isinstance(recorded, dict):
        return {str(subject_id): str(name) for subject_id, name in recorded.items()}
    return {job.subject_id: ""} if job.subject_id else {}


def stopped_note(count: int) -> str:
    """What a reply adds when ``stop_jobs_drawing`` stopped ``count`` jobs (nothing for 0)."""
    if not count:
        return ""
    if count == 1:
        return " 1 image job drawing it was stopped, and the quota it took is given back."
    return f" {count} image jobs drawing it were stopped, and the quota they took is given back."


def parse_target(word: str) -> str:
    """A share's target from a typed word: ``EVERYONE``, or a user id (from a mention such as
    Discord's ``<@123>``, Slack's ``<@U123|mia>`` or ``<@U123>``, or a bare id)."""
    if word.strip().lower() in EVERYONE_WORDS:
        return EVERYONE
    return parse_user(word)


def parse_share_text(
    verb: str, text: str, *, syntax: CommandSyntax = TEXT_SYNTAX
) -> tuple[str, str | None]:
    """``rex @mia`` / ``rex everyone`` (``share``), or ``rex [@mia|everyone]`` (``unshare``)
    → the subject's name and the target (None: unshare from everyone it is shared with).
    ``syntax`` is how this platform types its commands (``Core.syntax``), for the usage
    message."""
    words = text.split()
    wanted = "<@user or everyone>" if verb == "share" else "[@user or everyone]"
    if not words or len(words) > 2 or (verb == "share" and len(words) < 2):
        raise UserError(f"Usage: {syntax.name(verb)} <subject name> {wanted}")
    return words[0], parse_target(words[1]) if len(words) == 2 else None


class Sharing:
    """The sharing commands of one bot process, and who may draw which subject."""

    def __init__(self, core: Core) -> None:
        self.core = core

    async def lookup(self, owner: Owner) -> SubjectLookup:
        """The subjects ``owner`` may draw: their own and those shared with them, and which
        of their own they chose as ``[V]`` with /use."""
        return SubjectLookup(
            await self.core.store.list_subjects(owner),
            await self.core.store.subjects_shared_with(owner),
            chosen=await self.core.store.chosen_subject_id(owner),
            mention=self.core.mention,
            syntax=self.core.syntax,
        )

    async def shared_subjects(self, owner: Owner) -> list[Subject]:
        """The caller's own subjects that are shared with someone, newest first."""
        shares = await self.core.store.subject_shares(owner)
        return [s for s in await self.core.store.list_subjects(owner) if s.id in shares]

    def whom(self, targets: Sequence[str]) -> str:
        """``<@U2>, <@U3> and everyone here``: the targets of shares, as a reply says them."""
        names = [self.core.mention(t) for t in targets if t != EVERYONE]
        if EVERYONE in targets:
            names.append("everyone here")
        return spoken_list(names)

    async def share(self, owner: Owner, name: str, target: str) -> str:
        """/share <name> <user|everyone>: let one user of the workspace (a user id), or
        everyone there (``EVERYONE``), draw one of the caller's subjects. Sharing again is
        harmless and says so."""
        syntax = self.core.syntax
        await self.core.moderation.check_not_banned(owner)
        subject = await self._own_subject(owner, name)
        if target == owner.user_id:
            raise UserError(
                f"That's you: your own subjects are always yours to draw. Share {subject.name} "
                "with someone else, or with everyone."
            )
        if subject.status not in SHAREABLE:
            raise UserError(
                f"{subject.name} failed to train, so there is nothing to share yet: train it "
                f"again first (`{self.core.train_hint(subject)}`)."
            )
        try:
            added = await self.core.store.share_subject(subject.id, target)
        except aiosqlite.IntegrityError:  # /forget ran meanwhile
            raise UserError(f"{subject.name} was deleted just now; nothing was shared.") from None
        shares = (await self.core.store.subject_shares(owner)).get(subject.id, [])
        who = self.whom([target])
        if not added:
            return f"{subject.name} is already shared with {who}; nothing changed."
        they = "anyone here" if target == EVERYONE else "they"
        text = (
            f"Shared {subject.name} ({subject.class_noun}) with {who}: {they} can draw it as "
            f"[{subject.name}] in a prompt (or as [{subject.token}] where another subject has "
            f"that name), and with {syntax.name('showcase')}, from their own quota."
        )
        if subject.status != "ready":
            text += " It is still training; it can be drawn once it is ready."
        if target != EVERYONE and EVERYONE in shares:
            text += " (It is shared with everyone here as well.)"
        unshare = syntax.hint("unshare", ("subject", subject.name))
        return f"{text} `{unshare}` stops sharing it."

    async def unshare(self, owner: Owner, name: str, target: str | None = None) -> str:
        """/unshare <name> [user|everyone]: stop sharing one of the caller's subjects with
        ``target``, or (None) with anyone. Images already drawn stay where they were posted;
        the waiting and running image jobs of those who can no longer draw it are stopped."""
        await self.core.moderation.check_not_banned(owner)
        subject = await self._own_subject(owner, name)
        removed = await self.core.store.unshare_subject(subject.id, target)
        left = (await self.core.store.subject_shares(owner)).get(subject.id, [])
        stopped = ""
        if removed:
            mention = self.core.mention(owner.user_id)
            stopped = stopped_note(
                await self.stop_jobs_drawing(
                    subject,
                    lambda _: f"{mention} stopped sharing {subject.name} with you",
                    unshared=True,
                )
            )
        if target is None:
            if not removed:
                return f"{subject.name} isn't shared with anyone; nothing changed."
            return (
                f"Stopped sharing {subject.name} (it was shared with {self.whom(removed)}). "
                f"Only you can draw it now.{stopped}"
            )
        who = self.whom([target])
        if not removed:
            shared = f"it is shared with {self.whom(left)}" if left else "it isn't shared at all"
            return f"{subject.name} isn't shared with {who} ({shared}); nothing changed."
        text = f"Stopped sharing {subject.name} with {who}.{stopped}"
        if EVERYONE in left:
            everyone = self.core.syntax.hint(
                "unshare", ("subject", subject.name), ("everyone", True)
            )
            text += (
                " It is still shared with everyone here, so they can still draw it: "
                f"`{everyone}` stops that."
            )
        return text

    async def may_draw(self, user: Owner, subject: Subject) -> bool:
        """Whether ``user`` may draw ``subject``: it is theirs, or shared with them."""
        if subject.owner == user:
            return True
        return any(s.id == subject.id for s in await self.core.store.subjects_shared_with(user))

    async def stop_jobs_drawing(
        self, subject: Subject, why: Callable[[Job], str], *, unshared: bool = False
    ) -> int:
        """Cancel the waiting and running image jobs of ``subject``'s workspace that draw it:
        everyone's (it is being deleted: call this first), or with ``unshared`` those of the
        users who may no longer draw it. Each job's owner is told ``why(job)`` (a clause: ``rex
        was deleted by its owner``) and gets its quota back, as for a moderator's cancel; a
        running job is stopped at its next step, before it draws a subject that is no longer
        theirs to draw (or no longer there: the engine would fail it, saying to train it
        again). Returns how many were stopped."""
        owner = subject.owner
        stopped = 0
        for job in await self.core.store.active_jobs(owner.platform, owner.workspace):
            if subject.id not in drawn_subjects(job):
                continue
            if unshared and await self.may_draw(job.owner, subject):
                continue
            verb = was_were(job)
            message = (
                f"Your {describe_job(job)} {verb} cancelled: {why(job)}. What "
                f"{'they' if verb == 'were' else 'it'} took from your quota is given back."
            )
            if await self.core.moderation.cancel_job(job, message) is not None:
                stopped += 1
        return stopped

    async def check_redrawable(self, owner: Owner, job: Job) -> None:
        """Refuse (UserError) a Reroll/Vary/Upscale by ``owner`` of ``job``'s images when a
        subject they draw was deleted, or is another user's and no longer shared with
        ``owner``: said with the subject's name, which the user knows (their redo would
        otherwise name the token it was pinned to)."""
        for subject_id, name in drawn_subjects(job).items():
            subject = await self.core.store.get_subject(subject_id)
            if subject is None:
                raise UserError(
                    f"{name or 'A subject'}, which these images draw, was deleted, so they "
                    "can't be redrawn. Nothing was queued; draw something else with /imagine."
                )
            if not await self.may_draw(owner, subject):
                raise UserError(
                    f"{subject.name}, which these images draw, is no longer shared with you by "
                    f"{self.core.mention(subject.owner.user_id)}, so they can't be redrawn. "
                    "Nothing was queued."
                )

    async def share_notes(self, owner: Owner) -> dict[str, str]:
        """A note per subject of ``owner`` that is shared: subject id → ``shared with …``
        (for /subjects, and for moderators' /mod subjects)."""
        shares = await self.core.store.subject_shares(owner)
        return {subject_id: f"shared with {self.whom(t)}" for subject_id, t in shares.items()}

    async def subjects_lines(
        self, owner: Owner, own: Sequence[Subject]
    ) -> tuple[dict[str, str], list[str]]:
        """For /subjects: a note per own subject that is shared (``share_notes``), and the
        lines of the section on the subjects shared with the caller."""
        notes = await self.share_notes(owner)
        shared = await self.core.store.subjects_shared_with(owner)
        if not shared:
            return notes, []
        lookup = SubjectLookup(own, shared, mention=self.core.mention)
        lines = ["Shared with you (write them as shown):"]
        for subject in shared:
            lines.append(
                f"  {lookup.reference(subject)}  {subject.name}: {subject.class_noun}, "
                f"{subject.status}, by {self.core.mention(subject.owner.user_id)}"
            )
        return notes, lines

    async def _own_subject(self, owner: Owner, name: str) -> Subject:
        """The caller's subject ``name``; UserError naming theirs (and, when the name is one
        shared with them, that only its owner can share it)."""
        name = name.strip()
        subject = await self.core.store.find_subject(owner, name)
        if subject is not None:
            return subject
        own = await self.core.store.list_subjects(owner)
        text = (
            f"You have no subject called {as_typed(name)}. Your subjects: "
            f"{', '.join(s.name for s in own) or 'none yet'}."
        )
        others = [
            s
            for s in await self.core.store.subjects_shared_with(owner)
            if name.lower() in (s.name.lower(), s.token.lower())
        ]
        if others:
            owners = self.whom(sorted({s.owner.user_id for s in others}))
            text += (
                f" The {others[0].name} shared with you belongs to {owners}: only its owner "
                "can share it."
            )
        raise UserError(text)
