"""Today's features together on Slack, through signed requests on the real core: two users
sharing subjects with each other (``/dreambot share``) and drawing both in one prompt, a Reroll
click after the subject was unshared, and a waiting job stopped by ``/dreambot unshare``."""

# The Slack fixtures (adapter, fake_slack, events_url) live in test_slack.py and are imported
# from there; tests taking them as arguments "redefine" the imported names.
# ruff: noqa: F811

from __future__ import annotations

from bot.adapters.slack import SlackAdapter
from bot.core.delivery import Deliverer
from bot.core.store import Owner
from bot.launcher import BotRuntime
from engine.api import bot_queue
from tests.adapters.slack_fake import (
    OTHER_USER_ID,
    TEAM_ID,
    USER_ID,
    FakeSlack,
    action_body,
    signed,
)
from tests.adapters.test_slack import (  # noqa: F401  (fixtures)
    adapter,
    events_url,
    fake_slack,
    post,
    send_command,
)
from tests.conftest import configure_second_model, queued, queued_generate_request, ready_subject

ALICE = Owner("slack", TEAM_ID, USER_ID)
MIA = Owner("slack", TEAM_ID, OTHER_USER_ID)


async def mia_draws_alices_rex(fake: FakeSlack, url: str, runtime: BotRuntime) -> str:
    """Alice shares rex with Mia, who draws it; the job's id."""
    await ready_subject(runtime, ALICE, "rex", "zqv")
    await send_command(fake, url, "/dreambot", f"share rex <@{OTHER_USER_ID}|mia>")
    drawn = await send_command(
        fake, url, "/imagine", "[rex] in the rain --count 2", user_id=OTHER_USER_ID
    )
    assert drawn.text.startswith("Drawing 2 images")
    [job] = await runtime.store.unfinished_jobs("slack")
    return job.id


async def test_two_users_share_with_each_other_and_draw_both_in_one_prompt(
    adapter: SlackAdapter, fake_slack: FakeSlack, events_url: str, runtime: BotRuntime
) -> None:
    rex = await ready_subject(runtime, ALICE, "rex", "zqv")
    luna = await ready_subject(runtime, MIA, "luna", "pfx")
    mine = await send_command(
        fake_slack, events_url, "/dreambot", f"share rex <@{OTHER_USER_ID}|mia>"
    )
    hers = await send_command(
        fake_slack, events_url, "/dreambot", f"share luna <@{USER_ID}>", user_id=OTHER_USER_ID
    )
    assert mine.text.startswith(f"Shared rex (dog) with <@{OTHER_USER_ID}>")
    assert hers.text.startswith(f"Shared luna (dog) with <@{USER_ID}>")

    await send_command(
        fake_slack,
        events_url,
        "/imagine",
        "[luna] and [rex] on a sofa --count 3",
        user_id=OTHER_USER_ID,
    )
    await send_command(fake_slack, events_url, "/dreambot", "imagine [rex] with [luna] --count 1")

    jobs = {job.owner: job for job in await runtime.store.unfinished_jobs("slack")}
    mias = await queued_generate_request(runtime, jobs[MIA].id)
    alices = await queued_generate_request(runtime, jobs[ALICE].id)
    assert mias["prompt"] == "pfx dog and zqv dog on a sofa"
    assert [a["url"] for a in mias["adapters"]] == [luna.adapter_url, rex.adapter_url]
    assert [a["url"] for a in alices["adapters"]] == [rex.adapter_url, luna.adapter_url]
    assert (await runtime.store.usage(MIA)).images == 3
    assert (await runtime.store.usage(ALICE)).images == 1
    # /subjects shows each what the other shared, by its owner.
    theirs = await send_command(fake_slack, events_url, "/subjects", user_id=OTHER_USER_ID)
    assert theirs.text.splitlines()[-1] == f"  [rex]  rex: dog, ready, by <@{USER_ID}>"

    configure_second_model(runtime.settings, "xl")
    kit = await ready_subject(runtime, ALICE, "kit", "gmx")
    await runtime.store.update_subject(kit.id, base_model="xl")
    await send_command(fake_slack, events_url, "/dreambot", "share kit everyone")
    waiting = await queued(runtime.queue)
    refused = await send_command(
        fake_slack, events_url, "/imagine", "[luna] and [kit]", user_id=OTHER_USER_ID
    )
    assert refused.text == (
        f"Those subjects were trained on different base models (luna ({luna.base_model}), "
        "kit (xl)), so one image can't hold them all. Nothing was queued."
    )
    assert await queued(runtime.queue) == waiting


async def test_a_reroll_click_after_the_owner_unshared_is_answered_privately_by_name(
    adapter: SlackAdapter, fake_slack: FakeSlack, events_url: str, runtime: BotRuntime
) -> None:
    job_id = await mia_draws_alices_rex(fake_slack, events_url, runtime)
    result = {"job_id": job_id, "image_urls": ["0.png", "1.png"], "seed": 3}
    await runtime.store.update_job(job_id, status="done", result=result)
    await send_command(fake_slack, events_url, "/dreambot", "unshare rex")
    before = len(fake_slack.find("respond"))

    body = action_body(fake_slack, "dreambot:reroll", job_id, user_id=OTHER_USER_ID)
    status, answer, _ = await post(events_url, body, signed(body))

    assert (status, answer) == (200, "")
    await fake_slack.wait_until(lambda: len(fake_slack.find("respond")) > before)
    reply = fake_slack.find("respond")[-1]
    assert (reply.args["response_type"], reply.args["replace_original"]) == ("ephemeral", False)
    assert reply.text == (
        f"rex, which these images draw, is no longer shared with you by <@{USER_ID}>, so they "
        "can't be redrawn. Nothing was queued."
    )
    assert [j.id for j in await runtime.store.unfinished_jobs("slack")] == [job_id]


async def test_unshare_stops_the_waiting_job_and_closes_its_message_as_cancelled(
    adapter: SlackAdapter, fake_slack: FakeSlack, events_url: str, runtime: BotRuntime
) -> None:
    job_id = await mia_draws_alices_rex(fake_slack, events_url, runtime)
    assert len(fake_slack.find("chat.postMessage")) == 1  # its progress message

    said = await send_command(
        fake_slack, events_url, "/dreambot", f"unshare rex <@{OTHER_USER_ID}>"
    )

    assert said.text == (
        f"Stopped sharing rex with <@{OTHER_USER_ID}>. 1 image job drawing it was stopped, and "
        "the quota it took is given back."
    )
    assert await queued(runtime.queue) == 0
    assert (await runtime.store.usage(MIA)).images == 0
    [notice] = await runtime.queue.zrange(bot_queue("slack"), 0, -1)
    info = await runtime.queue._get_job_def(notice, None)
    await Deliverer(runtime.core, adapter).failure(info.args[0])
    told = fake_slack.find("chat.postMessage")[-1]
    assert told.text == (
        f"<@{OTHER_USER_ID}> ⊘ Your images “[rex] in the rain” were cancelled: <@{USER_ID}> "
        "stopped sharing rex with you. What they took from your quota is given back."
    )
    [closing] = fake_slack.find("chat.update")  # the progress message, closed
    assert closing.text == f"<@{OTHER_USER_ID}> · ⊘ cancelled — see below."
    job = await runtime.store.get_job(job_id)
    assert job is not None and job.status == "cancelled"
