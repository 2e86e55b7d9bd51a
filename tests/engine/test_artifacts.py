"""Writes handed from a worker thread to the event loop (``BackgroundWrites``)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from engine.artifacts import ArtifactStore, BackgroundWrites


class GatedStore(ArtifactStore):
    """A local store that records its writes; the first one waits for ``gate``."""

    def __init__(self, base_url: str) -> None:
        super().__init__(base_url)
        self.gate = threading.Event()
        self.started = threading.Event()
        self.written: list[tuple[str, bytes]] = []

    def put_bytes(self, url: str, data: bytes) -> None:
        if not self.started.is_set():
            self.started.set()
            assert self.gate.wait(10)
        super().put_bytes(url, data)
        self.written.append((url.rsplit("/", 1)[1], data))


async def test_writes_keep_their_order_and_a_waiting_one_is_replaced_by_a_newer(
    tmp_path: Path,
) -> None:
    store = GatedStore(tmp_path.as_uri())
    done: list[str] = []
    async with BackgroundWrites(store) as writes:

        def from_a_thread() -> None:
            writes.put(store.url("a"), b"1", then=lambda: done.append("a1"))
            assert store.started.wait(10)  # a1 is being written (slowly)
            writes.put(store.url("b"), b"1", then=lambda: done.append("b1"))
            writes.put(store.url("a"), b"2", then=lambda: done.append("a2"))
            writes.put(store.url("a"), b"3", then=lambda: done.append("a3"))
            store.gate.set()

        await asyncio.to_thread(from_a_thread)
    # Leaving the block waited for every write; a2 never happened, a3 replaced it.
    assert store.written == [("a", b"1"), ("b", b"1"), ("a", b"3")]
    assert done == ["a1", "b1", "a3"]
    assert (tmp_path / "a").read_bytes() == b"3"


async def test_a_cancelled_job_still_waits_for_its_writes(tmp_path: Path) -> None:
    store = GatedStore(tmp_path.as_uri())
    entered = asyncio.Event()

    async def job() -> None:
        async with BackgroundWrites(store) as writes:
            writes.put(store.url("checkpoint"), b"state")
            entered.set()
            await asyncio.sleep(60)

    task = asyncio.create_task(job())
    await entered.wait()
    await asyncio.to_thread(store.started.wait, 10)
    task.cancel()
    await asyncio.sleep(0.1)
    assert not task.done()  # held by the write still under way
    store.gate.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert store.written == [("checkpoint", b"state")]
