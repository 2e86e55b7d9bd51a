"""The safety filter in the shell: ``/mod safety``, and a result whose every image was
withheld (``/reroll`` draws its prompt again, ``/vary`` says there is nothing to vary)."""

from __future__ import annotations

import io

import pytest

from bot.adapters.shell import ShellAdapter
from bot.core.delivery import Deliverer
from bot.launcher import BotRuntime
from engine.api import GenerateResult
from tests.conftest import engine_queue, queued_generate_request
from tests.test_moderation_shell import _say


@pytest.fixture
def shell(runtime: BotRuntime) -> ShellAdapter:
    """The shell of user 'tester', a moderator by default (DREAMBOT_SHELL_MODERATORS unset)."""
    return ShellAdapter(runtime.core, "tester", out=io.StringIO())


async def test_mod_safety_in_the_shell_switches_the_filter_for_later_jobs(
    shell: ShellAdapter, runtime: BotRuntime
) -> None:
    assert "/mod safety [on|off]" in await _say(shell, "/mod help")
    said = await _say(shell, "/mod safety off")
    assert said.startswith("The safety filter is now off here")
    assert said.endswith("`/mod safety on` turns it back on.\n")

    await _say(shell, "/imagine a red fox --count 1")

    [job_id] = shell.pending
    assert (await queued_generate_request(runtime, job_id))["safety_check"] is False
    assert "tester: safety — off" in await _say(shell, "/mod log")


async def test_after_every_image_was_withheld_reroll_works_and_vary_says_why_not(
    shell: ShellAdapter, runtime: BotRuntime
) -> None:
    await _say(shell, "/imagine a red fox --count 2 --seed 5")
    [job_id] = shell.pending
    await runtime.queue.zrem(engine_queue(runtime), job_id)
    result = GenerateResult(
        job_id=job_id, image_urls=[], seed=5, width=64, height=64, steps=4, seconds=0.5, withheld=2
    )
    out = shell.out
    assert isinstance(out, io.StringIO)
    out.seek(0)
    out.truncate()

    await Deliverer(runtime.core, shell).result(result.model_dump())

    assert out.getvalue() == (
        "“a red fox” · seed 5: the safety filter withheld all 2 images, so nothing is posted; "
        "they are given back to your quota. Try another prompt.\n"
    )
    assert await _say(shell, "/vary 1") == (
        "✗ The safety filter withheld every image of that result, so there is none to vary. "
        "Nothing was queued.\n"
    )
    assert (await _say(shell, "/reroll")).startswith("Drawing 2 images (seed ")
