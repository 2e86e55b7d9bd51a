"""The bot's SQLite store (aiosqlite, WAL) and the migration runner."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, get_args

import aiosqlite

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"
_Row = TypeVar("_Row", bound="DataclassInstance")
_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


EVERYONE = "*"
"""``subject_shares.shared_with`` for a subject shared with everyone in its workspace."""


def utcnow() -> str:
    """The current time as an ISO-8601 UTC string, the store's timestamp format."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def utcday() -> str:
    """Today's UTC date (``2025-01-31``): the day quota units count against."""
    return datetime.now(UTC).date().isoformat()


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
    options: dict[str, Any] = field(default_factory=dict)
    """How a generation was asked for (JSON column ``options``, migration 0003)."""
    images_deleted_at: str | None = None
    """When its stored images (outputs folder, previews included) were deleted: by the
    retention sweep or at its owner's request (migration 0012)."""
    data_deleted_at: str | None = None
    """When its prompt, options and messages were replaced at its owner's request (/mydata
    delete, /mod delete-user-data; migration 0012)."""

    @property
    def finished(self) -> bool:
        """Whether the job reached a final state."""
        return self.status in ("done", "failed", "cancelled")


@dataclass(frozen=True)
class Redo:
    """What a Reroll / Vary / Upscale asks for: the job whose result it redraws and which
    button (``reroll``, ``vary:N``, ``upscale:N``; N the image, from 0). Recorded with the job
    it queues (``redo_jobs``, migration 0008)."""

    of: str
    button: str


class RedoPending(Exception):
    """The same user's same redo of the same result already has a job waiting or running."""

    def __init__(self, job: Job) -> None:
        super().__init__(job.id)
        self.job = job


UsageKind = Literal["images", "trainings"]
QuotaField = Literal["daily_images", "daily_trainings", "max_active_jobs"]
QUOTA_FIELDS: tuple[QuotaField, ...] = get_args(QuotaField)
OverrideScope = Literal["user", "role", "workspace"]


@dataclass(frozen=True)
class Usage:
    """What a user has spent today (UTC) and how many of their jobs wait or run now."""

    images: int
    trainings: int
    active_jobs: int


@dataclass(frozen=True)
class QuotaOverride:
    """A row of ``quota_overrides``: limits replacing the defaults; None means not set."""

    scope: OverrideScope
    target_id: str
    daily_images: int | None
    daily_trainings: int | None
    max_active_jobs: int | None
    set_by: str
    updated_at: str

    def limit(self, field: QuotaField) -> int | None:
        """This override's value for one limit, if it sets one."""
        value: int | None = getattr(self, field)
        return value


@dataclass(frozen=True)
class Ban:
    """A row of ``bans``; ``expires_at`` None means until lifted."""

    owner: Owner
    reason: str
    banned_by: str
    created_at: str
    expires_at: str | None


@dataclass(frozen=True)
class WorkspaceSettings:
    """A workspace's moderation switches and its default base model."""

    use_default_rules: bool = True
    reveal_blocked_rule: bool = False
    rules_version: int = 0
    default_model: str | None = None
    """The workspace's default base model (a configured name); None: the configured default."""
    safety_check: bool = True
    """Whether the engines run their safety checker on its jobs' images (/mod safety)."""


@dataclass(frozen=True)
class BlockedRule:
    """A row of ``blocked_rules``: one of a workspace's own rules."""

    id: int
    kind: Literal["word", "regex"]
    pattern: str
    added_by: str
    created_at: str


@dataclass(frozen=True)
class BlockedAttempt:
    """A row of ``blocked_attempts``: a prompt that a rule stopped."""

    owner: Owner
    rule_label: str
    fragment: str
    prompt: str
    negative_prompt: str
    created_at: str


WithheldKind = Literal["images", "showcase", "samples"]
"""What a job's withheld outputs were: images of a prompt, cells of a showcase grid, cells of
a training's sample grid."""


@dataclass(frozen=True)
class WithheldOutput:
    """A row of ``withheld_outputs`` (migration 0011): outputs of a job that the engine's
    safety checker withheld, and the quota units that gave back."""

    job_id: str
    owner: Owner
    kind: WithheldKind
    withheld: int
    total: int | None
    prompt: str
    negative_prompt: str
    refunded_units: int
    created_at: str


@dataclass(frozen=True)
class AuditEntry:
    """A row of ``audit_log``: one moderator action."""

    moderator: Owner
    action: str
    target: str
    detail: str
    created_at: str


@dataclass(frozen=True)
class StoredData:
    """What the store keeps about one user in one workspace, counted (for /mydata)."""

    images: int
    """Images of their finished jobs still in the artifact store (a showcase grid is one)."""
    image_jobs: int
    """The jobs those images come from."""
    images_since: str | None
    """When the oldest of those jobs was asked for."""
    prompts: int
    """Their jobs that keep a prompt (image and showcase jobs whose data was not deleted)."""
    active_jobs: int
    """Their jobs waiting or running."""
    quota_records: int
    """Rows of ``quota_usage``: the units each of their jobs spent (moderation)."""
    blocked_prompts: int
    """Rows of ``blocked_attempts`` (moderation; they hold the prompt)."""
    withheld_outputs: int
    """Rows of ``withheld_outputs`` (moderation; they hold the prompt)."""
    audit_entries: int
    """Moderator actions whose target is them (moderation)."""

    @property
    def deletable(self) -> bool:
        """Whether /mydata delete has anything of theirs to delete, besides subjects."""
        return bool(self.images or self.prompts or self.active_jobs)


MODERATION_TABLES = ("quota_usage", "blocked_attempts", "withheld_outputs", "audit_log")
"""The tables moderators keep, also after a user's data is deleted: none holds a photo or an
image. Rows older than ``DREAMBOT_KEEP_MODERATION_DAYS`` are deleted (and expired bans)."""


def _row_owner(row: aiosqlite.Row, user_column: str = "user_id") -> Owner:
    return Owner(row["platform"], row["workspace"], row[user_column])


def _from_row(cls: type[_Row], row: aiosqlite.Row, **computed: Any) -> _Row:
    """A row dataclass whose fields come from the columns of their names, unless ``computed``."""
    return cls(
        **{f.name: computed[f.name] if f.name in computed else row[f.name] for f in fields(cls)}
    )


def _subject(row: aiosqlite.Row) -> Subject:
    return _from_row(Subject, row, owner=_row_owner(row))


def _job(row: aiosqlite.Row) -> Job:
    return _from_row(
        Job,
        row,
        owner=_row_owner(row),
        destination=json.loads(row["destination"]),
        result=json.loads(row["result"]) if row["result"] else None,
        options=json.loads(row["options"] or "{}"),
    )


async def _insert_job(
    db: aiosqlite.Connection,
    job_id: str,
    kind: str,
    owner: Owner,
    destination: dict[str, Any],
    subject_id: str | None,
    prompt: str | None,
    options: dict[str, Any] | None = None,
) -> None:
    now = utcnow()
    await db.execute(
        "INSERT INTO jobs (id, kind, platform, workspace, user_id, subject_id, prompt,"
        " destination, status, created_at, updated_at, options)"
        " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
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
            json.dumps(options or {}),
        ),
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
        # All coroutines of a process share this one connection, and a COMMIT from one would
        # commit another's half-done transaction. Every write therefore holds this lock;
        # BEGIN IMMEDIATE in ``transaction`` then also keeps other processes out.
        self._write_lock = asyncio.Lock()

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
        """A write transaction, committed on success and rolled back on error.

        BEGIN IMMEDIATE takes SQLite's write lock up front, so a check made inside the block
        still holds when the block's writes commit, in this process and in any other.
        Inside the block use the yielded connection only: another Store write method would
        wait for the lock this block holds.
        """
        async with self._write_lock:
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                await self.db.rollback()
                raise
            await self.db.commit()

    async def _one(
        self, convert: Callable[[aiosqlite.Row], _Row], sql: str, params: tuple[Any, ...]
    ) -> _Row | None:
        """The first row a query returns, converted; None if it returns none."""
        async with self.db.execute(sql, params) as cur:
            row = await cur.fetchone()
        return convert(row) if row else None

    async def _all(
        self, convert: Callable[[aiosqlite.Row], _Row], sql: str, params: tuple[Any, ...]
    ) -> list[_Row]:
        """Every row a query returns, converted."""
        async with self.db.execute(sql, params) as cur:
            return [convert(row) for row in await cur.fetchall()]

    async def _write(self, sql: str, params: tuple[Any, ...] = ()) -> int:
        """Run one write statement and commit it; return the number of rows it changed."""
        async with self.transaction() as db:
            cursor = await db.execute(sql, params)
            return cursor.rowcount

    # Subjects.

    async def insert_subject(self, subject: Subject) -> None:
        """Insert a new subject (raises ``aiosqlite.IntegrityError`` on a name/token clash)."""
        await self._write(
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

    async def get_subject(self, subject_id: str) -> Subject | None:
        """The subject with this id, if any."""
        return await self._one(_subject, "SELECT * FROM subjects WHERE id = ?", (subject_id,))

    async def find_subject(self, owner: Owner, name: str) -> Subject | None:
        """The owner's subject called ``name`` (case-insensitive), if any."""
        return await self._one(
            _subject,
            "SELECT * FROM subjects WHERE platform = ? AND workspace = ? AND user_id = ?"
            " AND lower(name) = lower(?)",
            (*_owner(owner), name),
        )

    async def list_subjects(self, owner: Owner) -> list[Subject]:
        """The owner's subjects, newest first."""
        return await self._all(
            _subject,
            "SELECT * FROM subjects WHERE platform = ? AND workspace = ? AND user_id = ?"
            " ORDER BY created_at DESC, rowid DESC",
            _owner(owner),
        )

    async def workspace_tokens(self, platform: str, workspace: str) -> set[str]:
        """Every token already taken in a workspace."""
        async with self.db.execute(
            "SELECT token FROM subjects WHERE platform = ? AND workspace = ?",
            (platform, workspace),
        ) as cur:
            return {row[0] for row in await cur.fetchall()}

    async def workspace_names(self, platform: str, workspace: str) -> set[str]:
        """Every subject name in a workspace (anyone's), in lower case."""
        async with self.db.execute(
            "SELECT lower(name) FROM subjects WHERE platform = ? AND workspace = ?",
            (platform, workspace),
        ) as cur:
            return {row[0] for row in await cur.fetchall()}

    async def update_subject(self, subject_id: str, **fields: Any) -> None:
        """Set columns of a subject (and its ``updated_at``)."""
        fields["updated_at"] = utcnow()
        assignments = ", ".join(f"{name} = ?" for name in fields)
        await self._write(
            f"UPDATE subjects SET {assignments} WHERE id = ?", (*fields.values(), subject_id)
        )

    async def delete_subject(self, subject_id: str) -> None:
        """Delete a subject row (its jobs keep their history, unlinked; its shares go, and
        so does its owner's /use choice of it)."""
        await self._write("DELETE FROM subjects WHERE id = ?", (subject_id,))

    # Subject shares (migration 0009).

    async def share_subject(self, subject_id: str, shared_with: str) -> bool:
        """Let ``shared_with`` (a user id of the subject's workspace, or ``EVERYONE``) draw a
        subject; False if it already could (nothing changes then). Raises
        ``aiosqlite.IntegrityError`` if the subject is gone."""
        return (
            await self._write(
                "INSERT OR IGNORE INTO subject_shares (subject_id, shared_with, created_at)"
                " VALUES (?,?,?)",
                (subject_id, shared_with, utcnow()),
            )
            == 1
        )

    async def unshare_subject(self, subject_id: str, shared_with: str | None = None) -> list[str]:
        """Stop sharing a subject with ``shared_with`` (None: with anyone); return whom it
        was shared with and no longer is, in the order they were shared with."""
        async with self.transaction() as db:
            async with db.execute(
                "SELECT shared_with FROM subject_shares WHERE subject_id = ?"
                " AND (? IS NULL OR shared_with = ?) ORDER BY created_at, rowid",
                (subject_id, shared_with, shared_with),
            ) as cur:
                removed = [row[0] for row in await cur.fetchall()]
            await db.execute(
                "DELETE FROM subject_shares WHERE subject_id = ?"
                " AND (? IS NULL OR shared_with = ?)",
                (subject_id, shared_with, shared_with),
            )
        return removed

    async def subject_shares(self, owner: Owner) -> dict[str, list[str]]:
        """Whom each of the owner's subjects is shared with: subject id → user ids (and
        ``EVERYONE``), in the order they were shared with; unshared subjects are left out."""
        shares: dict[str, list[str]] = {}
        async with self.db.execute(
            "SELECT sh.subject_id, sh.shared_with FROM subject_shares sh"
            " JOIN subjects s ON s.id = sh.subject_id"
            " WHERE s.platform = ? AND s.workspace = ? AND s.user_id = ?"
            " ORDER BY sh.created_at, sh.rowid",
            _owner(owner),
        ) as cur:
            for subject_id, shared_with in await cur.fetchall():
                shares.setdefault(subject_id, []).append(shared_with)
        return shares

    async def subjects_shared_with(self, user: Owner) -> list[Subject]:
        """Other users' subjects that ``user`` may draw: those of the same workspace shared
        with them or with everyone there, newest first."""
        return await self._all(
            _subject,
            "SELECT * FROM subjects WHERE platform = ? AND workspace = ? AND user_id != ?"
            " AND id IN (SELECT subject_id FROM subject_shares WHERE shared_with IN (?, ?))"
            " ORDER BY created_at DESC, rowid DESC",
            (*_owner(user), user.user_id, EVERYONE),
        )

    # Active subjects (/use, migration 0010).

    async def chosen_subject_id(self, owner: Owner) -> str | None:
        """The id of the subject the owner chose as their ``[V]`` with /use, if they chose one
        (it may no longer be ready; a deleted one's choice is gone)."""
        async with self.db.execute(
            "SELECT subject_id FROM active_subjects WHERE platform = ? AND workspace = ?"
            " AND user_id = ?",
            _owner(owner),
        ) as cur:
            row = await cur.fetchone()
        return str(row[0]) if row else None

    async def choose_subject(self, owner: Owner, subject_id: str) -> bool:
        """Make one of the owner's ready subjects their ``[V]``, replacing an earlier choice;
        False if it is not (any more) one of their ready subjects, e.g. deleted meanwhile:
        nothing changes then. One statement, so the check and the choice can't be split by a
        /forget."""
        now = utcnow()
        return (
            await self._write(
                "INSERT INTO active_subjects (platform, workspace, user_id, subject_id,"
                " chosen_at) SELECT platform, workspace, user_id, id, ? FROM subjects"
                " WHERE id = ? AND platform = ? AND workspace = ? AND user_id = ?"
                " AND status = 'ready'"
                " ON CONFLICT (platform, workspace, user_id) DO UPDATE SET"
                " subject_id = excluded.subject_id, chosen_at = excluded.chosen_at",
                (now, subject_id, *_owner(owner)),
            )
            == 1
        )

    async def clear_chosen_subject(self, owner: Owner) -> bool:
        """Forget the owner's /use choice, so ``[V]`` is their newest ready subject again;
        False if they had none."""
        return (
            await self._write(
                "DELETE FROM active_subjects WHERE platform = ? AND workspace = ? AND user_id = ?",
                _owner(owner),
            )
            == 1
        )

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
        options: dict[str, Any] | None = None,
    ) -> None:
        """Record a job about to be queued."""
        async with self.transaction() as db:
            await _insert_job(db, job_id, kind, owner, destination, subject_id, prompt, options)

    async def get_job(self, job_id: str) -> Job | None:
        """The job with this id, if any."""
        return await self._one(_job, "SELECT * FROM jobs WHERE id = ?", (job_id,))

    async def delete_job(self, job_id: str) -> None:
        """Forget a job that never reached the queue."""
        await self._write("DELETE FROM jobs WHERE id = ?", (job_id,))

    async def update_job(self, job_id: str, **fields: Any) -> None:
        """Set columns of a job (``result``, ``destination`` and ``options`` are stored as JSON)."""
        for name in ("result", "destination", "options"):
            if fields.get(name) is not None:
                fields[name] = json.dumps(fields[name])
        fields["updated_at"] = utcnow()
        assignments = ", ".join(f"{name} = ?" for name in fields)
        await self._write(f"UPDATE jobs SET {assignments} WHERE id = ?", (*fields.values(), job_id))

    async def complete_job(self, job_id: str, result: dict[str, Any]) -> bool:
        """Record a job's result and mark it done; False if it was cancelled (one UPDATE, so
        a cancel handled beside the result either comes first and wins, or finds it done).
        A job already done stays done: a retried delivery records the same result again."""
        changed = await self._write(
            "UPDATE jobs SET status = 'done', result = ?, error = NULL, updated_at = ?"
            " WHERE id = ? AND status != 'cancelled'",
            (json.dumps(result), utcnow(), job_id),
        )
        return changed == 1

    async def start_job(self, job_id: str) -> bool:
        """Mark a waiting job running, and a training's subject training; False if the job
        no longer waits.

        Conditional, in one transaction: a progress update handled beside the job's result
        or cancellation must not bring an ended job (or a ready subject) back to running.
        """
        async with self.transaction() as db:
            now = utcnow()
            cursor = await db.execute(
                "UPDATE jobs SET status = 'running', updated_at = ? WHERE id = ?"
                " AND status = 'queued'",
                (now, job_id),
            )
            if cursor.rowcount != 1:
                return False
            await db.execute(
                "UPDATE subjects SET status = 'training', updated_at = ? WHERE status = 'queued'"
                " AND id = (SELECT subject_id FROM jobs WHERE id = ? AND kind = 'train')",
                (now, job_id),
            )
            return True

    async def update_job_destination(self, job_id: str, changes: dict[str, Any]) -> bool:
        """Merge ``changes`` into a job's destination (a key set to None is removed).

        For what an adapter learns after queueing, e.g. the id of its progress message, so it
        survives a restart. One UPDATE (SQLite's json_patch), so concurrent merges of
        different keys can't undo each other. False if there is no such job.
        """
        changed = await self._write(
            "UPDATE jobs SET destination = json_patch(destination, ?), updated_at = ? WHERE id = ?",
            (json.dumps(changes), utcnow(), job_id),
        )
        return changed == 1

    async def claim_delivery(self, job_id: str) -> bool:
        """Mark a job's final result as delivered; False if it already was (deliver once)."""
        changed = await self._write(
            "UPDATE jobs SET delivered_at = ? WHERE id = ? AND delivered_at IS NULL",
            (utcnow(), job_id),
        )
        return changed == 1

    async def begin_delivery(self, job_id: str) -> bool:
        """Claim a job's final result for posting, as ``claim_delivery`` does, and record the
        post as in flight (migration 0006), in one transaction; False if already claimed.
        End with ``end_delivery`` once posted, or ``abandon_delivery`` if the post failed."""
        async with self.transaction() as db:
            now = utcnow()
            cursor = await db.execute(
                "UPDATE jobs SET delivered_at = ? WHERE id = ? AND delivered_at IS NULL",
                (now, job_id),
            )
            if cursor.rowcount != 1:
                return False
            await db.execute(
                "INSERT OR REPLACE INTO deliveries_in_flight (job_id, since) VALUES (?, ?)",
                (job_id, now),
            )
            return True

    async def end_delivery(self, job_id: str) -> None:
        """The claimed result was posted: it stays delivered and is no longer in flight (nor
        are its parts kept: ``posted_parts``)."""
        async with self.transaction() as db:
            await db.execute("DELETE FROM deliveries_in_flight WHERE job_id = ?", (job_id,))
            await db.execute("DELETE FROM posted_parts WHERE job_id = ?", (job_id,))

    async def posted_parts(self, job_id: str) -> set[str]:
        """The parts of a job's result that an earlier, unfinished try already posted
        (migration 0007; the names are the deliverer's: ``bot.core.delivery.PostedParts``)."""
        async with self.db.execute(
            "SELECT part FROM posted_parts WHERE job_id = ?", (job_id,)
        ) as cursor:
            return {row[0] for row in await cursor.fetchall()}

    async def record_posted_parts(self, job_id: str, parts: Sequence[str]) -> None:
        """Record that these parts of a job's result are in the chat."""
        async with self.transaction() as db:
            now = utcnow()
            await db.executemany(
                "INSERT OR IGNORE INTO posted_parts (job_id, part, posted_at) VALUES (?, ?, ?)",
                [(job_id, part, now) for part in parts],
            )

    async def abandon_delivery(self, job_id: str) -> None:
        """The claimed result was not posted: unclaim it, so a retry posts it."""
        async with self.transaction() as db:
            await db.execute(
                "UPDATE jobs SET delivered_at = NULL, updated_at = ? WHERE id = ?",
                (utcnow(), job_id),
            )
            await db.execute("DELETE FROM deliveries_in_flight WHERE job_id = ?", (job_id,))

    async def abandon_deliveries_in_flight(self, platform: str) -> int:
        """Unclaim every delivery of a platform still in flight (left by a process of that
        platform that died mid-post), so the delivery job's re-run posts it; return how many.
        Only for start-up, before the platform's delivery worker runs."""
        async with self.transaction() as db:
            in_flight = (
                "SELECT job_id FROM deliveries_in_flight JOIN jobs ON jobs.id = job_id"
                " WHERE jobs.platform = ?"
            )
            cursor = await db.execute(
                f"UPDATE jobs SET delivered_at = NULL, updated_at = ? WHERE id IN ({in_flight})",
                (utcnow(), platform),
            )
            await db.execute(
                f"DELETE FROM deliveries_in_flight WHERE job_id IN ({in_flight})", (platform,)
            )
            return cursor.rowcount

    async def unfinished_jobs(self, platform: str) -> list[Job]:
        """Jobs of a platform whose result has not been delivered yet."""
        return await self._all(
            _job,
            "SELECT * FROM jobs WHERE platform = ? AND delivered_at IS NULL ORDER BY created_at",
            (platform,),
        )

    async def mark_unconfirmed(self, job_id: str) -> None:
        """Record that the queue never confirmed this job's submission (migration 0005)."""
        await self._write(
            "INSERT OR IGNORE INTO unconfirmed_jobs (job_id, since) VALUES (?, ?)",
            (job_id, utcnow()),
        )

    async def unconfirmed_jobs(self, platform: str) -> list[Job]:
        """Jobs of a platform whose submission the queue never confirmed, oldest first."""
        return await self._all(
            _job,
            "SELECT jobs.* FROM jobs JOIN unconfirmed_jobs ON unconfirmed_jobs.job_id = jobs.id"
            " WHERE jobs.platform = ? ORDER BY unconfirmed_jobs.since, jobs.rowid",
            (platform,),
        )

    async def is_unconfirmed(self, job_id: str) -> bool:
        """Whether the job's submission is marked unconfirmed (``mark_unconfirmed``)."""
        async with self.db.execute(
            "SELECT 1 FROM unconfirmed_jobs WHERE job_id = ?", (job_id,)
        ) as cursor:
            return await cursor.fetchone() is not None

    async def mark_confirmed(self, job_id: str) -> None:
        """Forget that a job's submission was unconfirmed: it is settled."""
        await self._write("DELETE FROM unconfirmed_jobs WHERE job_id = ?", (job_id,))

    # Jobs, seen by moderators and quotas.

    async def active_jobs(
        self, platform: str, workspace: str, user_id: str | None = None
    ) -> list[Job]:
        """Jobs waiting or running in a workspace (of one user if given), oldest first."""
        sql = "SELECT * FROM jobs WHERE platform = ? AND workspace = ? AND status IN " + _ACTIVE
        params: tuple[str, ...] = (platform, workspace)
        if user_id is not None:
            sql += " AND user_id = ?"
            params += (user_id,)
        return await self._all(_job, sql + " ORDER BY created_at, rowid", params)

    async def reserve_job(
        self,
        job_id: str,
        kind: str,
        owner: Owner,
        destination: dict[str, Any],
        *,
        subject_id: str | None = None,
        prompt: str | None = None,
        options: dict[str, Any] | None = None,
        usage_kind: UsageKind,
        units: int,
        check: Callable[[Usage], None],
        redo: Redo | None = None,
    ) -> None:
        """Record a job and the quota units it spends, if ``check`` lets the owner have them.

        ``check`` sees the owner's usage and raises to refuse. Reading the usage and writing
        the job happen in one BEGIN IMMEDIATE transaction, so simultaneous requests (from
        this process or another) are counted one after another and can never overshoot.
        A ``redo`` (a result's button) raises ``RedoPending``, before anything is spent, while
        the owner's job of the same redo waits or runs; the same transaction records it, so of
        two presses at once one queues and the other is refused.
        """
        async with self.transaction() as db:
            if redo is not None:
                pending = await _pending_redo(db, owner, redo)
                if pending is not None:
                    raise RedoPending(pending)
            day = utcday()
            check(await _usage(db, owner, day))
            await _insert_job(db, job_id, kind, owner, destination, subject_id, prompt, options)
            if redo is not None:
                await db.execute(
                    "INSERT INTO redo_jobs (job_id, redo_of, button) VALUES (?, ?, ?)",
                    (job_id, redo.of, redo.button),
                )
            await db.execute(
                "INSERT INTO quota_usage (job_id, platform, workspace, user_id, kind, units, day,"
                " created_at) VALUES (?,?,?,?,?,?,?,?)",
                (job_id, *_owner(owner), usage_kind, units, day, utcnow()),
            )

    async def pending_redo(self, owner: Owner, redo: Redo) -> Job | None:
        """The owner's job of this redo (a result's button) while it waits or runs, if any."""
        return await _pending_redo(self.db, owner, redo)

    async def usage(self, owner: Owner) -> Usage:
        """The owner's quota units spent today (UTC) and jobs waiting or running now."""
        return await _usage(self.db, owner, utcday())

    async def release_usage(self, job_id: str, reason: str) -> bool:
        """Give a job's quota units back; False if they already were (or it spent none)."""
        changed = await self._write(
            "UPDATE quota_usage SET released_at = ?, release_reason = ?"
            " WHERE job_id = ? AND released_at IS NULL",
            (utcnow(), reason, job_id),
        )
        return changed == 1

    async def release_day_usage(self, owner: Owner, reason: str) -> int:
        """Give back all of the owner's units spent today; return how many rows were released."""
        return await self._write(
            "UPDATE quota_usage SET released_at = ?, release_reason = ? WHERE platform = ?"
            " AND workspace = ? AND user_id = ? AND day = ? AND released_at IS NULL",
            (utcnow(), reason, *_owner(owner), utcday()),
        )

    async def cancel_job(self, job_id: str, message: str) -> bool:
        """Mark a waiting or running job cancelled and give its units back, in one transaction.

        False if the job had already finished, so a job is never cancelled twice.
        """
        async with self.transaction() as db:
            cursor = await db.execute(
                "UPDATE jobs SET status = 'cancelled', error = ?, updated_at = ?"
                " WHERE id = ? AND status IN " + _ACTIVE,
                (message, utcnow(), job_id),
            )
            if cursor.rowcount != 1:
                return False
            await db.execute(
                "UPDATE quota_usage SET released_at = ?, release_reason = 'cancelled'"
                " WHERE job_id = ? AND released_at IS NULL",
                (utcnow(), job_id),
            )
            return True

    # Quota overrides.

    async def quota_overrides(
        self, platform: str, workspace: str, user_id: str, roles: Sequence[str] = ()
    ) -> list[QuotaOverride]:
        """The overrides that apply to a user: the workspace's, their roles', their own."""
        marks = ",".join("?" * len(roles))
        return await self._all(
            _override,
            "SELECT * FROM quota_overrides WHERE platform = ? AND workspace = ? AND ("
            " scope = 'workspace' OR (scope = 'user' AND target_id = ?)"
            f" OR (scope = 'role' AND target_id IN ({marks})))",
            (platform, workspace, user_id, *roles),
        )

    async def list_quota_overrides(self, platform: str, workspace: str) -> list[QuotaOverride]:
        """Every override of a workspace."""
        return await self._all(
            _override,
            "SELECT * FROM quota_overrides WHERE platform = ? AND workspace = ?"
            " ORDER BY scope, target_id",
            (platform, workspace),
        )

    async def set_quota_override(
        self,
        platform: str,
        workspace: str,
        scope: OverrideScope,
        target_id: str,
        field: QuotaField,
        value: int | None,
        set_by: str,
    ) -> None:
        """Set (or with ``None`` clear) one limit of an override; an all-empty one is removed."""
        if field not in QUOTA_FIELDS:
            raise ValueError(f"unknown quota field {field!r}")
        key = (platform, workspace, scope, target_id)
        async with self.transaction() as db:
            await db.execute(
                "INSERT INTO quota_overrides (platform, workspace, scope, target_id, set_by,"
                " updated_at) VALUES (?,?,?,?,?,?) ON CONFLICT DO UPDATE SET"
                " set_by = excluded.set_by, updated_at = excluded.updated_at",
                (*key, set_by, utcnow()),
            )
            await db.execute(
                f"UPDATE quota_overrides SET {field} = ? WHERE platform = ? AND workspace = ?"
                " AND scope = ? AND target_id = ?",
                (value, *key),
            )
            await db.execute(
                "DELETE FROM quota_overrides WHERE platform = ? AND workspace = ? AND scope = ?"
                " AND target_id = ? AND "
                + " AND ".join(f"{name} IS NULL" for name in QUOTA_FIELDS),
                key,
            )

    # Bans.

    async def active_ban(self, owner: Owner) -> Ban | None:
        """The owner's ban, unless there is none or it has expired."""
        return await self._one(
            _ban,
            "SELECT * FROM bans WHERE platform = ? AND workspace = ? AND user_id = ?"
            " AND (expires_at IS NULL OR expires_at > ?)",
            (*_owner(owner), utcnow()),
        )

    async def active_bans(self, platform: str, workspace: str) -> list[Ban]:
        """A workspace's bans that have not expired, newest first."""
        return await self._all(
            _ban,
            "SELECT * FROM bans WHERE platform = ? AND workspace = ?"
            " AND (expires_at IS NULL OR expires_at > ?) ORDER BY created_at DESC",
            (platform, workspace, utcnow()),
        )

    async def put_ban(self, ban: Ban) -> None:
        """Ban a user, replacing any earlier ban of theirs."""
        await self._write(
            "INSERT OR REPLACE INTO bans (platform, workspace, user_id, reason, banned_by,"
            " created_at, expires_at) VALUES (?,?,?,?,?,?,?)",
            (*_owner(ban.owner), ban.reason, ban.banned_by, ban.created_at, ban.expires_at),
        )

    async def delete_ban(self, owner: Owner) -> bool:
        """Lift the owner's ban; False if they had none in force."""
        async with self.transaction() as db:
            cursor = await db.execute(
                "DELETE FROM bans WHERE platform = ? AND workspace = ? AND user_id = ?"
                " AND (expires_at IS NULL OR expires_at > ?)",
                (*_owner(owner), utcnow()),
            )
            # An expired ban is no ban; drop it quietly either way.
            await db.execute(
                "DELETE FROM bans WHERE platform = ? AND workspace = ? AND user_id = ?",
                _owner(owner),
            )
            return cursor.rowcount == 1

    # Blocked-prompt rules.

    async def workspace_settings(self, platform: str, workspace: str) -> WorkspaceSettings:
        """A workspace's moderation switches and default model (the defaults if never set)."""
        async with self.db.execute(
            "SELECT use_default_rules, reveal_blocked_rule, rules_version, default_model,"
            " safety_check FROM workspace_settings WHERE platform = ? AND workspace = ?",
            (platform, workspace),
        ) as cur:
            row = await cur.fetchone()
        if row is None:
            return WorkspaceSettings()
        # safety_check NULL (never set, or a row from before migration 0011): on.
        return WorkspaceSettings(bool(row[0]), bool(row[1]), row[2], row[3], row[4] != 0)

    async def set_workspace_model(
        self, platform: str, workspace: str, model: str | None, updated_by: str
    ) -> None:
        """Set (or with None, clear) a workspace's default base model.

        The rules version is left alone: the prompt filter does not depend on the model.
        """
        await self._write(
            "INSERT INTO workspace_settings (platform, workspace, default_model, updated_by,"
            " updated_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET"
            " default_model = excluded.default_model, updated_by = excluded.updated_by,"
            " updated_at = excluded.updated_at",
            (platform, workspace, model, updated_by, utcnow()),
        )

    async def set_workspace_safety(
        self, platform: str, workspace: str, enabled: bool, updated_by: str
    ) -> None:
        """Turn the engines' safety checker on or off for a workspace's jobs (/mod safety).

        The rules version is left alone: the prompt filter does not depend on it.
        """
        await self._write(
            "INSERT INTO workspace_settings (platform, workspace, safety_check, updated_by,"
            " updated_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET"
            " safety_check = excluded.safety_check, updated_by = excluded.updated_by,"
            " updated_at = excluded.updated_at",
            (platform, workspace, int(enabled), updated_by, utcnow()),
        )

    async def set_workspace_switch(
        self,
        platform: str,
        workspace: str,
        name: Literal["use_default_rules", "reveal_blocked_rule"],
        value: bool,
        updated_by: str,
    ) -> None:
        """Turn one moderation switch of a workspace on or off."""
        if name not in ("use_default_rules", "reveal_blocked_rule"):
            raise ValueError(f"unknown switch {name!r}")
        async with self.transaction() as db:
            await _touch_workspace(db, platform, workspace, updated_by)
            await db.execute(
                f"UPDATE workspace_settings SET {name} = ? WHERE platform = ? AND workspace = ?",
                (int(value), platform, workspace),
            )

    async def blocked_rules(self, platform: str, workspace: str) -> list[BlockedRule]:
        """A workspace's own rules (not the built-in list), oldest first."""
        return await self._all(
            _blocked_rule,
            "SELECT * FROM blocked_rules WHERE platform = ? AND workspace = ? ORDER BY id",
            (platform, workspace),
        )

    async def add_blocked_rule(
        self, platform: str, workspace: str, kind: str, pattern: str, added_by: str
    ) -> BlockedRule | None:
        """Store a rule; None if the workspace already has exactly this one."""
        async with self.transaction() as db:
            cursor = await db.execute(
                "INSERT OR IGNORE INTO blocked_rules (platform, workspace, kind, pattern,"
                " added_by, created_at) VALUES (?,?,?,?,?,?)",
                (platform, workspace, kind, pattern, added_by, utcnow()),
            )
            if cursor.rowcount != 1:
                return None
            await _touch_workspace(db, platform, workspace, added_by)
            async with db.execute(
                "SELECT * FROM blocked_rules WHERE id = ?", (cursor.lastrowid,)
            ) as cur:
                row = await cur.fetchone()
            assert row is not None  # inserted just now, in this transaction
            return _blocked_rule(row)

    async def delete_blocked_rule(
        self, platform: str, workspace: str, rule_id: int, removed_by: str
    ) -> bool:
        """Remove one of a workspace's rules by id; False if there is no such rule."""
        async with self.transaction() as db:
            cursor = await db.execute(
                "DELETE FROM blocked_rules WHERE platform = ? AND workspace = ? AND id = ?",
                (platform, workspace, rule_id),
            )
            if cursor.rowcount != 1:
                return False
            await _touch_workspace(db, platform, workspace, removed_by)
            return True

    async def record_blocked_attempt(
        self, owner: Owner, rule_label: str, fragment: str, prompt: str, negative_prompt: str
    ) -> None:
        """Log a prompt a rule stopped, for moderators."""
        await self._write(
            "INSERT INTO blocked_attempts (platform, workspace, user_id, rule_label, fragment,"
            " prompt, negative_prompt, created_at) VALUES (?,?,?,?,?,?,?,?)",
            (*_owner(owner), rule_label, fragment, prompt, negative_prompt, utcnow()),
        )

    async def blocked_attempts(
        self, platform: str, workspace: str, limit: int
    ) -> list[BlockedAttempt]:
        """A workspace's most recent blocked prompts, newest first."""
        return await self._all(
            _blocked_attempt,
            "SELECT * FROM blocked_attempts WHERE platform = ? AND workspace = ?"
            " ORDER BY id DESC LIMIT ?",
            (platform, workspace, limit),
        )

    # Outputs the safety checker withheld (migration 0011).

    async def record_withheld(
        self,
        job: Job,
        kind: WithheldKind,
        withheld: int,
        *,
        total: int | None,
        prompt: str,
        negative_prompt: str = "",
        refund: int = 0,
    ) -> bool:
        """Log that the safety checker withheld ``withheld`` of ``total`` outputs of ``job``
        (for moderators, with its ``prompt``: a training's or showcase's subject name) and
        give ``refund`` of its quota units back, in one statement, once: False, changing
        nothing, if it was recorded already (a retried delivery)."""
        changed = await self._write(
            "INSERT OR IGNORE INTO withheld_outputs (job_id, platform, workspace, user_id,"
            " kind, withheld, total, prompt, negative_prompt, refunded_units, created_at)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (
                job.id,
                *_owner(job.owner),
                kind,
                withheld,
                total,
                prompt,
                negative_prompt,
                max(0, refund),
                utcnow(),
            ),
        )
        return changed == 1

    async def withheld_outputs(
        self, platform: str, workspace: str, limit: int
    ) -> list[WithheldOutput]:
        """A workspace's most recent withheld outputs, newest first."""
        return await self._all(
            _withheld_output,
            "SELECT * FROM withheld_outputs WHERE platform = ? AND workspace = ?"
            " ORDER BY created_at DESC, rowid DESC LIMIT ?",
            (platform, workspace, limit),
        )

    # What is kept about people, and for how long (migration 0012).

    async def jobs_with_stored_images(
        self, platform: str, ended_before: str, deleted_before: str, limit: int
    ) -> list[Job]:
        """A platform's finished image and showcase jobs whose images are still stored and
        that ended (were last changed) before ``ended_before``, or whose data their owner had
        deleted before ``deleted_before``: the oldest first, at most ``limit``. A result
        still waiting to be posted is left out."""
        return await self._all(
            _job,
            "SELECT * FROM jobs WHERE platform = ? AND kind = 'generate'"
            " AND images_deleted_at IS NULL AND status IN ('done', 'failed', 'cancelled')"
            " AND (status != 'done' OR delivered_at IS NOT NULL)"
            " AND (updated_at < ? OR data_deleted_at < ?) ORDER BY updated_at, rowid LIMIT ?",
            (platform, ended_before, deleted_before, limit),
        )

    async def mark_images_deleted(self, job_ids: Sequence[str]) -> list[str]:
        """Record that these jobs' stored images are deleted; return the ids that were not
        marked yet (another bot process of the platform may have swept them just now)."""
        marked = []
        async with self.transaction() as db:
            now = utcnow()
            for job_id in job_ids:
                cursor = await db.execute(
                    "UPDATE jobs SET images_deleted_at = ? WHERE id = ?"
                    " AND images_deleted_at IS NULL",
                    (now, job_id),
                )
                if cursor.rowcount == 1:
                    marked.append(job_id)
        return marked

    async def user_jobs(self, owner: Owner) -> list[Job]:
        """Every job of the owner in their workspace, oldest first."""
        return await self._all(
            _job,
            "SELECT * FROM jobs WHERE platform = ? AND workspace = ? AND user_id = ?"
            " ORDER BY created_at, rowid",
            _owner(owner),
        )

    async def redact_jobs(self, owner: Owner, note: str) -> int:
        """Replace what the owner's finished jobs say (prompt, options, and any message,
        which may quote the prompt, by ``note``) and mark their data deleted; a result still
        waiting to be posted counts as delivered, so nothing of it is posted. Notices of jobs
        just cancelled are still posted, saying ``note``. The rows stay: their quota units are
        moderation records. Returns how many jobs were redacted."""
        now = utcnow()
        return await self._write(
            "UPDATE jobs SET prompt = NULL, options = '{}',"
            " error = CASE WHEN error IS NULL THEN NULL ELSE ? END,"
            " delivered_at = CASE WHEN status = 'done' THEN coalesce(delivered_at, ?)"
            " ELSE delivered_at END, data_deleted_at = ?, updated_at = ?"
            " WHERE platform = ? AND workspace = ? AND user_id = ?"
            " AND status IN ('done', 'failed', 'cancelled') AND data_deleted_at IS NULL",
            (note, now, now, now, *_owner(owner)),
        )

    async def stored_data(self, owner: Owner) -> StoredData:
        """What the store keeps about the owner in their workspace, counted."""
        key = _owner(owner)

        async def one(sql: str, params: tuple[Any, ...] = key) -> tuple[Any, ...]:
            async with self.db.execute(sql, params) as cur:
                row = await cur.fetchone()
            assert row is not None  # aggregates always answer one row
            return tuple(row)

        mine = "platform = ? AND workspace = ? AND user_id = ?"
        images, image_jobs, since = await one(
            "SELECT coalesce(sum(json_array_length(result, '$.image_urls')), 0), count(*),"
            f" min(created_at) FROM jobs WHERE {mine} AND kind = 'generate'"
            " AND images_deleted_at IS NULL AND status = 'done'"
            " AND json_array_length(result, '$.image_urls') > 0"
        )
        (prompts,) = await one(
            f"SELECT count(*) FROM jobs WHERE {mine} AND kind = 'generate'"
            " AND prompt IS NOT NULL AND data_deleted_at IS NULL"
        )
        (active,) = await one(f"SELECT count(*) FROM jobs WHERE {mine} AND status IN " + _ACTIVE)
        counts = []
        for table in ("quota_usage", "blocked_attempts", "withheld_outputs"):
            (count,) = await one(f"SELECT count(*) FROM {table} WHERE {mine}")
            counts.append(int(count))
        (audit,) = await one(
            "SELECT count(*) FROM audit_log WHERE platform = ? AND workspace = ? AND target = ?"
        )
        quota, blocked, withheld = counts
        return StoredData(
            images=int(images),
            image_jobs=int(image_jobs),
            images_since=since,
            prompts=int(prompts),
            active_jobs=int(active),
            quota_records=quota,
            blocked_prompts=blocked,
            withheld_outputs=withheld,
            audit_entries=int(audit),
        )

    async def delete_moderation_records(self, platform: str, before: str) -> dict[str, int]:
        """Delete a platform's moderation records made before ``before`` (each table of
        ``MODERATION_TABLES``), and its bans that expired before then; return how many rows
        went, by table (bans as ``bans``)."""
        deleted = {}
        async with self.transaction() as db:
            for table in MODERATION_TABLES:
                cursor = await db.execute(
                    f"DELETE FROM {table} WHERE platform = ? AND created_at < ?",
                    (platform, before),
                )
                deleted[table] = cursor.rowcount
            cursor = await db.execute(
                "DELETE FROM bans WHERE platform = ? AND expires_at IS NOT NULL AND expires_at < ?",
                (platform, before),
            )
            deleted["bans"] = cursor.rowcount
        return deleted

    # Audit log.

    async def record_audit(
        self, moderator: Owner, action: str, target: str = "", detail: str = ""
    ) -> None:
        """Record a moderator's action."""
        await self._write(
            "INSERT INTO audit_log (platform, workspace, moderator_id, action, target, detail,"
            " created_at) VALUES (?,?,?,?,?,?,?)",
            (*_owner(moderator), action, target, detail, utcnow()),
        )

    async def audit_entries(self, platform: str, workspace: str, limit: int) -> list[AuditEntry]:
        """A workspace's most recent moderator actions, newest first."""
        return await self._all(
            _audit_entry,
            "SELECT * FROM audit_log WHERE platform = ? AND workspace = ? ORDER BY id DESC LIMIT ?",
            (platform, workspace, limit),
        )


_ACTIVE = "('queued', 'running')"


def _owner(owner: Owner) -> tuple[str, str, str]:
    return owner.platform, owner.workspace, owner.user_id


async def _usage(db: aiosqlite.Connection, owner: Owner, day: str) -> Usage:
    # Units the safety checker's withheld outputs gave back (migration 0011) don't count.
    async with db.execute(
        "SELECT q.kind, sum(max(0, q.units - coalesce(w.refunded_units, 0))) FROM quota_usage q"
        " LEFT JOIN withheld_outputs w ON w.job_id = q.job_id WHERE q.platform = ?"
        " AND q.workspace = ? AND q.user_id = ? AND q.day = ? AND q.released_at IS NULL"
        " GROUP BY q.kind",
        (*_owner(owner), day),
    ) as cur:
        spent = {row[0]: int(row[1]) for row in await cur.fetchall()}
    async with db.execute(
        "SELECT count(*) FROM jobs WHERE platform = ? AND workspace = ? AND user_id = ?"
        " AND status IN " + _ACTIVE,
        _owner(owner),
    ) as cur:
        row = await cur.fetchone()
    return Usage(
        images=spent.get("images", 0),
        trainings=spent.get("trainings", 0),
        active_jobs=int(row[0]) if row else 0,
    )


async def _pending_redo(db: aiosqlite.Connection, owner: Owner, redo: Redo) -> Job | None:
    async with db.execute(
        "SELECT jobs.* FROM redo_jobs JOIN jobs ON jobs.id = redo_jobs.job_id"
        " WHERE redo_of = ? AND button = ? AND platform = ? AND workspace = ? AND user_id = ?"
        " AND status IN " + _ACTIVE + " ORDER BY jobs.created_at DESC, jobs.rowid DESC",
        (redo.of, redo.button, *_owner(owner)),
    ) as cursor:
        row = await cursor.fetchone()
    return _job(row) if row else None


async def _touch_workspace(
    db: aiosqlite.Connection, platform: str, workspace: str, updated_by: str
) -> None:
    # Every rule or switch change bumps the version, which invalidates cached filters.
    await db.execute(
        "INSERT INTO workspace_settings (platform, workspace, rules_version, updated_by,"
        " updated_at) VALUES (?, ?, 1, ?, ?) ON CONFLICT DO UPDATE SET"
        " rules_version = rules_version + 1, updated_by = excluded.updated_by,"
        " updated_at = excluded.updated_at",
        (platform, workspace, updated_by, utcnow()),
    )


def _override(row: aiosqlite.Row) -> QuotaOverride:
    return _from_row(QuotaOverride, row)


def _ban(row: aiosqlite.Row) -> Ban:
    return _from_row(Ban, row, owner=_row_owner(row))


def _blocked_rule(row: aiosqlite.Row) -> BlockedRule:
    return _from_row(BlockedRule, row)


def _blocked_attempt(row: aiosqlite.Row) -> BlockedAttempt:
    return _from_row(BlockedAttempt, row, owner=_row_owner(row))


def _withheld_output(row: aiosqlite.Row) -> WithheldOutput:
    return _from_row(WithheldOutput, row, owner=_row_owner(row))


def _audit_entry(row: aiosqlite.Row) -> AuditEntry:
    return _from_row(AuditEntry, row, moderator=_row_owner(row, "moderator_id"))
