"""The Discord adapter against a fake Discord API, on the real core (SQLite + Redis)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import io
import itertools
import logging
import random
from typing import Any

import discord
import pytest
from arq.jobs import Job as ArqJob
from arq.worker import Retry
from PIL import Image

from bot.adapters.discord import BUTTON_ID, DiscordAdapter, EditThrottle
from bot.cli import cmd_discord
from bot.config import Settings
from bot.core.commands import NO_ENGINE_NOTE
from bot.core.delivery import Deliverer, Delivery
from bot.core.store import Job, Owner
from bot.launcher import BotRuntime
from engine.api import GenerateResult, Progress, TrainResult
from engine.images import encode_png, read_jpeg_metadata, read_png_metadata
from tests.adapters.conftest import (
    APP_ID,
    CHANNEL_ID,
    DM_CHANNEL_ID,
    EDIT_INTERVAL,
    GUILD_ID,
    MANAGE_GUILD,
    OTHER_USER_ID,
    UPLOAD_LIMIT,
    USER_ID,
    FakeClock,
    FakeDiscord,
    MiB,
    Recorded,
    add_boosted_guild,
    attachment_options,
    interaction_payload,
    start_adapter,
)
from tests.conftest import (
    RecordingSink,
    configure_second_model,
    engine_queue,
    make_photo,
    queued,
    queued_generate_request,
    queued_train_request,
    ready_subject,
    running_job,
    training_progress,
)

EPHEMERAL = 64
OWNER = Owner("discord", str(GUILD_ID), str(USER_ID))
DESTINATION = {
    "channel_id": CHANNEL_ID,
    "guild_id": GUILD_ID,
    "user_id": USER_ID,
    "age_restricted": False,
}


async def run_command(
    adapter: DiscordAdapter,
    command: str,
    options: list[dict[str, Any]] | None = None,
    resolved: dict[str, Any] | None = None,
) -> None:
    """Deliver a slash command the way the gateway would, through the command tree."""
    payload = interaction_payload(command=command, options=options, resolved=resolved)
    interaction = discord.Interaction(data=payload, state=adapter.client._connection)  # type: ignore[arg-type]
    await adapter.client.tree._call(interaction)


def private_reply(fake: FakeDiscord) -> Recorded:
    """The one ephemeral follow-up of the command, after an ephemeral defer."""
    callbacks = fake.find("POST", "/callback")
    assert len(callbacks) == 1
    assert callbacks[0].json["type"] == 5  # deferred: "dreambot is thinking…"
    assert callbacks[0].json["data"]["flags"] == EPHEMERAL
    followups = fake.find("POST", f"/webhooks/{APP_ID}/")
    assert len(followups) == 1
    assert followups[0].json["flags"] == EPHEMERAL
    assert fake.requests.index(callbacks[0]) < fake.requests.index(followups[0])
    return followups[0]


async def engine_queue_length(runtime: BotRuntime) -> int:
    return int(await queued(runtime.queue))


def progress_id(posted: Recorded) -> str:
    """The id the fake gave the message created by ``posted``."""
    assert posted.response_id is not None
    return posted.response_id


def serve_photos(fake: FakeDiscord, count: int) -> dict[str, str]:
    urls = {}
    for i in range(count):
        fake.cdn[f"p{i}.jpg"] = (make_photo(i), "image/jpeg")
        urls[f"photo{i + 1}"] = f"{fake.base}/cdn/p{i}.jpg"
    return urls


# Commands.


async def test_train_defers_downloads_queues_and_posts_one_progress_message(
    adapter: DiscordAdapter, fake_discord: FakeDiscord, runtime: BotRuntime
) -> None:
    options, resolved = attachment_options(serve_photos(fake_discord, 4))
    options = [
        {"name": "name", "type": 3, "value": "rex"},
        {"name": "class", "type": 3, "value": "dog"},
        *options,
    ]
    await run_command(adapter, "train", options, resolved)

    reply = private_reply(fake_discord)
    assert reply.content is not None
    assert reply.content.startswith("Training rex (dog) from 4 photos: queued (position 1)")
    assert len(fake_discord.find("GET", "/cdn/")) == 4
    [progress] = fake_discord.find("POST", f"/channels/{CHANNEL_ID}/messages")
    assert progress.content == f"<@{USER_ID}> · rex: waiting for the engine (position 1)"
    assert progress.json["allowed_mentions"]["parse"] == []
    assert await engine_queue_length(runtime) == 1
    [job] = await runtime.store.unfinished_jobs("discord")
    assert job.owner == OWNER
    assert adapter.progress_messages[job.id] == int(progress_id(progress))
    # The progress message's id is kept with the job, so a restarted bot still edits it.
    assert job.destination == {**DESTINATION, "progress_message_id": int(progress_id(progress))}


def train_options(fake: FakeDiscord, **extra: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """/train name:rex class:dog with three photos, and ``extra`` string options."""
    photos, resolved = attachment_options(serve_photos(fake, 3))
    given = {"name": "rex", "class": "dog", **extra}
    return [{"name": k, "type": 3, "value": v} for k, v in given.items()] + photos, resolved


async def test_train_with_a_model_queues_the_training_on_that_model(
    adapter: DiscordAdapter, fake_discord: FakeDiscord, runtime: BotRuntime
) -> None:
    configure_second_model(runtime.settings, "xl")
    await run_command(adapter, "train", *train_options(fake_discord, model="xl"))

    assert (private_reply(fake_discord).content or "").startswith("Training rex (dog)")
    assert (await queued_train_request(runtime)).base_model == "xl"


async def test_train_with_an_unknown_model_is_refused_and_queues_nothing(
    adapter: DiscordAdapter, fake_discord: FakeDiscord, runtime: BotRuntime
) -> None:
    await run_command(adapter, "train", *train_options(fake_discord, model="sdxl"))

    reply = private_reply(fake_discord).content or ""
    assert reply.startswith("There is no model called `sdxl`. Models: tiny")
    assert await engine_queue_length(runtime) == 0


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"p1.jpg": "image/jpeg", "p2.jpg": "image/jpeg"}, "You sent 2 photos"),
        (
            {"p1.jpg": "image/jpeg", "p2.jpg": "image/jpeg", "page.jpg": "text/html"},
            "`page.jpg` could not be read as an image",
        ),
    ],
)
async def test_train_with_bad_photos_is_answered_privately_and_queues_nothing(
    adapter: DiscordAdapter,
    fake_discord: FakeDiscord,
    runtime: BotRuntime,
    files: dict[str, str],
    expected: str,
) -> None:
    attachments = []
    for i, (name, content_type) in enumerate(files.items()):
        data = make_photo(i) if content_type.startswith("image/") else b"<html>hello</html>"
        fake_discord.cdn[name] = (data, content_type)
        attachments.append(
            discord.Attachment(
                data={
                    "id": str(i + 1),
                    "filename": name,
                    "size": len(data),
                    "url": f"{fake_discord.base}/cdn/{name}",
                    "proxy_url": f"{fake_discord.base}/cdn/{name}",
                },
                state=adapter.client._connection,
            )
        )
    payload = interaction_payload(command="train")
    interaction = discord.Interaction(data=payload, state=adapter.client._connection)  # type: ignore[arg-type]
    train = adapter.client.tree.get_command("train")
    assert isinstance(train, discord.app_commands.Command)
    extra = dict.fromkeys(("photo3",), None) if len(attachments) == 2 else {}
    photos = {f"photo{i + 1}": a for i, a in enumerate(attachments)}
    await train.callback(interaction, name="rex", class_noun="dog", **photos, **extra)  # type: ignore[call-arg]

    assert expected in (private_reply(fake_discord).content or "")
    assert not fake_discord.find("POST", "/channels/")
    assert await engine_queue_length(runtime) == 0
    assert await runtime.store.list_subjects(OWNER) == []


async def test_a_reply_after_the_interaction_token_expired_comes_by_dm(
    adapter: DiscordAdapter, fake_discord: FakeDiscord, runtime: BotRuntime
) -> None:
    # Downloads slow enough that the reply comes after Discord's 15 minutes: the follow-up
    # is refused (401, Invalid Webhook Token), so the user would never hear back.
    fake_discord.cdn_delay = 6 * 60
    await run_command(adapter, "train", *train_options(fake_discord))

    [refused] = fake_discord.find("POST", f"/webhooks/{APP_ID}/")
    assert refused.status == 401
    assert await engine_queue_length(runtime) == 1
    [dm] = fake_discord.find("POST", "/users/@me/channels")
    assert dm.json == {"recipient_id": USER_ID}
    [sent] = fake_discord.find("POST", f"/channels/{DM_CHANNEL_ID}/messages")
    assert sent.status == 200
    assert sent.content is not None
    assert sent.content.startswith("About your /train:\nTraining rex (dog) from 3 photos: queued")


async def test_train_from_a_foreign_host_is_refused_without_downloading(
    adapter: DiscordAdapter, fake_discord: FakeDiscord, runtime: BotRuntime
) -> None:
    urls = serve_photos(fake_discord, 3)
    urls["photo3"] = "https://example.com/p2.jpg"
    options, resolved = attachment_options(urls)
    options = [
        {"name": "name", "type": 3, "value": "rex"},
        {"name": "class", "type": 3, "value": "dog"},
        *options,
    ]
    await run_command(adapter, "train", options, resolved)

    assert "`p2.jpg` isn't a Discord attachment" in (private_reply(fake_discord).content or "")
    assert not fake_discord.find("GET", "/cdn/")
    assert await engine_queue_length(runtime) == 0


async def test_imagine_passes_its_options_to_the_core(
    adapter: DiscordAdapter, fake_discord: FakeDiscord, runtime: BotRuntime
) -> None:
    options = [
        {"name": "prompt", "type": 3, "value": "a red fox in snow"},
        {"name": "negative", "type": 3, "value": "blurry"},
        {"name": "count", "type": 4, "value": 2},
        {"name": "seed", "type": 4, "value": 42},
    ]
    await run_command(adapter, "imagine", options)

    reply = private_reply(fake_discord)
    # No engine runs in these tests: the reply says so (the job is queued all the same).
    assert reply.content == f"Drawing 2 images (seed 42): queued (position 1).\n{NO_ENGINE_NOTE}"
    [job] = await runtime.store.unfinished_jobs("discord")
    assert (job.kind, job.prompt, job.owner) == ("generate", "a red fox in snow", OWNER)
    request = (await ArqJob(job.id, runtime.queue, _queue_name=engine_queue(runtime)).info()).args[
        0
    ]  # type: ignore[union-attr]
    assert (request["count"], request["seed"], request["negative_prompt"]) == (2, 42, "blurry")
    [progress] = fake_discord.find("POST", f"/channels/{CHANNEL_ID}/messages")
    # Two images: the first progress line names them as the engine's updates will.
    assert "your images: waiting for the engine" in (progress.content or "")


@pytest.mark.parametrize(("count", "label"), [(1, "your image"), (3, "your images")])
async def test_an_image_jobs_progress_names_its_images_alike_from_the_first_line_on(
    adapter: DiscordAdapter,
    fake_discord: FakeDiscord,
    runtime: BotRuntime,
    clock: FakeClock,
    count: int,
    label: str,
) -> None:
    prompt = {"name": "prompt", "type": 3, "value": "a red fox"}
    await run_command(adapter, "imagine", [prompt, {"name": "count", "type": 4, "value": count}])
    [job] = await runtime.store.unfinished_jobs("discord")

    await Deliverer(runtime.core, adapter).progress(
        {"job_id": job.id, "phase": "generating", "step": 5, "total": 10}
    )
    await clock.advance(EDIT_INTERVAL)
    await fake_discord.wait_until(lambda: bool(fake_discord.find("PATCH")))

    [queued_line] = fake_discord.find("POST", f"/channels/{CHANNEL_ID}/messages")
    assert queued_line.content == f"<@{USER_ID}> · {label}: waiting for the engine (position 1)"
    [edit] = fake_discord.find("PATCH", "/channels/")
    assert edit.content == f"<@{USER_ID}> · {label}: drawing ████████░░░░░░░░ 5/10"


async def test_imagine_with_v_but_no_subject_is_answered_privately_and_queues_nothing(
    adapter: DiscordAdapter, fake_discord: FakeDiscord, runtime: BotRuntime
) -> None:
    await run_command(adapter, "imagine", [{"name": "prompt", "type": 3, "value": "a [V] dog"}])

    reply = private_reply(fake_discord)
    assert "[V]" in (reply.content or "")
    assert not fake_discord.find("POST", "/channels/")
    assert await engine_queue_length(runtime) == 0
    assert await runtime.store.unfinished_jobs("discord") == []


@pytest.mark.parametrize(
    ("command", "options", "expected"),
    [
        ("subjects", [], "You have no subjects yet"),
        ("forget", [{"name": "name", "type": 3, "value": "rex"}], "no subject called `rex`"),
        ("help", [], "/train name:<name> class:<class> photo1 … photo10"),
        ("quota", [], "images:    0 of 100"),
    ],
)
async def test_other_commands_are_answered_privately(
    adapter: DiscordAdapter,
    fake_discord: FakeDiscord,
    command: str,
    options: list[dict[str, Any]],
    expected: str,
) -> None:
    await run_command(adapter, command, options)

    assert expected in (private_reply(fake_discord).content or "")
    assert not fake_discord.find("POST", "/channels/")


async def test_an_unexpected_error_is_an_apology_with_a_reference(
    adapter: DiscordAdapter,
    fake_discord: FakeDiscord,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken(owner: Owner) -> str:
        raise RuntimeError("database on fire")

    monkeypatch.setattr(adapter.core, "subjects_text", broken)
    await run_command(adapter, "subjects")

    assert "something went wrong on my side (ref " in (private_reply(fake_discord).content or "")
    assert "database on fire" in caplog.text


async def test_commands_are_synced_to_the_dev_guild_when_one_is_set(
    runtime: BotRuntime, fake_discord: FakeDiscord, clock: FakeClock
) -> None:
    adapter = await start_adapter(runtime, clock, dev_guild=GUILD_ID)
    await adapter.close()
    [sync] = fake_discord.find("PUT", "/commands")
    assert sync.path == f"/api/v10/applications/{APP_ID}/guilds/{GUILD_ID}/commands"
    commands = {command["name"]: command for command in sync.json}
    assert set(commands) == {
        "train", "imagine", "showcase", "subjects", "use", "forget", "share", "unshare",
        "jobs", "cancel", "quota", "mydata", "help", "mod",
    }  # fmt: skip
    [delete] = commands["mydata"]["options"]
    assert (delete["name"], delete["type"], delete.get("required", False)) == ("delete", 5, False)
    cancel_options = commands["cancel"]["options"]
    assert [(o["name"], o.get("required", False)) for o in cancel_options] == [("target", False)]
    imagine_options = {o["name"]: o for o in commands["imagine"]["options"]}
    assert [c["value"] for c in imagine_options["aspect"]["choices"]] == [
        "square", "portrait", "landscape", "wide",
    ]  # fmt: skip
    assert {"steps", "guidance", "strength"} <= set(imagine_options)
    # Discord shows /mod only to members with Manage Server (the adapter checks regardless).
    assert int(commands["mod"]["default_member_permissions"]) == MANAGE_GUILD
    assert commands["mod"]["contexts"] == [0]  # guild only
    mod_options = {o["name"]: o for o in commands["mod"]["options"]}
    assert set(mod_options) == {
        "help", "block", "blocked", "model", "safety", "quota", "ban", "unban", "bans",
        "queue", "cancel", "subjects", "delete-subject", "delete-user-data", "log", "status",
    }  # fmt: skip
    assert [o["name"] for o in mod_options["block"]["options"]] == [
        "list", "add", "add-regex", "remove", "defaults", "reveal",
    ]  # fmt: skip
    assert [o["name"] for o in mod_options["quota"]["options"]] == ["show", "set", "reset", "list"]
    ban_options = {o["name"]: o for o in mod_options["ban"]["options"]}
    assert ban_options["user"]["type"] == 6 and ban_options["user"]["required"]
    assert ban_options["duration"]["type"] == 3
    train_options = [(o["name"], o.get("required", False)) for o in commands["train"]["options"]]
    assert train_options[:5] == [
        ("name", True),
        ("class", True),
        ("photo1", True),
        ("photo2", True),
        ("photo3", True),
    ]
    assert len(train_options) == 13 and not any(required for _, required in train_options[5:])
    assert train_options[-1] == ("model", False)
    assert commands["train"]["options"][-1]["autocomplete"]
    count = next(o for o in commands["imagine"]["options"] if o["name"] == "count")
    assert (count["min_value"], count["max_value"]) == (1, 4)


async def test_commands_are_synced_globally_without_a_dev_guild(
    adapter: DiscordAdapter, fake_discord: FakeDiscord
) -> None:
    [sync] = fake_discord.find("PUT", "/commands")
    assert sync.path == f"/api/v10/applications/{APP_ID}/commands"


# Buttons.


async def finished_generation(
    runtime: BotRuntime,
    seed: int = 7,
    prompt: str = "a red fox",
    count: int = 2,
    negative: str = "",
) -> str:
    receipt = await runtime.core.imagine(
        OWNER, DESTINATION, prompt, count=count, seed=seed, negative_prompt=negative
    )
    images = [f"{i}.png" for i in range(count)]
    result = {"job_id": receipt.job_id, "image_urls": images, "seed": seed}
    await runtime.store.update_job(receipt.job_id, status="done", result=result)
    await runtime.queue.delete(f"arq:job:{receipt.job_id}")
    await runtime.queue.zrem(engine_queue(runtime), receipt.job_id)
    return receipt.job_id


async def click(
    runtime: BotRuntime, fake: FakeDiscord, clock: FakeClock, custom_id: str, user_id: int
) -> Recorded:
    """A button click on a freshly started adapter (as after a restart); its private reply."""
    adapter = await start_adapter(runtime, clock)
    try:
        payload = interaction_payload(custom_id=custom_id, user_id=user_id)
        adapter.client._connection.parse_interaction_create(payload)  # type: ignore[arg-type]
        await fake.wait_until(lambda: bool(fake.find("POST", "/webhooks/")))
    finally:
        await adapter.close()
    return private_reply(fake)


# Vary keeps the seed and starts from the first image (img2img at a low strength).
@pytest.mark.parametrize(("action", "expected_seed"), [("reroll", None), ("vary", 7)])
async def test_a_button_click_after_a_restart_redraws_for_the_clicking_user(
    runtime: BotRuntime,
    fake_discord: FakeDiscord,
    clock: FakeClock,
    action: str,
    expected_seed: int | None,
) -> None:
    job_id = await finished_generation(runtime, seed=7)
    # A fresh client, as after a restart: nothing in memory but the registered dynamic items.
    adapter = await start_adapter(runtime, clock)
    try:
        custom_id = f"dreambot:{action}:{job_id}"
        assert BUTTON_ID.fullmatch(custom_id)
        payload = interaction_payload(custom_id=custom_id, user_id=OTHER_USER_ID)
        adapter.client._connection.parse_interaction_create(payload)  # type: ignore[arg-type]
        await fake_discord.wait_until(lambda: bool(fake_discord.find("POST", "/webhooks/")))
    finally:
        await adapter.close()

    reply = private_reply(fake_discord)
    drawing = "Drawing 2 images" if action == "reroll" else "Drawing 2 variations of image 1"
    assert (reply.content or "").startswith(drawing)
    clicker = Owner("discord", str(GUILD_ID), str(OTHER_USER_ID))
    [new_job] = [j for j in await runtime.store.unfinished_jobs("discord") if j.id != job_id]
    assert (new_job.owner, new_job.prompt) == (clicker, "a red fox")
    assert new_job.destination["user_id"] == OTHER_USER_ID
    request = (
        await ArqJob(new_job.id, runtime.queue, _queue_name=engine_queue(runtime)).info()
    ).args[0]  # type: ignore[union-attr]
    if expected_seed is None:
        assert f"(seed {request['seed']})" in (reply.content or "")
        assert request["init_image_url"] is None
    else:
        assert request["seed"] == expected_seed
        assert request["init_image_url"]


async def test_a_double_click_on_reroll_queues_one_job_and_points_the_second_at_it(
    runtime: BotRuntime, fake_discord: FakeDiscord, clock: FakeClock
) -> None:
    job_id = await finished_generation(runtime, seed=7)
    spent = (await runtime.store.usage(OWNER)).images
    adapter = await start_adapter(runtime, clock)
    try:
        # Two clicks of one button, a moment apart: two interactions (ids of their own).
        for _ in range(2):
            payload = interaction_payload(custom_id=f"dreambot:reroll:{job_id}", user_id=USER_ID)
            adapter.client._connection.parse_interaction_create(payload)  # type: ignore[arg-type]
        await fake_discord.wait_until(lambda: len(fake_discord.find("POST", "/webhooks/")) == 2)
    finally:
        await adapter.close()

    replies = sorted(r.content or "" for r in fake_discord.find("POST", "/webhooks/"))
    [new_job] = [j for j in await runtime.store.unfinished_jobs("discord") if j.id != job_id]
    assert replies[0].startswith("Drawing 2 images")
    assert replies[1].startswith("You already asked for Reroll of that result: job")
    assert new_job.id[:8] in replies[1]
    assert await engine_queue_length(runtime) == 1
    assert (await runtime.store.usage(OWNER)).images == spent + 2
    # One progress message, for the one job.
    assert len(fake_discord.find("POST", f"/channels/{CHANNEL_ID}/messages")) == 1


@pytest.mark.parametrize("what", ["command", "button"])
async def test_the_same_interaction_delivered_twice_runs_once_and_quietly(
    runtime: BotRuntime,
    fake_discord: FakeDiscord,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
    what: str,
) -> None:
    job_id = await finished_generation(runtime, seed=7)
    if what == "command":
        options = [{"name": "prompt", "type": 3, "value": "a red fox"}]
        payload = interaction_payload(command="imagine", options=options)
    else:
        payload = interaction_payload(custom_id=f"dreambot:reroll:{job_id}")
    adapter = await start_adapter(runtime, clock)
    try:
        with caplog.at_level(logging.ERROR):
            for _ in range(2):  # the gateway hands the bot one interaction twice
                state = adapter.client._connection
                if what == "command":
                    interaction = discord.Interaction(data=payload, state=state)  # type: ignore[arg-type]
                    await adapter.client.tree._call(interaction)
                else:
                    state.parse_interaction_create(payload)  # type: ignore[arg-type]
            await fake_discord.wait_until(
                lambda: (
                    len(fake_discord.find("POST", "/callback")) == 2
                    and bool(fake_discord.find("POST", "/webhooks/"))
                )
            )
            await asyncio.sleep(0.2)
    finally:
        await adapter.close()

    assert [c.status for c in fake_discord.find("POST", "/callback")] == [200, 400]
    assert len(fake_discord.find("POST", "/webhooks/")) == 1
    assert await engine_queue_length(runtime) == 1
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []  # no error


# The sink: progress, results, failures.


def make_job(job_id: str = "a" * 32, kind: str = "generate", **destination: Any) -> Job:
    return running_job(OWNER, {**DESTINATION, **destination}, job_id, kind)


async def test_progress_posts_one_message_then_edits_it_at_most_once_per_interval(
    adapter: DiscordAdapter, fake_discord: FakeDiscord, clock: FakeClock
) -> None:
    job = make_job()
    for step in range(1, 51):
        await adapter.show_progress(job, f"rex: training {step}/400", training_progress(step))

    [posted] = fake_discord.find("POST", "/channels/")
    assert posted.content == f"<@{USER_ID}> · rex: training 1/400"
    assert fake_discord.find("PATCH", "/channels/") == []  # 49 updates within the interval

    assert await clock.advance(EDIT_INTERVAL) == 1
    await fake_discord.wait_until(lambda: len(fake_discord.find("PATCH")) == 1)
    [edit] = fake_discord.find("PATCH", "/channels/")
    assert edit.path.endswith(
        f"/channels/{CHANNEL_ID}/messages/{adapter.progress_messages[job.id]}"
    )
    assert edit.content == f"<@{USER_ID}> · rex: training 50/400"  # the latest wins


async def test_a_ten_minute_job_edits_its_progress_under_the_promised_rate(
    adapter: DiscordAdapter, fake_discord: FakeDiscord, clock: FakeClock
) -> None:
    job = make_job()
    tick, minutes = 0.5, 10
    steps = int(minutes * 60 / tick)
    for step in range(1, steps + 1):
        edits_before = len(fake_discord.find("PATCH"))
        woken = await clock.advance(tick)
        if woken:
            await fake_discord.wait_until(
                lambda n=edits_before + woken: len(fake_discord.find("PATCH")) >= n  # type: ignore[misc]
            )
        await adapter.show_progress(job, f"training {step}/{steps}", training_progress(step, steps))
    await clock.advance(EDIT_INTERVAL)
    await fake_discord.wait_until(
        lambda: (fake_discord.find("PATCH") or [None])[-1].content.endswith(f"{steps}/{steps}")  # type: ignore[list-item,union-attr]
    )

    edits = fake_discord.find("PATCH", "/channels/")
    times = [edit.at for edit in edits]
    assert len(fake_discord.find("POST", "/channels/")) == 1
    assert len(edits) <= minutes * 60 / EDIT_INTERVAL + 1
    assert len(edits) >= minutes * 60 / EDIT_INTERVAL - 2  # and progress kept moving
    assert min(b - a for a, b in itertools.pairwise(times)) >= EDIT_INTERVAL


async def test_a_progress_edit_answered_429_lands_after_discords_retry_after(
    adapter: DiscordAdapter, fake_discord: FakeDiscord, clock: FakeClock
) -> None:
    # discord.py waits out Discord's 429s (per route, and its X-RateLimit headers ahead of
    # them); the adapter adds no budget of its own on Discord.
    job = make_job()
    await adapter.show_progress(job, "your image: drawing 1/10", training_progress(1))
    fake_discord.rate_limited_edits = 3
    await clock.advance(EDIT_INTERVAL)
    await adapter.show_progress(job, "your image: drawing 2/10", training_progress(2))

    edits = fake_discord.find("PATCH", f"/channels/{CHANNEL_ID}/messages/")
    assert [edit.status for edit in edits] == [429, 429, 429, 200]
    assert edits[-1].content == f"<@{USER_ID}> · your image: drawing 2/10"


async def test_throttle_keeps_keys_apart_and_forget_drops_the_pending_update() -> None:
    clock = FakeClock()
    sent: list[str] = []
    throttle = EditThrottle(3.0, clock=clock, sleep=clock.sleep)

    async def send(text: str) -> None:
        sent.append(text)

    await throttle.submit("a", lambda: send("a1"))
    await throttle.submit("b", lambda: send("b1"))
    await throttle.submit("a", lambda: send("a2"))
    throttle.forget("a")
    await clock.advance(5)
    await clock.advance(0)
    assert sent == ["a1", "b1"]


async def test_throttle_with_a_spacing_sends_all_keys_in_turn_the_latest_of_each() -> None:
    clock = FakeClock()
    sent: list[tuple[str, float]] = []
    throttle = EditThrottle(3.0, spacing=2.0, clock=clock, sleep=clock.sleep)

    async def send(text: str) -> None:
        sent.append((text, clock()))

    for key in "abc":
        await throttle.submit(key, lambda key=key: send(f"{key}1"))  # type: ignore[misc]
    await throttle.submit("b", lambda: send("b2"))
    for _ in range(6):
        await clock.advance(1)
    await clock.advance(0)
    # "a" goes at once; "b" and "c" wait for the next free slots, "b" with its latest update.
    assert sent == [("a1", 0.0), ("b2", 2.0), ("c1", 4.0)]


async def write_images(runtime: BotRuntime, count: int) -> list[str]:
    urls = []
    for i in range(count):
        url = runtime.core.artifacts.url("outputs", "job", f"{i}.png")
        await runtime.core.artifacts.aput_bytes(url, make_photo(i, fmt="PNG"))
        urls.append(url)
    return urls


async def test_a_result_is_a_channel_message_with_files_buttons_and_a_mention(
    adapter: DiscordAdapter, fake_discord: FakeDiscord, runtime: BotRuntime
) -> None:
    job = make_job()
    await adapter.show_progress(job, "your image: drawing", training_progress(1))
    urls = await write_images(runtime, 2)

    await adapter.show_result(Delivery(job, "“a red fox” · seed 7", urls))

    [_, result] = fake_discord.find("POST", f"/channels/{CHANNEL_ID}/messages")
    assert result.content == f"<@{USER_ID}> “a red fox” · seed 7"
    assert result.json["allowed_mentions"]["users"] == [USER_ID]
    assert [name for name, _ in result.files] == ["0.png", "1.png"]
    assert result.files[0][1] == make_photo(0, fmt="PNG")
    rows = [[b["custom_id"] for b in row["components"]] for row in result.json["components"]]
    assert rows == [
        [f"dreambot:reroll:{job.id}"],
        [f"dreambot:vary:{job.id}:0", f"dreambot:vary:{job.id}:1"],
        [f"dreambot:upscale:{job.id}:0", f"dreambot:upscale:{job.id}:1"],
    ]
    labels = [b["label"] for row in result.json["components"] for b in row["components"]]
    assert labels == ["Reroll", "V1", "V2", "U1", "U2"]
    [closing] = fake_discord.find("PATCH", "/channels/")
    assert "done" in (closing.content or "")
    assert job.id not in adapter.progress_messages


async def test_four_images_and_the_longest_prompt_stay_within_discords_message_limits(
    adapter: DiscordAdapter, fake_discord: FakeDiscord, runtime: BotRuntime
) -> None:
    prompt = "a" * runtime.settings.max_prompt_chars
    text = f"“{prompt}” · seed 4294967295 · 1024×1024 · 150 steps in 999.9s"
    await adapter.show_result(Delivery(make_job(), text, await write_images(runtime, 4)))

    [result] = fake_discord.posted(CHANNEL_ID)  # the fake refuses what Discord would
    assert result.content == f"<@{USER_ID}> {text}"
    rows = [[b["label"] for b in row["components"]] for row in result.json["components"]]
    assert rows == [["Reroll"], ["V1", "V2", "V3", "V4"], ["U1", "U2", "U3", "U4"]]


async def test_one_image_gets_plain_vary_and_upscale_buttons_and_a_showcase_none(
    adapter: DiscordAdapter, fake_discord: FakeDiscord, runtime: BotRuntime
) -> None:
    [url] = await write_images(runtime, 1)
    await adapter.show_result(Delivery(make_job(), "one", [url]))
    showcase = dataclasses.replace(make_job("b" * 32), options={"showcase": "rex"})
    await adapter.show_result(Delivery(showcase, "grid", [url]))

    single, grid = fake_discord.find("POST", f"/channels/{CHANNEL_ID}/messages")
    buttons = [b for row in single.json["components"] for b in row["components"]]
    assert [(b["label"], b["custom_id"]) for b in buttons] == [
        ("Reroll", f"dreambot:reroll:{'a' * 32}"),
        ("Vary", f"dreambot:vary:{'a' * 32}:0"),
        ("Upscale", f"dreambot:upscale:{'a' * 32}:0"),
    ]
    assert not grid.json.get("components")


async def test_live_previews_ride_on_throttled_edits_and_go_when_the_job_is_done(
    adapter: DiscordAdapter, fake_discord: FakeDiscord, runtime: BotRuntime, clock: FakeClock
) -> None:
    job = make_job()
    preview_url = runtime.core.artifacts.url("outputs", job.id, "previews", "003.jpg")
    await runtime.core.artifacts.aput_bytes(preview_url, b"jpeg bytes")
    drawing = Progress(job_id=job.id, phase="generating", step=2, total=10)
    await adapter.show_progress(job, "drawing 2/10", drawing)
    # A preview, then a plain update, within one interval: one edit, with both.
    with_preview = drawing.model_copy(update={"step": 3, "preview_url": preview_url})
    await adapter.show_progress(job, "drawing 3/10", with_preview)
    await adapter.show_progress(job, "drawing 4/10", drawing.model_copy(update={"step": 4}))
    assert fake_discord.find("PATCH") == []

    await clock.advance(EDIT_INTERVAL)
    await fake_discord.wait_until(lambda: len(fake_discord.find("PATCH")) == 1)
    [edit] = fake_discord.find("PATCH", "/channels/")
    assert edit.content == f"<@{USER_ID}> · drawing 4/10"
    assert edit.files == [("preview.jpg", b"jpeg bytes")]

    # The next edit keeps the shown preview (no new upload); the result removes it.
    await adapter.show_progress(job, "drawing 5/10", drawing.model_copy(update={"step": 5}))
    await clock.advance(EDIT_INTERVAL)
    await fake_discord.wait_until(lambda: len(fake_discord.find("PATCH")) == 2)
    assert fake_discord.find("PATCH")[1].files == []
    assert "attachments" not in (fake_discord.find("PATCH")[1].json or {})
    await adapter.show_result(Delivery(job, "done", await write_images(runtime, 1)))
    closing = fake_discord.find("PATCH")[-1]
    assert "done" in (closing.content or "") and closing.json["attachments"] == []


async def test_a_preview_at_the_step_just_reported_still_reaches_the_adapter(
    runtime: BotRuntime, sink: RecordingSink
) -> None:
    receipt = await runtime.core.imagine(OWNER, DESTINATION, "a red fox", count=1, seed=1)
    deliverer = Deliverer(runtime.core, sink)
    step = {"job_id": receipt.job_id, "phase": "generating", "step": 3, "total": 10}
    await deliverer.progress(step)
    await deliverer.progress({**step, "preview_url": "file:///p/003.jpg"})
    await deliverer.progress(step)  # out of order: older than the preview, dropped
    assert [p.preview_url for _, _, p in sink.progress] == [None, "file:///p/003.jpg"]


# Buttons posted before per-image buttons existed carry no index: the first image.
@pytest.mark.parametrize(("suffix", "start"), [(":1", "1.png"), ("", "0.png")])
async def test_a_per_image_vary_button_starts_from_that_image(
    runtime: BotRuntime, fake_discord: FakeDiscord, clock: FakeClock, suffix: str, start: str
) -> None:
    job_id = await finished_generation(runtime, seed=7, count=2)
    reply = await click(runtime, fake_discord, clock, f"dreambot:vary:{job_id}{suffix}", USER_ID)

    image = 2 if suffix else 1
    assert (reply.content or "").startswith(f"Drawing 2 variations of image {image} (seed 7)")
    [new_job] = [j for j in await runtime.store.unfinished_jobs("discord") if j.id != job_id]
    assert (await queued_generate_request(runtime, new_job.id))["init_image_url"] == start


async def test_a_training_result_with_many_samples_is_split_into_messages_of_ten(
    adapter: DiscordAdapter, fake_discord: FakeDiscord, runtime: BotRuntime
) -> None:
    urls = await write_images(runtime, 12)
    await adapter.show_result(Delivery(make_job(kind="train"), "rex is ready", urls))

    first, second = fake_discord.find("POST", f"/channels/{CHANNEL_ID}/messages")
    assert (len(first.files), len(second.files)) == (10, 2)
    assert first.content == f"<@{USER_ID}> rex is ready"
    assert "components" not in first.json or not first.json["components"]


@functools.cache
def noisy_png(side: int, seed: int = 0) -> bytes:
    """A square PNG of random pixels with the engine's provenance chunks: noise does not
    compress, so it weighs about 3 bytes a pixel."""
    pixels = random.Random(seed).randbytes(side * side * 3)
    image = Image.frombytes("RGB", (side, side), pixels)
    return encode_png(image, {"prompt": "a red fox", "seed": "7"}, watermark=False)


async def write_files(runtime: BotRuntime, contents: list[bytes]) -> list[str]:
    """Store ``contents`` as a result's outputs 0.png, 1.png, …; their URLs."""
    urls = []
    for i, data in enumerate(contents):
        url = runtime.core.artifacts.url("outputs", "job", f"{i}.png")
        await runtime.core.artifacts.aput_bytes(url, data)
        urls.append(url)
    return urls


def buttons_of(message: Recorded) -> list[str]:
    return [
        b["custom_id"] for row in message.json.get("components") or [] for b in row["components"]
    ]


@pytest.mark.parametrize("where", ["channel", "dm"])
async def test_images_over_the_upload_limit_together_are_split_over_messages(
    adapter: DiscordAdapter, fake_discord: FakeDiscord, runtime: BotRuntime, where: str
) -> None:
    images = [noisy_png(1200, seed) for seed in range(3)]
    assert all(4 * MiB < len(data) < 5 * MiB for data in images)  # 12.4 MiB in all
    if where == "dm":
        fake_discord.forbidden.add(CHANNEL_ID)  # DMs have the unboosted limit too
    job = make_job()

    await adapter.show_result(
        Delivery(job, "“a red fox” · seed 7", await write_files(runtime, images))
    )

    first, second = fake_discord.posted(DM_CHANNEL_ID if where == "dm" else CHANNEL_ID)
    assert [name for name, _ in first.files + second.files] == ["0.png", "1.png", "2.png"]
    assert [data for _, data in first.files + second.files] == images  # as stored, in order
    assert sum(len(data) for _, data in first.files) <= UPLOAD_LIMIT
    by_dm = f"I couldn't post in <#{CHANNEL_ID}>, so here it is:\n" if where == "dm" else ""
    assert first.content == f"{by_dm}<@{USER_ID}> “a red fox” · seed 7"
    assert second.content is None
    assert first.json["allowed_mentions"]["users"] == second.json["allowed_mentions"]["users"]
    assert buttons_of(first) == []
    assert f"dreambot:vary:{job.id}:2" in buttons_of(second)  # the buttons under the last


async def test_an_image_over_the_limit_on_its_own_arrives_as_a_jpeg_with_its_metadata(
    adapter: DiscordAdapter, fake_discord: FakeDiscord, runtime: BotRuntime
) -> None:
    grid = noisy_png(2048)
    assert len(grid) > UPLOAD_LIMIT  # 12.0 MiB
    showcase = dataclasses.replace(make_job(), options={"showcase": "rex"})

    await adapter.show_result(
        Delivery(showcase, "rex, five ways", await write_files(runtime, [grid]))
    )

    [sent] = fake_discord.posted(CHANNEL_ID)
    [(name, data)] = sent.files
    assert name == "0.jpg" and len(data) <= UPLOAD_LIMIT
    assert sent.content == (
        f"<@{USER_ID}> rex, five ways\n0.png was too large to upload here, so it is attached "
        "as a smaller JPEG; dreambot keeps the full-size original with its metadata."
    )
    with Image.open(io.BytesIO(data)) as image:
        assert (image.format, image.size) == ("JPEG", (2048, 2048))
        assert image.getexif()[0x010E] == "AI-generated image (dreambot)"  # ImageDescription
    assert read_jpeg_metadata(data) == read_png_metadata(grid)
    assert read_jpeg_metadata(data)["dreambot:prompt"] == "a red fox"


async def test_a_boosted_server_gets_its_larger_limit(
    adapter: DiscordAdapter, fake_discord: FakeDiscord, runtime: BotRuntime
) -> None:
    add_boosted_guild(adapter, tier=2)
    fake_discord.upload_limits[CHANNEL_ID] = 50 * MiB
    grid = noisy_png(2048)  # over the unboosted 10 MiB: kept as the PNG here

    urls = await write_files(runtime, [grid] * 5)
    await adapter.show_result(Delivery(make_job(kind="train"), "rex is ready", urls))

    first, second = fake_discord.posted(CHANNEL_ID)
    assert (len(first.files), len(second.files)) == (4, 1)  # 48 MiB, then 12
    assert all(data == grid for _, data in first.files + second.files)
    assert len(fake_discord.find("POST", "/channels/")) == 2  # nothing refused


async def test_a_413_anyway_is_tried_again_with_smaller_copies(
    adapter: DiscordAdapter, fake_discord: FakeDiscord, runtime: BotRuntime
) -> None:
    fake_discord.upload_limits[CHANNEL_ID] = 3 * MiB  # smaller than discord.py says
    image = noisy_png(1200)  # 4.1 MiB

    await adapter.show_result(Delivery(make_job(), "a fox", await write_files(runtime, [image])))

    attempts = fake_discord.find("POST", f"/channels/{CHANNEL_ID}/messages")
    assert [a.status for a in attempts] == [413, 413, 200]  # at 10 MiB, 5 MiB, 2.5 MiB
    [(name, data)] = attempts[-1].files
    assert name == "0.jpg" and len(data) <= 3 * MiB
    assert read_jpeg_metadata(data)["Comment"] == "AI-generated image (dreambot)"
    assert "0.png was too large to upload here" in (attempts[-1].content or "")
    assert buttons_of(attempts[-1])


async def test_a_channel_refusing_every_size_gets_the_text_with_a_note_not_a_retry(
    adapter: DiscordAdapter, fake_discord: FakeDiscord, runtime: BotRuntime
) -> None:
    fake_discord.upload_limits[CHANNEL_ID] = 0  # no file at all
    urls = await write_images(runtime, 2)
    job = make_job()

    await adapter.show_result(Delivery(job, "“a red fox” · seed 7", urls))  # does not raise

    attempts = fake_discord.find("POST", f"/channels/{CHANNEL_ID}/messages")
    assert [a.status for a in attempts] == [413] * 4 + [200]
    [sent] = fake_discord.posted(CHANNEL_ID)
    assert sent.files == []
    assert sent.content == (
        f"<@{USER_ID}> “a red fox” · seed 7\nThe 2 images were too large to upload here, "
        "so they are not attached; dreambot keeps the full-size originals."
    )
    assert f"dreambot:reroll:{job.id}" in buttons_of(sent)


async def test_other_discord_errors_still_propagate_for_the_delivery_to_retry(
    adapter: DiscordAdapter, fake_discord: FakeDiscord, runtime: BotRuntime
) -> None:
    fake_discord.unavailable.add(CHANNEL_ID)
    urls = await write_images(runtime, 1)

    with pytest.raises(discord.DiscordServerError):
        await adapter.show_result(Delivery(make_job(), "a fox", urls))
    assert len(fake_discord.find("POST", "/channels/")) == 1


async def a_training_result(runtime: BotRuntime, samples: int) -> dict[str, Any]:
    """A finished training of rex with ``samples`` sample images, as the engine sends it."""
    subject = await ready_subject(runtime, OWNER, "rex", "zqv")
    job_id = "c" * 32
    await runtime.store.insert_job(job_id, "train", OWNER, DESTINATION, subject_id=subject.id)
    return TrainResult(
        job_id=job_id,
        subject_id=subject.id,
        adapter_url="file:///adapters/rex.safetensors",
        sample_urls=await write_images(runtime, samples),
        steps=400,
        seconds=95.0,
    ).model_dump()


async def test_a_result_whose_second_message_failed_posts_only_the_rest_when_run_again(
    adapter: DiscordAdapter, fake_discord: FakeDiscord, runtime: BotRuntime
) -> None:
    result = await a_training_result(runtime, 21)  # three messages: 10, 10 and 1 files
    deliverer = Deliverer(runtime.core, adapter)
    fake_discord.unavailable_posts.add(2)

    with pytest.raises(Retry):
        await deliverer.result(result)
    await deliverer.result(result)  # arq's next try

    attempts = fake_discord.find("POST", f"/channels/{CHANNEL_ID}/messages")
    assert [a.status for a in attempts] == [200, 503, 200, 200]
    posted = fake_discord.posted(CHANNEL_ID)
    assert [len(message.files) for message in posted] == [10, 10, 1]
    names = [name for message in posted for name, _ in message.files]
    assert names == [f"{i}.png" for i in range(21)]  # each once, in order
    assert (posted[0].content or "").startswith(f"<@{USER_ID}> rex is ready")
    assert [message.content for message in posted[1:]] == [None, None]
    job = await runtime.store.get_job(result["job_id"])
    assert job is not None and job.delivered_at is not None


async def test_a_result_whose_last_message_failed_gets_its_buttons_when_run_again(
    adapter: DiscordAdapter, fake_discord: FakeDiscord, runtime: BotRuntime
) -> None:
    receipt = await runtime.core.imagine(OWNER, DESTINATION, "a red fox", count=3, seed=7)
    images = [noisy_png(1200, seed) for seed in range(3)]  # two messages: 2 images, then 1
    result = GenerateResult(
        job_id=receipt.job_id,
        image_urls=await write_files(runtime, images),
        seed=7,
        width=1200,
        height=1200,
        steps=25,
        seconds=3.0,
    ).model_dump()
    deliverer = Deliverer(runtime.core, adapter)
    fake_discord.unavailable_posts.add(2)

    with pytest.raises(Retry):
        await deliverer.result(result)
    await deliverer.result(result)

    first, last = fake_discord.posted(CHANNEL_ID)
    assert [name for name, _ in first.files + last.files] == ["0.png", "1.png", "2.png"]
    assert (first.content or "").startswith(f"<@{USER_ID}> “a red fox”")
    assert last.content is None
    assert buttons_of(first) == [] and f"dreambot:vary:{receipt.job_id}:2" in buttons_of(last)


@pytest.mark.parametrize("refusal", ["forbidden", "missing"])
async def test_a_result_goes_to_the_user_by_dm_when_the_channel_refuses_it(
    adapter: DiscordAdapter, fake_discord: FakeDiscord, runtime: BotRuntime, refusal: str
) -> None:
    getattr(fake_discord, refusal).add(CHANNEL_ID)
    urls = await write_images(runtime, 1)

    await adapter.show_result(Delivery(make_job(), "“a red fox” · seed 7", urls))

    [dm] = fake_discord.find("POST", "/users/@me/channels")
    assert dm.json == {"recipient_id": USER_ID}
    [sent] = fake_discord.find("POST", f"/channels/{DM_CHANNEL_ID}/messages")
    assert sent.content == (
        f"I couldn't post in <#{CHANNEL_ID}>, so here it is:\n<@{USER_ID}> “a red fox” · seed 7"
    )
    assert [name for name, _ in sent.files] == ["0.png"]


@pytest.mark.parametrize("refusal", ["forbidden", "missing"])
async def test_a_result_the_channel_refuses_midway_comes_by_dm_with_its_text(
    adapter: DiscordAdapter, fake_discord: FakeDiscord, runtime: BotRuntime, refusal: str
) -> None:
    result = await a_training_result(runtime, 21)  # three messages: 10, 10 and 1 files
    fake_discord.refuse_after[CHANNEL_ID] = (1, refusal)  # access lost, or channel deleted

    await Deliverer(runtime.core, adapter).result(result)

    [in_channel] = fake_discord.posted(CHANNEL_ID)
    first, second = fake_discord.posted(DM_CHANNEL_ID)
    names = [name for message in (in_channel, first, second) for name, _ in message.files]
    assert names == [f"{i}.png" for i in range(21)]  # each once, in order
    # The DM stands on its own: why it came, and what it is, above the rest of the images.
    assert (first.content or "").startswith(
        f"I couldn't post all of it in <#{CHANNEL_ID}>, so here is the rest:\n"
        f"<@{USER_ID}> rex is ready"
    )
    assert second.content is None
    job = await runtime.store.get_job(result["job_id"])
    assert job is not None and job.delivered_at is not None


async def test_a_dm_fallback_cut_off_midway_posts_only_its_rest_when_run_again(
    adapter: DiscordAdapter, fake_discord: FakeDiscord, runtime: BotRuntime
) -> None:
    result = await a_training_result(runtime, 21)
    deliverer = Deliverer(runtime.core, adapter)
    fake_discord.refuse_after[CHANNEL_ID] = (1, "forbidden")
    fake_discord.unavailable_posts.add(4)  # channel ✓, channel ✗, DM ✓, DM: Discord down

    with pytest.raises(Retry):
        await deliverer.result(result)
    await deliverer.result(result)  # the channel refuses again: the DM goes on

    attempts = fake_discord.find("POST", f"/channels/{DM_CHANNEL_ID}/messages")
    assert [a.status for a in attempts] == [200, 503, 200]
    first, second = fake_discord.posted(DM_CHANNEL_ID)
    assert [len(message.files) for message in (first, second)] == [10, 1]
    assert "so here is the rest" in (first.content or "")
    assert second.content is None  # the text went once


async def test_a_failure_the_channel_refuses_says_in_the_dm_why_it_came_there(
    adapter: DiscordAdapter, fake_discord: FakeDiscord
) -> None:
    fake_discord.missing.add(CHANNEL_ID)

    await adapter.show_failure(make_job(), "Training rex failed: no GPU")

    [sent] = fake_discord.posted(DM_CHANNEL_ID)
    assert sent.content == (
        f"I couldn't post in <#{CHANNEL_ID}>, so here it is:\n"
        f"<@{USER_ID}> ✗ Training rex failed: no GPU"
    )


SUPPRESS_EMBEDS = 1 << 2


async def test_a_prompt_with_markdown_a_link_or_pings_is_shown_as_typed_pinging_only_its_owner(
    adapter: DiscordAdapter, fake_discord: FakeDiscord, runtime: BotRuntime
) -> None:
    prompt = "[rex](https://evil.example) **big** __dog__ @everyone <@&999>"
    urls = await write_images(runtime, 1)

    await adapter.show_result(Delivery(make_job(), f"“{prompt}” · seed 7", urls))
    await adapter.show_failure(make_job("b" * 32), f"Your image could not be drawn: {prompt}")

    result, failure = fake_discord.posted(CHANNEL_ID)
    # No masked link, bold or underline: the markdown shows as the characters typed.
    shown = r"\[rex](https://evil.example) \*\*big\*\* \_\_dog\_\_ @everyone <@&999>"
    assert result.content == f"<@{USER_ID}> “{shown}” · seed 7"
    assert failure.content == f"<@{USER_ID}> ✗ Your image could not be drawn: {shown}"
    for message in (result, failure):
        assert message.pings == {str(USER_ID)}
        assert message.json["flags"] & SUPPRESS_EMBEDS  # no preview of the link


@pytest.mark.parametrize("name", ["*bold*", "<!channel>", "@everyone", "<@&999>", "a_b c"])
async def test_train_refuses_a_name_that_would_format_or_ping_and_its_reply_pings_nobody(
    adapter: DiscordAdapter, fake_discord: FakeDiscord, runtime: BotRuntime, name: str
) -> None:
    await run_command(adapter, "train", *train_options(fake_discord, name=name))

    reply = private_reply(fake_discord)
    assert (reply.content or "").startswith(f"`{name}` can't be a subject name")
    assert reply.pings == set()
    assert fake_discord.find("GET", "/cdn/") == []  # refused before the downloads
    assert await runtime.store.list_subjects(OWNER) == []
    assert await engine_queue_length(runtime) == 0


async def test_train_refuses_a_new_name_that_discord_would_underline_before_the_downloads(
    adapter: DiscordAdapter, fake_discord: FakeDiscord, runtime: BotRuntime
) -> None:
    await run_command(adapter, "train", *train_options(fake_discord, name="my__dog__2"))

    reply = private_reply(fake_discord).content or ""
    # In code spans, so that this very reply shows the name as typed.
    assert reply.startswith("`my__dog__2` can't be a subject name: two underscores in a row")
    assert fake_discord.find("GET", "/cdn/") == []
    assert await runtime.store.list_subjects(OWNER) == []


async def test_a_result_nobody_accepts_is_logged_not_lost_silently(
    adapter: DiscordAdapter, fake_discord: FakeDiscord, caplog: pytest.LogCaptureFixture
) -> None:
    fake_discord.forbidden |= {CHANNEL_ID, DM_CHANNEL_ID}
    with caplog.at_level(logging.ERROR, logger="bot.adapters.discord"):
        await adapter.show_failure(make_job(), "Your image could not be drawn: out of memory")

    [record] = caplog.records
    assert "could not be delivered" in record.getMessage()
    assert "out of memory" in record.getMessage()


async def test_a_failure_is_posted_in_the_channel_mentioning_the_user(
    adapter: DiscordAdapter, fake_discord: FakeDiscord
) -> None:
    await adapter.show_failure(make_job(), "Training rex failed: no GPU")

    [sent] = fake_discord.find("POST", f"/channels/{CHANNEL_ID}/messages")
    assert sent.content == f"<@{USER_ID}> ✗ Training rex failed: no GPU"
    assert sent.files == []


async def test_a_training_job_from_command_to_result_through_the_core_deliverer(
    adapter: DiscordAdapter, fake_discord: FakeDiscord, runtime: BotRuntime, clock: FakeClock
) -> None:
    await run_command(adapter, "train", *train_options(fake_discord))
    [job] = await runtime.store.unfinished_jobs("discord")
    deliverer = Deliverer(runtime.core, adapter)

    for step in (100, 200, 300):
        await deliverer.progress(
            {"job_id": job.id, "phase": "training", "step": step, "total": 400, "eta_seconds": 60}
        )
    await clock.advance(EDIT_INTERVAL)
    await fake_discord.wait_until(lambda: bool(fake_discord.find("PATCH")))
    [edit] = fake_discord.find("PATCH", "/channels/")
    assert edit.content is not None and "rex: training" in edit.content
    assert "300/400 · ETA 1:00" in edit.content

    samples = await write_images(runtime, 2)
    assert job.subject_id is not None
    await deliverer.result(
        {
            "job_id": job.id,
            "subject_id": job.subject_id,
            "adapter_url": "file:///nowhere/adapter.safetensors",
            "sample_urls": samples,
            "steps": 400,
            "seconds": 95.0,
        }
    )
    _, result = fake_discord.find("POST", f"/channels/{CHANNEL_ID}/messages")
    assert result.content is not None and result.content.startswith(f"<@{USER_ID}> rex is ready")
    assert len(result.files) == 2
    assert not result.json.get("components")  # no Reroll/Vary under training samples
    assert fake_discord.find("PATCH")[-1].path == edit.path  # the one progress message, closed


def test_dreambot_discord_without_a_token_exits_with_a_clear_message(
    settings: Settings,
) -> None:
    with pytest.raises(SystemExit, match="DREAMBOT_DISCORD_TOKEN"):
        cmd_discord(settings, argparse.Namespace())


async def test_imagine_in_a_channel_the_bot_cannot_write_to_still_queues_and_answers(
    adapter: DiscordAdapter, fake_discord: FakeDiscord, runtime: BotRuntime
) -> None:
    fake_discord.forbidden.add(CHANNEL_ID)
    await run_command(adapter, "imagine", [{"name": "prompt", "type": 3, "value": "a fox"}])

    assert "queued (position 1)" in (private_reply(fake_discord).content or "")
    [job] = await runtime.store.unfinished_jobs("discord")
    assert adapter.progress_messages[job.id] is None  # progress skipped; the result goes by DM
    await adapter.show_progress(job, "your image: drawing", training_progress(1))
    assert len(fake_discord.find("POST", "/channels/")) == 1 and not fake_discord.find("PATCH")


async def test_reroll_by_another_user_keeps_the_negative_prompt_and_count_and_charges_them(
    runtime: BotRuntime, fake_discord: FakeDiscord, clock: FakeClock
) -> None:
    job_id = await finished_generation(runtime, seed=7, count=3, negative="blurry, text")

    reply = await click(runtime, fake_discord, clock, f"dreambot:reroll:{job_id}", OTHER_USER_ID)

    assert (reply.content or "").startswith("Drawing 3 images")
    clicker = Owner("discord", str(GUILD_ID), str(OTHER_USER_ID))
    [new_job] = [j for j in await runtime.store.unfinished_jobs("discord") if j.id != job_id]
    assert new_job.owner == clicker
    request = await queued_generate_request(runtime, new_job.id)
    assert (request["prompt"], request["negative_prompt"], request["count"]) == (
        "a red fox",
        "blurry, text",
        3,
    )
    assert new_job.options["negative_prompt"] == "blurry, text"
    assert new_job.options["count"] == 3
    # The clicker pays: their quota, not the original owner's.
    assert (await runtime.store.usage(clicker)).images == 3
    assert (await runtime.store.usage(OWNER)).images == 3  # the original job only


async def test_another_user_cannot_reroll_an_image_of_someone_elses_subject(
    runtime: BotRuntime, fake_discord: FakeDiscord, clock: FakeClock
) -> None:
    await ready_subject(runtime, OWNER, "rex", "zqv")
    job_id = await finished_generation(runtime, prompt="a [V] on the beach")

    reply = await click(runtime, fake_discord, clock, f"dreambot:reroll:{job_id}", OTHER_USER_ID)

    assert (reply.content or "").startswith(f"Only <@{USER_ID}> can reroll these images")
    assert [j.id for j in await runtime.store.unfinished_jobs("discord")] == [job_id]
    assert await engine_queue_length(runtime) == 0
    assert not fake_discord.find("POST", "/channels/")


async def test_the_owner_can_vary_an_image_of_their_subject_even_after_training_another(
    runtime: BotRuntime, fake_discord: FakeDiscord, clock: FakeClock
) -> None:
    rex = await ready_subject(runtime, OWNER, "rex", "zqv")
    job_id = await finished_generation(runtime, seed=41, prompt="a [V] on the beach", count=1)
    await ready_subject(runtime, OWNER, "max", "kbj")  # now the newest: [V] would mean max

    reply = await click(runtime, fake_discord, clock, f"dreambot:vary:{job_id}", USER_ID)

    assert (reply.content or "").startswith("Drawing 1 variation of image 1 (seed 41)")
    [new_job] = [j for j in await runtime.store.unfinished_jobs("discord") if j.id != job_id]
    request = await queued_generate_request(runtime, new_job.id)
    assert request["prompt"] == "a zqv dog on the beach"  # still rex
    assert [a["name"] for a in request["adapters"]] == [rex.id]
    assert new_job.prompt == "a [rex] on the beach"


async def test_the_progress_message_is_edited_after_a_restart_not_posted_again(
    runtime: BotRuntime, fake_discord: FakeDiscord, clock: FakeClock
) -> None:
    first = await start_adapter(runtime, clock)
    try:
        await run_command(first, "imagine", [{"name": "prompt", "type": 3, "value": "a fox"}])
    finally:
        await first.close()
    [posted] = fake_discord.find("POST", f"/channels/{CHANNEL_ID}/messages")
    [job] = await runtime.store.unfinished_jobs("discord")
    assert job.destination["progress_message_id"] == int(progress_id(posted))

    # A new process: nothing in memory, only what the store kept.
    second = await start_adapter(runtime, clock)
    try:
        deliverer = Deliverer(runtime.core, second)
        await deliverer.progress({"job_id": job.id, "phase": "generating", "step": 5, "total": 25})
        [edit] = fake_discord.find("PATCH", "/channels/")
        assert edit.path.endswith(f"/channels/{CHANNEL_ID}/messages/{progress_id(posted)}")
        assert "your images: drawing" in (edit.content or "")  # four, by default
        assert len(fake_discord.find("POST", "/channels/")) == 1  # no second progress message

        images = await write_images(runtime, 1)
        await deliverer.result(
            {
                "job_id": job.id,
                "image_urls": images,
                "seed": 5,
                "width": 64,
                "height": 64,
                "steps": 25,
                "seconds": 1.0,
            }
        )
    finally:
        await second.close()
    _, result = fake_discord.find("POST", f"/channels/{CHANNEL_ID}/messages")
    assert len(result.files) == 1
    closing = fake_discord.find("PATCH", "/channels/")[-1]
    assert closing.path == edit.path and "done" in (closing.content or "")
