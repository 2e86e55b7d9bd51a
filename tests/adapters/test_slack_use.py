"""``/dreambot use``: choosing which subject [V] means on Slack, through signed requests on the
real core, and the hint in a training's "ready" message typed the Slack way."""

# The Slack fixtures (adapter, fake_slack, events_url) live in test_slack.py and are imported
# from there; tests taking them as arguments "redefine" the imported names.
# ruff: noqa: F811

from __future__ import annotations

from bot.adapters.slack import SlackAdapter
from bot.core.delivery import Deliverer
from bot.launcher import BotRuntime
from engine.api import TrainResult
from tests.adapters.slack_fake import FakeSlack, message_event_body
from tests.adapters.test_slack import (  # noqa: F401  (fixtures)
    DESTINATION,
    OWNER,
    adapter,
    events_url,
    fake_slack,
    send_command,
    send_event,
)
from tests.conftest import queued_generate_request, ready_subject


async def drawn(fake: FakeSlack, url: str, runtime: BotRuntime) -> str:
    """What the engine is asked to draw for ``/imagine a [V] on the beach --count 1``."""
    before = {job.id for job in await runtime.store.unfinished_jobs("slack")}
    await send_command(fake, url, "/imagine", "a [V] on the beach --count 1")
    [new] = [j for j in await runtime.store.unfinished_jobs("slack") if j.id not in before]
    return str((await queued_generate_request(runtime, new.id))["prompt"])


async def test_dreambot_use_makes_a_subject_v_and_subjects_says_so(
    adapter: SlackAdapter, fake_slack: FakeSlack, events_url: str, runtime: BotRuntime
) -> None:
    await ready_subject(runtime, OWNER, "rex", "zqv")
    await ready_subject(runtime, OWNER, "mia", "bkt")

    chose = await send_command(fake_slack, events_url, "/dreambot", "use rex")
    listed = await send_command(fake_slack, events_url, "/subjects")

    assert chose.text.startswith("[V] now means rex (dog), also after you train others")
    assert chose.text.endswith("`/dreambot use` alone goes back to your newest ready subject.")
    lines = listed.text.splitlines()
    assert lines[2].startswith("  rex:") and lines[2].endswith("← [V] (chosen with /dreambot use)")
    assert lines[-1] == "`/dreambot use` alone makes [V] your newest ready subject again."
    assert await drawn(fake_slack, events_url, runtime) == "a zqv dog on the beach"

    back = await send_command(fake_slack, events_url, "/dreambot", "use")

    assert back.text == "[V] means your newest ready subject again: mia."
    assert await drawn(fake_slack, events_url, runtime) == "a bkt dog on the beach"


async def test_use_written_to_the_bot_in_a_dm_works_too(
    adapter: SlackAdapter, fake_slack: FakeSlack, events_url: str, runtime: BotRuntime
) -> None:
    rex = await ready_subject(runtime, OWNER, "rex", "zqv")
    await ready_subject(runtime, OWNER, "mia", "bkt")

    await send_event(fake_slack, events_url, message_event_body("use rex", [], channel_type="im"))
    await fake_slack.wait_until(lambda: bool(fake_slack.find("chat.postEphemeral")))

    [reply] = fake_slack.find("chat.postEphemeral")
    assert reply.text.startswith("[V] now means rex")
    assert await runtime.store.chosen_subject_id(OWNER) == rex.id


async def test_use_of_a_subject_still_training_is_refused_the_slack_way(
    adapter: SlackAdapter, fake_slack: FakeSlack, events_url: str, runtime: BotRuntime
) -> None:
    await ready_subject(runtime, OWNER, "mia", "bkt")
    rex = await ready_subject(runtime, OWNER, "rex", "zqv")
    await runtime.store.update_subject(rex.id, status="queued")

    said = await send_command(fake_slack, events_url, "/dreambot", "use rex")

    assert said.text == (
        "rex is still queued; `/dreambot use rex` works once it is ready. [V] stays mia."
    )
    assert await runtime.store.chosen_subject_id(OWNER) is None


async def test_the_ready_message_tells_how_to_make_the_new_subject_v_on_slack(
    adapter: SlackAdapter, fake_slack: FakeSlack, runtime: BotRuntime
) -> None:
    await ready_subject(runtime, OWNER, "mia", "bkt")
    await runtime.core.use(OWNER, "mia")
    rex = await ready_subject(runtime, OWNER, "rex", "zqv")
    await runtime.store.update_subject(rex.id, status="training")
    job_id = "c" * 32
    await runtime.store.insert_job(job_id, "train", OWNER, DESTINATION, subject_id=rex.id)
    result = TrainResult(
        job_id=job_id,
        subject_id=rex.id,
        adapter_url="file:///adapters/rex.safetensors",
        sample_urls=[],
        steps=60,
        seconds=31.0,
    )

    await Deliverer(runtime.core, adapter).result(result.model_dump())

    [posted] = fake_slack.find("chat.postMessage")
    assert "rex is ready — try /imagine a [rex] dog on the beach" in posted.text
    assert posted.text.endswith("[V] is still mia; `/dreambot use rex` to draw rex as [V].")
