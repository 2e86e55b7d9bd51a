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
