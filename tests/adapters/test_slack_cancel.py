"""Cancelling on Slack: ``/dreambot jobs``, ``/dreambot cancel``, the same words written to the
bot, and the Cancel button on a job's progress message."""

# The Slack fixtures (adapter, fake_slack, events_url) live in test_slack.py and are imported
# from there; tests taking them as arguments "redefine" the imported names.
# ruff: noqa: F811

from __future__ import annotations

import asyncio

import pytest

from bot.adapters.slack import CANCEL_ACTION_ID, SlackAdapter, cancel_button
from bot.core.delivery import Deliverer
from bot.launcher import BotRuntime
from tests.adapters.slack_fake import (
    BOT_USER_ID,
    CHANNEL_ID,
    DM_CHANNEL_ID,
    OTHER_USER_ID,
    USER_ID,
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
from tests.conftest import engine_queue, queued


async def imagine(fake: FakeSlack, url: str, runtime: BotRuntime) -> str:
    """/imagine from the owner; the job's id."""
    await send_command(fake, url, "/imagine", "a red fox --count 2")
    [job] = await runtime.store.unfinished_jobs("slack")
    return job.id


async def press(fake: FakeSlack, url: str, job_id: str, user_id: str) -> str:
    """The Cancel button of ``job_id``'s progress message, pressed by ``user_id``; the private
    reply."""
    before = len(fake.find("respond"))
    body = action_body(fake, CANCEL_ACTION_ID, job_id, user_id=user_id)
    status, answer, _ = await post(url, body, signed(body))
    assert (status, answer) == (200, "")
    await fake.wait_until(lambda: len(fake.find("respond")) > before)
    reply = fake.find("respond")[-1]
    assert (reply.args["response_type"], reply.args["replace_original"]) == ("ephemeral", False)
    return reply.text


async def test_the_progress_message_carries_a_cancel_button(
    adapter: SlackAdapter, fake_slack: FakeSlack, events_url: str, runtime: BotRuntime
) -> None:
    job_id = await imagine(fake_slack, events_url, runtime)

    [progress] = fake_slack.find("chat.postMessage")
    section, actions = progress.args["blocks"]
    assert section["text"]["text"] == progress.text
    assert actions == cancel_button(job_id)
    [button] = actions["elements"]
    assert (button["action_id"], button["value"]) == ("dreambot:cancel", job_id)
    assert button["text"]["text"] == "✖️ Cancel"
    # Slack asks the user to confirm before it sends the click.
    assert (button["confirm"]["confirm"]["text"], button["confirm"]["deny"]["text"]) == (
        "Cancel it",
        "Keep it",
    )


async def test_the_owner_presses_cancel_and_the_message_closes_without_the_button(
    adapter: SlackAdapter, fake_slack: FakeSlack, events_url: str, runtime: BotRuntime
) -> None:
    job_id = await imagine(fake_slack, events_url, runtime)
    progress_ts = adapter.progress_messages[job_id]

    reply = await press(fake_slack, events_url, job_id, USER_ID)

    assert reply == (
        f"Cancelled your images “a red fox” (job {job_id[:8]}): taken out of the queue. "
        "What it took from your quota is given back."
    )
    assert await queued(runtime.queue) == 0
    assert (await runtime.store.usage(OWNER)).images == 0
    [closing] = fake_slack.find("chat.update")
    assert (closing.args["channel"], closing.args["ts"]) == (CHANNEL_ID, progress_ts)
    assert closing.text == f"<@{USER_ID}> · ⊘ cancelled by you."
    assert closing.args["blocks"] == []
    # Nothing is posted in the channel about it, not even when the engine reports it stopped.
    await Deliverer(runtime.core, adapter).failure({"job_id": job_id, "message": "cancelled"})
    assert len(fake_slack.find("chat.postMessage")) == 1


async def test_another_user_pressing_cancel_is_refused_privately(
    adapter: SlackAdapter, fake_slack: FakeSlack, events_url: str, runtime: BotRuntime
) -> None:
    job_id = await imagine(fake_slack, events_url, runtime)

    reply = await press(fake_slack, events_url, job_id, OTHER_USER_ID)

    assert reply == f"Only <@{USER_ID}> can cancel this job: it is theirs. Nothing was changed."
    job = await runtime.store.get_job(job_id)
    assert job is not None and job.status == "queued"
    assert await runtime.queue.zscore(engine_queue(runtime), job_id) is not None
    assert fake_slack.find("chat.update") == []


async def test_dreambot_jobs_and_cancel_by_id(
    adapter: SlackAdapter, fake_slack: FakeSlack, events_url: str, runtime: BotRuntime
) -> None:
    job_id = await imagine(fake_slack, events_url, runtime)

    listing = (await send_command(fake_slack, events_url, "/dreambot", "jobs")).text
    assert f"  {job_id[:8]}  images “a red fox”  waiting #1 in the queue" in listing
    assert listing.endswith(  # as sent: Slack's text escapes < and >
        "Cancel one with /dreambot cancel &lt;id&gt; (a training also by its subject's name); "
        "/dreambot cancel alone cancels the newest."
    )

    other = await send_command(
        fake_slack, events_url, "/dreambot", f"cancel {job_id[:6]}", user_id=OTHER_USER_ID
    )
    assert other.text.startswith("You have no jobs waiting or running here")
    reply = await send_command(fake_slack, events_url, "/dreambot", f"cancel {job_id[:6]}")

    assert reply.text.startswith(f"Cancelled your images “a red fox” (job {job_id[:8]})")
    assert await queued(runtime.queue) == 0
    [closing] = fake_slack.find("chat.update")
    assert closing.text == f"<@{USER_ID}> · ⊘ cancelled by you." and closing.args["blocks"] == []
    nothing = await send_command(fake_slack, events_url, "/dreambot", "cancel")
    assert (
        nothing.text == "You have no jobs waiting or running here, so there is nothing to cancel."
    )


@pytest.mark.parametrize(
    ("text", "channel", "channel_type"),
    [("jobs", DM_CHANNEL_ID, "im"), (f"<@{BOT_USER_ID}> jobs", CHANNEL_ID, "channel")],
)
async def test_a_command_written_to_the_bot_runs_and_is_answered_privately(
    adapter: SlackAdapter,
    fake_slack: FakeSlack,
    events_url: str,
    runtime: BotRuntime,
    text: str,
    channel: str,
    channel_type: str,
) -> None:
    body = message_event_body(text, [], channel_id=channel, channel_type=channel_type)
    await send_event(fake_slack, events_url, body)
    await fake_slack.wait_until(lambda: bool(fake_slack.find("chat.postEphemeral")))

    [reply] = fake_slack.find("chat.postEphemeral")
    assert (reply.args["channel"], reply.args["user"]) == (channel, USER_ID)
    assert reply.text == "You have no jobs waiting or running here."


async def test_cancel_written_in_a_dm_cancels_the_newest_job(
    adapter: SlackAdapter, fake_slack: FakeSlack, events_url: str, runtime: BotRuntime
) -> None:
    job_id = await imagine(fake_slack, events_url, runtime)

    await send_event(fake_slack, events_url, message_event_body("cancel", [], channel_type="im"))
    await fake_slack.wait_until(lambda: bool(fake_slack.find("chat.postEphemeral")))

    [reply] = fake_slack.find("chat.postEphemeral")
    assert reply.text.startswith(f"Cancelled your images “a red fox” (job {job_id[:8]})")
    job = await runtime.store.get_job(job_id)
    assert job is not None and job.status == "cancelled"


async def test_words_in_a_channel_not_written_to_the_bot_are_left_alone(
    adapter: SlackAdapter, fake_slack: FakeSlack, events_url: str, runtime: BotRuntime
) -> None:
    job_id = await imagine(fake_slack, events_url, runtime)

    for text in ("cancel", "<@U0SOMEONE> cancel"):
        await send_event(fake_slack, events_url, message_event_body(text, []))
    await asyncio.sleep(0.2)

    assert fake_slack.find("chat.postEphemeral") == []
    job = await runtime.store.get_job(job_id)
    assert job is not None and job.status == "queued"


async def test_a_moderators_cancellation_closes_the_message_as_cancelled_not_failed(
    adapter: SlackAdapter, fake_slack: FakeSlack, events_url: str, runtime: BotRuntime
) -> None:
    job_id = await imagine(fake_slack, events_url, runtime)
    moderator = runtime.core.moderation.acting(OWNER, True)
    await moderator.cancel(job_id[:8], "spam")

    await Deliverer(runtime.core, adapter).failure({"job_id": job_id, "message": "cancelled"})

    notice = fake_slack.find("chat.postMessage")[-1]
    assert notice.text == (
        f"<@{USER_ID}> ⊘ Your images “a red fox” were cancelled by a moderator: spam."
    )
    [closing] = fake_slack.find("chat.update")
    assert closing.text == f"<@{USER_ID}> · ⊘ cancelled — see below."
    assert closing.args["blocks"] == []


async def test_help_names_jobs_and_cancel(
    adapter: SlackAdapter, fake_slack: FakeSlack, events_url: str
) -> None:
    text = (await send_command(fake_slack, events_url, "/dreambot", "help")).text
    assert "/dreambot jobs " in text and "/dreambot cancel [name or job id]" in text
