"""The shell's /jobs and /cancel: the user's own jobs, listed and cancelled."""

from __future__ import annotations

import dataclasses
import io

import pytest

from bot.adapters.shell import ShellAdapter
from bot.launcher import BotRuntime
from tests.conftest import queued, running_job
from tests.test_moderation_shell import _say


@pytest.fixture
def shell(runtime: BotRuntime) -> ShellAdapter:
    return ShellAdapter(runtime.core, "tester", out=io.StringIO())


async def test_jobs_then_cancel_by_id_in_the_shell(
    shell: ShellAdapter, runtime: BotRuntime
) -> None:
    assert await _say(shell, "/jobs") == "You have no jobs waiting or running here.\n"
    assert "queued (position 1)" in await _say(shell, "/imagine a red fox --count 2")
    [job_id] = shell.pending

    listing = await _say(shell, "/jobs")
    assert f"  {job_id[:8]}  images “a red fox”  waiting #1 in the queue" in listing
    said = await _say(shell, f"/cancel {job_id[:6]}")

    assert said == (
        f"Cancelled your images “a red fox” (job {job_id[:8]}): taken out of the queue. "
        "What it took from your quota is given back.\n"
    )
    assert await queued(runtime.queue) == 0
    assert shell.pending == set()  # nothing left to wait for before /quit
    assert "✗ You have no jobs waiting or running here, so there is nothing to cancel." in (
        await _say(shell, "/cancel")
    )


async def test_help_lists_jobs_and_cancel(shell: ShellAdapter) -> None:
    said = await _say(shell, "/help")
    assert "\n/jobs  " in said
    assert "\n/cancel [name or job id]  " in said


async def test_a_moderators_cancellation_is_not_shown_as_a_failure(shell: ShellAdapter) -> None:
    job = dataclasses.replace(running_job(shell.owner, {"kind": "terminal"}), status="cancelled")
    await shell.show_failure(job, "Your image “a red fox” was cancelled by a moderator.")
    failed = running_job(shell.owner, {"kind": "terminal"}, job_id="b" * 32)
    await shell.show_failure(failed, "Your image could not be drawn: out of memory")

    assert shell.out.getvalue().splitlines() == [  # type: ignore[attr-defined]
        "⊘ Your image “a red fox” was cancelled by a moderator.",
        "✗ Your image could not be drawn: out of memory",
    ]
