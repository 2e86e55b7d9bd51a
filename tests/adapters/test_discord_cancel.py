"""Cancelling on Discord: /jobs, /cancel, and the Cancel button on a job's progress message."""

from __future__ import annotations

from typing import Any

import discord
import pytest
from arq.constants import in_progress_key_prefix

from bot.adapters.discord import CANCEL_ID, DiscordAdapter
from bot.core.delivery import Deliverer
from bot.core.store import Owner
from bot.launcher import BotRuntime
from engine.api import cancel_key
from tests.adapters.conftest import (
    CHANNEL_ID,
    EDIT_INTERVAL,
    OTHER_USER_ID,
    USER_ID,
    FakeClock,
    FakeDiscord,
    Recorded,
    interaction_payload,
)
from tests.adapters.test_discord import (
    OWNER,
    click,
    private_reply,
    progress_id,
    run_command,
    train_options,
    write_images,
)
from tests.conftest import engine_queue, queued


def buttons(message: Recorded) -> list[dict[str, Any]]:
    """The buttons a message was sent or edited with."""
    return [button for row in message.json["components"] for button in row["components"]]


async def imagine(adapter: DiscordAdapter, runtime: BotRuntime) -> str:
    """/imagine from the owner, through the command tree; the job's id."""
    await run_command(adapter, "imagine", [{"name": "prompt", "type": 3, "value": "a red fox"}])
    [job] = await runtime.store.unfinished_jobs("discord")
    return job.id


async def test_the_progress_message_carries_a_cancel_button_that_edits_keep(
    adapter: DiscordAdapter, fake_discord: FakeDiscord, runtime: BotRuntime, clock: FakeClock
) -> None:
    job_id = await imagine(adapter, runtime)

    [posted] = fake_discord.posted(CHANNEL_ID)
    [button] = buttons(posted)
    assert (button["label"], button["custom_id"]) == ("Cancel", f"dreambot:cancel:{job_id}")
    assert CANCEL_ID.fullmatch(button["custom_id"])

    deliverer = Deliverer(runtime.core, adapter)
    await deliverer.progress({"job_id": job_id, "phase": "generating", "step": 3, "total": 10})
    await clock.advance(EDIT_INTERVAL)
    await fake_discord.wait_until(lambda: bool(fake_discord.find("PATCH")))
    [edit] = fake_discord.find("PATCH", "/channels/")
    assert "drawing" in (edit.content or "")
    assert "components" not in edit.json  # an edit leaves the button where it is


@pytest.mark.parametrize("ending", ["result", "failure", "moderator"])
async def test_the_button_goes_when_the_job_ends(
    adapter: DiscordAdapter,
    fake_discord: FakeDiscord,
    runtime: BotRuntime,
    ending: str,
) -> None:
    job_id = await imagine(adapter, runtime)
    [posted] = fake_discord.posted(CHANNEL_ID)
    deliverer = Deliverer(runtime.core, adapter)
    if ending == "result":
        images = await write_images(runtime, 1)
        await deliverer.result(
            {
                "job_id": job_id,
                "image_urls": images,
                "seed": 5,
                "width": 64,
                "height": 64,
                "steps": 25,
                "seconds": 1.0,
            }
        )
        expected = "✓ done — result below."
    elif ending == "failure":
        await deliverer.failure({"job_id": job_id, "message": "out of memory"})
        expected = "✗ failed — see below."
    else:
        moderator = runtime.core.moderation.acting(OWNER, True)
        await moderator.cancel(job_id[:8], "spam")
        await deliverer.failure({"job_id": job_id, "message": "it was cancelled."})
        expected = "⊘ cancelled — see below."

    closing = fake_discord.find("PATCH", "/channels/")[-1]
    assert closing.path.endswith(f"/messages/{progress_id(posted)}")
    assert closing.content == f"<@{USER_ID}> · {expected}"
    assert closing.json["components"] == []
    if ending == "moderator":
        notice = fake_discord.posted(CHANNEL_ID)[-1]
        assert notice.content == (
            f"<@{USER_ID}> ⊘ Your images “a red fox” were cancelled by a moderator: spam."
        )


async def test_the_owner_presses_cancel_after_a_restart_and_the_message_closes(
    adapter: DiscordAdapter, fake_discord: FakeDiscord, runtime: BotRuntime, clock: FakeClock
) -> None:
    job_id = await imagine(adapter, runtime)
    [posted] = fake_discord.posted(CHANNEL_ID)
    fake_discord.requests.clear()

    reply = await click(runtime, fake_discord, clock, f"dreambot:cancel:{job_id}", USER_ID)

    assert reply.content == (
        f"Cancelled your images “a red fox” (job {job_id[:8]}): taken out of the queue. "
        "What it took from your quota is given back."
    )
    assert await queued(runtime.queue) == 0
    job = await runtime.store.get_job(job_id)
    assert job is not None and job.status == "cancelled"
    assert (await runtime.store.usage(OWNER)).images == 0
    [closing] = fake_discord.find("PATCH", "/channels/")
    assert closing.path.endswith(f"/messages/{progress_id(posted)}")
    assert closing.content == f"<@{USER_ID}> · ⊘ cancelled by you."
    assert closing.json["components"] == []
    assert fake_discord.posted(CHANNEL_ID) == []  # no notice in the channel: they know
    # The engine's report that it stopped posts nothing either.
    await Deliverer(runtime.core, adapter).failure({"job_id": job_id, "message": "cancelled"})
    assert fake_discord.posted(CHANNEL_ID) == []


async def test_another_member_pressing_cancel_is_refused_privately(
    adapter: DiscordAdapter, fake_discord: FakeDiscord, runtime: BotRuntime, clock: FakeClock
) -> None:
    job_id = await imagine(adapter, runtime)
    fake_discord.requests.clear()

    reply = await click(runtime, fake_discord, clock, f"dreambot:cancel:{job_id}", OTHER_USER_ID)

    assert reply.content == (
        f"Only <@{USER_ID}> can cancel this job: it is theirs. Nothing was changed."
    )
    job = await runtime.store.get_job(job_id)
    assert job is not None and job.status == "queued"
    assert await runtime.queue.zscore(engine_queue(runtime), job_id) is not None
    assert fake_discord.find("PATCH") == []


async def test_jobs_and_cancel_by_subject_name_as_slash_commands(
    adapter: DiscordAdapter, fake_discord: FakeDiscord, runtime: BotRuntime
) -> None:
    await run_command(adapter, "train", *train_options(fake_discord))
    [job] = await runtime.store.unfinished_jobs("discord")
    await runtime.queue.set(in_progress_key_prefix + job.id, b"1")  # an engine took it
    [posted] = fake_discord.posted(CHANNEL_ID)
    fake_discord.requests.clear()

    await run_command(adapter, "jobs")
    listing = private_reply(fake_discord).content or ""
    assert f"  {job.id[:8]}  training of rex  running (queued " in listing
    assert listing.endswith(
        "Cancel one with /cancel target:<id> (a training also by its subject's name); "
        "/cancel alone cancels the newest."
    )
    assert not fake_discord.find("POST", "/channels/")
    fake_discord.requests.clear()

    await run_command(adapter, "cancel", [{"name": "target", "type": 3, "value": "rex"}])

    reply = private_reply(fake_discord).content or ""
    assert reply.startswith(
        f"Cancelled your training of rex (job {job.id[:8]}): the engine stops it at its next step."
    )
    assert "`/train name:rex` again" in reply and "`/forget name:rex` deletes it" in reply
    assert await runtime.queue.exists(cancel_key(job.id))
    [closing] = fake_discord.find("PATCH", "/channels/")
    assert closing.path.endswith(f"/messages/{progress_id(posted)}")
    assert closing.content == f"<@{USER_ID}> · ⊘ cancelled by you."
    fake_discord.requests.clear()

    await run_command(adapter, "cancel")
    assert private_reply(fake_discord).content == (
        "You have no jobs waiting or running here, so there is nothing to cancel."
    )


async def test_help_names_jobs_cancel_and_the_button(
    adapter: DiscordAdapter, fake_discord: FakeDiscord
) -> None:
    await run_command(adapter, "help")
    text = private_reply(fake_discord).content or ""
    assert "/jobs " in text and "/cancel [target:<subject name or job id>]" in text
    assert "✖️ Cancel on a job's progress message" in text


async def test_a_cancelled_job_without_a_progress_message_is_still_cancelled(
    adapter: DiscordAdapter, fake_discord: FakeDiscord, runtime: BotRuntime
) -> None:
    fake_discord.forbidden.add(CHANNEL_ID)  # the bot can't post progress there
    job_id = await imagine(adapter, runtime)
    fake_discord.requests.clear()

    await run_command(adapter, "cancel", [{"name": "target", "type": 3, "value": job_id[:4]}])

    assert (private_reply(fake_discord).content or "").startswith("Cancelled your image")
    assert fake_discord.find("PATCH") == []
    job = await runtime.store.get_job(job_id)
    assert job is not None and job.status == "cancelled"


async def suggestions(
    adapter: DiscordAdapter, fake: FakeDiscord, command: str, option: str, typed: str
) -> list[dict[str, str]]:
    """What Discord shows under ``option`` of ``command`` while the user types ``typed``."""
    focused = [{"name": option, "type": 3, "value": typed, "focused": True}]
    payload = interaction_payload(command=command, options=focused)
    payload["type"] = 4  # APPLICATION_COMMAND_AUTOCOMPLETE
    fake.requests.clear()
    await adapter.client.tree._call(
        discord.Interaction(data=payload, state=adapter.client._connection)  # type: ignore[arg-type]
    )
    [answer] = fake.find("POST", "/callback")
    assert answer.json["type"] == 8  # APPLICATION_COMMAND_AUTOCOMPLETE_RESULT
    return list(answer.json["data"]["choices"])


async def test_cancel_suggests_the_callers_own_jobs_and_forget_their_subjects(
    adapter: DiscordAdapter, fake_discord: FakeDiscord, runtime: BotRuntime
) -> None:
    await run_command(adapter, "train", *train_options(fake_discord))
    [training] = await runtime.store.unfinished_jobs("discord")
    await run_command(adapter, "imagine", [{"name": "prompt", "type": 3, "value": "a red fox"}])
    [job_id] = [j.id for j in await runtime.store.unfinished_jobs("discord") if j.kind != "train"]
    # Another member's job is never suggested.
    other = Owner(OWNER.platform, OWNER.workspace, str(OTHER_USER_ID))
    await runtime.core.imagine(other, {"channel_id": CHANNEL_ID}, "a hen", count=1)

    assert await suggestions(adapter, fake_discord, "cancel", "target", "") == [
        {"name": f"images “a red fox” ({job_id[:8]})", "value": job_id[:8]},
        {"name": f"training of rex ({training.id[:8]})", "value": training.id[:8]},
    ]
    assert await suggestions(adapter, fake_discord, "cancel", "target", "REX") == [
        {"name": f"training of rex ({training.id[:8]})", "value": training.id[:8]},
    ]
    assert await suggestions(adapter, fake_discord, "forget", "name", "r") == [
        {"name": "rex", "value": "rex"}
    ]
    assert await suggestions(adapter, fake_discord, "forget", "name", "m") == []
    # A showcase needs a trained subject: rex is still training.
    assert await suggestions(adapter, fake_discord, "showcase", "name", "") == []
