"""/dreambot mydata on Slack: what is kept, and /dreambot mydata delete, confirmed by the
"Delete everything" button that only the user it was shown to may press."""

# The Slack fixtures (adapter, fake_slack, events_url) live in test_slack.py and are imported
# from there; tests taking them as arguments "redefine" the imported names.
# ruff: noqa: F811

from __future__ import annotations

import json

from bot.adapters.slack import DELETE_DATA_ACTION_ID, SlackAdapter, delete_data_button
from bot.launcher import BotRuntime
from tests.adapters.slack_fake import (
    ADMIN_ID,
    DM_CHANNEL_ID,
    OTHER_USER_ID,
    USER_ID,
    Call,
    FakeSlack,
    action_body,
    message_event_body,
    signed,
)
from tests.adapters.test_slack import (  # noqa: F401  (fixtures)
    OWNER,
    adapter,
    events_url,
    fake_slack,
    post,
    send_command,
    send_event,
)
from tests.adapters.test_slack_cancel import imagine
from tests.conftest import queued
from tests.test_personal_data import subject_with_files


def blocks_of(call: Call) -> list[dict[str, object]]:
    blocks = call.args.get("blocks") or []
    return list(json.loads(blocks) if isinstance(blocks, str) else blocks)


async def press(fake: FakeSlack, url: str, user_id: str, pressed_by: str) -> Call:
    """The "Delete everything" button shown to ``user_id``, pressed by ``pressed_by``; the
    private answer."""
    before = len(fake.find("respond"))
    body = action_body(fake, DELETE_DATA_ACTION_ID, user_id, user_id=pressed_by)
    status, answer, _ = await post(url, body, signed(body))
    assert (status, answer) == (200, "")  # acked at once
    await fake.wait_until(lambda: len(fake.find("respond")) > before)
    return fake.find("respond")[-1]


async def test_mydata_says_what_is_kept_and_how_to_delete_it_as_slack_types_it(
    adapter: SlackAdapter, fake_slack: FakeSlack, events_url: str, runtime: BotRuntime
) -> None:
    await subject_with_files(runtime, OWNER, "rex", "zqv")

    reply = await send_command(fake_slack, events_url, "/dreambot", "mydata")

    assert reply.text.startswith(
        "What dreambot keeps about you here:\n  Subjects (1): rex (dog, ready, 3 photos)."
    )
    assert "until you delete it (/forget)" in reply.text
    assert reply.text.endswith(
        "`/dreambot mydata delete` deletes your subjects, images and prompts and cancels your "
        "jobs; you confirm first."
    )


async def test_mydata_delete_asks_with_a_button_and_deletes_nothing_yet(
    adapter: SlackAdapter, fake_slack: FakeSlack, events_url: str, runtime: BotRuntime
) -> None:
    folder = await subject_with_files(runtime, OWNER, "rex", "zqv")

    reply = await send_command(fake_slack, events_url, "/dreambot", "mydata delete")

    assert reply.text.startswith("This deletes what dreambot keeps about you here")
    assert reply.text.endswith("Press Delete everything to go ahead.")
    assert reply.args["replace_original"] is False
    section, actions = blocks_of(reply)
    assert section["type"] == "section"
    assert actions == delete_data_button(USER_ID)
    [button] = actions["elements"]  # type: ignore[index]
    assert (button["action_id"], button["value"], button["style"]) == (
        DELETE_DATA_ACTION_ID,
        USER_ID,
        "danger",
    )
    # Slack asks once more before it sends the click.
    assert button["confirm"]["confirm"]["text"] == "Delete it all"
    assert folder.exists()


async def test_another_user_pressing_delete_everything_is_refused_and_nothing_changes(
    adapter: SlackAdapter, fake_slack: FakeSlack, events_url: str, runtime: BotRuntime
) -> None:
    folder = await subject_with_files(runtime, OWNER, "rex", "zqv")

    reply = await press(fake_slack, events_url, USER_ID, OTHER_USER_ID)

    assert reply.text == (
        f"Only <@{USER_ID}> can delete their data with this button: it is theirs. "
        "Nothing was changed."
    )
    assert folder.exists()


async def test_the_owner_presses_delete_everything_and_it_is_all_gone(
    adapter: SlackAdapter, fake_slack: FakeSlack, events_url: str, runtime: BotRuntime
) -> None:
    folder = await subject_with_files(runtime, OWNER, "rex", "zqv")
    job_id = await imagine(fake_slack, events_url, runtime)
    progress_ts = adapter.progress_messages[job_id]

    reply = await press(fake_slack, events_url, USER_ID, USER_ID)

    assert reply.text.startswith(
        "Deleted what dreambot kept about you here: your subject rex (photos, adapters and "
        "sample images) and the prompts and options of your 1 job."
    )
    assert reply.args["replace_original"] is True  # the preview and its button go
    assert not folder.exists()
    assert await queued(runtime.queue) == 0
    [closing] = fake_slack.find("chat.update")
    assert closing.args["ts"] == progress_ts
    assert closing.text == f"<@{USER_ID}> · ⊘ cancelled by you."
    assert closing.args["blocks"] == []


async def test_mydata_delete_written_in_a_dm_answers_with_the_button(
    adapter: SlackAdapter, fake_slack: FakeSlack, events_url: str, runtime: BotRuntime
) -> None:
    await subject_with_files(runtime, OWNER, "rex", "zqv")

    body = message_event_body("mydata delete", [], channel_id=DM_CHANNEL_ID, channel_type="im")
    await send_event(fake_slack, events_url, body)
    await fake_slack.wait_until(lambda: bool(fake_slack.find("chat.postEphemeral")))

    [reply] = fake_slack.find("chat.postEphemeral")
    assert reply.args["channel"] == DM_CHANNEL_ID
    assert blocks_of(reply)[-1] == delete_data_button(USER_ID)


async def test_a_workspace_admin_deletes_a_users_data_with_mod(
    adapter: SlackAdapter, fake_slack: FakeSlack, events_url: str, runtime: BotRuntime
) -> None:
    folder = await subject_with_files(runtime, OWNER, "rex", "zqv")

    reply = await send_command(
        fake_slack, events_url, "/mod", f"delete-user-data <@{USER_ID}|user>", user_id=ADMIN_ID
    )

    assert reply.text.startswith(
        f"Deleted what dreambot kept about {USER_ID} here: their subject rex"
    )
    assert not folder.exists()
    log = await send_command(fake_slack, events_url, "/mod", "log", user_id=ADMIN_ID)
    assert f"{ADMIN_ID}: delete-user-data {USER_ID} — 1 subject(s) deleted" in log.text


async def test_help_names_mydata(
    adapter: SlackAdapter, fake_slack: FakeSlack, events_url: str
) -> None:
    text = (await send_command(fake_slack, events_url, "/dreambot", "help")).text
    assert "/dreambot mydata [delete]" in text
