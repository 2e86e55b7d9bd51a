"""The engine's arq worker: keeps the base model warm, trains subjects, generates images.

Run with ``dreambot engine``. Shared resources live in ``ctx``, built in ``startup``. Job
functions take ``ctx`` and a plain payload (see ``engine.api``), run torch work in a thread so
the worker's event loop stays responsive, and always answer on the request's reply queue with
a result or a ``Failure`` whose message a user can read.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from arq.connections import ArqRedis, RedisSettings
from PIL import Image

from bot.config import TINY_MODEL, Settings, load_settings
from engine.api import (
    DELIVER_FAILURE,
    DELIVER_PROGRESS,
    DELIVER_RESULT,
    ENGINE_QUEUE,
    GENERATE,
    TRAIN_SUBJECT,
    Failure,
    GenerateRequest,
    GenerateResult,
    Progress,
    TrainRequest,
    TrainResult,
)
from engine.artifacts import ArtifactStore
from engine.images import encode_png

log = logging.getLogger(__name__)

RECIPE_VERSION = "1"


class EngineError(Exception):
    """A job failure whose message can be shown to the user as is."""


class ProgressReporter:
    """Sends throttled ``Progress`` messages to the bot; callable from a worker thread."""

    def __init__(
        self,
        redis: ArqRedis,
        loop: asyncio.AbstractEventLoop,
        reply_queue: str,
        job_id: str,
        interval: float,
    ) -> None:
        self.redis, self.loop, self.reply_queue, self.job_id = redis, loop, reply_queue, job_id
        self.interval = interval
        self._lock = threading.Lock()
        self._sent = 0
        self._last_sent = 0.0
        self._phase = ""
        self._phase_started = time.monotonic()

    def __call__(
        self, phase: str, step: int = 0, total: int = 0, loss: float | None = None
    ) -> None:
        """Report ``step`` of ``total`` in ``phase``; sent at most every ``interval`` seconds,
        and always at a phase change or the last step."""
        now = time.monotonic()
        with self._lock:
            if phase != self._phase:
                self._phase, self._phase_started = phase, now
            elif step < total and now - self._last_sent < self.interval:
                return
            eta = None
            if total and step:
                eta = (now - self._phase_started) / step * (total - step)
            self._last_sent = now
            self._sent += 1
            progress = Progress(
                job_id=self.job_id,
                phase=phase,
                step=step,
                total=total,  # type: ignore[arg-type]
                eta_seconds=eta,
                loss=loss,
            )
            job_key = f"{self.job_id}:progress:{self._sent}"
        coro = self.redis.enqueue_job(
            DELIVER_PROGRESS,
            progress.model_dump(),
            _job_id=job_key,
            _queue_name=self.reply_queue,
            _expires=600,
        )
        if threading.current_thread() is threading.main_thread():
            self.loop.create_task(coro)
        else:
            asyncio.run_coroutine_threadsafe(coro, self.loop)


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


def _image_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


async def startup(ctx: dict[str, Any]) -> None:
    """Load the base model once and build the shared resources."""
    from engine.generation import Generator
    from engine.models import default_dtype, load_pipeline, resolve_device
    from engine.tiny import build_tiny_model

    settings: Settings = ctx.get("settings") or load_settings()
    source = settings.base_model_source
    if settings.base_model == TINY_MODEL:
        await asyncio.to_thread(build_tiny_model, source)
    device = resolve_device(settings.device)
    started = time.monotonic()
    pipe = await asyncio.to_thread(
        load_pipeline, source, device=device, dtype=default_dtype(device)
    )
    log.info("loaded %s on %s in %.1fs", source, device, time.monotonic() - started)
    ctx.update(
        settings=settings,
        artifacts=ArtifactStore(settings.artifacts),
        pipe=pipe,
        generator=Generator(pipe),
        device=device,
        cache_dir=settings.data_dir / "engine-cache",
        torch_lock=asyncio.Lock(),
    )


async def shutdown(ctx: dict[str, Any]) -> None:
    """Release the model."""
    ctx.pop("generator", None)
    ctx.pop("pipe", None)


async def _reply(
    ctx: dict[str, Any], function: str, reply_queue: str, job_id: str, payload: dict[str, Any]
) -> None:
    redis: ArqRedis = ctx["redis"]
    await redis.enqueue_job(
        function, payload, _job_id=f"{job_id}:{function}", _queue_name=reply_queue
    )


async def _fail(ctx: dict[str, Any], reply_queue: str, job_id: str, exc: BaseException) -> None:
    if isinstance(exc, EngineError):
        message = str(exc)
    else:
        log.exception("job %s failed", job_id)
        message = (
            f"the engine hit an internal error (job {job_id}). It is logged; try again, and "
            "tell a moderator if it keeps happening."
        )
    failure = Failure(job_id=job_id, message=message, detail=repr(exc)[:2000])
    await _reply(ctx, DELIVER_FAILURE, reply_queue, job_id, failure.model_dump())


def _check_model(settings: Settings, requested: str) -> None:
    if requested != settings.base_model:
        raise EngineError(
            f"this engine serves the base model '{settings.base_model}', not '{requested}'."
        )


async def _class_images(
    ctx: dict[str, Any],
    class_noun: str,
    resolution: int,
    count: int,
    report: ProgressReporter,
) -> list[Image.Image]:
    """Class prior images, shared by every subject of this class: generated once, then cached
    in the artifact store per (model, class, resolution, count)."""
    from engine.training import generate_class_images

    settings: Settings = ctx["settings"]
    artifacts: ArtifactStore = ctx["artifacts"]
    folder = artifacts.url(
        "priors", model_key(settings.base_model), f"{class_slug(class_noun)}-{resolution}px-{count}"
    )
    marker = f"{folder}/complete.json"
    if await asyncio.to_thread(artifacts.exists, marker):
        urls = [u for u in await asyncio.to_thread(artifacts.list, folder) if u.endswith(".png")]
        return [_open_image(await artifacts.aget_bytes(u)) for u in urls]

    def on_progress(step: int, total: int) -> None:
        report("class-priors", step, total)

    images = await asyncio.to_thread(
        generate_class_images,
        ctx["pipe"],
        class_noun,
        count,
        resolution,
        seed=0,
        progress=on_progress,
    )
    for i, image in enumerate(images):
        await artifacts.aput_bytes(f"{folder}/{i:04d}.png", _image_bytes(image))
    await artifacts.aput_bytes(marker, json.dumps({"class": class_noun, "count": count}).encode())
    return images


async def train_subject(ctx: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any] | None:
    """Train a subject's LoRA adapter with prior preservation, save it, render samples."""
    from engine.training import (
        TrainConfig,
        instance_prompt,
        native_resolution,
        save_adapter,
        train_lora,
    )

    request = TrainRequest.model_validate(payload)
    settings: Settings = ctx["settings"]
    artifacts: ArtifactStore = ctx["artifacts"]
    report = ProgressReporter(
        ctx["redis"],
        asyncio.get_running_loop(),
        request.reply_queue,
        request.job_id,
        settings.progress_interval,
    )
    started = time.monotonic()
    try:
        _check_model(settings, request.base_model)
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
        async with ctx["torch_lock"]:
            resolution = cfg.resolution or native_resolution(ctx["pipe"])
            class_images: list[Image.Image] = []
            if cfg.prior_loss_weight > 0 and cfg.class_images > 0:
                class_images = await _class_images(
                    ctx, request.class_noun, resolution, cfg.class_images, report
                )

            def on_step(step: int, total: int, loss: float) -> None:
                report("training", step, total, loss)

            outcome = await asyncio.to_thread(
                train_lora,
                ctx["pipe"],
                photos,
                class_images,
                request.token,
                request.class_noun,
                cfg,
                progress=on_step,
            )
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
                    save_adapter,
                    outcome.state_dict,
                    local,
                    metadata,
                    lora_config=outcome.lora_config,
                )
                await asyncio.to_thread(artifacts.put_file, request.adapter_url, local)
            sample_urls = await _render(
                ctx,
                report,
                phase="sampling",
                prompt=instance_prompt(request.token, request.class_noun),
                negative="",
                count=settings.sample_count,
                seed=0,
                steps=settings.generate_steps,
                guidance=settings.guidance_scale,
                width=None,
                height=None,
                adapters=[(request.subject_id, request.adapter_url, 1.0)],
                output_url=request.samples_url,
            )
        result = TrainResult(
            job_id=request.job_id,
            subject_id=request.subject_id,
            adapter_url=request.adapter_url,
            sample_urls=[u for u, _ in sample_urls],
            steps=steps,
            seconds=time.monotonic() - started,
        )
    except Exception as exc:
        await _fail(ctx, request.reply_queue, request.job_id, exc)
        return None
    await _reply(ctx, DELIVER_RESULT, request.reply_queue, request.job_id, result.model_dump())
    return result.model_dump()


async def _render(
    ctx: dict[str, Any],
    report: ProgressReporter,
    *,
    phase: str,
    prompt: str,
    negative: str,
    count: int,
    seed: int,
    steps: int,
    guidance: float,
    width: int | None,
    height: int | None,
    adapters: list[tuple[str, str, float]],
    output_url: str,
) -> list[tuple[str, Image.Image]]:
    """Generate ``count`` images as one batch and store them as PNGs with metadata."""
    if count <= 0:
        return []
    settings: Settings = ctx["settings"]
    artifacts: ArtifactStore = ctx["artifacts"]
    local_adapters = []
    for name, url, scale in adapters:
        if not url or not await asyncio.to_thread(artifacts.exists, url):
            raise EngineError("the subject's adapter file is missing; train the subject again.")
        path = await asyncio.to_thread(artifacts.fetch_local, url, ctx["cache_dir"])
        local_adapters.append((name, path, scale))

    def on_step(step: int, total: int) -> None:
        report(phase, step, total)

    images = await asyncio.to_thread(
        ctx["generator"].generate,
        prompt,
        negative_prompt=negative,
        count=count,
        seed=seed,
        steps=steps,
        guidance=guidance,
        width=width,
        height=height,
        adapters=local_adapters,
        progress=on_step,
    )
    stored = []
    for i, image in enumerate(images):
        url = f"{output_url}/{i:02d}.png"
        metadata = {
            "prompt": prompt,
            "negative_prompt": negative,
            "seed": str(seed),
            "index": str(i),
            "steps": str(steps),
            "guidance": str(guidance),
            "model": settings.base_model,
            "subjects": ",".join(name for name, _, _ in adapters),
        }
        await artifacts.aput_bytes(url, encode_png(image, metadata))
        stored.append((url, image))
    return stored


async def generate(ctx: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any] | None:
    """Generate images for a prompt, with the requested subject adapters active."""
    request = GenerateRequest.model_validate(payload)
    settings: Settings = ctx["settings"]
    report = ProgressReporter(
        ctx["redis"],
        asyncio.get_running_loop(),
        request.reply_queue,
        request.job_id,
        settings.progress_interval,
    )
    started = time.monotonic()
    try:
        _check_model(settings, request.base_model)
        steps = min(request.steps or settings.generate_steps, 150)
        guidance = settings.guidance_scale if request.guidance is None else request.guidance
        async with ctx["torch_lock"]:
            stored = await _render(
                ctx,
                report,
                phase="generating",
                prompt=request.prompt,
                negative=request.negative_prompt,
                count=request.count,
                seed=request.seed,
                steps=steps,
                guidance=guidance,
                width=request.width,
                height=request.height,
                adapters=[(a.name, a.url, a.scale) for a in request.adapters],
                output_url=request.output_url,
            )
        width, height = stored[0][1].size
        result = GenerateResult(
            job_id=request.job_id,
            image_urls=[u for u, _ in stored],
            seed=request.seed,
            width=width,
            height=height,
            steps=steps,
            seconds=time.monotonic() - started,
        )
    except Exception as exc:
        await _fail(ctx, request.reply_queue, request.job_id, exc)
        return None
    await _reply(ctx, DELIVER_RESULT, request.reply_queue, request.job_id, result.model_dump())
    return result.model_dump()


class WorkerSettings:
    """arq settings for the engine worker (attributes are ``arq.Worker`` keyword arguments)."""

    functions = (train_subject, generate)
    queue_name = ENGINE_QUEUE
    on_startup = startup
    on_shutdown = shutdown
    # One torch job at a time per engine process: the GPU is the bottleneck.
    max_jobs = 1
    job_timeout = 3 * 3600
    keep_result = 3600
    max_tries = 3
    poll_delay = 0.2


def engine_worker_kwargs(settings: Settings) -> dict[str, Any]:
    """Keyword overrides for ``arq.worker.create_worker(WorkerSettings, ...)``."""
    return {
        "redis_settings": RedisSettings.from_dsn(settings.redis_url),
        "job_timeout": settings.job_timeout,
        "ctx": {"settings": settings},
    }


assert TRAIN_SUBJECT == train_subject.__name__ and GENERATE == generate.__name__
