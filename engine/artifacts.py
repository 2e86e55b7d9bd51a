"""The artifact store: photos, adapters, class priors and outputs, addressed by URL via fsspec.

A local folder by default (``file://…``); an S3-compatible bucket (``s3://…``, with ``s3fs``
installed) when the bot and engines run on different machines. Only URLs travel through Redis.
Torch-free: the bot uses it too, also to link a chat platform to an artifact (``public_url``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from urllib.parse import quote, unquote, urlparse

import fsspec
from fsspec.core import url_to_fs
from fsspec.spec import AbstractFileSystem

log = logging.getLogger(__name__)

SIGNED_URL_SECONDS = 3600
"""How long a signed artifact URL works: long enough for a chat platform to fetch it (and
fetch it again while the message shows it), short enough not to be a lasting share link."""


CACHE_UNUSED_SECONDS = 7 * 24 * 3600.0
"""How long an engine keeps a cached copy of a remote artifact (an adapter) that no job used."""
TMP_ABANDONED_SECONDS = 3600.0
"""How old a cache's temporary file (a fetch under way) is when it counts as abandoned."""


class ArtifactWriteError(OSError):
    """The artifact store refused a write (full, read-only, unreachable)."""


class ArtifactStore:
    """Read and write artifacts below one base URL."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.fs, _ = url_to_fs(self.base_url)

    def url(self, *parts: str) -> str:
        """The URL of ``parts`` joined below the base."""
        return "/".join([self.base_url, *(p.strip("/") for p in parts)])

    @property
    def can_sign(self) -> bool:
        """Whether the store's filesystem implements fsspec's ``sign`` (s3fs: presigned URLs;
        a local folder can't sign)."""
        return type(self.fs).sign is not AbstractFileSystem.sign

    def public_url(
        self, url: str, public_base: str | None = None, *, expires: int = SIGNED_URL_SECONDS
    ) -> str | None:
        """Where anyone (a chat platform's servers) can fetch the artifact ``url``; None if
        nowhere.

        With ``public_base``, where this store's files are served (a CDN or bucket website in
        front of the bucket, a web server in front of the folder), it is the same path below
        that. Without, it is a URL signed for ``expires`` seconds where the store can sign,
        else None. A URL outside the store, or one climbing out of it, never gets one.
        """
        prefix = self.base_url + "/"
        relative = url.removeprefix(prefix)
        if relative == url or any(part in ("", ".", "..") for part in relative.split("/")):
            return None
        if public_base is not None:
            return f"{public_base.rstrip('/')}/{quote(relative, safe='/')}"
        if not self.can_sign:
            return None
        fs, path = url_to_fs(url)
        try:
            return str(fs.sign(path, expiration=expires))
        except NotImplementedError:
            return None

    def put_bytes(self, url: str, data: bytes) -> None:
        """Write ``data`` at ``url`` so readers never see a half-written file.

        Raises :class:`ArtifactWriteError` when the store refuses the write (full, read-only,
        unreachable); a local write cut short leaves no part of the file behind.
        """
        fs, path = url_to_fs(url)
        try:
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            if local_path(url) is not None:
                # Local: write beside the target, then rename atomically.
                tmp = f"{path}.{uuid.uuid4().hex}.tmp"
                try:
                    with fs.open(tmp, "wb") as fh:
                        fh.write(data)
                    os.replace(tmp, path)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.remove(tmp)
                    raise
            else:
                # Object stores make an object visible only once its upload completes.
                with fs.open(path, "wb") as fh:
                    fh.write(data)
        except OSError as exc:
            raise ArtifactWriteError(f"could not write {url}: {exc}") from exc

    def put_file(self, url: str, source: Path) -> None:
        """Copy a local file to ``url`` atomically."""
        self.put_bytes(url, source.read_bytes())

    def get_bytes(self, url: str) -> bytes:
        """Read the artifact at ``url``."""
        with fsspec.open(url, "rb") as fh:
            data: bytes = fh.read()
        return data

    def exists(self, url: str) -> bool:
        """Whether an artifact exists at ``url``."""
        fs, path = url_to_fs(url)
        return bool(fs.exists(path))

    def list(self, url: str) -> list[str]:
        """URLs of the files directly below the folder ``url`` (empty if it does not exist)."""
        fs, path = url_to_fs(url)
        if not fs.exists(path):
            return []
        protocol = url.split("://", 1)[0] if "://" in url else "file"
        names = sorted(fs.ls(path, detail=False))
        return [
            f"{protocol}://{name}" if protocol != "file" else Path(name).as_uri() for name in names
        ]

    def delete_tree(self, url: str) -> None:
        """Delete the folder (or file) at ``url`` and everything below it, if present."""
        fs, path = url_to_fs(url)
        if fs.exists(path):
            fs.rm(path, recursive=True)

    def fetch_local(self, url: str, cache_dir: Path) -> Path:
        """A local path holding the artifact: the file itself when local, else a cached copy
        (its modification time is when it was last used: ``prune_cache`` goes by it)."""
        path = local_path(url)
        if path is not None:
            return path
        target = cache_dir / urlparse(url).netloc / urlparse(url).path.lstrip("/")
        if target.exists():
            with contextlib.suppress(OSError):
                os.utime(target)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            # A name of its own: jobs fetching the same artifact at once must not write into
            # (and rename away) each other's copy.
            tmp = target.with_name(f"{target.name}.{uuid.uuid4().hex}.tmp")
            try:
                tmp.write_bytes(self.get_bytes(url))
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
        return target

    def prune_cache(self, cache_dir: Path, *, unused_for: float = CACHE_UNUSED_SECONDS) -> int:
        """Delete the copies ``fetch_local`` cached in ``cache_dir`` whose artifact is gone from
        this store (a subject deleted with /forget or /mydata delete leaves no copy of its
        adapter on an engine's disk), or that no job used for ``unused_for`` seconds (the
        cache stays bounded), and temporary files of fetches cut off. Returns how many files
        went; a file the store can't be asked about stays until the next prune."""
        if local_path(self.base_url) is not None or not cache_dir.is_dir():
            return 0  # a local store is read in place: nothing is cached
        scheme = urlparse(self.base_url).scheme
        now = time.time()
        removed = 0
        for file in sorted(cache_dir.rglob("*")):
            try:
                if not file.is_file():
                    continue
                idle = now - file.stat().st_mtime
                if file.name.endswith(".tmp"):
                    gone = idle > TMP_ABANDONED_SECONDS  # else a fetch in flight
                else:
                    url = f"{scheme}://{file.relative_to(cache_dir).as_posix()}"
                    gone = idle > unused_for or not self.exists(url)
                if gone:
                    file.unlink(missing_ok=True)
                    removed += 1
            except OSError as exc:  # the store (or the disk) can't tell now: next time
                log.warning("engine cache: could not check %s: %s", file, exc)
        return removed

    async def aput_bytes(self, url: str, data: bytes) -> None:
        """``put_bytes`` off the event loop."""
        await asyncio.to_thread(self.put_bytes, url, data)

    async def aget_bytes(self, url: str) -> bytes:
        """``get_bytes`` off the event loop."""
        return await asyncio.to_thread(self.get_bytes, url)

    async def adelete_tree(self, url: str) -> None:
        """``delete_tree`` off the event loop."""
        await asyncio.to_thread(self.delete_tree, url)

    async def apublic_url(self, url: str, public_base: str | None = None) -> str | None:
        """``public_url``; signing runs off the event loop (it may look up credentials)."""
        if public_base is not None or not self.can_sign:
            return self.public_url(url, public_base)
        return await asyncio.to_thread(self.public_url, url, public_base)


class BackgroundWrites:
    """Artifact writes handed over by a worker thread and done on the event loop.

    A torch thread holding the GPU must not wait for an upload (to S3 it may take seconds):
    it calls :meth:`put` with the bytes and carries on. The writes run one at a time in the
    order they were handed over, each atomic (:meth:`ArtifactStore.put_bytes`), so a file is
    whole before anyone can read it. A write still waiting when a newer one for the same URL
    arrives is skipped: only the newest checkpoint matters, and a slow store never piles up
    old copies in memory. A failed write is logged and counted (``failures``), never raised
    into the thread: a missed checkpoint or preview must not end a training. ``then`` runs on
    the loop once its write is done (report a preview only when it can be read).
    Use as ``async with``: leaving it waits for every write handed over (:meth:`close`).
    """

    def __init__(self, artifacts: ArtifactStore) -> None:
        self.artifacts = artifacts
        self.loop = asyncio.get_running_loop()
        self.failures = 0
        self._lock = threading.Lock()
        self._order = asyncio.Lock()
        self._newest: dict[str, tuple[int, bytes, Callable[[], None] | None]] = {}
        self._count = 0
        self._pending: set[concurrent.futures.Future[None]] = set()
        self._closed = False

    def put(self, url: str, data: bytes, then: Callable[[], None] | None = None) -> None:
        """Write ``data`` at ``url`` soon, without waiting (callable from any thread)."""
        with self._lock:
            if self._closed:
                log.warning("not writing %s: its job has ended", url)
                return
            self._count += 1
            self._newest[url] = (self._count, data, then)
            future = asyncio.run_coroutine_threadsafe(self._write(url, self._count), self.loop)
            self._pending.add(future)
        future.add_done_callback(self._done)

    def _done(self, future: concurrent.futures.Future[None]) -> None:
        with self._lock:
            self._pending.discard(future)

    async def _write(self, url: str, number: int) -> None:
        async with self._order:  # FIFO: writes happen in the order they were handed over
            with self._lock:
                newest = self._newest.get(url)
                if newest is None or newest[0] != number:
                    return  # a newer write of this URL is queued behind this one
                del self._newest[url]
            _, data, then = newest
            try:
                await asyncio.to_thread(self.artifacts.put_bytes, url, data)
            except Exception as exc:
                self.failures += 1
                log.warning("could not write %s: %s", url, exc)
                return
        if then is not None:
            try:
                then()
            except Exception:
                log.exception("after writing %s", url)

    async def close(self) -> None:
        """Take no more writes and wait until every one handed over is done (also when the
        caller is cancelled meanwhile: no write may land after what the job does next, such
        as deleting its checkpoint)."""
        with self._lock:
            self._closed = True
            pending = list(self._pending)
        if not pending:
            return
        done = asyncio.gather(*(asyncio.wrap_future(f) for f in pending), return_exceptions=True)
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:
            await done
            raise

    async def __aenter__(self) -> BackgroundWrites:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()


def local_path(url: str) -> Path | None:
    """The filesystem path of a ``file://`` URL (or a bare path), else None."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "":
        return Path(url)
    return None
