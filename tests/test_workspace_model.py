"""A workspace's default base model (/mod model, migration 0004), on real SQLite and Redis."""

from __future__ import annotations

from pathlib import Path

import aiosqlite
import pytest

from bot.core.errors import UserError
from bot.core.moderation import NotModerator
from bot.core.store import MIGRATIONS_DIR, Owner, Store, apply_migrations
from bot.launcher import BotRuntime
from tests.conftest import (
    configure_second_model,
    queued,
    queued_generate_request,
    queued_train_request,
    ready_subject,
    table_rows,
)
from tests.test_commands import _photos


async def _audit_actions(runtime: BotRuntime, owner: Owner) -> list[tuple[str, str]]:
    entries = await runtime.store.audit_entries(owner.platform, owner.workspace, 10)
    return [(entry.action, entry.detail) for entry in entries]


async def test_a_workspace_default_model_is_used_by_train_without_a_model(
    runtime: BotRuntime, owner: Owner
) -> None:
    configure_second_model(runtime.settings, "xl")
    core = runtime.core
    shown = await core.mod(owner, True, "model")
    assert "tiny  ← this workspace" in shown and "xl" in shown
    assert "configured default, tiny" in shown

    reply = await core.mod(owner, True, "model XL")  # names match regardless of case
    assert "default model is now xl" in reply
    assert await _audit_actions(runtime, owner) == [("model", "xl")]
    assert "xl  ← this workspace" in await core.mod(owner, True, "model")

    await core.train(owner, {}, "rex", "dog", _photos(3))
    assert (await queued_train_request(runtime)).base_model == "xl"
    subject = await runtime.store.find_subject(owner, "rex")
    assert subject is not None and subject.base_model == "xl"

    # Another workspace keeps the configured default; naming a model still wins.
    other = Owner(owner.platform, "guild-2", "user-9")
    assert await core.default_model(other.platform, other.workspace) == "tiny"
    await runtime.queue.flushdb()
    await core.train(owner, {}, "max", "cat", _photos(3), model="tiny")
    assert (await queued_train_request(runtime)).base_model == "tiny"

    # A prompt without subjects is drawn on the workspace default.
    receipt = await core.imagine(owner, {}, "a lighthouse", count=1)
    assert (await queued_generate_request(runtime, receipt.job_id))["base_model"] == "xl"

    # "default" goes back to the configured default, audited too.
    assert "configured default model, tiny" in await core.mod(owner, True, "model default")
    assert await core.default_model(owner.platform, owner.workspace) == "tiny"
    assert (await _audit_actions(runtime, owner))[0] == ("model", "default (tiny)")


async def test_prompts_with_a_subject_keep_the_subjects_model(
    runtime: BotRuntime, owner: Owner
) -> None:
    configure_second_model(runtime.settings, "xl")
    await ready_subject(runtime, owner, "rex", "zqv")  # trained on tiny
    await runtime.core.mod(owner, True, "model xl")
    receipt = await runtime.core.imagine(owner, {}, "a [V] dog", count=1)
    assert (await queued_generate_request(runtime, receipt.job_id))["base_model"] == "tiny"


async def test_an_unknown_model_is_refused_and_nothing_changes(
    runtime: BotRuntime, owner: Owner
) -> None:
    configure_second_model(runtime.settings, "xl")
    with pytest.raises(UserError) as refused:
        await runtime.core.mod(owner, True, "model sd3")
    assert refused.value.message.startswith("There is no model called `sd3`. Models: tiny, xl")
    settings = await runtime.store.workspace_settings(owner.platform, owner.workspace)
    assert settings.default_model is None
    assert await _audit_actions(runtime, owner) == []
    with pytest.raises(UserError, match="Usage: /mod model"):
        await runtime.core.mod(owner, True, "model xl tiny")


async def test_a_non_moderator_cannot_see_or_set_the_model(
    runtime: BotRuntime, owner: Owner
) -> None:
    configure_second_model(runtime.settings, "xl")
    for text in ("model", "model xl"):
        with pytest.raises(NotModerator):
            await runtime.core.mod(owner, False, text)
    assert await runtime.core.default_model(owner.platform, owner.workspace) == "tiny"
    assert await _audit_actions(runtime, owner) == []


async def test_a_chosen_model_dropped_from_the_configuration_falls_back(
    runtime: BotRuntime, owner: Owner
) -> None:
    configure_second_model(runtime.settings, "xl")
    await runtime.core.mod(owner, True, "model xl")
    runtime.settings.models.pop("xl")
    assert await runtime.core.default_model(owner.platform, owner.workspace) == "tiny"
    assert "no longer configured" in await runtime.core.mod(owner, True, "model")
    await runtime.core.train(owner, {}, "rex", "dog", _photos(3))
    assert (await queued_train_request(runtime)).base_model == "tiny"
    assert await queued(runtime.queue) == 1


async def test_setting_the_model_keeps_the_workspaces_rules_and_switches(
    runtime: BotRuntime, owner: Owner
) -> None:
    configure_second_model(runtime.settings, "xl")
    mod = runtime.core.moderation.acting(owner, True)
    await mod.block_reveal(True)
    await mod.block_add("lighthouse")
    before = await runtime.store.workspace_settings(owner.platform, owner.workspace)
    await mod.model("xl")
    after = await runtime.store.workspace_settings(owner.platform, owner.workspace)
    assert after.default_model == "xl"
    assert (after.reveal_blocked_rule, after.use_default_rules, after.rules_version) == (
        before.reveal_blocked_rule,
        before.use_default_rules,
        before.rules_version,
    )
    with pytest.raises(UserError, match="lighthouse"):
        await runtime.core.imagine(owner, {}, "a lighthouse", count=1)


async def test_train_and_imagine_read_the_workspace_settings_once(
    runtime: BotRuntime, owner: Owner
) -> None:
    # The default model and the prompt filter's switches come from one read of the row.
    configure_second_model(runtime.settings, "xl")
    mod = runtime.core.moderation.acting(owner, True)
    await mod.model("xl")
    await mod.block_reveal(True)
    await mod.block_add("lighthouse")
    reads: list[str] = []

    def trace(statement: str) -> None:
        if "FROM workspace_settings" in statement:
            reads.append(statement)

    await runtime.store.db.set_trace_callback(trace)
    try:
        await runtime.core.train(owner, {}, "rex", "dog", _photos(3))
        assert len(reads) == 1
        assert (await queued_train_request(runtime)).base_model == "xl"

        reads.clear()
        receipt = await runtime.core.imagine(owner, {}, "a harbour", count=1)
        assert len(reads) == 1
        assert (await queued_generate_request(runtime, receipt.job_id))["base_model"] == "xl"

        # The one read still carries the switches: the rule is revealed.
        reads.clear()
        with pytest.raises(UserError, match="“lighthouse”"):
            await runtime.core.imagine(owner, {}, "a lighthouse", count=1)
        assert len(reads) == 1
    finally:
        await runtime.store.db.set_trace_callback(None)


async def test_migration_0004_on_a_database_with_0001_to_0003_data_loses_nothing(
    tmp_path: Path,
) -> None:
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    names = ["0001_initial.sql", "0002_moderation.sql", "0003_job_options.sql"]
    for name in names:
        (earlier / name).write_text((MIGRATIONS_DIR / name).read_text())
    path = tmp_path / "db.sqlite3"
    async with aiosqlite.connect(path) as db:
        assert await apply_migrations(db, earlier) == names
        await db.execute(
            "INSERT INTO subjects VALUES ('s1', 'test', 'g', 'u', 'rex', 'dog', 'zqv',"
            " 'ready', 'file:///a.safetensors', 'file:///p', 3, 'tiny', NULL, 't0', 't1')"
        )
        await db.execute(
            "INSERT INTO jobs (id, kind, platform, workspace, user_id, subject_id, prompt,"
            " destination, status, result, error, created_at, updated_at, delivered_at, options)"
            " VALUES ('j1', 'generate', 'test', 'g', 'u', 's1', 'a [V] dog', '{\"c\": 1}',"
            " 'done', '{\"seed\": 5}', NULL, 't2', 't3', NULL, '{\"seed\": 5, \"count\": 2}')"
        )
        await db.execute(
            "INSERT INTO quota_usage (job_id, platform, workspace, user_id, kind, units,"
            " day, created_at) VALUES ('j1', 'test', 'g', 'u', 'images', 2, '2025-01-01', 't')"
        )
        await db.execute(
            "INSERT INTO workspace_settings (platform, workspace, use_default_rules,"
            " reveal_blocked_rule, rules_version, updated_by, updated_at)"
            " VALUES ('test', 'g', 0, 1, 7, 'm', 't')"
        )
        await db.execute(
            "INSERT INTO blocked_rules (platform, workspace, kind, pattern, added_by,"
            " created_at) VALUES ('test', 'g', 'word', 'lighthouse', 'm', 't')"
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
        tables = (
            "subjects",
            "jobs",
            "quota_usage",
            "workspace_settings",
            "blocked_rules",
            "bans",
            "audit_log",
            "quota_overrides",
        )
        before = await table_rows(db, tables)

    store = await Store.open(path)  # applies 0004 and anything after it
    try:
        rows_after = await table_rows(store.db, tables)
        for table, rows_before in before.items():
            after = rows_after[table]
            if table == "workspace_settings":
                # The new columns (0004's and later ones') come last, NULL (the configured
                # default) for old rows.
                width = len(rows_before[0])
                assert [row[:width] for row in after] == rows_before
                assert [set(row[width:]) for row in after] == [{None}]
            elif table == "jobs":
                # Later migrations (0012) add columns to jobs too: last, NULL for old rows.
                width = len(rows_before[0])
                assert [row[:width] for row in after] == rows_before
                assert all(value is None for row in after for value in row[width:])
            else:
                assert after == rows_before, table
        async with store.db.execute("SELECT version FROM schema_migrations") as cur:
            assert [row[0] for row in await cur.fetchall()][:4] == [1, 2, 3, 4]
        async with store.db.execute("PRAGMA foreign_key_check") as cur:
            assert await cur.fetchall() == []
        settings = await store.workspace_settings("test", "g")
        assert (settings.use_default_rules, settings.reveal_blocked_rule) == (False, True)
        assert (settings.rules_version, settings.default_model) == (7, None)
        await store.set_workspace_model("test", "g", "xl", "m")
        settings = await store.workspace_settings("test", "g")
        assert (settings.default_model, settings.rules_version) == ("xl", 7)
        assert settings.reveal_blocked_rule
    finally:
        await store.close()
