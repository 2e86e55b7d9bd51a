"""The safety filter on Discord: the /mod safety subcommand, and results whose images the
engine's safety checker withheld (Reroll alone under a result with no image left)."""

from __future__ import annotations

import pytest

from bot.adapters.discord import DiscordAdapter
from bot.core.delivery import Deliverer
from bot.launcher import BotRuntime
from engine.api import GenerateResult
from tests.adapters.conftest import (
    CHANNEL_ID,
    GUILD_ID,
    MEMBER_PERMISSIONS,
    USER_ID,
    FakeDiscord,
    interaction_payload,
)
from tests.adapters.test_discord import DESTINATION, OWNER, write_images
from tests.adapters.test_discord_moderation import Chat
from tests.conftest import engine_queue, queued_generate_request


@pytest.fixture
def chat(adapter: DiscordAdapter, fake_discord: FakeDiscord) -> Chat:
    """The adapter on the real core, talking to the fake Discord."""
    return Chat(adapter, fake_discord)


async def test_mod_safety_switches_the_filter_with_discords_on_off_option(
    chat: Chat, runtime: BotRuntime
) -> None:
    shown = await chat.mod("safety")
    assert shown.startswith("The safety filter is on here; no engine is running now")
    assert shown.endswith("`/mod safety enabled:False` turns it off in age-restricted channels.")

    off = await chat.mod("safety", [{"name": "enabled", "type": 5, "value": False}])

    assert off.startswith(
        "The safety filter is now off here for age-restricted channels: images posted there "
        "go unchecked. In every other channel, and in DMs, it stays on, as Discord's rules ask."
    )
    assert off.endswith("`/mod safety enabled:True` turns it back on.")
    assert not (await runtime.store.workspace_settings("discord", str(GUILD_ID))).safety_check
    [entry] = await runtime.store.audit_entries("discord", str(GUILD_ID), 10)
    assert (entry.moderator.user_id, entry.action, entry.detail) == (str(USER_ID), "safety", "off")
    # Off lets images through unchecked only in an age-restricted channel: the general
    # channel's still go through the checker.
    prompt = [{"name": "prompt", "type": 3, "value": "a red fox"}]
    drawn = await chat.command("imagine", prompt)
    assert drawn.startswith("Drawing 4 images")
    [job] = await runtime.store.unfinished_jobs("discord")
    assert (await queued_generate_request(runtime, job.id))["safety_check"] is True
    adult = interaction_payload(command="imagine", options=prompt)
    adult["channel"]["nsfw"] = True
    assert (await chat.send(adult)).startswith("Drawing 4 images")
    [adult_job] = [j for j in await runtime.store.unfinished_jobs("discord") if j.id != job.id]
    assert adult_job.destination["age_restricted"] is True
    assert (await queued_generate_request(runtime, adult_job.id))["safety_check"] is False

    refused = await chat.mod(
        "safety", [{"name": "enabled", "type": 5, "value": True}], permissions=MEMBER_PERMISSIONS
    )
    assert refused == "Only moderators can use /mod. Nothing was changed."
    assert not (await runtime.store.workspace_settings("discord", str(GUILD_ID))).safety_check


async def result_message(
    runtime: BotRuntime, adapter: DiscordAdapter, fake: FakeDiscord, kept: int, withheld: int
) -> tuple[str, list[list[str]], list[str]]:
    """Deliver a two-image /imagine's result with ``kept`` images and ``withheld`` withheld
    to the channel: the message's text, its button labels by row, and its files."""
    receipt = await runtime.core.imagine(OWNER, DESTINATION, "a red fox", count=2, seed=5)
    await runtime.queue.zrem(engine_queue(runtime), receipt.job_id)
    result = GenerateResult(
        job_id=receipt.job_id,
        image_urls=await write_images(runtime, kept),
        seed=5,
        width=64,
        height=64,
        steps=4,
        seconds=0.5,
        withheld=withheld,
    )
    await Deliverer(runtime.core, adapter).result(result.model_dump())
    [message] = fake.posted(CHANNEL_ID)
    rows = [[b["label"] for b in row["components"]] for row in message.json["components"]]
    return message.content or "", rows, [name for name, _ in message.files]


async def test_a_result_with_every_image_withheld_says_why_under_reroll_alone(
    adapter: DiscordAdapter, fake_discord: FakeDiscord, runtime: BotRuntime
) -> None:
    text, rows, files = await result_message(runtime, adapter, fake_discord, 0, 2)

    assert text == (
        f"<@{USER_ID}> “a red fox” · seed 5: the safety filter withheld all 2 images, so "
        "nothing is posted; they are given back to your quota. Try another prompt."
    )
    assert files == []
    assert rows == [["Reroll"]]  # no image to vary or upscale


async def test_a_result_with_one_image_withheld_has_buttons_for_the_one_left(
    adapter: DiscordAdapter, fake_discord: FakeDiscord, runtime: BotRuntime
) -> None:
    text, rows, files = await result_message(runtime, adapter, fake_discord, 1, 1)

    assert text.endswith(
        " · 1 of 2 images withheld by the safety filter (given back to your quota)"
    )
    assert files == ["0.png"]
    assert [label for row in rows for label in row] == ["Reroll", "Vary", "Upscale"]
