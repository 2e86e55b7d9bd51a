"""A local fake of the part of Discord's HTTP API the adapter uses, and interaction payloads.

discord.py is pointed at the fake by setting ``discord.http.Route.BASE`` before logging in.
Every request is recorded (method, path, JSON or multipart body, files, fake-clock time) so
tests assert on what Discord would have received. The same server plays the attachment CDN
under ``/cdn/…``.

Like Discord, it refuses a message whose files together exceed the channel's upload limit
(``upload_limits``, 10 MiB unless a test sets another) with HTTP 413 and code 40005; a message
over 2,000 characters, or with components beyond Discord's limits (5 rows of 5 buttons, custom
ids up to 100 characters, labels up to 80), autocomplete answers beyond 25 choices or 100
characters, and slash commands registered beyond Discord's rules (``command_errors``: names,
descriptions, option and choice counts and lengths, option order, 4,000 characters a command),
with HTTP 400 and code 50035; a second first response to an interaction with HTTP
400 and code 40060; follow-ups on an interaction token more than 15 minutes (of the fake clock)
after its first response with HTTP 401 and code 50027; and the next ``rate_limited_edits``
message edits with HTTP 429 and a ``retry_after``. A test can make chosen message posts fail
(``unavailable_posts``: HTTP 503, which discord.py does not retry), or a channel refuse
messages after its first few (``refuse_after``: 403 or 404, access lost or channel deleted).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
import warnings
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import BodyPartReader, web

with warnings.catch_warnings():
    # discord.py imports the stdlib's audioop (voice support) at import time, which warns on
    # Python 3.11-3.12; pytest's filterwarnings=error would turn that import into a failure.
    warnings.filterwarnings("ignore", "'audioop' is deprecated", DeprecationWarning)
    import discord

from bot.adapters.discord import DiscordAdapter
from bot.adapters.downloads import Downloader
from bot.launcher import BotRuntime

APP_ID = 1000
GUILD_ID = 111
CHANNEL_ID = 222
USER_ID = 333
OTHER_USER_ID = 444
DM_CHANNEL_ID = 555
EDIT_INTERVAL = 3.0
ALL_PERMISSIONS = 2147483647
MEMBER_PERMISSIONS = 0x400 | 0x800 | 0x80000000  # view channel, send messages, use commands
MANAGE_GUILD = 0x20
MiB = 1024 * 1024
UPLOAD_LIMIT = 10 * MiB
"""Discord's upload limit per message for bots, in servers without boosts and in DMs."""
BOOSTED_UPLOAD_LIMITS = {2: 50 * MiB, 3: 100 * MiB}
MAX_CONTENT = 2000
"""Discord's limit on a message's content, in characters."""
TOKEN_LIFETIME = 15 * 60
"""How long an interaction token takes follow-ups, in seconds."""

BOT_USER = {
    "id": str(APP_ID),
    "username": "dreambot",
    "discriminator": "0",
    "global_name": None,
    "avatar": None,
    "bot": True,
}


def user_payload(user_id: int) -> dict[str, Any]:
    """A Discord user object."""
    return {
        "id": str(user_id),
        "username": f"user{user_id}",
        "discriminator": "0",
        "global_name": None,
        "avatar": None,
    }


@dataclass
class Recorded:
    """One request the fake received."""

    method: str
    path: str
    query: dict[str, str]
    json: Any
    files: list[tuple[str, bytes]]
    at: float
    response_id: str | None = None
    """The id of the message the fake created in reply, if it created one."""
    status: int = 200
    """The HTTP status the fake answered with."""

    @property
    def content(self) -> str | None:
        """The message content sent, if any."""
        return (self.json or {}).get("content")

    @property
    def pings(self) -> set[str]:
        """Whom Discord would notify for this message, as its documented allowed-mentions
        rules decide: ``"everyone"`` for @everyone or @here, ``"role:<id>"``, and user ids,
        each only where ``allowed_mentions`` lets it (without one: all that is written). An
        ephemeral message counts alike (what Discord does with those is not documented)."""
        content = self.content or ""
        allowed = (self.json or {}).get("allowed_mentions")
        parse = {"everyone", "roles", "users"} if allowed is None else set(allowed.get("parse", []))
        users = set() if allowed is None else {str(u) for u in allowed.get("users", [])}
        roles = set() if allowed is None else {str(r) for r in allowed.get("roles", [])}
        pings = set()
        if "everyone" in parse and re.search(r"@(everyone|here)", content):
            pings.add("everyone")
        for role in re.findall(r"<@&(\d+)>", content):
            if "roles" in parse or role in roles:
                pings.add(f"role:{role}")
        for user in re.findall(r"<@!?(\d+)>", content):
            if "users" in parse or user in users:
                pings.add(user)
        return pings


class FakeClock:
    """Time that moves only when a test says so; ``sleep`` waits for it."""

    def __init__(self) -> None:
        self.now = 0.0
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        """Wait until the clock has been advanced past ``delay`` seconds from now."""
        future = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.now + delay, future))
        await future

    async def advance(self, seconds: float) -> int:
        """Let new tasks reach their sleep, move time on; return how many sleepers woke."""
        for _ in range(3):
            await asyncio.sleep(0)
        self.now += seconds
        woken = 0
        for entry in list(self._sleepers):
            target, future = entry
            if target <= self.now:
                self._sleepers.remove(entry)
                if not future.done():
                    future.set_result(None)
                    woken += 1
        return woken


@dataclass
class FakeDiscord:
    """The fake REST API. Channels in ``forbidden``/``missing``/``unavailable`` answer
    403/404/503 to messages; files over a channel's ``upload_limits`` (default
    ``UPLOAD_LIMIT``) are answered 413."""

    clock: Callable[[], float] = time.monotonic
    requests: list[Recorded] = field(default_factory=list)
    forbidden: set[int] = field(default_factory=set)
    missing: set[int] = field(default_factory=set)
    unavailable: set[int] = field(default_factory=set)
    upload_limits: dict[int, int] = field(default_factory=dict)
    cdn: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    rate_limited_edits: int = 0
    """How many of the next message edits are answered 429 (``retry_after`` 0.05 s), as
    Discord answers beyond a route's rate limit."""
    cdn_delay: float = 0.0
    """Fake-clock seconds each download from the CDN takes (a slow download)."""
    unavailable_posts: set[int] = field(default_factory=set)
    """Which message posts (counted from 1 over every channel, refused ones included) are
    answered 503, as a Discord outage would answer a message after some of a result's."""
    refuse_after: dict[int, tuple[int, str]] = field(default_factory=dict)
    """Channel → (n, ``"forbidden"`` or ``"missing"``): once the channel has accepted n
    messages it joins that set, as when the bot loses access to it, or it is deleted, while a
    result is being posted."""
    base: str = ""
    _responded: dict[str, float] = field(default_factory=dict)
    """Interaction token → fake-clock time of its first response."""
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(9000))
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def find(self, method: str, path_part: str = "") -> list[Recorded]:
        """Recorded requests with this method whose path contains ``path_part``."""
        return [r for r in self.requests if r.method == method and path_part in r.path]

    def posted(self, channel_id: int) -> list[Recorded]:
        """The messages the fake accepted in a channel, in order (refused attempts left out)."""
        return [r for r in self.find("POST", f"/channels/{channel_id}/messages") if r.status < 300]

    async def wait_until(self, condition: Callable[[], bool], within: float = 5.0) -> None:
        """Wait (briefly, in real time) for requests to arrive."""
        async with asyncio.timeout(within):
            while not condition():
                self._arrived.clear()
                await self._arrived.wait()

    # Responses.

    @staticmethod
    def reply(payload: Any, status: int = 200) -> web.Response:
        # Exactly "application/json": with "; charset=…" discord.py reads the body as text.
        return web.Response(
            status=status,
            body=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"},
        )

    def message(self, channel_id: int | str, body: Any, message_id: int | None = None) -> Any:
        return {
            "id": str(message_id or next(self._ids)),
            "channel_id": str(channel_id),
            "content": (body or {}).get("content") or "",
            "author": BOT_USER,
            "attachments": [],
            "embeds": [],
            "mentions": [],
            "mention_roles": [],
            "mention_everyone": False,
            "pinned": False,
            "tts": False,
            "type": 0,
            "flags": (body or {}).get("flags") or 0,
            "components": [],
            "timestamp": "2025-01-01T00:00:00+00:00",
            "edited_timestamp": None,
        }

    async def record(self, request: web.Request) -> Recorded:
        body: Any = None
        files: list[tuple[str, bytes]] = []
        if request.content_type.startswith("multipart/"):
            reader = await request.multipart()
            async for part in reader:
                assert isinstance(part, BodyPartReader)
                if part.name == "payload_json":
                    body = json.loads(await part.text())
                else:
                    files.append((part.filename or "", bytes(await part.read())))
        elif request.can_read_body:
            body = await request.json()
        recorded = Recorded(
            request.method, request.path, dict(request.query), body, files, self.clock()
        )
        self.requests.append(recorded)
        self._arrived.set()
        return recorded

    # Routes.

    async def me(self, request: web.Request) -> web.Response:
        await self.record(request)
        return self.reply(BOT_USER)

    async def application(self, request: web.Request) -> web.Response:
        await self.record(request)
        return self.reply(
            {
                "id": str(APP_ID),
                "name": "dreambot",
                "description": "",
                "icon": None,
                "bot_public": True,
                "bot_require_code_grant": False,
                "verify_key": "0" * 64,
                "owner": user_payload(1),
                "flags": 0,
            }
        )

    async def sync_commands(self, request: web.Request) -> web.Response:
        recorded = await self.record(request)
        errors = command_errors(recorded.json)
        if errors:
            recorded.status = 400
            return self.reply(
                {"message": "Invalid Form Body", "code": 50035, "errors": errors}, 400
            )
        return self.reply(
            [
                {**command, "id": str(next(self._ids)), "application_id": str(APP_ID)}
                for command in recorded.json
            ]
        )

    def refusal(self, channel_id: int, recorded: Recorded) -> web.Response | None:
        """Discord's error answer to a new message in ``channel_id``, if it refuses it."""
        if channel_id in self.forbidden:
            answer = self.reply({"message": "Missing Access", "code": 50001}, 403)
        elif channel_id in self.missing:
            answer = self.reply({"message": "Unknown Channel", "code": 10003}, 404)
        elif channel_id in self.unavailable:
            answer = self.reply({"message": "Service Unavailable", "code": 0}, 503)
        else:
            return self.too_large(channel_id, recorded)
        recorded.status = answer.status
        return answer

    def invalid(self, recorded: Recorded) -> web.Response | None:
        """Discord's 400 (50035, "Invalid Form Body") for a message beyond its documented
        limits: content over 2,000 characters, more than 5 rows of components or 5 buttons in
        a row, a custom_id over 100 characters, a label over 80."""
        body = recorded.json or {}
        errors = []
        if len(body.get("content") or "") > MAX_CONTENT:
            errors.append(f"content: Must be {MAX_CONTENT} or fewer in length.")
        rows = body.get("components") or []
        if len(rows) > 5:
            errors.append("components: Must be 5 or fewer in length.")
        for row in rows:
            buttons = row.get("components") or []
            if len(buttons) > 5:
                errors.append("components.components: Must be 5 or fewer in length.")
            for button in buttons:
                if len(button.get("custom_id") or "") > 100:
                    errors.append("custom_id: Must be 100 or fewer in length.")
                if len(button.get("label") or "") > 80:
                    errors.append("label: Must be 80 or fewer in length.")
        if not errors:
            return None
        recorded.status = 400
        return self.reply({"message": "Invalid Form Body", "code": 50035, "errors": errors}, 400)

    def too_large(self, channel_id: int, recorded: Recorded) -> web.Response | None:
        """413 if the request's files together exceed the channel's upload limit."""
        limit = self.upload_limits.get(channel_id, UPLOAD_LIMIT)
        if sum(len(data) for _, data in recorded.files) <= limit:
            return None
        recorded.status = 413
        return self.reply({"message": "Request entity too large", "code": 40005}, 413)

    async def create_message(self, request: web.Request) -> web.Response:
        recorded = await self.record(request)
        channel_id = int(request.match_info["channel_id"])
        if len(self.find("POST", "/messages")) in self.unavailable_posts:
            recorded.status = 503
            return self.reply({"message": "Service Unavailable", "code": 0}, 503)
        refused = self.refusal(channel_id, recorded) or self.invalid(recorded)
        if refused is not None:
            return refused
        message = self.message(channel_id, recorded.json)
        recorded.response_id = message["id"]
        if channel_id in self.refuse_after:
            accepted, refusal = self.refuse_after[channel_id]
            if len(self.posted(channel_id)) >= accepted:
                getattr(self, refusal).add(channel_id)
        return self.reply(message)

    async def edit_message(self, request: web.Request) -> web.Response:
        recorded = await self.record(request)
        info = request.match_info
        if self.rate_limited_edits:
            self.rate_limited_edits -= 1
            recorded.status = 429
            limited = {
                "message": "You are being rate limited.",
                "retry_after": 0.05,
                "global": False,
            }
            answer = self.reply(limited, 429)
            # Discord's answers come through its proxy; a 429 without "Via" is Cloudflare's.
            answer.headers.update({"Via": "1.1 google", "Retry-After": "1"})
            return answer
        refused = self.too_large(int(info["channel_id"]), recorded) or self.invalid(recorded)
        if refused is not None:
            return refused
        return self.reply(self.message(info["channel_id"], recorded.json, int(info["message_id"])))

    async def create_dm(self, request: web.Request) -> web.Response:
        recorded = await self.record(request)
        recipient = int(recorded.json["recipient_id"])
        return self.reply(
            {"id": str(DM_CHANNEL_ID), "type": 1, "recipients": [user_payload(recipient)]}
        )

    async def interaction_callback(self, request: web.Request) -> web.Response:
        recorded = await self.record(request)
        if request.match_info["token"] in self._responded:
            # Like Discord: an interaction takes one first response (a replay can't answer).
            recorded.status = 400
            acknowledged = {"message": "Interaction has already been acknowledged.", "code": 40060}
            return self.reply(acknowledged, 400)
        self._responded[request.match_info["token"]] = self.clock()
        if recorded.json["type"] == 8:  # autocomplete: 25 choices, names 1-100, values ≤ 100
            choices = recorded.json["data"]["choices"]
            if len(choices) > 25 or any(
                not 1 <= len(choice["name"]) <= 100 or len(str(choice["value"])) > 100
                for choice in choices
            ):
                recorded.status = 400
                return self.reply({"message": "Invalid Form Body", "code": 50035}, 400)
        flags = (recorded.json.get("data") or {}).get("flags") or 0
        return self.reply(
            {
                "interaction": {
                    "id": request.match_info["interaction_id"],
                    "type": 2,
                    "response_message_loading": recorded.json["type"] == 5,
                    "response_message_ephemeral": bool(flags & 64),
                }
            }
        )

    async def webhook_message(self, request: web.Request) -> web.Response:
        recorded = await self.record(request)
        responded = self._responded.get(request.match_info["token"])
        if responded is not None and self.clock() - responded > TOKEN_LIFETIME:
            recorded.status = 401
            return self.reply({"message": "Invalid Webhook Token", "code": 50027}, 401)
        refused = self.invalid(recorded)
        if refused is not None:
            return refused
        return self.reply(self.message(CHANNEL_ID, recorded.json))

    async def cdn_file(self, request: web.Request) -> web.Response:
        await self.record(request)
        if self.cdn_delay:
            assert isinstance(self.clock, FakeClock)
            self.clock.now += self.cdn_delay
        data, content_type = self.cdn[request.match_info["name"]]
        return web.Response(body=data, headers={"Content-Type": content_type})

    def app(self) -> web.Application:
        # aiohttp's own cap (1 MiB) would answer 413 before the fake sees the files.
        app = web.Application(client_max_size=256 * MiB)
        api = "/api/v10"
        app.router.add_get(f"{api}/users/@me", self.me)
        app.router.add_get(f"{api}/oauth2/applications/@me", self.application)
        app.router.add_put(f"{api}/applications/{{app_id}}/commands", self.sync_commands)
        app.router.add_put(
            f"{api}/applications/{{app_id}}/guilds/{{guild_id}}/commands", self.sync_commands
        )
        app.router.add_post(f"{api}/channels/{{channel_id}}/messages", self.create_message)
        app.router.add_patch(
            f"{api}/channels/{{channel_id}}/messages/{{message_id}}", self.edit_message
        )
        app.router.add_post(f"{api}/users/@me/channels", self.create_dm)
        app.router.add_post(
            f"{api}/interactions/{{interaction_id}}/{{token}}/callback", self.interaction_callback
        )
        app.router.add_post(f"{api}/webhooks/{{app_id}}/{{token}}", self.webhook_message)
        app.router.add_patch(
            f"{api}/webhooks/{{app_id}}/{{token}}/messages/@original", self.webhook_message
        )
        app.router.add_get("/cdn/{name}", self.cdn_file)
        return app


MAX_COMMANDS = 100
"""How many slash commands an application may register (globally, or in one server)."""
MAX_COMMAND_CHARACTERS = 4000
"""Discord's cap on a command's names, descriptions and choice values, all counted together."""
SUBCOMMAND_TYPES = (1, 2)


def _command_name_ok(name: Any) -> bool:
    # Discord's ^[-_'\p{L}\p{N}\p{sc=Deva}\p{sc=Thai}]{1,32}$, lowercase where a letter has a
    # lowercase form (str.isalnum covers letters and digits of every script).
    return (
        isinstance(name, str)
        and 1 <= len(name) <= 32
        and all(c.isalnum() or c in "-_'" for c in name)
        and name == name.lower()
    )


def _option_errors(options: list[dict[str, Any]], where: str) -> tuple[list[str], int]:
    """What Discord refuses in a list of command options (recursively), and their count of
    characters toward ``MAX_COMMAND_CHARACTERS``."""
    errors: list[str] = []
    characters = 0
    if len(options) > 25:
        errors.append(f"{where}.options: Must be 25 or fewer in length.")
    seen_optional = False
    for index, option in enumerate(options):
        at = f"{where}.options.{index}"
        name, description = option.get("name"), option.get("description") or ""
        characters += len(str(name)) + len(description)
        if not _command_name_ok(name):
            errors.append(f"{at}.name: Invalid name {name!r}.")
        if not 1 <= len(description) <= 100:
            errors.append(f"{at}.description: Must be between 1 and 100 in length.")
        if option.get("type") in SUBCOMMAND_TYPES:
            nested, count = _option_errors(option.get("options") or [], at)
            errors += nested
            characters += count
            continue
        if option.get("required"):
            if seen_optional:
                errors.append(f"{at}.required: Required options must be placed before optional.")
        else:
            seen_optional = True
        choices = option.get("choices") or []
        if choices and option.get("autocomplete"):
            errors.append(f"{at}.autocomplete: Autocomplete cannot be set with choices.")
        if len(choices) > 25:
            errors.append(f"{at}.choices: Must be 25 or fewer in length.")
        for choice in choices:
            characters += len(choice["name"]) + len(str(choice["value"]))
            if not 1 <= len(choice["name"]) <= 100 or len(str(choice["value"])) > 100:
                errors.append(f"{at}.choices: names 1-100 characters, values up to 100.")
    return errors, characters


def command_errors(commands: list[dict[str, Any]]) -> list[str]:
    """What Discord refuses in a bulk overwrite of slash commands: more than 100 commands;
    names not 1-32 lowercase letters, digits, - _ or '; descriptions not 1-100 characters;
    more than 25 options (or choices) at one level; a required option after an optional one;
    choices with autocomplete; choice names over 100 characters or values over 100; or a
    command over 4,000 characters in all."""
    errors = []
    if len(commands) > MAX_COMMANDS:
        errors.append(f"Must be {MAX_COMMANDS} or fewer in length.")
    for index, command in enumerate(commands):
        name, description = command.get("name"), command.get("description") or ""
        if not _command_name_ok(name):
            errors.append(f"{index}.name: Invalid name {name!r}.")
        if not 1 <= len(description) <= 100:
            errors.append(f"{index}.description: Must be between 1 and 100 in length.")
        nested, characters = _option_errors(command.get("options") or [], str(index))
        errors += nested
        if len(str(name)) + len(description) + characters > MAX_COMMAND_CHARACTERS:
            errors.append(f"{index}: Command exceeds maximum size ({MAX_COMMAND_CHARACTERS}).")
    return errors


@pytest.fixture
def clock() -> FakeClock:
    """A fake clock for the progress throttle."""
    return FakeClock()


@pytest.fixture
async def fake_discord(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[FakeDiscord]:
    """The fake Discord API on a free local port; discord.py talks to it during the test."""
    fake = FakeDiscord(clock=clock)
    runner = web.AppRunner(fake.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    fake.base = f"http://127.0.0.1:{port}"
    monkeypatch.setattr(discord.http.Route, "BASE", f"{fake.base}/api/v10")
    try:
        yield fake
    finally:
        await runner.cleanup()


async def start_adapter(
    runtime: BotRuntime, clock: FakeClock, *, dev_guild: int | None = None
) -> DiscordAdapter:
    """An adapter logged in to the fake, downloading only from the fake's host."""
    downloader = Downloader(
        max_bytes=runtime.settings.max_photo_bytes,
        allowed_hosts={"127.0.0.1"},
        require_https=False,
        timeout=2.0,
    )
    adapter = DiscordAdapter(
        runtime.core,
        downloader=downloader,
        edit_interval=EDIT_INTERVAL,
        clock=clock,
        sleep=clock.sleep,
        dev_guild=dev_guild,
    )
    await adapter.client.login("fake-token")
    return adapter


def add_boosted_guild(adapter: DiscordAdapter, tier: int, guild_id: int = GUILD_ID) -> None:
    """Let the adapter's client know the server and its boost tier, as the gateway's
    GUILD_CREATE would."""
    adapter.client._connection._add_guild_from_data(
        {  # type: ignore[typeddict-item]
            "id": str(guild_id),
            "name": "boosted",
            "premium_tier": tier,
            "roles": [],
            "emojis": [],
            "stickers": [],
            "features": [],
        }
    )


@pytest.fixture
async def adapter(
    runtime: BotRuntime, fake_discord: FakeDiscord, clock: FakeClock
) -> AsyncIterator[DiscordAdapter]:
    """The Discord adapter on the real core, logged in to the fake Discord."""
    adapter = await start_adapter(runtime, clock)
    try:
        yield adapter
    finally:
        await adapter.close()


_interaction_ids = itertools.count(7000)


def interaction_payload(
    *,
    command: str | None = None,
    options: list[dict[str, Any]] | None = None,
    resolved: dict[str, Any] | None = None,
    custom_id: str | None = None,
    user_id: int = USER_ID,
    permissions: int = ALL_PERMISSIONS,
    roles: list[int] | None = None,
) -> dict[str, Any]:
    """What Discord sends for a slash command (``command``) or a button click (``custom_id``).

    ``permissions`` are the member's resolved permissions in the channel, as Discord computes
    them (all by default); ``roles`` their role ids.
    """
    interaction_id = next(_interaction_ids)
    payload: dict[str, Any] = {
        "id": str(interaction_id),
        "application_id": str(APP_ID),
        "token": f"token-{interaction_id}",
        "version": 1,
        "guild_id": str(GUILD_ID),
        "channel_id": str(CHANNEL_ID),
        "channel": {
            "id": str(CHANNEL_ID),
            "type": 0,
            "guild_id": str(GUILD_ID),
            "name": "general",
            "position": 0,
            "permission_overwrites": [],
            "nsfw": False,
            "parent_id": None,
        },
        "member": {
            "user": user_payload(user_id),
            "roles": [str(role) for role in roles or []],
            "joined_at": "2024-01-01T00:00:00+00:00",
            "deaf": False,
            "mute": False,
            "flags": 0,
            "permissions": str(permissions),
        },
        "app_permissions": "2147483647",
        "locale": "en-US",
        "attachment_size_limit": 10 * 1024 * 1024,
    }
    if command is not None:
        payload["type"] = 2
        payload["data"] = {
            "id": "1",
            "name": command,
            "type": 1,
            "options": options or [],
            "resolved": resolved or {},
        }
    else:
        assert custom_id is not None
        payload["type"] = 3
        payload["data"] = {"custom_id": custom_id, "component_type": 2}
        payload["message"] = {
            **FakeDiscord().message(CHANNEL_ID, {"content": "an earlier result"}),
            "components": [
                {
                    "type": 1,
                    "components": [
                        {"type": 2, "style": 2, "label": "Reroll", "custom_id": custom_id}
                    ],
                }
            ],
        }
    return payload


def member_payload(user_id: int, roles: list[int] | None = None) -> dict[str, Any]:
    """A guild member as it appears in an interaction's ``resolved.members``."""
    return {
        "roles": [str(role) for role in roles or []],
        "joined_at": "2024-01-01T00:00:00+00:00",
        "deaf": False,
        "mute": False,
        "flags": 0,
        "permissions": str(MEMBER_PERMISSIONS),
    }


def user_option(name: str, user_id: int, roles: list[int] | None = None) -> dict[str, Any]:
    """A user option and its ``resolved`` data (user and member), as Discord sends them."""
    return {
        "option": {"name": name, "type": 6, "value": str(user_id)},
        "resolved": {
            "users": {str(user_id): user_payload(user_id)},
            "members": {str(user_id): member_payload(user_id, roles)},
        },
    }


def attachment_options(urls: dict[str, str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Options and ``resolved`` data for attachment options named as the keys of ``urls``."""
    options, attachments = [], {}
    for number, (option, url) in enumerate(urls.items(), start=1):
        attachment_id = str(8000 + number)
        options.append({"name": option, "type": 11, "value": attachment_id})
        attachments[attachment_id] = {
            "id": attachment_id,
            "filename": url.rsplit("/", 1)[-1],
            "size": 1000,
            "url": url,
            "proxy_url": url,
            "content_type": "image/jpeg",
        }
    return options, {"attachments": attachments}
