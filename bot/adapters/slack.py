"""The Slack adapter: slash commands, buttons and shared photos in; messages, edits, files out.

It only translates, the bolt-python way: every listener acks at once (Slack allows 3 seconds)
and does its work in a lazy listener, which calls the core with plain values and answers the
user privately (through the command's ``response_url``, or ``chat.postEphemeral`` for a
message). Engine updates arrive through the ``Sink`` methods: one progress message per job
(``chat.postMessage``; its ``ts`` is kept in the job's destination, so it is still updated
after a restart; a Cancel button on it lets the job's owner cancel it until the job ends),
updated with ``chat.update`` at most once per ``edit_interval`` seconds (and, over all jobs
together, within Slack's rate limit for ``chat.update``), then
the result's images uploaded into the channel with ``files_upload_v2``, mentioning the user,
with Reroll and per-image Vary / Upscale buttons below. The live preview of an image being
drawn rides on those throttled updates as an image block, where Slack's servers can fetch it:
an image block takes a URL, not bytes, so previews need ``DREAMBOT_ARTIFACTS_PUBLIC_URL``
(where the artifact store's files are served) or a store that signs URLs (S3). A private local
folder has neither, and uploading each preview would post new files instead of updating one
message, so there the updates carry no picture. When the channel refuses (gone, archived, the
bot not in it), the result goes to the user by DM; if that fails too, it is logged.

Slash commands cannot carry files, so photos come in a message: ``/train rex dog`` (once the
core's checks that need no photos passed) opens a window (``DREAMBOT_SLACK_TRAIN_WINDOW``) in
which the user's next message with photos in that channel trains ``rex``; or, without the
slash command, one message with the photos and the text ``@dreambot train rex dog`` (in a DM
with the bot: ``train rex dog``). Photos are downloaded from files.slack.com only, with the
bot token, size-capped while streaming. Any other command can be written to the bot the same
way (``jobs`` in a DM, ``@dreambot cancel rex`` in a channel), as ``/dreambot <command>`` runs
it; ``/dreambot jobs``, ``cancel``, ``use``, ``share``, ``unshare`` and ``mydata`` have no slash
command of their own. ``/dreambot mydata delete`` answers with what it would delete above a
"Delete everything" button (Slack asks once more before sending the click), which deletes it.

Who moderates is the one rule decided here: workspace admins and owners (``users.info``), or a
configured user id (``DREAMBOT_MODERATOR_USERS``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from aiohttp import web
from redis.exceptions import RedisError
from slack_bolt.adapter.aiohttp import to_aiohttp_response, to_bolt_request
from slack_bolt.async_app import AsyncApp
from slack_bolt.context.async_context import AsyncBoltContext
from slack_bolt.context.respond.async_respond import AsyncRespond
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncRateLimitErrorRetryHandler,
    async_default_handlers,
)
from slack_sdk.web.async_client import AsyncWebClient

from bot.adapters import common
from bot.adapters.downloads import Downloader
from bot.adapters.options import parse_imagine, queue_imagine, split_options
from bot.adapters.throttle import Clock, EditThrottle, Sleep
from bot.config import ConfigError, Settings
from bot.core.commands import Core, Receipt
from bot.core.delivery import (
    BUTTONS_PART,
    Delivery,
    PostedParts,
    file_part,
    progress_text,
)
from bot.core.errors import UserError, as_typed
from bot.core.moderation import MOD_HELP
from bot.core.photos import Upload
from bot.core.sharing import parse_share_text
from bot.core.store import EVERYONE, Job, Owner
from bot.core.syntax import CommandSyntax
from engine.api import Progress

log = logging.getLogger(__name__)

PLATFORM = "slack"
MAX_TEXT = 3900  # Slack truncates long messages; 4,000 characters is its advice
MAX_FILES_PER_MESSAGE = 10  # Slack shows at most ten files in one message
MAX_SECTION_TEXT = 3000  # the most text a section block takes
UPDATES_PER_MINUTE = 40
"""How many progress updates (``chat.update``) of all jobs together go to Slack in a minute.
``chat.update`` is a Tier 3 method (about 50 calls a minute per workspace, then HTTP 429):
three jobs at one update per interval would already exceed it. The rest of the 50 is left for
closing progress messages when jobs end."""
COMMAND_PREFIX = "/dreambot "
"""How the core's hints type a command here: ``/dreambot jobs``, ``cancel``, ``use``,
``share``, ``unshare`` and ``mydata`` have no slash command of their own (so the app's
manifest needs no change for them)."""
SLACK_FILE_HOSTS = frozenset({"files.slack.com"})
"""Where Slack serves ``url_private_download``; the bot token is only ever sent there."""

COMMANDS = ("train", "imagine", "showcase", "subjects", "forget", "quota", "mod", "help")
"""Each is a slash command of its own, and a word after ``/dreambot`` (``/dreambot quota``)."""
SYNTAX = CommandSyntax(prefix=COMMAND_PREFIX, own_commands=frozenset(COMMANDS))
"""How the core's hints type a command here: ``/forget rex``, ``/dreambot unshare rex``."""
CANCEL_ACTION_ID = "dreambot:cancel"
"""The Cancel button on a job's progress message (its value is the job id)."""
DELETE_DATA_ACTION_ID = "dreambot:delete-data"
"""The "Delete everything" button that confirms /dreambot mydata delete (its value is the
user it was shown to)."""

# Vary and Upscale name the image (index 0-3); ids without one (older results) mean the first.
ACTION_ID = re.compile(r"^dreambot:(?P<action>reroll|vary|upscale)(?::(?P<index>[0-3]))?$")
MAX_BUTTON_IMAGES = 4
JOB_ID = re.compile(r"^[0-9a-f]{32}$")
SLACK_USER_ID = re.compile(r"^[UW][A-Z0-9]+$")
"""A Slack user id, as a mention carries it (``<@U123|mia>``)."""

# A channel that won't take a message or a file: post the result by DM instead.
CHANNEL_REFUSED = frozenset(
    {
        "channel_not_found",
        "not_in_channel",
        "is_archived",
        "channel_is_archived",
        "access_denied",
        "restricted_action",
        "restricted_action_read_only_channel",
        "restricted_action_thread_only_channel",
        "restricted_action_non_threadable_channel",
        "team_access_not_granted",
    }
)
# A progress message that can no longer be updated.
MESSAGE_GONE = CHANNEL_REFUSED | {"message_not_found", "cant_update_message", "edit_window_closed"}
# A user who can't be written to directly either: log the result.
DM_REFUSED = CHANNEL_REFUSED | {
    "user_not_found",
    "user_disabled",
    "user_not_visible",
    "cannot_dm_bot",
    "not_allowed",
}

SLACK_MOD_NOTE = (
    "On Slack, name a user by mentioning them (@name). Moderators are the workspace's admins "
    "and owners, and the user ids in DREAMBOT_MODERATOR_USERS."
)

_TRAIN_MESSAGE = re.compile(
    r"^\s*(?:<@(?P<bot>[A-Z0-9]+)(?:\|[^>]*)?>\s*)?train\s+(?P<name>\S+)\s+(?P<noun>[^\n]+?)\s*$",
    re.IGNORECASE,
)
_TO_THE_BOT = re.compile(r"^\s*(?:<@(?P<bot>[A-Z0-9]+)(?:\|[^>]*)?>)?(?P<rest>.*)$", re.DOTALL)
_ESCAPED_USER = re.compile(r"&lt;@([UW][A-Z0-9]+(?:\|[^&<>]*)?)&gt;")


@dataclass(frozen=True)
class WithBlocks:
    """A command's private reply with blocks (buttons) under its text."""

    text: str
    blocks: list[dict[str, Any]]


class Reply(Protocol):
    """Sends a private reply: text, with blocks if given."""

    async def __call__(self, text: str, blocks: list[dict[str, Any]] | None = None) -> None: ...


Work = Callable[[], Awaitable[str | WithBlocks]]


# Text.


def escape(text: str) -> str:
    """``text`` as Slack message text: ``&``, ``<``, ``>`` escaped, so a prompt can't ping
    ``<!channel>`` or fake a link; user mentions (``<@U123>``) are kept."""
    escaped = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _ESCAPED_USER.sub(r"<@\1>", escaped)


def unescape(text: str) -> str:
    """What the user typed: Slack sends ``&``, ``<``, ``>`` escaped in commands and messages."""
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def fit(text: str, limit: int = MAX_TEXT) -> str:
    """``text`` cut to Slack's message length, marked with an ellipsis when cut."""
    return common.fit(text, limit)


def slack_error(exc: SlackApiError) -> str:
    """Slack's error code (``channel_not_found``…); empty when the answer wasn't Slack's JSON."""
    data = getattr(exc.response, "data", None)
    return str(data.get("error") or "") if isinstance(data, dict) else ""


def mention(user_id: str) -> str:
    """A mention of a Slack user."""
    return f"<@{user_id}>"


def usage_text(core: Core, train_window: float) -> str:
    """The commands as they are typed on Slack, for /dreambot help."""
    settings = core.settings
    most = min(settings.max_photos, MAX_FILES_PER_MESSAGE)
    minutes = max(1, round(train_window / 60))
    return f"""\
/train <name> <class> [--model NAME]
        then post {settings.min_photos}–{most} photos of it here, in one message, within \
{minutes} minutes
        or, without /train: one message with the photos and "@dreambot train <name> <class>"
        (in a DM with me just "train <name> <class>")
        e.g. /train rex dog
/imagine <prompt> [--count N] [--seed N] [--no "things to avoid"] [--aspect shape]
        [--steps N] [--guidance X] [--strength X]
        draw a prompt; [V] is your active subject (see /dreambot use), [name] a named
        one (yours, or one shared with you: see /subjects)
        e.g. /imagine a [V] dog wearing a hat --aspect portrait
        under each result: Reroll (new seed), and per image V1…V4 (a close variation of
        that image) and U1…U4 (that image enlarged)
/showcase [name]       your subject in the DreamBooth paper's five capabilities, as one grid
/subjects              list your subjects and their status, and those shared with you
/dreambot use [name]   make one of your ready subjects [V] (it stays [V] when you train
        others); /dreambot use alone: [V] is your newest ready subject again
/forget <name>         delete a subject, its photos and its adapter
/dreambot share <name> <@user or everyone>
        let one person, or everyone in this workspace, draw your subject as [name] (or as
        its token, where another subject has that name) and /showcase it, on their quota
/dreambot unshare <name> [@user or everyone]
        stop sharing it with them (with neither: with anyone)
/quota                 your usage today and when it resets (midnight UTC)
/dreambot mydata [delete]
        what dreambot keeps about you here, and for how long; with delete, delete it all
        (you confirm with a button)
/dreambot jobs         your jobs waiting or running, with their ids
/dreambot cancel [name or job id]
        cancel your newest job, a subject's training, or the job whose id starts so
        (4+ characters, as jobs shows); or press Cancel on a job's progress message
/mod help              moderator commands (workspace admins and owners)
/dreambot help         this text; /dreambot <command> … works for every command above,
        and so does a message to me: "<command> …" in a DM with me, or
        "@dreambot <command> …" in a channel"""


# Who and where.


@dataclass(frozen=True)
class Caller:
    """Who asked, in which workspace and channel."""

    team_id: str
    user_id: str
    channel_id: str

    @property
    def owner(self) -> Owner:
        """The core's owner (one workspace per Slack team)."""
        return Owner(PLATFORM, self.team_id, self.user_id)

    @property
    def destination(self) -> dict[str, Any]:
        """Where a job's progress and result go: this channel, then the user by DM."""
        return {"channel_id": self.channel_id, "team_id": self.team_id, "user_id": self.user_id}


def caller_of(context: AsyncBoltContext) -> Caller:
    """The caller of a request as bolt resolved it (the same for commands, actions, events)."""
    team = context.team_id or context.enterprise_id
    user = context.user_id
    channel = context.channel_id
    if not team or not user or not channel:
        raise UserError("Use dreambot in a channel or a direct message.")
    return Caller(team, user, channel)


@dataclass(frozen=True)
class PendingTraining:
    """A ``/train`` waiting for its photos."""

    name: str
    class_noun: str
    until: float
    model: str | None = None


class SlackDownloader(Downloader):
    """Downloads files shared on Slack: from files.slack.com only, with the bot's token.

    ``url_private_download`` needs ``Authorization: Bearer <bot token>``; the host allow-list
    (checked before any request) keeps the token from going anywhere else, and redirects are
    never followed.
    """

    def __init__(
        self,
        token: str,
        *,
        max_bytes: int,
        allowed_hosts: Collection[str] = SLACK_FILE_HOSTS,
        require_https: bool = True,
        timeout: float = 30.0,
    ) -> None:
        super().__init__(
            max_bytes=max_bytes,
            allowed_hosts=allowed_hosts,
            require_https=require_https,
            timeout=timeout,
        )
        self._token = token

    def check_url(self, url: str, filename: str) -> None:
        """Raise UserError unless ``url`` is on an allowed host (files.slack.com)."""
        try:
            super().check_url(url, filename)
        except UserError:
            raise UserError(
                f"{filename} isn't a file shared on Slack, so I didn't download it."
            ) from None

    async def fetch(self, url: str, filename: str) -> Upload:
        """Download one shared file with the bot token; UserError when refused or too big."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=self.timeout, headers={"Authorization": f"Bearer {self._token}"}
            )
        return await super().fetch(url, filename)


# The adapter.


class SlackAdapter:
    """Translates Slack requests into core calls and engine updates into messages."""

    def __init__(
        self,
        core: Core,
        client: AsyncWebClient,
        *,
        signing_secret: str = "",
        socket_mode: bool = False,
        downloader: Downloader | None = None,
        edit_interval: float = 3.0,
        train_window: float = 600.0,
        artifacts_public_url: str | None = None,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.core = core
        core.mention = mention
        core.syntax = SYNTAX
        self.client = client
        self.downloader = downloader or SlackDownloader(
            client.token or "", max_bytes=core.settings.max_photo_bytes
        )
        self.edits = EditThrottle(
            edit_interval, spacing=60 / UPDATES_PER_MINUTE, clock=clock, sleep=sleep
        )
        self.train_window = train_window
        self.clock = clock
        # (team, channel, user) → the /train waiting for photos there; also kept in Redis
        # (``_keep_pending``), where a restarted bot finds it.
        self.pending: dict[tuple[str, str, str], PendingTraining] = {}
        self.progress = common.ProgressMessages(core.store, self.edits, "progress_ts", str)
        self.progress_messages = self.progress.refs
        # Live previews need a URL Slack's servers can fetch: below the public base, or signed.
        self.artifacts_public_url = artifacts_public_url
        self.shows_previews = artifacts_public_url is not None or core.artifacts.can_sign
        # The newest preview of each job (its public URL and alt text). Every update carries
        # it: an update's blocks replace the message's, and leaving them out keeps stale ones.
        self._previews: dict[str, tuple[str, str]] = {}
        self._unfetchable: set[str] = set()  # jobs whose preview Slack could not download
        self._commands: dict[str, Callable[[Caller, str], Awaitable[str | WithBlocks]]] = {
            "train": self.train_command,
            "imagine": self.imagine,
            "showcase": self.showcase,
            "subjects": lambda caller, text: self.core.subjects_text(caller.owner),
            "use": lambda caller, text: self.core.use(caller.owner, unescape(text).strip() or None),
            "forget": self.forget,
            "share": lambda caller, text: self.share(caller, "share", text),
            "unshare": lambda caller, text: self.share(caller, "unshare", text),
            "quota": lambda caller, text: self.core.quota_text(caller.owner),
            "jobs": lambda caller, text: self.core.jobs_text(caller.owner),
            "cancel": self.cancel,
            "mydata": self.mydata,
            "mod": self.mod,
            "help": self.help,
        }
        self.app = AsyncApp(
            client=client,
            # Socket Mode requests come over the app's own authenticated websocket.
            signing_secret=signing_secret,
            request_verification_enabled=not socket_mode,
            logger=logging.getLogger("slack_bolt"),
        )
        self._add_listeners()

    async def close(self) -> None:
        """Close the downloader and the web client's session."""
        await self.downloader.close()
        session = getattr(self.client, "session", None)
        if session is not None and not session.closed:
            await session.close()

    # HTTP mode.

    async def handle(self, request: web.Request) -> web.Response:
        """One request from Slack (signed; bolt refuses a bad signature with 401)."""
        response = await self.app.async_dispatch(await to_bolt_request(request))
        return await to_aiohttp_response(response)

    def web_app(self, path: str = "/slack/events") -> web.Application:
        """An aiohttp application serving Slack's requests at ``path``."""
        app = web.Application()
        app.router.add_post(path, self.handle)
        return app

    # Listeners: ack at once, work in a lazy listener.

    def _add_listeners(self) -> None:
        async def ack_now(ack: Any) -> None:
            await ack()

        async def on_command(
            body: dict[str, Any], context: AsyncBoltContext, respond: AsyncRespond
        ) -> None:
            name = str(body.get("command", "")).lstrip("/").lower()
            reply = self._responder(respond)
            await self.reply(
                reply,
                lambda: self.command(caller_of(context), name, body.get("text") or ""),
                name,
            )

        async def on_action(
            body: dict[str, Any], context: AsyncBoltContext, respond: AsyncRespond
        ) -> None:
            action = (body.get("actions") or [{}])[0]
            match = ACTION_ID.match(str(action.get("action_id", "")))
            job_id = str(action.get("value", ""))
            if match is None or not JOB_ID.match(job_id):
                return
            reply = self._responder(respond)
            index = int(match["index"] or 0)
            await self.reply(
                reply,
                lambda: self.click(caller_of(context), match["action"], job_id, index),
                "button",
            )

        async def on_cancel(
            body: dict[str, Any], context: AsyncBoltContext, respond: AsyncRespond
        ) -> None:
            job_id = str((body.get("actions") or [{}])[0].get("value", ""))
            if not JOB_ID.match(job_id):
                return
            await self.reply(
                self._responder(respond),
                lambda: self.cancel_click(caller_of(context), job_id),
                "cancel button",
            )

        async def on_delete_data(
            body: dict[str, Any], context: AsyncBoltContext, respond: AsyncRespond
        ) -> None:
            user_id = str((body.get("actions") or [{}])[0].get("value", ""))
            if not SLACK_USER_ID.match(user_id):
                return
            # The answer replaces the preview, so its button can't be pressed again.
            await self.reply(
                self._responder(respond, replace=True),
                lambda: self.delete_data_click(caller_of(context), user_id),
                "delete data button",
            )

        async def on_message(
            body: dict[str, Any], event: dict[str, Any], context: AsyncBoltContext
        ) -> None:
            await self.message(event, context, str(body.get("event_id") or ""))

        for name in (*COMMANDS, "dreambot"):
            self.app.command(f"/{name}")(ack=ack_now, lazy=[on_command])
        self.app.action(re.compile(ACTION_ID.pattern))(ack=ack_now, lazy=[on_action])
        self.app.action(CANCEL_ACTION_ID)(ack=ack_now, lazy=[on_cancel])
        self.app.action(DELETE_DATA_ACTION_ID)(ack=ack_now, lazy=[on_delete_data])
        self.app.event("message")(ack=ack_now, lazy=[on_message])

    def _responder(self, respond: AsyncRespond, *, replace: bool = False) -> Reply:
        """Private replies through the request's ``response_url``; ``replace``: the first
        replaces the message whose button was pressed (its button goes with it)."""

        async def send(text: str, blocks: list[dict[str, Any]] | None = None) -> None:
            nonlocal replace
            replace_original, replace = replace, False
            try:
                response = await respond(
                    text=text,
                    blocks=blocks,
                    response_type="ephemeral",
                    replace_original=replace_original,
                )
            except Exception:
                log.warning("private reply not sent: %s", text, exc_info=True)
                return
            if response.status_code != 200:
                log.warning("private reply refused (HTTP %s): %s", response.status_code, text)

        return send

    def _ephemeral(self, caller: Caller) -> Reply:
        async def send(text: str, blocks: list[dict[str, Any]] | None = None) -> None:
            try:
                await self.client.chat_postEphemeral(
                    channel=caller.channel_id, user=caller.user_id, text=text, blocks=blocks
                )
            except SlackApiError as exc:
                log.warning("private reply not sent (%s): %s", slack_error(exc), text)

        return send

    async def reply(self, send: Reply, work: Work, what: str) -> None:
        """Run ``work`` and answer privately with its text or the error (in several messages
        when it is long: no more than a ``response_url`` takes), or its text with blocks."""
        answer = await common.command_reply(work, f"slack {what}")
        if isinstance(answer, WithBlocks):
            await send(fit(escape(answer.text)), answer.blocks)
            return
        for part in common.split_text(escape(answer), MAX_TEXT):
            await send(part)

    # Commands.

    async def command(self, caller: Caller, name: str, text: str) -> str | WithBlocks:
        """Run ``/name text``; ``/dreambot name text`` is the same command."""
        if name == "dreambot":
            first, _, text = text.strip().partition(" ")
            name = first.lstrip("/").lower() or "help"
        handler = self._commands.get(name)
        if handler is None:
            raise UserError(f"I don't know {as_typed('/' + name)}. Try `/dreambot help`.")
        return await handler(caller, text.strip())

    async def help(self, caller: Caller, text: str) -> str:
        """/dreambot help."""
        return f"```\n{self.core.help_text(usage_text(self.core, self.train_window))}\n```"

    async def train_command(self, caller: Caller, text: str) -> str:
        """/train <name> <class> [--model NAME]: check what needs no photos, then wait for
        them in this channel."""
        rest, options = split_options(unescape(text), ["model"])
        name, _, class_noun = rest.strip().partition(" ")
        if not name or not class_noun.strip():
            raise UserError(
                "Usage: /train <name> <class> [--model NAME], e.g. /train rex dog — then post "
                "the photos here."
            )
        model = options.get("model")
        # A model, name or class the core would refuse (or a ban, or no trainings left
        # today) is refused now, not after the photos came.
        new = await self.core.check_new_subject(caller.owner, name, class_noun, model=model)
        until = self.clock() + self.train_window
        pending = PendingTraining(new.name, new.class_noun, until, model)
        self.pending[self._pending_key(caller)] = pending
        await self._keep_pending(caller, pending)
        most = min(self.core.settings.max_photos, MAX_FILES_PER_MESSAGE)
        minutes = max(1, round(self.train_window / 60))
        in_dm = f"train {new.name} {new.class_noun}" + (f" --model {model}" if model else "")
        # Code spans: mrkdwn has no escape for _ (a name may hold one), and the DM's text is
        # then copied as it is.
        return (
            f"Now post {self.core.settings.min_photos}–{most} photos of `{new.name}` "
            f"({new.class_noun}) here, in one message, within {minutes} minutes. "
            "(If I'm not in this channel, invite me first, or send them to me in a DM with "
            f"the text: `{in_dm}`)"
        )

    async def message(
        self, event: dict[str, Any], context: AsyncBoltContext, event_id: str = ""
    ) -> None:
        """A message: photos for a /train, photos with ``@dreambot train <name> <class>``, or
        a command written to the bot (``cancel rex`` in a DM, ``@dreambot jobs`` in a channel),
        which runs as ``/dreambot <command>`` would. ``event_id`` is the event's, which a copy
        that Slack sends again keeps: what the bot acts on, it acts on once."""
        files = event.get("files") or []
        user = event.get("user")
        if not user or event.get("bot_id") or user == context.bot_user_id:
            return
        team = context.team_id or context.enterprise_id
        if not team or not event.get("channel"):
            return
        caller = Caller(team, str(user), str(event["channel"]))
        if not files:
            if event.get("subtype") is None:  # not an edit, a join, a deletion…
                await self._text_command(event, context, caller, event_id)
            return
        text, options = split_options(unescape(event.get("text") or ""), ["model"])
        match = _TRAIN_MESSAGE.match(text)
        direct = event.get("channel_type") == "im"
        pending = await self._pending_for(caller)
        if match and (match["bot"] == context.bot_user_id if match["bot"] else direct):
            name, class_noun, model = match["name"], match["noun"], options.get("model")
        elif pending is not None:
            name, class_noun, model = pending.name, pending.class_noun, pending.model
        else:
            return  # photos shared for people, not for us
        if not await self._first_time(event_id):
            return
        await self.reply(
            self._ephemeral(caller),
            lambda: self.train(caller, name, class_noun, files, model=model),
            "train",
        )

    async def _text_command(
        self, event: dict[str, Any], context: AsyncBoltContext, caller: Caller, event_id: str
    ) -> None:
        """A message without files: a command when it is written to the bot (in a DM with
        it, or starting with its mention); everything else is people talking."""
        # The text stays as Slack escaped it, as a slash command's does: the command unescapes.
        written = _TO_THE_BOT.match(event.get("text") or "")
        if written is None:
            return
        if written["bot"]:
            if written["bot"] != context.bot_user_id:
                return
        elif event.get("channel_type") != "im":
            return
        if not await self._first_time(event_id):
            return
        text = written["rest"].strip()
        name = text.partition(" ")[0].lstrip("/").lower() or "help"
        await self.reply(
            self._ephemeral(caller), lambda: self.command(caller, "dreambot", text), name
        )

    async def _first_time(self, event_id: str) -> bool:
        """Whether the event comes for the first time: Slack sends it again (with
        X-Slack-Retry-Num) when our ack seemed late."""
        if not event_id or await self.core.first_time(f"event:{event_id}"):
            return True
        log.info("event %s came again; it was handled already", event_id)
        return False

    async def train(
        self,
        caller: Caller,
        name: str,
        class_noun: str,
        files: Iterable[dict[str, Any]],
        *,
        model: str | None = None,
    ) -> str:
        """Download the shared photos, queue the training, post the progress message."""
        # What the core would refuse without the photos is refused before the downloads.
        await self.core.check_new_subject(caller.owner, name, class_noun, model=model)
        shared = [await self._file_info(file) for file in files]
        uploads = await self.downloader.fetch_all(
            (str(file["url_private_download"]), str(file.get("name") or file["id"]))
            for file in shared
        )
        receipt = await self.core.train(
            caller.owner, caller.destination, name, class_noun, uploads, model=model
        )
        self.pending.pop(self._pending_key(caller), None)
        await self._drop_pending(caller)
        await self._post_queued(caller, receipt)
        return receipt.text

    async def imagine(self, caller: Caller, text: str) -> str:
        """/imagine <prompt> [--options]: queue a generation."""
        args = parse_imagine(unescape(text))
        receipt = await queue_imagine(self.core, caller.owner, caller.destination, args)
        await self._post_queued(caller, receipt)
        return receipt.text

    async def showcase(self, caller: Caller, text: str) -> str:
        """/showcase [name]: queue a subject's showcase grid."""
        name = unescape(text).strip() or None
        receipt = await self.core.showcase(caller.owner, caller.destination, name)
        await self._post_queued(caller, receipt)
        return receipt.text

    async def forget(self, caller: Caller, text: str) -> str:
        """/forget <name>."""
        name = unescape(text).strip()
        if not name:
            raise UserError("Usage: /forget <name> (see /subjects).")
        return await self.core.forget(caller.owner, name)

    async def share(self, caller: Caller, verb: str, text: str) -> str:
        """/dreambot share <name> <@user|everyone> and /dreambot unshare <name> [@user|
        everyone] (``verb``). Slack sends a mention as ``<@U123|mia>`` or ``<@U123>``."""
        name, target = parse_share_text(verb, unescape(text), syntax=self.core.syntax)
        if target not in (None, EVERYONE) and not SLACK_USER_ID.match(target):
            # A typed name ("mia", "@mia" without picking her) or <!here> is no user id.
            raise UserError(
                f"Name the person with a mention (type @ and pick them), or say everyone: "
                f"{COMMAND_PREFIX}{verb} {name} @mia"
            )
        if verb == "share":
            assert target is not None  # parse_share_text requires one for share
            return await self.core.sharing.share(caller.owner, name, target)
        return await self.core.sharing.unshare(caller.owner, name, target)

    async def cancel(self, caller: Caller, text: str) -> str:
        """/dreambot cancel [name or job id]: cancel one of the caller's jobs and close its
        progress message."""
        target = unescape(text).strip() or None
        cancellation = await self.core.cancel(caller.owner, target)
        await self._finish_progress(cancellation.job, common.CANCELLED_BY_OWNER)
        return cancellation.text

    async def cancel_click(self, caller: Caller, job_id: str) -> str:
        """The Cancel button of a job's progress message: its owner cancels it (anyone else
        is refused) and the message closes, without the button."""
        cancellation = await self.core.cancel_from_button(caller.owner, job_id, mention=mention)
        await self._finish_progress(cancellation.job, common.CANCELLED_BY_OWNER)
        return cancellation.text

    async def click(self, caller: Caller, action: str, job_id: str, index: int = 0) -> str:
        """Reroll / Vary / Upscale (of image ``index``): redo a generation, as (and paid by)
        the clicker."""
        receipt = await self.core.reimagine(
            caller.owner,
            caller.destination,
            job_id,
            vary=action == "vary",
            upscale=action == "upscale",
            index=index,
            mention=mention,
        )
        await self._post_queued(caller, receipt)
        return receipt.text

    async def mydata(self, caller: Caller, text: str) -> str | WithBlocks:
        """/dreambot mydata: what is stored about the caller here; /dreambot mydata delete:
        what deleting it would delete, above a "Delete everything" button that does it.
        Banned users may too."""
        words = unescape(text).lower().split()
        if not words:
            return await self.core.personal_data.summary(caller.owner)
        if words != ["delete"]:
            raise UserError(f"Usage: {COMMAND_PREFIX}mydata [delete]")
        preview = await self.core.personal_data.deletion_preview(caller.owner)
        shown = f"{preview}\nPress Delete everything to go ahead."
        section = {"type": "mrkdwn", "text": fit(escape(shown), MAX_SECTION_TEXT)}
        return WithBlocks(
            shown, [{"type": "section", "text": section}, delete_data_button(caller.user_id)]
        )

    async def delete_data_click(self, caller: Caller, user_id: str) -> str:
        """The "Delete everything" button: the user it was shown to deletes their data here
        (anyone else is refused); their cancelled jobs' progress messages close."""
        deletion = await self.core.personal_data.delete_from_button(
            caller.owner, user_id, mention=mention
        )
        for job in deletion.cancelled:
            await self._finish_progress(job, common.CANCELLED_BY_OWNER)
        return self.core.personal_data.deleted_text(deletion)

    async def is_moderator(self, caller: Caller) -> bool:
        """A workspace admin or owner, or a moderator by configuration (user id)."""
        if self.core.moderation.is_configured_moderator(caller.user_id):
            return True
        try:
            response = await self.client.users_info(user=caller.user_id)
        except SlackApiError as exc:
            log.warning("users.info %s failed (%s)", caller.user_id, slack_error(exc))
            return False
        user = response.get("user") or {}
        return bool(user.get("is_admin") or user.get("is_owner") or user.get("is_primary_owner"))

    async def mod(self, caller: Caller, text: str) -> str:
        """/mod <command>: checked on every call, before anything changes."""
        moderator = await self.is_moderator(caller)
        if moderator and text.strip().lower() in ("", "help"):
            return f"```\n{MOD_HELP}\n```\n{SLACK_MOD_NOTE}"
        return await self.core.mod(caller.owner, moderator, unescape(text))

    def _pending_key(self, caller: Caller) -> tuple[str, str, str]:
        return (caller.team_id, caller.channel_id, caller.user_id)

    def _pending_redis_key(self, caller: Caller) -> str:
        return f"dreambot:slack:pending-train:{caller.team_id}:{caller.channel_id}:{caller.user_id}"

    async def _pending_for(self, caller: Caller) -> PendingTraining | None:
        """The caller's /train waiting for photos here, if its window is open. Kept in memory
        and, for a bot restarted within the window, in Redis (expiring with the window)."""
        key = self._pending_key(caller)
        pending = self.pending.get(key)
        if pending is not None:
            if pending.until >= self.clock():
                return pending
            del self.pending[key]
            await self._drop_pending(caller)
            return None
        try:
            stored = await self.core.queue.get(self._pending_redis_key(caller))
        except (RedisError, OSError) as exc:
            log.warning("can't read a waiting /train from Redis: %s", exc)
            return None
        if stored is None:
            return None
        fields = json.loads(stored)
        left = fields["ends_at"] - time.time()  # wall-clock: it outlived a process
        if left <= 0:
            return None
        pending = PendingTraining(
            fields["name"], fields["class_noun"], self.clock() + left, fields["model"]
        )
        self.pending[key] = pending
        return pending

    async def _keep_pending(self, caller: Caller, pending: PendingTraining) -> None:
        """Remember ``pending`` in Redis too, so photos posted after a restart still count."""
        left = max(1, round(pending.until - self.clock()))
        fields = {
            "name": pending.name,
            "class_noun": pending.class_noun,
            "model": pending.model,
            "ends_at": time.time() + left,
        }
        try:
            await self.core.queue.set(self._pending_redis_key(caller), json.dumps(fields), ex=left)
        except (RedisError, OSError) as exc:  # this process still remembers it
            log.warning("can't keep a waiting /train in Redis: %s", exc)

    async def _drop_pending(self, caller: Caller) -> None:
        try:
            await self.core.queue.delete(self._pending_redis_key(caller))
        except (RedisError, OSError) as exc:  # it expires with its window
            log.warning("can't forget a waiting /train in Redis: %s", exc)

    async def _file_info(self, file: dict[str, Any]) -> dict[str, Any]:
        """The file with its download URL (some events carry only its id)."""
        if file.get("url_private_download"):
            return file
        if not file.get("id"):
            raise UserError("A shared file came without its details; post it again.")
        response = await self.client.files_info(file=str(file["id"]))
        info = response.get("file") or {}
        if not info.get("url_private_download"):
            raise UserError(f"I can't download {info.get('name') or 'a file'}; post it again.")
        return dict(info)

    # Sink: engine updates.

    async def show_progress(self, job: Job, text: str, progress: Progress) -> None:
        """Post the job's progress message once, then update it (throttled), with the newest
        live preview when Slack can fetch one."""
        content = fit(f"{mention(job.destination['user_id'])} · {escape(text)}")
        if progress.preview_url and self.shows_previews and job.id not in self._unfetchable:
            await self._remember_preview(job, progress)
        await self.progress.update(
            job,
            content,
            self._post_progress,
            # The blocks are built when the update is sent, so it shows the newest preview.
            lambda ts: self._edit_progress(
                job, ts, content, self._progress_blocks(job.id, content)
            ),
        )

    async def show_result(self, delivery: Delivery) -> None:
        """Upload the result's images (with buttons for generations), mentioning the user."""
        job = delivery.job
        files, buttons_for = await common.result_files(self.core.artifacts, delivery)
        self.edits.forget(job.id)
        text = f"{mention(job.destination['user_id'])} {escape(delivery.text)}"
        await self._post_to_user(job, fit(text), files, buttons_for, delivery.parts)
        await self._finish_progress(job, "✓ done — result below.")

    async def show_failure(self, job: Job, text: str) -> None:
        """Tell the user in the channel (or by DM) that the job failed, or that a moderator
        (a ban, a deleted subject) cancelled it."""
        self.edits.forget(job.id)
        mark = common.ending_mark(job)
        content = f"{mention(job.destination['user_id'])} {mark} {escape(text)}"
        await self._post_to_user(job, fit(content), [], None)
        await self._finish_progress(job, common.ending_note(job))

    # Messages.

    async def _post_queued(self, caller: Caller, receipt: Receipt) -> None:
        """Post the job's progress message, naming the job as its later updates will."""
        queued = progress_text(Progress(job_id=receipt.job_id, phase="queued"), receipt.label)
        content = f"{mention(caller.user_id)} · {escape(queued)} {common.queue_place(receipt)}"
        await self.progress.post_queued(
            receipt.job_id, caller.destination, content, self._post_progress
        )

    async def _post_progress(
        self, job_id: str, destination: dict[str, Any], content: str
    ) -> str | None:
        """Post a progress message, with its Cancel button (every update carries it; closing
        the message removes it); None if the channel refuses (progress is best effort)."""
        self.edits.sent(job_id)
        try:
            response = await self.client.chat_postMessage(
                channel=str(destination["channel_id"]),
                text=content,
                blocks=self._progress_blocks(job_id, content),
                unfurl_links=False,
            )
        except SlackApiError as exc:
            if slack_error(exc) not in CHANNEL_REFUSED:
                raise
            log.warning("job %s: no progress message in the channel (%s)", job_id, exc)
            return None
        return str(response["ts"])

    async def _remember_preview(self, job: Job, progress: Progress) -> None:
        """Keep the public URL of the job's newest preview, for its next update."""
        preview_url = str(progress.preview_url)
        try:
            public = await self.core.artifacts.apublic_url(preview_url, self.artifacts_public_url)
        except Exception:
            # Best effort (signing may lack credentials): the text still moves on.
            log.warning("job %s: no public URL for preview %s", job.id, preview_url, exc_info=True)
            return
        if public is not None:
            alt = f"preview, step {progress.step} of {progress.total}"
            self._previews[job.id] = (public, alt)

    def _progress_blocks(self, job_id: str, content: str) -> list[dict[str, Any]]:
        """The blocks of a progress message: its text, the newest preview (where previews can
        be shown and one came), and the Cancel button. An update's blocks replace the
        message's, so every update carries them all."""
        text = {"type": "mrkdwn", "text": fit(content, MAX_SECTION_TEXT)}
        blocks: list[dict[str, Any]] = [{"type": "section", "text": text}]
        preview = self._previews.get(job_id)
        if preview is not None:
            blocks.append({"type": "image", "image_url": preview[0], "alt_text": preview[1]})
        blocks.append(cancel_button(job_id))
        return blocks

    async def _edit_progress(
        self, job: Job, ts: str, content: str, blocks: list[dict[str, Any]] | None = None
    ) -> None:
        """Update a progress message; ``blocks`` replace its blocks ([] removes them, None
        leaves them out of the call)."""
        try:
            await self.client.chat_update(
                channel=str(job.destination["channel_id"]), ts=ts, text=content, blocks=blocks
            )
        except SlackApiError as exc:
            error = slack_error(exc)
            images = [block for block in blocks or [] if block["type"] == "image"]
            if error == "invalid_blocks" and images:
                # Slack could not download the preview (is DREAMBOT_ARTIFACTS_PUBLIC_URL
                # reachable from the internet?): this update, and the job's next, go without.
                log.warning(
                    "job %s: Slack refused preview %s (%s); the job goes on without previews",
                    job.id,
                    images[0]["image_url"],
                    exc,
                )
                self._unfetchable.add(job.id)
                self._previews.pop(job.id, None)
                others = [block for block in blocks or [] if block["type"] != "image"]
                await self._edit_progress(job, ts, content, others)
                return
            if error not in MESSAGE_GONE:
                raise
            log.warning("job %s: progress message %s gone (%s)", job.id, ts, exc)
            self.progress.gone(job.id)

    async def _finish_progress(self, job: Job, note: str) -> None:
        """Close the job's progress message (best effort: the result is already posted)."""
        self._previews.pop(job.id, None)
        self._unfetchable.discard(job.id)
        content = f"{mention(job.destination['user_id'])} · {note}"
        # The preview and the Cancel button go (an empty list removes the blocks): the job is
        # over, and the result shows the images.
        await self.progress.finish(job, lambda ts: self._edit_progress(job, ts, content, []))

    async def _post_to_user(
        self,
        job: Job,
        text: str,
        files: list[tuple[str, bytes]],
        buttons_for: str | None,
        parts: PostedParts | None = None,
    ) -> None:
        """Post in the job's channel; by DM if the channel refuses; else log. ``parts``: what
        an earlier try posted (left out now), and what this one posts.

        The DM stands on its own, even when the channel refused only the later messages of a
        result: its first message carries the text, under a line saying why it came by DM,
        then come the files and buttons the channel didn't take.

        Other errors (Slack down, rate limits beyond the retries) propagate, so the delivery
        is retried later.
        """
        user_id = str(job.destination["user_id"])
        parts = PostedParts() if parts is None else parts
        try:
            await self._send(str(job.destination["channel_id"]), text, files, buttons_for, parts)
            return
        except SlackApiError as exc:
            if slack_error(exc) not in CHANNEL_REFUSED:
                raise
            log.warning("job %s: channel refused the result (%s); sending it by DM", job.id, exc)
        note = common.by_dm_note(f"<#{job.destination['channel_id']}>", parts)
        try:
            opened = await self.client.conversations_open(users=user_id)
            dm = str(opened["channel"]["id"])
            await self._send(dm, fit(f"{note}\n{text}"), files, buttons_for, parts.by_dm())
        except SlackApiError as exc:
            if slack_error(exc) not in DM_REFUSED:
                raise
            common.log_undelivered(log, job, slack_error(exc), text)

    async def _send(
        self,
        channel: str,
        text: str,
        files: list[tuple[str, bytes]],
        buttons_for: str | None,
        parts: PostedParts,
    ) -> None:
        """The text with the first upload of files (ten a message), or alone when no file is
        left to post, then the buttons in a message of their own; each added to ``parts`` once
        posted, and left out if it was."""
        comment = None if parts.text in parts else text
        pending = parts.unposted(files)
        if not pending and comment is not None:
            await self.client.chat_postMessage(channel=channel, text=comment, unfurl_links=False)
            await parts.add(parts.text)
        for start in range(0, len(pending), MAX_FILES_PER_MESSAGE):
            batch = pending[start : start + MAX_FILES_PER_MESSAGE]
            await self.client.files_upload_v2(
                channel=channel,
                file_uploads=[
                    {"file": data, "filename": name, "title": name} for name, data in batch
                ],
                initial_comment=comment,
            )
            await parts.add(parts.text, *(file_part(name) for name, _ in batch))
            comment = None
        if buttons_for and BUTTONS_PART not in parts:
            await self.client.chat_postMessage(
                channel=channel,
                text="Reroll, vary or upscale this result" if files else "Reroll this prompt",
                blocks=[job_buttons(buttons_for, len(files))],
            )
            await parts.add(BUTTONS_PART)


def job_buttons(job_id: str, images: int = 1) -> dict[str, Any]:
    """An actions block for a generation job: Reroll, then Vary and Upscale for each of its
    first four images (🔀 V1 … ⬆️ U1 …; plain "Vary" / "Upscale" for a single image); Reroll
    alone when it has no image (the safety filter withheld them all)."""
    shown = min(images, MAX_BUTTON_IMAGES)

    def button(text: str, action_id: str) -> dict[str, Any]:
        return {
            "type": "button",
            "text": {"type": "plain_text", "text": text, "emoji": True},
            "action_id": action_id,
            "value": job_id,
        }

    elements = [button("🎲 Reroll", "dreambot:reroll")]
    for action, emoji, word in (("vary", "🔀", "Vary"), ("upscale", "⬆️", "Upscale")):
        for index in range(shown):
            label = word if shown == 1 else f"{word[0]}{index + 1}"
            elements.append(button(f"{emoji} {label}", f"dreambot:{action}:{index}"))
    return {"type": "actions", "block_id": f"dreambot:{job_id}", "elements": elements}


def _confirmed_button(
    block_id: str, label: str, action_id: str, value: str, confirm: tuple[str, str, str]
) -> dict[str, Any]:
    """An actions block holding one button that Slack asks about before it sends the click:
    ``confirm`` is the dialog's title, text and the confirming button's words."""
    title, text, yes = confirm
    return {
        "type": "actions",
        "block_id": block_id,
        "elements": [
            {
                "type": "button",
                "text": {"type": "plain_text", "text": label, "emoji": True},
                "action_id": action_id,
                "value": value,
                "confirm": {
                    "title": {"type": "plain_text", "text": title},
                    "text": {"type": "plain_text", "text": text},
                    "confirm": {"type": "plain_text", "text": yes},
                    "deny": {"type": "plain_text", "text": "Keep it"},
                    "style": "danger",
                },
            }
        ],
    }


def cancel_button(job_id: str) -> dict[str, Any]:
    """An actions block with the Cancel button of a job's progress message (only the job's
    owner may use it: the core refuses others). Slack asks before it sends the click: a
    training can't be undone."""
    return _confirmed_button(
        f"dreambot:progress:{job_id}",
        "✖️ Cancel",
        CANCEL_ACTION_ID,
        job_id,
        (
            "Cancel this job?",
            "It stops (or leaves the queue) and what it took from your quota is given back.",
            "Cancel it",
        ),
    )


def delete_data_button(user_id: str) -> dict[str, Any]:
    """An actions block with the "Delete everything" button that confirms /dreambot mydata
    delete (only ``user_id`` may use it: the core refuses others); Slack asks once more."""
    block = _confirmed_button(
        f"dreambot:delete-data:{user_id}",
        "🗑️ Delete everything",
        DELETE_DATA_ACTION_ID,
        user_id,
        (
            "Delete everything?",
            "Your subjects, images and prompts here are deleted, and your jobs cancelled. "
            "This can't be undone.",
            "Delete it all",
        ),
    )
    block["elements"][0]["style"] = "danger"
    return block


def web_client(token: str, base_url: str | None = None) -> AsyncWebClient:
    """A Web API client that also waits out Slack's rate limits (HTTP 429) twice."""
    handlers = [*async_default_handlers(), AsyncRateLimitErrorRetryHandler(max_retry_count=2)]
    if base_url is None:
        return AsyncWebClient(token=token, retry_handlers=handlers)
    return AsyncWebClient(token=token, base_url=base_url, retry_handlers=handlers)


def build_adapter(core: Core, settings: Settings) -> SlackAdapter:
    """The adapter as configured (downloads only from files.slack.com)."""
    if settings.slack_bot_token is None:
        raise ConfigError("DREAMBOT_SLACK_BOT_TOKEN is not set")
    token = settings.slack_bot_token.get_secret_value()
    socket_mode = settings.slack_app_token is not None
    if not socket_mode and settings.slack_signing_secret is None:
        raise ConfigError(
            "DREAMBOT_SLACK_SIGNING_SECRET is not set (needed unless DREAMBOT_SLACK_APP_TOKEN "
            "selects Socket Mode)"
        )
    secret = settings.slack_signing_secret
    return SlackAdapter(
        core,
        web_client(token),
        signing_secret=secret.get_secret_value() if secret else "",
        socket_mode=socket_mode,
        downloader=SlackDownloader(
            token,
            max_bytes=settings.max_photo_bytes,
            timeout=settings.slack_download_timeout,
        ),
        edit_interval=settings.slack_edit_interval,
        train_window=settings.slack_train_window,
        artifacts_public_url=settings.artifacts_public_url,
    )


async def serve_http(adapter: SlackAdapter, host: str, port: int, path: str) -> None:
    """Serve Slack's requests over HTTP until cancelled."""
    runner = web.AppRunner(adapter.web_app(path))
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        log.info("serving Slack requests on http://%s:%s%s", host, port, path)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


async def serve_socket_mode(adapter: SlackAdapter, app_token: str) -> None:
    """Take Slack's requests over a Socket Mode websocket until cancelled."""
    from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler

    handler = AsyncSocketModeHandler(adapter.app, app_token)
    try:
        await handler.connect_async()  # type: ignore[no-untyped-call]
        log.info("connected to Slack in Socket Mode")
        await asyncio.Event().wait()
    finally:
        await handler.close_async()  # type: ignore[no-untyped-call]


async def run_slack(settings: Settings) -> None:
    """Check the token, consume the result queue, and serve Slack until interrupted."""
    from bot.launcher import delivering, open_core

    async with open_core(settings, PLATFORM) as runtime:
        adapter = build_adapter(runtime.core, settings)
        try:
            try:
                identity = await adapter.client.auth_test()
            except SlackApiError as exc:
                raise ConfigError(
                    f"Slack refused DREAMBOT_SLACK_BOT_TOKEN ({slack_error(exc)})"
                ) from exc
            log.info("signed in to Slack team %s as %s", identity["team"], identity["user"])
            async with delivering(runtime, adapter):
                if settings.slack_app_token is not None:
                    await serve_socket_mode(adapter, settings.slack_app_token.get_secret_value())
                else:
                    await serve_http(
                        adapter, settings.slack_host, settings.slack_port, settings.slack_path
                    )
        finally:
            await adapter.close()
