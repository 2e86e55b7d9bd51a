"""/use on Discord: choosing which subject [V] means, through the fake Discord API on the real
core (SQLite + Redis)."""

from __future__ import annotations

from typing import Any

from bot.adapters.discord import DiscordAdapter
from bot.core.store import EVERYONE, Owner
from bot.launcher import BotRuntime
from tests.adapters.conftest import GUILD_ID, OTHER_USER_ID, USER_ID, FakeDiscord
from tests.adapters.test_discord_cancel import suggestions
from tests.adapters.test_discord_sharing import run_as
from tests.conftest import queued_generate_request, ready_subject

OWNER = Owner("discord", str(GUILD_ID), str(USER_ID))
OTHER = Owner("discord", str(GUILD_ID), str(OTHER_USER_ID))


def subject_option(name: str) -> dict[str, Any]:
    return {"name": "subject", "type": 3, "value": name}


async def drawn(adapter: DiscordAdapter, fake: FakeDiscord, runtime: BotRuntime) -> str:
    """What the engine is asked to draw for ``/imagine prompt:a [V] on the beach``."""
    before = {job.id for job in await runtime.store.unfinished_jobs("discord")}
    prompt = {"name": "prompt", "type": 3, "value": "a [V] on the beach"}
    await run_as(adapter, fake, "imagine", [prompt, {"name": "count", "type": 4, "value": 1}])
    [new] = [j for j in await runtime.store.unfinished_jobs("discord") if j.id not in before]
    request = await queued_generate_request(runtime, new.id)
    return str(request["prompt"])


async def test_use_makes_a_subject_v_and_use_without_one_goes_back_to_the_newest(
    adapter: DiscordAdapter, fake_discord: FakeDiscord, runtime: BotRuntime
) -> None:
    await ready_subject(runtime, OWNER, "rex", "zqv")
    await ready_subject(runtime, OWNER, "mia", "bkt")

    chose = await run_as(adapter, fake_discord, "use", [subject_option("rex")])

    assert chose.startswith("[V] now means rex (dog), also after you train others")
    assert not fake_discord.find("POST", "/channels/")  # a private reply, nothing public
    assert await drawn(adapter, fake_discord, runtime) == "a zqv dog on the beach"
    listed = (await run_as(adapter, fake_discord, "subjects")).splitlines()
    assert listed[2].startswith("  rex:") and listed[2].endswith("← [V] (chosen with /use)")

    back = await run_as(adapter, fake_discord, "use")

    assert back == "[V] means your newest ready subject again: mia."
    assert await drawn(adapter, fake_discord, runtime) == "a bkt dog on the beach"


async def test_use_refuses_a_subject_still_training_privately(
    adapter: DiscordAdapter, fake_discord: FakeDiscord, runtime: BotRuntime
) -> None:
    await ready_subject(runtime, OWNER, "mia", "bkt")
    rex = await ready_subject(runtime, OWNER, "rex", "zqv")
    await runtime.store.update_subject(rex.id, status="training")

    said = await run_as(adapter, fake_discord, "use", [subject_option("rex")])

    assert (
        said == "rex is still training; `/use subject:rex` works once it is ready. [V] stays mia."
    )
    assert await runtime.store.chosen_subject_id(OWNER) is None


async def test_use_suggests_only_the_callers_own_ready_subjects(
    adapter: DiscordAdapter, fake_discord: FakeDiscord, runtime: BotRuntime
) -> None:
    await ready_subject(runtime, OWNER, "rex", "zqv")
    kit = await ready_subject(runtime, OWNER, "kit", "pfx")
    await runtime.store.update_subject(kit.id, status="training")
    await ready_subject(runtime, OTHER, "luna", "gmx")
    await runtime.core.sharing.share(OTHER, "luna", EVERYONE)  # drawable, but never [V]

    assert await suggestions(adapter, fake_discord, "use", "subject", "") == [
        {"name": "rex", "value": "rex"}
    ]


async def test_use_is_registered_with_an_optional_subject_suggested_as_you_type(
    runtime: BotRuntime, fake_discord: FakeDiscord, adapter: DiscordAdapter
) -> None:
    [sync] = fake_discord.find("PUT", "/commands")
    commands = {command["name"]: command for command in sync.json}
    [option] = commands["use"]["options"]
    assert (option["name"], option["type"]) == ("subject", 3)
    assert not option.get("required") and option["autocomplete"]
    assert commands["use"]["contexts"] == [0]  # guild only
    assert "/use" in commands["imagine"]["description"]
