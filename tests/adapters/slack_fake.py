"""A local fake of the part of Slack the adapter uses, and signed requests as Slack sends them.

The adapter's ``AsyncWebClient`` is pointed at the fake with ``base_url=<fake>/api/``. Every
call is recorded (API method, arguments merged from query, form and JSON, raw bytes, headers,
fake-clock time) so tests assert on what Slack would have received. The same server plays
``files.slack.com`` (``/files-pri/…``, answering only with the bot token), the upload URLs that
``files.getUploadURLExternal`` hands out (``/upload/…``), and commands' ``response_url``
(``/respond/…``). Like Slack, it downloads the image of every image block in a message it is
sent, and refuses the message (``invalid_blocks``) when it can't; it refuses blocks beyond
Slack's documented limits (50 blocks, 3,000 characters of section text or image URL, 25
elements in an actions block, button text up to 75 characters, action ids and block ids up
to 255, values up to 2,000) with ``invalid_blocks`` and text over 40,000 characters with
``msg_too_long``; and a ``response_url`` takes five messages within 30 minutes (of the fake
clock), then answers 404 ``used_url`` or ``expired_url``. Methods in ``rate_limits`` take that
many calls a minute (of the fake clock), as Slack's rate-limit tiers do (``chat.update``: Tier
3, 50 a minute), and answer more with HTTP 429, ``ratelimited`` and a ``Retry-After`` header. A
test can make chosen calls of a method fail (``failing_calls``: ``internal_error``), or a
channel refuse messages after its first few (``refuse_after``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import re
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from slack_sdk.signature import SignatureVerifier

TEAM_ID = "T0TEAM"
CHANNEL_ID = "C0CHAN"
DM_CHANNEL_ID = "D0DM"
USER_ID = "U0USER"
OTHER_USER_ID = "U0OTHER"
ADMIN_ID = "U0ADMIN"
BOT_USER_ID = "U0BOT"
BOT_TOKEN = "xoxb-test-token"
SIGNING_SECRET = "test-signing-secret"
APP_ID = "A0APP"
MAX_TEXT = 40_000
"""Slack's limit on a message's text (it refuses longer ones: ``msg_too_long``)."""
RESPONSE_URL_USES = 5
RESPONSE_URL_LIFETIME = 30 * 60


@dataclass
class Call:
    """One request the fake received."""

    method: str
    """The Web API method (``chat.postMessage``), or ``upload``/``download``/``respond``."""
    args: dict[str, Any]
    body: bytes
    headers: dict[str, str]
    at: float

    @property
    def text(self) -> str:
        """The message text sent, if any."""
        return str(self.args.get("text") or "")

    @property
    def pings(self) -> set[str]:
        """Whom Slack would notify for this message's text (or a file's comment), by its
        documented formatting rules: ``<!channel>``, ``<!here>``, ``<!everyone>`` (as
        ``channel``…), ``<!subteam^ID>`` (``subteam:ID``) and ``<@U…>`` (the user id); the
        plain words ``@channel``… only with ``link_names``. An ephemeral message counts alike."""
        text = f"{self.text}\n{self.args.get('initial_comment') or ''}"
        pings = set(re.findall(r"<!(channel|here|everyone)(?:\|[^>]*)?>", text))
        pings |= {f"subteam:{team}" for team in re.findall(r"<!subteam\^(\w+)", text)}
        pings |= set(re.findall(r"<@([UW][A-Z0-9]+)(?:\|[^>]*)?>", text))
        if str(self.args.get("link_names")).lower() in ("1", "true"):
            pings |= set(re.findall(r"(?<![<\w])@(channel|here|everyone)\b", text))
        return pings


@dataclass
class FakeSlack:
    """The fake Slack. Channels in ``missing`` answer ``channel_not_found`` to posts."""

    clock: Callable[[], float] = time.monotonic
    calls: list[Call] = field(default_factory=list)
    missing: set[str] = field(default_factory=set)
    admins: set[str] = field(default_factory=lambda: {ADMIN_ID})
    files: dict[str, bytes] = field(default_factory=dict)
    users_info_gate: asyncio.Event | None = None
    """When set, ``users.info`` waits for it (to show that commands are acked first)."""
    post_gate: asyncio.Event | None = None
    """When set, the next ``chat.postMessage`` waits for it before it is answered (a slow
    Slack); later ones don't."""
    images: list[tuple[str, bytes]] = field(default_factory=list)
    """The images of image blocks, as downloaded (URL, bytes), before the message is answered
    (a call is recorded when it arrives: wait for its images before relying on its answer)."""
    base: str = ""
    rate_limits: dict[str, int] = field(default_factory=lambda: {"chat.update": 50})
    """Calls a minute each method takes before Slack answers 429."""
    rate_limited: list[Call] = field(default_factory=list)
    """The calls answered 429."""
    failing_calls: dict[str, set[int]] = field(default_factory=dict)
    """Method → which of its calls (counted from 1) are answered ``internal_error``, as Slack
    answers when it fails on its side."""
    failed: list[Call] = field(default_factory=list)
    """The calls answered with ``failing_calls``' error."""
    refuse_after: dict[str, tuple[int, str]] = field(default_factory=dict)
    """Channel → (n, error): once the channel has taken n messages (``chat.postMessage``, or
    a completed upload), it answers every new one with that error (``channel_not_found``,
    ``is_archived``, ``not_in_channel``), as when it is deleted, archived or the bot is
    removed while a result is being posted."""
    response_urls: dict[str, float] = field(default_factory=dict)
    """Response URL token → fake-clock time of the request that carried it."""
    _accepted: dict[str, list[float]] = field(default_factory=dict)
    _taken: dict[str, int] = field(default_factory=dict)
    """Channel → how many messages it has taken (for ``refuse_after``)."""
    _ts: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def find(self, method: str) -> list[Call]:
        """Recorded calls of one method."""
        return [call for call in self.calls if call.method == method]

    async def wait_until(self, condition: Callable[[], bool], within: float = 5.0) -> None:
        """Wait (briefly, in real time) for calls to arrive."""
        async with asyncio.timeout(within):
            while not condition():
                self._arrived.clear()
                await self._arrived.wait()

    async def record(self, request: web.Request, method: str) -> Call:
        body = await request.read()
        args: dict[str, Any] = dict(request.query)
        if request.content_type == "application/json" and body:
            args.update(json.loads(body))
        elif request.content_type == "application/x-www-form-urlencoded":
            args.update(urllib.parse.parse_qsl(body.decode()))
        call = Call(method, args, body, dict(request.headers), self.clock())
        self.calls.append(call)
        self._arrived.set()
        return call

    def next_ts(self) -> str:
        return f"1700000000.{next(self._ts):06d}"

    # The Web API.

    async def api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        call = await self.record(request, method)
        if request.headers.get("Authorization") != f"Bearer {BOT_TOKEN}":
            return web.json_response({"ok": False, "error": "not_authed"})
        handler = getattr(self, "_" + method.replace(".", "_"), None)
        if handler is None:
            return web.json_response({"ok": False, "error": "unknown_method"})
        if len(self.find(method)) in self.failing_calls.get(method, set()):
            self.failed.append(call)
            return web.json_response({"ok": False, "error": "internal_error"})
        limit = self.rate_limits.get(method)
        if limit is not None:
            accepted = self._accepted.setdefault(method, [])
            recent = [at for at in accepted if at > call.at - 60]
            if len(recent) >= limit:
                self.rate_limited.append(call)
                wait = max(1, math.ceil(recent[0] + 60 - call.at))
                return web.json_response(
                    {"ok": False, "error": "ratelimited"},
                    status=429,
                    headers={"Retry-After": str(wait)},
                )
            accepted.append(call.at)
        return web.json_response(await handler(call.args))

    async def _auth_test(self, args: dict[str, Any]) -> dict[str, Any]:
        return {
            "ok": True,
            "url": "https://team.slack.com/",
            "team": "Team",
            "user": "dreambot",
            "team_id": TEAM_ID,
            "user_id": BOT_USER_ID,
            "bot_id": "B0BOT",
            "is_enterprise_install": False,
        }

    def _refused(self, channel: str) -> dict[str, Any] | None:
        if channel in self.missing:
            return {"ok": False, "error": "channel_not_found"}
        taken, error = self.refuse_after.get(channel, (-1, ""))
        if 0 <= taken <= self._taken.get(channel, 0):
            return {"ok": False, "error": error}
        return None

    def _take(self, channel: str, answer: dict[str, Any]) -> dict[str, Any]:
        """Count a new message the channel took (``answer`` is ok), then pass the answer on."""
        if answer.get("ok"):
            self._taken[channel] = self._taken.get(channel, 0) + 1
        return answer

    async def _download_images(self, args: dict[str, Any]) -> dict[str, Any] | None:
        """Slack's check of a message's image blocks: each image must download."""
        blocks = args.get("blocks") or []
        if isinstance(blocks, str):
            blocks = json.loads(blocks)
        for index, block in enumerate(blocks):
            if block.get("type") != "image":
                continue
            url = str(block["image_url"])
            try:
                async with aiohttp.ClientSession() as session, session.get(url) as response:
                    data = await response.read()
                    ok = response.status == 200 and response.content_type.startswith("image/")
            except aiohttp.ClientError:
                ok = False
            if not ok:
                error = f"downloading image failed [json-pointer:/blocks/{index}/image_url]"
                return {"ok": False, "error": "invalid_blocks", "errors": [error]}
            self.images.append((url, data))
            self._arrived.set()
        return None

    @staticmethod
    def _beyond_limits(args: dict[str, Any]) -> dict[str, Any] | None:
        """Slack's answer to a message beyond its documented limits, if it is."""
        if len(str(args.get("text") or "")) > MAX_TEXT:
            return {"ok": False, "error": "msg_too_long"}
        blocks = args.get("blocks") or []
        if isinstance(blocks, str):
            blocks = json.loads(blocks)
        errors = []
        if len(blocks) > 50:
            errors.append("must provide no more than 50 items [json-pointer:/blocks]")
        for index, block in enumerate(blocks):
            where = f"[json-pointer:/blocks/{index}]"
            if len(str(block.get("block_id") or "")) > 255:
                errors.append(f"block_id must be less than 256 characters {where}")
            if block.get("type") == "section" and len(block["text"]["text"]) > 3000:
                errors.append(f"must be less than 3001 characters {where}/text/text")
            if block.get("type") == "image" and len(str(block["image_url"])) > 3000:
                errors.append(f"must be less than 3001 characters {where}/image_url")
            if block.get("type") != "actions":
                continue
            elements = block.get("elements") or []
            if len(elements) > 25:
                errors.append(f"must provide no more than 25 items {where}/elements")
            for element in elements:
                if len(element["text"]["text"]) > 75:
                    errors.append(f"must be less than 76 characters {where}/elements/text")
                if len(str(element.get("action_id") or "")) > 255:
                    errors.append(f"must be less than 256 characters {where}/elements/action_id")
                if len(str(element.get("value") or "")) > 2000:
                    errors.append(f"must be less than 2001 characters {where}/elements/value")
        return {"ok": False, "error": "invalid_blocks", "errors": errors} if errors else None

    async def _chat_postMessage(self, args: dict[str, Any]) -> dict[str, Any]:
        gate, self.post_gate = self.post_gate, None
        if gate is not None:
            await gate.wait()
        channel = str(args["channel"])
        return self._take(
            channel,
            self._refused(channel)
            or self._beyond_limits(args)
            or await self._download_images(args)
            or {"ok": True, "channel": channel, "ts": self.next_ts()},
        )

    async def _chat_update(self, args: dict[str, Any]) -> dict[str, Any]:
        channel = str(args["channel"])
        return (
            self._refused(channel)
            or self._beyond_limits(args)
            or await self._download_images(args)
            or {"ok": True, "channel": channel, "ts": args["ts"]}
        )

    async def _chat_postEphemeral(self, args: dict[str, Any]) -> dict[str, Any]:
        return (
            self._refused(str(args["channel"]))
            or self._beyond_limits(args)
            or {"ok": True, "message_ts": self.next_ts()}
        )

    async def _users_info(self, args: dict[str, Any]) -> dict[str, Any]:
        if self.users_info_gate is not None:
            await self.users_info_gate.wait()
        user = str(args["user"])
        admin = user in self.admins
        return {"ok": True, "user": {"id": user, "is_admin": admin, "is_owner": False}}

    async def _conversations_open(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "channel": {"id": DM_CHANNEL_ID}}

    async def _files_getUploadURLExternal(self, args: dict[str, Any]) -> dict[str, Any]:
        file_id = f"F{next(self._ts):05d}"
        return {"ok": True, "file_id": file_id, "upload_url": f"{self.base}/upload/{file_id}"}

    async def _files_completeUploadExternal(self, args: dict[str, Any]) -> dict[str, Any]:
        channel = str(args.get("channel_id"))
        files = json.loads(args["files"])
        return self._take(
            channel,
            self._refused(channel)
            or {"ok": True, "files": [{"id": f["id"], "title": f["title"]} for f in files]},
        )

    async def _files_info(self, args: dict[str, Any]) -> dict[str, Any]:
        name = str(args["file"])
        return {"ok": True, "file": self.file_object(name)}

    # files.slack.com, upload URLs, response URLs.

    def file_object(self, name: str, *, with_url: bool = True) -> dict[str, Any]:
        """A file as it appears in a message event's ``files``."""
        file: dict[str, Any] = {
            "id": name,
            "name": name,
            "mimetype": "image/jpeg",
            "size": len(self.files.get(name, b"")),
        }
        if with_url:
            file["url_private_download"] = f"{self.base}/files-pri/{TEAM_ID}-{name}/download"
        else:
            file["file_access"] = "check_file_info"
        return file

    async def download(self, request: web.Request) -> web.Response:
        await self.record(request, "download")
        if request.headers.get("Authorization") != f"Bearer {BOT_TOKEN}":
            # What Slack does without a token: a sign-in page, not the file.
            return web.Response(body=b"<html>sign in</html>", content_type="text/html")
        name = request.match_info["name"].removeprefix(f"{TEAM_ID}-")
        return web.Response(body=self.files[name], content_type="image/jpeg")

    async def upload(self, request: web.Request) -> web.Response:
        call = await self.record(request, "upload")
        call.args["file_id"] = request.match_info["file_id"]
        return web.Response(text=f"OK - {len(call.body)}")

    async def respond(self, request: web.Request) -> web.Response:
        call = await self.record(request, "respond")
        token = request.match_info["token"]
        uses = sum(1 for c in self.find("respond") if c.args.get("response_url") == token)
        call.args["response_url"] = token
        created = self.response_urls.get(token)
        if created is not None and self.clock() - created > RESPONSE_URL_LIFETIME:
            return web.Response(status=404, text="expired_url")
        if uses >= RESPONSE_URL_USES:
            return web.Response(status=404, text="used_url")
        beyond = self._beyond_limits(call.args)
        if beyond is not None:
            return web.Response(status=400, text=str(beyond["error"]))
        return web.Response(text="ok")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/api/{method}", self.api)
        app.router.add_get("/files-pri/{name}/download", self.download)
        app.router.add_post("/upload/{file_id}", self.upload)
        app.router.add_post("/respond/{token}", self.respond)
        return app


# Requests from Slack to the app.

_triggers = itertools.count(1)


def signed(body: str, secret: str = SIGNING_SECRET, content_type: str = "") -> dict[str, str]:
    """The headers Slack sends with ``body``, signed with ``secret``."""
    timestamp = str(int(time.time()))
    signature = SignatureVerifier(secret).generate_signature(timestamp=timestamp, body=body)
    return {
        "X-Slack-Request-Timestamp": timestamp,
        "X-Slack-Signature": signature,
        "Content-Type": content_type or "application/x-www-form-urlencoded",
    }


def command_body(
    fake: FakeSlack,
    command: str,
    text: str = "",
    *,
    user_id: str = USER_ID,
    channel_id: str = CHANNEL_ID,
) -> str:
    """A slash command as Slack posts it (form-encoded)."""
    number = next(_triggers)
    fake.response_urls[str(number)] = fake.clock()
    return urllib.parse.urlencode(
        {
            "token": "legacy-verification-token",
            "team_id": TEAM_ID,
            "team_domain": "team",
            "channel_id": channel_id,
            "channel_name": "general",
            "user_id": user_id,
            "user_name": user_id.lower(),
            "command": command,
            "text": text,
            "api_app_id": APP_ID,
            "is_enterprise_install": "false",
            "response_url": f"{fake.base}/respond/{number}",
            "trigger_id": f"trigger.{number}",
        }
    )


def action_body(fake: FakeSlack, action_id: str, value: str, *, user_id: str = USER_ID) -> str:
    """A button click (``block_actions``) as Slack posts it."""
    number = next(_triggers)
    fake.response_urls[str(number)] = fake.clock()
    payload = {
        "type": "block_actions",
        "team": {"id": TEAM_ID, "domain": "team"},
        "user": {"id": user_id, "team_id": TEAM_ID},
        "api_app_id": APP_ID,
        "container": {"type": "message", "channel_id": CHANNEL_ID, "message_ts": "1.2"},
        "channel": {"id": CHANNEL_ID, "name": "general"},
        "message": {"type": "message", "ts": "1.2", "text": "result"},
        "trigger_id": f"trigger.{number}",
        "response_url": f"{fake.base}/respond/{number}",
        "actions": [
            {
                "type": "button",
                "action_id": action_id,
                "block_id": f"dreambot:{value}",
                "value": value,
                "action_ts": "1.3",
            }
        ],
    }
    return urllib.parse.urlencode({"payload": json.dumps(payload)})


def message_event_body(
    text: str,
    files: list[dict[str, Any]],
    *,
    user_id: str = USER_ID,
    channel_id: str = CHANNEL_ID,
    channel_type: str = "channel",
) -> str:
    """A message (with shared files, if any), as the Events API posts it (JSON)."""
    number = next(_triggers)
    event: dict[str, Any] = {
        "type": "message",
        "text": text,
        "user": user_id,
        "channel": channel_id,
        "channel_type": channel_type,
        "ts": f"1700000001.{number:06d}",
    }
    if files:  # a plain message has no subtype and no files
        event.update(subtype="file_share", files=files)
    return json.dumps(
        {
            "token": "legacy-verification-token",
            "team_id": TEAM_ID,
            "api_app_id": APP_ID,
            "type": "event_callback",
            "event_id": f"Ev{number:05d}",
            "event_time": int(time.time()),
            "authorizations": [{"team_id": TEAM_ID, "user_id": BOT_USER_ID, "is_bot": True}],
            "event": event,
        }
    )
