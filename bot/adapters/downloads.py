"""Fetching chat attachments: only from allowed hosts, size-capped while streaming, time-limited.

The downloader never judges content: the core decodes the bytes and refuses what is not a
photo. It only makes sure that fetching one cannot be turned against the bot (any URL on the
internet, a never-ending stream, a server that trickles bytes forever).
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Iterable
from types import TracebackType

import aiohttp
from yarl import URL

from bot.core.errors import UserError, as_typed
from bot.core.photos import Upload, mib

DISCORD_CDN_HOSTS = frozenset({"cdn.discordapp.com", "media.discordapp.net"})
"""Where Discord serves attachments from; nothing else is fetched in production."""

CHUNK_BYTES = 64 * 1024


class Downloader:
    """Downloads attachments from an allow-list of hosts into memory, at most ``max_bytes`` each."""

    def __init__(
        self,
        *,
        max_bytes: int,
        allowed_hosts: Collection[str] = DISCORD_CDN_HOSTS,
        require_https: bool = True,
        timeout: float = 30.0,
    ) -> None:
        self.max_bytes = max_bytes
        self.allowed_hosts = frozenset(host.lower() for host in allowed_hosts)
        self.require_https = require_https
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Downloader:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the HTTP session (if one was opened)."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    def check_url(self, url: str, filename: str) -> None:
        """Raise UserError unless ``url`` points at an allowed host."""
        filename = as_typed(filename)  # as typed, not as markdown, in the refusal
        parsed = URL(url)
        scheme_ok = parsed.scheme == "https" or (not self.require_https and parsed.scheme == "http")
        if not scheme_ok or (parsed.host or "").lower() not in self.allowed_hosts:
            raise UserError(f"{filename} isn't a Discord attachment, so I didn't download it.")

    async def fetch(self, url: str, filename: str) -> Upload:
        """Download one attachment; raise UserError when it is refused, too big or too slow."""
        self.check_url(url, filename)
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        name = as_typed(filename)  # in a refusal: as typed, not as markdown
        too_big = UserError(
            f"{name} is larger than {mib(self.max_bytes)}, the most a photo may be. "
            "Send a smaller copy."
        )
        try:
            # No redirects: an allowed host must not be able to send us somewhere else.
            async with self._session.get(url, allow_redirects=False) as response:
                if response.status != 200:
                    raise UserError(
                        f"{name} could not be downloaded (HTTP {response.status}); try again."
                    )
                if (response.content_length or 0) > self.max_bytes:
                    raise too_big
                data = bytearray()
                async for chunk in response.content.iter_chunked(CHUNK_BYTES):
                    data += chunk
                    if len(data) > self.max_bytes:
                        raise too_big
        except TimeoutError:
            raise UserError(f"{name} took too long to download; try again.") from None
        except aiohttp.ClientError as exc:
            raise UserError(
                f"{name} could not be downloaded ({type(exc).__name__}); try again."
            ) from exc
        return Upload(filename, bytes(data))

    async def fetch_all(self, attachments: Iterable[tuple[str, str]]) -> list[Upload]:
        """Download ``(url, filename)`` pairs concurrently, in order; the first failure raises."""
        items = list(attachments)
        for url, filename in items:
            self.check_url(url, filename)
        results = await asyncio.gather(
            *(self.fetch(url, filename) for url, filename in items), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return [result for result in results if isinstance(result, Upload)]
