"""The ``dreambot`` command line itself (the commands are tested where their parts are)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.cli import main


@pytest.mark.parametrize("given", [("env", "bogus"), ("flag", "loud")])
def test_an_unknown_log_level_is_a_clear_usage_error(
    given: tuple[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    where, value = given
    monkeypatch.chdir(tmp_path)
    argv = ["migrate"]
    if where == "env":
        monkeypatch.setenv("DREAMBOT_LOG_LEVEL", value)
    else:
        argv = ["--log-level", value, *argv]
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert f"unknown log level '{value}'" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()  # nothing ran


def test_a_log_level_is_taken_in_any_case(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DREAMBOT_DATA_DIR", str(tmp_path / "data"))
    main(["--log-level", "debug", "migrate"])
    assert "0001_initial.sql" in capsys.readouterr().out


def test_dreambot_run_says_why_its_engine_stopped_at_start(tmp_path: Path, redis_url: str) -> None:
    import os
    import subprocess
    import sys

    env = {
        **os.environ,
        "DREAMBOT_REDIS_URL": redis_url,
        "DREAMBOT_DATA_DIR": str(tmp_path / "data"),
        "DREAMBOT_BASE_MODEL": str(tmp_path / "no-such-model"),
    }
    ran = subprocess.run(
        [sys.executable, "-m", "bot.cli", "run"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert ran.returncode != 0
    assert "the engine exited at start: " in ran.stderr
    assert f"base model not found: {tmp_path / 'no-such-model'}" in ran.stderr
    assert "(log: " in ran.stderr


def test_sigterm_stops_a_service_through_its_clean_up(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    script = f"""
import asyncio, pathlib
from bot.cli import serve

folder = pathlib.Path({str(tmp_path)!r})

async def main():
    (folder / "started").touch()
    try:
        await asyncio.Event().wait()
    finally:
        await asyncio.sleep(0.2)  # clean-up that awaits, as stopping workers does
        (folder / "cleaned-up").touch()

serve(main)
print("exited normally")
"""
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 60
    while not (tmp_path / "started").exists():
        assert process.poll() is None and time.monotonic() < deadline, process.stderr
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert (tmp_path / "cleaned-up").exists()
    assert "exited normally" in out
