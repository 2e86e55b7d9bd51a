"""The ``generate`` engine job, and rendering images to the artifact store."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from bot.config import Settings
from engine.api import GenerateRequest, GenerateResult
from engine.artifacts import ArtifactStore
from engine.images import encode_png
from engine.reporting import (
    CancelWatch,
    EngineError,
    ProgressReporter,
    run_in_thread,
    send_failure,
    send_result,
)

MAX_STEPS = 150


async def fetch_adapters(
    ctx: dict[str, Any], adapters: list[tuple[str, str, float]]
) -> list[tuple[str, Path, float]]:
    """Local copies of the adapters' files (name, path, scale); EngineError if one is gone."""
    artifacts: ArtifactStore = ctx["artifacts"]
    local = []
    for name, url, scale in adapters:
        if not url or not await asyncio.to_thread(artifacts.exists, url):
            raise EngineError("the subject's adapter file is missing; train the subject again.")
        path = await asyncio.to_thread(artifacts.fetch_local, url, ctx["cache_dir"])
        local.append((name, path, scale))
    return local


def draw(
    ctx: dict[str, Any],
    *,
    prompt: str,
    negative: str,
    count: int,
    seed: int,
    steps: int,
    guidance: float,
    width: int | None,
    height: int | None,
    adapters: list[tuple[str, Path, float]],
    on_step: Callable[[int, int], None],
) -> list[Image.Image]:
    """Generate ``count`` images as one batch on the warm pipeline (blocking; in a thread)."""
    images: list[Image.Image] = ctx["generator"].generate(
        prompt,
        negative_prompt=negative,
        count=count,
        seed=seed,
        steps=steps,
        guidance=guidance,
        width=width,
        height=height,
        adapters=adapters,
        progress=on_step,
    )
    return images


async def store_images(
    ctx: dict[str, Any],
    images: list[Image.Image],
    output_url: str,
    metadata: dict[str, str],
) -> list[str]:
    """Write the images as PNGs with provenance metadata; return their URLs."""
    artifacts: ArtifactStore = ctx["artifacts"]
    urls = []
    for i, image in enumerate(images):
        url = f"{output_url}/{i:02d}.png"
        data = await asyncio.to_thread(encode_png, image, {**metadata, "index": str(i)})
        await artifacts.aput_bytes(url, data)
        urls.append(url)
    return urls


def image_metadata(
    settings: Settings, request: GenerateRequest, steps: int, guidance: float
) -> dict[str, str]:
    """What each PNG records about how it was made."""
    return {
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "seed": str(request.seed),
        "steps": str(steps),
        "guidance": str(guidance),
        "model": settings.base_model,
        "subjects": ",".join(a.name for a in request.adapters),
    }


async def generate(ctx: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any] | None:
    """Generate images for a prompt with the requested subject adapters active."""
    request = GenerateRequest.model_validate(payload)
    settings: Settings = ctx["settings"]
    redis = ctx["redis"]
    report = ProgressReporter(
        redis,
        asyncio.get_running_loop(),
        request.reply_queue,
        request.job_id,
        settings.progress_interval,
    )
    watch = CancelWatch()
    started = time.monotonic()
    try:
        if request.base_model != settings.base_model:
            raise EngineError(
                f"this engine serves the base model '{settings.base_model}', "
                f"not '{request.base_model}'."
            )
        steps = min(request.steps or settings.generate_steps, MAX_STEPS)
        guidance = settings.guidance_scale if request.guidance is None else request.guidance
        adapters = await fetch_adapters(ctx, [(a.name, a.url, a.scale) for a in request.adapters])

        def work() -> list[Image.Image]:
            with ctx["gpu"].generation():
                watch.raise_if_cancelled()
                return draw(
                    ctx,
                    prompt=request.prompt,
                    negative=request.negative_prompt,
                    count=request.count,
                    seed=request.seed,
                    steps=steps,
                    guidance=guidance,
                    width=request.width,
                    height=request.height,
                    adapters=adapters,
                    on_step=lambda step, total: report("generating", step, total),
                )

        async with watch.watching(redis, request.job_id):
            images = await run_in_thread(watch, work)
        urls = await store_images(
            ctx, images, request.output_url, image_metadata(settings, request, steps, guidance)
        )
        width, height = images[0].size
        result = GenerateResult(
            job_id=request.job_id,
            image_urls=urls,
            seed=request.seed,
            width=width,
            height=height,
            steps=steps,
            seconds=time.monotonic() - started,
        )
    except Exception as exc:
        await send_failure(redis, request.reply_queue, request.job_id, exc)
        return None
    await send_result(redis, request.reply_queue, request.job_id, result)
    return result.model_dump()
