"""Where the safety filter, Vary/Upscale and the deletion of people's data meet each other and
the older features: a deletion while a result is being posted, a Vary of a result whose every
image was withheld once the sweep has passed. Real SQLite, real Redis, real files."""

from __future__ import annotations

import pytest
from arq.worker import Retry

from bot.core.delivery import Deliverer, Delivery
from bot.core.errors import UserError
from bot.core.store import Owner
from bot.launcher import BotRuntime
from engine.api import GenerateResult
from tests.conftest import TEST_PLATFORM, RecordingSink, queued_generate_request
from tests.test_retention import days_ago

DEST = {"channel": "c1"}
ALICE = Owner(TEST_PLATFORM, "guild-1", "alice")


class DeletedWhilePostingSink(RecordingSink):
    """A chat whose first post of a result is under way when its owner deletes their data:
    the post then fails (the images it reads are gone), and the delivery is tried again."""

    def __init__(self, runtime: BotRuntime, owner: Owner) -> None:
        super().__init__()
        self.runtime, self.owner = runtime, owner
        self.tries = 0

    async def show_result(self, delivery: Delivery) -> None:
        self.tries += 1
        if self.tries == 1:
            await self.runtime.core.personal_data.delete(self.owner)
            raise FileNotFoundError("the result's images are gone")
        await super().show_result(delivery)


async def test_a_result_whose_data_was_deleted_while_it_was_posted_is_not_posted_again(
    runtime: BotRuntime,
) -> None:
    receipt = await runtime.core.imagine(ALICE, DEST, "a red fox", count=1, seed=5)
    result = GenerateResult(
        job_id=receipt.job_id,
        image_urls=[runtime.core.artifacts.url("outputs", receipt.job_id, "00.png")],
        seed=5,
        width=64,
        height=64,
        steps=4,
        seconds=0.5,
    ).model_dump()
    sink = DeletedWhilePostingSink(runtime, ALICE)
    deliverer = Deliverer(runtime.core, sink)
    with pytest.raises(Retry):
        await deliverer.result(result)

    await deliverer.result(result)  # arq's next try
    await deliverer.result(result, last_try=True)

    # Nothing more is posted: not its prompt (deleted now), nor a note that dreambot "keeps" it.
    assert (sink.results, sink.failures) == ({}, {})
    job = await runtime.store.get_job(receipt.job_id)
    assert job is not None and job.prompt is None and job.data_deleted_at is not None


@pytest.mark.parametrize("button", ["vary", "upscale"])
async def test_vary_of_a_result_whose_every_image_was_withheld_says_so_after_the_sweep(
    runtime: BotRuntime, button: str
) -> None:
    receipt = await runtime.core.imagine(ALICE, DEST, "a red fox", count=2, seed=5)
    withheld = GenerateResult(
        job_id=receipt.job_id,
        image_urls=[],
        seed=5,
        width=64,
        height=64,
        steps=4,
        seconds=0.5,
        withheld=2,
    )
    await Deliverer(runtime.core, RecordingSink()).result(withheld.model_dump())
    async with runtime.store.transaction() as db:  # a month later
        await db.execute(
            "UPDATE jobs SET updated_at = ? WHERE id = ?", (days_ago(31), receipt.job_id)
        )
    assert (await runtime.core.retention.sweep_images()).jobs == 1

    with pytest.raises(UserError) as refused:
        await runtime.core.reimagine(ALICE, DEST, receipt.job_id, **{button: True})

    # There never was an image to keep: not "no longer stored … draws the same images".
    assert refused.value.message == (
        "The safety filter withheld every image of that result, so there is none to "
        f"{button}. Nothing was queued."
    )


@pytest.mark.parametrize("button", ["vary", "upscale"])
async def test_vary_and_upscale_of_an_image_drawn_in_few_steps_still_draw_a_step(
    runtime: BotRuntime, button: str
) -> None:
    receipt = await runtime.core.imagine(ALICE, DEST, "a red fox", count=2, seed=5, steps=2)
    drawn = GenerateResult(
        job_id=receipt.job_id,
        image_urls=[runtime.core.artifacts.url("outputs", receipt.job_id, "00.png")],
        seed=5,
        width=64,
        height=64,
        steps=2,
        seconds=0.5,
    )
    await Deliverer(runtime.core, RecordingSink()).result(drawn.model_dump())

    redrawn = await runtime.core.reimagine(ALICE, DEST, receipt.job_id, **{button: True})

    request = await queued_generate_request(runtime, redrawn.job_id)
    # The engine runs int(steps × strength) img2img steps and refuses none ("internal error").
    assert int(request["steps"] * request["init_strength"]) >= 1
