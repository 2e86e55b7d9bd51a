"""The attachment downloader against a local server: hosts, size caps, timeouts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from bot.adapters.downloads import DISCORD_CDN_HOSTS, Downloader
from bot.core.errors import UserError

LIMIT = 64 * 1024


async def _ok(request: web.Request) -> web.Response:
    return web.Response(body=b"x" * 1000, content_type="image/jpeg")


async def _big_declared(request: web.Request) -> web.Response:
    return web.Response(body=b"x" * (LIMIT + 1), content_type="image/jpeg")


async def _big_streamed(request: web.Request) -> web.StreamResponse:
    # No Content-Length: only counting while streaming can stop this one.
    response = web.StreamResponse()
    response.enable_chunked_encoding()
    await response.prepare(request)
    try:
        for _ in range(1000):
            await response.write(b"x" * 16 * 1024)
    except (ConnectionResetError, RuntimeError):
        pass
    return response


async def _slow(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    response.enable_chunked_encoding()
    await response.prepare(request)
    try:
        await response.write(b"x")
        await asyncio.sleep(10)
    except (ConnectionResetError, RuntimeError):
        pass
    return response


async def _moved(request: web.Request) -> web.Response:
    raise web.HTTPFound("http://example.com/elsewhere.jpg")


async def _gone(request: web.Request) -> web.Response:
    raise web.HTTPNotFound()


@pytest.fixture
async def server() -> AsyncIterator[str]:
    """A local 'CDN' with well-behaved and misbehaving files; yields its base URL."""
    app = web.Application()
    app.router.add_get("/ok.jpg", _ok)
    app.router.add_get("/big-declared.jpg", _big_declared)
    app.router.add_get("/big-streamed.jpg", _big_streamed)
    app.router.add_get("/slow.jpg", _slow)
    app.router.add_get("/moved.jpg", _moved)
    app.router.add_get("/gone.jpg", _gone)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def downloader() -> AsyncIterator[Downloader]:
    """A downloader that allows the local server (production allows only Discord's CDN)."""
    async with Downloader(
        max_bytes=LIMIT, allowed_hosts={"127.0.0.1"}, require_https=False, timeout=0.5
    ) as downloader:
        yield downloader


async def test_a_small_file_from_an_allowed_host_is_downloaded(
    server: str, downloader: Downloader
) -> None:
    upload = await downloader.fetch(f"{server}/ok.jpg", "ok.jpg")
    assert upload.filename == "ok.jpg"
    assert upload.data == b"x" * 1000


async def test_a_file_declared_too_big_is_refused(server: str, downloader: Downloader) -> None:
    with pytest.raises(UserError, match="larger than"):
        await downloader.fetch(f"{server}/big-declared.jpg", "big.jpg")


async def test_an_oversize_stream_is_cut_off(server: str, downloader: Downloader) -> None:
    with pytest.raises(UserError, match="`big.jpg` is larger than"):
        await downloader.fetch(f"{server}/big-streamed.jpg", "big.jpg")


async def test_a_slow_server_is_timed_out(server: str, downloader: Downloader) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(UserError, match="took too long"):
        await downloader.fetch(f"{server}/slow.jpg", "slow.jpg")
    assert loop.time() - started < 3


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/ok.jpg",
        "https://cdn.discordapp.com.evil.example/ok.jpg",
        "file:///etc/passwd",
        "http://localhost/ok.jpg",
    ],
)
async def test_a_host_not_allowed_is_refused_without_a_request(
    url: str, downloader: Downloader
) -> None:
    with pytest.raises(UserError, match="isn't a Discord attachment"):
        await downloader.fetch(url, "photo.jpg")


def test_production_allows_only_discord_cdn_over_https() -> None:
    downloader = Downloader(max_bytes=LIMIT)
    downloader.check_url("https://cdn.discordapp.com/attachments/1/2/a.jpg", "a.jpg")
    downloader.check_url("https://media.discordapp.net/attachments/1/2/a.jpg", "a.jpg")
    assert downloader.allowed_hosts == DISCORD_CDN_HOSTS
    for url in ("http://cdn.discordapp.com/a.jpg", "https://127.0.0.1/a.jpg"):
        with pytest.raises(UserError):
            downloader.check_url(url, "a.jpg")


async def test_redirects_are_not_followed(server: str, downloader: Downloader) -> None:
    with pytest.raises(UserError, match="HTTP 302"):
        await downloader.fetch(f"{server}/moved.jpg", "moved.jpg")


async def test_a_missing_file_is_reported(server: str, downloader: Downloader) -> None:
    with pytest.raises(UserError, match="HTTP 404"):
        await downloader.fetch(f"{server}/gone.jpg", "gone.jpg")


async def test_fetch_all_keeps_order_and_refuses_a_foreign_host_before_downloading(
    server: str, downloader: Downloader
) -> None:
    uploads = await downloader.fetch_all([(f"{server}/ok.jpg", "a.jpg"), (f"{server}/ok.jpg", "b")])
    assert [u.filename for u in uploads] == ["a.jpg", "b"]
    with pytest.raises(UserError, match="`c.jpg` isn't"):
        await downloader.fetch_all([(f"{server}/ok.jpg", "a.jpg"), ("https://x.y/c", "c.jpg")])
