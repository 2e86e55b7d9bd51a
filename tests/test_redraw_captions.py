"""Vary and Upscale say what they did: the receipt and the result's caption name the image
they started from, and how an Upscale enlarged it (img2img at the configured strength, or a
plain resize where that strength is 0). Kept with the job, so a restarted bot captions it the
same. Real SQLite, real Redis; the engine's answers are sent as it would send them."""

from __future__ import annotations

import pytest

from bot.config import Settings
from bot.core.delivery import Deliverer, Delivery
from bot.core.store import Owner
from bot.launcher import BotRuntime, open_core
from engine.api import GenerateResult
from tests.conftest import TEST_PLATFORM, RecordingSink, engine_queue, queued_generate_request

DEST = {"channel": "c1"}


async def finished_generation(runtime: BotRuntime, owner: Owner, count: int = 2) -> str:
    """A generation of ``count`` 64×64 images with seed 5, done and posted."""
    receipt = await runtime.core.imagine(owner, DEST, "a red fox", count=count, seed=5)
    urls = [f"file:///out/{i:02d}.png" for i in range(count)]
    result = {"job_id": receipt.job_id, "seed": 5, "image_urls": urls, "width": 64, "height": 64}
    await runtime.store.update_job(receipt.job_id, status="done", result=result)
    await runtime.queue.zrem(engine_queue(runtime), receipt.job_id)  # the engine is done with it
    return receipt.job_id


async def caption_after_a_restart(
    settings: Settings, job_id: str, count: int, size: int, seconds: float = 0.5
) -> Delivery:
    """The job's result as a freshly started bot process posts it (nothing in memory: only
    what the store kept about the job)."""
    result = GenerateResult(
        job_id=job_id,
        image_urls=[f"file:///out/{job_id}/{i:02d}.png" for i in range(count)],
        seed=5,
        width=size,
        height=size,
        steps=4,
        seconds=seconds,
    )
    async with open_core(settings, TEST_PLATFORM) as restarted:
        await restarted.queue.zrem(engine_queue(restarted), job_id)
        sink = RecordingSink()
        await Deliverer(restarted.core, sink).result(result.model_dump())
    return sink.results[job_id]


async def test_vary_says_which_image_it_varies_in_its_receipt_and_caption(
    runtime: BotRuntime, owner: Owner
) -> None:
    source = await finished_generation(runtime, owner)

    varied = await runtime.core.reimagine(owner, DEST, source, vary=True, index=1)

    assert varied.text.startswith("Drawing 2 variations of image 2 (seed 5): queued (position 1).")
    job = await runtime.store.get_job(varied.job_id)
    assert job is not None
    assert job.options["redraw"] == {
        "action": "vary",
        "image": 1,
        "strength": runtime.settings.vary_strength,
        "factor": 1,
    }
    delivery = await caption_after_a_restart(runtime.settings, varied.job_id, 2, 64)
    assert delivery.text == "“a red fox” · variations of image 2 · seed 5 · 64×64 · 4 steps in 0.5s"


async def test_a_single_variation_is_named_in_the_singular(
    runtime: BotRuntime, owner: Owner
) -> None:
    source = await finished_generation(runtime, owner, count=1)

    varied = await runtime.core.reimagine(owner, DEST, source, vary=True)

    assert varied.text.startswith("Drawing 1 variation of image 1 (seed 5): queued")
    delivery = await caption_after_a_restart(runtime.settings, varied.job_id, 1, 64)
    assert delivery.text.startswith("“a red fox” · variation of image 1 · seed 5 · ")


async def test_upscale_by_img2img_says_so_with_its_strength(
    runtime: BotRuntime, owner: Owner
) -> None:
    runtime.settings.upscale_strength = 0.3
    source = await finished_generation(runtime, owner)

    upscaled = await runtime.core.reimagine(owner, DEST, source, upscale=True, index=1)

    assert upscaled.text.startswith(
        "Enlarging image 2 2× to 128×128 (img2img at strength 0.3, seed 5): queued (position 1)."
    )
    request = await queued_generate_request(runtime, upscaled.job_id)
    assert request["init_strength"] == 0.3
    # Changing the setting later does not change what this job did.
    runtime.settings.upscale_strength = 0.0
    delivery = await caption_after_a_restart(runtime.settings, upscaled.job_id, 1, 128)
    assert delivery.text == (
        "“a red fox” · image 2 enlarged 2× (img2img at strength 0.3) · seed 5 · 128×128 · "
        "4 steps in 0.5s"
    )


async def test_upscale_without_an_upscaler_says_it_is_a_plain_resize(
    runtime: BotRuntime, owner: Owner
) -> None:
    runtime.settings.upscale_strength = 0.0
    source = await finished_generation(runtime, owner)

    upscaled = await runtime.core.reimagine(owner, DEST, source, upscale=True)

    assert upscaled.text.startswith(
        "Enlarging image 1 2× to 128×128 (plain resize; no upscaler is configured): "
        "queued (position 1)."
    )
    assert "seed" not in upscaled.text.split(":")[0]  # nothing is drawn: no seed to speak of
    request = await queued_generate_request(runtime, upscaled.job_id)
    assert request["init_strength"] == 0.0
    runtime.settings.upscale_strength = 0.3
    delivery = await caption_after_a_restart(runtime.settings, upscaled.job_id, 1, 128, 0.1)
    # Nor steps: the engine only resized it.
    assert delivery.text == (
        "“a red fox” · image 1 enlarged 2× (plain resize; no upscaler is configured) · "
        "128×128 in 0.1s"
    )


@pytest.mark.parametrize("button", [{}, {"vary": True}])
async def test_a_reroll_and_a_plain_imagine_say_nothing_of_an_image_they_start_from(
    runtime: BotRuntime, owner: Owner, button: dict[str, bool]
) -> None:
    source = await finished_generation(runtime, owner)
    redone = await runtime.core.reimagine(owner, DEST, source, **button)
    await runtime.store.update_job(
        redone.job_id,
        status="done",
        result={"job_id": redone.job_id, "seed": 6, "image_urls": ["file:///o/0.png"] * 2},
    )

    # A reroll, also of a variation, draws anew from the prompt.
    rerolled = await runtime.core.reimagine(owner, DEST, redone.job_id)

    assert rerolled.text.startswith("Drawing 2 images (seed ")
    job = await runtime.store.get_job(rerolled.job_id)
    assert job is not None and "redraw" not in job.options
    delivery = await caption_after_a_restart(runtime.settings, rerolled.job_id, 2, 64)
    assert delivery.text == "“a red fox” · seed 5 · 64×64 · 4 steps in 0.5s"
