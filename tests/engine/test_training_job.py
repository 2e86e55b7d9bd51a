"""The ``train_subject`` job on an in-process engine: shared class priors and idempotent retries."""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch

import engine.train_job
import engine.training
from bot.config import Settings
from engine.api import TrainRequest, cancel_key
from engine.artifacts import ArtifactStore, local_path
from engine.reporting import CancelWatch
from engine.train_job import checkpoint_url, gradient_checkpointing, train_subject
from tests.conftest import make_photo, make_settings
from tests.engine.conftest import engine_context

pytestmark = pytest.mark.model

REPLY_QUEUE = "dreambot:bot:job-test"


@pytest.fixture
async def engine_ctx(
    tmp_path: Path, redis_clean: str, tiny_model_dir: Path
) -> AsyncIterator[dict[str, Any]]:
    """The engine's shared ``ctx`` (as its workers get it) for a short training recipe."""
    async with engine_context(short_recipe(tmp_path, redis_clean, tiny_model_dir)) as ctx:
        yield ctx


def short_recipe(tmp_path: Path, redis_url: str, model: Path, **extra: Any) -> Settings:
    """Settings for a two-step training with two class images and no samples."""
    return make_settings(
        tmp_path / "data",
        redis_url,
        base_model=str(model),
        train_steps=2,
        class_images=2,
        generate_steps=2,
        sample_count=0,
        **extra,
    )


def train_request(
    ctx: dict[str, Any],
    subject_id: str,
    class_noun: str = "dog",
    *,
    base_model: str | None = None,
    reply_queue: str = REPLY_QUEUE,
) -> TrainRequest:
    """A training job for a new subject whose three photos are in the artifact store, on
    ``base_model`` (default: the configured one)."""
    artifacts: ArtifactStore = ctx["artifacts"]
    photo_urls = [artifacts.url("subjects", subject_id, "photos", f"{i}.png") for i in range(3)]
    for i, url in enumerate(photo_urls):
        artifacts.put_bytes(url, make_photo(i, fmt="PNG"))
    return TrainRequest(
        job_id=f"job-{subject_id}",
        reply_queue=reply_queue,
        subject_id=subject_id,
        token="zqv",
        class_noun=class_noun,
        photo_urls=photo_urls,
        adapter_url=artifacts.url("subjects", subject_id, "adapter.safetensors"),
        samples_url=artifacts.url("subjects", subject_id, "samples"),
        base_model=base_model or ctx["settings"].base_model,
    )


async def test_the_second_subject_of_a_class_reuses_its_cached_class_images(
    engine_ctx: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    drawn: list[str] = []
    draw_class_images = engine.training.generate_class_images

    def counting(pipe: Any, class_noun: str, *args: Any, **kwargs: Any) -> Any:
        drawn.append(class_noun)
        return draw_class_images(pipe, class_noun, *args, **kwargs)

    monkeypatch.setattr(engine.training, "generate_class_images", counting)

    first = await train_subject(engine_ctx, train_request(engine_ctx, "rex").model_dump())
    cache = local_path(engine_ctx["artifacts"].url("priors"))
    assert cache is not None
    cached = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}
    second = await train_subject(engine_ctx, train_request(engine_ctx, "fido").model_dump())

    assert first is not None and second is not None
    assert drawn == ["dog"]
    assert sorted(p.name for p in cached) == ["0000.png", "0001.png", "complete.json"]
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()} == cached


async def test_a_retry_after_the_adapter_was_written_trains_nothing_and_answers_once(
    engine_ctx: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    request = train_request(engine_ctx, "rex")
    first = await train_subject(engine_ctx, request.model_dump())
    adapter = local_path(request.adapter_url)
    assert first is not None and adapter is not None
    written = adapter.stat().st_mtime_ns

    with caplog.at_level("INFO", logger="engine.train_job"):
        second = await train_subject(engine_ctx, request.model_dump())

    assert second is not None
    assert {**second, "seconds": 0} == {**first, "seconds": 0}
    assert "already trained" in caplog.text and "trained steps" not in caplog.text
    assert adapter.stat().st_mtime_ns == written
    answers = await engine_ctx["redis"].zrange(REPLY_QUEUE, 0, -1)
    assert [a for a in answers if a.endswith(b":deliver_result")] == [b"job-rex:deliver_result"]


async def test_a_cancel_while_class_images_are_drawn_stops_after_the_current_batch(
    engine_ctx: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine_ctx["settings"] = engine_ctx["settings"].model_copy(update={"class_images": 8})
    watches: list[CancelWatch] = []

    class RecordedWatch(CancelWatch):
        def __init__(self) -> None:
            super().__init__()
            watches.append(self)

    batches: list[int] = []
    draw_class_images = engine.training.generate_class_images

    def cancelled_after_one_batch(*args: Any, progress: Any, **kwargs: Any) -> Any:
        def on_batch(done: int, total: int) -> None:
            batches.append(done)
            watches[0].event.set()  # a moderator cancels while the priors are drawn
            progress(done, total)

        return draw_class_images(*args, progress=on_batch, **kwargs)

    monkeypatch.setattr(engine.train_job, "CancelWatch", RecordedWatch)
    monkeypatch.setattr(engine.training, "generate_class_images", cancelled_after_one_batch)
    request = train_request(engine_ctx, "rex")

    assert await train_subject(engine_ctx, request.model_dump()) is None
    assert batches == [4]  # of 8 class images, drawn 4 at a time
    answers = await engine_ctx["redis"].zrange(REPLY_QUEUE, 0, -1)
    assert [a for a in answers if b":deliver_" in a] == [b"job-rex:deliver_failure"]
    priors = local_path(engine_ctx["artifacts"].url("priors"))
    assert priors is not None and not list(priors.rglob("complete.json"))


@pytest.mark.parametrize(
    ("setting", "sdxl", "device", "expected"),
    [
        ("auto", True, "cuda", True),
        ("auto", True, "cuda:1", True),
        ("auto", True, "cpu", False),
        ("auto", False, "cuda", False),
        (True, False, "cpu", True),
        (False, True, "cuda", False),
    ],
)
def test_gradient_checkpointing_auto_is_on_for_sdxl_on_a_gpu(
    setting: bool | str, sdxl: bool, device: str, expected: bool
) -> None:
    assert gradient_checkpointing(setting, sdxl, device) is expected


async def _wait_for(condition: Any, within: float = 60.0) -> None:
    async with asyncio.timeout(within):
        while not condition():
            await asyncio.sleep(0.02)


@pytest.mark.parametrize("moderator", [True, False], ids=["moderator-cancel", "shutdown"])
async def test_an_aborted_training_drops_its_checkpoint_only_when_a_moderator_cancelled_it(
    engine_ctx: dict[str, Any], caplog: pytest.LogCaptureFixture, moderator: bool
) -> None:
    # arq aborts the job's task either way: after a moderator's cancel (the bot sets the cancel
    # key first) or when the engine shuts down (no key: arq runs the job again).
    # Few progress messages: cancelling the job's cancel-key poll while it opens a new Redis
    # connection (the pool is busy sending progress) can leave that socket unclosed.
    engine_ctx["settings"] = engine_ctx["settings"].model_copy(
        update={"train_steps": 60, "train_checkpoint_steps": 2, "progress_interval": 60.0}
    )
    request = train_request(engine_ctx, "rex")
    checkpoint = local_path(checkpoint_url(request))
    assert checkpoint is not None
    job = asyncio.create_task(train_subject(engine_ctx, request.model_dump()))
    await _wait_for(checkpoint.exists)
    if moderator:
        await engine_ctx["redis"].set(cancel_key(request.job_id), "testing", ex=60)
    job.cancel()  # what arq's abort (and its shutdown) does to the job's task

    with pytest.raises(asyncio.CancelledError):
        await job
    answers = await engine_ctx["redis"].zrange(REPLY_QUEUE, 0, -1)
    assert [a for a in answers if a.endswith((b":deliver_result", b":deliver_failure"))] == []
    assert checkpoint.exists() is not moderator
    if not moderator:  # the retried job resumes from the checkpoint it kept
        with caplog.at_level("INFO", logger="engine.train_job"):
            assert await train_subject(engine_ctx, request.model_dump()) is not None
        assert "resuming training from step" in caplog.text
        assert not checkpoint.exists()


async def test_checkpoints_are_stored_while_training_goes_on(
    engine_ctx: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    trained = threading.Event()
    waited: list[bool] = []
    stored_steps: list[int] = []

    class SlowStore(ArtifactStore):
        """A store whose checkpoint uploads take until the training has finished."""

        def put_bytes(self, url: str, data: bytes) -> None:
            if url.endswith("training-checkpoint.pt"):
                waited.append(trained.wait(10))
                stored_steps.append(torch.load(io.BytesIO(data), weights_only=True)["step"])
            super().put_bytes(url, data)

    train_lora = engine.training.train_lora

    def training_then_tell(*args: Any, **kwargs: Any) -> Any:
        outcome = train_lora(*args, **kwargs)
        trained.set()
        return outcome

    monkeypatch.setattr(engine.training, "train_lora", training_then_tell)
    engine_ctx["artifacts"] = SlowStore(engine_ctx["artifacts"].base_url)
    engine_ctx["settings"] = engine_ctx["settings"].model_copy(
        update={"train_steps": 6, "train_checkpoint_steps": 2}
    )
    request = train_request(engine_ctx, "rex")

    result = await train_subject(engine_ctx, request.model_dump())

    assert result is not None
    # The training ran on while its first checkpoint was still being uploaded ...
    assert waited and all(waited)
    # ... and every checkpoint was stored, in order, before the finished job deleted it.
    assert stored_steps == [2, 4]
    checkpoint, adapter = local_path(checkpoint_url(request)), local_path(request.adapter_url)
    assert checkpoint is not None and not checkpoint.exists()
    assert adapter is not None and adapter.is_file()
