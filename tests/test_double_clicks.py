"""A result's Reroll / Vary / Upscale button pressed again by the same user while the job it
made still waits or runs queues nothing more and charges nothing more: the answer points at
that job. Real SQLite, real Redis."""

from __future__ import annotations

import asyncio

import pytest

from bot.core.commands import Receipt
from bot.core.errors import UserError
from bot.core.store import Owner
from bot.launcher import BotRuntime
from tests.conftest import queued

DEST = {"channel": "c1"}


async def finished_generation(runtime: BotRuntime, owner: Owner, count: int = 2) -> str:
    """A generation of ``count`` images, done and posted, whose buttons can be pressed."""
    receipt = await runtime.core.imagine(owner, DEST, "a red fox", count=count, seed=5)
    urls = [f"file:///out/{i:02d}.png" for i in range(count)]
    result = {"job_id": receipt.job_id, "seed": 5, "image_urls": urls, "width": 64, "height": 64}
    await runtime.store.update_job(receipt.job_id, status="done", result=result)
    return receipt.job_id


async def images_spent(runtime: BotRuntime, owner: Owner) -> int:
    return (await runtime.store.usage(owner)).images


async def test_a_double_click_at_once_queues_one_job_charges_once_and_points_at_it(
    runtime: BotRuntime, owner: Owner
) -> None:
    source = await finished_generation(runtime, owner)
    spent, waiting = await images_spent(runtime, owner), await queued(runtime.queue)

    answers = await asyncio.gather(
        runtime.core.reimagine(owner, DEST, source),
        runtime.core.reimagine(owner, DEST, source),
        return_exceptions=True,
    )

    [receipt] = [answer for answer in answers if isinstance(answer, Receipt)]
    [refusal] = [answer for answer in answers if isinstance(answer, UserError)]
    assert receipt.job_id[:8] in refusal.message
    assert "Nothing new was queued" in refusal.message
    assert await queued(runtime.queue) == waiting + 1
    assert await images_spent(runtime, owner) == spent + 2  # one reroll of two images


async def test_a_second_click_while_the_first_job_waits_is_answered_with_that_job(
    runtime: BotRuntime, owner: Owner
) -> None:
    source = await finished_generation(runtime, owner)
    first = await runtime.core.reimagine(owner, DEST, source, vary=True, index=1)
    spent = await images_spent(runtime, owner)

    with pytest.raises(UserError) as refused:
        await runtime.core.reimagine(owner, DEST, source, vary=True, index=1)

    assert refused.value.message == (
        f"You already asked for Vary of image 2 of that result: job {first.job_id[:8]} is "
        "waiting in the queue, and its images will be posted when it is done. Nothing new "
        "was queued or charged."
    )
    await runtime.store.start_job(first.job_id)
    with pytest.raises(UserError, match=f"job {first.job_id[:8]} is being drawn"):
        await runtime.core.reimagine(owner, DEST, source, vary=True, index=1)
    assert await images_spent(runtime, owner) == spent


async def test_other_buttons_and_other_users_still_queue_their_own_job(
    runtime: BotRuntime, owner: Owner
) -> None:
    source = await finished_generation(runtime, owner)
    other = Owner(owner.platform, owner.workspace, "user-2")
    runtime.settings.quota_max_active_jobs = 10
    clicks = [
        runtime.core.reimagine(owner, DEST, source),
        runtime.core.reimagine(owner, DEST, source, vary=True, index=0),
        runtime.core.reimagine(owner, DEST, source, vary=True, index=1),
        runtime.core.reimagine(owner, DEST, source, upscale=True, index=0),
        runtime.core.reimagine(other, DEST, source),
    ]
    receipts = await asyncio.gather(*clicks)
    assert len({receipt.job_id for receipt in receipts}) == 5


@pytest.mark.parametrize("ending", ["done", "failed", "cancelled"])
async def test_the_button_queues_again_once_the_job_it_made_has_ended(
    runtime: BotRuntime, owner: Owner, ending: str
) -> None:
    source = await finished_generation(runtime, owner)
    first = await runtime.core.reimagine(owner, DEST, source)
    await runtime.store.update_job(first.job_id, status=ending)

    again = await runtime.core.reimagine(owner, DEST, source)

    assert again.job_id != first.job_id


async def test_a_click_refused_for_another_reason_does_not_hold_the_button(
    runtime: BotRuntime, owner: Owner
) -> None:
    source = await finished_generation(runtime, owner)
    runtime.settings.quota_daily_images = await images_spent(runtime, owner)  # all spent
    with pytest.raises(UserError, match="images"):
        await runtime.core.reimagine(owner, DEST, source)

    runtime.settings.quota_daily_images = 100
    receipt = await runtime.core.reimagine(owner, DEST, source)
    assert receipt.text.startswith("Drawing 2 images")
