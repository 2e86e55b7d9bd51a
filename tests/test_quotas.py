"""Quotas against a real SQLite file and a real Redis: atomic counting, refunds, overrides."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bot.core.delivery import Deliverer
from bot.core.errors import UserError
from bot.core.quotas import next_reset
from bot.core.store import Owner
from bot.launcher import BotRuntime, open_core
from engine.api import Failure
from tests.conftest import TEST_PLATFORM, RecordingSink, make_settings, queued

DEST = {"channel": "c1"}


@pytest.fixture
async def limited(tmp_path: Path, redis_clean: str) -> AsyncIterator[BotRuntime]:
    """A core whose users may draw 10 images a day, with room for many jobs at once."""
    settings = make_settings(
        tmp_path / "data",
        redis_clean,
        quota_daily_images=10,
        quota_daily_trainings=1,
        quota_max_active_jobs=100,
    )
    async with open_core(settings, TEST_PLATFORM) as runtime:
        yield runtime


async def test_fifty_simultaneous_imagines_against_a_limit_of_ten_accept_exactly_ten(
    limited: BotRuntime, owner: Owner
) -> None:
    outcomes = await asyncio.gather(
        *(limited.core.imagine(owner, DEST, f"a red fox, take {i}", count=1) for i in range(50)),
        return_exceptions=True,
    )
    accepted = [o for o in outcomes if not isinstance(o, BaseException)]
    refused = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(accepted) == 10
    assert all(isinstance(o, UserError) and "used all 10" in o.message for o in refused)
    assert await queued(limited.queue) == 10
    assert len(await limited.store.active_jobs(owner.platform, owner.workspace)) == 10
    assert (await limited.store.usage(owner)).images == 10


async def test_two_bot_processes_sharing_the_database_cannot_overshoot_either(
    limited: BotRuntime, owner: Owner
) -> None:
    # A second connection stands in for a second process: only SQLite's own write lock
    # (BEGIN IMMEDIATE) keeps the two apart, not the in-process asyncio lock.
    async with open_core(limited.settings, TEST_PLATFORM) as other:
        outcomes = await asyncio.gather(
            *(
                core.imagine(owner, DEST, "a red fox", count=1)
                for _ in range(15)
                for core in (limited.core, other.core)
            ),
            return_exceptions=True,
        )
    assert sum(not isinstance(o, BaseException) for o in outcomes) == 10
    assert all(isinstance(o, UserError) for o in outcomes if isinstance(o, BaseException))
    assert (await limited.store.usage(owner)).images == 10


async def test_a_request_for_more_images_than_are_left_is_refused_with_what_is_left(
    limited: BotRuntime, owner: Owner
) -> None:
    await limited.core.imagine(owner, DEST, "a cat", count=4)
    await limited.core.imagine(owner, DEST, "a cat", count=4)
    with pytest.raises(UserError, match=r"you have 2 left today.*--count 2"):
        await limited.core.imagine(owner, DEST, "a cat", count=4)
    assert await queued(limited.queue) == 2


async def test_the_cap_on_jobs_at_once_refuses_the_next_job(
    runtime: BotRuntime, owner: Owner
) -> None:
    cap = runtime.settings.quota_max_active_jobs
    for _ in range(cap):
        await runtime.core.imagine(owner, DEST, "a cat", count=1)
    with pytest.raises(UserError, match=f"the limit is {cap}"):
        await runtime.core.imagine(owner, DEST, "a cat", count=1)
    # Another user of the workspace is not held up by this one.
    await runtime.core.imagine(Owner(owner.platform, owner.workspace, "user-2"), DEST, "a dog")


async def test_a_job_that_fails_on_the_engine_gives_its_units_back_once(
    limited: BotRuntime, owner: Owner
) -> None:
    receipt = await limited.core.imagine(owner, DEST, "a cat", count=3)
    assert (await limited.store.usage(owner)).images == 3
    sink = RecordingSink()
    deliverer = Deliverer(limited.core, sink)
    failure = Failure(job_id=receipt.job_id, message="The GPU ran out of memory.").model_dump()
    await deliverer.failure(failure)
    await deliverer.failure(failure)  # a retried delivery
    usage = await limited.store.usage(owner)
    assert usage.images == 0 and usage.active_jobs == 0
    job = await limited.store.get_job(receipt.job_id)
    assert job is not None and job.status == "failed"
    assert "ran out of memory" in sink.failures[receipt.job_id]


async def test_a_second_training_on_the_same_day_is_refused_before_photos_are_read(
    limited: BotRuntime, owner: Owner
) -> None:
    from tests.test_commands import _photos

    await limited.core.train(owner, DEST, "rex", "dog", _photos(3))
    with pytest.raises(UserError, match="all 1 of today's trainings"):
        await limited.core.train(owner, DEST, "fido", "dog", [])
    assert await limited.store.find_subject(owner, "fido") is None


async def test_overrides_the_most_generous_role_wins_and_a_user_override_wins_outright(
    limited: BotRuntime, owner: Owner
) -> None:
    mod = limited.core.moderation.acting(Owner(owner.platform, owner.workspace, "mod"), True)
    await mod.quota_set("workspace", "images", 20)
    assert (await limited.core.quotas.limits(owner)).daily_images == 20
    await mod.quota_set("role:artists", "images", 50)
    await mod.quota_set("role:newcomers", "images", 5)
    limits = await limited.core.quotas.limits(owner, ["artists", "newcomers"])
    assert limits.daily_images == 50 and limits.sources["daily_images"] == "role artists"
    assert (await limited.core.quotas.limits(owner, ["newcomers"])).daily_images == 5
    await mod.quota_set(owner.user_id, "images", 2)
    assert (await limited.core.quotas.limits(owner, ["artists"])).daily_images == 2
    await mod.quota_set(owner.user_id, "images", "default")
    assert (await limited.core.quotas.limits(owner, ["artists"])).daily_images == 50
    # Other limits keep their configured defaults throughout.
    assert limits.daily_trainings == 1 and limits.max_active_jobs == 100


async def test_roles_passed_to_imagine_raise_the_limit(limited: BotRuntime, owner: Owner) -> None:
    mod = limited.core.moderation.acting(Owner(owner.platform, owner.workspace, "mod"), True)
    await mod.quota_set("role:artists", "images", 12)
    await limited.core.imagine(owner, DEST, "a cat", count=4, roles=["artists"])
    await limited.core.imagine(owner, DEST, "a cat", count=4, roles=["artists"])
    await limited.core.imagine(owner, DEST, "a cat", count=4, roles=["artists"])
    with pytest.raises(UserError):
        await limited.core.imagine(owner, DEST, "a cat", count=1, roles=["artists"])


async def test_quota_reset_gives_the_day_back(limited: BotRuntime, owner: Owner) -> None:
    for _ in range(10):
        await limited.core.imagine(owner, DEST, "a cat", count=1)
    mod = limited.core.moderation.acting(Owner(owner.platform, owner.workspace, "mod"), True)
    assert "10 job(s) given back" in await mod.quota_reset(owner.user_id)
    await limited.core.imagine(owner, DEST, "a cat", count=1)


async def test_quota_text_shows_usage_and_the_utc_reset(limited: BotRuntime, owner: Owner) -> None:
    await limited.core.imagine(owner, DEST, "a cat", count=3)
    text = await limited.core.quota_text(owner)
    assert "images:    3 of 10" in text and "trainings: 0 of 1" in text
    assert "00:00 UTC" in text


def test_the_day_resets_at_the_next_utc_midnight() -> None:
    now = datetime(2025, 3, 1, 23, 59, tzinfo=UTC)
    assert next_reset(now) == datetime(2025, 3, 2, tzinfo=UTC)
