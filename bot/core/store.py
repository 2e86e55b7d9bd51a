"""The bot's SQLite store (aiosqlite, WAL) and the migration runner."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"
_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


def utcnow() -> str:
    """The current time as an ISO-8601 UTC string, the store's timestamp format."""
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Owner:
    """Who owns something: a user in one workspace (guild/team) of one platform."""

    platform: str
    workspace: str
    user_id: str


@dataclass(frozen=True)
class Subject:
    """A row of ``subjects``."""

    id: str
    owner: Owner
    name: str
    class_noun: str
    token: str
    status: str
    adapter_url: str | None
    photos_url: str
    photo_count: int
    base_model: str
    error: str | None
    created_at: str
    updated_at: str


@dataclass(frozen=True)
class Job:
    """A row of ``jobs``."""

    id: str
    kind: str
    owner: Owner
    subject_id: str | None
    prompt: str | None
    destination: dict[str, Any]
    status: str
    result: dict[str, Any] | None
    error: str | None
    created_at: str
    updated_at: str
    delivered_at: str | None

    @property
    def finished(self) -> bool:
        """Whether the job reached a final state."""
        return self.status in ("done", "failed", "cancelled")


def _subject(row: aiosqlite.Row) -> Subject:
    return Subject(
        id=row["id"],
        owner=Owner(row["platform"], row["workspace"], row["user_id"]),
        name=row["name"],
        class_noun=row["class_noun"],
        token=row["token"],
        status=row["status"],
        adapter_url=row["adapter_url"],
        photos_url=row["photos_url"],
        photo_count=row["photo_count"],
        base_model=row["base_model"],
        error=row["error"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _job(row: aiosqlite.Row) -> Job:
    return Job(
        id=row["id"],
        kind=row["kind"],
        owner=Owner(row["platform"], row["workspace"], row["user_id"]),
        subject_id=row["subject_id"],
        prompt=row["prompt"],
        destination=json.loads(row["destination"]),
        status=row["status"],
        result=json.loads(row["result"]) if row["result"] else None,
        error=row["error"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        delivered_at=row["delivered_at"],
    )


def migration_files(directory: Path = MIGRATIONS_DIR) -> list[tuple[int, Path]]:
    """The numbered migration files in order; a badly named ``.sql`` file is an error."""
    found = []
    for path in sorted(directory.glob("*.sql")):
        match = _MIGRATION_NAME.match(path.name)
        if match is None:
            raise RuntimeError(f"migration file {path} is not named NNNN_name.sql")
        found.append((int(match.group(1)), path))
    return found


async def apply_migrations(db: aiosqlite.Connection, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply pending migrations in order, each inside one transaction; return the names applied."""
    await db.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
    )
    await db.commit()
    async with db.execute("SELECT version FROM schema_migrations") as cursor:
        done = {row[0] for row in await cursor.fetchall()}
    applied = []
    for version, path in migration_files(directory):
        if version in done:
            continue
        script = path.read_text()
        record = (
            "INSERT INTO schema_migrations (version, name, applied_at) "
            f"VALUES ({version}, '{path.name}', '{utcnow()}');"
        )
        try:
            # executescript runs statements as written, so the script's own BEGIN/COMMIT
            # makes the migration and its version record one transaction.
            await db.executescript(f"BEGIN;\n{script}\n;{record}\nCOMMIT;")
        except Exception:
            await db.rollback()
            raise
        applied.append(path.name)
    return applied


class Store:
    """Typed access to the bot's tables. Open with ``Store.open(path)``."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db

    @classmethod
    async def open(cls, path: Path) -> Store:
        """Open (creating if needed) the database at ``path`` and apply pending migrations."""
        path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(path)
        db.row_factory = aiosqlite.Row
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA foreign_keys=ON")
        await db.execute("PRAGMA busy_timeout=5000")
        await apply_migrations(db)
        return cls(db)

    async def close(self) -> None:
        """Close the connection."""
        await self.db.close()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """A write transaction, committed on success and rolled back on error."""
        await self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            await self.db.rollback()
            raise
        await self.db.commit()

    # Subjects.

    async def insert_subject(self, subject: Subject) -> None:
        """Insert a new subject (raises ``aiosqlite.IntegrityError`` on a name/token clash)."""
        await self.db.execute(
            "INSERT INTO subjects (id, platform, workspace, user_id, name, class_noun, token,"
            " status, adapter_url, photos_url, photo_count, base_model, error, created_at,"
            " updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                subject.id,
                subject.owner.platform,
                subject.owner.workspace,
                subject.owner.user_id,
                subject.name,
                subject.class_noun,
                subject.token,
                subject.status,
                subject.adapter_url,
                subject.photos_url,
                subject.photo_count,
                subject.base_model,
                subject.error,
                subject.created_at,
                subject.updated_at,
            ),
        )
        await self.db.commit()

    async def get_subject(self, subject_id: str) -> Subject | None:
        """The subject with this id, if any."""
        async with self.db.execute("SELECT * FROM subjects WHERE id = ?", (subject_id,)) as cur:
            row = await cur.fetchone()
        return _subject(row) if row else None

    async def find_subject(self, owner: Owner, name: str) -> Subject | None:
        """The owner's subject called ``name`` (case-insensitive), if any."""
        async with self.db.execute(
            "SELECT * FROM subjects WHERE platform = ? AND workspace = ? AND user_id = ?"
            " AND lower(name) = lower(?)",
            (owner.platform, owner.workspace, owner.user_id, name),
        ) as cur:
            row = await cur.fetchone()
        return _subject(row) if row else None

    async def list_subjects(self, owner: Owner) -> list[Subject]:
        """The owner's subjects, newest first."""
        async with self.db.execute(
            "SELECT * FROM subjects WHERE platform = ? AND workspace = ? AND user_id = ?"
            " ORDER BY created_at DESC, rowid DESC",
            (owner.platform, owner.workspace, owner.user_id),
        ) as cur:
            return [_subject(row) for row in await cur.fetchall()]

    async def workspace_tokens(self, platform: str, workspace: str) -> set[str]:
        """Every token already taken in a workspace."""
        async with self.db.execute(
            "SELECT token FROM subjects WHERE platform = ? AND workspace = ?",
            (platform, workspace),
        ) as cur:
            return {row[0] for row in await cur.fetchall()}

    async def update_subject(self, subject_id: str, **fields: Any) -> None:
        """Set columns of a subject (and its ``updated_at``)."""
        fields["updated_at"] = utcnow()
        assignments = ", ".join(f"{name} = ?" for name in fields)
        await self.db.execute(
            f"UPDATE subjects SET {assignments} WHERE id = ?", (*fields.values(), subject_id)
        )
        await self.db.commit()

    async def delete_subject(self, subject_id: str) -> None:
        """Delete a subject row (its jobs keep their history, unlinked)."""
        await self.db.execute("DELETE FROM subjects WHERE id = ?", (subject_id,))
        await self.db.commit()

    # Jobs.

    async def insert_job(
        self,
        job_id: str,
        kind: str,
        owner: Owner,
        destination: dict[str, Any],
        *,
        subject_id: str | None = None,
        prompt: str | None = None,
    ) -> None:
        """Record a job about to be queued."""
        now = utcnow()
        await self.db.execute(
            "INSERT INTO jobs (id, kind, platform, workspace, user_id, subject_id, prompt,"
            " destination, status, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (
                job_id,
                kind,
                owner.platform,
                owner.workspace,
                owner.user_id,
                subject_id,
                prompt,
                json.dumps(destination),
                "queued",
                now,
                now,
            ),
        )
        await self.db.commit()

    async def get_job(self, job_id: str) -> Job | None:
        """The job with this id, if any."""
        async with self.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)) as cur:
            row = await cur.fetchone()
        return _job(row) if row else None

    async def delete_job(self, job_id: str) -> None:
        """Forget a job that never reached the queue."""
        await self.db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        await self.db.commit()

    async def update_job(self, job_id: str, **fields: Any) -> None:
        """Set columns of a job (``result`` is stored as JSON)."""
        if "result" in fields and fields["result"] is not None:
            fields["result"] = json.dumps(fields["result"])
        fields["updated_at"] = utcnow()
        assignments = ", ".join(f"{name} = ?" for name in fields)
        await self.db.execute(
            f"UPDATE jobs SET {assignments} WHERE id = ?", (*fields.values(), job_id)
        )
        await self.db.commit()

    async def claim_delivery(self, job_id: str) -> bool:
        """Mark a job's final result as delivered; False if it already was (deliver once)."""
        cursor = await self.db.execute(
            "UPDATE jobs SET delivered_at = ? WHERE id = ? AND delivered_at IS NULL",
            (utcnow(), job_id),
        )
        await self.db.commit()
        return cursor.rowcount == 1

    async def unfinished_jobs(self, platform: str) -> list[Job]:
        """Jobs of a platform whose result has not been delivered yet."""
        async with self.db.execute(
            "SELECT * FROM jobs WHERE platform = ? AND delivered_at IS NULL ORDER BY created_at",
            (platform,),
        ) as cur:
            return [_job(row) for row in await cur.fetchall()]
