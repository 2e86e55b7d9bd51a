"""Moderation against a real SQLite file and a real Redis: rules, bans, cancelling, audit."""

from __future__ import annotations

import asyncio
import contextlib
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiosqlite
import pytest
from arq import create_pool
from arq.connections import RedisSettings
from arq.constants import abort_jobs_ss, in_progress_key_prefix
from arq.worker import Worker, func

from bot.core.delivery import Deliverer
from bot.core.errors import UserError
from bot.core.moderation import (
    MOD_HELP,
    Moderator,
    NotModerator,
    parse_duration,
    parse_user,
)
from bot.core.store import EVERYONE, MIGRATIONS_DIR, Owner, Store, apply_migrations
from bot.launcher import BotRuntime
from engine.api import GENERATE, GenerateResult, bot_queue, cancel_key
from engine.artifacts import local_path
from tests.conftest import TEST_PLATFORM, RecordingSink, engine_queue, queued, ready_subject
from tests.test_commands import _photos

DEST = {"channel": "c1"}


@pytest.fixture
def mod(runtime: BotRuntime, owner: Owner) -> Moderator:
    """A moderator of the owner's workspace."""
    return runtime.core.moderation.acting(Owner(owner.platform, owner.workspace, "mod-1"), True)


async def _rows(runtime: BotRuntime, table: str) -> int:
    async with runtime.store.db.execute(f"SELECT count(*) FROM {table}") as cur:
        row = await cur.fetchone()
    return int(row[0])


async def _notices(runtime: BotRuntime) -> list[dict[str, Any]]:
    """Payloads waiting on the test platform's bot queue (cancellation notices)."""
    payloads = []
    for job_id in await runtime.queue.zrange(bot_queue(TEST_PLATFORM), 0, -1):
        info = await runtime.queue._get_job_def(job_id, None)
        payloads.append(info.args[0])
    return payloads


# Blocked prompts.


async def test_a_blocked_prompt_queues_nothing_and_is_logged_for_moderators(
    runtime: BotRuntime, owner: Owner, mod: Moderator
) -> None:
    with pytest.raises(UserError) as refused:
        await runtime.core.imagine(owner, DEST, "a n.u.d.e portrait")
    assert refused.value.message.startswith("That prompt isn't allowed here")
    assert "nude" not in refused.value.message  # generic unless the workspace reveals rules
    assert await queued(runtime.queue) == 0
    assert await _rows(runtime, "jobs") == 0
    assert (await runtime.store.usage(owner)).images == 0
    attempts = await runtime.store.blocked_attempts(owner.platform, owner.workspace, 10)
    assert [(a.owner, a.rule_label, a.prompt) for a in attempts] == [
        (owner, "default:nude", "a n.u.d.e portrait")
    ]
    assert "default:nude" in await mod.blocked_attempts()


async def test_the_negative_prompt_is_checked_and_reveal_names_the_rule(
    runtime: BotRuntime, owner: Owner, mod: Moderator
) -> None:
    await mod.block_reveal(True)
    with pytest.raises(UserError, match="in the negative prompt hits the built-in blocked word"):
        await runtime.core.imagine(owner, DEST, "a cat", negative_prompt="blurry, g0re, nudes")
    assert await queued(runtime.queue) == 0


async def test_workspace_rules_take_effect_at_once_and_removing_one_lifts_it(
    runtime: BotRuntime, owner: Owner, mod: Moderator
) -> None:
    await runtime.core.imagine(owner, DEST, "a clown at a party", count=1)  # filter now cached
    reply = await mod.block_add("clown")
    assert "#1" in reply
    with pytest.raises(UserError, match="isn't allowed"):
        await runtime.core.imagine(owner, DEST, "a CL0WN at a party", count=1)
    await runtime.core.imagine(owner, DEST, "a cat in a clownfish costume", count=1)
    await mod.block_add_regex(r"\bparty\s+hat")
    with pytest.raises(UserError):
        await runtime.core.imagine(owner, DEST, "a cat in a party   hat", count=1)
    assert "#2" in await mod.block_list()
    await mod.block_remove("#1")
    await runtime.core.imagine(owner, DEST, "a clown at a party", count=1)


async def test_switching_the_built_in_list_off_lets_its_words_through(
    runtime: BotRuntime, owner: Owner, mod: Moderator
) -> None:
    await mod.block_defaults(False)
    await runtime.core.imagine(owner, DEST, "a nude marble statue", count=1)
    assert await queued(runtime.queue) == 1


async def test_a_subject_with_a_blocked_class_is_not_trained(
    runtime: BotRuntime, owner: Owner
) -> None:
    # The engine would draw class-prior images of "naked person" for it.
    with pytest.raises(UserError, match="That subject name or class isn't allowed"):
        await runtime.core.train(owner, DEST, "rex", "naked person", _photos(3))
    assert await runtime.store.list_subjects(owner) == []
    assert await queued(runtime.queue) == 0


async def test_a_hostile_or_invalid_regex_is_refused_and_nothing_is_stored(
    runtime: BotRuntime, mod: Moderator
) -> None:
    for pattern in [r"(a+)+\1", "(unclosed", "x*", r"(?=nude)"]:
        with pytest.raises(UserError):
            await mod.block_add_regex(pattern)
    assert await _rows(runtime, "blocked_rules") == 0
    assert await _rows(runtime, "audit_log") == 0


# Bans.


async def test_a_ban_refuses_the_users_commands_and_cancels_their_queued_jobs(
    runtime: BotRuntime, owner: Owner, mod: Moderator
) -> None:
    first = await runtime.core.imagine(owner, DEST, "a cat", count=1)
    second = await runtime.core.imagine(owner, DEST, "a dog", count=2)
    other = await runtime.core.imagine(Owner(owner.platform, owner.workspace, "u2"), DEST, "owl")

    reply = await mod.ban(f"<@{owner.user_id}>", "spamming", parse_duration("7d"))
    assert "Banned user-1 until" in reply and "Cancelled 2" in reply

    assert await runtime.queue.zrange(engine_queue(runtime), 0, -1) == [other.job_id.encode()]
    for receipt in (first, second):
        job = await runtime.store.get_job(receipt.job_id)
        assert job is not None and job.status == "cancelled"
    assert (await runtime.store.usage(owner)).images == 0
    assert {p["job_id"] for p in await _notices(runtime)} == {first.job_id, second.job_id}
    for command in (
        runtime.core.imagine(owner, DEST, "a cat"),
        runtime.core.subjects_text(owner),
        runtime.core.quota_text(owner),
        runtime.core.train(owner, DEST, "rex", "dog", _photos(3)),
    ):
        with pytest.raises(UserError, match=r"banned .* until .* UTC\. Reason: spamming"):
            await command
    assert "user-1 until" in await mod.bans()

    await mod.unban(owner.user_id)
    await runtime.core.imagine(owner, DEST, "a cat", count=1)


async def test_an_expired_ban_no_longer_refuses(
    runtime: BotRuntime, owner: Owner, mod: Moderator
) -> None:
    await mod.ban(owner.user_id, "cool off", timedelta(minutes=1))
    await runtime.store.db.execute("UPDATE bans SET expires_at = '2000-01-01T00:00:00+00:00'")
    await runtime.store.db.commit()
    await runtime.core.imagine(owner, DEST, "a cat", count=1)
    assert "Nobody is banned" in await mod.bans()


def test_durations_and_mentions_parse() -> None:
    assert parse_duration("1d12h") == timedelta(days=1, hours=12)
    assert parse_duration("2w") == timedelta(weeks=2)
    assert parse_duration("forever") is None
    for bad in ("soon", "0m", "99999d", ""):
        with pytest.raises(UserError):
            parse_duration(bad)
    assert parse_user("<@!1234>") == "1234"
    assert parse_user("<@U0ABC|bob>") == "U0ABC"
    assert parse_user("@bob") == "bob"


# The queue.


async def test_cancelling_a_queued_job_removes_it_from_the_queue_and_tells_the_owner(
    runtime: BotRuntime, owner: Owner, mod: Moderator
) -> None:
    receipt = await runtime.core.imagine(owner, DEST, "a cat on the moon", count=2)
    listing = await mod.queue()
    assert receipt.job_id[:8] in listing and "waiting #1" in listing and "user-1" in listing

    reply = await mod.cancel(receipt.job_id[:6], "not today")
    assert "taken out of the queue" in reply
    assert await queued(runtime.queue) == 0
    assert await runtime.queue.exists(f"arq:job:{receipt.job_id}") == 0
    job = await runtime.store.get_job(receipt.job_id)
    assert job is not None and job.status == "cancelled"
    assert (await runtime.store.usage(owner)).images == 0

    # The owner hears about it through the bot's own queue, like any engine failure.
    sink = RecordingSink()
    [notice] = await _notices(runtime)
    await Deliverer(runtime.core, sink).failure(notice)
    assert sink.failures[receipt.job_id] == (
        "Your images “a cat on the moon” were cancelled by a moderator: not today."
    )
    with pytest.raises(UserError, match="No waiting or running job"):
        await mod.cancel(receipt.job_id[:6])
    assert "No jobs are waiting" in await mod.queue()


async def test_cancelling_a_running_job_aborts_it_on_an_arq_worker(
    runtime: BotRuntime, owner: Owner, mod: Moderator
) -> None:
    started, stopped = asyncio.Event(), asyncio.Event()

    async def slow_generate(ctx: dict[str, Any], payload: dict[str, Any]) -> None:
        started.set()
        try:
            await asyncio.sleep(60)
        finally:
            stopped.set()

    pool = await create_pool(RedisSettings.from_dsn(runtime.settings.redis_url))
    worker = Worker(
        functions=[func(slow_generate, name=GENERATE)],
        queue_name=engine_queue(runtime),
        redis_pool=pool,
        allow_abort_jobs=True,
        handle_signals=False,
        poll_delay=0.05,
    )
    task = asyncio.create_task(worker.async_run())
    try:
        receipt = await runtime.core.imagine(owner, DEST, "a cat", count=1)
        await asyncio.wait_for(started.wait(), 10)
        assert "running" in await mod.queue()

        reply = await mod.cancel(receipt.job_id[:8])
        assert "the engine was asked to stop it" in reply
        assert await runtime.queue.get(cancel_key(receipt.job_id)) is not None
        await asyncio.wait_for(stopped.wait(), 10)  # arq cancelled the job's task
        job = await runtime.store.get_job(receipt.job_id)
        assert job is not None and job.status == "cancelled"
    finally:
        # Not worker.close(): it calls redis' deprecated close(), an error under our filters.
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await pool.aclose()

    # Had it finished anyway, its result would not be posted.
    sink = RecordingSink()
    result = GenerateResult(
        job_id=receipt.job_id, image_urls=[], seed=1, width=8, height=8, steps=1, seconds=0.1
    )
    await Deliverer(runtime.core, sink).result(result.model_dump())
    assert sink.results == {}


async def test_a_running_job_without_a_worker_is_flagged_for_abort(
    runtime: BotRuntime, owner: Owner, mod: Moderator
) -> None:
    receipt = await runtime.core.imagine(owner, DEST, "a cat", count=1)
    await runtime.queue.set(in_progress_key_prefix + receipt.job_id, b"1")  # as a worker does
    assert "asked to stop" in await mod.cancel(receipt.job_id)
    assert await runtime.queue.zscore(abort_jobs_ss, receipt.job_id) is not None


# Subjects.


async def test_mod_subjects_shows_whom_each_subject_is_shared_with(
    runtime: BotRuntime, owner: Owner, mod: Moderator
) -> None:
    await ready_subject(runtime, owner, "rex", "zqv")
    await ready_subject(runtime, owner, "mia", "bkt")
    await runtime.core.sharing.share(owner, "rex", "user-2")
    await runtime.core.sharing.share(owner, "rex", EVERYONE)

    lines = (await mod.subjects(owner.user_id)).splitlines()

    assert lines[0] == "Subjects of user-1:"
    assert lines[1].startswith("  mia: dog, ready, 3 photos, since ")
    assert "shared" not in lines[1]
    assert lines[2].startswith("  rex: dog, ready, 3 photos, since ")
    assert lines[2].endswith(" · shared with user-2 and everyone here")


async def test_a_moderator_deletes_a_subject_with_its_files_and_stops_its_training(
    runtime: BotRuntime, owner: Owner, mod: Moderator
) -> None:
    receipt = await runtime.core.train(owner, DEST, "rex", "dog", _photos(3))
    subject = await runtime.store.find_subject(owner, "rex")
    assert subject is not None
    photos = local_path(subject.photos_url)
    assert photos is not None and photos.is_dir()
    assert "rex: dog, queued" in await mod.subjects(owner.user_id)

    assert "Deleted user-1's subject rex" in await mod.delete_subject(owner.user_id, "rex")
    assert await runtime.store.find_subject(owner, "rex") is None
    assert not photos.exists()
    assert await queued(runtime.queue) == 0
    job = await runtime.store.get_job(receipt.job_id)
    assert job is not None and job.status == "cancelled"


# Who may moderate, and the audit log.


async def test_a_non_moderators_mod_attempt_changes_nothing(
    runtime: BotRuntime, owner: Owner
) -> None:
    receipt = await runtime.core.imagine(owner, DEST, "a cat", count=1)
    intruder = Owner(owner.platform, owner.workspace, "user-2")
    for command in (
        f"ban {owner.user_id} because 1d",
        "block add cat",
        "block defaults off",
        "safety off",
        f"quota set {intruder.user_id} images 1000",
        f"quota reset {intruder.user_id}",
        f"cancel {receipt.job_id}",
        f"delete-subject {owner.user_id} rex",
        "queue",
        "log",
    ):
        with pytest.raises(NotModerator):
            await runtime.core.mod(intruder, False, command)
    with pytest.raises(NotModerator):
        runtime.core.moderation.acting(intruder, False)
    for table in ("bans", "blocked_rules", "workspace_settings", "quota_overrides", "audit_log"):
        assert await _rows(runtime, table) == 0, table
    assert await queued(runtime.queue) == 1
    job = await runtime.store.get_job(receipt.job_id)
    assert job is not None and job.status == "queued"


async def test_every_moderator_change_is_in_the_audit_log(
    runtime: BotRuntime, owner: Owner, mod: Moderator
) -> None:
    await mod.block_add("clown")
    await mod.quota_set(owner.user_id, "jobs", 1)
    await mod.ban(owner.user_id, "spam")
    await mod.unban(owner.user_id)
    log = await runtime.core.mod(mod.owner, True, "log 3")
    lines = log.splitlines()[1:]
    assert len(lines) == 3
    assert "mod-1: unban user-1" in lines[0]
    assert "mod-1: ban user-1 — until unbanned; spam; 0 job(s) cancelled" in lines[1]
    assert "mod-1: quota-set user-1 — jobs at once = 1" in lines[2]


# Every /mod command MOD_HELP lists, run as typed: the ones that change something leave one
# audit entry each, the ones that only show something leave none. A command added to MOD_HELP
# fails here until it is listed below.
_MOD_CHANGES = {
    "block add": ["block add clown"],
    "block add-regex": ["block add-regex cl[o]wn"],
    "block remove": ["block remove 1"],
    "block defaults": ["block defaults off"],
    "block reveal": ["block reveal on"],
    "model": ["model default"],
    "safety": ["safety off", "safety on"],
    "quota set": ["quota set user-1 jobs 2"],
    "quota reset": ["quota reset user-1"],
    "ban": ["ban user-2 spam 1d"],
    "unban": ["unban user-2"],
    "cancel": ["cancel {job}"],
    "delete-subject": ["delete-subject user-1 rex"],
    # Audited also with nothing to delete (user-3): the request was handled.
    "delete-user-data": ["delete-user-data user-1", "delete-user-data user-3"],
}
_MOD_READS = {
    "block list": ["block list"],
    "blocked": ["blocked"],
    "model": ["model"],
    "safety": ["safety"],
    "quota show": ["quota show user-1"],
    "quota list": ["quota list"],
    "bans": ["bans"],
    "queue": ["queue"],
    "status": ["status"],
    "subjects": ["subjects user-1"],
    "log": ["log"],
}


def _help_commands() -> set[str]:
    """The subcommands MOD_HELP lists: ``block add``, ``quota set``, ``model``…"""
    commands = set()
    for line in MOD_HELP.splitlines():
        if not line.startswith("/mod "):
            continue
        words = []
        usage = re.split(r"\s{2,}", line)[0]  # the description follows after two spaces
        for word in usage.split()[1:]:
            if word[0] in "<[" or "|" in word:
                break
            words.append(word)
        commands.add(" ".join(words))
    return commands


async def test_every_mod_command_that_changes_something_leaves_an_audit_entry(
    runtime: BotRuntime, owner: Owner, mod: Moderator
) -> None:
    assert _help_commands() == set(_MOD_CHANGES) | set(_MOD_READS)
    await ready_subject(runtime, owner, "rex", "zqv")
    receipt = await runtime.core.imagine(owner, DEST, "a cat", count=1)
    for command, texts in [*_MOD_CHANGES.items(), *_MOD_READS.items()]:
        for text in texts:
            before = await _rows(runtime, "audit_log")
            await runtime.core.mod(mod.owner, True, text.format(job=receipt.job_id[:8]))
            expected = 1 if text in _MOD_CHANGES.get(command, []) else 0
            assert await _rows(runtime, "audit_log") == before + expected, text


async def test_the_audit_entry_of_a_deletion_says_which_jobs_it_stopped(
    runtime: BotRuntime, owner: Owner, mod: Moderator
) -> None:
    await ready_subject(runtime, owner, "rex", "zqv")
    await runtime.core.sharing.share(owner, "rex", EVERYONE)
    other = Owner(owner.platform, owner.workspace, "user-2")
    await runtime.core.imagine(other, DEST, "[rex] on a sofa", count=1)
    await runtime.core.imagine(owner, DEST, "a [V] at home", count=2)
    await runtime.core.imagine(other, DEST, "an owl", count=1)  # not drawing rex: kept

    said = await mod.delete_subject(owner.user_id, "rex")

    assert "Stopped 2 image jobs drawing it" in said
    [entry] = (await runtime.core.mod(mod.owner, True, "log 1")).splitlines()[1:]
    assert entry.endswith(
        "mod-1: delete-subject user-1 — deleted user-1's rex (id-rex-zqv); "
        "stopped 2 image jobs drawing it"
    )


async def test_the_audit_entry_of_a_deletion_says_it_stopped_the_training(
    runtime: BotRuntime, owner: Owner, mod: Moderator
) -> None:
    await runtime.core.train(owner, DEST, "rex", "dog", _photos(3))

    said = await mod.delete_subject(owner.user_id, "rex")

    assert "Stopped its training" in said
    [entry] = (await runtime.core.mod(mod.owner, True, "log 1")).splitlines()[1:]
    assert "delete-subject user-1 — deleted user-1's rex (" in entry
    assert entry.endswith("); stopped its training")


async def test_configured_moderators_are_recognised(runtime: BotRuntime) -> None:
    moderation = runtime.core.moderation
    runtime.settings.moderator_users.append("123")
    runtime.settings.moderator_roles.append("999")
    assert moderation.is_configured_moderator("123")
    assert moderation.is_configured_moderator("456", roles=["1", "999"])
    assert not moderation.is_configured_moderator("456", roles=["1"])


# The migration.


async def test_migration_0002_on_a_skeleton_database_with_data_loses_nothing(
    tmp_path: Path,
) -> None:
    skeleton = tmp_path / "skeleton"
    skeleton.mkdir()
    (skeleton / "0001_initial.sql").write_text((MIGRATIONS_DIR / "0001_initial.sql").read_text())
    path = tmp_path / "db.sqlite3"
    async with aiosqlite.connect(path) as db:
        assert await apply_migrations(db, skeleton) == ["0001_initial.sql"]
        await db.execute(
            "INSERT INTO subjects VALUES ('s1', 'discord', 'g', 'u', 'rex', 'dog', 'zqv',"
            " 'ready', 'file:///a.safetensors', 'file:///p', 3, 'tiny', NULL, 't0', 't1')"
        )
        for job_id, status in [("j1", "done"), ("j2", "queued"), ("j3", "failed")]:
            await db.execute(
                "INSERT INTO jobs (id, kind, platform, workspace, user_id, subject_id, prompt,"
                " destination, status, result, error, created_at, updated_at, delivered_at)"
                " VALUES (?, 'generate', 'discord', 'g', 'u', 's1', 'a [V] dog', '{\"c\": 1}',"
                " ?, '{\"ok\": true}', NULL, 't2', 't3', NULL)",
                (job_id, status),
            )
        await db.commit()
        before = {
            table: await (await db.execute(f"SELECT * FROM {table} ORDER BY id")).fetchall()
            for table in ("subjects", "jobs")
        }

    store = await Store.open(path)  # applies 0002 and anything after it
    try:
        for table, rows in before.items():
            async with store.db.execute(f"SELECT * FROM {table} ORDER BY id") as cur:
                after = [tuple(row) for row in await cur.fetchall()]
            # Later migrations may add columns (0003: jobs.options), always at the end.
            assert [row[: len(rows[0])] for row in after] == rows, table
        async with store.db.execute("SELECT version FROM schema_migrations") as cur:
            assert [row[0] for row in await cur.fetchall()][:2] == [1, 2]
        async with store.db.execute("PRAGMA foreign_key_check") as cur:
            assert await cur.fetchall() == []
        # The old rows work with the new features: j2 counts as the user's active job.
        usage = await store.usage(Owner("discord", "g", "u"))
        assert usage.active_jobs == 1 and usage.images == 0
    finally:
        await store.close()
