"""The chat commands, platform-free: /train, /imagine, /subjects, /forget, /quota, /help.

Adapters call these with plain values and render the returned text; errors a user can cause
raise ``UserError``. Nothing here knows about Discord, Slack or the terminal.
"""

from __future__ import annotations

import functools
import logging
import random
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiosqlite
from arq.connections import ArqRedis
from redis.exceptions import RedisError

from bot.config import Settings
from bot.core.errors import UserError
from bot.core.moderation import Moderation
from bot.core.photos import PhotoRules, Upload, prepare_photos
from bot.core.prompts import SUBJECT_REF, resolve_prompt
from bot.core.quotas import Quotas, check_allowance
from bot.core.store import Owner, Store, Subject, utcnow
from bot.core.tokens import pick_token
from engine.api import (
    ENGINE_QUEUES,
    GENERATE,
    TRAIN_SUBJECT,
    AdapterRef,
    GenerateRequest,
    TrainRequest,
    bot_queue,
)
from engine.artifacts import ArtifactStore

log = logging.getLogger(__name__)

SUBJECT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")
CLASS_NOUN = re.compile(r"^[A-Za-z][A-Za-z -]{0,29}$")

HELP_INTRO = (
    "dreambot teaches an image model your own subject from a few photos, then draws it anywhere."
)

SHELL_USAGE = """\
/train <name> <class> <photos…>   learn a subject from 3–20 photos
                                  e.g. /train rex dog a.jpg b.jpg c.jpg
/imagine <prompt>                 draw a prompt; [V] is your newest subject, [name] a named one
                                  e.g. /imagine a [V] dog wearing a hat
                                  options: --count N (1-4), --seed N, --no "things to avoid"
/subjects                         list your subjects and their status
/forget <name>                    delete a subject, its photos and its adapter
/quota                            your usage today and when it resets (midnight UTC)
/mod help                         moderator commands (moderators only)
/help                             this text"""
"""How the commands are typed in the shell; other adapters pass their own to ``help_text``."""

HELP = f"{HELP_INTRO}\n\n{SHELL_USAGE}"

_ACTIVE_REF = re.compile(r"\[\s*[vV]\s*\]")


@dataclass(frozen=True)
class Receipt:
    """What the user is told right after a job was queued."""

    job_id: str
    position: int
    text: str


class Core:
    """The commands of one bot process (one chat platform)."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        artifacts: ArtifactStore,
        queue: ArqRedis,
        platform: str,
    ) -> None:
        self.settings = settings
        self.store = store
        self.artifacts = artifacts
        self.queue = queue
        self.platform = platform
        self.photo_rules = PhotoRules(
            min_count=settings.min_photos,
            max_count=settings.max_photos,
            min_side=settings.min_photo_side,
            max_bytes=settings.max_photo_bytes,
            size=settings.photo_size,
        )
        self.quotas = Quotas(settings, store)
        self.moderation = Moderation(self)

    # Commands.

    async def train(
        self,
        owner: Owner,
        destination: dict[str, Any],
        name: str,
        class_noun: str,
        uploads: list[Upload],
        *,
        roles: Sequence[str] = (),
    ) -> Receipt:
        """Check and store the photos, record the subject and queue its training.

        ``roles`` are the caller's platform role ids, for role-based quota overrides.
        """
        await self.moderation.check_not_banned(owner)
        name, class_noun = name.strip(), " ".join(class_noun.lower().split())
        if not SUBJECT_NAME.match(name) or name.lower() == "v":
            raise UserError(
                f"'{name}' can't be a subject name: use 1-32 letters, digits, - or _ "
                "(and not 'V', which means your newest subject)."
            )
        if not CLASS_NOUN.match(class_noun):
            raise UserError(
                f"'{class_noun}' isn't a class: say what kind of thing it is in a word or two, "
                "e.g. dog, cat, person, backpack, toy car."
            )
        await self.moderation.check_prompt(owner, f"{name} {class_noun}", subject=True)
        existing = await self.store.find_subject(owner, name)
        if existing:
            raise UserError(
                f"You already have a subject called {existing.name}. Pick another name, "
                f"or `/forget {existing.name}` first."
            )
        # Refuse before the costly photo work; the binding check comes with the job insert.
        limits = await self.quotas.precheck(owner, roles, "trainings", 1)
        photos = await prepare_photos(uploads, self.photo_rules)
        await self._check_queue_space()

        subject_id = uuid.uuid4().hex
        subject_url = self.artifacts.url("subjects", subject_id)
        photos_url = f"{subject_url}/photos"
        photo_urls = [f"{photos_url}/{i:02d}.png" for i in range(len(photos))]
        subject = await self._insert_subject(
            owner, subject_id, name, class_noun, photos_url, len(photos)
        )
        job_id = uuid.uuid4().hex
        try:
            for url, data in zip(photo_urls, photos, strict=True):
                await self.artifacts.aput_bytes(url, data)
            await self.store.reserve_job(
                job_id,
                "train",
                owner,
                destination,
                subject_id=subject_id,
                usage_kind="trainings",
                units=1,
                check=functools.partial(check_allowance, limits, kind="trainings", units=1),
            )
            request = TrainRequest(
                job_id=job_id,
                reply_queue=bot_queue(self.platform),
                subject_id=subject_id,
                token=subject.token,
                class_noun=class_noun,
                photo_urls=photo_urls,
                adapter_url=f"{subject_url}/adapter.safetensors",
                samples_url=f"{subject_url}/samples",
                base_model=self.settings.base_model,
                steps=self.settings.train_steps,
            )
            position = await self._enqueue(TRAIN_SUBJECT, job_id, request.model_dump())
        except BaseException:
            await self.store.delete_job(job_id)
            await self.store.delete_subject(subject_id)
            await self.artifacts.adelete_tree(subject_url)
            raise
        return Receipt(
            job_id,
            position,
            f"Training {name} ({class_noun}) from {len(photos)} photos: queued "
            f"(position {position}). I'll post progress here.",
        )

    async def imagine(
        self,
        owner: Owner,
        destination: dict[str, Any],
        prompt: str,
        *,
        count: int | None = None,
        seed: int | None = None,
        negative_prompt: str = "",
        width: int | None = None,
        height: int | None = None,
        roles: Sequence[str] = (),
    ) -> Receipt:
        """Resolve the prompt's subjects, check it against the rules and quotas, queue it.

        ``roles`` are the caller's platform role ids, for role-based quota overrides.
        ``width``/``height`` (multiples of 8) default to the base model's native size.
        The options are stored with the job, so ``reimagine`` can repeat them.
        """
        await self.moderation.check_not_banned(owner)
        count = self.settings.images_per_prompt if count is None else count
        if not 1 <= count <= 4:
            raise UserError("count must be between 1 and 4.")
        if seed is not None and not 0 <= seed < 2**32:
            raise UserError("seed must be a whole number from 0 to 4294967295.")
        for side in (width, height):
            if side is not None and (side % 8 or not 64 <= side <= 2048):
                raise UserError("width and height must be multiples of 8 from 64 to 2048.")
        subjects = await self.store.list_subjects(owner)
        resolved = resolve_prompt(prompt, subjects, max_chars=self.settings.max_prompt_chars)
        negative = (
            resolve_prompt(negative_prompt, subjects, max_chars=self.settings.max_prompt_chars).text
            if negative_prompt.strip()
            else ""
        )
        await self.moderation.check_prompt(owner, resolved.text, negative)
        await self._check_queue_space()
        limits = await self.quotas.limits(owner, roles)
        seed = random.SystemRandom().randrange(2**32) if seed is None else seed
        job_id = uuid.uuid4().hex
        request = GenerateRequest(
            job_id=job_id,
            reply_queue=bot_queue(self.platform),
            prompt=resolved.text,
            negative_prompt=negative,
            count=count,
            seed=seed,
            steps=self.settings.generate_steps,
            guidance=self.settings.guidance_scale,
            width=width,
            height=height,
            adapters=[
                AdapterRef(name=s.id, url=s.adapter_url or "", scale=1.0) for s in resolved.subjects
            ],
            output_url=self.artifacts.url("outputs", job_id),
            base_model=self.settings.base_model,
        )
        subject_id = resolved.subjects[0].id if resolved.subjects else None
        options = {
            # [V] pinned to the subject it meant now, so a later Reroll draws the same one.
            "prompt": _pin_active(prompt, subjects),
            "negative_prompt": _pin_active(negative_prompt, subjects),
            "count": count,
            "seed": seed,
            "width": width,
            "height": height,
        }
        await self.store.reserve_job(
            job_id,
            "generate",
            owner,
            destination,
            subject_id=subject_id,
            prompt=prompt,
            options=options,
            usage_kind="images",
            units=count,
            check=functools.partial(check_allowance, limits, kind="images", units=count),
        )
        try:
            position = await self._enqueue(GENERATE, job_id, request.model_dump())
        except BaseException:
            await self.store.delete_job(job_id)
            raise
        return Receipt(
            job_id,
            position,
            f"Drawing {count} image{'s' if count > 1 else ''} "
            f"(seed {seed}): queued (position {position}).",
        )

    async def reimagine(
        self,
        owner: Owner,
        destination: dict[str, Any],
        job_id: str,
        *,
        vary: bool = False,
        roles: Sequence[str] = (),
        mention: Callable[[str], str] = str,
    ) -> Receipt:
        """Reroll (new seed) or Vary (the next seed) a generation, as ``owner``.

        Whoever clicks queues the job and pays for it from their own quota, with the original
        prompt, negative prompt, count and size. A prompt that uses a subject may only be
        redrawn by the subject's owner: subjects resolve per user, and one user's photos must
        not be drawn on another's request. ``mention`` renders a user id for the refusal.
        """
        job = await self.store.get_job(job_id)
        if job is None or job.kind != "generate" or not job.prompt:
            raise UserError("I no longer have that image's prompt; use /imagine instead.")
        options, result = job.options, job.result or {}
        prompt = options.get("prompt") or job.prompt
        negative = options.get("negative_prompt") or ""
        uses_subject = job.subject_id is not None or any(
            SUBJECT_REF.search(text) for text in (prompt, negative)
        )
        if uses_subject and owner != job.owner:
            raise UserError(
                f"Only {mention(job.owner.user_id)} can reroll images of their subject. "
                "Nothing was queued; draw your own with /imagine."
            )
        seed = None
        if vary:
            original = result.get("seed", options.get("seed"))
            if isinstance(original, int):
                seed = (original + 1) % 2**32
        count = options.get("count") or len(result.get("image_urls") or []) or None
        return await self.imagine(
            owner,
            destination,
            prompt,
            count=count,
            seed=seed,
            negative_prompt=negative,
            width=options.get("width"),
            height=options.get("height"),
            roles=roles,
        )

    async def list_subjects(self, owner: Owner) -> list[Subject]:
        """The caller's subjects, newest first."""
        return await self.store.list_subjects(owner)

    async def subjects_text(self, owner: Owner) -> str:
        """/subjects: the caller's subjects with their status."""
        await self.moderation.check_not_banned(owner)
        subjects = await self.list_subjects(owner)
        if not subjects:
            return "You have no subjects yet. Train one: `/train <name> <class> <photos…>`."
        ready = [s for s in subjects if s.status == "ready"]
        lines = ["Your subjects:"]
        for subject in subjects:
            marker = "  ← [V]" if ready and subject is ready[0] else ""
            detail = f" ({subject.error})" if subject.status == "failed" and subject.error else ""
            lines.append(
                f"  {subject.name}: {subject.class_noun}, {subject.status}{detail}, "
                f"{subject.photo_count} photos, since {subject.created_at[:16]}{marker}"
            )
        return "\n".join(lines)

    async def forget(self, owner: Owner, name: str) -> str:
        """/forget: delete one of the caller's subjects with its photos and adapter."""
        await self.moderation.check_not_banned(owner)
        subject = await self.store.find_subject(owner, name.strip())
        if subject is None:
            subjects = await self.list_subjects(owner)
            names = ", ".join(s.name for s in subjects) or "none"
            raise UserError(f"You have no subject called '{name}'. Your subjects: {names}.")
        await self.remove_subject(subject)
        return f"Forgot {subject.name}: its photos and adapter are deleted."

    async def remove_subject(self, subject: Subject) -> None:
        """Delete a subject's row, photos and adapter (for /forget and moderators)."""
        await self.store.delete_subject(subject.id)
        await self.artifacts.adelete_tree(self.artifacts.url("subjects", subject.id))

    async def quota_text(self, owner: Owner, roles: Sequence[str] = ()) -> str:
        """/quota: the caller's usage today, their limits, and when the day resets."""
        await self.moderation.check_not_banned(owner)
        return await self.quotas.usage_text(owner, roles)

    async def mod(self, owner: Owner, is_moderator: bool, text: str) -> str:
        """/mod <text>: a moderator command as one line (see ``Moderation`` for typed calls)."""
        return await self.moderation.handle_text(owner, is_moderator, text)

    def help_text(self, usage: str | None = None) -> str:
        """/help: what dreambot does, then how to type the commands on this platform.

        ``usage`` is the adapter's own command syntax; the default is the shell's.
        """
        return f"{HELP_INTRO}\n\n{usage or SHELL_USAGE}"

    # Internals.

    async def _insert_subject(
        self,
        owner: Owner,
        subject_id: str,
        name: str,
        class_noun: str,
        photos_url: str,
        photo_count: int,
    ) -> Subject:
        for _ in range(5):
            taken = await self.store.workspace_tokens(owner.platform, owner.workspace)
            now = utcnow()
            subject = Subject(
                id=subject_id,
                owner=owner,
                name=name,
                class_noun=class_noun,
                token=pick_token(taken),
                status="queued",
                adapter_url=None,
                photos_url=photos_url,
                photo_count=photo_count,
                base_model=self.settings.base_model,
                error=None,
                created_at=now,
                updated_at=now,
            )
            try:
                await self.store.insert_subject(subject)
                return subject
            except aiosqlite.IntegrityError:
                # A concurrent /train took the same name or token; look again.
                if await self.store.find_subject(owner, name):
                    raise UserError(f"You already have a subject called {name}.") from None
        raise RuntimeError("could not allocate a unique subject token")

    async def _check_queue_space(self) -> None:
        try:
            waiting = 0
            for queue in ENGINE_QUEUES.values():
                waiting += await self.queue.zcard(queue)
        except (RedisError, OSError) as exc:
            raise _queue_down() from exc
        if waiting >= self.settings.max_queue:
            raise UserError(
                f"I'm busy: {waiting} jobs are waiting. Nothing was queued; "
                "try again in a few minutes."
            )

    async def _enqueue(self, function: str, job_id: str, payload: dict[str, Any]) -> int:
        queue = ENGINE_QUEUES[function]
        try:
            await self.queue.enqueue_job(function, payload, _job_id=job_id, _queue_name=queue)
            return int(await self.queue.zcard(queue))
        except (RedisError, OSError) as exc:
            log.exception("enqueue of job %s failed", job_id)
            raise _queue_down() from exc


def _pin_active(prompt: str, subjects: Sequence[Subject]) -> str:
    """``prompt`` with ``[V]`` replaced by ``[name]`` of the subject it means now."""
    ready = [s for s in subjects if s.status == "ready"]
    if not ready:
        return prompt
    return _ACTIVE_REF.sub(f"[{ready[0].name}]", prompt)


def _queue_down() -> UserError:
    return UserError(
        "The job queue can't be reached right now, so nothing was queued. Try again in a minute."
    )
