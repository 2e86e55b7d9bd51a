"""What chat users do at the same time: the same command twice, double clicks, two people at
once, a moderator acting mid-command, and the engine's messages handled side by side (the
bot's delivery worker runs up to four at once). Real SQLite, real Redis."""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap
from typing import Any

import pytest
from arq.constants import job_key_prefix
from redis.asyncio import Redis

from bot.config import Settings
from bot.core.delivery import Deliverer
from bot.core.errors import UserError
from bot.core.store import Owner
from bot.launcher import BotRuntime, delivering, open_core
from engine.api import (
    GENERATE,
    GenerateResult,
    Progress,
    TrainResult,
    rare_tokens_key,
)
from tests.conftest import (
    TEST_PLATFORM,
    RecordingSink,
    engine_queue,
    queued,
    queued_generate_request,
    ready_subject,
)
from tests.test_commands import _job_count, _photos

DEST = {"channel": "c1"}


def other_user(owner: Owner, user_id: str = "user-2") -> Owner:
    return Owner(owner.platform, owner.workspace, user_id)


async def pause_redis(runtime: BotRuntime, milliseconds: int = 2000) -> None:
    """Make Redis hold every client's commands for a while (CLIENT PAUSE), as a busy Redis
    would: a command that reaches its first Redis call waits there meanwhile."""
    client: Redis = Redis.from_url(runtime.settings.redis_url)
    try:
        await client.execute_command("CLIENT", "PAUSE", milliseconds, "ALL")
    finally:
        await client.aclose()


async def waiting_on_redis(task: asyncio.Task[Any]) -> None:
    """Let a command run its SQLite steps until it sits in the paused Redis."""
    await asyncio.sleep(0.3)
    assert not task.done()


def generate_result(job_id: str) -> dict[str, Any]:
    return GenerateResult(
        job_id=job_id, image_urls=[], seed=1, width=64, height=64, steps=4, seconds=0.1
    ).model_dump()


async def train_result(runtime: BotRuntime, owner: Owner, job_id: str) -> dict[str, Any]:
    subject = await runtime.store.find_subject(owner, "rex")
    assert subject is not None
    return TrainResult(
        job_id=job_id,
        subject_id=subject.id,
        adapter_url=f"{runtime.core.artifacts.url('subjects', subject.id)}/adapter.safetensors",
        sample_urls=[],
        steps=10,
        seconds=1.0,
    ).model_dump()


# The engine's messages, handled side by side.


async def test_a_progress_update_handled_beside_the_result_leaves_the_job_done(
    runtime: BotRuntime, owner: Owner
) -> None:
    receipt = await runtime.core.imagine(owner, DEST, "a cat", count=1)
    deliverer = Deliverer(runtime.core, RecordingSink())
    step = Progress(job_id=receipt.job_id, phase="generating", step=3, total=4)

    await asyncio.gather(
        deliverer.result(generate_result(receipt.job_id)), deliverer.progress(step.model_dump())
    )

    job = await runtime.store.get_job(receipt.job_id)
    assert job is not None and job.status == "done"
    # Not left "running", where it would hold one of the user's jobs-at-once for good.
    assert (await runtime.store.usage(owner)).active_jobs == 0
    assert await runtime.store.active_jobs(owner.platform, owner.workspace) == []


async def test_a_training_progress_handled_beside_its_result_leaves_the_subject_ready(
    runtime: BotRuntime, owner: Owner
) -> None:
    receipt = await runtime.core.train(owner, DEST, "rex", "dog", _photos(3))
    deliverer = Deliverer(runtime.core, RecordingSink())
    step = Progress(job_id=receipt.job_id, phase="training", step=3, total=10)

    await asyncio.gather(
        deliverer.result(await train_result(runtime, owner, receipt.job_id)),
        deliverer.progress(step.model_dump()),
    )

    subject = await runtime.store.find_subject(owner, "rex")
    assert subject is not None and subject.status == "ready"  # not back to "training"
    job = await runtime.store.get_job(receipt.job_id)
    assert job is not None and job.status == "done"
    await runtime.core.imagine(owner, DEST, "a [V] dog on the beach", count=1)


@pytest.mark.parametrize("result_after", [0.0, 0.001, 0.005])
async def test_a_result_handled_beside_the_owners_cancel_ends_the_way_the_owner_is_told(
    runtime: BotRuntime, owner: Owner, result_after: float
) -> None:
    receipt = await runtime.core.train(owner, DEST, "rex", "dog", _photos(3))
    sink = RecordingSink()
    deliverer = Deliverer(runtime.core, sink)
    result = await train_result(runtime, owner, receipt.job_id)

    async def deliver() -> None:
        await asyncio.sleep(result_after)
        await deliverer.result(result)

    cancelled, _ = await asyncio.gather(
        runtime.core.cancel_from_button(owner, receipt.job_id), deliver(), return_exceptions=True
    )

    job = await runtime.store.get_job(receipt.job_id)
    subject = await runtime.store.find_subject(owner, "rex")
    trainings = (await runtime.store.usage(owner)).trainings
    assert job is not None and subject is not None
    if isinstance(cancelled, UserError):  # the result came first: it stands
        assert "has just ended" in cancelled.message
        assert (job.status, subject.status, trainings) == ("done", "ready", 1)
        assert list(sink.results) == [job.id]
    else:  # the cancel came first: cancelled, refunded, the subject failed, nothing posted
        assert "stays in your subjects as failed" in cancelled.text
        assert (job.status, subject.status, trainings) == ("cancelled", "failed", 0)
        assert sink.results == {}


async def test_the_same_result_delivered_twice_at_once_is_posted_once(
    runtime: BotRuntime, owner: Owner
) -> None:
    receipt = await runtime.core.imagine(owner, DEST, "a cat", count=1)
    sink = RecordingSink()
    deliverer = Deliverer(runtime.core, sink)

    await asyncio.gather(
        deliverer.result(generate_result(receipt.job_id)),
        Deliverer(runtime.core, sink).result(generate_result(receipt.job_id)),
        deliverer.result(generate_result(receipt.job_id)),
    )

    assert sink.result_count == 1


# A moderator acting while a command is under way.


@pytest.mark.parametrize("command", ["imagine", "train"])
async def test_a_user_banned_while_their_command_is_checked_gets_no_job(
    runtime: BotRuntime, owner: Owner, command: str
) -> None:
    moderator = runtime.core.moderation.acting(other_user(owner, "mod-1"), True)
    await pause_redis(runtime)
    if command == "imagine":
        asked = runtime.core.imagine(owner, DEST, "a cat", count=1)
    else:
        asked = runtime.core.train(owner, DEST, "rex", "dog", _photos(3))
    task = asyncio.create_task(asked)
    await waiting_on_redis(task)  # past the ban check, before the job is recorded

    await moderator.ban(owner.user_id, "spam")

    with pytest.raises(UserError, match="You're banned from using dreambot here"):
        await task
    assert await runtime.store.active_jobs(owner.platform, owner.workspace) == []
    assert await queued(runtime.queue) == 0
    assert await runtime.store.list_subjects(owner) == []


async def test_forgetting_a_subject_while_an_imagine_of_it_is_checked_is_a_plain_refusal(
    runtime: BotRuntime, owner: Owner
) -> None:
    await ready_subject(runtime, owner, "rex", "zqv")
    await pause_redis(runtime)
    task = asyncio.create_task(runtime.core.imagine(owner, DEST, "[rex] in the snow"))
    await waiting_on_redis(task)  # the prompt resolved to rex

    assert "Forgot rex" in await runtime.core.forget(owner, "rex")

    with pytest.raises(UserError, match="nothing was queued"):  # not an apology
        await task
    assert await _job_count(runtime) == 0
    assert await queued(runtime.queue) == 0


# The same command twice, two users at once.


async def test_the_same_training_sent_twice_at_once_makes_one_subject_and_one_job(
    runtime: BotRuntime, owner: Owner
) -> None:
    outcomes = await asyncio.gather(
        runtime.core.train(owner, DEST, "rex", "dog", _photos(3)),
        runtime.core.train(owner, DEST, "rex", "dog", _photos(3)),
        return_exceptions=True,
    )

    refused = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(refused) == 1 and isinstance(refused[0], UserError)
    assert "already have a subject called rex" in refused[0].message
    assert len(await runtime.store.list_subjects(owner)) == 1
    assert await queued(runtime.queue) == 1
    assert (await runtime.store.usage(owner)).trainings == 1


async def test_users_training_at_once_get_different_tokens_when_the_words_run_out(
    runtime: BotRuntime, owner: Owner
) -> None:
    # Two published words for six subjects: the draws collide and fall back.
    words = json.dumps(["zqv", "xjq"])
    await runtime.queue.set(rare_tokens_key(runtime.settings.base_model), words)
    users = [other_user(owner, f"user-{i}") for i in range(6)]

    await asyncio.gather(*(runtime.core.train(u, DEST, "rex", "dog", _photos(3)) for u in users))

    subjects = [await runtime.store.find_subject(user, "rex") for user in users]
    tokens = {subject.token for subject in subjects if subject is not None}
    assert len(tokens) == 6 and {"zqv", "xjq"} <= tokens


async def test_images_sent_at_once_never_pass_the_cap_on_jobs_at_once(
    runtime: BotRuntime, owner: Owner
) -> None:
    cap = runtime.settings.quota_max_active_jobs

    outcomes = await asyncio.gather(
        *(runtime.core.imagine(owner, DEST, "a cat", count=1) for _ in range(cap + 5)),
        return_exceptions=True,
    )

    assert sum(not isinstance(o, BaseException) for o in outcomes) == cap
    assert all(isinstance(o, UserError) for o in outcomes if isinstance(o, BaseException))
    assert (await runtime.store.usage(owner)).active_jobs == cap


async def test_cancel_pressed_twice_at_once_cancels_once_and_refunds_once(
    runtime: BotRuntime, owner: Owner
) -> None:
    receipt = await runtime.core.imagine(owner, DEST, "a cat", count=2)

    outcomes = await asyncio.gather(
        runtime.core.cancel_from_button(owner, receipt.job_id),
        runtime.core.cancel_from_button(owner, receipt.job_id),
        return_exceptions=True,
    )

    refused = [o for o in outcomes if isinstance(o, UserError)]
    assert len(refused) == 1 and "nothing to cancel" in refused[0].message
    assert (await runtime.store.usage(owner)).images == 0


# A restart in the middle of a command.

IMAGINE_IN_A_BOT_PROCESS = textwrap.dedent(
    """
    import asyncio, sys
    from bot.config import Settings
    from bot.core.store import Owner
    from bot.launcher import open_core

    async def main() -> None:
        redis_url, data_dir, platform = sys.argv[1:]
        settings = Settings(_env_file=None, redis_url=redis_url, data_dir=data_dir)
        async with open_core(settings, platform) as runtime:
            owner = Owner(platform, "guild-1", "user-1")
            await runtime.core.imagine(owner, {}, "a cat", count=1)

    asyncio.run(main())
    """
)


async def test_a_bot_killed_while_sending_a_job_settles_it_after_the_restart(
    settings: Settings, owner: Owner
) -> None:
    redis: Redis = Redis.from_url(settings.redis_url)
    # Redis holds writes (reads go on), so the command stops inside the send: killed there.
    await redis.execute_command("CLIENT", "PAUSE", 20_000, "WRITE")
    bot = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        IMAGINE_IN_A_BOT_PROCESS,
        settings.redis_url,
        str(settings.data_dir),
        TEST_PLATFORM,
    )
    try:
        async with open_core(settings, TEST_PLATFORM) as runtime:
            async with asyncio.timeout(20):  # until the job is recorded
                while not (recorded := await runtime.store.unfinished_jobs(TEST_PLATFORM)):
                    await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)
            bot.kill()
            await bot.wait()
            await redis.execute_command("CLIENT", "UNPAUSE")
            assert await queued(runtime.queue) == 0  # the job never got there
    finally:
        if bot.returncode is None:
            bot.kill()
            await bot.wait()
        await redis.execute_command("CLIENT", "UNPAUSE")
        await redis.aclose()
    await asyncio.sleep(1.1)  # the restart, a moment later

    sink = RecordingSink()
    async with open_core(settings, TEST_PLATFORM) as runtime, delivering(runtime, sink):
        [job] = recorded
        text = await sink.wait_for(job.id, within=10)
        assert isinstance(text, str) and "never reached the job queue" in text
        usage = await runtime.store.usage(owner)
        assert (usage.images, usage.active_jobs) == (0, 0)


async def test_a_job_its_owner_cancels_while_it_is_being_sent_does_not_reach_the_engine(
    runtime: BotRuntime, owner: Owner
) -> None:
    receipt = await runtime.core.imagine(owner, DEST, "a cat", count=1)
    payload = await queued_generate_request(runtime, receipt.job_id)
    # Back to the moment before its submission landed: recorded, not in Redis yet.
    await runtime.queue.zrem(engine_queue(runtime), receipt.job_id)
    await runtime.queue.delete(job_key_prefix + receipt.job_id)
    # The owner cancels meanwhile: recorded at once; its abort finds nothing to stop.
    cancelled = await runtime.core.cancel(owner)
    assert cancelled.job.id == receipt.job_id and "left the queue" in cancelled.text

    # The submission lands.
    await runtime.core._enqueue(GENERATE, receipt.job_id, payload, engine_queue(runtime))

    assert await queued(runtime.queue) == 0  # taken out again: no engine runs it
    stored = await runtime.store.get_job(receipt.job_id)
    assert stored is not None and stored.status == "cancelled"
