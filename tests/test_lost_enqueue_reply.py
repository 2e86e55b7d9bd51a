"""Queueing when Redis stops answering in the middle of a submission, against a real Redis.

A small TCP proxy sits between a core's Redis client and the real server and breaks arq's
enqueue transaction (MULTI … EXEC): either Redis runs it and the reply is lost, or it never
reaches Redis; after that the proxy can go silent (Redis unreachable). Whatever happened, no
job and no result may be lost, and the user is told what is known.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Literal
from urllib.parse import urlsplit

import pytest
from arq import create_pool
from arq.constants import job_key_prefix
from redis.exceptions import RedisError

from bot.connections import redis_settings
from bot.core import commands
from bot.core.commands import Core, Receipt
from bot.core.delivery import Delivery
from bot.core.errors import UserError
from bot.core.photos import Upload
from bot.core.store import Owner, Usage
from bot.launcher import BotRuntime, delivering
from engine.api import DELIVER_RESULT, TrainResult, bot_queue
from tests.conftest import TEST_PLATFORM, RecordingSink, engine_queue, make_photo

DEST = {"channel": "c1"}
Kind = Literal["train", "generate"]


class RedisProxy:
    """A TCP proxy to Redis that can break the next transaction and then stop answering."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.url = ""
        self.dropped_requests = 0
        self.dropped_replies = 0
        self._server: asyncio.Server | None = None
        self._reach_redis: bool | None = None  # armed: whether the next EXEC reaches Redis
        self._silence_after = False
        self._silent = False
        self._hold = False  # armed: hold the next EXEC's reply until release()
        self.reply_held = asyncio.Event()
        self._released = asyncio.Event()
        self._relays: set[asyncio.Task[None]] = set()

    async def start(self, redis_url: str) -> RedisProxy:
        """Listen on a free port; ``url`` is then ``redis_url`` pointed at the proxy."""
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        parts = urlsplit(redis_url)
        userinfo = parts.netloc.rpartition("@")[0]
        address = f"127.0.0.1:{port}"
        self.url = parts._replace(netloc=f"{userinfo}@{address}" if userinfo else address).geturl()
        return self

    async def close(self) -> None:
        """Stop listening and cut every connection."""
        assert self._server is not None
        self._server.close()
        for relay in list(self._relays):
            relay.cancel()
        await asyncio.gather(*self._relays, return_exceptions=True)
        await self._server.wait_closed()

    def break_next_transaction(self, *, reach_redis: bool, then_go_silent: bool = False) -> None:
        """Drop the connection of the next MULTI … EXEC: after Redis ran it, instead of relaying
        its reply (``reach_redis``), or before it reaches Redis. With ``then_go_silent``, every
        connection is cut from then on (Redis can't be reached)."""
        self._reach_redis = reach_redis
        self._silence_after = then_go_silent

    def hold_next_reply(self) -> None:
        """Let the next MULTI … EXEC reach Redis, but hold its reply (``reply_held`` is set
        once Redis has answered) until ``release()``."""
        self._hold = True

    def release(self) -> None:
        self._released.set()

    def _dropped(self) -> None:
        if self._silence_after:
            self._silent = True
            for relay in self._relays - {asyncio.current_task()}:
                relay.cancel()

    async def _relay(self, client_in: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._relays.add(task)
        try:
            if not self._silent:
                redis_in, redis = await asyncio.open_connection(self.host, self.port)
                try:
                    await self._pump(client_in, client, redis_in, redis)
                finally:
                    await _close(redis)
        except asyncio.CancelledError:
            pass
        finally:
            await _close(client)
            self._relays.discard(task)

    async def _pump(
        self,
        client_in: asyncio.StreamReader,
        client: asyncio.StreamWriter,
        redis_in: asyncio.StreamReader,
        redis: asyncio.StreamWriter,
    ) -> None:
        losing_reply = asyncio.Event()
        holding_reply = asyncio.Event()

        async def to_redis() -> None:
            while data := await client_in.read(65536):
                if self._hold and b"EXEC" in data:
                    self._hold = False
                    holding_reply.set()
                if self._reach_redis is not None and b"EXEC" in data:
                    reach, self._reach_redis = self._reach_redis, None
                    if not reach:
                        self.dropped_requests += 1
                        self._dropped()
                        return
                    losing_reply.set()
                redis.write(data)
                await redis.drain()

        async def to_client() -> None:
            lost = b""
            while data := await redis_in.read(65536):
                if holding_reply.is_set():
                    lost += data
                    if b"*" not in lost:
                        continue
                    holding_reply.clear()
                    self.reply_held.set()
                    await self._released.wait()
                    data, lost = lost, b""
                if losing_reply.is_set():
                    # MULTI and the queued commands answer +OK/+QUEUED; EXEC's reply is the
                    # first array. Once it came, Redis has run the transaction: drop it.
                    lost += data
                    if b"*" in lost:
                        self.dropped_replies += 1
                        self._dropped()
                        return
                    continue
                client.write(data)
                await client.drain()

        pumps = [asyncio.create_task(to_redis()), asyncio.create_task(to_client())]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, asyncio.CancelledError):
        await writer.wait_closed()


@pytest.fixture
async def proxy(redis_clean: str) -> AsyncIterator[RedisProxy]:
    """A proxy in front of the test Redis."""
    parts = urlsplit(redis_clean)
    proxy = await RedisProxy(parts.hostname or "127.0.0.1", parts.port or 6379).start(redis_clean)
    try:
        yield proxy
    finally:
        await proxy.close()


@pytest.fixture
async def core(
    runtime: BotRuntime, proxy: RedisProxy, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Core]:
    """A core like the runtime's (same store and artifacts) whose Redis is behind the proxy,
    with the same reconnecting client settings as a bot."""
    monkeypatch.setattr(commands, "SUBMIT_CHECK_SECONDS", 0.5)  # a silent proxy: don't wait 2s
    pool = await create_pool(redis_settings(proxy.url))
    try:
        yield Core(runtime.settings, runtime.store, runtime.core.artifacts, pool, TEST_PLATFORM)
    finally:
        await pool.aclose()


async def _submit(core: Core, owner: Owner, kind: Kind) -> Receipt:
    if kind == "train":
        photos = [Upload(f"p{i}.jpg", make_photo(i)) for i in range(3)]
        return await core.train(owner, DEST, "rex", "dog", photos)
    return await core.imagine(owner, DEST, "a lighthouse at dusk", count=1)


def _spent(usage: Usage, kind: Kind) -> int:
    return usage.trainings if kind == "train" else usage.images


async def _waiting(runtime: BotRuntime, kind: Kind) -> list[bytes]:
    return list(await runtime.queue.zrange(engine_queue(runtime, kind), 0, -1))


async def _job_count(runtime: BotRuntime) -> int:
    async with runtime.store.db.execute("SELECT count(*) FROM jobs") as cur:
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def _until(condition: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    async with asyncio.timeout(within):
        while not await condition():
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("kind", ["train", "generate"])
async def test_a_job_whose_reply_was_lost_is_queued_once_and_kept(
    runtime: BotRuntime, core: Core, proxy: RedisProxy, owner: Owner, kind: Kind
) -> None:
    proxy.break_next_transaction(reach_redis=True)
    receipt = await _submit(core, owner, kind)

    assert proxy.dropped_replies == 1
    assert receipt.confirmed and "queued (position 1)" in receipt.text
    assert await _waiting(runtime, kind) == [receipt.job_id.encode()]
    assert await runtime.queue.exists(job_key_prefix + receipt.job_id) == 1
    job = await runtime.store.get_job(receipt.job_id)
    assert job is not None and job.status == "queued"
    assert await runtime.store.unconfirmed_jobs(TEST_PLATFORM) == []
    assert _spent(await runtime.store.usage(owner), kind) == 1
    if kind == "train":
        subject = await runtime.store.find_subject(owner, "rex")
        assert subject is not None and subject.status == "queued"


@pytest.mark.parametrize("kind", ["train", "generate"])
async def test_a_job_that_never_reached_redis_is_reported_and_refunded(
    runtime: BotRuntime, core: Core, proxy: RedisProxy, owner: Owner, kind: Kind
) -> None:
    proxy.break_next_transaction(reach_redis=False)
    with pytest.raises(UserError, match="nothing was queued"):
        await _submit(core, owner, kind)

    assert proxy.dropped_requests == 1
    assert await _waiting(runtime, kind) == []
    assert await _job_count(runtime) == 0
    assert _spent(await runtime.store.usage(owner), kind) == 0
    assert await runtime.store.list_subjects(owner) == []


@pytest.mark.parametrize("kind", ["train", "generate"])
async def test_an_unconfirmed_job_that_never_arrived_fails_with_a_refund_once_redis_answers(
    runtime: BotRuntime, core: Core, proxy: RedisProxy, owner: Owner, kind: Kind
) -> None:
    proxy.break_next_transaction(reach_redis=False, then_go_silent=True)
    receipt = await _submit(core, owner, kind)

    # Nobody can tell yet: the user hears that, not "nothing was queued", and the job's row,
    # its units (and a training's subject) stay until it is settled.
    assert not receipt.confirmed
    assert "can't tell" in receipt.text and "nothing was queued" not in receipt.text
    [unconfirmed] = await runtime.store.unconfirmed_jobs(TEST_PLATFORM)
    assert unconfirmed.id == receipt.job_id and unconfirmed.status == "queued"
    assert _spent(await runtime.store.usage(owner), kind) == 1

    # The bot (re)starts with Redis answering: its first check finds the job missing, and the
    # owner is told in the channel, once, with the units given back.
    sink = RecordingSink()
    async with delivering(runtime, sink, settle_every=0.1):
        text = await sink.wait_for(receipt.job_id, within=10)
        assert isinstance(text, str) and "never reached the job queue" in text
        await _until(lambda: _no_unconfirmed(runtime))
        await asyncio.sleep(0.5)  # a few more checks: nothing is reported again
    assert sink.result_count == 1
    job = await runtime.store.get_job(receipt.job_id)
    assert job is not None and job.status == "failed" and job.delivered_at is not None
    assert _spent(await runtime.store.usage(owner), kind) == 0
    assert await _waiting(runtime, kind) == []
    if kind == "train":
        subject = await runtime.store.find_subject(owner, "rex")
        assert subject is not None and subject.status == "failed"


async def test_an_unconfirmed_job_that_arrived_runs_and_delivers_as_usual(
    runtime: BotRuntime, core: Core, proxy: RedisProxy, owner: Owner
) -> None:
    sink = RecordingSink()
    # The bot is running (and checking every 0.1 s) when its queue goes silent mid-submission.
    async with delivering(runtime, sink, settle_every=0.1):
        proxy.break_next_transaction(reach_redis=True, then_go_silent=True)
        receipt = await _submit(core, owner, "train")
        assert not receipt.confirmed and "can't tell" in receipt.text

        await _until(lambda: _no_unconfirmed(runtime))
        assert sink.result_count == 0
        assert await _waiting(runtime, "train") == [receipt.job_id.encode()]
        job = await runtime.store.get_job(receipt.job_id)
        assert job is not None and job.status == "queued"
        assert (await runtime.store.usage(owner)).trainings == 1

        # The engine's result is delivered like any other.
        subject = await runtime.store.find_subject(owner, "rex")
        assert subject is not None
        result = TrainResult(
            job_id=receipt.job_id,
            subject_id=subject.id,
            adapter_url="file:///adapters/rex.safetensors",
            sample_urls=[],
            steps=1,
            seconds=0.1,
        )
        await runtime.queue.enqueue_job(
            DELIVER_RESULT, result.model_dump(), _queue_name=bot_queue(TEST_PLATFORM)
        )
        assert isinstance(await sink.wait_for(receipt.job_id, within=10), Delivery)
    subject = await runtime.store.find_subject(owner, "rex")
    assert subject is not None and subject.status == "ready"
    assert (await runtime.store.usage(owner)).trainings == 1


async def test_an_unconfirmed_job_waits_while_redis_stays_silent(
    runtime: BotRuntime, core: Core, proxy: RedisProxy, owner: Owner
) -> None:
    proxy.break_next_transaction(reach_redis=False, then_go_silent=True)
    receipt = await _submit(core, owner, "generate")
    assert not receipt.confirmed

    # A check that can't reach Redis decides nothing (the caller tries again later).
    with pytest.raises((RedisError, OSError)):
        await core.settle_unconfirmed_jobs()
    [unconfirmed] = await runtime.store.unconfirmed_jobs(TEST_PLATFORM)
    assert unconfirmed.id == receipt.job_id and unconfirmed.status == "queued"
    assert (await runtime.store.usage(owner)).images == 1


async def _no_unconfirmed(runtime: BotRuntime) -> bool:
    return await runtime.store.unconfirmed_jobs(TEST_PLATFORM) == []


@pytest.mark.parametrize("kind", ["train", "generate"])
async def test_a_command_cancelled_mid_submission_keeps_its_job_for_the_check(
    runtime: BotRuntime, core: Core, proxy: RedisProxy, owner: Owner, kind: Kind
) -> None:
    proxy.hold_next_reply()
    command = asyncio.create_task(_submit(core, owner, kind))
    await asyncio.wait_for(proxy.reply_held.wait(), 10)
    command.cancel()  # e.g. the bot shutting down: Redis has the job, its reply is on the way
    with pytest.raises(asyncio.CancelledError):
        await command
    proxy.release()

    [unconfirmed] = await runtime.store.unconfirmed_jobs(TEST_PLATFORM)
    assert await _waiting(runtime, kind) == [unconfirmed.id.encode()]
    assert _spent(await runtime.store.usage(owner), kind) == 1
    if kind == "train":
        assert await runtime.store.find_subject(owner, "rex") is not None

    # The check finds the job in Redis: it runs as usual, nothing is reported.
    assert await runtime.core.settle_unconfirmed_jobs() == 0
    assert await _no_unconfirmed(runtime)
    job = await runtime.store.get_job(unconfirmed.id)
    assert job is not None and job.status == "queued"
