"""A job waiting for an engine is told when it moves up the queue (real Redis, no engine)."""

from __future__ import annotations

import asyncio

from bot.core.delivery import Deliverer, progress_text
from bot.core.store import Owner, utcnow
from bot.launcher import BotRuntime, delivering
from engine.api import Progress
from tests.conftest import RecordingSink, engine_queue, ready_subject

DEST = {"channel": "c1"}


def told(sink: RecordingSink) -> list[tuple[str, str]]:
    """(job id, text) of each progress update shown."""
    return [(job_id, text) for job_id, text, _ in sink.progress]


async def engine_finished(runtime: BotRuntime, job_id: str) -> None:
    """What an engine finishing a job leaves behind: the job out of its queue, delivered."""
    await runtime.queue.zrem(engine_queue(runtime), job_id)
    await runtime.store.update_job(job_id, status="done", delivered_at=utcnow())


async def test_waiting_jobs_hear_their_new_place_once_each_time_it_changes(
    runtime: BotRuntime, owner: Owner
) -> None:
    other = Owner(owner.platform, owner.workspace, "user-2")
    first, second, third = [
        await runtime.core.imagine(who, DEST, "a red fox", count=1) for who in (owner, other, owner)
    ]
    assert [r.position for r in (first, second, third)] == [1, 2, 3]
    sink = RecordingSink()
    deliverer = Deliverer(runtime.core, sink)

    await deliverer.show_queue_positions()
    assert told(sink) == []  # nothing moved since the receipts

    await engine_finished(runtime, first.job_id)
    await deliverer.show_queue_positions()
    await deliverer.show_queue_positions()  # nothing new the second time
    assert first.job_id not in deliverer._last_progress  # nothing kept for an ended job
    assert told(sink) == [
        (second.job_id, "your image: waiting for the engine (position 1)"),
        (third.job_id, "your image: waiting for the engine (position 2)"),
    ]

    # The engine starts the second job: its own updates take over, and a stale place in the
    # queue handled after them is not shown.
    await deliverer.progress(
        Progress(job_id=second.job_id, phase="generating", step=1).model_dump()
    )
    await deliverer.progress(
        Progress(job_id=second.job_id, phase="queued", position=1).model_dump()
    )
    assert [text for job_id, text in told(sink) if job_id == second.job_id][-1].startswith(
        "your image: drawing"
    )
    job = await runtime.store.get_job(second.job_id)
    assert job is not None and job.status == "running"
    assert runtime.core.told_positions == {}  # nothing kept for jobs no longer waiting


async def test_after_a_restart_a_waiting_job_is_told_its_place_once(
    runtime: BotRuntime, owner: Owner
) -> None:
    receipts = [await runtime.core.imagine(owner, DEST, "a hen", count=1) for _ in range(2)]
    runtime.core.told_positions.clear()  # a new bot process knows no receipts
    sink = RecordingSink()
    deliverer = Deliverer(runtime.core, sink)

    await deliverer.show_queue_positions()
    await deliverer.show_queue_positions()

    assert told(sink) == [
        (receipts[0].job_id, "your image: waiting for the engine (position 1)"),
        (receipts[1].job_id, "your image: waiting for the engine (position 2)"),
    ]


async def test_the_running_bot_updates_places_on_its_own(runtime: BotRuntime, owner: Owner) -> None:
    first, second = [await runtime.core.imagine(owner, DEST, "a cat", count=1) for _ in range(2)]
    sink = RecordingSink()
    async with delivering(runtime, sink, positions_every=0.05):
        await engine_finished(runtime, first.job_id)
        async with asyncio.timeout(5):
            while not sink.progress:
                await asyncio.sleep(0.02)
    assert told(sink) == [(second.job_id, "your image: waiting for the engine (position 1)")]


def test_a_place_in_the_queue_is_shown_only_while_waiting() -> None:
    waiting = Progress(job_id="j", phase="queued", position=3)
    assert progress_text(waiting, "rex") == "rex: waiting for the engine (position 3)"
    assert progress_text(Progress(job_id="j", phase="queued"), "rex") == (
        "rex: waiting for the engine"
    )


async def test_a_receipt_names_its_job_as_the_later_progress_updates_do(
    runtime: BotRuntime, owner: Owner
) -> None:
    await ready_subject(runtime, owner, "rex", "zqv")
    receipts = [
        await runtime.core.imagine(owner, DEST, "a cat", count=1),
        await runtime.core.imagine(owner, DEST, "a cat", count=2),
        await runtime.core.showcase(owner, DEST, "rex"),
    ]
    sink = RecordingSink()
    deliverer = Deliverer(runtime.core, sink)

    for receipt in receipts:
        step = Progress(job_id=receipt.job_id, phase="generating", step=1, total=4)
        await deliverer.progress(step.model_dump())

    labels = ["your image", "your images", "showcase of rex"]
    assert [receipt.label for receipt in receipts] == labels
    assert [text.partition(":")[0] for _, text in told(sink)] == labels
