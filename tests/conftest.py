"""Shared fixtures: a real Redis server, real SQLite files, photos, and a recording sink."""

from __future__ import annotations

import asyncio
import io
import os
import random
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import aiosqlite
import pytest
from arq.jobs import Job as ArqJob
from PIL import Image, ImageDraw
from redis import Redis

from bot.config import ModelEntry, Settings
from bot.core.delivery import Delivery
from bot.core.store import Job, Owner, Subject, utcnow
from bot.launcher import BotRuntime, open_core
from bot.redis_server import RedisServer
from engine.api import LEGACY_QUEUES, Progress, TrainRequest, engine_queues, model_queue

TEST_PLATFORM = "test"


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis server for the session: DREAMBOT_TEST_REDIS_URL, or a throwaway one."""
    given = os.environ.get("DREAMBOT_TEST_REDIS_URL")
    if given:
        yield given
        return
    server = RedisServer(tmp_path_factory.mktemp("redis"), persistent=False).start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def redis_clean(redis_url: str) -> str:
    """The Redis URL, with its database emptied so each test starts with empty queues."""
    with Redis.from_url(redis_url) as client:
        client.flushdb()
    return redis_url


def make_settings(data_dir: Path, redis_url: str, **overrides: Any) -> Settings:
    """Settings for a test: everything under ``data_dir``, no .env file read."""
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "data_dir": data_dir,
        "progress_interval": 0.0,
        "photo_size": 64,
        "shell_user": "tester",
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture
def settings(tmp_path: Path, redis_clean: str) -> Settings:
    """Test settings on a fresh data folder and an empty Redis."""
    return make_settings(tmp_path / "data", redis_clean)


@pytest.fixture
async def runtime(settings: Settings) -> AsyncIterator[BotRuntime]:
    """The bot's core for the test platform, on a real SQLite file and the real Redis."""
    async with open_core(settings, TEST_PLATFORM) as runtime:
        yield runtime


@pytest.fixture
def owner() -> Owner:
    """A user of the test platform."""
    return Owner(TEST_PLATFORM, "guild-1", "user-1")


def running_job(
    owner: Owner, destination: dict[str, Any], job_id: str = "a" * 32, kind: str = "generate"
) -> Job:
    """A job the engine is working on, as a chat adapter's sink sees it."""
    return Job(
        id=job_id,
        kind=kind,
        owner=owner,
        subject_id=None,
        prompt="a red fox",
        destination=destination,
        status="running",
        result=None,
        error=None,
        created_at="2025-01-01T00:00:00+00:00",
        updated_at="2025-01-01T00:00:00+00:00",
        delivered_at=None,
    )


def training_progress(step: int, total: int = 400) -> Progress:
    """Step ``step`` of a training's progress, for the job ``running_job`` makes."""
    return Progress(job_id="a" * 32, phase="training", step=step, total=total)


async def queued_generate_request(runtime: BotRuntime, job_id: str) -> dict[str, Any]:
    """The payload queued for a generation job (``GenerateRequest`` as a dict)."""
    info = await ArqJob(job_id, runtime.queue, _queue_name=engine_queue(runtime)).info()
    assert info is not None
    request: dict[str, Any] = info.args[0]
    return request


async def ready_subject(runtime: BotRuntime, owner: Owner, name: str, token: str) -> Subject:
    """Store a subject as if its training had finished, on the default base model."""
    now = utcnow()
    subject = Subject(
        id=f"id-{name}-{token}",
        owner=owner,
        name=name,
        class_noun="dog",
        token=token,
        status="ready",
        adapter_url=f"file:///adapters/{name}.safetensors",
        photos_url="file:///photos",
        photo_count=3,
        base_model=runtime.core.settings.base_model,
        error=None,
        created_at=now,
        updated_at=now,
    )
    await runtime.store.insert_subject(subject)
    return subject


def configure_second_model(settings: Settings, name: str = "xl") -> None:
    """Offer a second base model, ``name``, beside the default one (by name: nothing loads)."""
    settings.models = {
        settings.base_model: ModelEntry(path="tiny"),
        name: ModelEntry(path="tiny-sdxl"),
    }


async def queued_train_request(runtime: BotRuntime) -> TrainRequest:
    """The payload of the one training job waiting in the engine's queues (of any model)."""
    queues = engine_queues(runtime.settings.model_names, "train")
    [job_id] = [job for queue in queues for job in await runtime.queue.zrange(queue, 0, -1)]
    info = await runtime.queue._get_job_def(job_id, None)
    return TrainRequest.model_validate(info.args[0])


def make_photo(seed: int, size: tuple[int, int] = (320, 320), fmt: str = "JPEG") -> bytes:
    """A synthetic subject photo: a red square on blue, slightly moved per seed."""
    rng = random.Random(seed)
    image = Image.new("RGB", size, (30, 60, 200))
    draw = ImageDraw.Draw(image)
    w, h = size
    x, y = rng.randint(0, w // 4), rng.randint(0, h // 4)
    draw.rectangle([x + w // 6, y + h // 6, x + w // 2, y + h // 2], fill=(220, 20, 20))
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


class RecordingSink:
    """A Sink that records what an adapter would have posted."""

    def __init__(self) -> None:
        self.progress: list[tuple[str, str, Progress]] = []
        self.results: dict[str, Delivery] = {}
        self.failures: dict[str, str] = {}
        self.result_count = 0
        self._changed = asyncio.Event()

    async def show_progress(self, job: Job, text: str, progress: Progress) -> None:
        self.progress.append((job.id, text, progress))

    async def show_result(self, delivery: Delivery) -> None:
        self.results[delivery.job.id] = delivery
        self.result_count += 1
        self._changed.set()

    async def show_failure(self, job: Job, text: str) -> None:
        self.failures[job.id] = text
        self.result_count += 1
        self._changed.set()

    async def wait_for(self, job_id: str, within: float = 120.0) -> Delivery | str:
        """The delivery (or failure text) of ``job_id`` once it arrives."""
        async with asyncio.timeout(within):
            while job_id not in self.results and job_id not in self.failures:
                self._changed.clear()
                await self._changed.wait()
        return self.results.get(job_id) or self.failures[job_id]


@pytest.fixture
def sink() -> RecordingSink:
    """A recording sink."""
    return RecordingSink()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Stable Diffusion model, built once for the session."""
    from engine.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sd")


def engine_queue(
    runtime: BotRuntime | Settings, kind: str = "generate", model: str | None = None
) -> str:
    """The engine queue of ``kind`` jobs ("train", "generate") for base model ``model`` (default:
    the default model of ``runtime``'s bot, or of these settings): where the bot sends them."""
    settings = runtime if isinstance(runtime, Settings) else runtime.settings
    return model_queue(kind, model or settings.base_model)


async def make_legacy(runtime: BotRuntime, job_id: str, kind: str = "generate") -> None:
    """Make a job just queued on the default model look like one an older release queued: on
    its kind's legacy queue (at the same place in time), with no queue recorded."""
    queue = engine_queue(runtime, kind)
    score = await runtime.queue.zscore(queue, job_id)
    assert score is not None
    await runtime.queue.zrem(queue, job_id)
    await runtime.queue.zadd(LEGACY_QUEUES[kind], {job_id: score})
    job = await runtime.store.get_job(job_id)
    assert job is not None
    options = {key: value for key, value in job.options.items() if key != "queue"}
    await runtime.store.update_job(job_id, options=options)


async def queued(redis: Any) -> int:
    """How many engine jobs wait (or run) in all the engine's queues, of every model."""
    queues = [key async for key in redis.scan_iter(match="dreambot:engine:*", _type="zset")]
    return sum([int(await redis.zcard(queue)) for queue in queues])


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random SDXL-shaped model, built once for the session."""
    from engine.tiny import build_tiny_sdxl_model

    return build_tiny_sdxl_model(tmp_path_factory.mktemp("models") / "tiny-sdxl")


async def table_rows(
    db: aiosqlite.Connection, tables: Sequence[str]
) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of each table, in insertion order (to compare a database before and after a
    migration)."""
    rows = {}
    for table in tables:
        async with db.execute(f"SELECT * FROM {table} ORDER BY rowid") as cursor:
            rows[table] = [tuple(row) for row in await cursor.fetchall()]
    return rows
