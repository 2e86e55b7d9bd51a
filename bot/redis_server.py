"""Find or start a Redis server: a private ``redis-server`` child when none answers.

Used by ``dreambot run`` (the all-in-one demo) and the test suite. Where ``redis-server`` is
missing it is installed with apt when we are root on a Debian-like system; otherwise the error
says exactly how to get it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis

INSTALL_HINT = (
    "redis-server is not installed. Install it with `sudo apt-get install redis-server` "
    "(Debian/Ubuntu), `brew install redis` (macOS) or see https://redis.io/docs/install/, "
    "or point DREAMBOT_REDIS_URL at a running Redis."
)


class RedisUnavailable(RuntimeError):
    """No Redis could be found or started; the message says what to do."""


def answers(url: str, timeout: float = 0.5) -> bool:
    """Whether a Redis server answers PING at ``url``: any URL the bot itself accepts
    (``redis://``, ``rediss://`` with TLS, ``unix://``), with its user, password and database."""
    try:
        client = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, retry_on_timeout=False
        )
    except ValueError:  # not a Redis URL at all
        return False
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_binary() -> str:
    """Path of ``redis-server``, installing it with apt where we may; else RedisUnavailable."""
    found = shutil.which("redis-server")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "redis-server"], check=False, env=env)
        found = shutil.which("redis-server")
        if found:
            return found
    raise RedisUnavailable(INSTALL_HINT)


class RedisServer:
    """A private redis-server child process on a free port."""

    def __init__(self, data_dir: Path, *, persistent: bool = True, port: int | None = None):
        self.data_dir = data_dir
        self.persistent = persistent
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The server's redis:// URL."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start the server and wait until it answers."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            redis_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.data_dir.resolve()),
            "--save",
            "",
        ]
        # AOF keeps queued jobs across a restart of the demo.
        args += ["--appendonly", "yes" if self.persistent else "no"]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if answers(self.url):
                return self
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RedisUnavailable(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        """Stop the server (it saves its AOF on the way out)."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process = None
