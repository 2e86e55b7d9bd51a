"""Writes handed from a worker thread to the event loop (``BackgroundWrites``), and the
public URLs of artifacts (``ArtifactStore.public_url``)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
from fsspec.implementations.memory import MemoryFileSystem

from engine.artifacts import SIGNED_URL_SECONDS, ArtifactStore, BackgroundWrites


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


def test_an_artifact_has_a_public_url_below_the_public_base(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path.as_uri())
    preview = store.url("outputs", "job 1", "previews", "003.jpg")

    public = store.public_url(preview, "https://cdn.example.com/dreambot/")

    assert public == "https://cdn.example.com/dreambot/outputs/job%201/previews/003.jpg"
    # Nothing outside the store, nor anything climbing out of it, gets one.
    for url in (
        "file:///etc/passwd",
        f"{tmp_path.as_uri()}-other/x.jpg",
        store.url("outputs", "..", "..", "x.jpg"),
        store.base_url,
    ):
        assert store.public_url(url, "https://cdn.example.com") is None


async def test_a_local_store_without_a_public_base_has_no_public_url(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path.as_uri())
    assert not store.can_sign
    assert await store.apublic_url(store.url("outputs", "j", "previews", "003.jpg")) is None


async def test_a_store_that_signs_gives_a_short_lived_signed_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def sign(self: MemoryFileSystem, path: str, expiration: int = 100, **kwargs: Any) -> str:
        return f"https://signed.example.com{path}?expires={expiration}"

    # What s3fs does with presigned URLs, on an in-memory store.
    monkeypatch.setattr(MemoryFileSystem, "sign", sign)
    store = ArtifactStore("memory://bucket/dreambot")
    url = store.url("outputs", "j", "previews", "003.jpg")

    assert store.can_sign
    assert await store.apublic_url(url) == (
        "https://signed.example.com/bucket/dreambot/outputs/j/previews/003.jpg"
        f"?expires={SIGNED_URL_SECONDS}"
    )
    # A public base, when there is one, is preferred to signing.
    assert store.public_url(url, "https://cdn.example.com") == (
        "https://cdn.example.com/outputs/j/previews/003.jpg"
    )


def test_the_engine_cache_drops_copies_of_deleted_or_unused_artifacts(tmp_path: Path) -> None:
    """A remote store's artifacts are cached on the engine's disk; pruning removes the copy of
    one deleted from the store (a forgotten subject's adapter) and of one unused for too long,
    keeps the rest, and leaves a fetch's temporary file alone unless it was abandoned."""
    import os
    import time
    import uuid

    store = ArtifactStore(f"memory://bucket-{uuid.uuid4().hex[:8]}/dreambot")
    cache = tmp_path / "engine-cache"
    kept, forgotten, unused = (store.url("subjects", name, "adapter.safetensors") for name in "abc")
    for url in (kept, forgotten, unused):
        store.put_bytes(url, b"lora")
    copies = {url: store.fetch_local(url, cache) for url in (kept, forgotten, unused)}
    assert all(path.read_bytes() == b"lora" and cache in path.parents for path in copies.values())
    week_ago = time.time() - 8 * 24 * 3600
    os.utime(copies[unused], (week_ago, week_ago))
    fetching = copies[kept].with_name("adapter.safetensors.123.tmp")
    abandoned = copies[kept].with_name("adapter.safetensors.456.tmp")
    fetching.write_bytes(b"half")
    abandoned.write_bytes(b"half")
    os.utime(abandoned, (week_ago, week_ago))
    store.delete_tree(store.url("subjects", "b"))

    assert store.prune_cache(cache) == 3

    assert copies[kept].exists() and fetching.exists()
    assert not copies[forgotten].exists() and not copies[unused].exists()
    assert not abandoned.exists()
    # Using a copy counts as using it: one fetched again a week later is not pruned.
    os.utime(copies[kept], (week_ago, week_ago))
    assert store.fetch_local(kept, cache) == copies[kept]
    assert store.prune_cache(cache) == 0 and copies[kept].exists()


def test_a_local_store_has_no_engine_cache_to_prune(tmp_path: Path) -> None:
    store = ArtifactStore((tmp_path / "artifacts").as_uri())
    url = store.url("subjects", "a", "adapter.safetensors")
    store.put_bytes(url, b"lora")
    cache = tmp_path / "engine-cache"
    assert (
        store.fetch_local(url, cache) == tmp_path / "artifacts" / "subjects/a/adapter.safetensors"
    )
    assert store.prune_cache(cache) == 0
