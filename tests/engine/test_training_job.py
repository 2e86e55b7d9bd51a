"""The ``train_subject`` job on an in-process engine: shared class priors and idempotent retries."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from arq import create_pool
from arq.connections import RedisSettings

import engine.train_job
import engine.training
from engine.api import TrainRequest
from engine.artifacts import ArtifactStore, local_path
from engine.reporting import CancelWatch
from engine.train_job import train_subject
from tests.conftest import make_photo, make_settings

pytestmark = pytest.mark.model

REPLY_QUEUE = "dreambot:bot:job-test"


@pytest.fixture
async def engine_ctx(
    tmp_path: Path, redis_clean: str, tiny_model_dir: Path
) -> AsyncIterator[dict[str, Any]]:
    """The engine's shared ``ctx`` (as its workers get it) for a short training recipe."""
    from engine.worker import load_resources

    settings = make_settings(
        tmp_path / "data",
        redis_clean,
        base_model=str(tiny_model_dir),
        train_steps=2,
        class_images=2,
        generate_steps=2,
        sample_count=0,
    )
    ctx = await load_resources(settings)
    ctx["redis"] = await create_pool(RedisSettings.from_dsn(redis_clean))
    try:
        yield ctx
    finally:
        await ctx["redis"].aclose()


def train_request(ctx: dict[str, Any], subject_id: str, class_noun: str = "dog") -> TrainRequest:
    """A training job for a new subject whose three photos are in the artifact store."""
    artifacts: ArtifactStore = ctx["artifacts"]
    photo_urls = [artifacts.url("subjects", subject_id, "photos", f"{i}.png") for i in range(3)]
    for i, url in enumerate(photo_urls):
        artifacts.put_bytes(url, make_photo(i, fmt="PNG"))
    return TrainRequest(
        job_id=f"job-{subject_id}",
        reply_queue=REPLY_QUEUE,
        subject_id=subject_id,
        token="zqv",
        class_noun=class_noun,
        photo_urls=photo_urls,
        adapter_url=artifacts.url("subjects", subject_id, "adapter.safetensors"),
        samples_url=artifacts.url("subjects", subject_id, "samples"),
        base_model=ctx["settings"].base_model,
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
