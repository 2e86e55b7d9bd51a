"""Today's features together on Discord, through the fake Discord API on the real core: two
members sharing subjects with each other and drawing both in one prompt, and what a member sees
when the subject shared with them is taken away around their drawing (a Reroll click, their
job waiting in the queue)."""

from __future__ import annotations

from typing import Any

from bot.adapters.discord import DiscordAdapter
from bot.core.delivery import Deliverer
from bot.core.store import Owner
from bot.launcher import BotRuntime
from engine.api import bot_queue
from tests.adapters.conftest import (
    CHANNEL_ID,
    GUILD_ID,
    OTHER_USER_ID,
    USER_ID,
    FakeClock,
    FakeDiscord,
    user_option,
)
from tests.adapters.test_discord import click, progress_id
from tests.adapters.test_discord_sharing import run_as, subject_option
from tests.conftest import configure_second_model, queued, queued_generate_request, ready_subject

ALICE = Owner("discord", str(GUILD_ID), str(USER_ID))
MIA = Owner("discord", str(GUILD_ID), str(OTHER_USER_ID))


def prompt_options(prompt: str, count: int = 1) -> list[dict[str, Any]]:
    return [
        {"name": "prompt", "type": 3, "value": prompt},
        {"name": "count", "type": 4, "value": count},
    ]


async def share_with(
    adapter: DiscordAdapter, fake: FakeDiscord, name: str, by: int, to: int
) -> str:
    """``/share subject:name user:@to`` run by ``by``; its private reply."""
    member = user_option("user", to)
    return await run_as(
        adapter,
        fake,
        "share",
        [subject_option(name), member["option"]],
        member["resolved"],
        user_id=by,
    )


async def mias_drawing(adapter: DiscordAdapter, fake: FakeDiscord, runtime: BotRuntime) -> str:
    """Alice shares rex with Mia, who draws it; the job's id."""
    await ready_subject(runtime, ALICE, "rex", "zqv")
    await share_with(adapter, fake, "rex", USER_ID, OTHER_USER_ID)
    said = await run_as(
        adapter, fake, "imagine", prompt_options("[rex] at the beach"), user_id=OTHER_USER_ID
    )
    assert said.startswith("Drawing 1 image")
    [job] = await runtime.store.unfinished_jobs("discord")
    return job.id


async def test_two_members_share_with_each_other_and_draw_both_in_one_prompt(
    adapter: DiscordAdapter, fake_discord: FakeDiscord, runtime: BotRuntime
) -> None:
    rex = await ready_subject(runtime, ALICE, "rex", "zqv")
    luna = await ready_subject(runtime, MIA, "luna", "pfx")
    await share_with(adapter, fake_discord, "rex", USER_ID, OTHER_USER_ID)
    await share_with(adapter, fake_discord, "luna", OTHER_USER_ID, USER_ID)

    hers = await run_as(
        adapter,
        fake_discord,
        "imagine",
        prompt_options("[luna] and [rex] on a sofa", 2),
        user_id=OTHER_USER_ID,
    )
    his = await run_as(adapter, fake_discord, "imagine", prompt_options("[rex] with [luna]"))

    assert hers.startswith("Drawing 2 images") and his.startswith("Drawing 1 image")
    jobs = {job.owner: job for job in await runtime.store.unfinished_jobs("discord")}
    mias = await queued_generate_request(runtime, jobs[MIA].id)
    alices = await queued_generate_request(runtime, jobs[ALICE].id)
    assert mias["prompt"] == "pfx dog and zqv dog on a sofa"
    assert [a["url"] for a in mias["adapters"]] == [luna.adapter_url, rex.adapter_url]
    assert [a["url"] for a in alices["adapters"]] == [rex.adapter_url, luna.adapter_url]
    assert (await runtime.store.usage(MIA)).images == 2
    assert (await runtime.store.usage(ALICE)).images == 1

    # A subject of another base model can't join them: refused privately, nothing queued.
    configure_second_model(runtime.settings, "xl")
    kit = await ready_subject(runtime, ALICE, "kit", "gmx")
    await runtime.store.update_subject(kit.id, base_model="xl")
    await share_with(adapter, fake_discord, "kit", USER_ID, OTHER_USER_ID)
    waiting = await queued(runtime.queue)
    refused = await run_as(
        adapter,
        fake_discord,
        "imagine",
        prompt_options("[luna] and [kit]"),
        user_id=OTHER_USER_ID,
    )
    assert refused == (
        f"Those subjects were trained on different base models (luna ({luna.base_model}), "
        "kit (xl)), so one image can't hold them all. Nothing was queued."
    )
    assert await queued(runtime.queue) == waiting
    assert not fake_discord.find("POST", "/channels/")


async def test_a_reroll_click_after_the_owner_unshared_is_refused_privately_by_name(
    adapter: DiscordAdapter, fake_discord: FakeDiscord, runtime: BotRuntime, clock: FakeClock
) -> None:
    job_id = await mias_drawing(adapter, fake_discord, runtime)
    result = {"job_id": job_id, "image_urls": ["0.png"], "seed": 3, "width": 64, "height": 64}
    await runtime.store.update_job(job_id, status="done", result=result)
    await runtime.queue.delete(bot_queue("discord"))
    unshared = await run_as(adapter, fake_discord, "unshare", [subject_option("rex")])
    assert unshared.startswith("Stopped sharing rex")
    fake_discord.requests.clear()

    reply = await click(runtime, fake_discord, clock, f"dreambot:vary:{job_id}", OTHER_USER_ID)

    assert reply.content == (
        f"rex, which these images draw, is no longer shared with you by <@{USER_ID}>, so they "
        "can't be redrawn. Nothing was queued."
    )
    assert reply.pings == set()
    assert not fake_discord.find("POST", "/channels/")
    assert [j.id for j in await runtime.store.unfinished_jobs("discord")] == [job_id]


async def test_unsharing_closes_the_members_waiting_job_and_tells_them_why_pinging_only_them(
    adapter: DiscordAdapter, fake_discord: FakeDiscord, runtime: BotRuntime
) -> None:
    job_id = await mias_drawing(adapter, fake_discord, runtime)
    [progress] = fake_discord.posted(CHANNEL_ID)

    said = await run_as(adapter, fake_discord, "unshare", [subject_option("rex")])

    assert said == (
        f"Stopped sharing rex (it was shared with <@{OTHER_USER_ID}>). Only you can draw it "
        "now. 1 image job drawing it was stopped, and the quota it took is given back."
    )
    assert await queued(runtime.queue) == 0
    assert (await runtime.store.usage(MIA)).images == 0
    # The notice goes through the bot's own queue, as a moderator's cancel does.
    [notice] = await runtime.queue.zrange(bot_queue("discord"), 0, -1)
    info = await runtime.queue._get_job_def(notice, None)
    await Deliverer(runtime.core, adapter).failure(info.args[0])
    closing = fake_discord.find("PATCH", "/channels/")[-1]
    assert closing.path.endswith(f"/messages/{progress_id(progress)}")
    assert closing.content == f"<@{OTHER_USER_ID}> · ⊘ cancelled — see below."
    told = fake_discord.posted(CHANNEL_ID)[-1]
    assert told.content == (
        f"<@{OTHER_USER_ID}> ⊘ Your image “[rex] at the beach” was cancelled: "
        f"<@{USER_ID}> stopped sharing rex with you. What it took from your quota is given back."
    )
    # Mia is told; Alice, who is named, is not pinged.
    assert told.pings == {str(OTHER_USER_ID)}
    job = await runtime.store.get_job(job_id)
    assert job is not None and job.status == "cancelled"
