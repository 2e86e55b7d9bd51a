"""/cancel and /jobs in the core: users cancel and list their own jobs (real SQLite, real Redis)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from arq.constants import abort_jobs_ss, in_progress_key_prefix, job_key_prefix

from bot.adapters.slack import SYNTAX as SLACK_SYNTAX
from bot.core.delivery import Deliverer
from bot.core.errors import UserError
from bot.core.store import Owner
from bot.launcher import BotRuntime
from engine.api import (
    EngineHeartbeat,
    EngineJob,
    Failure,
    GenerateResult,
    bot_queue,
    cancel_key,
)
from engine.artifacts import local_path
from engine.worker import write_heartbeat
from tests.conftest import TEST_PLATFORM, RecordingSink, engine_queue, ready_subject
from tests.test_commands import _photos

DEST = {"channel": "c1"}


def other_user(owner: Owner) -> Owner:
    return Owner(owner.platform, owner.workspace, "user-2")


async def notices(runtime: BotRuntime) -> list[Any]:
    """What waits on the bot's own queue for the channel (cancellation notices)."""
    return list(await runtime.queue.zrange(bot_queue(TEST_PLATFORM), 0, -1))


async def test_cancel_alone_takes_the_newest_job_out_of_the_queue_and_gives_its_units_back(
    runtime: BotRuntime, owner: Owner
) -> None:
    first = await runtime.core.imagine(owner, DEST, "a cat", count=1)
    newest = await runtime.core.imagine(owner, DEST, "a red fox on the moon", count=3)
    assert (await runtime.store.usage(owner)).images == 4

    cancellation = await runtime.core.cancel(owner)

    assert cancellation.job.id == newest.job_id
    assert cancellation.text == (
        f"Cancelled your images “a red fox on the moon” (job {newest.job_id[:8]}): taken out of "
        "the queue. What it took from your quota is given back."
    )
    assert await runtime.queue.zrange(engine_queue(runtime), 0, -1) == [first.job_id.encode()]
    assert not await runtime.queue.exists(job_key_prefix + newest.job_id)  # no worker runs it
    job = await runtime.store.get_job(newest.job_id)
    assert job is not None and job.status == "cancelled"
    usage = await runtime.store.usage(owner)
    assert (usage.images, usage.active_jobs) == (1, 1)
    # The owner cancelled it themselves: nothing is posted about it later (the adapter
    # closes the progress message), so no notice waits for the channel.
    assert job.delivered_at is not None
    assert await notices(runtime) == []


async def test_cancel_by_subject_name_stops_its_training_and_the_name_can_be_trained_again(
    runtime: BotRuntime, owner: Owner
) -> None:
    training = await runtime.core.train(owner, DEST, "rex", "dog", _photos(3))
    image = await runtime.core.imagine(owner, DEST, "a cat", count=1)  # newer, left alone
    old = await runtime.store.find_subject(owner, "rex")
    assert old is not None

    cancellation = await runtime.core.cancel(owner, "REX")

    assert cancellation.job.id == training.job_id
    assert cancellation.text == (
        f"Cancelled your training of rex (job {training.job_id[:8]}): taken out of the queue. "
        "What it took from your quota is given back. rex stays in your subjects as failed: "
        "`/train rex` again (with other photos or another class) replaces it, or "
        "`/forget rex` deletes it."
    )
    assert await runtime.queue.zcard(engine_queue(runtime, "train")) == 0
    assert await runtime.queue.zrange(engine_queue(runtime), 0, -1) == [image.job_id.encode()]
    assert (await runtime.store.usage(owner)).trainings == 0
    subject = await runtime.store.find_subject(owner, "rex")
    assert subject is not None and subject.status == "failed"
    assert "rex: dog, failed (You cancelled your training of rex.)" in (
        await runtime.core.subjects_text(owner)
    )

    # Training the name again replaces the failed subject, photos and all.
    again = await runtime.core.train(owner, DEST, "rex", "cat", _photos(3))
    [replacement] = await runtime.store.list_subjects(owner)
    assert (replacement.name, replacement.class_noun, replacement.status) == (
        "rex",
        "cat",
        "queued",
    )
    assert replacement.id != old.id
    old_photos = local_path(old.photos_url)
    assert old_photos is not None and not old_photos.exists()
    assert await runtime.queue.zrange(engine_queue(runtime, "train"), 0, -1) == [
        again.job_id.encode()
    ]


async def test_a_subject_that_is_not_failed_still_keeps_its_name(
    runtime: BotRuntime, owner: Owner
) -> None:
    await ready_subject(runtime, owner, "max", "zqv")
    with pytest.raises(UserError, match="You already have a subject called max"):
        await runtime.core.train(owner, DEST, "max", "dog", _photos(3))


async def test_cancel_by_the_start_of_a_job_id_picks_that_job(
    runtime: BotRuntime, owner: Owner
) -> None:
    first = await runtime.core.imagine(owner, DEST, "a cat", count=1)
    await runtime.core.imagine(owner, DEST, "a dog", count=1)

    cancellation = await runtime.core.cancel(owner, f" {first.job_id[:5].upper()} ")

    assert cancellation.job.id == first.job_id
    job = await runtime.store.get_job(first.job_id)
    assert job is not None and job.status == "cancelled"
    assert await runtime.queue.zcard(engine_queue(runtime)) == 1


async def test_cancelling_a_running_job_asks_the_engine_to_stop_at_its_next_step(
    runtime: BotRuntime, owner: Owner
) -> None:
    receipt = await runtime.core.imagine(owner, DEST, "a cat", count=2)
    await runtime.queue.set(in_progress_key_prefix + receipt.job_id, b"1")  # as a worker does

    cancellation = await runtime.core.cancel(owner, receipt.job_id[:8])

    assert "the engine stops it at its next step" in cancellation.text
    reason = await runtime.queue.get(cancel_key(receipt.job_id))
    assert reason.decode() == "You cancelled your images “a cat”."
    assert await runtime.queue.zscore(abort_jobs_ss, receipt.job_id) is not None
    assert (await runtime.store.usage(owner)).images == 0

    # The engine's report that it stopped, or a result that raced the cancel, posts nothing.
    sink = RecordingSink()
    deliverer = Deliverer(runtime.core, sink)
    await deliverer.failure(
        Failure(job_id=receipt.job_id, message="it was cancelled.").model_dump()
    )
    result = GenerateResult(
        job_id=receipt.job_id, image_urls=[], seed=1, width=8, height=8, steps=1, seconds=0.1
    )
    await deliverer.result(result.model_dump())
    assert sink.failures == {} and sink.results == {}


async def test_another_users_job_cannot_be_cancelled_by_id_or_by_its_button(
    runtime: BotRuntime, owner: Owner
) -> None:
    theirs = await runtime.core.imagine(other_user(owner), DEST, "an owl", count=1)

    with pytest.raises(UserError) as nothing:
        await runtime.core.cancel(owner)
    assert nothing.value.message == (
        "You have no jobs waiting or running here, so there is nothing to cancel."
    )
    await runtime.core.imagine(owner, DEST, "a cat", count=1)
    with pytest.raises(UserError) as by_id:
        await runtime.core.cancel(owner, theirs.job_id[:8])
    assert by_id.value.message == (
        f"You have no subject called `{theirs.job_id[:8]}`, and none of your jobs waiting or "
        f"running here starts with {theirs.job_id[:8]}. Your jobs: /jobs."
    )
    with pytest.raises(UserError) as by_button:
        await runtime.core.cancel_from_button(
            owner, theirs.job_id, mention=lambda user_id: f"<@{user_id}>"
        )
    assert by_button.value.message == (
        "Only <@user-2> can cancel this job: it is theirs. Nothing was changed."
    )
    # A user of another workspace can't reach it either.
    stranger = Owner(owner.platform, "guild-2", "user-2")
    with pytest.raises(UserError, match="I don't know that job"):
        await runtime.core.cancel_from_button(stranger, theirs.job_id)

    job = await runtime.store.get_job(theirs.job_id)
    assert job is not None and job.status == "queued"
    assert (await runtime.store.usage(other_user(owner))).images == 1
    assert await runtime.queue.zscore(engine_queue(runtime), theirs.job_id) is not None


async def test_the_owners_button_cancels_and_a_second_press_says_it_already_ended(
    runtime: BotRuntime, owner: Owner
) -> None:
    receipt = await runtime.core.imagine(owner, DEST, "a cat", count=1)

    cancellation = await runtime.core.cancel_from_button(owner, receipt.job_id)

    assert cancellation.text.startswith("Cancelled your image “a cat”")
    with pytest.raises(UserError, match="That job has already ended; there is nothing to cancel"):
        await runtime.core.cancel_from_button(owner, receipt.job_id)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (
            "fido",
            "You have no subject called `fido`. Give a subject's name, or at least the first 4 "
            "characters of a job id from /dreambot jobs.",
        ),
        (
            "beefcafe",
            "You have no subject called `beefcafe`, and none of your jobs waiting or running here "
            "starts with beefcafe. Your jobs: /dreambot jobs.",
        ),
        (
            "max",
            "max isn't training (it is ready), so there is nothing to cancel for it. "
            "Your jobs: /dreambot jobs.",
        ),
    ],
)
async def test_a_name_or_id_that_matches_nothing_is_answered_clearly_and_cancels_nothing(
    runtime: BotRuntime, owner: Owner, target: str, expected: str
) -> None:
    await ready_subject(runtime, owner, "max", "zqv")
    receipt = await runtime.core.imagine(owner, DEST, "a [max] on the beach", count=1)
    runtime.core.syntax = SLACK_SYNTAX  # as Slack's adapter sets it

    with pytest.raises(UserError) as refused:
        await runtime.core.cancel(owner, target)

    assert refused.value.message == expected
    job = await runtime.store.get_job(receipt.job_id)
    assert job is not None and job.status == "queued"


async def test_a_banned_user_cannot_cancel(runtime: BotRuntime, owner: Owner) -> None:
    moderator = runtime.core.moderation.acting(Owner(owner.platform, owner.workspace, "m"), True)
    await moderator.ban(owner.user_id, "spam")
    with pytest.raises(UserError, match="You're banned"):
        await runtime.core.cancel(owner)
    with pytest.raises(UserError, match="You're banned"):
        await runtime.core.jobs_text(owner)


async def test_a_moderators_cancel_still_tells_the_owner_in_its_own_words(
    runtime: BotRuntime, owner: Owner
) -> None:
    training = await runtime.core.train(owner, DEST, "rex", "dog", _photos(3))
    moderator = runtime.core.moderation.acting(Owner(owner.platform, owner.workspace, "m"), True)

    reply = await moderator.cancel(training.job_id[:6], "wrong photos")

    assert reply == (
        f"Cancelled job {training.job_id[:8]} of user-1 (taken out of the queue). They were told."
    )
    [notice] = await notices(runtime)
    info = await runtime.queue._get_job_def(notice, None)
    sink = RecordingSink()
    await Deliverer(runtime.core, sink).failure(info.args[0])
    assert sink.failures[training.job_id] == (
        "Your training of rex was cancelled by a moderator: wrong photos."
    )


async def test_jobs_lists_the_callers_waiting_and_running_jobs_with_their_ids(
    runtime: BotRuntime, owner: Owner
) -> None:
    assert await runtime.core.jobs_text(owner) == "You have no jobs waiting or running here."
    await ready_subject(runtime, owner, "max", "zqv")
    training = await runtime.core.train(owner, DEST, "rex", "dog", _photos(3))
    theirs = await runtime.core.imagine(other_user(owner), DEST, "an owl", count=1)
    image = await runtime.core.imagine(
        owner, DEST, "a red fox jumping over a lazy dog in the autumn forest", count=1
    )
    showcase = await runtime.core.showcase(owner, DEST, "max")
    # The training runs on an engine, which says since when in its heartbeat.
    await runtime.queue.set(in_progress_key_prefix + training.job_id, b"1")
    started = datetime.now(UTC) - timedelta(minutes=7)
    heartbeat = EngineHeartbeat(
        engine_id="e1",
        host="gpu-1",
        pid=1,
        device="cuda",
        models=["tiny"],
        started_at=started,
        jobs=[EngineJob(job_id=training.job_id, kind="train_subject", started_at=started)],
    )
    await write_heartbeat(runtime.queue, heartbeat, ttl=30)

    text = await runtime.core.jobs_text(owner)

    lines = text.splitlines()
    assert lines[0] == "Your jobs waiting or running here (3):"
    assert lines[1].startswith(f"  {training.job_id[:8]}  training of rex  running since ")
    assert lines[1].endswith(" UTC (7m)")
    # Places count the jobs ahead in the queue (another user's too), as receipts do.
    assert lines[2].startswith(
        f"  {image.job_id[:8]}  image “a red fox jumping over a lazy dog in the…”  "
        "waiting #2 in the queue (queued "
    )
    assert lines[2].endswith(" UTC, 0m ago)")
    assert lines[3].startswith(f"  {showcase.job_id[:8]}  showcase of max  waiting #3 in the queue")
    assert lines[4] == (
        "Cancel one with /cancel <id> (a training also by its subject's name); "
        "/cancel alone cancels the newest."
    )
    assert theirs.job_id[:8] not in text


async def test_jobs_says_images_for_a_job_drawing_more_than_one(
    runtime: BotRuntime, owner: Owner
) -> None:
    one = await runtime.core.imagine(owner, DEST, "a cat", count=1)
    four = await runtime.core.imagine(owner, DEST, "a red fox", count=4)

    text = await runtime.core.jobs_text(owner)

    assert f"  {one.job_id[:8]}  image “a cat”  waiting #1" in text
    assert f"  {four.job_id[:8]}  images “a red fox”  waiting #2" in text
    cancellation = await runtime.core.cancel(owner)
    assert cancellation.text.startswith(
        f"Cancelled your images “a red fox” (job {four.job_id[:8]}): taken out of the queue."
    )


async def test_jobs_without_the_queue_still_lists_them_from_the_database(
    runtime: BotRuntime, owner: Owner
) -> None:
    receipt = await runtime.core.imagine(owner, DEST, "a cat", count=1)
    await runtime.queue.delete(engine_queue(runtime))
    await runtime.queue.set(engine_queue(runtime), "not a queue")  # Redis answers WRONGTYPE
    runtime.core.syntax = SLACK_SYNTAX  # as Slack's adapter sets it

    text = await runtime.core.jobs_text(owner)

    assert f"  {receipt.job_id[:8]}  image “a cat”  waiting (queued " in text
    assert "places are not shown" in text
    assert text.endswith(
        "Cancel one with /dreambot cancel <id> (a training also by its subject's name); "
        "/dreambot cancel alone cancels the newest."
    )
