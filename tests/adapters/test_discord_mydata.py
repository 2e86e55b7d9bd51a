"""/mydata on Discord: what is kept, and /mydata delete:True, confirmed by the "Delete
everything" button that only the member it was shown to may press."""

from __future__ import annotations

from bot.adapters.discord import DELETE_DATA_ID, DiscordAdapter
from bot.launcher import BotRuntime
from tests.adapters.conftest import (
    CHANNEL_ID,
    OTHER_USER_ID,
    USER_ID,
    FakeClock,
    FakeDiscord,
)
from tests.adapters.test_discord import OWNER, click, private_reply, progress_id, run_command
from tests.adapters.test_discord_cancel import buttons, imagine
from tests.conftest import queued
from tests.test_personal_data import subject_with_files

DELETE = [{"name": "delete", "type": 5, "value": True}]


async def test_mydata_says_what_is_kept_and_how_to_delete_it_as_discord_types_it(
    adapter: DiscordAdapter, fake_discord: FakeDiscord, runtime: BotRuntime
) -> None:
    await subject_with_files(runtime, OWNER, "rex", "zqv")
    moderator = runtime.core.moderation.acting(OWNER, True)
    await moderator.ban(str(OTHER_USER_ID), "spam")  # kept for moderation; may still look

    await run_command(adapter, "mydata")

    reply = private_reply(fake_discord)
    assert (reply.content or "").startswith(
        "What dreambot keeps about you here:\n  Subjects (1): rex (dog, ready, 3 photos)."
    )
    assert "until you delete it (/forget)" in (reply.content or "")
    assert (reply.content or "").endswith(
        "`/mydata delete:True` deletes your subjects, images and prompts and cancels your "
        "jobs; you confirm first."
    )
    assert "components" not in reply.json or not reply.json["components"]


async def test_delete_true_asks_with_a_button_and_deletes_nothing_yet(
    adapter: DiscordAdapter, fake_discord: FakeDiscord, runtime: BotRuntime
) -> None:
    folder = await subject_with_files(runtime, OWNER, "rex", "zqv")

    await run_command(adapter, "mydata", DELETE)

    reply = private_reply(fake_discord)
    assert (reply.content or "").startswith(
        "This deletes what dreambot keeps about you here, and can't be undone:\n"
        "  your subject rex with its photos, adapter and sample images"
    )
    assert (reply.content or "").endswith("Press Delete everything to go ahead.")
    [button] = buttons(reply)
    assert (button["label"], button["style"]) == ("Delete everything", 4)  # danger
    assert button["custom_id"] == f"dreambot:delete-data:{USER_ID}"
    assert DELETE_DATA_ID.fullmatch(button["custom_id"])
    assert folder.exists()


async def test_with_nothing_stored_there_is_no_button(
    adapter: DiscordAdapter, fake_discord: FakeDiscord
) -> None:
    await run_command(adapter, "mydata", DELETE)

    reply = private_reply(fake_discord)
    assert (reply.content or "").startswith("You have nothing stored here to delete")
    assert not reply.json.get("components")


async def test_another_member_pressing_delete_everything_is_refused_and_nothing_changes(
    runtime: BotRuntime, fake_discord: FakeDiscord, clock: FakeClock
) -> None:
    folder = await subject_with_files(runtime, OWNER, "rex", "zqv")

    reply = await click(
        runtime, fake_discord, clock, f"dreambot:delete-data:{USER_ID}", OTHER_USER_ID
    )

    assert reply.content == (
        f"Only <@{USER_ID}> can delete their data with this button: it is theirs. "
        "Nothing was changed."
    )
    assert folder.exists()
    assert await runtime.store.list_subjects(OWNER) != []


async def test_the_owner_presses_delete_everything_after_a_restart_and_it_is_all_gone(
    adapter: DiscordAdapter, fake_discord: FakeDiscord, runtime: BotRuntime, clock: FakeClock
) -> None:
    folder = await subject_with_files(runtime, OWNER, "rex", "zqv")
    job_id = await imagine(adapter, runtime)
    [posted] = fake_discord.posted(CHANNEL_ID)
    fake_discord.requests.clear()

    reply = await click(runtime, fake_discord, clock, f"dreambot:delete-data:{USER_ID}", USER_ID)

    assert (reply.content or "").startswith(
        "Deleted what dreambot kept about you here: your subject rex (photos, adapters and "
        "sample images) and the prompts and options of your 1 job.\n"
        "Cancelled your 1 waiting or running job; what it took from your quota is given back."
    )
    assert not folder.exists()
    assert await queued(runtime.queue) == 0
    job = await runtime.store.get_job(job_id)
    assert job is not None and job.status == "cancelled" and job.prompt is None
    # The cancelled job's progress message closes, without its Cancel button.
    [closing] = fake_discord.find("PATCH", "/channels/")
    assert closing.path.endswith(f"/messages/{progress_id(posted)}")
    assert closing.content == f"<@{USER_ID}> · ⊘ cancelled by you."
    assert closing.json["components"] == []
    assert fake_discord.posted(CHANNEL_ID) == []  # nothing is announced in the channel


async def test_help_names_mydata(adapter: DiscordAdapter, fake_discord: FakeDiscord) -> None:
    await run_command(adapter, "help")
    text = private_reply(fake_discord).content or ""
    assert "/mydata [delete:True]  what dreambot keeps about you; delete:True deletes it" in text
