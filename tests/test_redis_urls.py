"""Every kind of DREAMBOT_REDIS_URL the settings accept is reachable: TLS, a Unix socket, a
password. Each test starts its own redis-server with the options it needs."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from arq import create_pool

from bot.connections import redis_settings
from bot.redis_server import answers, free_port, redis_binary


@contextmanager
def redis_server(tmp_path: Path, ready_url: str, *options: str) -> Iterator[None]:
    """A redis-server started with ``options``, stopped at the end; ready once ``ready_url``
    answers (its log is shown when it doesn't start)."""
    log = tmp_path / "redis.log"
    args = [redis_binary(), "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp_path)]
    with log.open("wb") as out:
        process = subprocess.Popen([*args, *options], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while not answers(ready_url):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"redis-server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.05)
        yield
    finally:
        process.terminate()
        process.wait(10)


def test_a_unix_socket_url_answers(tmp_path: Path) -> None:
    socket_path = tmp_path / "redis.sock"
    url = f"unix://{socket_path}"
    with redis_server(tmp_path, url, "--port", "0", "--unixsocket", str(socket_path)):
        assert answers(url)
        assert answers(f"{url}?db=2")
    assert not answers(url)


def test_a_password_is_sent_and_a_wrong_one_does_not_answer(tmp_path: Path) -> None:
    port = free_port()
    url = f"redis://:s3cret@127.0.0.1:{port}/0"
    with redis_server(tmp_path, url, "--port", str(port), "--requirepass", "s3cret"):
        assert answers(f"redis://default:s3cret@127.0.0.1:{port}/1")
        assert not answers(f"redis://:wrong@127.0.0.1:{port}/0")
        assert not answers(f"redis://127.0.0.1:{port}/0")


def _certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it, made with openssl."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=folder, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test ca",
        "-keyout", "ca.key", "-out", "ca.crt")  # fmt: skip
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
        "-keyout", "server.key", "-out", "server.csr")  # fmt: skip
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "1", "-extfile", "san.ext", "-out", "server.crt")  # fmt: skip
    return folder / "ca.crt", folder / "server.crt", folder / "server.key"


async def test_a_rediss_url_speaks_tls_for_the_start_check_and_the_queue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca, cert, key = _certificates(tmp_path)
    port = free_port()
    url = f"rediss://127.0.0.1:{port}/0"
    tls = ["--port", "0", "--tls-port", str(port), "--tls-auth-clients", "no"]
    tls += ["--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca)]
    # The server's certificate is trusted the way a managed Redis's CA would be: system-wide.
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    with redis_server(tmp_path, url, *tls):
        assert answers(url)
        pool = await create_pool(redis_settings(url))
        try:
            assert await pool.ping()
        finally:
            await pool.aclose()
        # The same server without TLS, or with a certificate nobody vouches for, doesn't answer.
        assert not answers(f"redis://127.0.0.1:{port}/0")
        monkeypatch.delenv("SSL_CERT_FILE")
        assert not answers(url)


def test_something_that_is_not_a_redis_url_does_not_answer() -> None:
    assert not answers("http://127.0.0.1:1/")
    assert not answers(f"redis://127.0.0.1:{free_port()}/0")
