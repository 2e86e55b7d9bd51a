"""The engines' safety checker, bot side: each workspace's switch (/mod safety), the flag on
every request the core queues, what a result says when images were withheld (and the quota
they give back, once), and the moderators' log. Real SQLite, real Redis; the engine's answers
are sent as it would send them."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path

import aiosqlite
import pytest
from arq.worker import Retry

from bot.core.delivery import Deliverer, Delivery
from bot.core.errors import UserError
from bot.core.moderation import MOD_HELP, Moderator, NotModerator
from bot.core.store import Owner, Store, apply_migrations, migration_files
from bot.launcher import BotRuntime
from engine.api import (
    ENGINES_KEY,
    EngineHeartbeat,
    GenerateRequest,
    GenerateResult,
    ShowcaseRequest,
    TrainResult,
    engine_alive_key,
)
from tests.conftest import (
    RecordingSink,
    engine_queue,
    queued_generate_request,
    queued_train_request,
    ready_subject,
    table_rows,
)
from tests.test_commands import _photos

DEST = {"channel": "c1"}
CHECKER = "/srv/models/sd15/safety_checker"


@pytest.fixture
def mod(runtime: BotRuntime, owner: Owner) -> Moderator:
    """A moderator of the owner's workspace."""
    return runtime.core.moderation.acting(Owner(owner.platform, owner.workspace, "mod-1"), True)


async def engine_up(runtime: BotRuntime, engine_id: str, checker: str | None) -> None:
    """An engine's heartbeat, as a running engine keeps it (with or without a checker)."""
    heartbeat = EngineHeartbeat(
        engine_id=engine_id,
        host="gpu-1",
        pid=4242,
        device="cuda",
        models=[runtime.settings.base_model],
        safety_checker=checker,
        started_at=datetime.now(UTC),
    )
    await runtime.queue.set(engine_alive_key(engine_id), heartbeat.model_dump_json(), ex=30)
    await runtime.queue.sadd(ENGINES_KEY, engine_id)


async def images_spent(runtime: BotRuntime, owner: Owner) -> int:
    return (await runtime.store.usage(owner)).images


def generated(job_id: str, kept: int, withheld: int, seed: int = 5) -> GenerateResult:
    """A generation's result: ``kept`` images stored, ``withheld`` withheld by the checker."""
    return GenerateResult(
        job_id=job_id,
        image_urls=[f"file:///out/{job_id}/{i:02d}.png" for i in range(kept)],
        seed=seed,
        width=64,
        height=64,
        steps=4,
        seconds=0.5,
        withheld=withheld,
    )


class FailingOnceSink(RecordingSink):
    """A sink whose chat refuses the first result it is given (the delivery is retried)."""

    def __init__(self) -> None:
        super().__init__()
        self.refused = 0

    async def show_result(self, delivery: Delivery) -> None:
        if not self.refused:
            self.refused += 1
            raise ConnectionError("chat unreachable")
        await super().show_result(delivery)


async def deliver(runtime: BotRuntime, result: GenerateResult | TrainResult) -> Delivery:
    """Deliver ``result`` as the bot's worker does, its first post failing (a retried
    delivery: everything before the post runs twice); what was posted."""
    await runtime.queue.zrem(engine_queue(runtime), result.job_id)
    sink = FailingOnceSink()
    deliverer = Deliverer(runtime.core, sink)
    with pytest.raises(Retry):
        await deliverer.result(result.model_dump())
    await deliverer.result(result.model_dump())
    assert sink.refused == 1 and sink.result_count == 1
    delivery = sink.results[result.job_id]
    return delivery


# The switch.


async def test_the_filter_is_on_by_default_and_a_moderator_switches_it_off_and_on(
    runtime: BotRuntime, owner: Owner, mod: Moderator
) -> None:
    assert (await runtime.store.workspace_settings(owner.platform, owner.workspace)).safety_check

    off = await runtime.core.mod(mod.owner, True, "safety off")

    assert off == (
        "The safety filter is now off here: images are posted unchecked, also where an engine "
        "has a safety checker. Keep it off only on adult-only servers.\n"
        "`/mod safety on` turns it back on."
    )
    settings = await runtime.store.workspace_settings(owner.platform, owner.workspace)
    assert not settings.safety_check
    # Another workspace keeps its own (the default).
    assert (await runtime.store.workspace_settings(owner.platform, "guild-2")).safety_check
    on = await runtime.core.mod(mod.owner, True, "safety on")
    assert on.startswith("The safety filter is now on here; no engine is running now")
    assert on.endswith("`/mod safety off` turns it off, for adult-only servers.")
    log = (await runtime.core.mod(mod.owner, True, "log 2")).splitlines()
    assert log[1].endswith("mod-1: safety — on") and log[2].endswith("mod-1: safety — off")


async def test_only_moderators_switch_it_and_a_bad_word_changes_nothing(
    runtime: BotRuntime, owner: Owner, mod: Moderator
) -> None:
    with pytest.raises(NotModerator):
        await runtime.core.mod(owner, False, "safety off")
    with pytest.raises(UserError, match="Say on or off"):
        await runtime.core.mod(mod.owner, True, "safety maybe")
    with pytest.raises(UserError, match=r"Usage: /mod safety \[on\|off\]"):
        await runtime.core.mod(mod.owner, True, "safety off now")
    assert (await runtime.store.workspace_settings(owner.platform, owner.workspace)).safety_check
    assert await runtime.store.audit_entries(owner.platform, owner.workspace, 10) == []
    assert "/mod safety [on|off]" in MOD_HELP and "adult-only" in MOD_HELP


async def test_mod_safety_says_whether_the_running_engines_have_a_checker(
    runtime: BotRuntime, mod: Moderator
) -> None:
    await engine_up(runtime, "e1", None)
    assert (await mod.safety()).splitlines()[0] == (
        "The safety filter is on here, but no running engine has a safety checker "
        "(DREAMBOT_SAFETY_CHECKER), so images go unchecked."
    )
    await engine_up(runtime, "e2", CHECKER)
    assert (await mod.safety()).splitlines()[0] == (
        "The safety filter is on here, but 1 of the 2 running engines (e1) has no safety "
        "checker (DREAMBOT_SAFETY_CHECKER), so the images it draws go unchecked."
    )
    await runtime.queue.delete(engine_alive_key("e1"))
    assert (await mod.safety()).splitlines()[0] == (
        "The safety filter is on here: images the engines' safety checker flags are withheld, "
        "and given back to the user's quota."
    )
    await mod.safety(False)
    assert (await mod.safety()).startswith("The safety filter is off here: images are posted")


async def test_mod_status_shows_each_engines_checker_and_what_it_means_here(
    runtime: BotRuntime, mod: Moderator
) -> None:
    await engine_up(runtime, "e1", CHECKER)
    await engine_up(runtime, "e2", None)

    lines = (await mod.status()).splitlines()

    first = [line for line in lines if line.startswith("  e1, cuda:")]
    second = [line for line in lines if line.startswith("  e2, cuda:")]
    # Where the checker came from, without the host's whole folder layout.
    assert first and "; safety checker sd15/safety_checker; up since" in first[0]
    assert "/srv/models" not in "\n".join(lines)
    assert second and "; no safety checker; up since" in second[0]
    assert lines[-1] == (
        "The safety filter is on here, but 1 of the 2 running engines (e2) has no safety "
        "checker (DREAMBOT_SAFETY_CHECKER), so the images it draws go unchecked."
    )


# The flag on every request, from the workspace's switch at the time it is queued.


async def test_every_request_carries_the_workspaces_switch_when_it_is_queued(
    runtime: BotRuntime, owner: Owner, mod: Moderator
) -> None:
    runtime.settings.quota_max_active_jobs = 20
    await ready_subject(runtime, owner, "rex", "zqv")
    first = await runtime.core.imagine(owner, DEST, "a red fox", count=2, seed=5)
    showcased = await runtime.core.showcase(owner, DEST, "rex")
    assert (await queued_generate_request(runtime, first.job_id))["safety_check"] is True
    showcase = ShowcaseRequest.model_validate(
        await queued_generate_request(runtime, showcased.job_id)
    )
    assert showcase.safety_check is True

    await mod.safety(False)
    await runtime.store.update_job(
        first.job_id, status="done", result=generated(first.job_id, 2, 0).model_dump()
    )
    redone = [
        await runtime.core.imagine(owner, DEST, "a blue fox", count=1),
        await runtime.core.reimagine(owner, DEST, first.job_id),
        await runtime.core.reimagine(owner, DEST, first.job_id, vary=True, index=1),
        await runtime.core.reimagine(owner, DEST, first.job_id, upscale=True),
        await runtime.core.showcase(owner, DEST, "rex"),
    ]
    for receipt in redone:
        request = await queued_generate_request(runtime, receipt.job_id)
        assert request["safety_check"] is False, receipt.text
    # Someone of another workspace still gets the default.
    elsewhere = Owner(owner.platform, "guild-2", "user-9")
    theirs = await runtime.core.imagine(elsewhere, DEST, "a red fox", count=1)
    assert GenerateRequest.model_validate(
        await queued_generate_request(runtime, theirs.job_id)
    ).safety_check


async def test_a_training_request_carries_the_switch_too(
    runtime: BotRuntime, owner: Owner, mod: Moderator
) -> None:
    await runtime.core.train(owner, DEST, "rex", "dog", _photos(3))
    assert (await queued_train_request(runtime)).safety_check is True
    await runtime.queue.flushdb()

    await mod.safety(False)
    await runtime.core.train(owner, DEST, "mia", "cat", _photos(3))

    assert (await queued_train_request(runtime)).safety_check is False


# Results with withheld images.


async def test_a_result_with_some_images_withheld_says_so_and_gives_them_back_once(
    runtime: BotRuntime, owner: Owner
) -> None:
    receipt = await runtime.core.imagine(owner, DEST, "a red fox", count=4, seed=5)
    assert await images_spent(runtime, owner) == 4

    delivery = await deliver(runtime, generated(receipt.job_id, kept=3, withheld=1))

    assert delivery.text == (
        "“a red fox” · seed 5 · 64×64 · 4 steps in 0.5s · 1 of 4 images withheld by the "
        "safety filter (given back to your quota)"
    )
    assert len(delivery.image_urls) == 3
    # Refunded once, though the delivery ran twice (its first post failed).
    assert await images_spent(runtime, owner) == 3
    job = await runtime.store.get_job(receipt.job_id)
    assert job is not None and job.status == "done"


async def test_a_result_with_every_image_withheld_posts_nothing_but_says_why(
    runtime: BotRuntime, owner: Owner
) -> None:
    receipt = await runtime.core.imagine(owner, DEST, "a red fox", count=2, seed=5)

    delivery = await deliver(runtime, generated(receipt.job_id, kept=0, withheld=2))

    assert delivery.text == (
        "“a red fox” · seed 5: the safety filter withheld all 2 images, so nothing is posted; "
        "they are given back to your quota. Try another prompt."
    )
    assert delivery.image_urls == []
    assert await images_spent(runtime, owner) == 0
    # Nothing to vary or upscale; a reroll (a new seed) is still drawn and charged.
    for button in ({"vary": True}, {"upscale": True}):
        with pytest.raises(UserError) as refused:
            await runtime.core.reimagine(owner, DEST, receipt.job_id, **button)
        verb = "vary" if "vary" in button else "upscale"
        assert refused.value.message == (
            "The safety filter withheld every image of that result, so there is none to "
            f"{verb}. Nothing was queued."
        )
    assert await images_spent(runtime, owner) == 0
    rerolled = await runtime.core.reimagine(owner, DEST, receipt.job_id)
    assert rerolled.text.startswith("Drawing 2 images (seed ")
    assert await images_spent(runtime, owner) == 2


async def test_one_image_withheld_of_one_is_told_in_the_singular(
    runtime: BotRuntime, owner: Owner
) -> None:
    receipt = await runtime.core.imagine(owner, DEST, "a red fox", count=1, seed=5)

    delivery = await deliver(runtime, generated(receipt.job_id, kept=0, withheld=1))

    assert delivery.text == (
        "“a red fox” · seed 5: the safety filter withheld the image, so nothing is posted; "
        "it is given back to your quota. Try another prompt."
    )


async def test_a_showcase_with_withheld_cells_notes_them_and_refunds_one_unit_each(
    runtime: BotRuntime, owner: Owner
) -> None:
    await ready_subject(runtime, owner, "rex", "zqv")
    receipt = await runtime.core.showcase(owner, DEST, "rex")
    assert await images_spent(runtime, owner) == 10
    result = GenerateResult(
        job_id=receipt.job_id,
        image_urls=[f"file:///out/{receipt.job_id}/showcase.png"],
        seed=9,
        width=640,
        height=800,
        steps=4,
        seconds=3.0,
        withheld=3,
    )

    delivery = await deliver(runtime, result)

    assert delivery.text == (
        "“showcase of rex” · seed 9 · 640×800 · 4 steps in 3.0s · 3 of 10 cells withheld by "
        "the safety filter (grey tiles; given back to your quota)"
    )
    assert len(delivery.image_urls) == 1  # the grid, its withheld cells grey
    assert await images_spent(runtime, owner) == 7


async def test_a_training_whose_sample_cells_were_withheld_is_ready_and_refunds_nothing(
    runtime: BotRuntime, owner: Owner
) -> None:
    receipt = await runtime.core.train(owner, DEST, "rex", "dog", _photos(3))
    request = await queued_train_request(runtime)
    result = TrainResult(
        job_id=receipt.job_id,
        subject_id=request.subject_id,
        adapter_url=request.adapter_url,
        sample_urls=[f"{request.samples_url}/showcase.png"],
        steps=60,
        seconds=31,
        withheld=2,
    )

    delivery = await deliver(runtime, result)

    assert delivery.text.startswith("rex is ready — try /imagine a [V] dog on the beach")
    assert delivery.text.endswith(
        "\nThe safety filter withheld 2 cells of the sample grid (the grey tiles)."
    )
    assert (await runtime.store.usage(owner)).trainings == 1
    subject = await runtime.store.find_subject(owner, "rex")
    assert subject is not None and subject.status == "ready"


async def test_a_result_with_nothing_withheld_reads_as_before_and_logs_nothing(
    runtime: BotRuntime, owner: Owner, mod: Moderator
) -> None:
    receipt = await runtime.core.imagine(owner, DEST, "a red fox", count=2, seed=5)

    delivery = await deliver(runtime, generated(receipt.job_id, kept=2, withheld=0))

    assert delivery.text == "“a red fox” · seed 5 · 64×64 · 4 steps in 0.5s"
    assert await images_spent(runtime, owner) == 2
    assert await mod.blocked_attempts() == (
        "No prompts have been blocked here. The safety filter has withheld no images."
    )


# The moderators' log.


async def test_mod_blocked_lists_withheld_outputs_with_the_blocked_prompts(
    runtime: BotRuntime, owner: Owner, mod: Moderator
) -> None:
    await ready_subject(runtime, owner, "rex", "zqv")
    with pytest.raises(UserError):
        await runtime.core.imagine(owner, DEST, "a naked fox")
    drawn = await runtime.core.imagine(
        owner, DEST, "a red fox", count=4, seed=5, negative_prompt="blur"
    )
    await deliver(runtime, generated(drawn.job_id, kept=2, withheld=2))
    showcased = await runtime.core.showcase(owner, DEST, "rex")
    grid = generated(showcased.job_id, kept=1, withheld=1)
    await deliver(runtime, grid)
    # A second apart each (the store keeps whole seconds).
    for table, at in (
        ("blocked_attempts", "2025-01-01T10:00:00+00:00"),
        ("withheld_outputs", "2025-01-01T10:00:01+00:00"),
    ):
        await runtime.store.db.execute(f"UPDATE {table} SET created_at = ?", (at,))
    await runtime.store.db.execute(
        "UPDATE withheld_outputs SET created_at = '2025-01-01T10:00:02+00:00' WHERE job_id = ?",
        (showcased.job_id,),
    )
    await runtime.store.db.commit()

    lines = (await runtime.core.mod(mod.owner, True, "blocked")).splitlines()

    assert lines[0] == "Latest blocked prompts and withheld images:"
    # Newest first: the showcase, the drawing, then the blocked prompt.
    assert lines[1].endswith(
        f"  user-1  safety filter withheld 1 of 10 cells of the showcase of rex "
        f"(job {showcased.job_id[:8]})"
    )
    assert lines[2].endswith(
        f"  user-1  safety filter withheld 2 of 4 images: “a red fox” (no: “blur”) "
        f"(job {drawn.job_id[:8]})"
    )
    assert "rule default:" in lines[3] and "a naked fox" in lines[3]
    assert len(lines) == 4  # a retried delivery logged each once
    # /mod blocked 1: the newest of both kinds together.
    assert (await mod.blocked_attempts(1)).splitlines()[1:] == [lines[1]]


async def test_withheld_training_samples_are_logged_under_the_subjects_name(
    runtime: BotRuntime, owner: Owner, mod: Moderator
) -> None:
    receipt = await runtime.core.train(owner, DEST, "rex", "dog", _photos(3))
    request = await queued_train_request(runtime)
    result = TrainResult(
        job_id=receipt.job_id,
        subject_id=request.subject_id,
        adapter_url=request.adapter_url,
        sample_urls=[],
        steps=60,
        seconds=31,
        withheld=1,
    )
    await deliver(runtime, result)

    [line] = (await mod.blocked_attempts()).splitlines()[1:]
    assert line.endswith(
        f"  user-1  safety filter withheld 1 cell of the sample grid of rex's training "
        f"(job {receipt.job_id[:8]})"
    )


# The migration.


async def test_migration_0011_adds_the_switch_and_the_log_and_changes_no_earlier_row(
    tmp_path: Path,
) -> None:
    before_0011 = tmp_path / "migrations"
    before_0011.mkdir()
    for number, path in migration_files():
        if number < 11:
            shutil.copy(path, before_0011 / path.name)
    database = tmp_path / "db.sqlite3"
    async with aiosqlite.connect(database) as db:
        await apply_migrations(db, before_0011)
        await db.execute(
            "INSERT INTO workspace_settings (platform, workspace, use_default_rules,"
            " reveal_blocked_rule, rules_version, updated_by, updated_at, default_model)"
            " VALUES ('test', 'g', 0, 1, 7, 'm', 't', 'xl')"
        )
        await db.execute(
            "INSERT INTO jobs (id, kind, platform, workspace, user_id, prompt, destination,"
            " status, created_at, updated_at, options) VALUES ('j1', 'generate', 'test', 'g',"
            " 'u', 'a cat', '{}', 'done', 't', 't', '{\"count\": 2}')"
        )
        await db.execute(
            "INSERT INTO quota_usage (job_id, platform, workspace, user_id, kind, units, day,"
            " created_at) VALUES ('j1', 'test', 'g', 'u', 'images', 2, '2025-01-01', 't')"
        )
        await db.commit()
        tables = ("workspace_settings", "jobs", "quota_usage")
        before = await table_rows(db, tables)

    store = await Store.open(database)  # applies 0011 and anything after it
    try:
        after = await table_rows(store.db, tables)
        # Jobs gain columns later (0012): last, NULL for the old row.
        width = len(before["jobs"][0])
        assert [row[:width] for row in after["jobs"]] == before["jobs"]
        assert all(value is None for row in after["jobs"] for value in row[width:])
        assert after["quota_usage"] == before["quota_usage"]
        # The new column comes last, NULL for the old row: the filter is on there.
        [(*old, switch)] = after["workspace_settings"]
        assert [tuple(old)] == before["workspace_settings"] and switch is None
        settings = await store.workspace_settings("test", "g")
        assert settings.safety_check and settings.default_model == "xl"
        assert not settings.use_default_rules and settings.rules_version == 7
        assert await store.withheld_outputs("test", "g", 10) == []
        async with store.db.execute("PRAGMA foreign_key_check") as cur:
            assert await cur.fetchall() == []
    finally:
        await store.close()
