"""Choosing which subject [V] means (/use), on the real core (SQLite + Redis), without the
engine: the choice, what it falls back to, its refusals, and what /subjects, /forget, Reroll and
a training's "ready" message make of it."""

from __future__ import annotations

import shutil
from pathlib import Path

import aiosqlite
import pytest

from bot.core.delivery import Deliverer, Delivery
from bot.core.errors import UserError
from bot.core.store import EVERYONE, Owner, Store, Subject, apply_migrations, migration_files
from bot.core.syntax import CommandSyntax
from bot.launcher import BotRuntime
from engine.api import GenerateRequest, TrainResult
from tests.conftest import TEST_PLATFORM, RecordingSink, ready_subject, table_rows

DEST = {"channel": "c1"}
MIA = Owner(TEST_PLATFORM, "guild-1", "mia")
ELSEWHERE = Owner(TEST_PLATFORM, "guild-2", "user-1")
"""The same user id in another workspace of the same platform."""


async def drawn(runtime: BotRuntime, owner: Owner, prompt: str = "a [V] on the beach") -> str:
    """The prompt the engine is asked to draw for ``owner``'s ``prompt``."""
    receipt = await runtime.core.imagine(owner, DEST, prompt, count=1)
    info = await runtime.queue._get_job_def(receipt.job_id.encode(), None)
    return GenerateRequest.model_validate(info.args[0]).prompt


async def rex_then_mia(runtime: BotRuntime, owner: Owner) -> tuple[Subject, Subject]:
    """Two ready subjects of ``owner``: rex, then mia (the newest)."""
    return (
        await ready_subject(runtime, owner, "rex", "zqv"),
        await ready_subject(runtime, owner, "mia", "bkt"),
    )


async def test_use_makes_an_older_subject_v_and_a_newer_one_does_not_replace_it(
    runtime: BotRuntime, owner: Owner
) -> None:
    await rex_then_mia(runtime, owner)
    assert await drawn(runtime, owner) == "a bkt dog on the beach"  # the newest, as before

    said = await runtime.core.use(owner, "Rex")

    assert said.startswith("[V] now means rex (dog), also after you train others")
    assert "(It was mia.)" in said and "`/use` alone goes back to your newest" in said
    assert await drawn(runtime, owner) == "a zqv dog on the beach"
    await ready_subject(runtime, owner, "kit", "pfx")  # trained later: [V] stays rex
    assert await drawn(runtime, owner) == "a zqv dog on the beach"
    assert await runtime.core.use(owner, "[rex]") == (
        "[V] already means rex, as you chose; nothing changed."
    )


async def test_the_choice_is_kept_in_sqlite(runtime: BotRuntime, owner: Owner) -> None:
    rex, _ = await rex_then_mia(runtime, owner)
    await runtime.core.use(owner, "rex")

    # Another process on the same database file (a restarted bot) sees it.
    other = await Store.open(runtime.settings.database_file)
    try:
        assert await other.chosen_subject_id(owner) == rex.id
    finally:
        await other.close()


async def test_v_falls_back_to_the_newest_ready_subject_once_the_chosen_one_is_forgotten(
    runtime: BotRuntime, owner: Owner
) -> None:
    await rex_then_mia(runtime, owner)
    await ready_subject(runtime, owner, "kit", "pfx")
    await runtime.core.use(owner, "mia")

    said = await runtime.core.forget(owner, "mia")

    assert said.endswith("It was your [V]; [V] is now your newest ready subject, kit.")
    assert await runtime.store.chosen_subject_id(owner) is None  # ON DELETE CASCADE
    assert await drawn(runtime, owner) == "a pfx dog on the beach"
    [kit_line] = [
        line for line in (await runtime.core.subjects_text(owner)).splitlines() if "kit:" in line
    ]
    assert kit_line.endswith("← [V] (your newest ready one)")
    # Forgetting a subject that was not the chosen one says nothing about [V].
    assert "[V]" not in await runtime.core.forget(owner, "rex")


async def test_forgetting_the_newest_ready_subject_says_what_v_means_now(
    runtime: BotRuntime, owner: Owner
) -> None:
    await rex_then_mia(runtime, owner)  # [V] is mia, the newest ready one: nobody chose

    said = await runtime.core.forget(owner, "mia")

    assert said.endswith("It was your [V]; [V] is now your newest ready subject, rex.")
    assert await drawn(runtime, owner) == "a zqv dog on the beach"
    said = await runtime.core.forget(owner, "rex")
    assert said.endswith(
        "It was your [V]; [V] has no subject now: it works again once another subject of "
        "yours is ready."
    )


async def test_forgetting_a_subject_still_training_says_nothing_about_v(
    runtime: BotRuntime, owner: Owner
) -> None:
    _, mia = await rex_then_mia(runtime, owner)
    await runtime.store.update_subject(mia.id, status="training")  # [V] is rex

    assert "[V]" not in await runtime.core.forget(owner, "mia")


async def test_v_falls_back_to_the_newest_ready_subject_while_the_chosen_one_is_not_ready(
    runtime: BotRuntime, owner: Owner
) -> None:
    rex, _ = await rex_then_mia(runtime, owner)
    await runtime.core.use(owner, "rex")
    await runtime.store.update_subject(rex.id, status="failed", error="adapter damaged")

    assert await drawn(runtime, owner) == "a bkt dog on the beach"
    lines = (await runtime.core.subjects_text(owner)).splitlines()
    assert lines[1].endswith("← [V] (your newest ready one)")  # mia
    assert lines[-1] == (
        "You chose rex with /use, but it is failed, so [V] is mia, your newest ready subject, "
        "until it is ready again."
    )
    # Ready again, it is [V] again: the choice was kept.
    await runtime.store.update_subject(rex.id, status="ready", error=None)
    assert await drawn(runtime, owner) == "a zqv dog on the beach"


async def test_use_alone_goes_back_to_the_newest_ready_subject(
    runtime: BotRuntime, owner: Owner
) -> None:
    await rex_then_mia(runtime, owner)
    await runtime.core.use(owner, "rex")

    assert await runtime.core.use(owner) == "[V] means your newest ready subject again: mia."
    assert await runtime.store.chosen_subject_id(owner) is None
    assert await drawn(runtime, owner) == "a bkt dog on the beach"
    assert await runtime.core.use(owner, "  ") == (
        "[V] already means your newest ready subject, mia; nothing changed. "
        "`/use <name>` makes one of your ready subjects [V]."
    )


async def test_use_refuses_a_subject_that_is_not_ready_and_an_unknown_name(
    runtime: BotRuntime, owner: Owner
) -> None:
    rex, mia = await rex_then_mia(runtime, owner)
    await runtime.store.update_subject(rex.id, status="training")
    failed = await ready_subject(runtime, owner, "kit", "pfx")
    await runtime.store.update_subject(failed.id, status="failed")

    with pytest.raises(UserError) as training:
        await runtime.core.use(owner, "rex")
    assert training.value.message == (
        "rex is still training; `/use rex` works once it is ready. [V] stays mia."
    )
    with pytest.raises(UserError, match=r"kit failed to train, so it can't be \[V\]"):
        await runtime.core.use(owner, "kit")
    with pytest.raises(UserError) as unknown:
        await runtime.core.use(owner, "fido")
    assert (
        unknown.value.message == "You have no subject called `fido`. Your subjects: kit, mia, rex."
    )
    assert await runtime.store.chosen_subject_id(owner) is None
    # The store checks too: nobody else's subject, nor one that is not ready, is chosen.
    assert not await runtime.store.choose_subject(owner, rex.id)
    assert not await runtime.store.choose_subject(MIA, mia.id)
    assert await runtime.store.chosen_subject_id(MIA) is None


async def test_a_subject_deleted_while_it_is_being_chosen_is_not_chosen(
    runtime: BotRuntime, owner: Owner
) -> None:
    rex, _ = await rex_then_mia(runtime, owner)
    await runtime.core.forget(owner, "rex")  # between /use's lookup and its write

    assert not await runtime.store.choose_subject(owner, rex.id)
    assert await runtime.store.chosen_subject_id(owner) is None


async def test_a_subject_shared_with_you_cannot_be_your_v(
    runtime: BotRuntime, owner: Owner
) -> None:
    await ready_subject(runtime, owner, "rex", "zqv")
    await runtime.core.sharing.share(owner, "rex", EVERYONE)
    await ready_subject(runtime, MIA, "luna", "pfx")

    with pytest.raises(UserError) as refused:
        await runtime.core.use(MIA, "rex")

    assert refused.value.message == (
        "You have no subject called `rex`. Your subjects: luna. The rex shared with you by "
        "user-1 can't be [V], which is always one of your own subjects: write [rex] in a "
        "prompt to draw it."
    )
    assert await runtime.store.chosen_subject_id(MIA) is None


async def test_the_choice_is_per_user_and_per_workspace(runtime: BotRuntime, owner: Owner) -> None:
    await rex_then_mia(runtime, owner)
    await ready_subject(runtime, ELSEWHERE, "rex", "zqx")
    await ready_subject(runtime, ELSEWHERE, "mia", "bkx")
    await ready_subject(runtime, MIA, "rex", "gmx")
    await ready_subject(runtime, MIA, "mia", "pfx")

    await runtime.core.use(owner, "rex")

    assert await drawn(runtime, owner) == "a zqv dog on the beach"
    # The same user in another workspace, and another user here, keep their newest.
    assert await drawn(runtime, ELSEWHERE) == "a bkx dog on the beach"
    assert await drawn(runtime, MIA) == "a pfx dog on the beach"
    assert await runtime.store.chosen_subject_id(ELSEWHERE) is None


async def test_a_reroll_of_an_image_drawn_with_v_draws_the_subject_v_meant_then(
    runtime: BotRuntime, owner: Owner
) -> None:
    await rex_then_mia(runtime, owner)
    await runtime.core.use(owner, "rex")
    first = await runtime.core.imagine(owner, DEST, "a [V] on the beach", count=1)
    job = await runtime.store.get_job(first.job_id)
    assert job is not None and job.options["prompt"] == "a [rex] on the beach"

    await runtime.core.use(owner, "mia")
    again = await runtime.core.reimagine(owner, DEST, first.job_id)

    info = await runtime.queue._get_job_def(again.job_id.encode(), None)
    assert GenerateRequest.model_validate(info.args[0]).prompt == "a zqv dog on the beach"


async def test_subjects_marks_v_and_says_whether_it_was_chosen_or_is_the_newest(
    runtime: BotRuntime, owner: Owner
) -> None:
    await rex_then_mia(runtime, owner)

    newest = (await runtime.core.subjects_text(owner)).splitlines()
    await runtime.core.use(owner, "rex")
    chosen = (await runtime.core.subjects_text(owner)).splitlines()

    assert newest[1].startswith("  mia:") and newest[1].endswith("  ← [V] (your newest ready one)")
    assert "[V]" not in newest[2]
    assert newest[-1] == "`/use <name>` makes another of your ready subjects [V]."
    assert "[V]" not in chosen[1]
    assert chosen[2].startswith("  rex:") and chosen[2].endswith("  ← [V] (chosen with /use)")
    assert chosen[-1] == "`/use` alone makes [V] your newest ready subject again."


async def finish_training(runtime: BotRuntime, owner: Owner, name: str, token: str) -> Delivery:
    """Train ``name`` to the end as the engine would report it; the delivery posted."""
    subject = await ready_subject(runtime, owner, name, token)
    await runtime.store.update_subject(subject.id, status="training")
    job_id = f"{token:x<32}"
    await runtime.store.insert_job(job_id, "train", owner, DEST, subject_id=subject.id)
    sink = RecordingSink()
    result = TrainResult(
        job_id=job_id,
        subject_id=subject.id,
        adapter_url=f"file:///adapters/{name}.safetensors",
        sample_urls=[],
        steps=60,
        seconds=31.0,
    )
    await Deliverer(runtime.core, sink).result(result.model_dump())
    return sink.results[job_id]


async def test_the_ready_message_says_when_v_stays_another_subject(
    runtime: BotRuntime, owner: Owner
) -> None:
    first = await finish_training(runtime, owner, "mia", "bkt")
    assert first.text == "mia is ready — try /imagine a [V] dog on the beach  (60 steps in 0:31)"
    await runtime.core.use(owner, "mia")

    second = await finish_training(runtime, owner, "rex", "zqv")

    assert second.text == (
        "rex is ready — try /imagine a [rex] dog on the beach  (60 steps in 0:31)\n"
        "[V] is still mia; `/use rex` to draw rex as [V]."
    )
    assert await drawn(runtime, owner) == "a bkt dog on the beach"  # not silently replaced
    runtime.core.syntax = CommandSyntax(prefix="/dreambot ")  # as Slack's adapter sets it
    third = await finish_training(runtime, owner, "kit", "pfx")
    assert third.text.endswith("[V] is still mia; `/dreambot use kit` to draw kit as [V].")


async def test_migration_0010_adds_the_choices_and_changes_no_earlier_row(tmp_path: Path) -> None:
    before_0010 = tmp_path / "migrations"
    before_0010.mkdir()
    for number, path in migration_files():
        if number < 10:
            shutil.copy(path, before_0010 / path.name)
    database = tmp_path / "db.sqlite3"
    async with aiosqlite.connect(database) as db:
        await apply_migrations(db, before_0010)
        await db.execute(
            "INSERT INTO subjects VALUES ('s1', 'test', 'g', 'u', 'rex', 'dog', 'zqv', 'ready',"
            " 'file:///a', 'file:///p', 3, 'tiny', NULL, 't', 't')"
        )
        await db.execute("INSERT INTO subject_shares VALUES ('s1', '*', 't')")
        await db.commit()
        tables = ("subjects", "subject_shares", "schema_migrations")
        before = await table_rows(db, tables)

    store = await Store.open(database)  # applies 0010
    try:
        after = await table_rows(store.db, tables)
        assert after["subjects"] == before["subjects"]
        assert after["subject_shares"] == before["subject_shares"]
        assert [row[0] for row in after["schema_migrations"]][:10] == list(range(1, 11))
        rex = Owner("test", "g", "u")
        assert await store.chosen_subject_id(rex) is None  # [V]: the newest ready, as before
        assert await store.choose_subject(rex, "s1")
        await store.delete_subject("s1")
        assert await store.chosen_subject_id(rex) is None
    finally:
        await store.close()
