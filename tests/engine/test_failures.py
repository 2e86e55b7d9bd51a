"""Bad input and broken surroundings: each gets a message the user can read, the engine keeps
serving, and nothing half-written is taken as done. Real Redis, real files, the tiny model."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from arq import ArqRedis, create_pool
from arq.jobs import Job as ArqJob
from PIL import Image

from bot.connections import redis_settings
from bot.redis_server import RedisServer
from engine.api import (
    DELIVER_FAILURE,
    DELIVER_PROGRESS,
    DELIVER_RESULT,
    GENERATE,
    AdapterRef,
    GenerateRequest,
    GenerateResult,
)
from engine.artifacts import ArtifactStore, local_path
from engine.generate_job import generate, showcase
from engine.reporting import answer_job
from engine.train_job import checkpoint_url, train_subject
from tests.conftest import engine_queue
from tests.engine.conftest import engine_context
from tests.engine.test_generate_job import a_request, generation_worker
from tests.engine.test_training_job import short_recipe, train_request

REPLY_QUEUE = "dreambot:bot:job-test"


async def answers(redis: ArqRedis, job_id: str | None = None) -> dict[str, dict[str, Any]]:
    """The answers (results and failures; progress left out) waiting in the bot's queue, of
    job ``job_id`` or of any: function name → payload."""
    found = {}
    for job in await redis.queued_jobs(queue_name=REPLY_QUEUE):
        if job.function != DELIVER_PROGRESS and job_id in (None, job.args[0]["job_id"]):
            found[job.function] = job.args[0]
    return found


@pytest.fixture
async def redis(redis_clean: str) -> AsyncIterator[ArqRedis]:
    """A pool on the test Redis, set up as the engine's (retrying a dropped connection)."""
    pool = await create_pool(redis_settings(redis_clean))
    try:
        yield pool
    finally:
        await pool.aclose()


# Without the model: the answer path, requests, the artifact store.


async def test_an_answer_sent_while_redis_is_down_arrives_once_it_is_back(
    tmp_path: Path,
) -> None:
    server = RedisServer(tmp_path / "redis", persistent=True).start()
    redis = await create_pool(redis_settings(server.url))
    request = GenerateRequest(
        job_id="job-outage",
        reply_queue=REPLY_QUEUE,
        prompt="a fox",
        seed=1,
        output_url="file:///nowhere",
        base_model="tiny",
    )
    result = GenerateResult(
        job_id=request.job_id, image_urls=[], seed=1, width=64, height=64, steps=2, seconds=1
    )

    def restart_later() -> None:
        threading.Event().wait(8)  # longer than the connection's own few retries
        server.start()

    restart = threading.Thread(target=restart_later)

    async def work() -> GenerateResult:
        server.stop()  # Redis goes away as the job ends ...
        restart.start()  # ... and comes back a while later
        return result

    try:
        async with asyncio.timeout(60):
            answered = await answer_job(redis, request, work)
        assert answered == result.model_dump()
        assert await answers(redis) == {DELIVER_RESULT: result.model_dump()}
    finally:
        await redis.aclose()
        if restart.is_alive():
            await asyncio.to_thread(restart.join)
        server.stop()


@pytest.mark.parametrize(
    ("job", "payload"),
    [
        (generate, {"prompt": "a fox", "seed": 1, "aspect": "panorama"}),
        (showcase, {"token": "zqv"}),
        (train_subject, {"subject_id": "rex", "photo_urls": "not a list"}),
    ],
    ids=["generate", "showcase", "train"],
)
async def test_a_request_the_engine_cannot_read_is_answered_with_a_failure(
    redis: ArqRedis, job: Any, payload: dict[str, Any]
) -> None:
    # A bot of another release, say, sends what this engine's API does not accept.
    request = {"job_id": "job-unreadable", "reply_queue": REPLY_QUEUE, **payload}

    assert await job({"redis": redis}, request) is None

    failure = (await answers(redis))[DELIVER_FAILURE]
    assert failure["job_id"] == "job-unreadable"
    assert "could not read" in failure["message"] and "internal error" not in failure["message"]


def test_a_write_cut_short_by_a_full_disk_leaves_nothing_behind(tmp_path: Path) -> None:
    store = tmp_path / "artifacts"
    # A file size limit makes the kernel refuse the write part-way, as a full disk does.
    script = (
        "import resource, signal, sys\n"
        "from engine.artifacts import ArtifactStore\n"
        "store = ArtifactStore(sys.argv[1])\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
        "try:\n"
        "    store.put_bytes(store.url('subjects', 'rex', 'adapter.safetensors'), b'x' * 65536)\n"
        "except OSError as exc:\n"
        "    print(type(exc).__name__, exc.__cause__.errno)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, store.as_uri()],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parents[2],
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ArtifactWriteError", "27"]  # EFBIG: refused ...
    assert [p.name for p in store.rglob("*") if p.is_file()] == []  # ... and left no part


def test_first_uses_of_a_remote_adapter_at_once_all_get_the_whole_file(tmp_path: Path) -> None:
    # Several generations of a newly trained subject fetch its adapter from the bucket at once.
    store = ArtifactStore(f"memory://bucket-{tmp_path.name}")
    url = store.url("subjects", "rex", "adapter.safetensors")
    data = bytes(range(256)) * 8192  # 2 MiB
    store.put_bytes(url, data)
    for attempt in range(5):
        cache = tmp_path / f"cache-{attempt}"
        got: list[bytes | BaseException] = []

        def fetch(cache: Path = cache, got: list[bytes | BaseException] = got) -> None:
            try:
                got.append(store.fetch_local(url, cache).read_bytes())
            except Exception as exc:
                got.append(exc)

        threads = [threading.Thread(target=fetch) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert got == [data] * 4
        assert [p.name for p in cache.rglob("*") if p.is_file()] == ["adapter.safetensors"]


# With the tiny model: generation.


@pytest.fixture
async def engine_ctx(
    tmp_path: Path, redis_clean: str, tiny_model_dir: Path
) -> AsyncIterator[dict[str, Any]]:
    """The engine's shared ``ctx`` (as its workers get it), with a short recipe and
    two-step generations."""
    async with engine_context(short_recipe(tmp_path, redis_clean, tiny_model_dir)) as ctx:
        yield ctx


def generate_payload(ctx: dict[str, Any], job_id: str, **changes: Any) -> dict[str, Any]:
    """A one-image generation's payload, answered on this file's reply queue."""
    return a_request(ctx, job_id, **{"reply_queue": REPLY_QUEUE, **changes}).model_dump()


async def generated(ctx: dict[str, Any], job_id: str, **changes: Any) -> list[bytes]:
    """The images of a generation that must succeed, as stored."""
    result = await generate(ctx, generate_payload(ctx, job_id, **changes))
    assert result is not None, await answers(ctx["redis"])
    return [ctx["artifacts"].get_bytes(url) for url in result["image_urls"]]


async def failure_of(ctx: dict[str, Any], job: Any, payload: dict[str, Any]) -> str:
    """The message a job that must fail answers with."""
    assert await job(ctx, payload) is None
    found = await answers(ctx["redis"], payload["job_id"])
    assert set(found) == {DELIVER_FAILURE}
    message: str = found[DELIVER_FAILURE]["message"]
    return message


def adapter_bytes(ctx: dict[str, Any]) -> bytes:
    """A real adapter file: one training step on the engine's own pipeline."""
    from engine.training import TrainConfig, save_adapter, train_lora

    pipe = ctx["models"][ctx["settings"].base_model].pipe
    photo = Image.new("RGB", (64, 64), (200, 30, 30))
    outcome = train_lora(pipe, [photo], [], "zqv", "dog", TrainConfig(steps=1))
    path = Path(ctx["cache_dir"]) / "made.safetensors"
    save_adapter(outcome.state_dict, path, {}, lora_config=outcome.lora_config)
    return path.read_bytes()


@pytest.mark.model
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
async def test_a_damaged_adapter_is_reported_and_the_engine_keeps_drawing(
    engine_ctx: dict[str, Any], damage: str
) -> None:
    ctx, artifacts = engine_ctx, engine_ctx["artifacts"]
    whole = adapter_bytes(ctx)
    good = artifacts.url("subjects", "good", "adapter.safetensors")
    artifacts.put_bytes(good, whole)
    bad = artifacts.url("subjects", "bad", "adapter.safetensors")
    artifacts.put_bytes(bad, whole[: len(whole) // 2] if damage == "truncated" else b"\0" * 64)
    plain = await generated(ctx, "before")
    with_good = await generated(ctx, "good-1", adapters=[AdapterRef(name="good", url=good)])

    for job, payload in [
        (generate, generate_payload(ctx, "damaged", adapters=[AdapterRef(name="bad", url=bad)])),
        (
            showcase,
            {
                "job_id": "damaged-showcase",
                "reply_queue": REPLY_QUEUE,
                "subject": {"name": "bad", "url": bad},
                "token": "zqv",
                "class_noun": "dog",
                "name": "rex",
                "output_url": artifacts.url("outputs", "damaged-showcase"),
                "base_model": ctx["settings"].base_model,
            },
        ),
    ]:
        message = await failure_of(ctx, job, payload)
        assert "adapter" in message and "damaged" in message and "train" in message

    # The failed load left nothing behind: the base model and the good subject draw as before.
    assert await generated(ctx, "after") == plain
    assert await generated(ctx, "good-2", adapters=[AdapterRef(name="good", url=good)]) == (
        with_good
    )


@pytest.mark.model
async def test_a_subject_forgotten_while_its_image_waited_is_reported(
    engine_ctx: dict[str, Any],
) -> None:
    artifacts: ArtifactStore = engine_ctx["artifacts"]
    url = artifacts.url("subjects", "rex", "adapter.safetensors")
    payload = generate_payload(engine_ctx, "forgotten", adapters=[AdapterRef(name="rex", url=url)])
    # /forget deleted the subject's folder before the engine took the job.

    message = await failure_of(engine_ctx, generate, payload)

    assert message == "the subject's adapter file is missing; train the subject again."
    output = local_path(payload["output_url"])
    assert output is not None and not output.exists()


@pytest.mark.model
async def test_varying_an_image_that_is_no_longer_stored_is_reported(
    engine_ctx: dict[str, Any],
) -> None:
    [url] = (await generate(engine_ctx, generate_payload(engine_ctx, "first")) or {})["image_urls"]
    path = local_path(url)
    assert path is not None
    path.unlink()

    message = await failure_of(
        engine_ctx, generate, generate_payload(engine_ctx, "vary", init_image_url=url)
    )

    assert "no longer stored" in message and "internal error" not in message


@pytest.mark.model
async def test_a_preview_that_cannot_be_stored_does_not_stop_the_image(
    engine_ctx: dict[str, Any],
) -> None:
    ctx = {
        **engine_ctx,
        "settings": engine_ctx["settings"].model_copy(update={"preview_interval": 1e-6}),
    }
    payload = generate_payload(ctx, "no-previews", previews=True, steps=4)
    output = local_path(payload["output_url"])
    assert output is not None
    output.mkdir(parents=True)
    (output / "previews").write_bytes(b"a file where the previews' folder would go")

    result = await generate(ctx, payload)

    assert result is not None and len(result["image_urls"]) == 1
    assert set(await answers(ctx["redis"])) == {DELIVER_RESULT}


@pytest.mark.model
async def test_seeds_at_their_bounds_and_four_images_at_the_widest_aspect_are_drawn(
    engine_ctx: dict[str, Any],
) -> None:
    for seed in (0, 2**32 - 1):  # what the bot accepts
        assert len(await generated(engine_ctx, f"seed-{seed}", seed=seed)) == 1
    wide = await generate(engine_ctx, generate_payload(engine_ctx, "wide", count=4, aspect="wide"))
    assert wide is not None and len(wide["image_urls"]) == 4
    assert (wide["width"], wide["height"]) == (88, 48)


@pytest.mark.model
async def test_a_job_the_engine_stopped_on_too_often_is_answered_not_dropped(
    engine_ctx: dict[str, Any],
) -> None:
    from engine.worker import ENGINE_TRIES

    redis: ArqRedis = engine_ctx["redis"]
    payload = generate_payload(engine_ctx, "job-crashing")
    async with generation_worker(dict(engine_ctx)):  # a copy: the worker sets its own redis
        # Its engine died (or was restarted) during each of its runs so far.
        await redis.enqueue_job(
            GENERATE,
            payload,
            _job_id="job-crashing",
            _queue_name=engine_queue(engine_ctx["settings"]),
            _job_try=ENGINE_TRIES + 1,
        )
        job = ArqJob("job-crashing", redis, _queue_name=engine_queue(engine_ctx["settings"]))
        assert await job.result(timeout=20, poll_delay=0.05) is None

    failure = (await answers(redis))[DELIVER_FAILURE]
    assert f"stopped {ENGINE_TRIES} times" in failure["message"]
    output = local_path(payload["output_url"])
    assert output is not None and not output.exists()


# With the tiny model: training.


@pytest.mark.model
@pytest.mark.parametrize("loss", ["forgotten", "damaged"])
async def test_a_training_whose_photos_are_lost_is_reported(
    engine_ctx: dict[str, Any], loss: str
) -> None:
    artifacts: ArtifactStore = engine_ctx["artifacts"]
    request = train_request(engine_ctx, "rex")
    if loss == "forgotten":  # /forget while the training waited in the queue
        await artifacts.adelete_tree(artifacts.url("subjects", "rex"))
    else:
        artifacts.put_bytes(request.photo_urls[0], b"\xff\xd8 not a photo any more")

    message = await failure_of(engine_ctx, train_subject, request.model_dump())

    assert "photos" in message and "/train" in message and "internal error" not in message
    assert not artifacts.exists(request.adapter_url)


@pytest.mark.model
async def test_a_damaged_class_image_cache_is_drawn_again(engine_ctx: dict[str, Any]) -> None:
    artifacts: ArtifactStore = engine_ctx["artifacts"]
    first = await train_subject(engine_ctx, train_request(engine_ctx, "rex").model_dump())
    assert first is not None
    cache = local_path(artifacts.url("priors"))
    assert cache is not None
    [damaged, *_] = sorted(cache.rglob("0*.png"))
    damaged.write_bytes(damaged.read_bytes()[:100])  # a disk error, a partial copy ...

    second = await train_subject(engine_ctx, train_request(engine_ctx, "fido").model_dump())

    assert second is not None, await answers(engine_ctx["redis"])
    Image.open(damaged).load()  # whole again


@pytest.mark.model
async def test_a_damaged_checkpoint_is_ignored_and_training_starts_over(
    engine_ctx: dict[str, Any],
) -> None:
    artifacts: ArtifactStore = engine_ctx["artifacts"]
    request = train_request(engine_ctx, "rex")
    artifacts.put_bytes(checkpoint_url(request), b"PK\x03\x04 half a checkpoint")

    result = await train_subject(engine_ctx, request.model_dump())

    assert result is not None and artifacts.exists(request.adapter_url)
    assert not artifacts.exists(checkpoint_url(request))


@pytest.mark.model
async def test_an_adapter_the_store_cannot_take_is_reported_and_nothing_is_kept(
    engine_ctx: dict[str, Any],
) -> None:
    artifacts: ArtifactStore = engine_ctx["artifacts"]
    request = train_request(engine_ctx, "rex")
    blocked = local_path(artifacts.url("unwritable"))
    assert blocked is not None
    blocked.write_bytes(b"a file where a folder should be: writing below it fails")
    request.adapter_url = artifacts.url("unwritable", "adapter.safetensors")

    message = await failure_of(engine_ctx, train_subject, request.model_dump())

    assert "could not save" in message and "internal error" not in message
    store = local_path(artifacts.base_url)
    assert store is not None
    assert not [p for p in store.rglob("*") if p.suffix in (".tmp", ".safetensors")]
    # The engine goes on serving.
    assert len(await generated(engine_ctx, "after")) == 1
