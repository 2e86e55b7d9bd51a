"""Image and moderation-record retention (DREAMBOT_KEEP_IMAGES_DAYS, _KEEP_MODERATION_DAYS,
migration 0012), against a real SQLite file, a real Redis and real files in the artifact
store: what the sweep deletes, what it leaves, and what Vary/Upscale/Reroll say afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiosqlite
import pytest
from aiohttp import web

from bot.core.commands import Core
from bot.core.errors import UserError
from bot.core.retention import SWEEP_BATCH
from bot.core.store import Job, Owner, Store, apply_migrations, migration_files
from bot.launcher import BotRuntime, delivering, open_core
from engine.artifacts import ArtifactStore, local_path
from tests.conftest import TEST_PLATFORM, RecordingSink, queued, table_rows

DEST = {"channel": "c1"}


def days_ago(days: float) -> str:
    """The store's timestamp of ``days`` days ago."""
    return (datetime.now(UTC) - timedelta(days=days)).isoformat(timespec="seconds")


async def stored_job(
    runtime: BotRuntime,
    owner: Owner,
    *,
    ended_days_ago: float,
    status: str = "done",
    delivered: bool = True,
    kind: str = "generate",
    images: int = 2,
    prompt: str = "a red fox",
) -> Job:
    """A job that ended ``ended_days_ago`` days ago, with its images and a live preview
    written to the artifact store where the engine writes them (``outputs/<job id>/``)."""
    artifacts = runtime.core.artifacts
    job_id = uuid.uuid4().hex
    await runtime.store.insert_job(
        job_id, kind, owner, DEST, prompt=prompt, options={"prompt": prompt, "seed": 7}
    )
    urls = [artifacts.url("outputs", job_id, f"{i:02d}.png") for i in range(images)]
    for url in [*urls, artifacts.url("outputs", job_id, "previews", "0001.jpg")]:
        await artifacts.aput_bytes(url, b"image bytes")
    result = {
        "job_id": job_id,
        "image_urls": urls,
        "seed": 7,
        "width": 64,
        "height": 64,
        "steps": 4,
        "seconds": 0.5,
    }
    ended = days_ago(ended_days_ago)
    async with runtime.store.transaction() as db:
        await db.execute(
            "UPDATE jobs SET status = ?, result = ?, created_at = ?, updated_at = ?,"
            " delivered_at = ? WHERE id = ?",
            (
                status,
                json.dumps(result) if status == "done" else None,
                ended,
                ended,
                ended if delivered else None,
                job_id,
            ),
        )
    job = await runtime.store.get_job(job_id)
    assert job is not None
    return job


def outputs(runtime: BotRuntime, job: Job) -> Path:
    """The job's outputs folder on disk."""
    path = local_path(runtime.core.artifacts.url("outputs", job.id))
    assert path is not None
    return path


async def images_deleted_at(runtime: BotRuntime, job: Job) -> str | None:
    found = await runtime.store.get_job(job.id)
    assert found is not None
    return found.images_deleted_at


async def test_the_sweep_deletes_only_old_finished_image_jobs_of_its_platform_and_marks_them(
    runtime: BotRuntime, owner: Owner
) -> None:
    old_done = await stored_job(runtime, owner, ended_days_ago=31)
    old_failed = await stored_job(runtime, owner, ended_days_ago=40, status="failed", images=0)
    old_cancelled = await stored_job(runtime, owner, ended_days_ago=45, status="cancelled")
    recent = await stored_job(runtime, owner, ended_days_ago=29)
    # Its result still waits to be posted: the post would read these files.
    undelivered = await stored_job(runtime, owner, ended_days_ago=31, delivered=False)
    running = await stored_job(runtime, owner, ended_days_ago=31, status="running")
    elsewhere = await stored_job(
        runtime, Owner("slack", "T1", "U1"), ended_days_ago=31
    )  # another bot process's
    training = await stored_job(runtime, owner, ended_days_ago=90, kind="train", images=0)
    samples = runtime.core.artifacts.url("subjects", "s1", "samples", "00.png")
    await runtime.core.artifacts.aput_bytes(samples, b"sample grid")

    swept = await runtime.core.retention.sweep_images()

    assert (swept.jobs, swept.images) == (3, 2)  # only the done job's result lists images
    for job in (old_done, old_failed, old_cancelled):
        assert not outputs(runtime, job).exists(), job.status
        assert await images_deleted_at(runtime, job) is not None
    for job in (recent, undelivered, running, elsewhere, training):
        assert (outputs(runtime, job) / "previews" / "0001.jpg").exists()
        assert await images_deleted_at(runtime, job) is None
    assert local_path(samples) is not None and local_path(samples).exists()  # type: ignore[union-attr]


async def test_a_second_sweep_repeats_no_work(runtime: BotRuntime, owner: Owner) -> None:
    job = await stored_job(runtime, owner, ended_days_ago=31)
    assert (await runtime.core.retention.sweep_images()).jobs == 1
    marked = await images_deleted_at(runtime, job)
    # Were it looked at again, this file would go.
    await runtime.core.artifacts.aput_bytes(
        runtime.core.artifacts.url("outputs", job.id, "left.png"), b"x"
    )

    again = await runtime.core.retention.sweep_images()

    assert (again.jobs, again.images) == (0, 0)
    assert (outputs(runtime, job) / "left.png").exists()
    assert await images_deleted_at(runtime, job) == marked


async def test_zero_days_keeps_images_forever(runtime: BotRuntime, owner: Owner) -> None:
    runtime.settings.keep_images_days = 0
    job = await stored_job(runtime, owner, ended_days_ago=3650)

    assert (await runtime.core.retention.sweep_images()).jobs == 0

    assert (outputs(runtime, job) / "00.png").exists()
    assert await images_deleted_at(runtime, job) is None


async def test_the_days_come_from_the_setting(runtime: BotRuntime, owner: Owner) -> None:
    runtime.settings.keep_images_days = 7
    week_old = await stored_job(runtime, owner, ended_days_ago=8)
    days_old = await stored_job(runtime, owner, ended_days_ago=6)

    assert (await runtime.core.retention.sweep_images()).jobs == 1

    assert not outputs(runtime, week_old).exists()
    assert outputs(runtime, days_old).exists()


async def test_a_large_backlog_is_swept_in_batches_in_one_sweep(
    runtime: BotRuntime, owner: Owner
) -> None:
    jobs = [
        await stored_job(runtime, owner, ended_days_ago=31, images=1)
        for _ in range(SWEEP_BATCH + 3)
    ]

    swept = await runtime.core.retention.sweep_images()

    assert (swept.jobs, swept.images) == (len(jobs), len(jobs))
    assert not any(outputs(runtime, job).exists() for job in jobs)


async def test_bot_processes_sweeping_one_database_at_once_count_each_job_once(
    runtime: BotRuntime, owner: Owner
) -> None:
    ours = [await stored_job(runtime, owner, ended_days_ago=31) for _ in range(6)]
    theirs = await stored_job(runtime, Owner("slack", "T1", "U1"), ended_days_ago=31)
    async with (
        open_core(runtime.settings, TEST_PLATFORM) as twin,
        open_core(runtime.settings, "slack") as slack,
    ):
        swept = await asyncio.gather(
            runtime.core.retention.sweep_images(),
            twin.core.retention.sweep_images(),
            slack.core.retention.sweep_images(),
        )

    assert swept[0].jobs + swept[1].jobs == len(ours)  # two processes of one platform
    assert swept[2].jobs == 1  # the Slack bot's own job, and only that
    for job in [*ours, theirs]:
        assert not outputs(runtime, job).exists()
        assert await images_deleted_at(runtime, job) is not None


@contextlib.asynccontextmanager
async def read_only_store(runtime: BotRuntime) -> AsyncIterator[Core]:
    """The runtime's core, but with its artifact store's files served read-only over HTTP:
    fsspec's HTTP store can read and list them, and can't delete (a store that refuses)."""
    folder = local_path(runtime.core.artifacts.base_url)
    assert folder is not None
    folder.mkdir(parents=True, exist_ok=True)
    app = web.Application()
    app.router.add_static("/artifacts", folder, show_index=True)
    server = web.AppRunner(app)
    await server.setup()
    await web.TCPSite(server, "127.0.0.1", 0).start()
    try:
        base = f"http://127.0.0.1:{server.addresses[0][1]}/artifacts"
        yield Core(
            runtime.settings, runtime.store, ArtifactStore(base), runtime.queue, TEST_PLATFORM
        )
    finally:
        await server.cleanup()


async def test_a_store_that_refuses_to_delete_leaves_the_job_for_the_next_sweep(
    runtime: BotRuntime, owner: Owner, caplog: pytest.LogCaptureFixture
) -> None:
    job = await stored_job(runtime, owner, ended_days_ago=31)
    async with read_only_store(runtime) as read_only:
        with caplog.at_level(logging.WARNING, logger="bot.core.retention"):
            swept = await read_only.retention.sweep_images()

    assert (swept.jobs, swept.failed) == (0, 1)
    assert f"job {job.id}: could not delete its stored images" in caplog.text
    assert await images_deleted_at(runtime, job) is None
    assert (await runtime.core.retention.sweep_images()).jobs == 1  # the store is back
    assert not outputs(runtime, job).exists()


async def test_the_sweep_logs_how_much_it_deleted(
    runtime: BotRuntime, owner: Owner, caplog: pytest.LogCaptureFixture
) -> None:
    await stored_job(runtime, owner, ended_days_ago=31, images=4)
    await stored_job(runtime, owner, ended_days_ago=32, images=1)

    with caplog.at_level(logging.INFO, logger="bot.core.retention"):
        await runtime.core.retention.sweep_images()

    assert (
        "image retention (test): deleted the stored images of 2 job(s), 5 image(s) and their "
        "previews (kept 30 days)"
    ) in caplog.text


async def test_the_bot_process_sweeps_at_start(
    runtime: BotRuntime, owner: Owner, sink: RecordingSink
) -> None:
    job = await stored_job(runtime, owner, ended_days_ago=31)

    async with delivering(runtime, sink):
        async with asyncio.timeout(10):
            while outputs(runtime, job).exists():
                await asyncio.sleep(0.05)

    assert await images_deleted_at(runtime, job) is not None


# What the buttons say once the images are gone.


async def test_vary_and_upscale_of_a_deleted_image_say_so_and_queue_nothing(
    runtime: BotRuntime, owner: Owner
) -> None:
    job = await stored_job(runtime, owner, ended_days_ago=31)
    await runtime.core.retention.sweep_images()

    for action in ("vary", "upscale"):
        with pytest.raises(UserError) as refused:
            await runtime.core.reimagine(owner, DEST, job.id, **{action: True}, index=1)
        assert refused.value.message == (
            "That image is no longer stored: images are kept 30 days. Nothing was queued. To "
            "draw it again, use `/imagine <the same prompt> --seed 7` (with the same options, "
            "the seed shown with the result draws the same images); Reroll still draws the "
            "prompt with a new seed."
        )
    assert await queued(runtime.queue) == 0
    assert (await runtime.store.usage(owner)).images == 0

    receipt = await runtime.core.reimagine(owner, DEST, job.id)  # Reroll needs only the prompt

    assert receipt.text.startswith("Drawing 2 images (seed ")
    assert await queued(runtime.queue) == 1


async def test_a_deleted_variation_is_not_promised_back_from_its_prompt_and_seed(
    runtime: BotRuntime, owner: Owner
) -> None:
    """A Vary's result started from an earlier image: its prompt and seed draw the earlier
    image's kind of result, not it, so the answer doesn't suggest them."""
    job = await stored_job(runtime, owner, ended_days_ago=31)
    await runtime.core.retention.sweep_images()
    redraw = {"action": "vary", "image": 1, "strength": 0.35, "factor": 1}
    await runtime.store.update_job(job.id, options={**job.options, "redraw": redraw})

    with pytest.raises(UserError) as refused:
        await runtime.core.reimagine(owner, DEST, job.id, upscale=True)

    assert refused.value.message == (
        "That image is no longer stored: images are kept 30 days. Nothing was queued. It was "
        "a variation of image 2 of an earlier result, which the prompt and seed alone don't "
        "draw again; Reroll still draws the prompt with a new seed."
    )
    assert await queued(runtime.queue) == 0


async def test_vary_before_the_sweep_still_starts_from_the_stored_image(
    runtime: BotRuntime, owner: Owner
) -> None:
    job = await stored_job(runtime, owner, ended_days_ago=29)
    await runtime.core.retention.sweep_images()

    receipt = await runtime.core.reimagine(owner, DEST, job.id, vary=True)

    assert receipt.text.startswith("Drawing 2 variations of image 1 (seed 7)")


async def test_on_discord_the_answer_names_the_options_as_discord_takes_them(
    runtime: BotRuntime, owner: Owner
) -> None:
    from bot.core.syntax import DISCORD_SYNTAX

    runtime.core.syntax = DISCORD_SYNTAX
    runtime.settings.keep_images_days = 14

    said = runtime.core.image_gone_text(7)

    assert said.startswith("That image is no longer stored: images are kept 14 days.")
    assert "`/imagine prompt:<the same prompt> seed:7`" in said


# Moderation records.


async def old_moderation_records(runtime: BotRuntime, platform: str, age_days: float) -> None:
    """One row of each moderation table (and an expired ban), made ``age_days`` ago."""
    owner = Owner(platform, "g", f"user-{uuid.uuid4().hex[:6]}")
    made = days_ago(age_days)
    job = await stored_job(runtime, owner, ended_days_ago=age_days)
    async with runtime.store.transaction() as db:
        await db.execute(
            "INSERT INTO quota_usage (job_id, platform, workspace, user_id, kind, units, day,"
            " created_at) VALUES (?, ?, 'g', ?, 'images', 2, ?, ?)",
            (job.id, platform, owner.user_id, made[:10], made),
        )
        await db.execute(
            "INSERT INTO blocked_attempts (platform, workspace, user_id, rule_label, fragment,"
            " prompt, created_at) VALUES (?, 'g', ?, 'default:gore', 'gore', 'gore', ?)",
            (platform, owner.user_id, made),
        )
        await db.execute(
            "INSERT INTO withheld_outputs (job_id, platform, workspace, user_id, kind, withheld,"
            " total, prompt, created_at) VALUES (?, ?, 'g', ?, 'images', 1, 2, 'a fox', ?)",
            (job.id, platform, owner.user_id, made),
        )
        await db.execute(
            "INSERT INTO audit_log (platform, workspace, moderator_id, action, target,"
            " created_at) VALUES (?, 'g', 'mod', 'ban', ?, ?)",
            (platform, owner.user_id, made),
        )
        await db.execute(
            "INSERT INTO bans (platform, workspace, user_id, banned_by, created_at, expires_at)"
            " VALUES (?, 'g', ?, 'mod', ?, ?)",
            (platform, owner.user_id, made, made),
        )


async def moderation_rows(runtime: BotRuntime) -> dict[str, int]:
    rows = {}
    for table in ("quota_usage", "blocked_attempts", "withheld_outputs", "audit_log", "bans"):
        async with runtime.store.db.execute(f"SELECT count(*) FROM {table}") as cursor:
            row = await cursor.fetchone()
        assert row is not None
        rows[table] = int(row[0])
    return rows


async def test_moderation_records_past_their_retention_go_and_the_rest_stay(
    runtime: BotRuntime, caplog: pytest.LogCaptureFixture
) -> None:
    await old_moderation_records(runtime, TEST_PLATFORM, 181)
    await old_moderation_records(runtime, TEST_PLATFORM, 179)
    await old_moderation_records(runtime, "slack", 400)  # another bot process's to sweep
    forever = Owner(TEST_PLATFORM, "g", "banned-for-good")
    async with runtime.store.transaction() as db:
        await db.execute(
            "INSERT INTO bans (platform, workspace, user_id, banned_by, created_at, expires_at)"
            " VALUES (?, 'g', ?, 'mod', ?, NULL)",
            (forever.platform, forever.user_id, days_ago(1000)),
        )

    with caplog.at_level(logging.INFO, logger="bot.core.retention"):
        deleted = await runtime.core.retention.sweep_moderation_records()

    assert deleted == 5
    assert await moderation_rows(runtime) == {
        "quota_usage": 2,
        "blocked_attempts": 2,
        "withheld_outputs": 2,
        "audit_log": 2,
        "bans": 3,
    }
    assert await runtime.store.active_ban(forever) is not None
    assert "moderation retention (test): deleted 5 record(s) older than 180 days" in caplog.text


async def test_zero_days_keeps_moderation_records_forever(runtime: BotRuntime) -> None:
    runtime.settings.keep_moderation_days = 0
    await old_moderation_records(runtime, TEST_PLATFORM, 5000)

    assert await runtime.core.retention.sweep_moderation_records() == 0

    assert set((await moderation_rows(runtime)).values()) == {1}


# The migration.


async def test_migration_0012_on_an_existing_database_loses_nothing_and_sweeps_old_jobs(
    tmp_path: Path,
) -> None:
    before_0012 = tmp_path / "migrations"
    before_0012.mkdir()
    for number, path in migration_files():
        if number < 12:
            shutil.copy(path, before_0012 / path.name)
    database = tmp_path / "db.sqlite3"
    old = days_ago(60)
    async with aiosqlite.connect(database) as db:
        await apply_migrations(db, before_0012)
        for job_id, kind, status in [("j1", "generate", "done"), ("j2", "train", "failed")]:
            await db.execute(
                "INSERT INTO jobs (id, kind, platform, workspace, user_id, prompt, destination,"
                " status, result, created_at, updated_at, delivered_at, options) VALUES"
                " (?, ?, 'test', 'g', 'u', 'a cat', '{}', ?, '{\"image_urls\": [\"x\"]}',"
                " ?, ?, ?, '{\"count\": 1}')",
                (job_id, kind, status, old, old, old),
            )
        await db.execute(
            "INSERT INTO audit_log (platform, workspace, moderator_id, action, target,"
            " created_at) VALUES ('test', 'g', 'm', 'ban', 'u', 't')"
        )
        await db.commit()
        tables = ("jobs", "audit_log")
        before = await table_rows(db, tables)

    store = await Store.open(database)  # applies 0012 and anything after it
    try:
        after = await table_rows(store.db, tables)
        width = len(before["jobs"][0])
        assert [row[:width] for row in after["jobs"]] == before["jobs"]
        # The new columns come last, NULL: images still stored, data not deleted.
        assert [row[width:] for row in after["jobs"]] == [(None, None), (None, None)]
        assert after["audit_log"] == before["audit_log"]
        [job] = await store.jobs_with_stored_images("test", days_ago(30), "", 10)
        assert job.id == "j1" and job.images_deleted_at is None and job.data_deleted_at is None
        async with store.db.execute("PRAGMA foreign_key_check") as cursor:
            assert await cursor.fetchall() == []
    finally:
        await store.close()
