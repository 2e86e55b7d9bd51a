"""A job's progress message when the job ends while updates of it are on their way (shared by
the Slack and Discord adapters; shown against the fake Slack, whose client, unlike
discord.py's, sends a channel's messages side by side)."""

# The Slack fixtures (adapter, fake_slack) live in test_slack.py and are imported from there;
# tests taking them as arguments "redefine" the imported names.
# ruff: noqa: F811

from __future__ import annotations

import asyncio

from bot.adapters.slack import SlackAdapter
from bot.core.delivery import Delivery
from bot.launcher import BotRuntime
from tests.adapters.conftest import FakeClock
from tests.adapters.slack_fake import USER_ID, FakeSlack
from tests.adapters.test_slack import (  # noqa: F401  (fixtures)
    EDIT_INTERVAL,
    adapter,
    fake_slack,
    make_job,
    write_images,
)
from tests.conftest import training_progress


async def test_a_job_that_ends_while_its_progress_message_is_posted_still_closes_it(
    adapter: SlackAdapter, fake_slack: FakeSlack, clock: FakeClock
) -> None:
    job = make_job()
    slow_post = fake_slack.post_gate = asyncio.Event()
    posting = asyncio.create_task(adapter.show_progress(job, "drawing 1/10", training_progress(1)))
    await fake_slack.wait_until(lambda: len(fake_slack.find("chat.postMessage")) == 1)
    # The next update waits for that post; meanwhile the engine reports a failure.
    updating = asyncio.create_task(adapter.show_progress(job, "drawing 2/10", training_progress(2)))
    failing = asyncio.create_task(adapter.show_failure(job, "Your image could not be drawn."))
    await fake_slack.wait_until(lambda: len(fake_slack.find("chat.postMessage")) == 2)
    await asyncio.sleep(0.1)

    slow_post.set()
    await asyncio.gather(posting, updating, failing)

    assert await clock.advance(EDIT_INTERVAL) == 0  # no update kept back to go out later
    updates = fake_slack.find("chat.update")
    assert updates, "the progress message was never closed"
    assert updates[-1].text == f"<@{USER_ID}> · ✗ failed — see below."
    assert updates[-1].args["blocks"] == []  # without the Cancel button


async def test_a_progress_update_that_comes_after_the_result_leaves_the_message_closed(
    adapter: SlackAdapter, fake_slack: FakeSlack, runtime: BotRuntime, clock: FakeClock
) -> None:
    job = make_job()
    await adapter.show_progress(job, "drawing 1/10", training_progress(1))
    ts = adapter.progress_messages[job.id]
    await adapter.show_result(Delivery(job, "“a red fox” · seed 7", await write_images(runtime, 1)))
    posts = len(fake_slack.find("chat.postMessage"))

    # An update read from the store before the job ended (its message id in the job's
    # destination, as the store keeps it) reaches the adapter after the result.
    await clock.advance(EDIT_INTERVAL)
    late = make_job(progress_ts=ts)
    await adapter.show_progress(late, "drawing 9/10", training_progress(9))
    await clock.advance(EDIT_INTERVAL)

    [closing] = fake_slack.find("chat.update")
    assert closing.text == f"<@{USER_ID}> · ✓ done — result below."
    assert closing.args["blocks"] == []
    assert len(fake_slack.find("chat.postMessage")) == posts  # nor posted anew
