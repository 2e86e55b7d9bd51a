"""The shell adapter's output for engine updates: progress lines and the live preview."""

from __future__ import annotations

import io

from bot.adapters.shell import ShellAdapter
from bot.core.delivery import Delivery
from bot.core.store import Job, Owner
from bot.launcher import BotRuntime
from engine.api import Progress


def job(job_id: str = "a" * 32) -> Job:
    return Job(
        id=job_id,
        kind="generate",
        owner=Owner("shell", "local", "tester"),
        subject_id=None,
        prompt="a red fox",
        destination={"kind": "terminal"},
        status="running",
        result=None,
        error=None,
        created_at="2025-01-01T00:00:00+00:00",
        updated_at="2025-01-01T00:00:00+00:00",
        delivered_at=None,
    )


async def test_the_shell_names_a_jobs_first_preview_file_once(runtime: BotRuntime) -> None:
    out = io.StringIO()
    shell = ShellAdapter(runtime.core, "tester", out=out)
    drawing = Progress(job_id="a" * 32, phase="generating", step=3, total=10)
    for step in (3, 6):
        url = f"file:///data/outputs/{'a' * 32}/previews/{step:03d}.jpg"
        update = drawing.model_copy(update={"step": step, "preview_url": url})
        await shell.show_progress(job(), f"drawing {step}/10", update)
    await shell.show_result(Delivery(job(), "done", []))

    lines = out.getvalue().splitlines()
    assert lines == [
        f"  preview: /data/outputs/{'a' * 32}/previews/003.jpg",
        "drawing 3/10",
        "drawing 6/10",
        "done",
    ]
    assert shell.last_generation is None  # no images: nothing to vary
