"""/mydata, /mydata delete and /mod delete-user-data in the core, against a real SQLite file,
a real Redis and real files in the artifact store: what is shown, what is deleted, what is
stopped and refunded, and what is kept for moderation."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from arq.constants import in_progress_key_prefix

from bot.core.commands import DATA_DELETED_REDO
from bot.core.errors import UserError
from bot.core.personal_data import MODERATOR_NOTE, OWN_NOTE
from bot.core.retention import STOPPED_WITHIN
from bot.core.store import EVERYONE, Job, Owner
from bot.launcher import BotRuntime
from engine.artifacts import local_path
from tests.conftest import TEST_PLATFORM, engine_queue, ready_subject
from tests.test_combinations import notices
from tests.test_commands import _photos
from tests.test_retention import images_deleted_at, outputs, read_only_store, stored_job

DEST = {"channel": "c1"}
ALICE = Owner(TEST_PLATFORM, "guild-1", "alice")
MIA = Owner(TEST_PLATFORM, "guild-1", "mia")
ALICE_ELSEWHERE = Owner(TEST_PLATFORM, "guild-2", "alice")


async def subject_with_files(runtime: BotRuntime, owner: Owner, name: str, token: str) -> Path:
    """A ready subject with its photos, adapter and sample grid in the artifact store; its
    folder."""
    subject = await ready_subject(runtime, owner, name, token)
    artifacts = runtime.core.artifacts
    for part in ("photos/00.png", "photos/01.png", "adapter.safetensors", "samples/00.png"):
        await artifacts.aput_bytes(artifacts.url("subjects", subject.id, part), b"bytes")
    folder = local_path(artifacts.url("subjects", subject.id))
    assert folder is not None
    return folder


async def get(runtime: BotRuntime, job_id: str) -> Job:
    job = await runtime.store.get_job(job_id)
    assert job is not None
    return job


async def count_rows(runtime: BotRuntime, table: str, user: Owner) -> int:
    async with runtime.store.db.execute(
        f"SELECT count(*) FROM {table} WHERE platform = ? AND workspace = ? AND user_id = ?",
        (user.platform, user.workspace, user.user_id),
    ) as cursor:
        row = await cursor.fetchone()
    assert row is not None
    return int(row[0])


async def in_queues(runtime: BotRuntime, job_id: str) -> bool:
    scores = [
        await runtime.queue.zscore(queue, job_id)
        for queue in (engine_queue(runtime), engine_queue(runtime, "train"))
    ]
    return any(score is not None for score in scores)


# /mydata.


async def test_mydata_shows_what_is_kept_about_the_caller_and_for_how_long(
    runtime: BotRuntime,
) -> None:
    await ready_subject(runtime, ALICE, "rex", "zqv")
    await runtime.core.sharing.share(ALICE, "rex", EVERYONE)
    finished = await stored_job(runtime, ALICE, ended_days_ago=3)
    await runtime.core.imagine(ALICE, DEST, "a cat", count=1)  # waiting
    with pytest.raises(UserError):
        await runtime.core.imagine(ALICE, DEST, "a n.u.d.e portrait", count=1)
    await runtime.store.record_withheld(finished, "images", 1, total=3, prompt="a red fox")
    mod = runtime.core.moderation.acting(Owner(TEST_PLATFORM, "guild-1", "mod"), True)
    await mod.quota_reset("alice")
    await stored_job(runtime, MIA, ended_days_ago=3)  # someone else's: not counted
    await ready_subject(runtime, ALICE_ELSEWHERE, "luna", "pfx")  # another workspace's

    said = await runtime.core.personal_data.summary(ALICE)

    assert said == (
        "What dreambot keeps about you here:\n"
        "  Subjects (1): rex (dog, ready, 3 photos; shared with everyone here). Each keeps its "
        "photos, adapter and sample images until you delete it (/forget).\n"
        "  Images: 2 stored, of 1 job, the oldest from "
        f"{finished.created_at[:16].replace('T', ' ')} UTC (with the live previews drawn on the "
        "way). Each job's images are deleted 30 days after it ended; the copies posted in the "
        "chat are the platform's and stay.\n"
        "  Prompts: those of your 2 image jobs, with their options, so that Reroll can draw "
        "them again.\n"
        "  Jobs waiting or running: 1 (/jobs).\n"
        "Kept for moderation, also after /mydata delete, because moderators need them to act "
        "on abuse (none holds a photo or an image): 1 quota usage record (what each of your "
        "jobs spent), 1 blocked prompt (with its text), 1 result whose images the safety "
        "filter withheld (with its prompt) and 1 moderator action about you. Each is deleted "
        "180 days after it was made.\n"
        "`/mydata delete` deletes your subjects, images and prompts and cancels your jobs; you "
        "confirm first."
    )


async def test_mydata_of_someone_new_and_the_retention_settings_it_names(
    runtime: BotRuntime,
) -> None:
    runtime.settings.keep_images_days = 0
    runtime.settings.keep_moderation_days = 0

    said = await runtime.core.personal_data.summary(MIA)

    assert "  Subjects: none.\n" in said
    assert "  Images: none stored. Images are kept until you delete them;" in said
    assert "  Prompts: none.\n  Jobs waiting or running: none.\n" in said
    assert "(none holds a photo or an image): nothing about you so far. They are kept " in said
    assert "without a time limit." in said


async def test_a_banned_user_may_see_and_delete_their_data(runtime: BotRuntime) -> None:
    folder = await subject_with_files(runtime, ALICE, "rex", "zqv")
    mod = runtime.core.moderation.acting(Owner(TEST_PLATFORM, "guild-1", "mod"), True)
    await mod.ban("alice", "spam")

    said = await runtime.core.personal_data.summary(ALICE)
    assert "  Subjects (1): rex" in said and "your ban (until lifted)" in said
    await runtime.core.personal_data.deletion_preview(ALICE)
    deletion = await runtime.core.personal_data.delete(ALICE)

    assert deletion.subjects == ["rex"] and not folder.exists()
    assert await runtime.store.active_ban(ALICE) is not None  # kept for moderation


# /mydata delete.


async def test_the_preview_asks_first_and_deletes_nothing(runtime: BotRuntime) -> None:
    folder = await subject_with_files(runtime, ALICE, "rex", "zqv")
    await runtime.core.sharing.share(ALICE, "rex", MIA.user_id)
    job = await stored_job(runtime, ALICE, ended_days_ago=2)
    waiting = await runtime.core.imagine(ALICE, DEST, "a cat", count=1)

    said = await runtime.core.personal_data.deletion_preview(ALICE)

    assert said == (
        "This deletes what dreambot keeps about you here, and can't be undone:\n"
        "  your subject rex with its photos, adapter and sample images; the sharing of rex "
        "ends, and others' jobs drawing it stop\n"
        "  your 2 stored images\n"
        "  the prompts and options of your 2 image jobs\n"
        "  and it cancels your 1 waiting or running job (what it took from your quota is "
        "given back)\n"
        "The images already posted in the chat are the platform's copies and stay. Kept for "
        "moderation: 1 quota usage record (what each of your jobs spent)."
    )
    assert folder.exists() and outputs(runtime, job).exists()
    assert (await get(runtime, waiting.job_id)).status == "queued"
    assert await runtime.store.subjects_shared_with(MIA) != []


async def test_with_nothing_stored_the_preview_says_so(runtime: BotRuntime) -> None:
    with pytest.raises(UserError) as nothing:
        await runtime.core.personal_data.deletion_preview(MIA)
    assert nothing.value.message == (
        "You have nothing stored here to delete: no subjects, images, prompts or jobs. "
        "(Kept for moderation: nothing about you so far.)"
    )
    deletion = await runtime.core.personal_data.delete(MIA)
    assert runtime.core.personal_data.deleted_text(deletion) == (
        "You had nothing stored here, so nothing was deleted."
    )


async def test_deleting_everything_deletes_files_stops_jobs_redacts_and_keeps_moderation(
    runtime: BotRuntime,
) -> None:
    luna = await subject_with_files(runtime, ALICE, "luna", "pfx")
    await runtime.core.sharing.share(ALICE, "luna", EVERYONE)
    training = await runtime.core.train(ALICE, DEST, "rex", "dog", _photos(3))
    [rex] = [s for s in await runtime.store.list_subjects(ALICE) if s.name == "rex"]
    rex_folder = local_path(runtime.core.artifacts.url("subjects", rex.id))
    assert rex_folder is not None and (rex_folder / "photos").exists()
    finished = await stored_job(runtime, ALICE, ended_days_ago=2)
    waiting = await runtime.core.imagine(ALICE, DEST, "a cat", count=2)
    with pytest.raises(UserError):
        await runtime.core.imagine(ALICE, DEST, "a n.u.d.e portrait", count=1)
    await runtime.store.record_withheld(finished, "images", 1, total=3, prompt="a red fox")
    mod = runtime.core.moderation.acting(Owner(TEST_PLATFORM, "guild-1", "mod"), True)
    await mod.quota_reset("alice")
    # Mia draws Alice's shared luna, and something of her own.
    mias_luna = await runtime.core.imagine(MIA, DEST, "[luna] in a park", count=1)
    mias_own = await runtime.core.imagine(MIA, DEST, "an owl", count=1)
    mias_done = await stored_job(runtime, MIA, ended_days_ago=2)
    elsewhere = await subject_with_files(runtime, ALICE_ELSEWHERE, "rex", "zqv")
    kept = {
        table: await count_rows(runtime, table, ALICE)
        for table in ("quota_usage", "blocked_attempts", "withheld_outputs")
    }

    deletion = await runtime.core.personal_data.delete(ALICE)

    # Subjects: rows, photos, adapters and samples; their sharing.
    assert await runtime.store.list_subjects(ALICE) == []
    assert not luna.exists() and not rex_folder.exists()
    assert await runtime.store.subjects_shared_with(MIA) == []
    # Alice's jobs: cancelled, refunded, out of the queue; images deleted; prompts redacted.
    for receipt in (training, waiting):
        job = await get(runtime, receipt.job_id)
        assert job.status == "cancelled" and not await in_queues(runtime, job.id)
    usage = await runtime.store.usage(ALICE)
    assert (usage.images, usage.trainings, usage.active_jobs) == (0, 0, 0)
    assert not outputs(runtime, finished).exists()
    assert await images_deleted_at(runtime, finished) is not None
    for job in await runtime.store.user_jobs(ALICE):
        assert (job.prompt, job.options, job.data_deleted_at is not None) == (None, {}, True)
        assert job.error in (None, OWN_NOTE)
    # Others' jobs drawing her subjects: stopped, refunded, told why; the rest of Mia's stays.
    assert (await get(runtime, mias_luna.job_id)).status == "cancelled"
    assert (await runtime.store.usage(MIA)).images == 1
    assert await notices(runtime) == {
        mias_luna.job_id: "Your image “[luna] in a park” was cancelled: luna was deleted by its "
        "owner. What it took from your quota is given back."
    }  # nothing is posted about Alice's own: she has the reply
    assert (await get(runtime, mias_own.job_id)).status == "queued"
    assert (await get(runtime, mias_done.id)).prompt == "a red fox"
    assert outputs(runtime, mias_done).exists()
    assert elsewhere.exists()  # her subject in another workspace is that workspace's
    # Kept for moderation.
    for table, rows in kept.items():
        assert await count_rows(runtime, table, ALICE) == rows, table
    assert "quota-reset alice" in await mod.log()
    assert runtime.core.personal_data.deleted_text(deletion) == (
        "Deleted what dreambot kept about you here: your subjects rex and luna (photos, "
        "adapters and sample images), 2 stored images and the prompts and options of your "
        "3 jobs.\n"
        "Cancelled your 2 waiting or running jobs; what they took from your quota is given "
        "back.\n"
        "luna is no longer shared with anyone.\n"
        "Stopped 1 image job of others drawing your subjects; their owners were told, and "
        "refunded.\n"
        "The images already posted in the chat are the platform's copies and stay: delete "
        "those messages there. Kept for moderation: your quota usage, blocked prompts, "
        "withheld-image records and moderators' actions about you (see /mydata)."
    )
    assert "Subjects: none." in await runtime.core.personal_data.summary(ALICE)


@pytest.mark.parametrize("button", [{}, {"vary": True}, {"upscale": True}])
async def test_a_redo_of_a_result_whose_data_was_deleted_says_so_and_queues_nothing(
    runtime: BotRuntime, button: dict[str, bool]
) -> None:
    job = await stored_job(runtime, ALICE, ended_days_ago=2)
    await runtime.core.personal_data.delete(ALICE)

    for who in (ALICE, MIA):
        with pytest.raises(UserError) as refused:
            await runtime.core.reimagine(who, DEST, job.id, **button)
        assert refused.value.message == DATA_DELETED_REDO
    assert await runtime.queue.zcard(engine_queue(runtime)) == 0


async def test_a_job_stopped_while_it_ran_is_swept_again_once_its_engine_stopped(
    runtime: BotRuntime,
) -> None:
    receipt = await runtime.core.imagine(ALICE, DEST, "a red fox", count=1)
    await runtime.queue.set(in_progress_key_prefix + receipt.job_id, b"1")  # an engine runs it
    artifacts = runtime.core.artifacts
    preview = artifacts.url("outputs", receipt.job_id, "previews", "0001.jpg")
    await artifacts.aput_bytes(preview, b"preview")

    await runtime.core.personal_data.delete(ALICE)

    job = await get(runtime, receipt.job_id)
    assert job.status == "cancelled" and job.images_deleted_at is None
    assert local_path(preview) is not None and not local_path(preview).exists()  # type: ignore[union-attr]
    await artifacts.aput_bytes(preview, b"the engine's last preview, as it stopped")
    assert (await runtime.core.retention.sweep_images()).jobs == 0  # it may still be writing
    stopped = (datetime.now(UTC) - STOPPED_WITHIN - timedelta(minutes=1)).isoformat()
    async with runtime.store.transaction() as db:
        await db.execute("UPDATE jobs SET data_deleted_at = ? WHERE id = ?", (stopped, job.id))

    assert (await runtime.core.retention.sweep_images()).jobs == 1

    assert not local_path(preview).exists()  # type: ignore[union-attr]
    assert (await get(runtime, job.id)).images_deleted_at is not None


async def test_images_the_store_would_not_delete_are_said_so_and_swept_later(
    runtime: BotRuntime,
) -> None:
    job = await stored_job(runtime, ALICE, ended_days_ago=2)
    async with read_only_store(runtime) as read_only:
        deletion = await read_only.personal_data.delete(ALICE)
        said = read_only.personal_data.deleted_text(deletion)

    assert "The images of 1 job could not be deleted just now (the artifact store did not " in said
    assert "answer); the hourly sweep deletes them." in said
    assert outputs(runtime, job).exists()
    assert (await get(runtime, job.id)).prompt is None  # redacted all the same
    assert (await runtime.core.retention.sweep_images()).jobs == 0  # not ten minutes yet
    long_ago = (datetime.now(UTC) - STOPPED_WITHIN - timedelta(minutes=1)).isoformat()
    async with runtime.store.transaction() as db:
        await db.execute("UPDATE jobs SET data_deleted_at = ? WHERE id = ?", (long_ago, job.id))

    assert (await runtime.core.retention.sweep_images()).jobs == 1

    assert not outputs(runtime, job).exists()


async def test_a_subject_the_store_would_not_delete_stays_listed_to_delete_again(
    runtime: BotRuntime,
) -> None:
    folder = await subject_with_files(runtime, ALICE, "rex", "zqv")
    async with read_only_store(runtime) as read_only:
        with pytest.raises(NotImplementedError):
            await read_only.personal_data.delete(ALICE)

    assert folder.exists() and [s.name for s in await runtime.store.list_subjects(ALICE)] == ["rex"]
    assert (await runtime.core.personal_data.delete(ALICE)).subjects == ["rex"]
    assert not folder.exists()


async def test_delete_from_the_button_only_for_the_user_it_was_shown_to(
    runtime: BotRuntime,
) -> None:
    folder = await subject_with_files(runtime, ALICE, "rex", "zqv")

    with pytest.raises(UserError) as refused:
        await runtime.core.personal_data.delete_from_button(
            MIA, ALICE.user_id, mention=lambda user: f"<@{user}>"
        )

    assert refused.value.message == (
        "Only <@alice> can delete their data with this button: it is theirs. Nothing was changed."
    )
    assert folder.exists()
    deletion = await runtime.core.personal_data.delete_from_button(ALICE, ALICE.user_id)
    assert deletion.subjects == ["rex"] and not folder.exists()


# A moderator's deletion.


async def test_a_moderator_deletes_a_users_data_and_it_is_audited(runtime: BotRuntime) -> None:
    folder = await subject_with_files(runtime, ALICE, "rex", "zqv")
    await runtime.core.sharing.share(ALICE, "rex", EVERYONE)
    finished = await stored_job(runtime, ALICE, ended_days_ago=2)
    waiting = await runtime.core.imagine(ALICE, DEST, "a cat", count=1)
    mias = await runtime.core.imagine(MIA, DEST, "[rex] on a sofa", count=1)
    mod = runtime.core.moderation.acting(Owner(TEST_PLATFORM, "guild-1", "mod"), True)

    said = await runtime.core.mod(mod.owner, True, "delete-user-data <@alice>")

    assert said == (
        "Deleted what dreambot kept about alice here: their subject rex (photos, adapters and "
        "sample images), 2 stored images and the prompts and options of their 2 jobs.\n"
        "Cancelled 1 waiting or running job of theirs; they were told, and refunded.\n"
        "rex is no longer shared with anyone.\n"
        "Stopped 1 image job of others drawing their subjects; their owners were told, and "
        "refunded.\n"
        "Their quota usage, blocked prompts, withheld-image records and the audit log stay, "
        "for moderation."
    )
    assert not folder.exists() and not outputs(runtime, finished).exists()
    assert (await get(runtime, waiting.job_id)).status == "cancelled"
    assert (await runtime.store.usage(ALICE)).images == 0
    assert await notices(runtime) == {
        waiting.job_id: MODERATOR_NOTE,  # told where she asked for it, without its prompt
        mias.job_id: "Your image “[rex] on a sofa” was cancelled: a moderator deleted rex. "
        "What it took from your quota is given back.",
    }
    [entry] = (await mod.log(1)).splitlines()[1:]
    assert entry.endswith(
        "mod: delete-user-data alice — 1 subject(s) deleted; 2 stored image(s) deleted; "
        "2 job(s) redacted; 1 job(s) cancelled; stopped 1 image job(s) of others drawing them"
    )


async def test_a_non_moderator_cannot_delete_someone_elses_data(runtime: BotRuntime) -> None:
    folder = await subject_with_files(runtime, ALICE, "rex", "zqv")

    with pytest.raises(UserError, match="Only moderators can use /mod"):
        await runtime.core.mod(MIA, False, "delete-user-data alice")

    assert folder.exists()
    assert await runtime.store.audit_entries(TEST_PLATFORM, "guild-1", 10) == []
