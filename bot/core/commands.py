"""The chat commands, platform-free: /train, /imagine, /subjects, /use, /forget, /jobs,
/cancel, /quota, /help (and /share, /unshare through ``Core.sharing``; /mydata through
``Core.personal_data``).

Adapters call these with plain values and render the returned text; errors a user can cause
raise ``UserError``. Nothing here knows about Discord, Slack or the terminal.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import aiosqlite
from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix, job_key_prefix, result_key_prefix
from pydantic import ValidationError
from redis.exceptions import RedisError

from bot.config import Settings
from bot.core.errors import UserError, as_typed
from bot.core.moderation import (
    CancelState,
    Moderation,
    QueueState,
    describe_job,
    draws_images,
    images_word,
    job_prefix,
    job_queue,
    when,
)
from bot.core.personal_data import PersonalData
from bot.core.photos import PhotoRules, Upload, prepare_photos
from bot.core.prompts import (
    SUBJECT_REF,
    SubjectLookup,
    active_subject,
    format_names,
    resolve_prompt,
)
from bot.core.quotas import Limits, Quotas, check_allowance, format_duration
from bot.core.retention import Retention
from bot.core.sharing import Sharing, stopped_note
from bot.core.store import (
    Job,
    Owner,
    Redo,
    RedoPending,
    Store,
    Subject,
    WorkspaceSettings,
    utcnow,
)
from bot.core.syntax import TEXT_SYNTAX, CommandSyntax, train_example
from bot.core.tokens import pick_token, usable_vocabulary_tokens
from engine.api import (
    ASPECT_RATIOS,
    DELIVER_FAILURE,
    ENGINES_KEY,
    GENERATE,
    JOB_KINDS,
    LEGACY_QUEUES,
    SHOWCASE,
    TRAIN_SUBJECT,
    AdapterRef,
    EngineHeartbeat,
    Failure,
    GenerateRequest,
    ShowcaseRequest,
    TrainRequest,
    bot_queue,
    engine_alive_key,
    engine_queues,
    model_queue,
    rare_tokens_key,
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
                                  option: --model NAME, one of the configured base models
/imagine <prompt>                 draw a prompt; [V] is your active subject (see /use),
                                  [name] a named one (yours, or one shared with you: see
                                  /subjects)
                                  e.g. /imagine a [V] dog wearing a hat
                                  options: --count N (1-4), --seed N, --no "things to avoid",
                                  --aspect square|portrait|landscape|wide, --steps N,
                                  --guidance X, --strength X (how strongly your subject shows)
/reroll, /vary [N], /upscale [N]  redo your last result: new seed, a close variation of
                                  image N, or image N enlarged
/showcase [name]                  your subject in the DreamBooth paper's five capabilities
/subjects                         list your subjects and their status, and which is [V]
/use [name]                       make one of your ready subjects [V] (it stays [V] when you
                                  train others); /use alone: [V] is your newest ready subject
/forget <name>                    delete a subject, its photos and its adapter
/share <name> everyone            let every user here draw your subject (others: /unshare)
/unshare <name> [everyone]        stop sharing it
/jobs                             your jobs waiting or running, with their ids
/cancel [name or job id]          cancel your newest job, a subject's training, or the job
                                  whose id starts so (4+ characters, as /jobs shows)
/quota                            your usage today and when it resets (midnight UTC)
/mydata                           what dreambot keeps about you here, and for how long
/mydata delete                    delete it all: your subjects, images and prompts (your
                                  jobs are cancelled); /mydata delete confirm goes ahead
/mod help                         moderator commands (moderators only)
/help                             this text"""
"""How the commands are typed in the shell; other adapters pass their own to ``help_text``."""

HELP = f"{HELP_INTRO}\n\n{SHELL_USAGE}"

DATA_DELETED_REDO = (
    "That result's prompt and images were deleted with its owner's data, so it can't be "
    "redrawn. Nothing was queued; draw something new with /imagine."
)
"""The answer to a Reroll, Vary or Upscale of a job whose data was deleted (/mydata delete)."""

SHOWCASE_CELLS = 10
"""Images in a showcase grid (five capabilities, two prompts each; see engine.showcase)."""

SUBMIT_CHECK_SECONDS = 2.0
"""How long a submission whose outcome was lost keeps asking Redis whether the job got there."""
SUBMIT_CHECK_INTERVAL = 0.2

UNCONFIRMED_NOTE = (
    "sent, but the job queue stopped answering before it confirmed the job, so I can't tell "
    "yet whether it got there. If it did, it runs as usual; if it didn't, I'll say so here "
    "once the queue answers again and give your quota back."
)
NEVER_QUEUED = (
    "it never reached the job queue (I was cut off while sending it). "
    "Your quota is given back; please try again."
)

REQUEST_MEMORY_SECONDS = 3600
"""How long ``Core.first_time`` remembers a platform's request id: Slack sends an event again
up to three times within about five minutes when it did not see our answer in time."""

ENGINE_CHECK_SECONDS = 1.0
"""How long a receipt waits to learn whether an engine is there before it says nothing."""
NO_ENGINE_NOTE = (
    "No engine is running right now; your job waits in the queue and starts when one is back."
)

# The heartbeats of the engines listed in ENGINES_KEY (KEYS[1]); ARGV[1] is the prefix of their
# keys. An engine whose key has expired leaves the list, in the same step, so the read and the
# clean-up cannot race with an engine's own renewal (SET + SADD in one transaction).
_LIVE_ENGINES_SCRIPT = """
local alive = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
    local heartbeat = redis.call('GET', ARGV[1] .. id)
    if heartbeat then
        table.insert(alive, heartbeat)
    else
        redis.call('SREM', KEYS[1], id)
    end
end
return alive
"""


def engine_note(engines: Sequence[EngineHeartbeat], model: str) -> str:
    """What a receipt adds about the running ``engines`` for a job on base model ``model``:
    nothing when one of them serves it."""
    if any(model in engine.models for engine in engines):
        return ""
    if not engines:
        return NO_ENGINE_NOTE
    served = sorted({name for engine in engines for name in engine.models})
    # Each model has its own queues (engine.api.model_queue): the job waits for an engine.
    return (
        f"No running engine serves the model {model} (they serve {', '.join(served)}), so "
        "this job waits until one that does starts; a moderator can check the engines with "
        "/mod status."
    )


@dataclass(frozen=True)
class Submission:
    """How queueing an engine job went: its place in the queue, and whether Redis confirmed it.

    Unconfirmed: Redis stopped answering mid-submission and nobody can tell yet whether the job
    got there; its row is kept, marked, and settled later (``Core.settle_unconfirmed_jobs``).
    ``position`` is then where it would be.
    """

    position: int
    confirmed: bool = True
    engine_note: str = ""
    """Why the job may not start soon (``engine_note``), or nothing."""

    @property
    def status(self) -> str:
        """The end of a receipt's first sentence: ``queued (position 2).`` or why not sure."""
        return f"queued (position {self.position})." if self.confirmed else UNCONFIRMED_NOTE

    def receipt(self, job_id: str, text: str, label: str = "") -> Receipt:
        """The receipt telling ``text``, then the engine note on a line of its own; ``label``
        names the job in its progress messages (``Receipt.label``)."""
        if self.engine_note:
            text = f"{text}\n{self.engine_note}"
        return Receipt(job_id, self.position, text, self.confirmed, label)


@dataclass(frozen=True)
class Receipt:
    """What the user is told right after a job was queued (or, unless ``confirmed``, sent
    without the queue confirming it; see ``Submission``)."""

    job_id: str
    position: int
    text: str
    confirmed: bool = True
    label: str = ""
    """How the job's progress messages name it (``rex``, ``your images``), the first one
    (posted by the adapter) as the later ones (``bot.core.delivery``)."""


def images_label(count: int) -> str:
    """How the progress messages of an image job name what it draws: ``your image``, or
    ``your images`` when it draws more than one."""
    return f"your {images_word(count)}"


def checks_images(safety_on: bool, destination: dict[str, Any]) -> bool:
    """Whether a job posted to ``destination`` has its images screened by the engines' safety
    checker: always while the workspace's safety filter is on (/mod safety). With it off, only
    a destination the platform marks as age-restricted goes unchecked where the platform has
    such channels (Discord, whose rules keep adult content in age-restricted channels: the
    adapter sets ``age_restricted``); elsewhere (Slack, the shell) the switch alone decides."""
    return safety_on or destination.get("age_restricted") is False


def img2img_steps(steps: int, strength: float) -> int:
    """The fewest sampler steps, from ``steps`` up, at which img2img at ``strength`` draws at
    least one: the engine runs int(steps × strength) of them and refuses none, so a Vary of
    an image drawn with ``--steps 2`` takes 3 at strength 0.35."""
    while int(steps * strength) < 1:
        steps += 1
    return steps


PLAIN_RESIZE = "plain resize; no upscaler is configured"
"""How an Upscale at ``DREAMBOT_UPSCALE_STRENGTH`` 0 is described: the engine only resizes."""


@dataclass(frozen=True)
class Redraw:
    """What a Vary or an Upscale makes of one image of an earlier result, as its receipt and
    its result's caption say it. Kept in the job's options (``redraw``), so the caption is
    right after a restart."""

    action: Literal["vary", "upscale"]
    image: int
    """The image it starts from, from 0."""
    strength: float
    """The img2img strength; 0 (an Upscale only) is a plain resize."""
    factor: int = 1
    """How many times each side is enlarged (an Upscale)."""

    def caption(self, count: int = 1) -> str:
        """``variations of image 2``; ``image 1 enlarged 2× (img2img at strength 0.3)``, or
        ``(plain resize; no upscaler is configured)``."""
        number = self.image + 1
        if self.action == "vary":
            return f"{'variations' if count > 1 else 'variation'} of image {number}"
        return f"image {number} enlarged {self.factor}× ({self.how})"

    @property
    def how(self) -> str:
        """How an Upscale enlarges: ``img2img at strength 0.3``, or a plain resize."""
        return f"img2img at strength {self.strength:g}" if self.strength else PLAIN_RESIZE

    @property
    def plain_resize(self) -> bool:
        """Whether the engine only resizes the image (nothing is drawn, no seed or steps)."""
        return self.action == "upscale" and not self.strength

    def option(self) -> dict[str, Any]:
        """As the job's options keep it (``from_options`` reads it back)."""
        return {
            "action": self.action,
            "image": self.image,
            "strength": self.strength,
            "factor": self.factor,
        }

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> Redraw | None:
        """The Vary or Upscale a job's options record; None for any other job."""
        kept = options.get("redraw")
        if not isinstance(kept, dict) or kept.get("action") not in ("vary", "upscale"):
            return None
        return cls(
            kept["action"],
            int(kept.get("image") or 0),
            float(kept.get("strength") or 0),
            int(kept.get("factor") or 1),
        )


CANCEL_STATES: dict[CancelState, str] = {
    "removed": "taken out of the queue",
    "running": "the engine stops it at its next step",
    "gone": "it had already left the queue, so nothing more comes of it",
    "unreachable": (
        "the job queue can't be reached right now, so the engine may still finish it, but "
        "nothing from it will be posted"
    ),
}
"""How a user's own cancellation went in the queue, as their reply says it."""


@dataclass(frozen=True)
class NewSubject:
    """A subject /train may create, as ``Core.check_new_subject`` found it before the photos:
    its name and class as they will be stored, its base model, the failed subject of that name
    it replaces (or None), and the caller's limits (for the binding quota check)."""

    name: str
    class_noun: str
    base_model: str
    replaces: Subject | None
    limits: Limits
    safety_check: bool = True
    """Whether the workspace has the engines' safety checker on (/mod safety)."""


@dataclass(frozen=True)
class SubjectDeletion:
    """What deleting a subject stopped (``Core.delete_subject``)."""

    training_stopped: bool
    """Its training was waiting or running, and was stopped."""
    images_stopped: int
    """Image jobs drawing it (anyone's) that were stopped."""


@dataclass(frozen=True)
class Cancellation:
    """A job its owner cancelled: the job (as it was, with the adapter's progress message
    in its destination, which the adapter now closes) and the reply."""

    job: Job
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
        self.sharing = Sharing(self)
        self.retention = Retention(self)
        self.personal_data = PersonalData(self)
        self.mention: Callable[[str], str] = str
        """How this platform writes a user id in a reply so that it shows who they are
        (``<@id>``): adapters whose platform has mentions set theirs."""
        self.syntax: CommandSyntax = TEXT_SYNTAX
        """How this platform types a command with arguments, for the hints in replies and
        results (`/use rex`): Slack's adapter sets ``/dreambot `` before the commands without
        a slash command of their own, Discord's names the options (`/use subject:rex`)."""
        self._live_engines_script = queue.register_script(_LIVE_ENGINES_SCRIPT)
        self.told_positions: dict[str, int] = {}
        """Job id → the queue position its receipt gave, until the delivery side has seen it
        (``Deliverer.show_queue_positions`` says a new one only when it differs)."""
        self.started_at = utcnow()
        self._leftovers_marked = False

    # Commands.

    async def check_new_subject(
        self,
        owner: Owner,
        name: str,
        class_noun: str,
        *,
        roles: Sequence[str] = (),
        model: str | None = None,
    ) -> NewSubject:
        """What /train checks before it needs the photos: a ban, the model, the name (its
        form, and not one the caller already uses), the class, the blocked words, and the
        caller's trainings left today. The name and class come back as they will be stored.

        ``train`` runs it first; an adapter whose photos come later (Slack's ``/train``, then
        a message with the photos) runs it when the command arrives, so the user learns of a
        refusal before uploading anything. See ``train`` for ``roles`` and ``model``.
        """
        await self.moderation.check_not_banned(owner)
        # Read once: the default model and the prompt filter both come from these.
        workspace_settings = await self.store.workspace_settings(owner.platform, owner.workspace)
        if model is None or not model.strip():
            base_model = await self.default_model(
                owner.platform, owner.workspace, workspace_settings
            )
        else:
            base_model = self.base_model_named(model)
        name, class_noun = name.strip(), " ".join(class_noun.lower().split())
        if not SUBJECT_NAME.match(name) or name.lower() == "v":
            raise UserError(
                f"{as_typed(name)} can't be a subject name: use 1-32 letters, digits, - or _ "
                "(and not 'V', which means your active subject in prompts)."
            )
        if not CLASS_NOUN.match(class_noun):
            raise UserError(
                f"{as_typed(class_noun)} isn't a class: say what kind of thing it is in a word "
                "or two, e.g. dog, cat, person, backpack, toy car."
            )
        await self.moderation.check_prompt(
            owner, f"{name} {class_noun}", subject=True, settings=workspace_settings
        )
        existing = await self.store.find_subject(owner, name)
        # A failed training (cancelled, or stopped by an error) left a subject that can't be
        # drawn; training the name again replaces it.
        if existing is not None and existing.status != "failed":
            raise UserError(
                f"You already have a subject called {existing.name}. Pick another name, "
                f"or `{self.syntax.hint('forget', ('name', existing.name))}` first."
            )
        # Discord shows __text__ underlined. Only new names: a subject named so before keeps
        # its name, also when a failed one is trained again.
        if existing is None and "__" in name:
            one = re.sub("_{2,}", "_", name)
            raise UserError(
                f"{as_typed(name)} can't be a subject name: two underscores in a row show as "
                f"underlined text on Discord. Use one at a time, or a -: "
                f"{as_typed(one)} or {as_typed(one.replace('_', '-'))}."
            )
        # A subject's token names it in prompts too ([zqv]): a name equal to another
        # subject's token would make [zqv] mean two subjects.
        tokens = await self.store.workspace_tokens(owner.platform, owner.workspace)
        if name.lower() in tokens and (existing is None or existing.token != name.lower()):
            raise UserError(
                f"{as_typed(name)} can't be a subject name here: it is the token of a subject "
                "in this workspace, which prompts can also use. Pick another name."
            )
        # Refuse before the costly photo work; the binding check comes with the job insert.
        limits = await self.quotas.precheck(owner, roles, "trainings", 1)
        return NewSubject(
            name, class_noun, base_model, existing, limits, workspace_settings.safety_check
        )

    async def train(
        self,
        owner: Owner,
        destination: dict[str, Any],
        name: str,
        class_noun: str,
        uploads: list[Upload],
        *,
        roles: Sequence[str] = (),
        model: str | None = None,
    ) -> Receipt:
        """Check and store the photos, record the subject and queue its training.

        ``roles`` are the caller's platform role ids, for role-based quota overrides.
        ``model`` names one of the configured base models (default: the workspace's default
        model if a moderator set one, else the configured default); the subject is drawn on
        that model from then on.
        """
        new = await self.check_new_subject(owner, name, class_noun, roles=roles, model=model)
        name, class_noun, base_model = new.name, new.class_noun, new.base_model
        photos = await prepare_photos(uploads, self.photo_rules)
        await self._check_queue_space()

        subject_id = uuid.uuid4().hex
        subject_url = self.artifacts.url("subjects", subject_id)
        photos_url = f"{subject_url}/photos"
        photo_urls = [f"{photos_url}/{i:02d}.png" for i in range(len(photos))]
        shared_before: list[str] = []
        if new.replaces is not None:
            # Its sharing ends with it (ON DELETE CASCADE): the new photos may show something
            # else, so the new subject is shared only on purpose; the receipt says so.
            shared_before = (await self.store.subject_shares(owner)).get(new.replaces.id, [])
            await self.remove_subject(new.replaces)
        subject = await self._insert_subject(
            owner, subject_id, name, class_noun, photos_url, len(photos), base_model
        )
        job_id = uuid.uuid4().hex
        queue = model_queue("train", base_model)
        try:
            for url, data in zip(photo_urls, photos, strict=True):
                await self.artifacts.aput_bytes(url, data)
            await self.store.reserve_job(
                job_id,
                "train",
                owner,
                destination,
                subject_id=subject_id,
                options={"queue": queue},  # where to find it (``job_queue``)
                usage_kind="trainings",
                units=1,
                check=functools.partial(check_allowance, new.limits, kind="trainings", units=1),
            )
            # A ban made while this command ran may have swept the user's jobs before this
            # one was recorded; look again now that it is (the row goes, as for any refusal).
            await self.moderation.check_not_banned(owner)
            request = TrainRequest(
                job_id=job_id,
                reply_queue=bot_queue(self.platform),
                subject_id=subject_id,
                token=subject.token,
                class_noun=class_noun,
                name=name,
                photo_urls=photo_urls,
                adapter_url=f"{subject_url}/adapter.safetensors",
                samples_url=f"{subject_url}/samples",
                base_model=base_model,
                steps=self.settings.train_steps,
                safety_check=checks_images(new.safety_check, destination),
            )
            submission = await self._enqueue(TRAIN_SUBJECT, job_id, request.model_dump(), queue)
        except BaseException:
            if not await self.store.is_unconfirmed(job_id):  # kept: Redis may hold the job
                await self.store.delete_job(job_id)
                await self.store.delete_subject(subject_id)
                await self.artifacts.adelete_tree(subject_url)
            raise
        text = (
            f"Training {name} ({class_noun}) from {len(photos)} photos: {submission.status} "
            "I'll post progress here."
        )
        if shared_before:
            text += (
                f" The {name} you replaced was shared with {self.sharing.whom(shared_before)}; "
                f"this one isn't yet: `{self.syntax.hint('share', ('subject', name), '…')}` "
                "shares it again."
            )
        return submission.receipt(job_id, text, name)

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
        aspect: str | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        strength: float | None = None,
        init_image_url: str | None = None,
        init_strength: float | None = None,
        roles: Sequence[str] = (),
        redo: Redo | None = None,
        redraw: Redraw | None = None,
    ) -> Receipt:
        """Resolve the prompt's subjects, check it against the rules and quotas, queue it.

        ``roles`` are the caller's platform role ids, for role-based quota overrides.
        ``width``/``height`` (multiples of 8) default to the base model's native size;
        ``aspect`` (square, portrait, landscape, wide) lets the engine pick a size its model
        draws well. ``steps`` and ``guidance`` are bounded by the configuration; ``strength``
        is the subjects' LoRA scale (1 = as trained). ``init_image_url``/``init_strength``
        start from an earlier image (Vary, Upscale). The options are stored with the job, so
        ``reimagine`` can repeat them; ``redo`` is ``reimagine``'s (see there), and ``redraw``
        says what its Vary or Upscale does, for the receipt and the result. The engines run
        their safety checker on the images unless the workspace turned it off (/mod safety).
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
        self._check_generation_options(aspect, steps, guidance, strength)
        # The caller's own subjects and those shared with them (``[name]`` prefers their own).
        subjects = await self.sharing.lookup(owner)
        resolved = resolve_prompt(prompt, subjects, max_chars=self.settings.max_prompt_chars)
        negative = (
            resolve_prompt(negative_prompt, subjects, max_chars=self.settings.max_prompt_chars).text
            if negative_prompt.strip()
            else ""
        )
        # Read once: the prompt filter and the default model both come from these.
        workspace_settings = await self.store.workspace_settings(owner.platform, owner.workspace)
        await self.moderation.check_prompt(
            owner, resolved.text, negative, settings=workspace_settings
        )
        base_model = _common_base_model(
            resolved.subjects,
            await self.default_model(owner.platform, owner.workspace, workspace_settings),
        )
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
            steps=steps or self.settings.generate_steps,
            guidance=self.settings.guidance_scale if guidance is None else guidance,
            width=width,
            height=height,
            aspect=aspect,
            adapters=[
                AdapterRef(
                    name=s.id,
                    url=s.adapter_url or "",
                    scale=1.0 if strength is None else strength,
                    token=s.token,
                )
                for s in resolved.subjects
            ],
            output_url=self.artifacts.url("outputs", job_id),
            base_model=base_model,
            init_image_url=init_image_url,
            init_strength=0.5 if init_strength is None else init_strength,
            safety_check=checks_images(workspace_settings.safety_check, destination),
        )
        subject_id = resolved.subjects[0].id if resolved.subjects else None
        options = {
            # [V] (and a shared subject's name) pinned to the subject it meant now, so a later
            # Reroll draws the same one.
            "prompt": subjects.pinned(prompt),
            "negative_prompt": subjects.pinned(negative_prompt),
            "count": count,
            "seed": seed,
            "width": width,
            "height": height,
        }
        if resolved.subjects:
            # Which subjects it draws (id → name), so that deleting or unsharing one stops
            # this job, and a redo of it can say which one is gone (bot.core.sharing).
            options["subjects"] = {s.id: s.name for s in resolved.subjects}
        # Only what was asked for, so older jobs and plain requests keep their shape.
        extra = {"aspect": aspect, "steps": steps, "guidance": guidance, "strength": strength}
        options.update({key: value for key, value in extra.items() if value is not None})
        if redraw is not None:
            options["redraw"] = redraw.option()
        submission = await self._queue_images(
            GENERATE,
            request,
            owner,
            destination,
            limits,
            count,
            subject_id=subject_id,
            # What /jobs and the result show: as typed, or for a redo, whose prompt has its
            # subjects pinned, with shared ones by name where that is unambiguous.
            prompt=prompt if redo is None else subjects.written(prompt),
            options=options,
            redo=redo,
        )
        return submission.receipt(
            job_id, _drawing_text(count, seed, request, redraw, submission), images_label(count)
        )

    async def reimagine(
        self,
        owner: Owner,
        destination: dict[str, Any],
        job_id: str,
        *,
        vary: bool = False,
        upscale: bool = False,
        index: int = 0,
        roles: Sequence[str] = (),
        mention: Callable[[str], str] = str,
    ) -> Receipt:
        """Reroll (new seed), Vary (img2img close to image ``index``) or Upscale (image
        ``index`` at ``upscale_factor`` times the size) a generation, as ``owner``.

        Whoever clicks queues the job and pays for it from their own quota, with the original
        prompt, negative prompt, count and size. A prompt that uses a subject may only be
        redrawn by the subject's owner: subjects resolve per user, and one user's photos must
        not be drawn on another's request. ``mention`` renders a user id for the refusal.

        Once per press: while the job that the same redo (button and image) of this result
        queued for ``owner`` waits or runs, pressing it again (a double click, a click that
        seemed lost) queues and charges nothing, and the UserError points at that job. Once
        that job has ended, the button queues a new one.
        """
        button = "vary" if vary else "upscale" if upscale else "reroll"
        redo = Redo(job_id, button if button == "reroll" else f"{button}:{index}")
        await self.moderation.check_not_banned(owner)  # (imagine checks again, race-free)
        pending = await self.store.pending_redo(owner, redo)
        if pending is not None:
            raise _redo_pending(redo, pending)
        job = await self.store.get_job(job_id)
        if job is not None and job.data_deleted_at is not None:
            raise UserError(DATA_DELETED_REDO)
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
                f"Only {mention(job.owner.user_id)} can reroll these images: they draw a "
                "subject, and subjects are drawn on their users' own requests. Nothing was "
                "queued; draw your own with /imagine."
            )
        if options.get("showcase"):
            raise UserError("That was a showcase; run /showcase again for a new one.")
        await self.sharing.check_redrawable(owner, job)
        count = options.get("count") or len(result.get("image_urls") or []) or None
        repeat: dict[str, Any] = {
            key: options.get(key)
            for key in ("width", "height", "aspect", "steps", "guidance", "strength")
        }
        seed = None
        if vary or upscale:
            # Vary: img2img from the chosen image at a low strength, with its seed, so the
            # result stays close to it. Upscale: the same at a larger size (or, with an
            # upscale strength of 0, a plain resize).
            urls = result.get("image_urls") or []
            original = result.get("seed", options.get("seed"))
            if not urls and result.get("withheld"):
                # Before the sweep's answer: there never was an image to keep.
                raise UserError(
                    "The safety filter withheld every image of that result, so there is none "
                    f"to {button}. Nothing was queued."
                )
            if job.images_deleted_at is not None:
                raise UserError(
                    self.image_gone_text(
                        original if isinstance(original, int) else None,
                        redrawn=Redraw.from_options(options),
                    )
                )
            if not urls:
                raise UserError("That image isn't finished yet; try again when it is posted.")
            if not 0 <= index < len(urls):
                raise UserError(f"Pick an image from 1 to {len(urls)}.")
            seed = original if isinstance(original, int) else None
            repeat["init_image_url"] = urls[index]
            repeat["init_strength"] = self.settings.vary_strength
            repeat["redraw"] = Redraw("vary", index, self.settings.vary_strength)
            if upscale:
                factor = self.settings.upscale_factor
                width, height = result.get("width"), result.get("height")
                if not isinstance(width, int) or not isinstance(height, int):
                    raise UserError("I no longer know that image's size; use /imagine instead.")
                if max(width, height) * factor > 2048:
                    raise UserError("That image is as large as I make them.")
                repeat.update(
                    width=width * factor,
                    height=height * factor,
                    aspect=None,
                    init_strength=self.settings.upscale_strength,
                    redraw=Redraw("upscale", index, self.settings.upscale_strength, factor),
                )
                count = 1
            if repeat["init_strength"]:
                repeat["steps"] = img2img_steps(
                    repeat["steps"] or self.settings.generate_steps, repeat["init_strength"]
                )
        return await self.imagine(
            owner,
            destination,
            prompt,
            count=count,
            seed=seed,
            negative_prompt=negative,
            roles=roles,
            redo=redo,
            **repeat,
        )

    def image_gone_text(self, seed: int | None, *, redrawn: Redraw | None = None) -> str:
        """The answer to Vary or Upscale of an image the retention sweep deleted: how long
        images are kept, and how to draw it again (the same prompt with its ``seed``), unless
        it was ``redrawn`` itself from an earlier image (a Vary's or an Upscale's result,
        which the prompt and seed alone don't draw again)."""
        days = self.settings.keep_images_days
        kept = f": images are kept {days} days" if days else ""
        if redrawn is not None:
            number = redrawn.image + 1
            made = (
                f"a variation of image {number} of an earlier result"
                if redrawn.action == "vary"
                else f"image {number} of an earlier result enlarged {redrawn.factor}×"
            )
            return (
                f"That image is no longer stored{kept}. Nothing was queued. It was {made}, "
                "which the prompt and seed alone don't draw again; Reroll still draws the "
                "prompt with a new seed."
            )
        seed_word = str(seed) if seed is not None else "<its seed>"
        if self.syntax.named_options:
            again = self.syntax.hint(
                "imagine", ("prompt", "<the same prompt>"), ("seed", seed_word)
            )
        else:
            again = f"{self.syntax.name('imagine')} <the same prompt> --seed {seed_word}"
        return (
            f"That image is no longer stored{kept}. Nothing was queued. To draw it again, use "
            f"`{again}` (with the same options, the seed shown with the result draws the same "
            "images); Reroll still draws the prompt with a new seed."
        )

    async def showcase(
        self,
        owner: Owner,
        destination: dict[str, Any],
        name: str | None = None,
        *,
        roles: Sequence[str] = (),
    ) -> Receipt:
        """/showcase [name]: one grid of the subject in the DreamBooth paper's five
        capabilities (two prompts each, chosen for a living thing or an object).

        Without ``name``, the caller's active subject ([V]). Costs one image per cell.
        """
        await self.moderation.check_not_banned(owner)
        # The prompt resolver gives the same messages as /imagine for unknown or unready names,
        # and finds the subjects shared with the caller as /imagine does.
        subjects = await self.sharing.lookup(owner)
        reference = f"[{name.strip()}]" if name and name.strip() else "[V]"
        [subject] = resolve_prompt(reference, subjects, max_chars=10_000).subjects
        await self._check_queue_space()
        limits = await self.quotas.limits(owner, roles)
        units = SHOWCASE_CELLS
        job_id = uuid.uuid4().hex
        request = ShowcaseRequest(
            job_id=job_id,
            reply_queue=bot_queue(self.platform),
            subject=AdapterRef(name=subject.id, url=subject.adapter_url or "", token=subject.token),
            token=subject.token,
            class_noun=subject.class_noun,
            name=subject.name,
            seed=random.SystemRandom().randrange(2**32),
            steps=self.settings.generate_steps,
            output_url=self.artifacts.url("outputs", job_id),
            base_model=subject.base_model,
            safety_check=checks_images(
                (await self.store.workspace_settings(owner.platform, owner.workspace)).safety_check,
                destination,
            ),
        )
        submission = await self._queue_images(
            SHOWCASE,
            request,
            owner,
            destination,
            limits,
            units,
            subject_id=subject.id,
            prompt=f"showcase of {subject.name}",
            options={
                "showcase": subject.name,
                "seed": request.seed,
                "subjects": {subject.id: subject.name},
            },
        )
        return submission.receipt(
            job_id,
            f"Drawing the showcase of {subject.name}: {units} images in one grid "
            f"(recontextualisation, art renditions, novel views, property modification, "
            f"accessorisation): {submission.status}",
            f"showcase of {subject.name}",
        )

    async def list_subjects(self, owner: Owner) -> list[Subject]:
        """The caller's subjects, newest first."""
        return await self.store.list_subjects(owner)

    async def job_choices(self, owner: Owner) -> list[tuple[str, str]]:
        """The caller's waiting and running jobs here, newest first, as (what it is with the
        start of its id, that start): what a chat client suggests for /cancel."""
        jobs = await self.store.active_jobs(owner.platform, owner.workspace, owner.user_id)
        names = await self.moderation.subject_names(jobs)
        return [
            (f"{describe_job(job, names.get(job.id))} ({job.id[:8]})", job.id[:8])
            for job in reversed(jobs)
        ]

    async def subjects_text(self, owner: Owner) -> str:
        """/subjects: the caller's subjects with their status (and whom each is shared with),
        which one ``[V]`` means and whether they chose it with /use or it is their newest
        ready one, then the subjects other users shared with them."""
        await self.moderation.check_not_banned(owner)
        subjects = await self.list_subjects(owner)
        shared_notes, shared_lines = await self.sharing.subjects_lines(owner, subjects)
        chosen_id = await self.store.chosen_subject_id(owner)
        active = active_subject(subjects, chosen_id)
        lines = (
            ["Your subjects:"]
            if subjects
            else [f"You have no subjects yet. Train one: `{train_example(self.syntax)}`."]
        )
        use = self.syntax.name("use")
        for subject in subjects:
            marker = ""
            if subject is active:
                how = f"chosen with {use}" if subject.id == chosen_id else "your newest ready one"
                marker = f"  ← [V] ({how})"
            detail = f" ({subject.error})" if subject.status == "failed" and subject.error else ""
            shared = f" · {shared_notes[subject.id]}" if subject.id in shared_notes else ""
            lines.append(
                f"  {subject.name}: {subject.class_noun}, {subject.status}{detail}, "
                f"{subject.photo_count} photos, since {when(subject.created_at)}{marker}{shared}"
            )
        chosen = next((s for s in subjects if s.id == chosen_id), None)
        if chosen is not None and chosen is not active:
            instead = (
                f"[V] is {active.name}, your newest ready subject, until it is ready again"
                if active is not None
                else "[V] works once one of your subjects is ready"
            )
            lines.append(
                f"You chose {chosen.name} with {use}, but it is {chosen.status}, so {instead}."
            )
        elif chosen is not None:
            lines.append(f"`{use}` alone makes [V] your newest ready subject again.")
        elif sum(s.status == "ready" for s in subjects) > 1:
            choose = self.syntax.hint("use", ("subject", "<name>"))
            lines.append(f"`{choose}` makes another of your ready subjects [V].")
        return "\n".join([*lines, *shared_lines])

    async def use(self, owner: Owner, name: str | None = None) -> str:
        """/use [name]: make one of the caller's own ready subjects their ``[V]`` in this
        workspace (kept in SQLite: a subject trained later does not replace it), or without
        ``name`` go back to their newest ready subject. A subject still training, a failed
        one and a shared one (written ``[name]`` or ``[token]``, never ``[V]``) are refused.
        A chosen subject that is deleted, or no longer ready, is passed over: ``[V]`` is the
        newest ready one then."""
        await self.moderation.check_not_banned(owner)
        wanted = (name or "").strip()
        if wanted.startswith("[") and wanted.endswith("]"):  # /use [rex], as a prompt writes it
            wanted = wanted[1:-1].strip()
        lookup = await self.sharing.lookup(owner)
        use = self.syntax.name("use")
        current = lookup.active
        if not wanted:
            if lookup.chosen is None or not await self.store.clear_chosen_subject(owner):
                now = f", {current.name}" if current is not None else ", once one is ready"
                return (
                    f"[V] already means your newest ready subject{now}; nothing changed. "
                    f"`{self.syntax.hint('use', ('subject', '<name>'))}` makes one of your "
                    "ready subjects [V]."
                )
            newest = active_subject(lookup.own)
            now = f": {newest.name}" if newest is not None else ", once one is ready"
            return f"[V] means your newest ready subject again{now}."
        key = wanted.lower()
        subject = next((s for s in lookup.own if s.name.lower() == key), None)
        if subject is None:
            raise UserError(_not_yours_to_use(lookup, wanted))
        stays = f" [V] stays {current.name}." if current is not None else ""
        if subject.status != "ready":
            if subject.status == "failed":
                raise UserError(
                    f"{subject.name} failed to train, so it can't be [V]: train it again "
                    f"first (`{self.train_hint(subject)}`).{stays}"
                )
            raise UserError(
                f"{subject.name} is still {subject.status}; "
                f"`{self.syntax.hint('use', ('subject', subject.name))}` works once it is "
                f"ready.{stays}"
            )
        if lookup.chosen == subject.id:
            return f"[V] already means {subject.name}, as you chose; nothing changed."
        if not await self.store.choose_subject(owner, subject.id):
            raise UserError(f"{subject.name} was deleted just now, so [V] is unchanged.")
        text = (
            f"[V] now means {subject.name} ({subject.class_noun}), also after you train "
            f"others: `{self.syntax.hint('imagine', ('prompt', 'a [V] on the beach'))}` draws it."
        )
        if current is not None and current.id != subject.id:
            text += f" (It was {current.name}.)"
        return f"{text} `{use}` alone goes back to your newest ready subject."

    def train_hint(self, subject: Subject) -> str:
        """How to train ``subject`` again: `/train rex dog …` (``/train name:rex …``)."""
        return self.syntax.hint("train", ("name", subject.name), ("class", subject.class_noun), "…")

    async def ready_text(self, subject: Subject, took: str) -> str:
        """What a finished training's result says: ``subject`` is ready, with a prompt to try
        (``took``: how many steps in how long). When the owner's ``[V]`` stays another subject
        (one they chose with /use, or a newer one), it says so and how to change it, rather
        than suggesting a ``[V]`` that would draw the other one."""
        owner = subject.owner
        active = active_subject(
            await self.store.list_subjects(owner), await self.store.chosen_subject_id(owner)
        )
        other = active if active is not None and active.id != subject.id else None
        reference = "[V]" if other is None else f"[{subject.name}]"
        example = self.syntax.hint(
            "imagine", ("prompt", f"a {reference} {subject.class_noun} on the beach")
        )
        text = f"{subject.name} is ready — try {example}  ({took})"
        if other is None:
            return text
        return (
            f"{text}\n[V] is still {other.name}; "
            f"`{self.syntax.hint('use', ('subject', subject.name))}` to draw {subject.name} "
            "as [V]."
        )

    async def forget(self, owner: Owner, name: str) -> str:
        """/forget: delete one of the caller's subjects with its photos and adapter."""
        await self.moderation.check_not_banned(owner)
        subject = await self.store.find_subject(owner, name.strip())
        if subject is None:
            subjects = await self.list_subjects(owner)
            names = ", ".join(s.name for s in subjects) or "none"
            raise UserError(f"You have no subject called {as_typed(name)}. Your subjects: {names}.")
        shares = (await self.store.subject_shares(owner)).get(subject.id, [])
        chosen_id = await self.store.chosen_subject_id(owner)
        # [V] meant it: chosen with /use, or the newest ready subject (no chosen one ready).
        active = active_subject(await self.list_subjects(owner), chosen_id)
        was_v = subject.id in (chosen_id, active.id if active is not None else None)
        deletion = await self.delete_subject(
            subject,
            training_message=f"Training {subject.name} was stopped: you deleted it with /forget.",
            why=lambda job: (
                f"you deleted {subject.name} with /forget"
                if job.owner == owner
                else f"{subject.name} was deleted by its owner"
            ),
        )
        stopped = (
            " Its training was stopped, and what it took from your quota is back."
            if deletion.training_stopped
            else ""
        )
        stopped += stopped_note(deletion.images_stopped)
        if shares:
            stopped += f" It is no longer shared with {self.sharing.whom(shares)}."
        if was_v:
            # Whatever else was chosen isn't ready, so [V] is the newest ready one now.
            newest = active_subject(await self.list_subjects(owner))
            stopped += (
                f" It was your [V]; [V] is now your newest ready subject, {newest.name}."
                if newest is not None
                else " It was your [V]; [V] has no subject now: it works again once another "
                "subject of yours is ready."
            )
        return f"Forgot {subject.name}: its photos and adapter are deleted.{stopped}"

    async def delete_subject(
        self, subject: Subject, *, training_message: str, why: Callable[[Job], str]
    ) -> SubjectDeletion:
        """Delete a subject the way /forget does (also for moderators, and for /mydata
        delete): stop its training if it waits or runs (its owner hears ``training_message``
        where they asked for it, as for a moderator's cancel, so its progress message closes
        wherever it is; its units are given back), stop every image job drawing it, anyone's
        (each owner is told ``why(job)`` and refunded: ``Sharing.stop_jobs_drawing``), then
        delete its row (its shares and a /use choice of it go too: ON DELETE CASCADE), its
        photos, adapter and sample images."""
        owner = subject.owner
        training = False
        for job in await self.store.active_jobs(owner.platform, owner.workspace, owner.user_id):
            if job.subject_id == subject.id and job.kind == "train":
                training |= await self.moderation.cancel_job(job, training_message) is not None
        stopped = await self.sharing.stop_jobs_drawing(subject, why)
        await self.remove_subject(subject)
        return SubjectDeletion(training, stopped)

    async def remove_subject(self, subject: Subject) -> None:
        """Delete a subject's folder (photos, adapter, samples), then its row, stopping
        nothing (``delete_subject`` stops its jobs first). Files first: when the artifact
        store refuses, the subject is still listed, so deleting it again can finish the job
        rather than leave its photos behind unseen."""
        await self.artifacts.adelete_tree(self.artifacts.url("subjects", subject.id))
        await self.store.delete_subject(subject.id)

    async def quota_text(self, owner: Owner, roles: Sequence[str] = ()) -> str:
        """/quota: the caller's usage today, their limits, and when the day resets."""
        await self.moderation.check_not_banned(owner)
        return await self.quotas.usage_text(owner, roles)

    async def jobs_text(self, owner: Owner) -> str:
        """/jobs: the caller's jobs waiting or running in this workspace, oldest first: the
        start of each id (what /cancel takes), what it is, and where it stands; then how to
        cancel one, as this platform types it (``Core.syntax``)."""
        await self.moderation.check_not_banned(owner)
        jobs = await self.store.active_jobs(owner.platform, owner.workspace, owner.user_id)
        if not jobs:
            return "You have no jobs waiting or running here."
        names = await self.moderation.subject_names(jobs)
        states: dict[str, QueueState] | None = None
        started: dict[str, datetime] = {}
        try:
            states = await self.moderation.queue_states(jobs)
            if any(state.running for state in states.values()):
                started = {
                    running.job_id: running.started_at
                    for engine in await self.live_engines()
                    for running in engine.jobs
                }
        except (RedisError, OSError) as exc:  # what SQLite knows is still worth showing
            log.warning("/jobs could not read the queue: %s", exc)
        lines = [f"Your jobs waiting or running here ({len(jobs)}):"]
        for job in jobs:
            where = _job_state(job, states[job.id] if states else None, started.get(job.id))
            lines.append(f"  {job.id[:8]}  {describe_job(job, names.get(job.id))}  {where}")
        if states is None:
            lines.append("(The job queue can't be reached right now, so places are not shown.)")
        cancel = self.syntax.hint("cancel", ("target", "<id>"))
        lines.append(
            f"Cancel one with {cancel} (a training also by its subject's name); "
            f"{self.syntax.name('cancel')} alone cancels the newest."
        )
        return "\n".join(lines)

    async def cancel(self, owner: Owner, target: str | None = None) -> Cancellation:
        """/cancel [name or job id]: cancel one of the caller's own waiting or running jobs in
        this workspace, and give its quota back.

        No ``target``: the newest. A subject's name: its training. Otherwise the job whose id
        starts with ``target`` (4 or more characters, as /jobs shows). A waiting job leaves
        the queue; a running one is stopped by the engine at its next step. The adapter closes
        the job's progress message (``Cancellation.job``); nothing else is posted about it.
        """
        await self.moderation.check_not_banned(owner)
        jobs = await self.store.active_jobs(owner.platform, owner.workspace, owner.user_id)
        if not jobs:
            raise UserError(
                "You have no jobs waiting or running here, so there is nothing to cancel."
            )
        job = await self._own_job(owner, jobs, (target or "").strip())
        return await self._cancel_own(job)

    async def cancel_from_button(
        self, owner: Owner, job_id: str, *, mention: Callable[[str], str] = str
    ) -> Cancellation:
        """The Cancel button on a job's progress message, pressed by ``owner``: only the job's
        owner may cancel it (``mention`` renders a user id for the refusal)."""
        job = await self.store.get_job(job_id)
        if job is None or (job.owner.platform, job.owner.workspace) != (
            owner.platform,
            owner.workspace,
        ):
            raise UserError("I don't know that job.")
        if job.owner != owner:
            raise UserError(
                f"Only {mention(job.owner.user_id)} can cancel this job: it is theirs. "
                "Nothing was changed."
            )
        await self.moderation.check_not_banned(owner)
        if job.finished:
            raise UserError("That job has already ended; there is nothing to cancel.")
        return await self._cancel_own(job)

    async def _own_job(self, owner: Owner, jobs: list[Job], target: str) -> Job:
        """Which of the caller's active ``jobs`` (oldest first) ``target`` means."""
        list_jobs = self.syntax.name("jobs")
        if not target:
            return jobs[-1]
        subject = await self.store.find_subject(owner, target)
        if subject is not None:
            trainings = [j for j in jobs if j.kind == "train" and j.subject_id == subject.id]
            if trainings:
                return trainings[-1]
        start = job_prefix(target)
        matches = [job for job in jobs if start is not None and job.id.startswith(start)]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise UserError(
                f"{len(matches)} of your jobs start with {start}; give more of the id "
                f"(see {list_jobs})."
            )
        if subject is not None:
            raise UserError(
                f"{subject.name} isn't training (it is {subject.status}), so there is nothing "
                f"to cancel for it. Your jobs: {list_jobs}."
            )
        if start is not None:
            raise UserError(
                f"You have no subject called {as_typed(target)}, and none of your jobs waiting or "
                f"running here starts with {start}. Your jobs: {list_jobs}."
            )
        raise UserError(
            f"You have no subject called {as_typed(target)}. Give a subject's name, or at least "
            f"the first 4 characters of a job id from {list_jobs}."
        )

    async def _cancel_own(self, job: Job) -> Cancellation:
        """Cancel the caller's own ``job`` (see ``Moderation.cancel_job``) and say how it went."""
        name = (await self.moderation.subject_names([job])).get(job.id)
        what = describe_job(job, name)
        state = await self.moderation.cancel_job(
            job, f"You cancelled your {what}.", tell_owner=False
        )
        if state is None:
            have = "have" if draws_images(job) > 1 else "has"
            raise UserError(f"Your {what} {have} just ended; there is nothing to cancel.")
        text = (
            f"Cancelled your {what} (job {job.id[:8]}): {CANCEL_STATES[state]}. "
            "What it took from your quota is given back."
        )
        if name is not None:
            text += (
                f" {name} stays in your subjects as failed: "
                f"`{self.syntax.hint('train', ('name', name))}` again (with other photos or "
                f"another class) replaces it, or `{self.syntax.hint('forget', ('name', name))}` "
                "deletes it."
            )
        return Cancellation(job, text)

    async def mod(self, owner: Owner, is_moderator: bool, text: str) -> str:
        """/mod <text>: a moderator command as one line (see ``Moderation`` for typed calls)."""
        return await self.moderation.handle_text(owner, is_moderator, text)

    def help_text(self, usage: str | None = None) -> str:
        """/help: what dreambot does, then how to type the commands on this platform.

        ``usage`` is the adapter's own command syntax; the default is the shell's.
        """
        return f"{HELP_INTRO}\n\n{usage or SHELL_USAGE}"

    async def settle_unconfirmed_jobs(self) -> int:
        """Settle this platform's jobs whose submission the queue never confirmed (``_enqueue``).

        A job that Redis holds, or that has moved on (progress, result, cancel), is confirmed.
        One that Redis lacks is reported failed through the bot's own queue, as the engine
        would: its delivery marks it failed, refunds it and tells its owner, once. It stays
        marked until then, so a lost report is sent again (under the same id) on the next
        call. Returns how many were reported. Raises ``RedisError``/``OSError`` while Redis
        doesn't answer: call again later.

        The first call also takes up the jobs a previous process of this platform left
        waiting without marking them: stopped hard mid-send (killed, or shut down before its
        commands were), it recorded them and may never have queued them.
        """
        if not self._leftovers_marked:
            for job in await self.store.unfinished_jobs(self.platform):
                if job.status == "queued" and job.created_at < self.started_at:
                    await self.store.mark_unconfirmed(job.id)
            self._leftovers_marked = True
        reported = 0
        for job in await self.store.unconfirmed_jobs(self.platform):
            if job.status == "queued" and not await self._in_queue(job.id, job_queue(job)):
                log.warning("job %s never reached the queue; reporting it failed", job.id)
                await self.report_failure(job, NEVER_QUEUED, "unqueued")
                reported += 1
                continue
            # In Redis, or moved on (progress, result, cancel, the failure reported above).
            await self.store.mark_confirmed(job.id)
        return reported

    async def report_failure(self, job: Job, message: str, reason: str) -> None:
        """Tell a job's owner it failed, through the owner's bot queue as the engine would: the
        platform's bot process marks it failed, gives its units back and posts ``message``
        where the job was asked for, once, even after a restart (the report's id is
        ``reason:job id``, so sending it again is harmless). Raises ``RedisError``/``OSError``
        if Redis doesn't answer."""
        await self.queue.enqueue_job(
            DELIVER_FAILURE,
            Failure(job_id=job.id, message=message).model_dump(),
            _job_id=f"{reason}:{job.id}",
            _queue_name=bot_queue(job.owner.platform),
        )

    async def first_time(self, request_id: str) -> bool:
        """Whether a request from the chat platform (its own id, e.g. Slack's event id) comes
        for the first time: platforms send some again when they did not see the answer in
        time, and a command must not run twice. Remembered in Redis for
        ``REQUEST_MEMORY_SECONDS`` (SET NX, so two copies at once count once); True when Redis
        can't tell, so the command runs (and says so if it needs the queue)."""
        key = f"dreambot:{self.platform}:request:{request_id}"
        try:
            return bool(await self.queue.set(key, b"1", nx=True, ex=REQUEST_MEMORY_SECONDS))
        except (RedisError, OSError) as exc:
            log.warning("could not tell whether request %s came before: %s", request_id, exc)
            return True

    async def live_engines(self) -> list[EngineHeartbeat]:
        """The engines running now (their heartbeat has not expired), oldest first.

        One round trip; ids of engines whose key expired (stopped without a clean shutdown)
        leave the list of engines on the way. Raises ``RedisError``/``OSError`` if Redis
        doesn't answer.
        """
        values = await self._live_engines_script(keys=[ENGINES_KEY], args=[engine_alive_key("")])
        engines = []
        for value in values:
            try:
                engines.append(EngineHeartbeat.model_validate_json(value))
            except ValidationError as exc:  # an engine of another release; it still runs
                log.warning("unreadable engine heartbeat %r: %s", value[:200], exc)
        return sorted(engines, key=lambda engine: engine.started_at)

    async def queue_positions(self, unfinished: Sequence[Job]) -> dict[str, int]:
        """Where the ``unfinished`` jobs (this platform's undelivered ones) that no engine has
        started yet stand in their queues: job id → place (1: none ahead; running jobs stay in
        arq's queue until they end, so they count as ahead, as in a receipt). Jobs the queue
        doesn't hold are left out. Raises ``RedisError``/``OSError`` if Redis doesn't answer."""
        waiting = [
            job for job in unfinished if job.status == "queued" and job.kind in LEGACY_QUEUES
        ]
        if not waiting:
            return {}
        states = await self.moderation.queue_states(waiting)
        return {
            job_id: state.rank + 1 for job_id, state in states.items() if state.rank is not None
        }

    # Internals.

    async def _insert_subject(
        self,
        owner: Owner,
        subject_id: str,
        name: str,
        class_noun: str,
        photos_url: str,
        photo_count: int,
        base_model: str,
    ) -> Subject:
        vocabulary = await self._rare_tokens(base_model)
        for _ in range(5):
            # Nor a name of this workspace: [word] in a prompt must name one subject.
            taken = await self.store.workspace_tokens(
                owner.platform, owner.workspace
            ) | await self.store.workspace_names(owner.platform, owner.workspace)
            now = utcnow()
            subject = Subject(
                id=subject_id,
                owner=owner,
                name=name,
                class_noun=class_noun,
                token=pick_token(taken, vocabulary=vocabulary),
                status="queued",
                adapter_url=None,
                photos_url=photos_url,
                photo_count=photo_count,
                base_model=base_model,
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

    async def _rare_tokens(self, base_model: str) -> list[str]:
        """The rare tokens the engine published for ``base_model`` ([] if none yet)."""
        try:
            published = await self.queue.get(rare_tokens_key(base_model))
        except (RedisError, OSError) as exc:  # the job is queued next; that will say more
            log.warning("could not read the rare tokens of %s: %s", base_model, exc)
            return []
        return usable_vocabulary_tokens(published)

    async def default_model(
        self, platform: str, workspace: str, settings: WorkspaceSettings | None = None
    ) -> str:
        """The workspace's default base model: the one a moderator chose with /mod model if
        it is still configured, else the configured default. ``settings``: the workspace's,
        if the caller already read them (else they are read here)."""
        if settings is None:
            settings = await self.store.workspace_settings(platform, workspace)
        chosen = settings.default_model
        if chosen is not None and chosen in self.settings.model_names:
            return chosen
        if chosen is not None:
            log.warning(
                "workspace %s/%s's default model %r is no longer configured; using %r",
                platform,
                workspace,
                chosen,
                self.settings.base_model,
            )
        return self.settings.base_model

    def base_model_named(self, model: str | None) -> str:
        """The configured base model ``model`` names (None or blank: the configured default;
        ``train`` and ``imagine`` use ``default_model`` for the workspace's own)."""
        names = self.settings.model_names
        if model is None or not model.strip():
            return self.settings.base_model
        wanted = model.strip()
        for name in names:
            if name.lower() == wanted.lower():
                return name
        raise UserError(
            f"There is no model called {as_typed(wanted)}. Models: {', '.join(names)} "
            f"(default {self.settings.base_model})."
        )

    def _check_generation_options(
        self,
        aspect: str | None,
        steps: int | None,
        guidance: float | None,
        strength: float | None,
    ) -> None:
        settings = self.settings
        if aspect is not None and aspect not in ASPECT_RATIOS:
            raise UserError(f"aspect must be one of {', '.join(ASPECT_RATIOS)}.")
        if steps is not None and not 1 <= steps <= settings.generate_max_steps:
            raise UserError(f"steps must be from 1 to {settings.generate_max_steps}.")
        if guidance is not None and not 0 <= guidance <= settings.guidance_max:
            raise UserError(f"guidance must be from 0 to {settings.guidance_max:g}.")
        if strength is not None and not 0 <= strength <= settings.subject_strength_max:
            raise UserError(
                f"strength must be from 0 to {settings.subject_strength_max:g} (1 is as trained)."
            )

    async def _check_queue_space(self) -> None:
        try:
            waiting = 0
            for queue in engine_queues(self.settings.model_names):
                waiting += await self.queue.zcard(queue)
        except (RedisError, OSError) as exc:
            raise _queue_down() from exc
        if waiting >= self.settings.max_queue:
            raise UserError(
                f"I'm busy: {waiting} jobs are waiting. Nothing was queued; "
                "try again in a few minutes."
            )

    async def _queue_images(
        self,
        function: str,
        request: GenerateRequest | ShowcaseRequest,
        owner: Owner,
        destination: dict[str, Any],
        limits: Limits,
        units: int,
        *,
        subject_id: str | None,
        prompt: str,
        options: dict[str, Any],
        redo: Redo | None = None,
    ) -> Submission:
        """Record an image job with the quota units it spends and queue it. The job's row goes
        again if it is known not to have reached the queue. A ``redo`` whose earlier job still
        waits or runs is refused, spending nothing."""
        queue = model_queue(JOB_KINDS[function], request.base_model)
        try:
            await self.store.reserve_job(
                request.job_id,
                "generate",
                owner,
                destination,
                subject_id=subject_id,
                prompt=prompt,
                options={**options, "queue": queue},  # where to find it (``job_queue``)
                usage_kind="images",
                units=units,
                check=functools.partial(check_allowance, limits, kind="images", units=units),
                redo=redo,
            )
        except RedoPending as pending:
            assert redo is not None  # only a redo is refused so
            raise _redo_pending(redo, pending.job) from None
        except aiosqlite.IntegrityError as exc:
            # The job row names its subject: /forget (or a moderator) deleted it while this
            # command was being checked.
            if "FOREIGN KEY" not in str(exc):
                raise
            raise UserError(
                "A subject in that prompt was deleted just now, so nothing was queued."
            ) from None
        try:
            # A ban made while this command ran may have swept the user's jobs before this
            # one was recorded; look again now that it is (the row goes, as for any refusal).
            await self.moderation.check_not_banned(owner)
            return await self._enqueue(function, request.job_id, request.model_dump(), queue)
        except BaseException:
            if not await self.store.is_unconfirmed(request.job_id):  # kept: Redis may hold it
                await self.store.delete_job(request.job_id)
            raise

    async def _enqueue(
        self, function: str, job_id: str, payload: dict[str, Any], queue: str
    ) -> Submission:
        """Queue an engine job whose row is recorded, on ``queue`` (its model's, as the row
        records it).

        Raises the "nothing was queued" ``UserError`` only when the job is known not to be in
        the queue. When Redis stops answering mid-submission and can't be asked in time
        whether the job got there, or the command is cancelled while sending it, the row is
        marked unconfirmed and kept (the job may run): ``settle_unconfirmed_jobs`` decides
        later.
        """
        try:
            ahead = int(await self.queue.zcard(queue))
        except (RedisError, OSError) as exc:  # nothing was sent yet
            raise _queue_down() from exc
        try:
            queued = await self.queue.enqueue_job(
                function, payload, _job_id=job_id, _queue_name=queue
            )
        except (RedisError, OSError) as exc:
            log.warning("enqueue of job %s failed (%s); asking whether it arrived", job_id, exc)
            queued = None
        except asyncio.CancelledError:
            # The command was cancelled mid-submission (the bot shutting down): Redis may
            # have taken the job, so its row stays, to be settled like an unconfirmed one.
            log.warning("job %s: cancelled mid-submission; unconfirmed", job_id)
            await asyncio.shield(self.store.mark_unconfirmed(job_id))
            raise
        if queued is not None:
            await self._withdraw_if_cancelled(job_id, queue)
            self.told_positions[job_id] = ahead + 1
            return Submission(ahead + 1, engine_note=await self._engine_note(payload))
        # The failure may come after Redis took the job, with only its reply lost; arq even
        # answers None (not an error) when the connection drops during its transaction, as
        # redis-py reports that as a WatchError. Only Redis can say whether the job is there.
        found = await self._ask_whether_queued(job_id, queue)
        if found:
            log.warning("job %s reached the queue, but its reply was lost", job_id)
            await self._withdraw_if_cancelled(job_id, queue)
            self.told_positions[job_id] = ahead + 1
            return Submission(ahead + 1, engine_note=await self._engine_note(payload))
        if found is None:
            log.warning("job %s: the queue stopped answering mid-submission; unconfirmed", job_id)
            await self.store.mark_unconfirmed(job_id)
            return Submission(ahead + 1, confirmed=False)
        log.warning("job %s did not reach the queue", job_id)
        raise _queue_down()

    async def _withdraw_if_cancelled(self, job_id: str, queue: str) -> None:
        """Take a job just queued out again if it was cancelled while it was being sent (by
        its owner, a moderator or a ban): that cancel found nothing in the queue to stop, and
        the engine would otherwise run it for nothing (its result is dropped)."""
        job = await self.store.get_job(job_id)
        if job is None or job.status != "cancelled":
            return
        log.info("job %s was cancelled while it was being sent; taking it out", job_id)
        try:
            await self.moderation.abort(job_id, queue, job.error or "cancelled")
        except (RedisError, OSError) as exc:  # its result is dropped all the same
            log.warning("could not take cancelled job %s out of the queue: %s", job_id, exc)

    async def _engine_note(self, payload: dict[str, Any]) -> str:
        """``engine_note`` for a queued job's payload; nothing if the engines can't be read
        within ``ENGINE_CHECK_SECONDS`` (the job is queued: that is what matters)."""
        try:
            async with asyncio.timeout(ENGINE_CHECK_SECONDS):
                engines = await self.live_engines()
        except (RedisError, OSError, TimeoutError) as exc:
            log.info("could not read the live engines: %s", exc)
            return ""
        return engine_note(engines, payload["base_model"])

    async def _ask_whether_queued(self, job_id: str, queue: str) -> bool | None:
        """Whether the job is in the queue, asked again for a short while (redis-py reconnects
        on a new command); None if Redis doesn't answer within ``SUBMIT_CHECK_SECONDS``."""
        try:
            async with asyncio.timeout(SUBMIT_CHECK_SECONDS):
                while True:
                    try:
                        return await self._in_queue(job_id, queue)
                    except (RedisError, OSError) as exc:
                        log.info("asking whether job %s was queued: %s", job_id, exc)
                    await asyncio.sleep(SUBMIT_CHECK_INTERVAL)
        except TimeoutError:
            return None

    async def _in_queue(self, job_id: str, queue: str) -> bool:
        """Whether arq holds the job: waiting in ``queue``, running, or finished with a result
        (kept a day by the engine). Raises ``RedisError``/``OSError`` if Redis doesn't answer."""
        async with self.queue.pipeline(transaction=False) as pipe:
            pipe.exists(
                job_key_prefix + job_id, in_progress_key_prefix + job_id, result_key_prefix + job_id
            )
            pipe.zscore(queue, job_id)
            held, score = await pipe.execute()
        return bool(held) or score is not None


def _drawing_text(
    count: int,
    seed: int,
    request: GenerateRequest,
    redraw: Redraw | None,
    submission: Submission,
) -> str:
    """An image job's receipt: ``Drawing 4 images (seed 7): queued (position 1).``, and for
    a Vary or an Upscale what it does with which image."""
    if redraw is None:
        return f"Drawing {count} {images_word(count)} (seed {seed}): {submission.status}"
    if redraw.action == "vary":
        return f"Drawing {count} {redraw.caption(count)} (seed {seed}): {submission.status}"
    how = redraw.how if redraw.plain_resize else f"{redraw.how}, seed {seed}"
    return (
        f"Enlarging image {redraw.image + 1} {redraw.factor}× to {request.width}×{request.height}"
        f" ({how}): {submission.status}"
    )


def _job_state(job: Job, where: QueueState | None, started: datetime | None) -> str:
    """Where one of the caller's jobs stands, for /jobs: waiting (its place in its queue,
    counting the jobs running ahead of it, as receipts do) or running, and since when.
    ``where`` is None when the queue can't be read (SQLite's status is all there is);
    ``started`` is when an engine started it, if one said so."""
    queued = f"queued {when(job.created_at)}, {_ago(datetime.fromisoformat(job.created_at))} ago"
    if where is None:
        return f"{'running' if job.status == 'running' else 'waiting'} ({queued})"
    if where.running:
        if started is not None:
            return f"running since {when(started.astimezone(UTC).isoformat())} ({_ago(started)})"
        return f"running ({queued})"
    if where.rank is not None:
        return f"waiting #{where.rank + 1} in the queue ({queued})"
    # The engine is done and its answer is on the way, or the queue never confirmed the job.
    return f"finishing ({queued})" if job.status == "running" else f"not in the queue ({queued})"


def _ago(moment: datetime) -> str:
    return format_duration(datetime.now(UTC) - moment)


def _common_base_model(subjects: Sequence[Subject], default: str) -> str:
    """The base model the prompt's subjects were trained on (an adapter only works on its own
    model); ``default`` for a prompt without subjects."""
    models = sorted({subject.base_model for subject in subjects})
    if len(models) > 1:
        names = ", ".join(f"{s.name} ({s.base_model})" for s in subjects)
        raise UserError(
            f"Those subjects were trained on different base models ({names}), so one image "
            "can't hold them all. Nothing was queued."
        )
    return models[0] if models else default


def _not_yours_to_use(lookup: SubjectLookup, name: str) -> str:
    """Why /use can't take ``name``: none of the caller's subjects has it (the existing
    "Your subjects: …" message), and if a subject shared with them does, how to draw that."""
    text = (
        f"You have no subject called {as_typed(name)}. Your subjects: {format_names(lookup.own)}."
    )
    key = name.lower()
    shared = [s for s in lookup.shared if key in (s.name.lower(), s.token.lower())]
    if shared:
        written = " or ".join(sorted({lookup.reference(s) for s in shared}))
        owners = ", ".join(sorted({lookup.mention(s.owner.user_id) for s in shared}))
        text += (
            f" The {shared[0].name} shared with you by {owners} can't be [V], which is always "
            f"one of your own subjects: write {written} in a prompt to draw it."
        )
    return text


def _queue_down() -> UserError:
    return UserError(
        "The job queue can't be reached right now, so nothing was queued. Try again in a minute."
    )


def _redo_pending(redo: Redo, pending: Job) -> UserError:
    """The answer to a redo pressed again while the job it queued waits or runs."""
    action, _, index = redo.button.partition(":")
    what = action.capitalize() + (f" of image {int(index) + 1}" if index else "")
    state = "being drawn" if pending.status == "running" else "waiting in the queue"
    return UserError(
        f"You already asked for {what} of that result: job {pending.id[:8]} is {state}, and "
        "its images will be posted when it is done. Nothing new was queued or charged."
    )
