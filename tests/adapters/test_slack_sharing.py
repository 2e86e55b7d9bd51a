"""Sharing on Slack: ``/dreambot share rex @mia`` (a mention as Slack sends it, with or without
the name), ``/dreambot share rex everyone``, ``/dreambot unshare``, and drawing what was shared,
through signed requests on the real core."""

# The Slack fixtures (adapter, fake_slack, events_url) live in test_slack.py and are imported
# from there; tests taking them as arguments "redefine" the imported names.
# ruff: noqa: F811

from __future__ import annotations

import asyncio

import pytest

from bot.adapters.slack import SlackAdapter, escape
from bot.core.store import EVERYONE, Owner
from bot.launcher import BotRuntime
from tests.adapters.slack_fake import (
    OTHER_USER_ID,
    TEAM_ID,
    USER_ID,
    FakeSlack,
    message_event_body,
)
from tests.adapters.test_slack import (  # noqa: F401  (fixtures)
    OWNER,
    adapter,
    events_url,
    fake_slack,
    send_command,
    send_event,
)
from tests.conftest import make_photo, queued_generate_request, ready_subject

OTHER = Owner("slack", TEAM_ID, OTHER_USER_ID)


@pytest.mark.parametrize("written", [f"<@{OTHER_USER_ID}|mia>", f"<@{OTHER_USER_ID}>"])
async def test_share_with_a_mention_lets_that_user_draw_it(
    adapter: SlackAdapter,
    fake_slack: FakeSlack,
    events_url: str,
    runtime: BotRuntime,
    written: str,
) -> None:
    rex = await ready_subject(runtime, OWNER, "rex", "zqv")

    reply = await send_command(fake_slack, events_url, "/dreambot", f"share rex {written}")

    assert reply.text.startswith(
        f"Shared rex (dog) with <@{OTHER_USER_ID}>: they can draw it as [rex]"
    )
    assert "`/dreambot unshare rex` stops sharing it." in reply.text
    assert await runtime.store.subject_shares(OWNER) == {rex.id: [OTHER_USER_ID]}

    drawn = await send_command(
        fake_slack, events_url, "/imagine", "[rex] in the rain --count 1", user_id=OTHER_USER_ID
    )
    assert drawn.text.startswith("Drawing 1 image")
    [job] = await runtime.store.unfinished_jobs("slack")
    assert job.owner == OTHER
    request = await queued_generate_request(runtime, job.id)
    assert request["prompt"] == "zqv dog in the rain"
    assert [a["url"] for a in request["adapters"]] == [rex.adapter_url]
    assert (await runtime.store.usage(OTHER)).images == 1
    assert (await runtime.store.usage(OWNER)).images == 0


async def test_share_with_everyone_and_unshare_and_subjects_say_who(
    adapter: SlackAdapter, fake_slack: FakeSlack, events_url: str, runtime: BotRuntime
) -> None:
    await ready_subject(runtime, OWNER, "rex", "zqv")

    shared = await send_command(fake_slack, events_url, "/dreambot", "share rex everyone")
    theirs = await send_command(fake_slack, events_url, "/subjects", user_id=OTHER_USER_ID)
    mine = await send_command(fake_slack, events_url, "/subjects")
    stopped = await send_command(fake_slack, events_url, "/dreambot", "unshare rex everyone")

    assert shared.text.startswith("Shared rex (dog) with everyone here")
    assert theirs.text.splitlines()[1:] == [
        "Shared with you (write them as shown):",
        f"  [rex]  rex: dog, ready, by <@{USER_ID}>",
    ]
    assert mine.text.splitlines()[1].endswith(" · shared with everyone here")
    assert stopped.text == "Stopped sharing rex with everyone here."
    assert await runtime.store.subjects_shared_with(OTHER) == []


async def test_share_without_a_target_or_with_a_typed_name_explains_itself(
    adapter: SlackAdapter, fake_slack: FakeSlack, events_url: str, runtime: BotRuntime
) -> None:
    await ready_subject(runtime, OWNER, "rex", "zqv")

    no_target = await send_command(fake_slack, events_url, "/dreambot", "share rex")
    typed = [
        await send_command(fake_slack, events_url, "/dreambot", f"share rex {who}")
        for who in ("mia", "<!here>")
    ]

    assert no_target.text == "Usage: /dreambot share &lt;subject name&gt; &lt;@user or everyone&gt;"
    for reply in typed:
        assert reply.text == (
            "Name the person with a mention (type @ and pick them), or say everyone: "
            "/dreambot share rex @mia"
        )
    assert await runtime.store.subject_shares(OWNER) == {}


async def test_share_written_to_the_bot_in_a_dm_works_too(
    adapter: SlackAdapter, fake_slack: FakeSlack, events_url: str, runtime: BotRuntime
) -> None:
    rex = await ready_subject(runtime, OWNER, "rex", "zqv")

    body = message_event_body(f"share rex <@{OTHER_USER_ID}>", [], channel_type="im")
    await send_event(fake_slack, events_url, body)
    await fake_slack.wait_until(lambda: bool(fake_slack.find("chat.postEphemeral")))

    [reply] = fake_slack.find("chat.postEphemeral")
    assert reply.text.startswith(f"Shared rex (dog) with <@{OTHER_USER_ID}>")
    assert await runtime.store.subject_shares(OWNER) == {rex.id: [OTHER_USER_ID]}


async def test_only_the_owner_unshares(
    adapter: SlackAdapter, fake_slack: FakeSlack, events_url: str, runtime: BotRuntime
) -> None:
    rex = await ready_subject(runtime, OWNER, "rex", "zqv")
    await runtime.core.sharing.share(OWNER, "rex", EVERYONE)

    reply = await send_command(
        fake_slack, events_url, "/dreambot", "unshare rex", user_id=OTHER_USER_ID
    )

    assert reply.text.endswith(f"belongs to <@{USER_ID}>: only its owner can share it.")
    assert await runtime.store.subject_shares(OWNER) == {rex.id: [EVERYONE]}


@pytest.mark.parametrize("typed", ["<!channel>", "<!here|here>", "<!subteam^S0TEAM>", "@channel"])
async def test_a_typed_subject_name_that_would_ping_pings_nobody(
    adapter: SlackAdapter, fake_slack: FakeSlack, events_url: str, runtime: BotRuntime, typed: str
) -> None:
    await ready_subject(runtime, OWNER, "rex", "zqv")

    # Slack sends a typed @channel as <!channel>, & < > escaped as &amp; &lt; &gt;.
    reply = await send_command(fake_slack, events_url, "/dreambot", f"unshare {typed}")

    assert reply.text.startswith("You have no subject called `")
    assert reply.pings == set()
    assert await runtime.store.subject_shares(OWNER) == {}


@pytest.mark.parametrize("name", ["*bold*", "<!channel>", "@everyone", "~strike~"])
async def test_train_with_a_name_that_would_format_or_ping_trains_nothing_and_pings_nobody(
    adapter: SlackAdapter, fake_slack: FakeSlack, events_url: str, runtime: BotRuntime, name: str
) -> None:
    refused = await send_command(fake_slack, events_url, "/train", f"{name} dog")
    # Refused before any photo is asked for, the name shown as typed (in a code span).
    assert refused.text.startswith(f"`{escape(name)}` can't be a subject name")
    assert refused.pings == set()
    fake_slack.files.update({f"p{i}.jpg": make_photo(i) for i in range(3)})
    photos = [fake_slack.file_object(f"p{i}.jpg") for i in range(3)]
    await send_event(fake_slack, events_url, message_event_body("", photos))
    await asyncio.sleep(0.2)

    assert fake_slack.find("download") == []  # no /train waits for them
    assert fake_slack.find("chat.postEphemeral") == []
    assert await runtime.store.list_subjects(OWNER) == []
