"""/mod and /quota on Discord: who may moderate, and that each action reaches the core."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import discord
import pytest

from bot.adapters.discord import DISCORD_MOD_NOTE, DiscordAdapter
from bot.core.moderation import MOD_HELP
from bot.core.store import Owner
from bot.launcher import BotRuntime
from tests.adapters.conftest import (
    APP_ID,
    GUILD_ID,
    MANAGE_GUILD,
    MAX_CONTENT,
    MEMBER_PERMISSIONS,
    OTHER_USER_ID,
    USER_ID,
    FakeDiscord,
    interaction_payload,
    user_option,
)
from tests.adapters.test_discord import DESTINATION, EPHEMERAL, OWNER
from tests.conftest import queued

MODERATOR = MEMBER_PERMISSIONS | MANAGE_GUILD
OTHER = Owner("discord", str(GUILD_ID), str(OTHER_USER_ID))
OTHER_DESTINATION = {**DESTINATION, "user_id": OTHER_USER_ID}


def private_replies(fake: FakeDiscord) -> list[str]:
    """Every ephemeral follow-up of the command, in order (a long reply takes several),
    after its one ephemeral defer."""
    [callback] = fake.find("POST", "/callback")
    assert callback.json["type"] == 5 and callback.json["data"]["flags"] == EPHEMERAL
    followups = fake.find("POST", f"/webhooks/{APP_ID}/")
    assert followups and all(f.json["flags"] == EPHEMERAL for f in followups)
    assert all(f.status == 200 for f in followups)  # none refused as too long
    return [f.content or "" for f in followups]


@dataclass
class Chat:
    """Sends slash commands to the adapter as Discord would and reads its private replies."""

    adapter: DiscordAdapter
    fake: FakeDiscord

    async def send(self, payload: dict[str, Any]) -> str:
        state = self.adapter.client._connection
        interaction = discord.Interaction(data=payload, state=state)  # type: ignore[arg-type]
        await self.adapter.client.tree._call(interaction)
        content = "\n".join(private_replies(self.fake))
        self.fake.requests.clear()
        return content

    async def command(
        self,
        name: str,
        options: list[dict[str, Any]] | None = None,
        *,
        user_id: int = USER_ID,
        roles: list[int] | None = None,
    ) -> str:
        """``/<name>`` from a member; the private reply."""
        return await self.send(
            interaction_payload(command=name, options=options, user_id=user_id, roles=roles)
        )

    async def mod(
        self,
        path: str,
        options: list[dict[str, Any]] | None = None,
        resolved: dict[str, Any] | None = None,
        *,
        permissions: int = MODERATOR,
        roles: list[int] | None = None,
    ) -> str:
        """``/mod <path>`` (e.g. ``"quota set"``) from the member ``USER_ID``; the reply."""
        *groups, name = path.split()
        nested: list[dict[str, Any]] = [{"name": name, "type": 1, "options": options or []}]
        for group in reversed(groups):
            nested = [{"name": group, "type": 2, "options": nested}]
        return await self.send(
            interaction_payload(
                command="mod",
                options=nested,
                resolved=resolved,
                permissions=permissions,
                roles=roles,
            )
        )


@pytest.fixture
def chat(adapter: DiscordAdapter, fake_discord: FakeDiscord) -> Chat:
    """The adapter on the real core, talking to the fake Discord."""
    return Chat(adapter, fake_discord)


def ban_options(
    user_id: int = OTHER_USER_ID, reason: str | None = None, duration: str | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    user = user_option("user", user_id)
    options = [user["option"]]
    if reason is not None:
        options.append({"name": "reason", "type": 3, "value": reason})
    if duration is not None:
        options.append({"name": "duration", "type": 3, "value": duration})
    return options, user["resolved"]


async def test_a_non_moderator_cannot_ban_and_nothing_changes(
    chat: Chat, runtime: BotRuntime
) -> None:
    receipt = await runtime.core.imagine(OTHER, OTHER_DESTINATION, "a fox", count=1)

    options, resolved = ban_options(reason="spam", duration="7d")
    reply = await chat.mod("ban", options, resolved, permissions=MEMBER_PERMISSIONS)

    assert reply == "Only moderators can use /mod. Nothing was changed."
    assert await runtime.store.active_ban(OTHER) is None
    assert await runtime.store.audit_entries("discord", str(GUILD_ID), 10) == []
    job = await runtime.store.get_job(receipt.job_id)
    assert job is not None and job.status == "queued"
    assert await queued(runtime.queue) == 1


async def test_a_manage_server_member_bans_cancels_the_jobs_and_it_is_audited(
    chat: Chat, runtime: BotRuntime
) -> None:
    receipt = await runtime.core.imagine(OTHER, OTHER_DESTINATION, "a fox", count=1)

    options, resolved = ban_options(reason="spam", duration="7d")
    reply = await chat.mod("ban", options, resolved)

    assert reply.startswith(f"Banned {OTHER_USER_ID} until ")
    assert "Cancelled 1 of their job(s)" in reply
    ban = await runtime.store.active_ban(OTHER)
    assert ban is not None and ban.reason == "spam" and ban.banned_by == str(USER_ID)
    assert ban.expires_at is not None
    expires = datetime.fromisoformat(ban.expires_at)
    assert abs(expires - (datetime.now(UTC) + timedelta(days=7))) < timedelta(minutes=1)
    job = await runtime.store.get_job(receipt.job_id)
    assert job is not None and job.status == "cancelled"
    assert await queued(runtime.queue) == 0
    [entry] = await runtime.store.audit_entries("discord", str(GUILD_ID), 10)
    assert (entry.moderator, entry.action, entry.target) == (OWNER, "ban", str(OTHER_USER_ID))
    assert "7d" in entry.detail and "spam" in entry.detail

    # The banned member's own commands are refused, privately.
    assert "You're banned from using dreambot here" in await chat.command(
        "quota", user_id=OTHER_USER_ID
    )

    assert "may use dreambot again" in await chat.mod("unban", *ban_options())
    assert await runtime.store.active_ban(OTHER) is None


async def test_a_bad_duration_is_refused_and_nobody_is_banned(
    chat: Chat, runtime: BotRuntime
) -> None:
    options, resolved = ban_options(duration="soon")
    reply = await chat.mod("ban", options, resolved)

    assert "`soon` isn't a duration" in reply
    assert await runtime.store.active_ban(OTHER) is None


async def test_a_configured_moderator_role_may_moderate_without_manage_server(
    chat: Chat, runtime: BotRuntime
) -> None:
    runtime.settings.moderator_roles.append("77")

    refused = await chat.mod("bans", permissions=MEMBER_PERMISSIONS, roles=[78])
    allowed = await chat.mod("bans", permissions=MEMBER_PERMISSIONS, roles=[78, 77])

    assert refused.startswith("Only moderators")
    assert allowed == "Nobody is banned here."


async def test_quota_shows_the_members_usage_and_their_roles_limits(
    chat: Chat, runtime: BotRuntime
) -> None:
    await runtime.core.imagine(OWNER, DESTINATION, "a fox", count=2)
    assert "images:    2 of 100" in await chat.command("quota")

    reply = await chat.mod(
        "quota set",
        [
            {"name": "what", "type": 3, "value": "images"},
            {"name": "limit", "type": 4, "value": 7},
            {"name": "role", "type": 8, "value": "55"},
        ],
        {"roles": {"55": role_payload(55)}},
    )
    assert reply == "Images per day for role 55: now 7."

    assert "images:    2 of 7" in await chat.command("quota", roles=[55])

    # The role counts for the members it is given to, also in a moderator's view.
    user = user_option("user", USER_ID, roles=[55])
    shown = await chat.mod("quota show", [user["option"]], user["resolved"])
    assert "images:    2 of 7" in shown and "from role 55" in shown
    # Everyone else keeps the default.
    other = user_option("user", OTHER_USER_ID)
    assert "images:    0 of 100" in await chat.mod(
        "quota show", [other["option"]], other["resolved"]
    )


async def test_quota_show_of_a_user_discord_sends_no_member_data_for_says_so(
    chat: Chat, runtime: BotRuntime
) -> None:
    mod = runtime.core.moderation.acting(OWNER, True)
    await mod.quota_set("role:55", "images", 7)

    # A member: Discord resolves their roles, and the role's limit is theirs.
    member = user_option("user", OTHER_USER_ID, roles=[55])
    shown = await chat.mod("quota show", [member["option"]], member["resolved"])
    assert "images:    0 of 7" in shown and "can't see" not in shown

    # Someone Discord sends as a plain user (not a member here): their roles are unknown,
    # and the reply says the role limits are left out instead of passing 100 off as theirs.
    stranger = user_option("user", OTHER_USER_ID)
    resolved = {"users": stranger["resolved"]["users"]}
    shown = await chat.mod("quota show", [stranger["option"]], resolved)
    assert "images:    0 of 100" in shown
    assert (
        f"Roles: I can't see {OTHER_USER_ID}'s roles here, so role limits (role:55) are not "
        "counted above." in shown
    )


async def test_quota_set_with_both_a_user_and_a_role_changes_nothing(
    chat: Chat, runtime: BotRuntime
) -> None:
    user = user_option("user", OTHER_USER_ID)
    reply = await chat.mod(
        "quota set",
        [
            {"name": "what", "type": 3, "value": "jobs"},
            {"name": "limit", "type": 4, "value": 1},
            user["option"],
            {"name": "role", "type": 8, "value": "55"},
        ],
        {**user["resolved"], "roles": {"55": role_payload(55)}},
    )
    assert reply.startswith("Give a user or a role, not both")
    assert await runtime.store.list_quota_overrides("discord", str(GUILD_ID)) == []


def role_payload(role_id: int) -> dict[str, Any]:
    return {
        "id": str(role_id),
        "name": f"role{role_id}",
        "color": 0,
        "hoist": False,
        "position": 1,
        "permissions": "0",
        "managed": False,
        "mentionable": False,
    }


OTHER_USER = user_option("user", OTHER_USER_ID)


@pytest.mark.parametrize(
    ("path", "options", "resolved", "expected"),
    [
        ("help", [], None, "/mod quota set"),
        ("block list", [], None, "This workspace has no rules of its own."),
        (
            "block add",
            [{"name": "phrase", "type": 3, "value": "gore"}],
            None,
            "Blocked as rule #1",
        ),
        (
            "block add-regex",
            [{"name": "pattern", "type": 3, "value": "(a+)+$"}],
            None,
            "Blocked as rule #1",
        ),
        ("block remove", [{"name": "rule", "type": 4, "value": 9}], None, "no rule #9"),
        ("block defaults", [{"name": "enabled", "type": 5, "value": False}], None, "now off"),
        ("block reveal", [{"name": "enabled", "type": 5, "value": True}], None, "now told"),
        ("blocked", [], None, "No prompts have been blocked here."),
        ("quota list", [], None, "Configured defaults: 100 images"),
        ("quota reset", [OTHER_USER["option"]], OTHER_USER["resolved"], "0 job(s) given back"),
        ("bans", [], None, "Nobody is banned here."),
        (
            "unban",
            [OTHER_USER["option"]],
            OTHER_USER["resolved"],
            f"`{OTHER_USER_ID}` isn't banned",
        ),
        ("queue", [], None, "No jobs are waiting or running here."),
        ("status", [], None, "No engine is running: queued jobs wait until one starts."),
        ("cancel", [{"name": "job", "type": 3, "value": "abcd"}], None, "No waiting or running"),
        ("subjects", [OTHER_USER["option"]], OTHER_USER["resolved"], "has no subjects"),
        (
            "delete-subject",
            [OTHER_USER["option"], {"name": "name", "type": 3, "value": "rex"}],
            OTHER_USER["resolved"],
            "has no subject called `rex`",
        ),
        (
            "delete-user-data",
            [OTHER_USER["option"]],
            OTHER_USER["resolved"],
            f"{OTHER_USER_ID} had nothing stored here, so nothing was deleted.",
        ),
        ("log", [{"name": "count", "type": 4, "value": 5}], None, "No moderator actions yet."),
    ],
)
async def test_every_mod_command_reaches_the_core(
    chat: Chat,
    path: str,
    options: list[dict[str, Any]],
    resolved: dict[str, Any] | None,
    expected: str,
) -> None:
    assert expected in await chat.mod(path, options, resolved)
    refused = await chat.mod(path, options, resolved, permissions=MEMBER_PERMISSIONS)
    assert refused == "Only moderators can use /mod. Nothing was changed."


async def test_a_moderators_block_applies_to_imagine_and_the_log_shows_it(
    chat: Chat, runtime: BotRuntime
) -> None:
    await chat.mod("block add", [{"name": "phrase", "type": 3, "value": "zebra"}])

    refused = await chat.command("imagine", [{"name": "prompt", "type": 3, "value": "a z3bra"}])
    assert "isn't allowed here" in refused
    assert await queued(runtime.queue) == 0
    log = await chat.mod("log")
    assert f"{USER_ID}: block-add #1 — word: zebra" in log


async def test_mod_help_arrives_whole_with_its_code_block_closed(
    adapter: DiscordAdapter, fake_discord: FakeDiscord
) -> None:
    payload = interaction_payload(
        command="mod", options=[{"name": "help", "type": 1, "options": []}], permissions=MODERATOR
    )
    await adapter.client.tree._call(
        discord.Interaction(data=payload, state=adapter.client._connection)  # type: ignore[arg-type]
    )

    parts = private_replies(fake_discord)
    for part in parts:
        assert len(part) <= MAX_CONTENT
        assert part.count("```") % 2 == 0, part  # no message shows an unclosed code block
    whole = "\n".join(parts)
    assert MOD_HELP.splitlines()[-1] in whole
    assert whole.endswith(DISCORD_MOD_NOTE)


async def test_a_long_block_list_is_split_over_messages_and_loses_no_rule(
    chat: Chat, runtime: BotRuntime, fake_discord: FakeDiscord
) -> None:
    phrases = [f"forbidden phrase number {n} " + "x" * 60 for n in range(40)]
    for phrase in phrases:
        await runtime.store.add_blocked_rule("discord", str(GUILD_ID), "word", phrase, "1")

    await chat.adapter.client.tree._call(
        discord.Interaction(
            data=interaction_payload(
                command="mod",
                options=[{"name": "block", "type": 2, "options": [{"name": "list", "type": 1}]}],
                permissions=MODERATOR,
            ),
            state=chat.adapter.client._connection,  # type: ignore[arg-type]
        )
    )

    parts = private_replies(fake_discord)
    assert len(parts) > 1
    assert all(len(part) <= MAX_CONTENT for part in parts)
    whole = "\n".join(parts)
    assert all(f"“{phrase}”" in whole for phrase in phrases)
