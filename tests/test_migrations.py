from pathlib import Path

import aiosqlite

from bot.core.store import Store, apply_migrations, migration_files


async def _tables(db: aiosqlite.Connection) -> set[str]:
    async with db.execute("SELECT name FROM sqlite_master WHERE type = 'table'") as cur:
        return {row[0] for row in await cur.fetchall()}


async def test_migrations_apply_to_an_empty_file_and_record_versions(tmp_path: Path) -> None:
    async with aiosqlite.connect(tmp_path / "db.sqlite3") as db:
        applied = await apply_migrations(db)
        assert applied == [path.name for _, path in migration_files()]
        assert {"subjects", "jobs", "schema_migrations"} <= await _tables(db)
        async with db.execute("SELECT version FROM schema_migrations ORDER BY version") as cur:
            versions = [row[0] for row in await cur.fetchall()]
        assert versions == [number for number, _ in migration_files()]


async def test_migrations_are_idempotent_on_a_second_run(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    async with aiosqlite.connect(path) as db:
        await apply_migrations(db)
        await db.execute(
            "INSERT INTO jobs (id, kind, platform, workspace, user_id, destination, status,"
            " created_at, updated_at) VALUES ('j', 'generate', 'p', 'w', 'u', '{}', 'queued',"
            " 'now', 'now')"
        )
        await db.commit()
    async with aiosqlite.connect(path) as db:
        assert await apply_migrations(db) == []
        async with db.execute("SELECT count(*) FROM jobs") as cur:
            assert (await cur.fetchone())[0] == 1


async def test_a_failing_migration_leaves_no_trace(tmp_path: Path) -> None:
    migrations = tmp_path / "migrations"
    migrations.mkdir()
    (migrations / "0001_ok.sql").write_text("CREATE TABLE a (x INTEGER);")
    (migrations / "0002_broken.sql").write_text("CREATE TABLE b (x INTEGER);\nNOT SQL;")
    async with aiosqlite.connect(tmp_path / "db.sqlite3") as db:
        try:
            await apply_migrations(db, migrations)
        except aiosqlite.OperationalError:
            pass
        else:
            raise AssertionError("the broken migration should fail")
        tables = await _tables(db)
        assert "a" in tables and "b" not in tables
        async with db.execute("SELECT version FROM schema_migrations") as cur:
            assert [row[0] for row in await cur.fetchall()] == [1]


async def test_store_opens_in_wal_mode(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "db.sqlite3")
    try:
        async with store.db.execute("PRAGMA journal_mode") as cur:
            assert (await cur.fetchone())[0] == "wal"
    finally:
        await store.close()
