"""The ``train_subject`` engine job: class priors (cached), LoRA training, adapter, samples."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import json
import logging
import re
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from bot.config import TINY_MODEL_FOLDERS, Settings
from engine.api import TrainRequest, TrainResult
from engine.artifacts import ArtifactStore, BackgroundWrites
from engine.generate_job import render_showcase_grid
from engine.images import open_rgb
from engine.reporting import (
    TIME_LIMIT_MARGIN,
    CancelWatch,
    EngineError,
    JobCancelled,
    ProgressReporter,
    answer_job,
    cancel_requested,
    job_reporter,
    read_request,
    run_in_thread,
)

if TYPE_CHECKING:
    from engine.models import ServedModel
    from engine.training import TrainConfig, TrainOutcome

log = logging.getLogger(__name__)

RECIPE_VERSION = "2"
"""Bumped when the training recipe changes what an adapter learns; part of its fingerprint."""


def model_key(source: str) -> str:
    """A short stable name for a base model (its configured path), used to key caches."""
    if source in TINY_MODEL_FOLDERS:
        return TINY_MODEL_FOLDERS[source]
    slug = re.sub(r"[^a-z0-9]+", "-", Path(source).name.lower()).strip("-")[:40]
    return f"{slug}-{hashlib.sha1(source.encode()).hexdigest()[:8]}"


def class_slug(class_noun: str) -> str:
    """The class noun as a safe path segment."""
    return re.sub(r"[^a-z0-9]+", "-", class_noun.lower()).strip("-") or "thing"


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


async def _open_all(images: list[bytes]) -> list[Image.Image]:
    # Decoding dozens of photos or priors would stall the loop that renews the job's lease.
    return await asyncio.to_thread(list, map(open_rgb, images))


async def class_images(
    ctx: dict[str, Any],
    model: ServedModel,
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
        model.key,
        f"{class_slug(class_noun)}-{resolution}px-{count}",
    )
    marker = f"{folder}/complete.json"
    if await asyncio.to_thread(artifacts.exists, marker):
        urls = [u for u in await asyncio.to_thread(artifacts.list, folder) if u.endswith(".png")]
        try:
            cached = await _open_all([await artifacts.aget_bytes(u) for u in urls])
        except OSError as exc:  # a damaged or vanished file: every later training would fail
            log.warning("class images %s are damaged, drawing them again: %s", folder, exc)
        else:
            if len(cached) == count:
                return cached
            log.warning("class images %s: %d of %d, drawing them again", folder, len(urls), count)
        await artifacts.adelete_tree(folder)

    gpu = ctx["gpu"]

    def after_batch(done: int, total: int) -> None:
        report("class-priors", done, total)
        # Drawing the priors can take minutes: between batches, let waiting generations use
        # the GPU and stop if the job was cancelled, as between chunks of training steps.
        gpu.yield_to_generations()
        watch.raise_if_cancelled()

    def work() -> list[Image.Image]:
        with gpu.training(cancel=watch.event):
            watch.raise_if_cancelled()
            images: list[Image.Image] = generate_class_images(
                model.pipe,
                class_noun,
                count,
                resolution,
                seed=0,
                steps=settings.generate_steps,
                progress=after_batch,
            )
            return images

    images: list[Image.Image] = await run_in_thread(watch, work)
    for i, image in enumerate(images):
        await artifacts.aput_bytes(f"{folder}/{i:04d}.png", await asyncio.to_thread(_png, image))
    # The marker goes last: a crash halfway leaves no "complete" cache behind.
    await artifacts.aput_bytes(marker, json.dumps({"class": class_noun, "count": count}).encode())
    return images


async def train_subject(ctx: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any] | None:
    """Train a subject's LoRA adapter with prior preservation, save it, render samples."""
    request = await read_request(ctx["redis"], TrainRequest, payload)
    if request is None:
        return None
    report = job_reporter(ctx, request)
    watch = CancelWatch()

    async def work() -> TrainResult:
        async with watch.watching(ctx["redis"], request.job_id):
            return await _train(ctx, request, report, watch)

    async def forget_checkpoint() -> None:
        # The job is over for good (arq does not retry a job that answered), so its
        # checkpoint could never be resumed.
        await ctx["artifacts"].adelete_tree(checkpoint_url(request))

    try:
        return await answer_job(
            ctx["redis"],
            request,
            work,
            on_failure=forget_checkpoint,
            time_limit=ctx["settings"].job_timeout - TIME_LIMIT_MARGIN,
        )
    except asyncio.CancelledError:
        # arq aborted the job. A moderator's cancel (the bot sets the cancel key, then aborts)
        # ends it for good: drop its checkpoint. An engine shutting down sets no key: arq runs
        # the job again, and it resumes from the checkpoint.
        if await cancel_requested(ctx["redis"], request.job_id):
            await forget_checkpoint()
        raise


def checkpoint_url(request: TrainRequest) -> str:
    """Where the job keeps its training checkpoint: beside the adapter, so forgetting the
    subject removes it too."""
    return request.adapter_url.rsplit("/", 1)[0] + "/training-checkpoint.pt"


async def _train_adapter(
    ctx: dict[str, Any],
    model: ServedModel,
    request: TrainRequest,
    cfg: TrainConfig,
    key: str,
    photo_bytes: list[bytes],
    report: ProgressReporter,
    watch: CancelWatch,
) -> None:
    """Train (or resume training) the subject's adapter and write it, atomically, with its
    metadata; checkpoints go to the artifact store every ``train_checkpoint_steps`` steps,
    written on the event loop while training goes on (see ``BackgroundWrites``)."""
    from engine.checkpoints import checkpoint_bytes, load_checkpoint
    from engine.training import TrainingCancelled, native_resolution, save_adapter, train_lora

    settings: Settings = ctx["settings"]
    artifacts: ArtifactStore = ctx["artifacts"]
    try:
        photos = await _open_all(photo_bytes)
    except OSError as exc:  # checked when they were sent: the store damaged them since
        raise EngineError(
            "one of the subject's photos can't be read any more, so nothing was trained. Send "
            "the photos again with /train."
        ) from exc
    resolution = cfg.resolution or native_resolution(model.pipe)
    priors: list[Image.Image] = []
    if cfg.prior_loss_weight > 0 and cfg.class_images > 0:
        priors = await class_images(
            ctx, model, request.class_noun, resolution, cfg.class_images, report, watch
        )
    checkpoint = checkpoint_url(request)
    resume = await asyncio.to_thread(load_checkpoint, artifacts, checkpoint, key)
    if resume is not None:
        log.info("job %s: resuming training from step %d", request.job_id, resume.step)
        report("training", resume.step, cfg.steps)
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

    def work(writes: BackgroundWrites) -> TrainOutcome:
        with gpu.training(cancel=watch.event):
            return train_lora(
                model.pipe,
                photos,
                priors,
                request.token,
                request.class_noun,
                cfg,
                progress=lambda step, total, loss: report("training", step, total, loss),
                should_stop=at_step_boundary,
                resume=resume,
                checkpoint_every=settings.train_checkpoint_steps,
                # Serialised in the training thread (an in-memory copy), stored by the loop
                # while the next steps run: a slow store never holds the GPU.
                on_checkpoint=lambda state: writes.put(checkpoint, checkpoint_bytes(key, state)),
            )

    try:
        # Leaving the block waits for the checkpoint writes still under way, whatever ended
        # the training, so none can land after the checkpoint is deleted below (or by the
        # job's failure or cancellation).
        async with BackgroundWrites(artifacts) as writes:
            outcome = await run_in_thread(watch, work, writes)
    except TrainingCancelled as exc:
        raise JobCancelled from exc
    log.info(
        "job %s: trained steps %d to %d",
        request.job_id,
        resume.step + 1 if resume else 1,
        cfg.steps,
    )
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "adapter.safetensors"
        metadata = {
            "base_model": model.name,
            "base_model_family": model.family.name,
            "subject_id": request.subject_id,
            "token": request.token,
            "class_noun": request.class_noun,
            "steps": str(cfg.steps),
            "rank": str(cfg.rank),
            "alpha": str(cfg.alpha),
            "train_text_encoder": str(cfg.train_text_encoder).lower(),
            "recipe_version": RECIPE_VERSION,
            "fingerprint": key,
        }
        await asyncio.to_thread(
            save_adapter,
            outcome.state_dict,
            local,
            metadata,
            lora_config=outcome.lora_config,
            text_encoder_lora_config=outcome.text_encoder_lora_config,
        )
        # put_file is atomic: a crash leaves either no adapter or the whole one, never half.
        await asyncio.to_thread(artifacts.put_file, request.adapter_url, local)
    await artifacts.adelete_tree(checkpoint)


def gradient_checkpointing(setting: bool | str, sdxl: bool, device: str) -> bool:
    """``DREAMBOT_TRAIN_GRADIENT_CHECKPOINTING``, with "auto" decided as the benchmark says
    (bench/RESULTS.md, H200): SDXL at 1024 px peaked at 26.0 GiB without it and at 12.9 GiB
    with it and 8-bit Adam (8-bit Adam alone changed nothing for SD 1.5's LoRA: 6021 vs 6022
    MiB), so it is on for SDXL on a GPU; SD 1.5 at 512 px peaked at 5.9 GiB without it and
    took 1.8× longer per step with it, so it stays off there, and on the CPU."""
    if isinstance(setting, bool):
        return setting
    return sdxl and device.startswith("cuda")


SPEED_ONLY_FIELDS = frozenset({"compile_backend"})
"""TrainConfig fields that change how fast the weights are computed, not what is learned: left
out of the fingerprint, so turning them on or off keeps finished adapters and checkpoints."""


def recipe(cfg: TrainConfig) -> dict[str, object]:
    """The config fields that make up the run's fingerprint (all but the speed-only ones)."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in SPEED_ONLY_FIELDS}


async def _train(
    ctx: dict[str, Any], request: TrainRequest, report: ProgressReporter, watch: CancelWatch
) -> TrainResult:
    from engine.checkpoints import fingerprint, finished_adapter
    from engine.models import served_model
    from engine.training import TrainConfig

    settings: Settings = ctx["settings"]
    artifacts: ArtifactStore = ctx["artifacts"]
    started = time.monotonic()
    model = served_model(ctx, request.base_model)
    steps = min(request.steps or settings.train_steps, settings.train_steps)
    cfg = TrainConfig(
        steps=steps,
        learning_rate=settings.train_learning_rate,
        rank=settings.train_rank,
        alpha=settings.train_rank,
        prior_loss_weight=settings.prior_loss_weight,
        class_images=settings.class_images,
        random_flip=settings.train_random_flip,
        random_crops=settings.train_random_crops,
        gradient_checkpointing=gradient_checkpointing(
            settings.train_gradient_checkpointing, model.family.is_sdxl, ctx["device"]
        ),
        optimizer=settings.train_optimizer,
        train_text_encoder=settings.train_text_encoder,
        text_encoder_learning_rate=settings.train_text_encoder_lr,
        compile_backend="inductor" if settings.train_compile else None,
    )
    report("loading", 0, len(request.photo_urls))
    try:
        photo_bytes = [await artifacts.aget_bytes(u) for u in request.photo_urls]
    except FileNotFoundError as exc:  # the subject was deleted while its training waited
        raise EngineError(
            "the subject's photos are no longer stored (was it deleted with /forget?), so "
            "nothing was trained. Send the photos again with /train."
        ) from exc
    key = await asyncio.to_thread(
        fingerprint,
        photo_bytes,
        {
            "recipe_version": RECIPE_VERSION,
            "base_model": model.name,
            "token": request.token,
            "class_noun": request.class_noun,
            "config": recipe(cfg),
        },
    )
    if await asyncio.to_thread(finished_adapter, artifacts, request.adapter_url, key):
        # A retry of a run that wrote its adapter but died before answering: answer now.
        log.info("job %s: adapter %s is already trained", request.job_id, request.adapter_url)
        report("training", steps, steps)
    else:
        await _train_adapter(ctx, model, request, cfg, key, photo_bytes, report, watch)

    sample_urls: list[str] = []
    withheld = 0
    if settings.sample_count > 0:
        # The sample is the showcase grid: the subject across the paper's five capabilities,
        # drawn as part of the training job (waiting generations still go first).
        grid = await render_showcase_grid(
            ctx,
            subject_id=request.subject_id,
            adapter_url=request.adapter_url,
            token=request.token,
            class_noun=request.class_noun,
            name=request.name or request.token,
            seed=0,
            steps=settings.generate_steps,
            output_url=request.samples_url,
            report=report,
            phase="sampling",
            watch=watch,
            hold_gpu=ctx["gpu"].training,
            safety_check=request.safety_check,
            model=model.name,
        )
        sample_urls, withheld = [grid.url], grid.withheld
    return TrainResult(
        job_id=request.job_id,
        subject_id=request.subject_id,
        adapter_url=request.adapter_url,
        sample_urls=sample_urls,
        steps=steps,
        seconds=time.monotonic() - started,
        withheld=withheld,
    )
