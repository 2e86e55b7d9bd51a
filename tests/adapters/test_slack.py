"""The Slack adapter against a fake Slack, on the real core (SQLite + Redis).

Requests reach the adapter the way Slack sends them in HTTP mode: signed, over HTTP, through
bolt's request handling. The adapter's Web API calls go to the fake (``slack_fake.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from arq.jobs import Job as ArqJob
from arq.worker import Retry
from pydantic import SecretStr, ValidationError
from slack_sdk.http_retry import builtin_async_handlers

from bot.adapters.options import parse_imagine
from bot.adapters.slack import (
    MAX_TEXT,
    SlackAdapter,
    SlackDownloader,
    build_adapter,
    cancel_button,
    escape,
    serve_http,
    web_client,
)
from bot.cli import cmd_slack
from bot.config import ConfigError, Settings
from bot.core.commands import NO_ENGINE_NOTE
from bot.core.delivery import Deliverer, Delivery
from bot.core.errors import UserError
from bot.core.store import Job, Owner
from bot.launcher import BotRuntime
from engine.api import GenerateResult, Progress, TrainResult
from engine.artifacts import local_path
from tests.adapters.conftest import FakeClock
from tests.adapters.slack_fake import (
    ADMIN_ID,
    BOT_TOKEN,
    BOT_USER_ID,
    CHANNEL_ID,
    DM_CHANNEL_ID,
    OTHER_USER_ID,
    TEAM_ID,
    USER_ID,
    Call,
    FakeSlack,
    action_body,
    command_body,
    message_event_body,
    signed,
)
from tests.conftest import (
    configure_second_model,
    engine_queue,
    make_photo,
    make_settings,
    queued,
    queued_train_request,
    ready_subject,
    running_job,
    training_progress,
)

EDIT_INTERVAL = 3.0
OWNER = Owner("slack", TEAM_ID, USER_ID)
DESTINATION = {"channel_id": CHANNEL_ID, "team_id": TEAM_ID, "user_id": USER_ID}


# Fixtures: the fake Slack, the adapter on the real core, and the adapter's HTTP endpoint.


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


@pytest.fixture
async def fake_slack(clock: FakeClock) -> AsyncIterator[FakeSlack]:
    """The fake Slack on a free local port."""
    fake = FakeSlack(clock=clock)
    runner, fake.base = await serve(fake.app())
    try:
        yield fake
    finally:
        await runner.cleanup()


def make_adapter(
    runtime: BotRuntime,
    fake_slack: FakeSlack,
    clock: FakeClock,
    *,
    artifacts_public_url: str | None = None,
) -> SlackAdapter:
    """The Slack adapter on the real core, talking to the fake, downloading only from it."""
    downloader = SlackDownloader(
        BOT_TOKEN,
        max_bytes=runtime.settings.max_photo_bytes,
        allowed_hosts={"127.0.0.1"},
        require_https=False,
        timeout=2.0,
    )
    return SlackAdapter(
        runtime.core,
        web_client(BOT_TOKEN, base_url=f"{fake_slack.base}/api/"),
        signing_secret="test-signing-secret",
        downloader=downloader,
        edit_interval=EDIT_INTERVAL,
        artifacts_public_url=artifacts_public_url,
        clock=clock,
        sleep=clock.sleep,
    )


@pytest.fixture
async def adapter(
    runtime: BotRuntime, fake_slack: FakeSlack, clock: FakeClock
) -> AsyncIterator[SlackAdapter]:
    """The Slack adapter as configured by default (a local artifact folder, no public URL)."""
    adapter = make_adapter(runtime, fake_slack, clock)
    try:
        yield adapter
    finally:
        await adapter.close()


@pytest.fixture
async def public_artifacts(runtime: BotRuntime) -> AsyncIterator[str]:
    """A web server in front of the artifact folder: the base URL it serves the files under."""
    folder = local_path(runtime.core.artifacts.base_url)
    assert folder is not None
    folder.mkdir(parents=True, exist_ok=True)
    app = web.Application()
    app.router.add_static("/artifacts", folder)
    runner, base = await serve(app)
    try:
        yield f"{base}/artifacts"
    finally:
        await runner.cleanup()


@pytest.fixture
async def events_url(adapter: SlackAdapter) -> AsyncIterator[str]:
    """The adapter's Request URL (HTTP mode)."""
    runner, base = await serve(adapter.web_app("/slack/events"))
    try:
        yield f"{base}/slack/events"
    finally:
        await runner.cleanup()


async def post(url: str, body: str, headers: dict[str, str]) -> tuple[int, str, float]:
    """POST to the app; the status, the body, and how long the answer took."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=body.encode(), headers=headers) as response:
            return response.status, await response.text(), loop.time() - started


async def send_command(
    fake: FakeSlack, url: str, command: str, text: str = "", *, user_id: str = USER_ID
) -> Call:
    """Send a signed slash command; check it is acked at once; return the private reply."""
    before = len(fake.find("respond"))
    body = command_body(fake, command, text, user_id=user_id)
    status, answer, _ = await post(url, body, signed(body))
    assert (status, answer) == (200, "")  # acked, with nothing shown in the channel
    await fake.wait_until(lambda: len(fake.find("respond")) > before)
    reply = fake.find("respond")[-1]
    assert reply.args["response_type"] == "ephemeral"
    return reply


async def send_event(fake: FakeSlack, url: str, body: str) -> None:
    status, _, _ = await post(url, body, signed(body, content_type="application/json"))
    assert status == 200


async def engine_queue_length(runtime: BotRuntime) -> int:
    return int(await queued(runtime.queue))


def serve_photos(fake: FakeSlack, count: int) -> list[dict[str, Any]]:
    for i in range(count):
        fake.files[f"p{i}.jpg"] = make_photo(i)
    return [fake.file_object(f"p{i}.jpg") for i in range(count)]


# Requests: signature, ack first.


async def test_a_request_with_a_bad_signature_is_refused_and_does_nothing(
    adapter: SlackAdapter, fake_slack: FakeSlack, events_url: str, runtime: BotRuntime
) -> None:
    body = command_body(fake_slack, "/imagine", "a red fox")
    status, _, _ = await post(events_url, body, signed(body, secret="not-the-secret"))

    assert status == 401
    await asyncio.sleep(0.1)
    assert fake_slack.calls == []
    assert await engine_queue_length(runtime) == 0


async def test_a_command_is_acked_within_the_request_before_its_work_is_done(
    adapter: SlackAdapter, fake_slack: FakeSlack, events_url: str
) -> None:
    fake_slack.users_info_gate = gate = asyncio.Event()  # the /mod check hangs until released
    body = command_body(fake_slack, "/mod", "bans", user_id=ADMIN_ID)

    status, answer, took = await post(events_url, body, signed(body))

    assert (status, answer) == (200, "")
    assert took < 3.0  # Slack's limit
    await fake_slack.wait_until(lambda: bool(fake_slack.find("users.info")))
    assert fake_slack.find("respond") == []  # the work is still waiting
    gate.set()
    await fake_slack.wait_until(lambda: bool(fake_slack.find("respond")))
    assert fake_slack.find("respond")[0].text == "Nobody is banned here."


# Commands.


async def test_imagine_queues_a_job_for_the_caller_with_its_options(
    adapter: SlackAdapter, fake_slack: FakeSlack, events_url: str, runtime: BotRuntime
) -> None:
    reply = await send_command(
        fake_slack, events_url, "/imagine", "a red fox &amp; a hen --count 2 —seed 42 --no “blurry”"
    )

    # No engine runs in these tests: the job waits, and the reply says why.
    assert reply.text == "Drawing 2 images (seed 42): queued (position 1).\n" + NO_ENGINE_NOTE
    [job] = await runtime.store.unfinished_jobs("slack")
    assert (job.kind, job.prompt, job.owner) == ("generate", "a red fox & a hen", OWNER)
    request = (await ArqJob(job.id, runtime.queue, _queue_name=engine_queue(runtime)).info()).args[
        0
    ]  # type: ignore[union-attr]
    assert (request["count"], request["seed"], request["negative_prompt"]) == (2, 42, "blurry")
    [progress] = fake_slack.find("chat.postMessage")
    assert progress.args["channel"] == CHANNEL_ID
    assert progress.text == f"<@{USER_ID}> · your images: waiting for the engine (position 1)"
    # The progress message's ts is kept with the job, so a restarted bot still updates it.
    assert job.destination == {**DESTINATION, "progress_ts": adapter.progress_messages[job.id]}


@pytest.mark.parametrize(("count", "label"), [(1, "your image"), (3, "your images")])
async def test_an_image_jobs_progress_names_its_images_alike_from_the_first_line_on(
    adapter: SlackAdapter,
    fake_slack: FakeSlack,
    events_url: str,
    runtime: BotRuntime,
    clock: FakeClock,
    count: int,
    label: str,
) -> None:
    await send_command(fake_slack, events_url, "/imagine", f"a red fox --count {count}")
    [job] = await runtime.store.unfinished_jobs("slack")

    await Deliverer(runtime.core, adapter).progress(
        {"job_id": job.id, "phase": "generating", "step": 5, "total": 10}
    )
    await clock.advance(EDIT_INTERVAL)
    await fake_slack.wait_until(lambda: bool(fake_slack.find("chat.update")))

    [queued_line] = fake_slack.find("chat.postMessage")
    assert queued_line.text == f"<@{USER_ID}> · {label}: waiting for the engine (position 1)"
    [update] = fake_slack.find("chat.update")
    assert update.text == f"<@{USER_ID}> · {label}: drawing ████████░░░░░░░░ 5/10"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a red fox --count 9", "count must be between 1 and 4."),
        ("a [V] dog on the beach", "subject"),
        ("--seed 3", "Usage: /imagine"),
        ("a fox --seed soon", "--count, --seed and --steps take whole numbers."),
    ],
)
async def test_imagine_user_errors_are_answered_privately_and_queue_nothing(
    adapter: SlackAdapter,
    fake_slack: FakeSlack,
    events_url: str,
    runtime: BotRuntime,
    text: str,
    expected: str,
) -> None:
    reply = await send_command(fake_slack, events_url, "/imagine", text)

    assert expected in reply.text
    assert await engine_queue_length(runtime) == 0
    assert await runtime.store.unfinished_jobs("slack") == []
    assert fake_slack.find("chat.postMessage") == []


async def test_dreambot_help_and_the_dreambot_prefix_reach_every_command(
    adapter: SlackAdapter, fake_slack: FakeSlack, events_url: str
) -> None:
    help_text = (await send_command(fake_slack, events_url, "/dreambot", "help")).text
    assert help_text.startswith("```\ndreambot teaches")
    assert "/train &lt;name&gt; &lt;class&gt;" in help_text  # escaped for Slack
    assert (await send_command(fake_slack, events_url, "/dreambot", "quota")).text == (
        await send_command(fake_slack, events_url, "/quota")
    ).text
    subjects = await send_command(fake_slack, events_url, "/dreambot", "subjects")
    assert subjects.text.startswith("You have no subjects yet")
    unknown = await send_command(fake_slack, events_url, "/dreambot", "dance")
    assert unknown.text == "I don't know `/dance`. Try `/dreambot help`."


async def test_mod_by_a_non_admin_is_refused_and_changes_nothing(
    adapter: SlackAdapter, fake_slack: FakeSlack, events_url: str, runtime: BotRuntime
) -> None:
    reply = await send_command(
        fake_slack, events_url, "/mod", f"ban <@{OTHER_USER_ID}|bob> spam", user_id=USER_ID
    )

    assert reply.text == "Only moderators can use /mod. Nothing was changed."
    [info] = fake_slack.find("users.info")
    assert info.args["user"] == USER_ID
    assert await runtime.store.active_ban(Owner("slack", TEAM_ID, OTHER_USER_ID)) is None
    assert await runtime.store.audit_entries("slack", TEAM_ID, 10) == []


async def test_mod_by_a_workspace_admin_works_and_is_audited(
    adapter: SlackAdapter, fake_slack: FakeSlack, events_url: str, runtime: BotRuntime
) -> None:
    reply = await send_command(
        fake_slack, events_url, "/mod", f"ban <@{OTHER_USER_ID}|bob> spam 7d", user_id=ADMIN_ID
    )

    assert reply.text.startswith(f"Banned {OTHER_USER_ID} until ")
    ban = await runtime.store.active_ban(Owner("slack", TEAM_ID, OTHER_USER_ID))
    assert ban is not None and ban.reason == "spam"
    [entry] = await runtime.store.audit_entries("slack", TEAM_ID, 10)
    assert (entry.moderator.user_id, entry.action, entry.target) == (
        ADMIN_ID,
        "ban",
        OTHER_USER_ID,
    )
    banned = await send_command(fake_slack, events_url, "/imagine", "a fox", user_id=OTHER_USER_ID)
    assert banned.text.startswith("You're banned from using dreambot here")


async def test_a_configured_moderator_needs_no_admin_lookup(
    adapter: SlackAdapter, fake_slack: FakeSlack, events_url: str, runtime: BotRuntime
) -> None:
    runtime.settings.moderator_users.append(USER_ID)
    reply = await send_command(fake_slack, events_url, "/mod", "help")

    assert reply.text.startswith("```\nModerator commands")
    assert fake_slack.find("users.info") == []


async def test_a_long_reply_is_split_over_responses_and_loses_no_line(
    adapter: SlackAdapter, fake_slack: FakeSlack, events_url: str, runtime: BotRuntime
) -> None:
    phrases = [f"forbidden phrase number {n} " + "x" * 60 for n in range(60)]
    for phrase in phrases:
        await runtime.store.add_blocked_rule("slack", TEAM_ID, "word", phrase, "1")

    body = command_body(fake_slack, "/mod", "block list", user_id=ADMIN_ID)
    status, _, _ = await post(events_url, body, signed(body))
    assert status == 200
    await fake_slack.wait_until(
        lambda: any(phrases[-1] in call.text for call in fake_slack.find("respond"))
    )

    replies = fake_slack.find("respond")
    assert 1 < len(replies) <= 5  # a response_url takes five messages
    assert all(len(reply.text) <= MAX_TEXT for reply in replies)
    whole = "\n".join(reply.text for reply in replies)
    assert all(f"“{phrase}”" in whole for phrase in phrases)


# Training: /train, then photos in a message; or photos with "@dreambot train …".


async def test_train_then_photos_in_the_channel_queue_a_training(
    adapter: SlackAdapter, fake_slack: FakeSlack, events_url: str, runtime: BotRuntime
) -> None:
    asked = await send_command(fake_slack, events_url, "/train", "rex dog")
    assert asked.text.startswith("Now post 3–10 photos of `rex` (dog) here, in one message")
    assert await engine_queue_length(runtime) == 0

    await send_event(fake_slack, events_url, message_event_body("", serve_photos(fake_slack, 4)))
    await fake_slack.wait_until(lambda: bool(fake_slack.find("chat.postEphemeral")))

    [reply] = fake_slack.find("chat.postEphemeral")
    assert (reply.args["channel"], reply.args["user"]) == (CHANNEL_ID, USER_ID)
    assert reply.text.startswith("Training rex (dog) from 4 photos: queued (position 1)")
    downloads = fake_slack.find("download")
    assert len(downloads) == 4
    assert {d.headers["Authorization"] for d in downloads} == {f"Bearer {BOT_TOKEN}"}
    [job] = await runtime.store.unfinished_jobs("slack")
    assert (job.kind, job.owner) == ("train", OWNER)
    [progress] = fake_slack.find("chat.postMessage")
    assert progress.text == f"<@{USER_ID}> · rex: waiting for the engine (position 1)"
    assert adapter.pending == {}  # the window is used up


async def test_a_train_window_outlives_a_bot_restart(
    adapter: SlackAdapter, fake_slack: FakeSlack, events_url: str, runtime: BotRuntime
) -> None:
    await send_command(fake_slack, events_url, "/train", "rex dog --model tiny")
    adapter.pending.clear()  # the bot restarted: what it held in memory is gone, Redis kept

    await send_event(fake_slack, events_url, message_event_body("", serve_photos(fake_slack, 3)))
    await fake_slack.wait_until(lambda: bool(fake_slack.find("chat.postEphemeral")))

    [reply] = fake_slack.find("chat.postEphemeral")
    assert reply.text.startswith("Training rex (dog) from 3 photos: queued")
    assert (await queued_train_request(runtime)).base_model == "tiny"
    # Used up: the next photos are someone's holiday pictures again.
    adapter.pending.clear()
    assert not await runtime.queue.keys("dreambot:slack:pending-train:*")


async def test_train_with_a_model_queues_the_training_on_that_model(
    adapter: SlackAdapter, fake_slack: FakeSlack, events_url: str, runtime: BotRuntime
) -> None:
    configure_second_model(runtime.settings, "xl")
    asked = await send_command(fake_slack, events_url, "/train", "rex dog --model XL")
    assert asked.text.startswith("Now post 3–10 photos of `rex` (dog) here")

    await send_event(fake_slack, events_url, message_event_body("", serve_photos(fake_slack, 3)))
    await fake_slack.wait_until(lambda: bool(fake_slack.find("chat.postEphemeral")))

    assert (await queued_train_request(runtime)).base_model == "xl"


async def test_train_with_an_unknown_model_is_refused_before_the_photos(
    adapter: SlackAdapter, fake_slack: FakeSlack, events_url: str, runtime: BotRuntime
) -> None:
    reply = await send_command(fake_slack, events_url, "/train", "rex dog --model sdxl")

    assert reply.text.startswith("There is no model called `sdxl`. Models: tiny")
    assert adapter.pending == {}


@pytest.mark.parametrize(
    ("text", "refusal"),
    [
        ("*rex* dog", "can't be a subject name"),
        ("V dog", "can't be a subject name"),
        ("my__dog dog", "two underscores in a row"),
        ("rex d0g!", "isn't a class"),
        ("rex nude", "That subject name or class isn't allowed here"),
    ],
)
async def test_train_with_a_name_or_class_the_core_refuses_is_refused_before_the_photos(
    adapter: SlackAdapter,
    fake_slack: FakeSlack,
    events_url: str,
    runtime: BotRuntime,
    text: str,
    refusal: str,
) -> None:
    reply = await send_command(fake_slack, events_url, "/train", text)

    assert refusal in reply.text and "Now post" not in reply.text
    assert adapter.pending == {}
    assert not await runtime.queue.keys("dreambot:slack:pending-train:*")


async def test_train_with_a_name_already_taken_is_refused_before_the_photos(
    adapter: SlackAdapter, fake_slack: FakeSlack, events_url: str, runtime: BotRuntime
) -> None:
    await ready_subject(runtime, OWNER, "rex", "zqv")

    reply = await send_command(fake_slack, events_url, "/dreambot", "train Rex dog")

    assert reply.text.startswith("You already have a subject called rex.")
    assert adapter.pending == {}
    assert not await runtime.queue.keys("dreambot:slack:pending-train:*")


async def test_train_at_the_daily_training_limit_is_refused_before_the_photos(
    adapter: SlackAdapter, fake_slack: FakeSlack, events_url: str, runtime: BotRuntime
) -> None:
    runtime.settings.quota_daily_trainings = 0

    reply = await send_command(fake_slack, events_url, "/train", "rex dog")

    assert reply.text.startswith("You've used all 0 of today's trainings.")
    assert adapter.pending == {}


async def test_photos_with_a_train_mention_and_a_taken_name_are_not_downloaded(
    adapter: SlackAdapter, fake_slack: FakeSlack, events_url: str, runtime: BotRuntime
) -> None:
    await ready_subject(runtime, OWNER, "rex", "zqv")
    text = f"<@{BOT_USER_ID}> train rex dog"

    await send_event(fake_slack, events_url, message_event_body(text, serve_photos(fake_slack, 3)))
    await fake_slack.wait_until(lambda: bool(fake_slack.find("chat.postEphemeral")))

    assert fake_slack.find("chat.postEphemeral")[0].text.startswith(
        "You already have a subject called rex."
    )
    assert fake_slack.find("download") == []


async def test_the_train_reply_shows_the_name_and_class_as_they_will_be_stored_not_as_mrkdwn(
    adapter: SlackAdapter, fake_slack: FakeSlack, events_url: str, runtime: BotRuntime
) -> None:
    asked = await send_command(fake_slack, events_url, "/train", "a-_b_ Toy  Car")

    # Slack's mrkdwn has no escape for _ * ~: a code span shows the name as typed.
    assert asked.text.startswith("Now post 3–10 photos of `a-_b_` (toy car) here")
    assert asked.text.endswith("send them to me in a DM with the text: `train a-_b_ toy car`)")
    await send_event(fake_slack, events_url, message_event_body("", serve_photos(fake_slack, 3)))
    await fake_slack.wait_until(lambda: bool(fake_slack.find("chat.postEphemeral")))
    assert fake_slack.find("chat.postEphemeral")[0].text.startswith(
        "Training a-_b_ (toy car) from 3 photos: queued"
    )


@pytest.mark.parametrize(
    ("text", "channel_type"),
    [(f"<@{BOT_USER_ID}> train rex toy car", "channel"), ("Train rex toy car", "im")],
)
async def test_photos_with_a_train_mention_queue_a_training_without_the_slash_command(
    adapter: SlackAdapter,
    fake_slack: FakeSlack,
    events_url: str,
    runtime: BotRuntime,
    text: str,
    channel_type: str,
) -> None:
    files = serve_photos(fake_slack, 2)
    fake_slack.files["p2.jpg"] = make_photo(2)
    files.append(fake_slack.file_object("p2.jpg", with_url=False))  # details via files.info

    body = message_event_body(text, files, channel_type=channel_type)
    await send_event(fake_slack, events_url, body)
    await fake_slack.wait_until(lambda: bool(fake_slack.find("chat.postEphemeral")))

    [reply] = fake_slack.find("chat.postEphemeral")
    assert reply.text.startswith("Training rex (toy car) from 3 photos")
    assert [call.args["file"] for call in fake_slack.find("files.info")] == ["p2.jpg"]
    [job] = await runtime.store.unfinished_jobs("slack")
    assert job.kind == "train"


async def test_photos_shared_for_people_are_left_alone(
    adapter: SlackAdapter, fake_slack: FakeSlack, events_url: str, clock: FakeClock
) -> None:
    files = serve_photos(fake_slack, 3)
    await send_event(fake_slack, events_url, message_event_body("holiday pics", files))
    # "train …" in a channel only counts when it mentions the bot.
    await send_event(fake_slack, events_url, message_event_body("train rex dog", files))
    # A /train window closes.
    await send_command(fake_slack, events_url, "/train", "rex dog")
    await clock.advance(601)
    await send_event(fake_slack, events_url, message_event_body("", files))
    await asyncio.sleep(0.2)

    assert fake_slack.find("download") == []
    assert fake_slack.find("chat.postEphemeral") == []


async def test_too_few_photos_are_answered_privately_and_queue_nothing(
    adapter: SlackAdapter, fake_slack: FakeSlack, events_url: str, runtime: BotRuntime
) -> None:
    text = f"<@{BOT_USER_ID}> train rex dog"
    await send_event(fake_slack, events_url, message_event_body(text, serve_photos(fake_slack, 2)))
    await fake_slack.wait_until(lambda: bool(fake_slack.find("chat.postEphemeral")))

    assert "You sent 2 photos" in fake_slack.find("chat.postEphemeral")[0].text
    assert await engine_queue_length(runtime) == 0
    assert await runtime.store.list_subjects(OWNER) == []


async def test_the_downloader_sends_the_token_only_to_allowed_hosts_and_caps_the_size(
    fake_slack: FakeSlack,
) -> None:
    fake_slack.files["big.jpg"] = b"x" * 5000
    fake_slack.files["ok.jpg"] = make_photo(1)
    url = fake_slack.file_object("ok.jpg")["url_private_download"]
    async with SlackDownloader(
        BOT_TOKEN, max_bytes=4096, allowed_hosts={"127.0.0.1"}, require_https=False
    ) as downloader:
        assert (await downloader.fetch(url, "ok.jpg")).data == make_photo(1)
        with pytest.raises(UserError, match="larger than"):
            await downloader.fetch(url.replace("ok.jpg", "big.jpg"), "big.jpg")
        with pytest.raises(UserError, match="isn't a file shared on Slack"):
            await downloader.fetch("https://example.com/files-pri/x/download", "x.jpg")
    assert [call.headers["Authorization"] for call in fake_slack.find("download")] == [
        f"Bearer {BOT_TOKEN}"
    ] * 2
    # In production only files.slack.com, and only over HTTPS.
    with pytest.raises(UserError, match="isn't a file shared on Slack"):
        SlackDownloader(BOT_TOKEN, max_bytes=4096).check_url(url, "ok.jpg")


# The Sink: progress, results, failures.


def make_job(job_id: str = "a" * 32, kind: str = "generate", **destination: Any) -> Job:
    return running_job(OWNER, {**DESTINATION, **destination}, job_id, kind)


async def test_progress_posts_one_message_then_updates_it_at_most_once_per_interval(
    adapter: SlackAdapter, fake_slack: FakeSlack, clock: FakeClock
) -> None:
    job = make_job()
    for step in range(1, 51):
        await adapter.show_progress(job, f"rex: training {step}/400", training_progress(step))

    [posted] = fake_slack.find("chat.postMessage")
    assert posted.text == f"<@{USER_ID}> · rex: training 1/400"
    assert fake_slack.find("chat.update") == []  # 49 updates within the interval

    assert await clock.advance(EDIT_INTERVAL) == 1
    await fake_slack.wait_until(lambda: len(fake_slack.find("chat.update")) == 1)
    [update] = fake_slack.find("chat.update")
    assert (update.args["channel"], update.args["ts"]) == (
        CHANNEL_ID,
        adapter.progress_messages[job.id],
    )
    assert update.text == f"<@{USER_ID}> · rex: training 50/400"  # the latest wins


async def test_a_ten_minute_job_updates_its_progress_under_the_promised_rate(
    adapter: SlackAdapter, fake_slack: FakeSlack, clock: FakeClock
) -> None:
    job = make_job()
    tick, minutes = 0.5, 10
    steps = int(minutes * 60 / tick)
    for step in range(1, steps + 1):
        updates_before = len(fake_slack.find("chat.update"))
        woken = await clock.advance(tick)
        if woken:
            await fake_slack.wait_until(
                lambda n=updates_before + woken: len(fake_slack.find("chat.update")) >= n  # type: ignore[misc]
            )
        await adapter.show_progress(job, f"training {step}/{steps}", training_progress(step, steps))

    updates = fake_slack.find("chat.update")
    times = [update.at for update in updates]
    assert len(fake_slack.find("chat.postMessage")) == 1
    assert len(updates) <= minutes * 60 / EDIT_INTERVAL + 1
    assert min(b - a for a, b in itertools.pairwise(times)) >= EDIT_INTERVAL


async def test_progress_of_many_jobs_together_stays_within_slacks_update_rate(
    adapter: SlackAdapter,
    fake_slack: FakeSlack,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The SDK waits out a 429 in real time, not on the fake clock: retrying at once shows
    # every refusal as it is.
    async def at_once(seconds: float) -> None:
        await asyncio.sleep(0)

    monkeypatch.setattr(builtin_async_handlers, "asyncio", SimpleNamespace(sleep=at_once))
    jobs = [make_job(f"{n:x}" * 32) for n in range(1, 5)]  # one user's three would do
    for second in range(1, 121):
        for job in jobs:
            await adapter.show_progress(job, f"drawing {second}/120", training_progress(second))
        await clock.advance(1)
        await asyncio.sleep(0.005)  # the woken updates reach the fake

    assert fake_slack.rate_limited == []
    assert "ratelimited" not in caplog.text
    updates = fake_slack.find("chat.update")
    per_minute = [
        sum(1 for u in updates if minute * 60 <= u.at < minute * 60 + 60) for minute in (0, 1)
    ]
    assert max(per_minute) <= 50
    # Each job still moves on: they share the rate, in turn.
    for job in jobs:
        ts = adapter.progress_messages[job.id]
        assert sum(1 for u in updates if u.args["ts"] == ts) >= 15


async def test_the_progress_message_is_updated_after_a_restart_not_posted_again(
    adapter: SlackAdapter, fake_slack: FakeSlack
) -> None:
    job = make_job(progress_ts="1699999999.000001")  # posted by the previous process
    await adapter.show_progress(job, "rex: training 9/400", training_progress(9))

    assert fake_slack.find("chat.postMessage") == []
    [update] = fake_slack.find("chat.update")
    assert update.args["ts"] == "1699999999.000001"


async def write_images(runtime: BotRuntime, count: int) -> list[str]:
    urls = []
    for i in range(count):
        url = runtime.core.artifacts.url("outputs", "job", f"{i}.png")
        await runtime.core.artifacts.aput_bytes(url, make_photo(i, fmt="PNG"))
        urls.append(url)
    return urls


async def test_a_result_uploads_its_images_mentioning_the_user_with_buttons(
    adapter: SlackAdapter, fake_slack: FakeSlack, runtime: BotRuntime
) -> None:
    job = make_job()
    await adapter.show_progress(job, "your image: drawing", training_progress(1))
    urls = await write_images(runtime, 2)

    await adapter.show_result(Delivery(job, "“a red fox <!channel>” · seed 7", urls))

    uploads = fake_slack.find("upload")
    assert [u.body for u in uploads] == [make_photo(0, fmt="PNG"), make_photo(1, fmt="PNG")]
    names = [c.args["filename"] for c in fake_slack.find("files.getUploadURLExternal")]
    assert names == ["0.png", "1.png"]
    [complete] = fake_slack.find("files.completeUploadExternal")
    assert complete.args["channel_id"] == CHANNEL_ID
    # The user is mentioned; what the user typed can't ping the channel.
    assert complete.args["initial_comment"] == f"<@{USER_ID}> “a red fox &lt;!channel&gt;” · seed 7"
    _, buttons = fake_slack.find("chat.postMessage")
    [block] = buttons.args["blocks"]
    assert [(e["action_id"], e["value"]) for e in block["elements"]] == [
        ("dreambot:reroll", job.id),
        ("dreambot:vary:0", job.id),
        ("dreambot:vary:1", job.id),
        ("dreambot:upscale:0", job.id),
        ("dreambot:upscale:1", job.id),
    ]
    assert [e["text"]["text"] for e in block["elements"]][1:] == ["🔀 V1", "🔀 V2", "⬆️ U1", "⬆️ U2"]
    [closing] = fake_slack.find("chat.update")
    assert "done" in closing.text
    assert job.id not in adapter.progress_messages


async def test_four_images_and_the_longest_prompt_stay_within_slacks_message_limits(
    adapter: SlackAdapter, fake_slack: FakeSlack, runtime: BotRuntime
) -> None:
    job = make_job()
    await adapter.show_progress(job, "your image: drawing", training_progress(1))
    prompt = "a" * runtime.settings.max_prompt_chars
    text = f"“{prompt}” · seed 4294967295 · 1024×1024 · 150 steps in 999.9s"
    await adapter.show_result(Delivery(job, text, await write_images(runtime, 4)))

    [complete] = fake_slack.find("files.completeUploadExternal")
    assert complete.args["initial_comment"] == f"<@{USER_ID}> {text}"
    _, buttons = fake_slack.find("chat.postMessage")  # the fake refuses what Slack would
    [block] = buttons.args["blocks"]
    labels = [e["text"]["text"] for e in block["elements"]]
    assert labels == ["🎲 Reroll"] + [f"🔀 V{n}" for n in range(1, 5)] + [
        f"⬆️ U{n}" for n in range(1, 5)
    ]
    [closing] = fake_slack.find("chat.update")
    assert "done" in closing.text


async def write_preview(runtime: BotRuntime, job: Job, step: int) -> str:
    """Store a live preview of the job as the engine does; its artifact URL."""
    url = runtime.core.artifacts.url("outputs", job.id, "previews", f"{step:03d}.jpg")
    await runtime.core.artifacts.aput_bytes(url, make_photo(step, (128, 128)))
    return url


async def show_a_preview_then_a_plain_update(
    adapter: SlackAdapter, runtime: BotRuntime, job: Job
) -> None:
    """Steps 2 (posts the message), 3 with a preview, 4 without: all within one interval."""
    drawing = Progress(job_id=job.id, phase="generating", step=2, total=10)
    await adapter.show_progress(job, "drawing 2/10", drawing)
    preview = await write_preview(runtime, job, 3)
    with_preview = drawing.model_copy(update={"step": 3, "preview_url": preview})
    await adapter.show_progress(job, "drawing 3/10", with_preview)
    await adapter.show_progress(job, "drawing 4/10", drawing.model_copy(update={"step": 4}))


async def update_number(fake: FakeSlack, clock: FakeClock, n: int) -> Call:
    """The ``n``-th update (counting from 1), once the fake clock has moved on far enough.

    A waiting update goes out an interval after the one before it was sent, once that one is
    answered; the clock moves an interval at a time until it has arrived.
    """
    while len(fake.find("chat.update")) < n:
        await clock.advance(EDIT_INTERVAL)
        with contextlib.suppress(TimeoutError):
            await fake.wait_until(lambda: len(fake.find("chat.update")) >= n, within=0.2)
    return fake.find("chat.update")[n - 1]


async def test_live_previews_ride_on_throttled_updates_from_the_public_url_and_go_with_the_result(
    runtime: BotRuntime, fake_slack: FakeSlack, clock: FakeClock, public_artifacts: str
) -> None:
    adapter = make_adapter(runtime, fake_slack, clock, artifacts_public_url=public_artifacts)
    try:
        job = make_job()
        await show_a_preview_then_a_plain_update(adapter, runtime, job)
        [posted] = fake_slack.find("chat.postMessage")
        assert [block["type"] for block in posted.args["blocks"]] == ["section", "actions"]
        assert fake_slack.find("chat.update") == []  # no call beyond the throttle's

        # One update, after the interval: the latest text, with the newest preview below it.
        await clock.advance(EDIT_INTERVAL)
        await fake_slack.wait_until(lambda: len(fake_slack.find("chat.update")) == 1)
        [update] = fake_slack.find("chat.update")
        public = f"{public_artifacts}/outputs/{job.id}/previews/003.jpg"
        assert update.text == f"<@{USER_ID}> · drawing 4/10"
        assert update.args["blocks"] == [
            {"type": "section", "text": {"type": "mrkdwn", "text": update.text}},
            {"type": "image", "image_url": public, "alt_text": "preview, step 3 of 10"},
            cancel_button(job.id),
        ]
        # Slack downloaded the preview from the public URL.
        await fake_slack.wait_until(lambda: len(fake_slack.images) == 1)
        assert fake_slack.images == [(public, make_photo(3, (128, 128)))]

        # An update replaces the message's blocks, so the next one shows the preview again.
        step = Progress(job_id=job.id, phase="generating", step=5, total=10)
        await adapter.show_progress(job, "drawing 5/10", step)
        again = await update_number(fake_slack, clock, 2)
        assert again.text == f"<@{USER_ID}> · drawing 5/10"
        assert [block["type"] for block in again.args["blocks"]] == ["section", "image", "actions"]
        assert again.args["blocks"][1]["image_url"] == public
        await fake_slack.wait_until(lambda: len(fake_slack.images) == 2)

        # The result is posted; the closing update removes the preview.
        await adapter.show_result(
            Delivery(job, "“a red fox” · seed 7", await write_images(runtime, 1))
        )
        closing = fake_slack.find("chat.update")[-1]
        assert "done" in closing.text
        assert closing.args["blocks"] == []
        assert len(fake_slack.find("chat.update")) == 3
    finally:
        await adapter.close()


async def test_without_a_public_url_progress_updates_carry_no_preview(
    adapter: SlackAdapter, fake_slack: FakeSlack, runtime: BotRuntime, clock: FakeClock
) -> None:
    job = make_job()
    await show_a_preview_then_a_plain_update(adapter, runtime, job)
    await clock.advance(EDIT_INTERVAL)
    await fake_slack.wait_until(lambda: len(fake_slack.find("chat.update")) == 1)
    await adapter.show_result(Delivery(job, "“a red fox” · seed 7", await write_images(runtime, 1)))

    update, closing = fake_slack.find("chat.update")
    assert update.text == f"<@{USER_ID}> · drawing 4/10"
    assert "done" in closing.text
    # A local artifact folder has no URL Slack could fetch: the text and the Cancel button.
    assert update.args["blocks"] == [
        {"type": "section", "text": {"type": "mrkdwn", "text": update.text}},
        cancel_button(job.id),
    ]
    assert closing.args["blocks"] == []
    assert fake_slack.images == []


async def test_a_preview_slack_cannot_download_is_dropped_and_the_progress_still_moves(
    runtime: BotRuntime,
    fake_slack: FakeSlack,
    clock: FakeClock,
    public_artifacts: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A public URL that serves nothing (a misconfigured CDN, say).
    wrong = f"{public_artifacts}/nothing-here"
    adapter = make_adapter(runtime, fake_slack, clock, artifacts_public_url=wrong)
    try:
        job = make_job()
        await show_a_preview_then_a_plain_update(adapter, runtime, job)
        await clock.advance(EDIT_INTERVAL)
        await fake_slack.wait_until(lambda: len(fake_slack.find("chat.update")) == 2)

        refused, update = fake_slack.find("chat.update")
        assert refused.args["blocks"][1]["image_url"].startswith(wrong)
        assert update.text == f"<@{USER_ID}> · drawing 4/10"
        assert update.args["blocks"] == [
            {"type": "section", "text": {"type": "mrkdwn", "text": update.text}},
            cancel_button(job.id),
        ]
        assert "Slack refused preview" in caplog.text
        # The job's later previews aren't tried again.
        newer = await write_preview(runtime, job, 5)
        step = Progress(job_id=job.id, phase="generating", step=5, total=10, preview_url=newer)
        await adapter.show_progress(job, "drawing 5/10", step)
        later = await update_number(fake_slack, clock, 3)
        assert later.text == f"<@{USER_ID}> · drawing 5/10"
        assert [block["type"] for block in later.args["blocks"]] == ["section", "actions"]
        assert fake_slack.images == []
    finally:
        await adapter.close()


async def test_a_training_result_with_many_samples_is_uploaded_in_batches_of_ten(
    adapter: SlackAdapter, fake_slack: FakeSlack, runtime: BotRuntime
) -> None:
    urls = await write_images(runtime, 12)
    await adapter.show_result(Delivery(make_job(kind="train"), "rex is ready", urls))

    first, second = fake_slack.find("files.completeUploadExternal")
    assert (len(first.args["files"].split('"id"')), len(second.args["files"].split('"id"'))) == (
        11,
        3,
    )
    assert first.args["initial_comment"] == f"<@{USER_ID}> rex is ready"
    assert "initial_comment" not in second.args
    assert fake_slack.find("chat.postMessage") == []  # no buttons under training samples


def uploaded_names(fake: FakeSlack) -> list[str]:
    """The names of the files whose upload Slack completed, in order."""
    return [
        file["title"]
        for call in fake.find("files.completeUploadExternal")
        if call not in fake.failed
        for file in json.loads(call.args["files"])
    ]


async def test_a_result_whose_second_upload_failed_posts_only_the_rest_when_run_again(
    adapter: SlackAdapter, fake_slack: FakeSlack, runtime: BotRuntime
) -> None:
    subject = await ready_subject(runtime, OWNER, "rex", "zqv")
    job_id = "c" * 32
    await runtime.store.insert_job(job_id, "train", OWNER, DESTINATION, subject_id=subject.id)
    result = TrainResult(
        job_id=job_id,
        subject_id=subject.id,
        adapter_url="file:///adapters/rex.safetensors",
        sample_urls=await write_images(runtime, 21),  # three uploads: 10, 10 and 1 files
        steps=400,
        seconds=95.0,
    ).model_dump()
    deliverer = Deliverer(runtime.core, adapter)
    fake_slack.failing_calls["files.completeUploadExternal"] = {2}

    with pytest.raises(Retry):
        await deliverer.result(result)
    await deliverer.result(result)  # arq's next try

    assert uploaded_names(fake_slack) == [f"{i}.png" for i in range(21)]  # each once, in order
    comments = [
        call.args.get("initial_comment")
        for call in fake_slack.find("files.completeUploadExternal")
        if call not in fake_slack.failed
    ]
    assert comments[0].startswith(f"<@{USER_ID}> rex is ready")
    assert comments[1:] == [None, None]
    job = await runtime.store.get_job(job_id)
    assert job is not None and job.delivered_at is not None


async def test_a_result_whose_buttons_failed_gets_only_its_buttons_when_run_again(
    adapter: SlackAdapter, fake_slack: FakeSlack, runtime: BotRuntime
) -> None:
    receipt = await runtime.core.imagine(OWNER, DESTINATION, "a red fox", count=2, seed=7)
    result = GenerateResult(
        job_id=receipt.job_id,
        image_urls=await write_images(runtime, 2),
        seed=7,
        width=64,
        height=64,
        steps=25,
        seconds=1.0,
    ).model_dump()
    deliverer = Deliverer(runtime.core, adapter)
    fake_slack.failing_calls["chat.postMessage"] = {1}  # the buttons under the images

    with pytest.raises(Retry):
        await deliverer.result(result)
    await deliverer.result(result)

    assert uploaded_names(fake_slack) == ["0.png", "1.png"]
    assert len(fake_slack.find("upload")) == 2
    _, buttons = fake_slack.find("chat.postMessage")
    assert buttons.args["blocks"][0]["block_id"] == f"dreambot:{receipt.job_id}"


async def test_a_result_goes_to_the_user_by_dm_when_the_channel_is_not_found(
    adapter: SlackAdapter, fake_slack: FakeSlack, runtime: BotRuntime
) -> None:
    fake_slack.missing.add(CHANNEL_ID)
    urls = await write_images(runtime, 1)

    await adapter.show_result(Delivery(make_job(), "“a red fox” · seed 7", urls))

    [opened] = fake_slack.find("conversations.open")
    assert opened.args["users"] == USER_ID
    refused, sent = fake_slack.find("files.completeUploadExternal")
    assert (refused.args["channel_id"], sent.args["channel_id"]) == (CHANNEL_ID, DM_CHANNEL_ID)
    assert sent.args["initial_comment"] == (
        f"I couldn't post in <#{CHANNEL_ID}>, so here it is:\n<@{USER_ID}> “a red fox” · seed 7"
    )
    [buttons] = fake_slack.find("chat.postMessage")
    assert buttons.args["channel"] == DM_CHANNEL_ID


@pytest.mark.parametrize("error", ["channel_not_found", "is_archived", "not_in_channel"])
async def test_a_result_the_channel_refuses_midway_comes_by_dm_with_its_text(
    adapter: SlackAdapter, fake_slack: FakeSlack, runtime: BotRuntime, error: str
) -> None:
    receipt = await runtime.core.imagine(OWNER, DESTINATION, "a red fox", count=1, seed=7)
    urls = await write_images(runtime, 12)  # two uploads (10 and 2), then the buttons
    job = await runtime.store.get_job(receipt.job_id)
    assert job is not None
    fake_slack.refuse_after[CHANNEL_ID] = (1, error)

    await adapter.show_result(Delivery(job, "“a red fox” · seed 7", urls))

    in_channel, refused, in_dm = fake_slack.find("files.completeUploadExternal")
    assert (in_channel.args["channel_id"], refused.args["channel_id"]) == (CHANNEL_ID, CHANNEL_ID)
    assert in_dm.args["channel_id"] == DM_CHANNEL_ID
    assert [file["title"] for file in json.loads(in_dm.args["files"])] == ["10.png", "11.png"]
    # The DM stands on its own: why it came, and what it is, above the rest of the images.
    assert in_dm.args["initial_comment"] == (
        f"I couldn't post all of it in <#{CHANNEL_ID}>, so here is the rest:\n"
        f"<@{USER_ID}> “a red fox” · seed 7"
    )
    [buttons] = fake_slack.find("chat.postMessage")
    assert buttons.args["channel"] == DM_CHANNEL_ID


async def test_a_result_whose_buttons_the_channel_refuses_comes_by_dm_with_its_text(
    adapter: SlackAdapter, fake_slack: FakeSlack, runtime: BotRuntime
) -> None:
    receipt = await runtime.core.imagine(OWNER, DESTINATION, "a red fox", count=1, seed=7)
    job = await runtime.store.get_job(receipt.job_id)
    assert job is not None
    fake_slack.refuse_after[CHANNEL_ID] = (1, "is_archived")  # the images, not the buttons

    await adapter.show_result(Delivery(job, "“a red fox” · seed 7", await write_images(runtime, 1)))

    refused, text, buttons = fake_slack.find("chat.postMessage")
    assert refused.args["channel"] == CHANNEL_ID
    assert (text.args["channel"], buttons.args["channel"]) == (DM_CHANNEL_ID, DM_CHANNEL_ID)
    assert text.text == (
        f"I couldn't post all of it in <#{CHANNEL_ID}>, so here is the rest:\n"
        f"<@{USER_ID}> “a red fox” · seed 7"
    )
    assert buttons.args["blocks"][0]["block_id"] == f"dreambot:{receipt.job_id}"
    assert len(fake_slack.find("files.completeUploadExternal")) == 1  # the image went once


async def test_a_failure_the_channel_refuses_says_in_the_dm_why_it_came_there(
    adapter: SlackAdapter, fake_slack: FakeSlack
) -> None:
    fake_slack.missing.add(CHANNEL_ID)

    await adapter.show_failure(make_job(), "Training rex failed: out of memory")

    _, sent = fake_slack.find("chat.postMessage")
    assert sent.args["channel"] == DM_CHANNEL_ID
    assert sent.text == (
        f"I couldn't post in <#{CHANNEL_ID}>, so here it is:\n"
        f"<@{USER_ID}> ✗ Training rex failed: out of memory"
    )


async def test_a_result_nobody_accepts_is_logged_not_lost_silently(
    adapter: SlackAdapter, fake_slack: FakeSlack, caplog: pytest.LogCaptureFixture
) -> None:
    fake_slack.missing |= {CHANNEL_ID, DM_CHANNEL_ID}
    with caplog.at_level(logging.ERROR, logger="bot.adapters.slack"):
        await adapter.show_failure(make_job(), "Your image could not be drawn: out of memory")

    [record] = caplog.records
    assert "could not be delivered" in record.getMessage()
    assert "out of memory" in record.getMessage()


async def test_a_failure_is_posted_in_the_channel_mentioning_the_user(
    adapter: SlackAdapter, fake_slack: FakeSlack
) -> None:
    await adapter.show_failure(make_job(), "Training rex failed: out of memory")

    [posted] = fake_slack.find("chat.postMessage")
    assert posted.text == f"<@{USER_ID}> ✗ Training rex failed: out of memory"


# Buttons.


async def test_reroll_by_another_user_queues_a_job_they_own(
    adapter: SlackAdapter, fake_slack: FakeSlack, events_url: str, runtime: BotRuntime
) -> None:
    await send_command(fake_slack, events_url, "/imagine", "a red fox --count 2")
    [original] = await runtime.store.unfinished_jobs("slack")
    body = action_body(fake_slack, "dreambot:reroll", original.id, user_id=OTHER_USER_ID)

    status, answer, _ = await post(events_url, body, signed(body))
    assert (status, answer) == (200, "")
    await fake_slack.wait_until(lambda: len(fake_slack.find("respond")) == 2)

    reply = fake_slack.find("respond")[-1]
    assert reply.args["replace_original"] is False
    assert reply.text.startswith("Drawing 2 images")
    rerolled = [j for j in await runtime.store.unfinished_jobs("slack") if j.id != original.id]
    assert [j.owner for j in rerolled] == [Owner("slack", TEAM_ID, OTHER_USER_ID)]


# Buttons posted before per-image buttons existed carry no index: the first image.
@pytest.mark.parametrize(("action_id", "start"), [("dreambot:vary:1", 1), ("dreambot:vary", 0)])
async def test_a_per_image_vary_button_starts_from_that_image(
    adapter: SlackAdapter,
    fake_slack: FakeSlack,
    events_url: str,
    runtime: BotRuntime,
    action_id: str,
    start: int,
) -> None:
    await send_command(fake_slack, events_url, "/imagine", "a red fox --count 2 --seed 7")
    [original] = await runtime.store.unfinished_jobs("slack")
    images = await write_images(runtime, 2)
    result = {"job_id": original.id, "image_urls": images, "seed": 7}
    await runtime.store.update_job(original.id, status="done", result=result)
    body = action_body(fake_slack, action_id, original.id)

    status, _, _ = await post(events_url, body, signed(body))
    assert status == 200
    await fake_slack.wait_until(lambda: len(fake_slack.find("respond")) == 2)

    assert fake_slack.find("respond")[-1].text.startswith(
        f"Drawing 2 variations of image {start + 1} (seed 7)"
    )
    [varied] = [j for j in await runtime.store.unfinished_jobs("slack") if j.id != original.id]
    request = (
        await ArqJob(varied.id, runtime.queue, _queue_name=engine_queue(runtime)).info()
    ).args[0]  # type: ignore[union-attr]
    assert request["init_image_url"] == images[start]


async def test_a_double_click_on_reroll_queues_one_job_and_points_the_second_at_it(
    adapter: SlackAdapter, fake_slack: FakeSlack, events_url: str, runtime: BotRuntime
) -> None:
    await send_command(fake_slack, events_url, "/imagine", "a red fox --count 2")
    [original] = await runtime.store.unfinished_jobs("slack")
    await runtime.store.update_job(original.id, status="done")
    spent = (await runtime.store.usage(OWNER)).images
    clicks = [action_body(fake_slack, "dreambot:reroll", original.id) for _ in range(2)]

    answers = await asyncio.gather(*(post(events_url, body, signed(body)) for body in clicks))
    assert [(status, text) for status, text, _ in answers] == [(200, ""), (200, "")]
    await fake_slack.wait_until(lambda: len(fake_slack.find("respond")) == 3)

    replies = sorted(call.text for call in fake_slack.find("respond")[1:])
    [new_job] = [j for j in await runtime.store.unfinished_jobs("slack") if j.id != original.id]
    assert replies[0].startswith("Drawing 2 images")
    assert replies[1].startswith("You already asked for Reroll of that result: job")
    assert new_job.id[:8] in replies[1]
    assert (await runtime.store.usage(OWNER)).images == spent + 2


async def test_a_message_command_slack_sends_again_is_run_once(
    adapter: SlackAdapter, fake_slack: FakeSlack, events_url: str, runtime: BotRuntime
) -> None:
    body = message_event_body("imagine a red fox --count 1", [], channel_type="im")
    await send_event(fake_slack, events_url, body)
    await fake_slack.wait_until(lambda: bool(fake_slack.find("chat.postEphemeral")))

    # Slack sends an event again, with its event id, when our answer seemed too slow.
    headers = {**signed(body, content_type="application/json"), "X-Slack-Retry-Num": "1"}
    headers["X-Slack-Retry-Reason"] = "http_timeout"
    status, _, _ = await post(events_url, body, headers)
    assert status == 200
    await asyncio.sleep(0.3)

    assert len(fake_slack.find("chat.postEphemeral")) == 1
    assert len(await runtime.store.unfinished_jobs("slack")) == 1
    assert (await runtime.store.usage(OWNER)).images == 1


async def test_a_showcase_result_gets_no_buttons(
    adapter: SlackAdapter, fake_slack: FakeSlack, runtime: BotRuntime
) -> None:
    showcase = dataclasses.replace(make_job(), options={"showcase": "rex"})
    await adapter.show_result(Delivery(showcase, "grid", await write_images(runtime, 1)))
    assert fake_slack.find("chat.postMessage") == []


# Text, configuration.


def test_imagine_options_survive_slacks_smart_punctuation() -> None:
    args = parse_imagine("a fox —count 3 –seed=9 --no “blurry, dark” --aspect Wide in snow")
    assert (args.prompt, args.count, args.seed) == ("a fox in snow", 3, 9)
    assert (args.negative, args.aspect) == ("blurry, dark", "wide")


def test_escape_keeps_user_mentions_and_defuses_everything_else() -> None:
    assert escape("<@U1> & <@W2|bob> <!here> <https://x|y>") == (
        "<@U1> &amp; <@W2|bob> &lt;!here&gt; &lt;https://x|y&gt;"
    )


def test_dreambot_slack_without_a_token_exits_with_a_clear_message(settings: Settings) -> None:
    with pytest.raises(SystemExit, match="DREAMBOT_SLACK_BOT_TOKEN"):
        cmd_slack(settings, argparse.Namespace())


def test_dreambot_slack_needs_a_signing_secret_or_an_app_token(settings: Settings) -> None:
    with_token = settings.model_copy(update={"slack_bot_token": SecretStr("xoxb-1")})
    with pytest.raises(SystemExit, match="DREAMBOT_SLACK_SIGNING_SECRET"):
        cmd_slack(with_token, argparse.Namespace())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_http_mode_serves_signed_requests_at_the_configured_path(
    adapter: SlackAdapter, fake_slack: FakeSlack
) -> None:
    port = free_port()
    server = asyncio.create_task(serve_http(adapter, "127.0.0.1", port, "/hooks/slack"))
    try:
        body = command_body(fake_slack, "/quota")
        url = f"http://127.0.0.1:{port}"
        for _ in range(50):  # until it listens
            try:
                status, _, _ = await post(f"{url}/hooks/slack", body, signed(body, secret="x"))
                break
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.05)
        assert status == 401
        status, _, _ = await post(f"{url}/slack/events", body, signed(body))
        assert status == 404
    finally:
        server.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await server


async def test_socket_mode_needs_no_signing_secret_and_http_mode_does(
    runtime: BotRuntime,
) -> None:
    socket_mode = runtime.settings.model_copy(
        update={"slack_bot_token": SecretStr("xoxb-1"), "slack_app_token": SecretStr("xapp-1")}
    )
    adapter = build_adapter(runtime.core, socket_mode)
    await adapter.close()
    http_mode = socket_mode.model_copy(update={"slack_app_token": None})
    with pytest.raises(ConfigError, match="DREAMBOT_SLACK_SIGNING_SECRET"):
        build_adapter(runtime.core, http_mode)


async def test_the_public_artifacts_url_is_configured_for_the_adapter(
    runtime: BotRuntime, tmp_path: Path
) -> None:
    configured = make_settings(
        tmp_path,
        runtime.settings.redis_url,
        slack_bot_token="xoxb-1",
        slack_app_token="xapp-1",
        artifacts_public_url="https://cdn.example.com/dreambot/",
    )
    adapter = build_adapter(runtime.core, configured)
    await adapter.close()
    assert adapter.artifacts_public_url == "https://cdn.example.com/dreambot"
    assert adapter.shows_previews
    unset = build_adapter(
        runtime.core, configured.model_copy(update={"artifacts_public_url": None})
    )
    await unset.close()
    assert not unset.shows_previews  # a local folder can't sign URLs either
    for wrong in ("cdn.example.com", "ftp://cdn.example.com", "https://cdn.example.com/?a=1"):
        with pytest.raises(ValidationError, match="artifacts_public_url"):
            make_settings(tmp_path, runtime.settings.redis_url, artifacts_public_url=wrong)
