"""A local fake of the part of Slack the adapter uses, and signed requests as Slack sends them.

The adapter's ``AsyncWebClient`` is pointed at the fake with ``base_url=<fake>/api/``. Every
call is recorded (API method, arguments merged from query, form and JSON, raw bytes, headers,
fake-clock time) so tests assert on what Slack would have received. The same server plays
``files.slack.com`` (``/files-pri/…``, answering only with the bot token), the upload URLs that
``files.getUploadURLExternal`` hands out (``/upload/…``), and commands' ``response_url``
(``/respond/…``). Like Slack, it downloads the image of every image block in a message it is
sent, and refuses the message (``invalid_blocks``) when it can't.
"""

from __future__ import annotations

import asyncio
import itertools
import json
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
        return {"ok": False, "error": "channel_not_found"} if channel in self.missing else None

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

    async def _chat_postMessage(self, args: dict[str, Any]) -> dict[str, Any]:
        gate, self.post_gate = self.post_gate, None
        if gate is not None:
            await gate.wait()
        channel = str(args["channel"])
        return (
            self._refused(channel)
            or await self._download_images(args)
            or {"ok": True, "channel": channel, "ts": self.next_ts()}
        )

    async def _chat_update(self, args: dict[str, Any]) -> dict[str, Any]:
        channel = str(args["channel"])
        return (
            self._refused(channel)
            or await self._download_images(args)
            or {"ok": True, "channel": channel, "ts": args["ts"]}
        )

    async def _chat_postEphemeral(self, args: dict[str, Any]) -> dict[str, Any]:
        return self._refused(str(args["channel"])) or {"ok": True, "message_ts": self.next_ts()}

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
        refused = self._refused(str(args.get("channel_id")))
        files = json.loads(args["files"])
        return refused or {
            "ok": True,
            "files": [{"id": f["id"], "title": f["title"]} for f in files],
        }

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
        await self.record(request, "respond")
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
