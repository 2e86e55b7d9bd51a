"""The shell's /use (which subject [V] means), and how its progress lines name an image job's
images, one or several."""

from __future__ import annotations

import io

import pytest

from bot.adapters.shell import ShellAdapter
from bot.core.delivery import Deliverer
from bot.core.store import Owner
from bot.launcher import BotRuntime
from engine.api import GenerateRequest, Progress
from tests.conftest import ready_subject
from tests.test_moderation_shell import _say

TESTER = Owner("shell", "local", "tester")


@pytest.fixture
def shell(runtime: BotRuntime) -> ShellAdapter:
    return ShellAdapter(runtime.core, "tester", out=io.StringIO())


async def queued_prompt(runtime: BotRuntime, shell: ShellAdapter) -> str:
    """The prompt of the newest job the shell queued, as the engine gets it."""
    job_id = next(iter(shell.pending))
    shell.pending.clear()
    info = await runtime.queue._get_job_def(job_id.encode(), None)
    return GenerateRequest.model_validate(info.args[0]).prompt


async def test_use_in_the_shell_picks_v_and_use_alone_goes_back(
    shell: ShellAdapter, runtime: BotRuntime
) -> None:
    await ready_subject(runtime, TESTER, "rex", "zqv")
    await ready_subject(runtime, TESTER, "mia", "bkt")

    assert (await _say(shell, "/use rex")).startswith("[V] now means rex (dog)")
    await _say(shell, "/imagine a [V] on the beach --count 1")
    assert await queued_prompt(runtime, shell) == "a zqv dog on the beach"
    listed = (await _say(shell, "/subjects")).splitlines()
    assert listed[2].endswith("← [V] (chosen with /use)")

    assert await _say(shell, "/use") == "[V] means your newest ready subject again: mia.\n"
    await _say(shell, "/imagine a [V] on the beach --count 1")
    assert await queued_prompt(runtime, shell) == "a bkt dog on the beach"
    assert await _say(shell, "/use fido") == (
        "✗ You have no subject called `fido`. Your subjects: mia, rex.\n"
    )
    assert "/use [name]" in await _say(shell, "/help")


@pytest.mark.parametrize(("count", "label"), [(1, "your image"), (3, "your images")])
async def test_progress_names_the_images_of_a_job_in_the_singular_or_plural(
    shell: ShellAdapter, runtime: BotRuntime, count: int, label: str
) -> None:
    await _say(shell, f"/imagine a red fox --count {count}")
    [job_id] = shell.pending
    deliverer = Deliverer(runtime.core, shell)

    waiting = Progress(job_id=job_id, phase="queued", position=1)
    drawing = Progress(job_id=job_id, phase="generating", step=5, total=10)
    said = [await _progress(shell, deliverer, update) for update in (waiting, drawing)]

    assert said == [
        f"{label}: waiting for the engine (position 1)\n",
        f"{label}: drawing ████████░░░░░░░░ 5/10\n",
    ]


async def _progress(shell: ShellAdapter, deliverer: Deliverer, update: Progress) -> str:
    out = shell.out
    assert isinstance(out, io.StringIO)
    out.seek(0)
    out.truncate()
    await deliverer.progress(update.model_dump())
    return out.getvalue()
