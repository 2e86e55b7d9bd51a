"""/share and /unshare on Discord, and drawing a shared subject, through the fake Discord API on
the real core (SQLite + Redis)."""

from __future__ import annotations

from typing import Any

import discord
import pytest

from bot.adapters.discord import DiscordAdapter
from bot.core.store import EVERYONE, Owner
from bot.launcher import BotRuntime
from tests.adapters.conftest import (
    APP_ID,
    GUILD_ID,
    OTHER_USER_ID,
    USER_ID,
    FakeDiscord,
    Recorded,
    command_errors,
    interaction_payload,
    user_option,
    user_payload,
)
from tests.adapters.test_discord import private_reply
from tests.adapters.test_discord_cancel import suggestions
from tests.conftest import queued_generate_request, ready_subject

OWNER = Owner("discord", str(GUILD_ID), str(USER_ID))
OTHER = Owner("discord", str(GUILD_ID), str(OTHER_USER_ID))


async def run_as(
    adapter: DiscordAdapter,
    fake: FakeDiscord,
    command: str,
    options: list[dict[str, Any]] | None = None,
    resolved: dict[str, Any] | None = None,
    *,
    user_id: int = USER_ID,
) -> str:
    """Deliver a slash command from ``user_id`` through the command tree; its private reply."""
    fake.requests.clear()
    payload = interaction_payload(
        command=command, options=options, resolved=resolved, user_id=user_id
    )
    interaction = discord.Interaction(data=payload, state=adapter.client._connection)  # type: ignore[arg-type]
    await adapter.client.tree._call(interaction)
    reply: Recorded = private_reply(fake)
    return reply.content or ""


def subject_option(name: str) -> dict[str, Any]:
    return {"name": "subject", "type": 3, "value": name}


EVERYONE_OPTION = {"name": "everyone", "type": 5, "value": True}


async def test_share_with_a_member_lets_them_draw_it_on_their_quota(
    adapter: DiscordAdapter, fake_discord: FakeDiscord, runtime: BotRuntime
) -> None:
    rex = await ready_subject(runtime, OWNER, "rex", "zqv")
    member = user_option("user", OTHER_USER_ID)

    said = await run_as(
        adapter,
        fake_discord,
        "share",
        [subject_option("rex"), member["option"]],
        member["resolved"],
    )

    assert said.startswith(f"Shared rex (dog) with <@{OTHER_USER_ID}>: they can draw it as [rex]")
    assert "`/unshare subject:rex` stops sharing it." in said
    assert await runtime.store.subject_shares(OWNER) == {rex.id: [str(OTHER_USER_ID)]}
    assert not fake_discord.find("POST", "/channels/")  # nothing public

    await run_as(
        adapter,
        fake_discord,
        "imagine",
        [
            {"name": "prompt", "type": 3, "value": "[rex] at the beach"},
            {"name": "count", "type": 4, "value": 1},
        ],
        user_id=OTHER_USER_ID,
    )
    [job] = await runtime.store.unfinished_jobs("discord")
    assert job.owner == OTHER
    request = await queued_generate_request(runtime, job.id)
    assert request["prompt"] == "zqv dog at the beach"
    assert [a["url"] for a in request["adapters"]] == [rex.adapter_url]
    assert (await runtime.store.usage(OTHER)).images == 1
    assert (await runtime.store.usage(OWNER)).images == 0


async def test_subjects_shows_mentions_of_owners_and_of_whom_yours_are_shared_with(
    adapter: DiscordAdapter, fake_discord: FakeDiscord, runtime: BotRuntime
) -> None:
    await ready_subject(runtime, OWNER, "rex", "zqv")
    await runtime.core.sharing.share(OWNER, "rex", str(OTHER_USER_ID))

    mine = await run_as(adapter, fake_discord, "subjects")
    theirs = await run_as(adapter, fake_discord, "subjects", user_id=OTHER_USER_ID)

    assert mine.splitlines()[1].endswith(f" · shared with <@{OTHER_USER_ID}>")
    assert theirs.splitlines()[1:] == [
        "Shared with you (write them as shown):",
        f"  [rex]  rex: dog, ready, by <@{USER_ID}>",
    ]


async def test_share_with_everyone_then_unshare(
    adapter: DiscordAdapter, fake_discord: FakeDiscord, runtime: BotRuntime
) -> None:
    rex = await ready_subject(runtime, OWNER, "rex", "zqv")

    shared = await run_as(adapter, fake_discord, "share", [subject_option("rex"), EVERYONE_OPTION])
    again = await run_as(adapter, fake_discord, "share", [subject_option("rex"), EVERYONE_OPTION])
    stopped = await run_as(adapter, fake_discord, "unshare", [subject_option("rex")])

    assert shared.startswith("Shared rex (dog) with everyone here")
    assert again == "rex is already shared with everyone here; nothing changed."
    assert stopped == (
        "Stopped sharing rex (it was shared with everyone here). Only you can draw it now."
    )
    assert await runtime.store.subject_shares(OWNER) == {}
    assert await runtime.store.get_subject(rex.id) == rex  # the subject itself stays


async def test_share_needs_exactly_one_target_and_never_a_bot(
    adapter: DiscordAdapter, fake_discord: FakeDiscord, runtime: BotRuntime
) -> None:
    await ready_subject(runtime, OWNER, "rex", "zqv")
    member = user_option("user", OTHER_USER_ID)
    bot = user_option("user", APP_ID)
    bot["resolved"]["users"][str(APP_ID)] = {**user_payload(APP_ID), "bot": True}

    neither = await run_as(adapter, fake_discord, "share", [subject_option("rex")])
    both = await run_as(
        adapter,
        fake_discord,
        "share",
        [subject_option("rex"), member["option"], EVERYONE_OPTION],
        member["resolved"],
    )
    to_a_bot = await run_as(
        adapter, fake_discord, "share", [subject_option("rex"), bot["option"]], bot["resolved"]
    )

    assert neither.startswith("Say whom to share `rex` with: user: (one member) or everyone:True")
    assert both == "Pick either user: or everyone:, not both."
    assert to_a_bot == f"<@{APP_ID}> is a bot; bots don't draw subjects."
    assert await runtime.store.subject_shares(OWNER) == {}


async def test_another_member_cannot_share_or_unshare_your_subject(
    adapter: DiscordAdapter, fake_discord: FakeDiscord, runtime: BotRuntime
) -> None:
    await ready_subject(runtime, OWNER, "rex", "zqv")
    await runtime.core.sharing.share(OWNER, "rex", EVERYONE)

    said = await run_as(
        adapter, fake_discord, "unshare", [subject_option("rex")], user_id=OTHER_USER_ID
    )

    assert said == (
        "You have no subject called `rex`. Your subjects: none yet. The rex shared with you "
        f"belongs to <@{USER_ID}>: only its owner can share it."
    )
    assert await runtime.store.subjects_shared_with(OTHER) != []


async def test_share_and_showcase_suggest_the_right_subjects(
    adapter: DiscordAdapter, fake_discord: FakeDiscord, runtime: BotRuntime
) -> None:
    await ready_subject(runtime, OWNER, "rex", "zqv")
    await ready_subject(runtime, OTHER, "rex", "bkt")
    await ready_subject(runtime, OTHER, "kit", "pfx")
    await runtime.core.sharing.share(OTHER, "rex", EVERYONE)
    await runtime.core.sharing.share(OTHER, "kit", str(USER_ID))

    assert await suggestions(adapter, fake_discord, "share", "subject", "") == [
        {"name": "rex", "value": "rex"}
    ]
    # Nothing of the caller's is shared yet; then rex is.
    assert await suggestions(adapter, fake_discord, "unshare", "subject", "") == []
    await runtime.core.sharing.share(OWNER, "rex", str(OTHER_USER_ID))
    assert await suggestions(adapter, fake_discord, "unshare", "subject", "") == [
        {"name": "rex", "value": "rex"}
    ]
    # Their own rex, then the shared ones as a prompt writes them (the other rex by token).
    assert await suggestions(adapter, fake_discord, "showcase", "name", "") == [
        {"name": "rex", "value": "rex"},
        {"name": "kit (shared with you)", "value": "kit"},
        {"name": "rex (shared with you: write bkt)", "value": "bkt"},
    ]


async def test_share_and_unshare_are_registered_with_their_options(
    runtime: BotRuntime, fake_discord: FakeDiscord, adapter: DiscordAdapter
) -> None:
    [sync] = fake_discord.find("PUT", "/commands")
    commands = {command["name"]: command for command in sync.json}
    for name in ("share", "unshare"):
        options = {o["name"]: o for o in commands[name]["options"]}
        assert list(options) == ["subject", "user", "everyone"]
        assert options["subject"]["type"] == 3 and options["subject"]["required"]
        assert options["subject"]["autocomplete"]
        assert (options["user"]["type"], options["everyone"]["type"]) == (6, 5)
        assert not options["user"].get("required") and not options["everyone"].get("required")
        assert commands[name]["contexts"] == [0]  # guild only


async def test_share_and_unshare_keep_to_discords_rules_for_commands(
    runtime: BotRuntime, fake_discord: FakeDiscord, adapter: DiscordAdapter
) -> None:
    [sync] = fake_discord.find("PUT", "/commands")
    assert sync.status == 200  # the fake refuses what Discord refuses (command_errors)
    assert command_errors(sync.json) == []
    share = next(command for command in sync.json if command["name"] == "share")
    # What the fake would refuse, as Discord does, if these commands grew past the rules.
    too_long = {**share, "description": "x" * 101}
    capitalised = {**share, "options": [{**share["options"][0], "name": "Subject"}]}
    optional_first = {**share, "options": share["options"][::-1]}
    assert len(command_errors([too_long, capitalised, optional_first])) == 3


async def test_share_suggests_no_more_subjects_than_discord_takes(
    adapter: DiscordAdapter, fake_discord: FakeDiscord, runtime: BotRuntime
) -> None:
    for number in range(30):
        await ready_subject(runtime, OWNER, f"subject-{number:02d}", f"zq{number:02d}")
    await runtime.core.sharing.share(OWNER, "subject-00", EVERYONE)

    assert len(await suggestions(adapter, fake_discord, "share", "subject", "")) == 25
    [answer] = fake_discord.find("POST", "/callback")
    assert answer.status == 200
    assert await suggestions(adapter, fake_discord, "unshare", "subject", "0") == [
        {"name": "subject-00", "value": "subject-00"}
    ]


@pytest.mark.parametrize("typed", ["@everyone", "@here", "<@&999>", f"<@{OTHER_USER_ID}>"])
async def test_a_typed_subject_name_that_would_ping_pings_nobody(
    adapter: DiscordAdapter, fake_discord: FakeDiscord, runtime: BotRuntime, typed: str
) -> None:
    await ready_subject(runtime, OWNER, "rex", "zqv")

    said = await run_as(adapter, fake_discord, "unshare", [subject_option(typed)])

    assert said.startswith(f"You have no subject called `{typed}`.")
    [reply] = fake_discord.find("POST", f"/webhooks/{APP_ID}/")
    assert reply.pings == set()


async def test_share_mentions_the_member_without_pinging_them(
    adapter: DiscordAdapter, fake_discord: FakeDiscord, runtime: BotRuntime
) -> None:
    await ready_subject(runtime, OWNER, "rex", "zqv")
    member = user_option("user", OTHER_USER_ID)

    said = await run_as(
        adapter,
        fake_discord,
        "share",
        [subject_option("rex"), member["option"]],
        member["resolved"],
    )

    assert f"<@{OTHER_USER_ID}>" in said  # shown as their name
    [reply] = fake_discord.find("POST", f"/webhooks/{APP_ID}/")
    assert reply.pings == set()
