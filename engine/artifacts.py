"""The artifact store: photos, adapters, class priors and outputs, addressed by URL via fsspec.

A local folder by default (``file://…``); an S3-compatible bucket (``s3://…``, with ``s3fs``
installed) when the bot and engines run on different machines. Only URLs travel through Redis.
Torch-free: the bot uses it too.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path
from urllib.parse import unquote, urlparse

import fsspec
from fsspec.core import url_to_fs


class ArtifactStore:
    """Read and write artifacts below one base URL."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.fs, _ = url_to_fs(self.base_url)

    def url(self, *parts: str) -> str:
        """The URL of ``parts`` joined below the base."""
        return "/".join([self.base_url, *(p.strip("/") for p in parts)])

    def put_bytes(self, url: str, data: bytes) -> None:
        """Write ``data`` at ``url`` so readers never see a half-written file."""
        fs, path = url_to_fs(url)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        if local_path(url) is not None:
            # Local: write beside the target, then rename atomically.
            tmp = f"{path}.{uuid.uuid4().hex}.tmp"
            with fs.open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        else:
            # Object stores make an object visible only once its upload completes.
            with fs.open(path, "wb") as fh:
                fh.write(data)

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
        """A local path holding the artifact: the file itself when local, else a cached copy."""
        path = local_path(url)
        if path is not None:
            return path
        target = cache_dir / urlparse(url).netloc / urlparse(url).path.lstrip("/")
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".tmp")
            tmp.write_bytes(self.get_bytes(url))
            os.replace(tmp, target)
        return target

    async def aput_bytes(self, url: str, data: bytes) -> None:
        """``put_bytes`` off the event loop."""
        await asyncio.to_thread(self.put_bytes, url, data)

    async def aget_bytes(self, url: str) -> bytes:
        """``get_bytes`` off the event loop."""
        return await asyncio.to_thread(self.get_bytes, url)

    async def adelete_tree(self, url: str) -> None:
        """``delete_tree`` off the event loop."""
        await asyncio.to_thread(self.delete_tree, url)


def local_path(url: str) -> Path | None:
    """The filesystem path of a ``file://`` URL (or a bare path), else None."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "":
        return Path(url)
    return None
