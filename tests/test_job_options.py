"""Generation options kept with a job (migration 0003), Reroll/Vary in the core, help text."""

from pathlib import Path

import aiosqlite
import pytest

from bot.core.commands import HELP, SHELL_USAGE
from bot.core.errors import UserError
from bot.core.store import MIGRATIONS_DIR, Owner, Store, apply_migrations
from bot.launcher import BotRuntime
from tests.conftest import engine_queue, table_rows

DEST = {"channel": "c1"}


async def test_imagine_stores_its_options_with_the_job(runtime: BotRuntime, owner: Owner) -> None:
    receipt = await runtime.core.imagine(
        owner, DEST, "a red fox", count=2, seed=9, negative_prompt="blurry", width=512, height=768
    )
    job = await runtime.store.get_job(receipt.job_id)
    assert job is not None
    assert job.options == {
        "prompt": "a red fox",
        "negative_prompt": "blurry",
        "count": 2,
        "seed": 9,
        "width": 512,
        "height": 768,
        "queue": engine_queue(runtime),  # where /cancel and /jobs look for it
    }


async def test_a_bad_size_is_refused(runtime: BotRuntime, owner: Owner) -> None:
    with pytest.raises(UserError, match="multiples of 8"):
        await runtime.core.imagine(owner, DEST, "a fox", width=500)


async def test_the_destination_can_learn_keys_after_queueing(
    runtime: BotRuntime, owner: Owner
) -> None:
    receipt = await runtime.core.imagine(owner, DEST, "a fox", count=1)
    assert await runtime.store.update_job_destination(receipt.job_id, {"message": 2**62 + 1})
    assert await runtime.store.update_job_destination(receipt.job_id, {"thread": "t"})
    job = await runtime.store.get_job(receipt.job_id)
    assert job is not None and job.destination == {**DEST, "message": 2**62 + 1, "thread": "t"}
    assert await runtime.store.update_job_destination(receipt.job_id, {"thread": None})
    job = await runtime.store.get_job(receipt.job_id)
    assert job is not None and job.destination == {**DEST, "message": 2**62 + 1}
    assert not await runtime.store.update_job_destination("nope", {"x": 1})


async def test_reimagine_refuses_unknown_jobs(runtime: BotRuntime, owner: Owner) -> None:
    with pytest.raises(UserError, match="no longer have that image's prompt"):
        await runtime.core.reimagine(owner, DEST, "0" * 32)


def test_help_keeps_the_shell_syntax_by_default_and_takes_a_platforms(
    runtime: BotRuntime,
) -> None:
    assert runtime.core.help_text() == HELP
    assert SHELL_USAGE in HELP
    custom = runtime.core.help_text("/draw prompt:<text>")
    assert custom.endswith("\n\n/draw prompt:<text>") and "/train <name>" not in custom
    assert custom.split("\n\n")[0] == HELP.split("\n\n")[0]  # the shared explanation


async def test_migration_0003_on_a_database_with_0001_and_0002_data_loses_nothing(
    tmp_path: Path,
) -> None:
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    for name in ("0001_initial.sql", "0002_moderation.sql"):
        (earlier / name).write_text((MIGRATIONS_DIR / name).read_text())
    path = tmp_path / "db.sqlite3"
    async with aiosqlite.connect(path) as db:
        assert await apply_migrations(db, earlier) == ["0001_initial.sql", "0002_moderation.sql"]
        await db.execute(
            "INSERT INTO subjects VALUES ('s1', 'test', 'g', 'u', 'rex', 'dog', 'zqv',"
            " 'ready', 'file:///a.safetensors', 'file:///p', 3, 'tiny', NULL, 't0', 't1')"
        )
        rows = [
            ("j1", "done", None, "a red fox", '{"job_id": "j1", "seed": 5, "image_urls": ["a"]}'),
            ("j2", "queued", "s1", "a [V] dog", None),
        ]
        for job_id, status, subject_id, prompt, result in rows:
            await db.execute(
                "INSERT INTO jobs (id, kind, platform, workspace, user_id, subject_id, prompt,"
                " destination, status, result, error, created_at, updated_at, delivered_at)"
                " VALUES (?, 'generate', 'test', 'g', 'u', ?, ?, '{\"c\": 1}',"
                " ?, ?, NULL, 't2', 't3', NULL)",
                (job_id, subject_id, prompt, status, result),
            )
            await db.execute(
                "INSERT INTO quota_usage (job_id, platform, workspace, user_id, kind, units,"
                " day, created_at) VALUES (?, 'test', 'g', 'u', 'images', 1, '2025-01-01', 't')",
                (job_id,),
            )
        await db.execute("INSERT INTO bans VALUES ('test', 'g', 'b', 'spam', 'm', 't', NULL)")
        await db.execute(
            "INSERT INTO audit_log (platform, workspace, moderator_id, action, created_at)"
            " VALUES ('test', 'g', 'm', 'ban', 't')"
        )
        await db.execute(
            "INSERT INTO quota_overrides (platform, workspace, scope, target_id, daily_images,"
            " set_by, updated_at) VALUES ('test', 'g', 'user', 'u', 3, 'm', 't')"
        )
        await db.commit()
        tables = ("subjects", "jobs", "quota_usage", "bans", "audit_log", "quota_overrides")
        before = await table_rows(db, tables)

    store = await Store.open(path)  # applies 0003 and anything after it
    try:
        rows_after = await table_rows(store.db, tables)
        for table, rows_before in before.items():
            after = rows_after[table]
            if table == "jobs":
                # The new column comes next (later migrations' after it, NULL); every old
                # value is where it was.
                width = len(rows_before[0])
                assert [row[:width] for row in after] == rows_before
                assert [row[width] for row in after] == ["{}", "{}"]
                assert all(value is None for row in after for value in row[width + 1 :])
            else:
                assert after == rows_before, table
        async with store.db.execute("SELECT version FROM schema_migrations") as cur:
            assert [row[0] for row in await cur.fetchall()][:3] == [1, 2, 3]
        async with store.db.execute("PRAGMA foreign_key_check") as cur:
            assert await cur.fetchall() == []
        old = await store.get_job("j1")
        assert old is not None and old.options == {} and old.result is not None
    finally:
        await store.close()


async def test_an_old_job_without_options_can_still_be_rerolled(
    runtime: BotRuntime, owner: Owner
) -> None:
    receipt = await runtime.core.imagine(owner, DEST, "a red fox", count=2, seed=5)
    # As a job from before migration 0003: only its prompt and result say how it was made.
    result = {"job_id": receipt.job_id, "seed": 5, "image_urls": ["a.png", "b.png"]}
    await runtime.store.update_job(receipt.job_id, options={}, status="done", result=result)

    varied = await runtime.core.reimagine(owner, DEST, receipt.job_id, vary=True)

    assert varied.text.startswith("Drawing 2 variations of image 1 (seed 5)")
    job = await runtime.store.get_job(varied.job_id)
    assert job is not None and job.options["count"] == 2 and job.prompt == "a red fox"
