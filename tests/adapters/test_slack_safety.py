"""The safety filter on Slack: ``/mod safety`` and ``/dreambot mod safety`` through signed
requests on the real core, and a result whose every image was withheld (Reroll alone)."""

# The Slack fixtures (adapter, fake_slack, events_url) live in test_slack.py and are imported
# from there; tests taking them as arguments "redefine" the imported names.
# ruff: noqa: F811

from __future__ import annotations

from bot.adapters.slack import SlackAdapter
from bot.core.delivery import Deliverer
from bot.launcher import BotRuntime
from engine.api import GenerateResult
from tests.adapters.slack_fake import ADMIN_ID, CHANNEL_ID, TEAM_ID, USER_ID, FakeSlack
from tests.adapters.test_slack import (  # noqa: F401  (fixtures)
    DESTINATION,
    OWNER,
    adapter,
    events_url,
    fake_slack,
    send_command,
)
from tests.conftest import engine_queue, queued_generate_request


async def test_mod_safety_and_dreambot_mod_safety_switch_the_filter_for_the_workspace(
    adapter: SlackAdapter, fake_slack: FakeSlack, events_url: str, runtime: BotRuntime
) -> None:
    off = await send_command(fake_slack, events_url, "/mod", "safety off", user_id=ADMIN_ID)

    assert off.text.startswith("The safety filter is now off here: images are posted unchecked")
    assert off.text.endswith("`/mod safety on` turns it back on.")
    assert not (await runtime.store.workspace_settings("slack", TEAM_ID)).safety_check
    await send_command(fake_slack, events_url, "/imagine", "a red fox --count 1")
    [job] = await runtime.store.unfinished_jobs("slack")
    assert (await queued_generate_request(runtime, job.id))["safety_check"] is False

    on = await send_command(fake_slack, events_url, "/dreambot", "mod safety on", user_id=ADMIN_ID)

    assert on.text.startswith("The safety filter is now on here")
    assert (await runtime.store.workspace_settings("slack", TEAM_ID)).safety_check
    entries = await runtime.store.audit_entries("slack", TEAM_ID, 10)
    assert [(e.moderator.user_id, e.action, e.detail) for e in entries] == [
        (ADMIN_ID, "safety", "on"),
        (ADMIN_ID, "safety", "off"),
    ]
    refused = await send_command(fake_slack, events_url, "/mod", "safety off", user_id=USER_ID)
    assert refused.text == "Only moderators can use /mod. Nothing was changed."
    assert (await runtime.store.workspace_settings("slack", TEAM_ID)).safety_check


async def test_a_result_with_every_image_withheld_is_text_under_reroll_alone(
    adapter: SlackAdapter, fake_slack: FakeSlack, runtime: BotRuntime
) -> None:
    receipt = await runtime.core.imagine(OWNER, DESTINATION, "a red fox", count=2, seed=5)
    await runtime.queue.zrem(engine_queue(runtime), receipt.job_id)
    result = GenerateResult(
        job_id=receipt.job_id,
        image_urls=[],
        seed=5,
        width=64,
        height=64,
        steps=4,
        seconds=0.5,
        withheld=2,
    )

    await Deliverer(runtime.core, adapter).result(result.model_dump())

    assert fake_slack.find("upload") == []
    text, buttons = fake_slack.find("chat.postMessage")
    assert text.args["channel"] == CHANNEL_ID
    assert text.text == (
        f"<@{USER_ID}> “a red fox” · seed 5: the safety filter withheld all 2 images, so "
        "nothing is posted; they are given back to your quota. Try another prompt."
    )
    [block] = buttons.args["blocks"]
    assert [(e["action_id"], e["value"]) for e in block["elements"]] == [
        ("dreambot:reroll", receipt.job_id)
    ]
    assert (await runtime.store.usage(OWNER)).images == 0
