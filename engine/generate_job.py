"""The ``generate`` and ``showcase`` engine jobs, and rendering images to the artifact store."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from bot.config import Settings
from engine.api import GenerateRequest, GenerateResult, ShowcaseRequest
from engine.artifacts import ArtifactStore, BackgroundWrites
from engine.aspects import aspect_size
from engine.images import encode_png, open_rgb
from engine.previews import encode_preview
from engine.reporting import (
    TIME_LIMIT_MARGIN,
    CancelWatch,
    EngineError,
    ProgressReporter,
    answer_job,
    job_reporter,
    read_request,
    run_in_thread,
)
from engine.safety import SafetyChecker, screen
from engine.showcase import render_showcase

GENERATE_JOB_TIMEOUT = 600
"""arq's timeout for generation jobs, seconds (a batch waits for the GPU, then draws)."""

if TYPE_CHECKING:
    from engine.generation import Generator

log = logging.getLogger(__name__)

MAX_SIDE = 2048


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


def _generator(ctx: dict[str, Any], model: str | None) -> Generator:
    """The warm generator of base model ``model``, or of the engine's default model."""
    from engine.models import served_model

    return served_model(ctx, model or ctx["settings"].base_model).generator


def draw(
    ctx: dict[str, Any],
    *,
    prompt: str | list[str],
    negative: str,
    count: int,
    seed: int,
    steps: int,
    guidance: float,
    width: int | None,
    height: int | None,
    adapters: list[tuple[str, Path, float]],
    on_step: Callable[[int, int], None],
    init_image: Image.Image | None = None,
    init_strength: float = 0.5,
    on_preview: Callable[[int, int, Image.Image], None] | None = None,
    preview_every: float = 3.0,
    model: str | None = None,
) -> list[Image.Image]:
    """Generate ``count`` images (per prompt) as one batch on the warm pipeline of base model
    ``model`` (default: the engine's default model) (blocking)."""
    from engine.generation import AdapterLoadError

    generator = _generator(ctx, model)
    try:
        images: list[Image.Image] = generator.generate(
            prompt,
            negative_prompt=negative,
            count=count,
            seed=seed,
            steps=steps,
            guidance=guidance,
            width=width,
            height=height,
            adapters=adapters,
            init_image=init_image,
            init_strength=init_strength,
            progress=on_step,
            preview=on_preview,
            preview_every=preview_every,
        )
    except AdapterLoadError as exc:
        raise EngineError(
            "the subject's adapter file is damaged and can't be loaded; train the subject again."
        ) from exc
    return images


def safety_checker(ctx: dict[str, Any], wanted: bool) -> SafetyChecker | None:
    """The engine's safety checker when the job asks for the check and the engine has one."""
    return ctx.get("safety") if wanted else None


async def store_images(
    ctx: dict[str, Any],
    images: Sequence[Image.Image | None],
    output_url: str,
    metadata: dict[str, str],
    name: Callable[[int], str] = lambda i: f"{i:02d}.png",
) -> list[str]:
    """Write the images as PNGs with provenance metadata (and the optional invisible
    watermark); return their URLs. A None (an image the safety checker withheld) is not
    written; the others keep their place in the batch as their index (name and metadata)."""
    artifacts: ArtifactStore = ctx["artifacts"]
    urls = []
    for i, image in enumerate(images):
        if image is None:
            continue
        url = f"{output_url}/{name(i)}"
        data = await asyncio.to_thread(encode_png, image, {**metadata, "index": str(i)})
        await artifacts.aput_bytes(url, data)
        urls.append(url)
    return urls


def image_metadata(
    settings: Settings, request: GenerateRequest, steps: int, guidance: float
) -> dict[str, str]:
    """What each PNG records about how it was made."""
    metadata = {
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "seed": str(request.seed),
        "steps": str(steps),
        "guidance": str(guidance),
        "scheduler": "DPM-Solver++",
        "model": request.base_model,
        "subjects": ",".join(a.name for a in request.adapters),
        "subject_tokens": ",".join(a.token for a in request.adapters if a.token),
        "subject_strengths": ",".join(f"{a.scale:g}" for a in request.adapters),
    }
    if request.init_image_url:
        metadata["init_image"] = request.init_image_url
        metadata["init_strength"] = f"{request.init_strength:g}"
    return metadata


def output_size(
    request: GenerateRequest, native: int, init: Image.Image | None
) -> tuple[int | None, int | None]:
    """The size to draw: explicit width/height, else the aspect's size for this model, else
    the init image's (snapped to multiples of 8), else the model's native size (None)."""
    width, height = request.width, request.height
    if (width is None or height is None) and request.aspect is not None:
        aspect_w, aspect_h = aspect_size(request.aspect, native)
        width, height = width or aspect_w, height or aspect_h
    if (width is None or height is None) and init is not None:
        width = width or max(8, init.width // 8 * 8)
        height = height or max(8, init.height // 8 * 8)
    for side in (width, height):
        if side is not None and not 8 <= side <= MAX_SIDE:
            raise EngineError(f"image sides must be from 8 to {MAX_SIDE} pixels.")
    return width, height


def previewer(
    ctx: dict[str, Any],
    request: GenerateRequest,
    report: ProgressReporter,
    phase: str,
    writes: BackgroundWrites,
) -> Callable[[int, int, Image.Image], None] | None:
    """A preview sink that stores each preview beside the outputs and reports its URL (only
    the reference travels through Redis), or None when previews are off. A preview the
    safety checker flags is neither stored nor reported (the progress updates go on without).

    It runs in the torch thread, which holds the GPU: it only checks and encodes the JPEG and
    hands it to ``writes``; the URL is reported once the file is stored.
    """
    settings: Settings = ctx["settings"]
    if not request.previews or settings.preview_interval <= 0:
        return None
    checker = safety_checker(ctx, request.safety_check)

    def send(step: int, total: int, image: Image.Image) -> None:
        if screen(checker, [image])[0] is None:
            return  # flagged: this update goes without a preview
        url = f"{request.output_url}/previews/{step:03d}.jpg"
        writes.put(
            url,
            encode_preview(image),
            then=lambda: report(phase, step, total, preview_url=url),
        )

    return send


async def _open_init_image(ctx: dict[str, Any], url: str) -> Image.Image:
    try:
        data = await ctx["artifacts"].aget_bytes(url)
    except FileNotFoundError as exc:
        raise EngineError(
            "the image to vary or upscale is no longer stored; draw a new one with /imagine."
        ) from exc
    try:
        return await asyncio.to_thread(open_rgb, data)
    except OSError as exc:
        raise EngineError("the image to vary or upscale can't be read.") from exc


async def generate(ctx: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any] | None:
    """Generate images for a prompt with the requested subject adapters active.

    With ``init_image_url`` the images start from that image (img2img: Vary, Upscale); an
    ``init_strength`` of 0 only resizes it (Upscale without an upscaling model). The images
    the safety checker flags (when the request asks for the check) are withheld: not stored,
    not listed, only counted.
    """
    request = await read_request(ctx["redis"], GenerateRequest, payload)
    if request is None:
        return None
    settings: Settings = ctx["settings"]
    report = job_reporter(ctx, request)
    watch = CancelWatch()
    started = time.monotonic()

    async def work() -> GenerateResult:
        from engine.models import served_model

        generator = served_model(ctx, request.base_model).generator
        steps = min(request.steps or settings.generate_steps, settings.generate_max_steps)
        guidance = settings.guidance_scale if request.guidance is None else request.guidance
        guidance = min(max(guidance, 0.0), settings.guidance_max)
        adapters = await fetch_adapters(ctx, [(a.name, a.url, a.scale) for a in request.adapters])
        init = None
        if request.init_image_url:
            init = await _open_init_image(ctx, request.init_image_url)
        width, height = output_size(request, generator.native_size, init)
        checker = safety_checker(ctx, request.safety_check)

        def draw_images(
            on_preview: Callable[[int, int, Image.Image], None] | None,
        ) -> tuple[list[Image.Image], list[Image.Image | None]]:
            """The images, and the same with those the safety checker flags withheld."""
            if init is not None and request.init_strength == 0:
                # No diffusion: a plain Lanczos resize to the requested size; the GPU is only
                # needed for the check.
                size = (width or init.width, height or init.height)
                images = [init.resize(size, Image.Resampling.LANCZOS)] * request.count
                if checker is None:
                    return images, list(images)
                with ctx["gpu"].generation(cancel=watch.event):
                    return images, screen(checker, images)
            with ctx["gpu"].generation(cancel=watch.event):
                watch.raise_if_cancelled()
                images = draw(
                    ctx,
                    prompt=request.prompt,
                    negative=request.negative_prompt,
                    count=request.count,
                    seed=request.seed,
                    steps=steps,
                    guidance=guidance,
                    width=width,
                    height=height,
                    adapters=adapters,
                    init_image=init,
                    init_strength=request.init_strength,
                    on_step=lambda step, total: report("generating", step, total),
                    on_preview=on_preview,
                    preview_every=settings.preview_interval,
                    model=request.base_model,
                )
                return images, screen(checker, images)

        async with watch.watching(ctx["redis"], request.job_id):
            # Leaving the block waits for the previews' writes: they are all stored and
            # reported before the result is.
            async with BackgroundWrites(ctx["artifacts"]) as writes:
                on_preview = previewer(ctx, request, report, "generating", writes)
                images, kept = await run_in_thread(watch, draw_images, on_preview)
        urls = await store_images(
            ctx, kept, request.output_url, image_metadata(settings, request, steps, guidance)
        )
        withheld = kept.count(None)
        if withheld:
            log.info(
                "job %s: the safety checker withheld %d of %d images",
                request.job_id,
                withheld,
                len(kept),
            )
        return _result(request, urls, images[0].size, steps, started, withheld)

    return await answer_job(
        ctx["redis"], request, work, time_limit=GENERATE_JOB_TIMEOUT - TIME_LIMIT_MARGIN
    )


def _result(
    request: GenerateRequest | ShowcaseRequest,
    urls: list[str],
    size: tuple[int, int],
    steps: int,
    started: float,
    withheld: int,
) -> GenerateResult:
    width, height = size
    return GenerateResult(
        job_id=request.job_id,
        image_urls=urls,
        seed=request.seed,
        width=width,
        height=height,
        steps=steps,
        seconds=time.monotonic() - started,
        withheld=withheld,
    )


@dataclass
class StoredGrid:
    """A showcase grid written to the artifact store."""

    url: str
    size: tuple[int, int]
    withheld: int
    """Cells the safety checker withheld (drawn as grey "withheld" tiles)."""


async def render_showcase_grid(
    ctx: dict[str, Any],
    *,
    subject_id: str,
    adapter_url: str,
    token: str,
    class_noun: str,
    name: str,
    seed: int,
    steps: int,
    output_url: str,
    report: ProgressReporter,
    phase: str,
    watch: CancelWatch,
    hold_gpu: Callable[..., AbstractContextManager[Any]],
    safety_check: bool,
    scale: float = 1.0,
    model: str | None = None,
) -> StoredGrid:
    """Draw a subject's showcase grid (``engine.showcase``) and store it.

    ``hold_gpu`` is the GPU scheduler's context for the caller (called with
    ``cancel=watch.event``): a training job takes the GPU as a training, a showcase job queues
    like any generation. With ``safety_check`` the engine's safety checker (if it has one)
    screens the cells; a flagged one is drawn as a grey "withheld" tile. ``model`` is the base
    model's name (default: the engine's default model).
    """
    settings: Settings = ctx["settings"]
    generator = _generator(ctx, model)
    adapters = await fetch_adapters(ctx, [(subject_id, adapter_url, scale)])
    checker = safety_checker(ctx, safety_check)
    batches = 2
    done = 0
    withheld = 0

    def draw_batch(prompts: list[str], batch_seed: int) -> list[Image.Image | None]:
        nonlocal done, withheld
        watch.raise_if_cancelled()
        images = draw(
            ctx,
            prompt=prompts,
            negative="",
            count=1,
            seed=batch_seed,
            steps=steps,
            guidance=settings.guidance_scale,
            width=None,
            height=None,
            adapters=adapters,
            on_step=lambda step, total: report(phase, done * total + step, batches * total),
            model=model,
        )
        done += 1
        cells = screen(checker, images)
        withheld += cells.count(None)
        return cells

    def work() -> Image.Image:
        with hold_gpu(cancel=watch.event):
            grid, _ = render_showcase(
                draw_batch,
                token=token,
                class_noun=class_noun,
                name=name,
                cell_side=generator.native_size,
                seed=seed,
                batch=5,
            )
        return grid

    grid = await run_in_thread(watch, work)
    metadata = {
        "prompt": f"DreamBooth showcase of {token} {class_noun}",
        "seed": str(seed),
        "steps": str(steps),
        "model": model or settings.base_model,
        "subjects": subject_id,
        "subject_tokens": token,
    }
    [url] = await store_images(ctx, [grid], output_url, metadata, name=lambda _: "showcase.png")
    if withheld:
        log.info("showcase %s: the safety checker withheld %d cells", output_url, withheld)
    return StoredGrid(url, grid.size, withheld)


async def showcase(ctx: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any] | None:
    """Render a subject's showcase grid: the paper's five capabilities, two prompts each."""
    request = await read_request(ctx["redis"], ShowcaseRequest, payload)
    if request is None:
        return None
    settings: Settings = ctx["settings"]
    report = job_reporter(ctx, request)
    watch = CancelWatch()
    started = time.monotonic()
    steps = min(request.steps or settings.generate_steps, settings.generate_max_steps)

    async def work() -> GenerateResult:
        from engine.models import served_model

        served_model(ctx, request.base_model)  # EngineError for a model not served here
        async with watch.watching(ctx["redis"], request.job_id):
            grid = await render_showcase_grid(
                ctx,
                subject_id=request.subject.name,
                adapter_url=request.subject.url,
                token=request.token,
                class_noun=request.class_noun,
                name=request.name,
                seed=request.seed,
                steps=steps,
                output_url=request.output_url,
                report=report,
                phase="generating",
                watch=watch,
                hold_gpu=ctx["gpu"].generation,
                safety_check=request.safety_check,
                scale=request.subject.scale,
                model=request.base_model,
            )
        return _result(request, [grid.url], grid.size, steps, started, grid.withheld)

    return await answer_job(
        ctx["redis"], request, work, time_limit=GENERATE_JOB_TIMEOUT - TIME_LIMIT_MARGIN
    )
