"""Moderation, platform-free: blocked prompts, the safety filter's switch and log, quota
overrides, bans, the queue, the audit log.

Adapters decide who is a moderator on their platform (Discord: Manage Server or a configured
role; Slack: admins or configured ids; shell: configured users) and pass that as
``is_moderator``; everything else lives here. The typed API is ``Moderation.acting(owner,
is_moderator)``, which refuses non-moderators before anything can change and returns a
``Moderator`` whose methods each do one action and return the reply text.
``Moderation.handle_text`` parses the text form (``/mod ban @bob spam 7d``) for adapters whose
platform hands over a line of text (the shell, Slack).

Every change a moderator makes is written to ``audit_log``, with what else it did (the jobs a
ban cancelled, the trainings and image jobs a deleted subject stopped, what deleting a user's
data deleted).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Literal, cast

from arq.constants import (
    abort_jobs_ss,
    in_progress_key_prefix,
    job_key_prefix,
    retry_key_prefix,
)
from redis.exceptions import RedisError

from bot.core.errors import UserError, as_typed
from bot.core.prompt_filter import InvalidRule, Match, PromptFilter, Rule, validate_rule
from bot.core.quotas import FIELD_NAMES, format_duration
from bot.core.store import (
    AuditEntry,
    Ban,
    BlockedAttempt,
    BlockedRule,
    Job,
    OverrideScope,
    Owner,
    QuotaField,
    Subject,
    WithheldOutput,
    WorkspaceSettings,
    utcnow,
)
from bot.core.syntax import CommandSyntax
from engine.api import (
    GENERATE,
    LEGACY_QUEUES,
    SHOWCASE,
    TRAIN_SUBJECT,
    EngineHeartbeat,
    cancel_key,
    engine_queues,
)

if TYPE_CHECKING:
    from bot.core.commands import Core

log = logging.getLogger(__name__)

# Removing a waiting job must not race with a worker picking it up, so the check and the
# removal run as one Lua script. A worker marks a job it starts with the in-progress key
# (arq's start_jobs, WATCHed), so: in progress → it is running, ask for an abort; still in the
# queue → take it out and delete its definition, so no worker can run it even if one read its
# queue entry a moment ago (arq's run_job then finds no definition and skips it).
_ABORT_SCRIPT = """
if redis.call('EXISTS', KEYS[2]) == 1 then
    redis.call('ZADD', KEYS[4], ARGV[2], ARGV[1])
    redis.call('SET', KEYS[6], ARGV[3], 'EX', 86400)
    return 'running'
end
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
    redis.call('DEL', KEYS[3], KEYS[5])
    return 'removed'
end
return 'gone'
"""

_DURATION = re.compile(r"^(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?$")
_FOREVER = {"forever", "permanent", "permanently", "never"}
MAX_BAN = timedelta(days=3650)
PLATFORMS_WITHOUT_ROLES = frozenset({"slack", "shell"})
"""Platforms whose adapters pass no roles: a role limit set there applies to nobody."""
_MENTION = re.compile(r"^<@[!&]?([A-Za-z0-9_.-]+)(?:\|[^>]*)?>$")
_ROLE_MENTION = re.compile(r"^<@&([0-9]+)>$")
_FIELD_ALIASES: dict[str, QuotaField] = {
    "images": "daily_images",
    "image": "daily_images",
    "trainings": "daily_trainings",
    "training": "daily_trainings",
    "jobs": "max_active_jobs",
    "active": "max_active_jobs",
}
_WORKSPACE_TARGETS = {"workspace", "server", "everyone", "default", "defaults"}

MOD_HELP = """\
Moderator commands (every change is written to the audit log):
/mod block list                      this workspace's blocked words, phrases and regexes
/mod block add <word or phrase>      block it (look-alikes, spacing and leetspeak included)
/mod block add-regex <pattern>       block an RE2 regex (no lookarounds or backreferences)
/mod block remove <rule id>          unblock (ids are in /mod block list)
/mod block defaults on|off           use the built-in list of blocked words
/mod block reveal on|off             tell users which rule their prompt hit (default off)
/mod blocked [n]                     the latest blocked prompts and withheld images
/mod model [name|default]            the base models; with a name, this workspace's default
                                     (for /train without a model, and prompts without subjects)
/mod safety [on|off]                 the safety filter on images (default on; off only for
                                     adult-only servers); alone: whether the engines have one
/mod quota show <user>               a user's usage and limits today
/mod quota set <who> <what> <n|default>
                                     who: a user, role:<id>, or workspace;
                                     what: images, trainings (per UTC day) or jobs (at once)
/mod quota reset <user>              give a user back today's images and trainings
/mod quota list                      every override in this workspace
/mod ban <user> [reason] [duration]  refuse their commands, cancel their jobs; e.g. 7d, 12h
/mod unban <user>                    lift a ban
/mod bans                            who is banned, why, until when
/mod queue                           jobs waiting and running here
/mod status                          the engines running (models, busy with what, up since)
                                     and how many jobs wait in the queues
/mod cancel <job id> [reason]        abort a waiting or running job (the first 4+ characters)
/mod subjects <user>                 a user's subjects, and whom each is shared with
/mod delete-subject <user> <name>    delete a subject with its photos and adapter
/mod delete-user-data <user>         delete what is stored about a user, as /mydata delete
                                     does (on their request made elsewhere); their quota
                                     usage, blocked prompts and this log stay
/mod log [n]                         the latest moderator actions"""


class NotModerator(UserError):
    """A /mod command from someone who is not a moderator."""

    def __init__(self) -> None:
        super().__init__("Only moderators can use /mod. Nothing was changed.")


def parse_duration(text: str) -> timedelta | None:
    """``30m``, ``12h``, ``7d``, ``2w``, ``1d12h`` → a timedelta; ``forever`` → None.

    Raises UserError for anything else, or for more than ten years.
    """
    word = text.strip().lower()
    if word in _FOREVER:
        return None
    match = _DURATION.match(word)
    if not word or match is None:
        raise UserError(f"{as_typed(text)} isn't a duration: use e.g. 30m, 12h, 7d, 2w or forever.")
    weeks, days, hours, minutes = (int(part or 0) for part in match.groups())
    duration = timedelta(weeks=weeks, days=days, hours=hours, minutes=minutes)
    if duration <= timedelta(0):
        raise UserError("A ban must last at least a minute (or say forever).")
    if duration > MAX_BAN:
        raise UserError("That is longer than ten years; say forever instead.")
    return duration


def _is_duration(word: str) -> bool:
    try:
        parse_duration(word)
    except UserError:
        return False
    return True


def parse_user(text: str) -> str:
    """A user id from a mention (Discord ``<@123>``/``<@!123>``, Slack ``<@U1|bob>``) or as is."""
    text = text.strip()
    match = _MENTION.match(text)
    user = match.group(1) if match else text.removeprefix("@")
    if not user or any(char.isspace() for char in user):
        raise UserError(f"{as_typed(text)} isn't a user.")
    return user


def when(timestamp: str) -> str:
    """A stored ISO timestamp as ``2025-01-31 12:03 UTC``."""
    return timestamp[:16].replace("T", " ") + " UTC"


def _ago(timestamp: str) -> str:
    return format_duration(datetime.now(UTC) - datetime.fromisoformat(timestamp))


def _ban_until(ban: Ban) -> str:
    return f"until {when(ban.expires_at)}" if ban.expires_at else "until a moderator lifts it"


def _rule_line(rule: BlockedRule) -> str:
    shown = f"/{rule.pattern}/" if rule.kind == "regex" else f"“{rule.pattern}”"
    return f"  #{rule.id}  {rule.kind:5}  {shown}  (by {rule.added_by}, {when(rule.created_at)})"


def _attempt_line(attempt: BlockedAttempt) -> str:
    negative = f" (no: “{attempt.negative_prompt}”)" if attempt.negative_prompt else ""
    return (
        f"  {when(attempt.created_at)}  {attempt.owner.user_id}  rule {attempt.rule_label}"
        f" on “{attempt.fragment}”: “{attempt.prompt}”{negative}"
    )


def withheld_phrase(kind: str, withheld: int, total: int | None) -> str:
    """How many outputs the safety filter withheld, as a result and the moderators' log say
    it: ``1 of 4 images``, ``all 4 images``, ``the image``, ``2 of 10 cells``, ``2 cells``."""
    noun = "image" if kind == "images" else "cell"
    nouns = f"{noun}s" if (total or withheld) > 1 else noun
    if total is None:
        return f"{withheld} {nouns}"
    if withheld >= total:
        return f"all {total} {nouns}" if total > 1 else f"the {noun}"
    return f"{withheld} of {total} {nouns}"


def _withheld_line(output: WithheldOutput) -> str:
    what = withheld_phrase(output.kind, output.withheld, output.total)
    if output.kind == "images":
        negative = f" (no: “{output.negative_prompt}”)" if output.negative_prompt else ""
        of = f": “{output.prompt}”{negative}"
    elif output.kind == "showcase":
        of = f" of the showcase of {output.prompt}"
    else:
        of = f" of the sample grid of {output.prompt}'s training"
    return (
        f"  {when(output.created_at)}  {output.owner.user_id}  safety filter withheld {what}"
        f"{of} (job {output.job_id[:8]})"
    )


AGE_RESTRICTED_PLATFORMS = frozenset({"discord"})
"""Platforms whose channels can be age-restricted, and whose adapters say so in a job's
destination (``age_restricted``)."""


SAFETY_SETTING = "DREAMBOT_SAFETY_CHECKER"
"""The engines' setting that gives them a safety checker, named where one is missing."""


def safety_text(
    enabled: bool,
    engines: Sequence[EngineHeartbeat] | None,
    *,
    now: bool,
    age_restricted_channels: bool = False,
) -> str:
    """How the safety filter stands in a workspace: its switch (``now``: just changed) and,
    when it is on, whether the running ``engines`` have a checker (None: Redis can't say).
    ``age_restricted_channels``: the platform has them, and off only lets images through
    unchecked there (``commands.checks_images``)."""
    lead = f"The safety filter is {'now ' if now else ''}{'on' if enabled else 'off'} here"
    if not enabled and age_restricted_channels:
        return (
            f"{lead} for age-restricted channels: images posted there go unchecked. In every "
            "other channel, and in DMs, it stays on, as Discord's rules ask."
        )
    if not enabled:
        return (
            f"{lead}: images are posted unchecked, also where an engine has a safety checker. "
            "Keep it off only on adult-only servers."
        )
    if engines is None:
        return (
            f"{lead}, but the job queue can't be reached right now to see whether the engines "
            "have a safety checker."
        )
    if not engines:
        return (
            f"{lead}; no engine is running now, so I can't tell whether they have a safety "
            f"checker ({SAFETY_SETTING})."
        )
    without = [engine.engine_id for engine in engines if engine.safety_checker is None]
    if len(without) == len(engines):
        return (
            f"{lead}, but no running engine has a safety checker ({SAFETY_SETTING}), so "
            "images go unchecked."
        )
    if without:
        has = "has" if len(without) == 1 else "have"
        return (
            f"{lead}, but {len(without)} of the {len(engines)} running engines "
            f"({', '.join(without)}) {has} no safety checker ({SAFETY_SETTING}), so the images "
            f"{'it draws go' if len(without) == 1 else 'they draw go'} unchecked."
        )
    return (
        f"{lead}: images the engines' safety checker flags are withheld, and given back to "
        "the user's quota."
    )


def safety_hint(syntax: CommandSyntax, enabled: bool) -> str:
    """How to turn the safety filter on or off as this platform types it: ``/mod safety
    off``, ``/mod safety enabled:False`` (Discord's on/off option)."""
    value = f"enabled:{enabled}" if syntax.named_options else ("on" if enabled else "off")
    return syntax.hint("mod", "safety", value)


def _checker_name(folder: str) -> str:
    """Where an engine's safety checker came from, as /mod status shows it: the folder's last
    two parts (``sd15/safety_checker``), not the host's whole layout."""
    parts = [part for part in folder.replace("\\", "/").split("/") if part]
    return "/".join(parts[-2:]) or folder


def _audit_line(entry: AuditEntry) -> str:
    target = f" {entry.target}" if entry.target else ""
    detail = f" — {entry.detail}" if entry.detail else ""
    return f"  {when(entry.created_at)}  {entry.moderator.user_id}: {entry.action}{target}{detail}"


def images_word(count: int) -> str:
    """``image``, or ``images`` for more than one."""
    return "images" if count > 1 else "image"


def draws_images(job: Job) -> int:
    """How many images an image job draws (older jobs, without a count, drew one); 0 for a
    training or a showcase (one grid), which ``describe_job`` names otherwise."""
    if job.kind == "train" or job.options.get("showcase"):
        return 0
    return int(job.options.get("count") or 1)


def job_queue(job: Job) -> str:
    """The arq queue a job of the store was sent to: its model's (recorded in its options at
    submission, ``engine.api.model_queue``), or for a job recorded before per-model queues its
    kind's legacy queue."""
    recorded = job.options.get("queue")
    return recorded if isinstance(recorded, str) else LEGACY_QUEUES[job.kind]


def describe_job(job: Job, subject_name: str | None = None) -> str:
    """What a job is, for its owner and moderators: ``training of rex``, ``showcase of rex``,
    ``image “a red fox…”`` (``images “…”`` when it draws more than one: take ``was_were`` for
    the verb after it). ``subject_name`` is a training's subject (see ``subject_names``).
    A job whose data its owner deleted (/mydata delete) is named by that alone."""
    if job.data_deleted_at is not None:
        return "job (its data was deleted)"
    if job.kind == "train":
        return f"training of {subject_name}" if subject_name else "training"
    if job.options.get("showcase"):
        return f"showcase of {job.options['showcase']}"
    prompt = job.prompt or ""
    return f"{images_word(draws_images(job))} “{prompt[:40]}{'…' if len(prompt) > 40 else ''}”"


def was_were(job: Job) -> str:
    """The verb after ``describe_job(job)``: ``were`` when it names several images."""
    return "were" if draws_images(job) > 1 else "was"


_HEX = frozenset("0123456789abcdef")


def job_prefix(text: str) -> str | None:
    """``text`` as the start of a job id (at least 4 hex digits, as /jobs and /mod queue show
    them; lower case), or None if it can't be one."""
    prefix = text.strip().lower()
    return prefix if len(prefix) >= 4 and all(c in _HEX for c in prefix) else None


CancelState = Literal["removed", "running", "gone", "unreachable"]
"""What cancelling did in the queue: took the job out of it, asked the engine running it to
stop, found it no longer there, or could not reach the queue (SQLite says cancelled anyway)."""

_MODERATOR_CANCEL_STATES: dict[CancelState, str] = {
    "running": "running: the engine was asked to stop it",
    "removed": "taken out of the queue",
    "gone": "no longer in the queue",
    "unreachable": "cancelled here, but the queue can't be reached to stop it",
}


@dataclass(frozen=True)
class QueueState:
    """Where arq holds a job: ``running`` (an engine marked it in progress), or waiting at
    ``rank`` (0: next) with its ``score`` (when it may start); neither if both are None."""

    running: bool
    rank: int | None
    score: float | None


_ENGINE_JOB_NAMES = {TRAIN_SUBJECT: "training", GENERATE: "image", SHOWCASE: "showcase"}


def _engine_lines(engine: EngineHeartbeat, jobs: dict[str, Job | None], here: Owner) -> list[str]:
    """One engine for /mod status; only this workspace's jobs are named by id, and the host
    and pid stay in the heartbeat (for the operators' logs), not shown to every workspace."""
    now = datetime.now(UTC)
    busy = []
    for running in engine.jobs:
        job = jobs.get(running.job_id)
        if job is not None and job.finished:  # it ended since the engine's last heartbeat
            continue
        what = _ENGINE_JOB_NAMES.get(running.kind, running.kind)
        ours = job is not None and (job.owner.platform, job.owner.workspace) == (
            here.platform,
            here.workspace,
        )
        whose = running.job_id[:8] if ours else "of another workspace"
        busy.append(f"{what} {whose} ({format_duration(now - running.started_at)})")
    since = engine.started_at.astimezone(UTC).isoformat()
    checker = (
        f"safety checker {_checker_name(engine.safety_checker)}"
        if engine.safety_checker
        else "no safety checker"
    )
    return [
        f"  {engine.engine_id}, {engine.device}: "
        f"models {', '.join(engine.models)}; {checker}; up since {when(since)} "
        f"({format_duration(now - engine.started_at)})",
        f"    busy: {'; '.join(busy)}" if busy else "    idle",
    ]


class Moderation:
    """The moderation rules the core enforces, and the door to the moderators' actions."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.store = core.store
        # (platform, workspace) → (rules_version, compiled filter). The version is read on
        # every check (one indexed row), so a rule change made by any process takes effect.
        self._filters: dict[tuple[str, str], tuple[int, PromptFilter]] = {}
        self._abort_script = core.queue.register_script(_ABORT_SCRIPT)

    # For adapters.

    def is_configured_moderator(self, user_id: str, roles: Sequence[str] = ()) -> bool:
        """Whether DREAMBOT_MODERATOR_USERS or DREAMBOT_MODERATOR_ROLES names this user.

        Adapters add their platform's own notion (Discord's Manage Server, Slack admins).
        """
        settings = self.core.settings
        return user_id in settings.moderator_users or any(
            role in settings.moderator_roles for role in roles
        )

    def acting(self, owner: Owner, is_moderator: bool) -> Moderator:
        """The actions ``owner`` may take as a moderator; raises NotModerator otherwise."""
        if not is_moderator:
            log.info("refused /mod from non-moderator %s", owner)
            raise NotModerator()
        return Moderator(self, owner)

    async def handle_text(self, owner: Owner, is_moderator: bool, text: str) -> str:
        """Run ``/mod <text>`` given as one line (what follows ``/mod``); return the reply."""
        moderator = self.acting(owner, is_moderator)
        return await _dispatch(moderator, text.strip())

    # Checks the core runs before queueing anything.

    async def check_not_banned(self, owner: Owner) -> None:
        """Raise UserError if ``owner`` is banned in their workspace."""
        ban = await self.store.active_ban(owner)
        if ban is None:
            return
        reason = f" Reason: {ban.reason}." if ban.reason else ""
        raise UserError(f"You're banned from using dreambot here, {_ban_until(ban)}.{reason}")

    async def check_prompt(
        self,
        owner: Owner,
        prompt: str,
        negative_prompt: str = "",
        *,
        subject: bool = False,
        settings: WorkspaceSettings | None = None,
    ) -> None:
        """Raise UserError if a blocked-prompt rule hits the (resolved) prompt or negative.

        With ``subject=True`` the text is a new subject's name and class: the engine draws
        class-prior images from the class noun, so it is a prompt too.
        A hit is logged for moderators. The user learns which rule only if the workspace
        turned ``reveal`` on: by default we don't hand out a map of the filter.
        ``settings``: the workspace's, if the caller already read them (else read here).
        """
        if settings is None:
            settings = await self.store.workspace_settings(owner.platform, owner.workspace)
        prompt_filter = await self._filter(owner.platform, owner.workspace, settings)
        match = prompt_filter.check(prompt, negative_prompt)
        if match is None:
            return
        await self.store.record_blocked_attempt(
            owner, match.rule.label, match.fragment, prompt, negative_prompt
        )
        log.info("blocked prompt from %s: rule %s", owner, match.rule.label)
        what = "That subject name or class" if subject else "That prompt"
        if settings.reveal_blocked_rule:
            raise UserError(_reveal(what, match))
        raise UserError(f"{what} isn't allowed here, so nothing was queued. Please rephrase it.")

    async def _filter(
        self, platform: str, workspace: str, settings: WorkspaceSettings
    ) -> PromptFilter:
        key = (platform, workspace)
        cached = self._filters.get(key)
        if cached is not None and cached[0] == settings.rules_version:
            return cached[1]
        rules = []
        for stored in await self.store.blocked_rules(platform, workspace):
            label = f"#{stored.id}"
            rule = Rule(stored.kind, stored.pattern, label)
            try:
                validate_rule(rule)
            except InvalidRule as exc:
                # Validated when added; a stricter checker in a newer release may refuse it.
                # Skip it rather than stop every prompt in the workspace.
                log.warning("skipping stored rule %s in %s: %s", label, key, exc.message)
                continue
            rules.append(rule)
        prompt_filter = PromptFilter(rules, use_defaults=settings.use_default_rules)
        self._filters[key] = (settings.rules_version, prompt_filter)
        return prompt_filter

    # Cancelling, shared by /cancel, /mod cancel, bans and subject deletion.

    async def cancel_job(
        self, job: Job, message: str, *, tell_owner: bool = True
    ) -> CancelState | None:
        """Cancel a waiting or running job; None if it had already ended.

        SQLite first (the job is cancelled and its units refunded whatever Redis says), then
        the queue: a waiting job is taken out of it, a running one is asked to abort. A
        training's subject is marked failed with ``message``.

        ``tell_owner``: the owner hears ``message`` where the job was asked for, through the
        bot's queue (a moderator's or a ban's cancellation). Without it (the owner cancelled
        it themselves, and their adapter closes the progress message) the job counts as
        delivered, so nothing about it is posted later, not even the engine's report.
        """
        if not await self.store.cancel_job(job.id, message):
            return None
        if not tell_owner:  # at once, so that no report racing the abort posts anything
            await self.store.claim_delivery(job.id)
        state: CancelState
        try:
            state = await self.abort(job.id, job_queue(job), message)
        except (RedisError, OSError):
            log.exception("could not abort job %s in the queue", job.id)
            state = "unreachable"
        if job.kind == "train" and job.subject_id:
            await self.store.update_subject(job.subject_id, status="failed", error=message)
        if tell_owner:
            await self._notify(job, message)
        return state

    async def abort(self, job_id: str, queue: str, message: str) -> CancelState:
        """Stop a job in the queue (SQLite says it is cancelled): take it out if it waits, ask
        the engine to stop it if it runs (arq's abort and our cancel key with ``message``)."""
        result = await self._abort_script(
            keys=[
                queue,
                in_progress_key_prefix + job_id,
                job_key_prefix + job_id,
                abort_jobs_ss,
                retry_key_prefix + job_id,
                cancel_key(job_id),
            ],
            args=[job_id, int(datetime.now(UTC).timestamp() * 1000), message],
        )
        # The script answers one of 'running', 'removed', 'gone'.
        return cast(CancelState, result.decode() if isinstance(result, bytes) else str(result))

    async def _notify(self, job: Job, message: str) -> None:
        try:
            await self.core.report_failure(job, message, "cancelled")
        except (RedisError, OSError):
            log.exception("could not tell the owner of job %s it was cancelled", job.id)

    async def queue_states(self, jobs: Sequence[Job]) -> dict[str, QueueState]:
        """Where arq holds each job (by id), in one round trip. Raises ``RedisError``/``OSError``
        if Redis doesn't answer."""
        async with self.core.queue.pipeline(transaction=False) as pipe:
            for job in jobs:
                queue = job_queue(job)
                pipe.exists(in_progress_key_prefix + job.id)
                pipe.zrank(queue, job.id)
                pipe.zscore(queue, job.id)
            replies = await pipe.execute()
        return {
            job.id: QueueState(
                running=bool(running),
                rank=None if rank is None else int(rank),
                score=None if score is None else float(score),
            )
            for job, running, rank, score in zip(
                jobs, replies[::3], replies[1::3], replies[2::3], strict=True
            )
        }

    async def subject_names(self, jobs: Sequence[Job]) -> dict[str, str]:
        """Job id → the name of the subject each training trains (for ``describe_job``)."""
        names = {}
        for job in jobs:
            if job.kind == "train" and job.subject_id:
                subject = await self.store.get_subject(job.subject_id)
                if subject is not None:
                    names[job.id] = subject.name
        return names

    async def _arq_states(self, jobs: Sequence[Job]) -> dict[str, str]:
        """Each job's state for /mod queue: running, waiting #N (its place among these jobs,
        of both queues, in the order they may start), or why neither."""
        queue_states = await self.queue_states(jobs)
        states: dict[str, str] = {}
        waiting: list[tuple[float, str]] = []
        for job in jobs:
            where = queue_states[job.id]
            if where.running:
                states[job.id] = "running"
            elif where.score is not None:
                waiting.append((where.score, job.id))
            else:
                states[job.id] = "finishing" if job.status == "running" else "not in the queue"
        for place, (_, job_id) in enumerate(sorted(waiting), start=1):
            states[job_id] = f"waiting #{place}"
        return states

    async def _queue_lengths(self) -> dict[str, tuple[int, int]]:
        """The engine jobs of each kind ("train", "generate"), of every workspace and every
        configured model (the legacy queues included): (waiting, running). A running job stays
        in arq's queue until it ends, marked by its in-progress key."""
        queue = self.core.queue
        queues = [
            (kind, name)
            for kind in LEGACY_QUEUES
            for name in engine_queues(self.core.settings.model_names, kind)
        ]
        async with queue.pipeline(transaction=False) as pipe:
            for _, name in queues:
                pipe.zrange(name, 0, -1)
            members = await pipe.execute()
        async with queue.pipeline(transaction=False) as pipe:
            for job_ids in members:
                for job_id in job_ids:
                    pipe.exists(in_progress_key_prefix + job_id.decode())
            running = iter(await pipe.execute())
        lengths = dict.fromkeys(LEGACY_QUEUES, (0, 0))
        for (kind, _), job_ids in zip(queues, members, strict=True):
            busy = sum(bool(next(running)) for _ in job_ids)
            waiting, running_before = lengths[kind]
            lengths[kind] = (waiting + len(job_ids) - busy, running_before + busy)
        return lengths


def _reveal(what: str, match: Match) -> str:
    rule = match.rule
    where = " in the negative prompt" if match.text_index == 1 else ""
    if rule.label.startswith("default:"):
        source = f"the built-in blocked word “{rule.pattern}”"
    elif rule.kind == "regex":
        source = f"this workspace's rule {rule.label} (/{rule.pattern}/)"
    else:
        source = f"this workspace's rule {rule.label} (“{rule.pattern}”)"
    return f"{what} isn't allowed here: “{match.fragment}”{where} hits {source}."


class Moderator:
    """One moderator's actions in their workspace; get one from ``Moderation.acting``."""

    def __init__(self, moderation: Moderation, owner: Owner) -> None:
        self.moderation = moderation
        self.store = moderation.store
        self.owner = owner

    def _user(self, user_id: str) -> Owner:
        return Owner(self.owner.platform, self.owner.workspace, parse_user(user_id))

    async def _audit(self, action: str, target: str = "", detail: str = "") -> None:
        await self.store.record_audit(self.owner, action, target, detail)

    # Blocked prompts.

    async def block_list(self) -> str:
        """The workspace's own rules and its switches."""
        settings = await self.store.workspace_settings(self.owner.platform, self.owner.workspace)
        rules = await self.store.blocked_rules(self.owner.platform, self.owner.workspace)
        lines = [
            f"Built-in blocked words: {'on' if settings.use_default_rules else 'off'}. "
            f"Users are told which rule hit: {'yes' if settings.reveal_blocked_rule else 'no'}.",
            "This workspace's rules:" if rules else "This workspace has no rules of its own.",
        ]
        lines += [_rule_line(rule) for rule in rules]
        return "\n".join(lines)

    async def block_add(self, phrase: str) -> str:
        """Block a word or phrase."""
        return await self._add_rule("word", " ".join(phrase.split()))

    async def block_add_regex(self, pattern: str) -> str:
        """Block an RE2 regular expression (validated: no construct that could stall us)."""
        return await self._add_rule("regex", pattern.strip())

    async def _add_rule(self, kind: str, pattern: str) -> str:
        if not pattern:
            command = "add-regex" if kind == "regex" else "add"
            raise UserError(f"Say what to block: /mod block {command} …")
        validate_rule(Rule("regex" if kind == "regex" else "word", pattern))
        stored = await self.store.add_blocked_rule(
            self.owner.platform, self.owner.workspace, kind, pattern, self.owner.user_id
        )
        if stored is None:
            return "That rule is already in place; nothing changed."
        await self._audit("block-add", f"#{stored.id}", f"{kind}: {pattern}")
        return f"Blocked as rule #{stored.id}: {_rule_line(stored).strip()}"

    async def block_remove(self, rule_id: str) -> str:
        """Remove one of the workspace's rules by its id (``#3`` or ``3``)."""
        number = rule_id.strip().removeprefix("#")
        if not number.isdigit():
            raise UserError("Give the rule's number from /mod block list, e.g. /mod block remove 3")
        rules = {
            rule.id: rule
            for rule in await self.store.blocked_rules(self.owner.platform, self.owner.workspace)
        }
        rule = rules.get(int(number))
        if rule is None or not await self.store.delete_blocked_rule(
            self.owner.platform, self.owner.workspace, rule.id, self.owner.user_id
        ):
            raise UserError(f"There is no rule #{number} here; see /mod block list.")
        await self._audit("block-remove", f"#{rule.id}", f"{rule.kind}: {rule.pattern}")
        return f"Removed rule #{rule.id} ({rule.pattern})."

    async def block_defaults(self, enabled: bool) -> str:
        """Switch the built-in list of blocked words on or off for this workspace."""
        await self._switch("use_default_rules", enabled)
        return f"The built-in blocked words are now {'on' if enabled else 'off'} here."

    async def block_reveal(self, enabled: bool) -> str:
        """Choose whether users are told which rule their prompt hit."""
        await self._switch("reveal_blocked_rule", enabled)
        return (
            "Users are now told which rule their prompt hit."
            if enabled
            else "Users now get a generic message when a prompt is blocked."
        )

    async def _switch(
        self, name: Literal["use_default_rules", "reveal_blocked_rule"], enabled: bool
    ) -> None:
        await self.store.set_workspace_switch(
            self.owner.platform, self.owner.workspace, name, enabled, self.owner.user_id
        )
        action = "block-defaults" if name == "use_default_rules" else "block-reveal"
        await self._audit(action, detail="on" if enabled else "off")

    async def blocked_attempts(self, count: int = 10) -> str:
        """The latest prompts a rule stopped and outputs the safety filter withheld, newest
        first, ``count`` in all."""
        limit = _bounded(count)
        platform, workspace = self.owner.platform, self.owner.workspace
        attempts = await self.store.blocked_attempts(platform, workspace, limit)
        withheld = await self.store.withheld_outputs(platform, workspace, limit)
        if not attempts and not withheld:
            return "No prompts have been blocked here. The safety filter has withheld no images."
        # Both are stored in order: the newest of the two, ``limit`` in all.
        lines = sorted(
            [(a.created_at, _attempt_line(a)) for a in attempts]
            + [(w.created_at, _withheld_line(w)) for w in withheld],
            key=lambda line: line[0],
            reverse=True,
        )[:limit]
        heading = (
            "Latest blocked prompts and withheld images:" if withheld else "Latest blocked prompts:"
        )
        return "\n".join([heading, *(line for _, line in lines)])

    # The safety filter.

    async def safety(self, enabled: bool | None = None) -> str:
        """Without ``enabled``: whether the workspace's safety filter is on, and whether the
        running engines have a checker. With it: turn the filter on or off for the
        workspace's jobs from now on (off: for adult-only servers)."""
        core = self.moderation.core
        platform, workspace = self.owner.platform, self.owner.workspace
        changed = enabled is not None
        if enabled is not None:
            await self.store.set_workspace_safety(platform, workspace, enabled, self.owner.user_id)
            await self._audit("safety", detail="on" if enabled else "off")
        else:
            enabled = (await self.store.workspace_settings(platform, workspace)).safety_check
        try:
            engines: list[EngineHeartbeat] | None = await core.live_engines()
        except (RedisError, OSError) as exc:
            log.warning("/mod safety could not read the engines: %s", exc)
            engines = None
        text = safety_text(
            enabled,
            engines,
            now=changed,
            age_restricted_channels=platform in AGE_RESTRICTED_PLATFORMS,
        )
        hint = safety_hint(core.syntax, not enabled)
        if enabled and platform in AGE_RESTRICTED_PLATFORMS:
            return f"{text}\n`{hint}` turns it off in age-restricted channels."
        if enabled:
            return f"{text}\n`{hint}` turns it off, for adult-only servers."
        return f"{text}\n`{hint}` turns it back on."

    # The workspace's default base model.

    async def model(self, name: str | None = None) -> str:
        """Without ``name``: the configured base models and the workspace's default. With a
        name: make that configured model the workspace's default (``default`` clears it)."""
        core = self.moderation.core
        platform, workspace = self.owner.platform, self.owner.workspace
        configured = core.settings.base_model
        if name is None or not name.strip():
            workspace_settings = await self.store.workspace_settings(platform, workspace)
            chosen = workspace_settings.default_model
            current = await core.default_model(platform, workspace, workspace_settings)
            lines = ["Base models (configured default first):"]
            lines += [
                f"  {model}{'  ← this workspace' if model == current else ''}"
                for model in core.settings.model_names
            ]
            if chosen is None:
                lines.append(f"This workspace uses the configured default, {configured}.")
            elif chosen != current:
                lines.append(
                    f"This workspace chose {chosen}, which is no longer configured, so it "
                    f"uses {configured}."
                )
            else:
                lines.append(f"This workspace's default is {current} (set by a moderator).")
            lines.append("Change it with /mod model <name> (or /mod model default).")
            return "\n".join(lines)
        wanted = name.strip()
        if wanted.lower() in ("default", "reset", "-"):
            await self.store.set_workspace_model(platform, workspace, None, self.owner.user_id)
            await self._audit("model", detail=f"default ({configured})")
            return f"This workspace now uses the configured default model, {configured}."
        model = core.base_model_named(wanted)  # refuses a name that isn't configured
        await self.store.set_workspace_model(platform, workspace, model, self.owner.user_id)
        await self._audit("model", detail=model)
        return (
            f"This workspace's default model is now {model}: /train without a model trains "
            "on it, and prompts without subjects are drawn on it. Existing subjects keep "
            "their own model."
        )

    # Quotas.

    async def quota_show(self, user_id: str, roles: Sequence[str] | None = None) -> str:
        """A user's usage today and effective limits.

        ``roles``: their platform role ids, as the adapter knows them; None when it can't
        tell another user's roles (the text form: the shell, Slack). Then the reply says so
        if the workspace has role limits, rather than pass base limits off as theirs.
        """
        user = self._user(user_id)
        text = await self.moderation.core.quotas.usage_text(user, roles or (), you=False)
        if roles is not None:
            return text
        overrides = await self.store.list_quota_overrides(self.owner.platform, self.owner.workspace)
        role_limits = sorted({o.target_id for o in overrides if o.scope == "role"})
        if not role_limits:
            return text
        return (
            f"{text}\nRoles: I can't see {user.user_id}'s roles here, so role limits "
            f"({', '.join(f'role:{role}' for role in role_limits)}) are not counted above."
        )

    async def quota_set(self, target: str, what: str, value: str | int | None) -> str:
        """Set a limit for a user, a role (``role:<id>``) or the workspace; None clears it."""
        scope, target_id, label = _quota_target(target)
        field = _FIELD_ALIASES.get(what.strip().lower())
        if field is None:
            raise UserError(f"{as_typed(what)} isn't a limit: say images, trainings or jobs.")
        limit = _quota_value(value)
        await self.store.set_quota_override(
            self.owner.platform,
            self.owner.workspace,
            scope,
            target_id,
            field,
            limit,
            self.owner.user_id,
        )
        shown = "the default" if limit is None else str(limit)
        await self._audit("quota-set", label, f"{FIELD_NAMES[field]} = {shown}")
        reply = f"{FIELD_NAMES[field].capitalize()} for {label}: now {shown}."
        if scope == "role" and self.owner.platform in PLATFORMS_WITHOUT_ROLES:
            reply += (
                f"\nNote: {self.owner.platform} doesn't tell me people's roles, so role limits "
                "apply to nobody here; set limits per user or for the workspace instead."
            )
        return reply

    async def quota_reset(self, user_id: str) -> str:
        """Give a user back everything they spent today."""
        user = self._user(user_id)
        released = await self.store.release_day_usage(user, f"reset by {self.owner.user_id}")
        await self._audit("quota-reset", user.user_id, f"{released} job(s) refunded")
        return f"Reset today's usage of {user.user_id} ({released} job(s) given back)."

    async def quota_list(self) -> str:
        """Every quota override in the workspace."""
        overrides = await self.store.list_quota_overrides(self.owner.platform, self.owner.workspace)
        settings = self.moderation.core.settings
        lines = [
            f"Configured defaults: {settings.quota_daily_images} images and "
            f"{settings.quota_daily_trainings} trainings per UTC day, "
            f"{settings.quota_max_active_jobs} jobs at once."
        ]
        if not overrides:
            lines.append("No overrides here.")
        for override in overrides:
            who = {"workspace": "workspace", "role": f"role {override.target_id}"}.get(
                override.scope, override.target_id
            )
            values = ", ".join(
                f"{FIELD_NAMES[field]} {limit}"
                for field in FIELD_NAMES
                if (limit := override.limit(field)) is not None
            )
            lines.append(f"  {who}: {values}  (by {override.set_by}, {when(override.updated_at)})")
        return "\n".join(lines)

    # Bans.

    async def ban(self, user_id: str, reason: str = "", duration: timedelta | None = None) -> str:
        """Ban a user (for ``duration``, or until unbanned) and cancel their jobs."""
        user = self._user(user_id)
        if user == self.owner:
            raise UserError("You can't ban yourself.")
        reason = " ".join(reason.split())[:300]
        expires = (datetime.now(UTC) + duration).isoformat(timespec="seconds") if duration else None
        ban = Ban(user, reason, self.owner.user_id, utcnow(), expires)
        await self.store.put_ban(ban)
        message = f"Cancelled: you were banned here{f' ({reason})' if reason else ''}."
        cancelled = 0
        for job in await self.store.active_jobs(user.platform, user.workspace, user.user_id):
            if await self.moderation.cancel_job(job, message) is not None:
                cancelled += 1
        length = format_duration(duration) if duration else "until unbanned"
        detail = f"{length}; {reason or 'no reason'}; {cancelled} job(s) cancelled"
        await self._audit("ban", user.user_id, detail)
        return (
            f"Banned {user.user_id} {_ban_until(ban)}"
            f"{f': {reason}' if reason else ''}. Cancelled {cancelled} of their job(s)."
        )

    async def unban(self, user_id: str) -> str:
        """Lift a ban."""
        user = self._user(user_id)
        if not await self.store.delete_ban(user):
            raise UserError(f"{as_typed(user.user_id)} isn't banned here.")
        await self._audit("unban", user.user_id)
        return f"{user.user_id} may use dreambot again."

    async def bans(self) -> str:
        """Who is banned, by whom, why, until when."""
        bans = await self.store.active_bans(self.owner.platform, self.owner.workspace)
        if not bans:
            return "Nobody is banned here."
        lines = ["Banned here:"]
        for ban in bans:
            reason = f": {ban.reason}" if ban.reason else ""
            lines.append(
                f"  {ban.owner.user_id} {_ban_until(ban)} (by {ban.banned_by}, "
                f"{when(ban.created_at)}){reason}"
            )
        return "\n".join(lines)

    # The queue.

    async def queue(self) -> str:
        """The workspace's waiting and running jobs: who, what, since when."""
        jobs = await self.store.active_jobs(self.owner.platform, self.owner.workspace)
        if not jobs:
            return "No jobs are waiting or running here."
        states = await self.moderation._arq_states(jobs)
        names = await self.moderation.subject_names(jobs)
        lines = [f"Jobs waiting or running here ({len(jobs)}):"]
        for job in jobs:
            what = describe_job(job, names.get(job.id))
            lines.append(
                f"  {job.id[:8]}  {job.owner.user_id}  {states[job.id]}  {what}  "
                f"since {when(job.created_at)} ({_ago(job.created_at)} ago)"
            )
        lines.append("Cancel one with /mod cancel <id>.")
        return "\n".join(lines)

    async def cancel(self, text: str, reason: str = "") -> str:
        """Abort a waiting or running job given the start of its id, and tell its owner."""
        prefix = job_prefix(text)
        if prefix is None:
            raise UserError("Give at least the first 4 characters of the job id (see /mod queue).")
        jobs = [
            job
            for job in await self.store.active_jobs(self.owner.platform, self.owner.workspace)
            if job.id.startswith(prefix)
        ]
        if not jobs:
            raise UserError(f"No waiting or running job here starts with {prefix}.")
        if len(jobs) > 1:
            raise UserError(f"{len(jobs)} jobs start with {prefix}; give more of the id.")
        job = jobs[0]
        names = await self.moderation.subject_names(jobs)
        reason = " ".join(reason.split())[:300]
        what = describe_job(job, names.get(job.id))
        message = f"Your {what} {was_were(job)} cancelled by a moderator" + (
            f": {reason}." if reason else "."
        )
        cancelled = await self.moderation.cancel_job(job, message)
        if cancelled is None:
            raise UserError(f"Job {job.id[:8]} has just finished; nothing to cancel.")
        state = _MODERATOR_CANCEL_STATES[cancelled]
        detail = f"{job.owner.user_id}'s {job.kind}; {state}" + (f"; {reason}" if reason else "")
        await self._audit("cancel", job.id, detail)
        return f"Cancelled job {job.id[:8]} of {job.owner.user_id} ({state}). They were told."

    # The engines.

    async def status(self) -> str:
        """The engines running now (id, device, models, busy with what, up since) and how
        many jobs wait in the engine queues, of every workspace: the engines serve them all."""
        core = self.moderation.core
        try:
            engines = await core.live_engines()
            lengths = await self.moderation._queue_lengths()
        except (RedisError, OSError):
            log.exception("/mod status could not read Redis")
            return "The job queue (Redis) can't be reached right now, so I can't see the engines."
        # The jobs the engines reported, as this bot knows them (None: another bot's).
        jobs = {
            running.job_id: await self.store.get_job(running.job_id)
            for engine in engines
            for running in engine.jobs
        }
        if engines:
            lines = [f"Engines running ({len(engines)}):"]
            for engine in engines:
                lines += _engine_lines(engine, jobs, self.owner)
            served = {model for engine in engines for model in engine.models}
            missing = [model for model in core.settings.model_names if model not in served]
            if missing:
                lines.append(
                    f"No running engine serves {', '.join(missing)}: jobs for "
                    f"{'it' if len(missing) == 1 else 'them'} wait until one does."
                )
        else:
            lines = ["No engine is running: queued jobs wait until one starts."]
        counts = []
        for kind, (waiting, running) in lengths.items():
            what = "Trainings" if kind == "train" else "Image jobs"
            counts.append(f"{what}: {waiting} waiting, {running} running.")
        lines.append("Queues (all workspaces): " + " ".join(counts))
        if engines:
            # What their checkers mean here (with none running, /mod safety says the switch).
            here = await self.store.workspace_settings(self.owner.platform, self.owner.workspace)
            lines.append(
                safety_text(
                    here.safety_check,
                    engines,
                    now=False,
                    age_restricted_channels=self.owner.platform in AGE_RESTRICTED_PLATFORMS,
                )
            )
        return "\n".join(lines)

    # Subjects.

    async def subjects(self, user_id: str) -> str:
        """A user's subjects, and whom each is shared with (who else can draw it)."""
        user = self._user(user_id)
        subjects = await self.store.list_subjects(user)
        if not subjects:
            return f"{user.user_id} has no subjects."
        notes = await self.moderation.core.sharing.share_notes(user)
        lines = [f"Subjects of {user.user_id}:"]
        for subject in subjects:
            shared = f" · {notes[subject.id]}" if subject.id in notes else ""
            lines.append(f"{_subject_line(subject)}{shared}")
        return "\n".join(lines)

    async def delete_subject(self, user_id: str, name: str) -> str:
        """Delete a user's subject with its photos and adapter (and stop its training)."""
        user = self._user(user_id)
        subject = await self.store.find_subject(user, name.strip())
        if subject is None:
            raise UserError(f"{user.user_id} has no subject called {as_typed(name.strip())}.")
        # Anyone's images of it waiting or running (it may be shared) stop too.
        deletion = await self.moderation.core.delete_subject(
            subject,
            training_message=f"Training {subject.name} was stopped: a moderator deleted it.",
            why=lambda _: f"a moderator deleted {subject.name}",
        )
        training, stopped = deletion.training_stopped, deletion.images_stopped
        # The log says what else the deletion stopped, as the reply does: those jobs' owners
        # were told a moderator did it.
        image_jobs = f"{stopped} image {'job' if stopped == 1 else 'jobs'} drawing it"
        effects = (["stopped its training"] if training else []) + (
            [f"stopped {image_jobs}"] if stopped else []
        )
        detail = "; ".join([f"deleted {user.user_id}'s {subject.name} ({subject.id})", *effects])
        await self._audit("delete-subject", user.user_id, detail)
        text = f"Deleted {user.user_id}'s subject {subject.name}, its photos and its adapter."
        if training:
            text += f" Stopped its training; {user.user_id} was told."
        if stopped:
            told = "its owner was" if stopped == 1 else "their owners were"
            text += f" Stopped {image_jobs}; {told} told."
        return text

    async def delete_user_data(self, user_id: str) -> str:
        """Delete what is stored about a user here, as their own /mydata delete would (for a
        deletion request made outside the bot); their cancelled jobs are told where they were
        asked for. Audited even when there was nothing to delete: the request was handled."""
        user = self._user(user_id)
        personal_data = self.moderation.core.personal_data
        deletion = await personal_data.delete(user, by_moderator=True)
        # Counts, not names: the log outlives the data it speaks of.
        effects = [
            f"{len(deletion.subjects)} subject(s) deleted",
            f"{deletion.outputs.images} stored image(s) deleted",
            f"{deletion.redacted} job(s) redacted",
            f"{len(deletion.cancelled)} job(s) cancelled",
        ]
        if deletion.stopped:
            effects.append(f"stopped {deletion.stopped} image job(s) of others drawing them")
        detail = "; ".join(effects)
        await self._audit("delete-user-data", user.user_id, detail)
        return personal_data.deleted_text(deletion, you=False)

    # Audit.

    async def log(self, count: int = 20) -> str:
        """The latest moderator actions in the workspace."""
        entries = await self.store.audit_entries(
            self.owner.platform, self.owner.workspace, _bounded(count)
        )
        if not entries:
            return "No moderator actions yet."
        return "\n".join(["Latest moderator actions:", *map(_audit_line, entries)])


def _bounded(count: int) -> int:
    return max(1, min(int(count), 100))


def _subject_line(subject: Subject) -> str:
    detail = f" ({subject.error})" if subject.status == "failed" and subject.error else ""
    return (
        f"  {subject.name}: {subject.class_noun}, {subject.status}{detail}, "
        f"{subject.photo_count} photos, since {when(subject.created_at)}"
    )


def _quota_target(target: str) -> tuple[OverrideScope, str, str]:
    word = target.strip()
    role = _ROLE_MENTION.match(word)
    if role or word.lower().startswith("role:"):
        role_id = role.group(1) if role else word[5:].strip()
        if not role_id:
            raise UserError("Say which role: role:<id>.")
        return "role", role_id, f"role {role_id}"
    if word.lower() in _WORKSPACE_TARGETS:
        return "workspace", "", "this workspace"
    user = parse_user(word)
    return "user", user, user


def _quota_value(value: str | int | None) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("default", "-")):
        return None
    try:
        number = int(value)
    except ValueError:
        raise UserError(
            f"{as_typed(str(value))} isn't a number: give 0 or more, or 'default'."
        ) from None
    if not 0 <= number <= 1_000_000:
        raise UserError("A limit must be between 0 and 1000000.")
    return number


# --- the text form ------------------------------------------------------------------------


def _on_off(word: str) -> bool:
    value = word.strip().lower()
    if value in ("on", "yes", "true", "1"):
        return True
    if value in ("off", "no", "false", "0"):
        return False
    raise UserError("Say on or off.")


def _count(words: list[str], default: int) -> int:
    if not words:
        return default
    if not words[0].isdigit():
        raise UserError(f"{as_typed(words[0])} isn't a number.")
    return int(words[0])


def _split_ban(words: list[str]) -> tuple[str, timedelta | None]:
    """``[reason…] [duration]``: a duration may come last or first; the rest is the reason."""
    duration: timedelta | None = None
    if words and _is_duration(words[-1]):
        duration = parse_duration(words.pop())
    elif words and _is_duration(words[0]):
        duration = parse_duration(words.pop(0))
    return " ".join(words), duration


async def _dispatch(mod: Moderator, text: str) -> str:
    command, _, rest = text.partition(" ")
    command = command.lower()
    words = rest.split()

    def need(count: int, usage: str) -> None:
        if len(words) < count:
            raise UserError(f"Usage: /mod {usage}")

    if command in ("", "help"):
        return MOD_HELP
    if command == "block":
        sub, _, argument = rest.strip().partition(" ")
        sub = sub.lower()
        if sub in ("", "list"):
            return await mod.block_list()
        if sub == "add":
            return await mod.block_add(argument)
        if sub == "add-regex":
            return await mod.block_add_regex(argument)
        if sub == "remove":
            return await mod.block_remove(argument)
        if sub == "defaults":
            return await mod.block_defaults(_on_off(argument))
        if sub == "reveal":
            return await mod.block_reveal(_on_off(argument))
        raise UserError("Usage: /mod block list|add|add-regex|remove|defaults|reveal …")
    if command == "blocked":
        return await mod.blocked_attempts(_count(words, 10))
    if command == "model":
        if len(words) > 1:
            raise UserError("Usage: /mod model [name|default]")
        return await mod.model(words[0] if words else None)
    if command == "safety":
        if len(words) > 1:
            raise UserError("Usage: /mod safety [on|off]")
        return await mod.safety(_on_off(words[0]) if words else None)
    if command == "quota":
        sub = words.pop(0).lower() if words else "list"
        if sub == "show":
            need(1, "quota show <user>")
            return await mod.quota_show(words[0])
        if sub == "set":
            need(3, "quota set <user|role:id|workspace> <images|trainings|jobs> <n|default>")
            return await mod.quota_set(words[0], words[1], words[2])
        if sub == "reset":
            need(1, "quota reset <user>")
            return await mod.quota_reset(words[0])
        if sub == "list":
            return await mod.quota_list()
        raise UserError("Usage: /mod quota show|set|reset|list …")
    if command == "ban":
        need(1, "ban <user> [reason] [duration, e.g. 7d]")
        reason, duration = _split_ban(words[1:])
        return await mod.ban(words[0], reason, duration)
    if command == "unban":
        need(1, "unban <user>")
        return await mod.unban(words[0])
    if command == "bans":
        return await mod.bans()
    if command == "queue":
        return await mod.queue()
    if command == "status":
        return await mod.status()
    if command == "cancel":
        need(1, "cancel <job id> [reason]")
        return await mod.cancel(words[0], " ".join(words[1:]))
    if command == "subjects":
        need(1, "subjects <user>")
        return await mod.subjects(words[0])
    if command == "delete-subject":
        need(2, "delete-subject <user> <name>")
        return await mod.delete_subject(words[0], words[1])
    if command == "delete-user-data":
        need(1, "delete-user-data <user>")
        return await mod.delete_user_data(words[0])
    if command == "log":
        return await mod.log(_count(words, 20))
    raise UserError(f"Unknown /mod command {as_typed(command)}. Try /mod help.")


__all__ = [
    "MOD_HELP",
    "CancelState",
    "Moderation",
    "Moderator",
    "NotModerator",
    "QueueState",
    "describe_job",
    "job_prefix",
    "parse_duration",
    "parse_user",
    "safety_text",
    "withheld_phrase",
]
