"""The shell's /mydata, /mydata delete (confirmed by typing /mydata delete confirm), and
/vary, /upscale, /reroll of a result whose images the retention sweep deleted."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator

import pytest

from bot.adapters.shell import PLATFORM, ShellAdapter
from bot.config import Settings
from bot.core.delivery import Delivery
from bot.launcher import BotRuntime, open_core
from tests.conftest import queued
from tests.test_moderation_shell import _say
from tests.test_personal_data import subject_with_files
from tests.test_retention import outputs, stored_job


@pytest.fixture
async def shell_runtime(settings: Settings) -> AsyncIterator[BotRuntime]:
    """The core of a shell bot process (whose sweep sweeps the shell's jobs)."""
    async with open_core(settings, PLATFORM) as runtime:
        yield runtime


@pytest.fixture
def shell(shell_runtime: BotRuntime) -> ShellAdapter:
    return ShellAdapter(shell_runtime.core, "tester", out=io.StringIO())


async def test_help_lists_mydata(shell: ShellAdapter) -> None:
    said = await _say(shell, "/help")
    assert "\n/mydata   " in said and "\n/mydata delete   " in said
    assert "/mydata delete confirm goes ahead" in said


async def test_mydata_then_delete_asks_and_only_confirm_deletes(
    shell: ShellAdapter, shell_runtime: BotRuntime
) -> None:
    folder = await subject_with_files(shell_runtime, shell.owner, "rex", "zqv")
    await _say(shell, "/imagine a red fox --count 1")
    [job_id] = shell.pending

    summary = await _say(shell, "/mydata")
    assert summary.startswith("What dreambot keeps about you here:\n  Subjects (1): rex (dog,")
    assert "  Jobs waiting or running: 1 (/jobs).\n" in summary
    assert summary.endswith(
        "`/mydata delete` deletes your subjects, images and prompts and cancels your jobs; "
        "you confirm first.\n"
    )

    preview = await _say(shell, "/mydata delete")
    assert preview.startswith("This deletes what dreambot keeps about you here")
    assert preview.endswith("Type `/mydata delete confirm` to go ahead.\n")
    assert folder.exists() and await queued(shell_runtime.queue) == 1
    assert await _say(shell, "/mydata delete now") == (
        "✗ Usage: /mydata, /mydata delete, then /mydata delete confirm\n"
    )
    assert folder.exists()

    said = await _say(shell, "/mydata delete confirm")

    assert said.startswith(
        "Deleted what dreambot kept about you here: your subject rex (photos, adapters and "
        "sample images) and the prompts and options of your 1 job.\n"
        "Cancelled your 1 waiting or running job; what it took from your quota is given back."
    )
    assert not folder.exists() and await queued(shell_runtime.queue) == 0
    assert job_id not in shell.pending  # nothing left to wait for before /quit
    assert "Subjects: none." in await _say(shell, "/mydata")


async def test_vary_and_upscale_after_the_sweep_say_why_and_reroll_still_draws(
    shell: ShellAdapter, shell_runtime: BotRuntime
) -> None:
    job = await stored_job(shell_runtime, shell.owner, ended_days_ago=31)
    await shell.show_result(Delivery(job, "“a red fox” · seed 7", job.result["image_urls"]))  # type: ignore[index]
    await shell_runtime.core.retention.sweep_images()
    assert not outputs(shell_runtime, job).exists()

    for command in ("/vary 2", "/upscale 1"):
        said = await _say(shell, command)
        assert said == (
            "✗ That image is no longer stored: images are kept 30 days. Nothing was queued. To "
            "draw it again, use `/imagine <the same prompt> --seed 7` (with the same options, "
            "the seed shown with the result draws the same images); Reroll still draws the "
            "prompt with a new seed.\n"
        )
    assert await queued(shell_runtime.queue) == 0

    assert (await _say(shell, "/reroll")).startswith("Drawing 2 images (seed ")
    assert await queued(shell_runtime.queue) == 1
