"""The ``train_subject`` engine job: class priors (cached), LoRA training, adapter, samples."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from PIL import Image

from bot.config import TINY_MODEL, Settings
from engine.api import TrainRequest, TrainResult
from engine.artifacts import ArtifactStore
from engine.generate_job import draw, fetch_adapters, store_images
from engine.reporting import (
    CancelWatch,
    EngineError,
    JobCancelled,
    ProgressReporter,
    run_in_thread,
    send_failure,
    send_result,
)

RECIPE_VERSION = "1"


def model_key(source: str) -> str:
    """A short stable name for a base model, used to key caches."""
    if source == TINY_MODEL:
        return "tiny-sd"
    slug = re.sub(r"[^a-z0-9]+", "-", Path(source).name.lower()).strip("-")[:40]
    return f"{slug}-{hashlib.sha1(source.encode()).hexdigest()[:8]}"


def class_slug(class_noun: str) -> str:
    """The class noun as a safe path segment."""
    return re.sub(r"[^a-z0-9]+", "-", class_noun.lower()).strip("-") or "thing"


def _open_image(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


async def class_images(
    ctx: dict[str, Any],
    class_noun: str,
    resolution: int,
    count: int,
    report: ProgressReporter,
    watch: CancelWatch,
) -> list[Image.Image]:
    """Class prior images, shared by every subject of this class: generated once, then cached
    in the artifact store per (model, class, resolution, count)."""
    from engine.training import generate_class_images

    settings: Settings = ctx["settings"]
    artifacts: ArtifactStore = ctx["artifacts"]
    folder = artifacts.url(
        "priors",
        model_key(settings.base_model),
        f"{class_slug(class_noun)}-{resolution}px-{count}",
    )
    marker = f"{folder}/complete.json"
    if await asyncio.to_thread(artifacts.exists, marker):
        urls = [u for u in await asyncio.to_thread(artifacts.list, folder) if u.endswith(".png")]
        return [_open_image(await artifacts.aget_bytes(u)) for u in urls]

    def work() -> list[Image.Image]:
        with ctx["gpu"].training():
            watch.raise_if_cancelled()
            images: list[Image.Image] = generate_class_images(
                ctx["pipe"],
                class_noun,
                count,
                resolution,
                seed=0,
                steps=settings.generate_steps,
                progress=lambda step, total: report("class-priors", step, total),
            )
            return images

    images = await run_in_thread(watch, work)
    for i, image in enumerate(images):
        await artifacts.aput_bytes(f"{folder}/{i:04d}.png", _png(image))
    # The marker goes last: a crash halfway leaves no "complete" cache behind.
    await artifacts.aput_bytes(marker, json.dumps({"class": class_noun, "count": count}).encode())
    return images


async def train_subject(ctx: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any] | None:
    """Train a subject's LoRA adapter with prior preservation, save it, render samples."""
    request = TrainRequest.model_validate(payload)
    redis = ctx["redis"]
    settings: Settings = ctx["settings"]
    report = ProgressReporter(
        redis,
        asyncio.get_running_loop(),
        request.reply_queue,
        request.job_id,
        settings.progress_interval,
    )
    watch = CancelWatch()
    try:
        async with watch.watching(redis, request.job_id):
            result = await _train(ctx, request, report, watch)
    except asyncio.CancelledError:
        # Aborted by arq (a moderator's cancel): the owner is told by the bot already.
        raise
    except Exception as exc:
        await send_failure(redis, request.reply_queue, request.job_id, exc)
        return None
    await send_result(redis, request.reply_queue, request.job_id, result)
    return result.model_dump()


async def _train(
    ctx: dict[str, Any], request: TrainRequest, report: ProgressReporter, watch: CancelWatch
) -> TrainResult:
    from engine.training import (
        TrainConfig,
        TrainingCancelled,
        instance_prompt,
        native_resolution,
        save_adapter,
        train_lora,
    )

    settings: Settings = ctx["settings"]
    artifacts: ArtifactStore = ctx["artifacts"]
    started = time.monotonic()
    if request.base_model != settings.base_model:
        raise EngineError(
            f"this engine serves the base model '{settings.base_model}', "
            f"not '{request.base_model}'."
        )
    steps = min(request.steps or settings.train_steps, settings.train_steps)
    cfg = TrainConfig(
        steps=steps,
        learning_rate=settings.train_learning_rate,
        rank=settings.train_rank,
        alpha=settings.train_rank,
        prior_loss_weight=settings.prior_loss_weight,
        class_images=settings.class_images,
    )
    report("loading", 0, len(request.photo_urls))
    photos = [_open_image(await artifacts.aget_bytes(u)) for u in request.photo_urls]
    resolution = cfg.resolution or native_resolution(ctx["pipe"])
    priors: list[Image.Image] = []
    if cfg.prior_loss_weight > 0 and cfg.class_images > 0:
        priors = await class_images(
            ctx, request.class_noun, resolution, cfg.class_images, report, watch
        )
    chunk = max(1, settings.train_chunk_steps)
    gpu = ctx["gpu"]
    steps_done = 0

    def at_step_boundary() -> bool:
        # Between chunks of steps, let waiting generations use the GPU.
        nonlocal steps_done
        steps_done += 1
        if steps_done % chunk == 0:
            gpu.yield_to_generations()
        return watch.cancelled

    def work() -> Any:
        with gpu.training():
            return train_lora(
                ctx["pipe"],
                photos,
                priors,
                request.token,
                request.class_noun,
                cfg,
                progress=lambda step, total, loss: report("training", step, total, loss),
                should_stop=at_step_boundary,
            )

    try:
        outcome = await run_in_thread(watch, work)
    except TrainingCancelled as exc:
        raise JobCancelled from exc
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "adapter.safetensors"
        metadata = {
            "base_model": settings.base_model,
            "token": request.token,
            "class_noun": request.class_noun,
            "steps": str(steps),
            "rank": str(cfg.rank),
            "recipe_version": RECIPE_VERSION,
        }
        await asyncio.to_thread(
            save_adapter, outcome.state_dict, local, metadata, lora_config=outcome.lora_config
        )
        await asyncio.to_thread(artifacts.put_file, request.adapter_url, local)

    sample_urls: list[str] = []
    if settings.sample_count > 0:
        adapters = await fetch_adapters(ctx, [(request.subject_id, request.adapter_url, 1.0)])
        prompt = instance_prompt(request.token, request.class_noun)

        def render() -> list[Image.Image]:
            with gpu.training():
                return draw(
                    ctx,
                    prompt=prompt,
                    negative="",
                    count=settings.sample_count,
                    seed=0,
                    steps=settings.generate_steps,
                    guidance=settings.guidance_scale,
                    width=None,
                    height=None,
                    adapters=adapters,
                    on_step=lambda step, total: report("sampling", step, total),
                )

        samples = await run_in_thread(watch, render)
        sample_urls = await store_images(
            ctx,
            samples,
            request.samples_url,
            {
                "prompt": prompt,
                "seed": "0",
                "model": settings.base_model,
                "subjects": request.subject_id,
                "steps": str(settings.generate_steps),
            },
        )
    return TrainResult(
        job_id=request.job_id,
        subject_id=request.subject_id,
        adapter_url=request.adapter_url,
        sample_urls=sample_urls,
        steps=steps,
        seconds=time.monotonic() - started,
    )
