"""Today's features used together, as users would: subjects shared on purpose (/share,
/unshare), /use, once-per-press Reroll/Vary/Upscale, /cancel and /jobs, moderators' cancels,
deletions and bans, quotas and workspaces. The real core on real SQLite and Redis, without
the engine (its answers are sent as it would send them)."""

from __future__ import annotations

from typing import Any

import pytest

from bot.core.delivery import Deliverer
from bot.core.errors import UserError
from bot.core.moderation import Moderator
from bot.core.photos import Upload
from bot.core.store import EVERYONE, Owner
from bot.launcher import BotRuntime
from engine.api import Failure, GenerateRequest, GenerateResult, bot_queue
from tests.conftest import (
    TEST_PLATFORM,
    RecordingSink,
    configure_second_model,
    engine_queue,
    make_photo,
    queued,
    ready_subject,
)
from tests.test_commands import _photos

DEST = {"channel": "c1"}
ALICE = Owner(TEST_PLATFORM, "guild-1", "alice")
MIA = Owner(TEST_PLATFORM, "guild-1", "mia")
BOB = Owner(TEST_PLATFORM, "guild-1", "bob")
MIA_ELSEWHERE = Owner(TEST_PLATFORM, "guild-2", "mia")
"""Mia's user id in another workspace of the same platform (Discord ids are global)."""


def moderator(runtime: BotRuntime) -> Moderator:
    return runtime.core.moderation.acting(Owner(TEST_PLATFORM, "guild-1", "mod"), True)


async def queued_request(runtime: BotRuntime, job_id: str) -> GenerateRequest:
    info = await runtime.queue._get_job_def(job_id.encode(), None)
    return GenerateRequest.model_validate(info.args[0])


async def drawn(runtime: BotRuntime, user: Owner, prompt: str) -> str:
    """The prompt the engine is asked to draw for ``user``'s ``prompt``."""
    receipt = await runtime.core.imagine(user, DEST, prompt, count=1)
    return (await queued_request(runtime, receipt.job_id)).prompt


async def finish(runtime: BotRuntime, job_id: str, count: int = 2) -> RecordingSink:
    """Deliver ``job_id``'s images as the engine would send them back; the sink they went to."""
    result = GenerateResult(
        job_id=job_id,
        image_urls=[f"file:///out/{job_id}/{i:02d}.png" for i in range(count)],
        seed=5,
        width=64,
        height=64,
        steps=4,
        seconds=0.5,
    )
    await runtime.queue.zrem(engine_queue(runtime), job_id)
    sink = RecordingSink()
    await Deliverer(runtime.core, sink).result(result.model_dump())
    return sink


async def images_spent(runtime: BotRuntime, user: Owner) -> int:
    return (await runtime.store.usage(user)).images


async def notices(runtime: BotRuntime) -> dict[str, str]:
    """What the bot's own queue would post to the owners of jobs cancelled for them (by a
    moderator, a ban, a deletion): job id → the text."""
    sink = RecordingSink()
    deliverer = Deliverer(runtime.core, sink)
    for notice in await runtime.queue.zrange(bot_queue(TEST_PLATFORM), 0, -1):
        info = await runtime.queue._get_job_def(notice, None)
        payload: dict[str, Any] = info.args[0]
        await deliverer.failure(payload)
    return sink.failures


async def alice_shares_rex(runtime: BotRuntime, target: str = MIA.user_id) -> None:
    await ready_subject(runtime, ALICE, "rex", "zqv")
    await runtime.core.sharing.share(ALICE, "rex", target)


# A shared subject taken away around a drawing.


@pytest.mark.parametrize("button", [{}, {"vary": True, "index": 1}, {"upscale": True}])
async def test_a_redo_after_the_owner_stops_sharing_says_so_and_queues_nothing(
    runtime: BotRuntime, button: dict[str, Any]
) -> None:
    await alice_shares_rex(runtime)
    first = await runtime.core.imagine(MIA, DEST, "[rex] on the beach", count=2)
    await finish(runtime, first.job_id)
    await runtime.core.sharing.unshare(ALICE, "rex")
    spent, waiting = await images_spent(runtime, MIA), await queued(runtime.queue)

    with pytest.raises(UserError) as refused:
        await runtime.core.reimagine(MIA, DEST, first.job_id, **button)

    # She never typed rex's token: she is told what happened, in the names she knows.
    assert refused.value.message == (
        "rex, which these images draw, is no longer shared with you by alice, so they can't "
        "be redrawn. Nothing was queued."
    )
    assert "zqv" not in refused.value.message
    assert (await images_spent(runtime, MIA), await queued(runtime.queue)) == (spent, waiting)
    # Shared again, the button works again.
    await runtime.core.sharing.share(ALICE, "rex", EVERYONE)
    again = await runtime.core.reimagine(MIA, DEST, first.job_id, **button)
    [adapter] = (await queued_request(runtime, again.job_id)).adapters
    assert adapter.token == "zqv"


async def test_a_reroll_after_the_shared_subject_was_deleted_says_it_was_deleted(
    runtime: BotRuntime,
) -> None:
    await alice_shares_rex(runtime)
    await ready_subject(runtime, MIA, "luna", "pfx")
    first = await runtime.core.imagine(MIA, DEST, "[luna] and [rex] in a park", count=1)
    await finish(runtime, first.job_id, count=1)
    await runtime.core.forget(ALICE, "rex")

    with pytest.raises(UserError) as refused:
        await runtime.core.reimagine(MIA, DEST, first.job_id)

    assert refused.value.message == (
        "rex, which these images draw, was deleted, so they can't be redrawn. Nothing was "
        "queued; draw something else with /imagine."
    )
    # Her own subject of that image, deleted by a moderator, is answered the same way.
    second = await runtime.core.imagine(MIA, DEST, "[luna] on a sofa", count=1)
    await finish(runtime, second.job_id, count=1)
    await moderator(runtime).delete_subject(MIA.user_id, "luna")
    with pytest.raises(UserError, match="^luna, which these images draw, was deleted"):
        await runtime.core.reimagine(MIA, DEST, second.job_id, vary=True)


async def test_unsharing_stops_the_jobs_of_those_who_can_no_longer_draw_it(
    runtime: BotRuntime,
) -> None:
    await alice_shares_rex(runtime)
    await runtime.core.sharing.share(ALICE, "rex", BOB.user_id)
    runtime.settings.quota_max_active_jobs = 10
    waiting = await runtime.core.imagine(MIA, DEST, "[rex] on the beach", count=2)
    running = await runtime.core.imagine(MIA, DEST, "[rex] in the snow", count=1)
    await runtime.store.start_job(running.job_id)
    bobs = await runtime.core.imagine(BOB, DEST, "[rex] on a boat", count=1)
    alices = await runtime.core.imagine(ALICE, DEST, "[rex] at home", count=1)

    said = await runtime.core.sharing.unshare(ALICE, "rex", MIA.user_id)

    # "Only you can draw it now" must hold: her jobs that would still draw it are stopped.
    assert said == (
        "Stopped sharing rex with mia. 2 image jobs drawing it were stopped, and the quota "
        "they took is given back."
    )
    for receipt in (waiting, running):
        job = await runtime.store.get_job(receipt.job_id)
        assert job is not None and job.status == "cancelled"
    for receipt in (bobs, alices):  # still theirs to draw
        job = await runtime.store.get_job(receipt.job_id)
        assert job is not None and job.status in ("queued", "running")
    assert await images_spent(runtime, MIA) == 0
    told = await notices(runtime)
    assert told[waiting.job_id] == (
        "Your images “[rex] on the beach” were cancelled: alice stopped sharing rex with you. "
        "What they took from your quota is given back."
    )
    assert set(told) == {waiting.job_id, running.job_id}


async def test_unsharing_one_user_keeps_the_jobs_they_still_may_draw_through_everyone(
    runtime: BotRuntime,
) -> None:
    await alice_shares_rex(runtime)
    await runtime.core.sharing.share(ALICE, "rex", EVERYONE)
    receipt = await runtime.core.imagine(MIA, DEST, "[rex] on the beach", count=1)

    said = await runtime.core.sharing.unshare(ALICE, "rex", MIA.user_id)

    assert said.startswith("Stopped sharing rex with mia. It is still shared with everyone")
    assert "stopped" not in said.split(".", 1)[1]
    job = await runtime.store.get_job(receipt.job_id)
    assert job is not None and job.status == "queued"


async def test_forgetting_a_shared_subject_stops_every_job_drawing_it_and_refunds_each_drawer(
    runtime: BotRuntime,
) -> None:
    await alice_shares_rex(runtime, EVERYONE)
    await ready_subject(runtime, MIA, "luna", "pfx")
    # rex second in the prompt: the job's own subject column names luna.
    mias = await runtime.core.imagine(MIA, DEST, "[luna] and [rex] in a park", count=2)
    bobs = await runtime.core.showcase(BOB, DEST, "rex")
    alices = await runtime.core.imagine(ALICE, DEST, "a [V] at home", count=1)
    other = await runtime.core.imagine(MIA, DEST, "[luna] alone", count=1)

    said = await runtime.core.forget(ALICE, "rex")

    assert said.startswith(
        "Forgot rex: its photos and adapter are deleted. 3 image jobs drawing it were stopped, "
        "and the quota they took is given back. It is no longer shared with everyone here."
    )
    for receipt in (mias, bobs, alices):
        job = await runtime.store.get_job(receipt.job_id)
        assert job is not None and job.status == "cancelled"
    job = await runtime.store.get_job(other.job_id)
    assert job is not None and job.status == "queued"
    assert await images_spent(runtime, MIA) == 1  # [luna] alone
    assert await images_spent(runtime, BOB) == 0
    assert await images_spent(runtime, ALICE) == 0
    told = await notices(runtime)
    assert told[mias.job_id] == (
        "Your images “[luna] and [rex] in a park” were cancelled: rex was deleted by its "
        "owner. What they took from your quota is given back."
    )
    assert told[bobs.job_id] == (
        "Your showcase of rex was cancelled: rex was deleted by its owner. What it took from "
        "your quota is given back."
    )
    assert told[alices.job_id] == (
        "Your image “a [V] at home” was cancelled: you deleted rex with /forget. What it "
        "took from your quota is given back."
    )


async def test_a_moderators_deletion_stops_the_jobs_drawing_the_subject_too(
    runtime: BotRuntime,
) -> None:
    await alice_shares_rex(runtime)
    receipt = await runtime.core.imagine(MIA, DEST, "[rex] on the beach", count=1)
    await runtime.store.start_job(receipt.job_id)

    said = await moderator(runtime).delete_subject(ALICE.user_id, "rex")

    assert said == (
        "Deleted alice's subject rex, its photos and its adapter. Stopped 1 image job "
        "drawing it; its owner was told."
    )
    job = await runtime.store.get_job(receipt.job_id)
    assert job is not None and job.status == "cancelled"
    assert (await notices(runtime))[receipt.job_id] == (
        "Your image “[rex] on the beach” was cancelled: a moderator deleted rex. What it took "
        "from your quota is given back."
    )
    assert await images_spent(runtime, MIA) == 0


async def test_a_ban_of_the_owner_stops_their_jobs_but_not_the_drawings_of_those_they_shared_with(
    runtime: BotRuntime,
) -> None:
    await alice_shares_rex(runtime)
    mias = await runtime.core.imagine(MIA, DEST, "[rex] on the beach", count=1)
    alices = await runtime.core.imagine(ALICE, DEST, "[rex] at home", count=1)

    said = await moderator(runtime).ban(ALICE.user_id, "spam")

    assert said.endswith("Cancelled 1 of their job(s).")
    job = await runtime.store.get_job(alices.job_id)
    assert job is not None and job.status == "cancelled"
    job = await runtime.store.get_job(mias.job_id)
    assert job is not None and job.status == "queued"
    # Mia is not banned: she draws and redraws rex as before (a moderator who wants rex
    # gone deletes it: see above).
    await finish(runtime, mias.job_id, count=1)
    again = await runtime.core.reimagine(MIA, DEST, mias.job_id)
    assert (await queued_request(runtime, again.job_id)).prompt == "zqv dog on the beach"
    with pytest.raises(UserError, match="You're banned"):
        await runtime.core.sharing.unshare(ALICE, "rex")


# Names: own, shared, tokens.


async def test_own_rex_comes_first_the_shared_one_goes_by_its_token_everywhere(
    runtime: BotRuntime,
) -> None:
    await alice_shares_rex(runtime, EVERYONE)
    await ready_subject(runtime, MIA, "rex", "bkt")

    assert await drawn(runtime, MIA, "[rex] and [zqv]") == "bkt dog and zqv dog"
    showcase = await runtime.core.showcase(MIA, DEST, "rex")
    info = await runtime.queue._get_job_def(showcase.job_id.encode(), None)
    assert info.args[0]["token"] == "bkt"
    shown = await runtime.core.showcase(MIA, DEST, "ZQV")
    info = await runtime.queue._get_job_def(shown.job_id.encode(), None)
    assert info.args[0]["token"] == "zqv"
    lines = (await runtime.core.subjects_text(MIA)).splitlines()
    assert lines[1].startswith("  rex: dog, ready, 3 photos, since ")
    assert lines[1].endswith("← [V] (your newest ready one)")
    assert lines[-2:] == [
        "Shared with you (write them as shown):",
        "  [zqv]  rex: dog, ready, by alice",
    ]
    # Alice's own list says whom hers is shared with; Mia's rex is not hers to see.
    alices = (await runtime.core.subjects_text(ALICE)).splitlines()
    assert alices[1].endswith(" · shared with everyone here")
    assert "Shared with you" not in "\n".join(alices)


async def test_retraining_a_failed_shared_subject_says_its_sharing_ended(
    runtime: BotRuntime,
) -> None:
    await runtime.core.train(ALICE, DEST, "rex", "dog", _photos(3))
    await runtime.core.sharing.share(ALICE, "rex", MIA.user_id)
    await runtime.core.cancel(ALICE, "rex")
    with pytest.raises(UserError, match="rex, shared with you by alice, failed to train"):
        await runtime.core.imagine(MIA, DEST, "[rex] on the beach")
    other_photos = [Upload(f"q{i}.jpg", make_photo(i + 10)) for i in range(3)]

    again = await runtime.core.train(ALICE, DEST, "rex", "dog", other_photos)

    # Training the failed name again replaces the subject, and its sharing ends with it:
    # Alice is told, or she would believe Mia can draw the new rex.
    assert (
        "I'll post progress here. The rex you replaced was shared with mia; this one isn't "
        "yet: `/share rex …` shares it again." in again.text
    )
    assert await runtime.store.subjects_shared_with(MIA) == []


# /use with the rest.


async def test_v_after_the_chosen_subject_is_forgotten_or_deleted_by_a_moderator(
    runtime: BotRuntime,
) -> None:
    await ready_subject(runtime, MIA, "rex", "bkt")
    await ready_subject(runtime, MIA, "luna", "pfx")
    await ready_subject(runtime, MIA, "kit", "gmx")
    await alice_shares_rex(runtime)
    await runtime.core.use(MIA, "rex")
    assert await drawn(runtime, MIA, "a [V]") == "a bkt dog"

    await moderator(runtime).delete_subject(MIA.user_id, "rex")

    # [V] is her newest ready one again, never the shared rex.
    assert await drawn(runtime, MIA, "a [V] and [rex]") == "a gmx dog and zqv dog"
    lines = (await runtime.core.subjects_text(MIA)).splitlines()
    assert lines[1].startswith("  kit:") and lines[1].endswith("← [V] (your newest ready one)")
    assert "  [rex]  rex: dog, ready, by alice" in lines
    await runtime.core.use(MIA, "luna")
    said = await runtime.core.forget(MIA, "luna")
    assert said.endswith("It was your [V]; [V] is now your newest ready subject, kit.")


async def test_v_stays_the_chosen_subject_while_a_failed_name_is_trained_again(
    runtime: BotRuntime,
) -> None:
    await ready_subject(runtime, MIA, "luna", "pfx")
    await runtime.core.use(MIA, "luna")
    await runtime.core.train(MIA, DEST, "rex", "dog", _photos(3))
    await runtime.core.cancel(MIA, "rex")  # rex is failed now
    with pytest.raises(UserError, match=r"rex failed to train, so it can't be \[V\]"):
        await runtime.core.use(MIA, "rex")

    await runtime.core.train(MIA, DEST, "rex", "dog", _photos(3))

    lines = (await runtime.core.subjects_text(MIA)).splitlines()
    assert lines[1].startswith("  rex: dog, queued, 3 photos")
    assert lines[2].endswith("← [V] (chosen with /use)")
    assert await drawn(runtime, MIA, "a [V]") == "a pfx dog"


async def test_use_and_shares_stay_in_their_workspace(runtime: BotRuntime) -> None:
    await alice_shares_rex(runtime)
    await ready_subject(runtime, MIA, "luna", "pfx")
    await ready_subject(runtime, MIA, "kit", "gmx")
    await ready_subject(runtime, MIA_ELSEWHERE, "luna", "pfq")
    await ready_subject(runtime, MIA_ELSEWHERE, "kit", "gmq")

    await runtime.core.use(MIA, "luna")
    await runtime.core.sharing.share(MIA_ELSEWHERE, "kit", EVERYONE)

    assert await drawn(runtime, MIA, "a [V] with [rex]") == "a pfx dog with zqv dog"
    assert await drawn(runtime, MIA_ELSEWHERE, "a [V]") == "a gmq dog"
    with pytest.raises(UserError, match="no subject called `rex`"):
        await runtime.core.imagine(MIA_ELSEWHERE, DEST, "[rex]")
    with pytest.raises(UserError, match="no subject called `zqv`"):
        await runtime.core.imagine(MIA_ELSEWHERE, DEST, "[zqv]")
    # Mia's kit here is not the one she shared there.
    assert await runtime.store.subject_shares(MIA) == {}
    assert "shared with" not in await runtime.core.subjects_text(MIA)
    with pytest.raises(UserError, match="no subject called `rex`"):
        await runtime.core.use(MIA_ELSEWHERE, "rex")
    assert await runtime.store.chosen_subject_id(MIA_ELSEWHERE) is None


# Redo buttons with cancels, failures and /jobs.


async def test_a_moderators_cancel_of_a_reroll_frees_the_button_at_once(
    runtime: BotRuntime,
) -> None:
    await alice_shares_rex(runtime)
    first = await runtime.core.imagine(MIA, DEST, "[rex] on the beach", count=2)
    await finish(runtime, first.job_id)
    reroll = await runtime.core.reimagine(MIA, DEST, first.job_id)

    said = await moderator(runtime).cancel(reroll.job_id[:8], "queue is full")

    assert said.endswith("They were told.")
    assert (await notices(runtime))[reroll.job_id] == (
        "Your images “[rex] on the beach” were cancelled by a moderator: queue is full."
    )
    again = await runtime.core.reimagine(MIA, DEST, first.job_id)
    assert again.job_id != reroll.job_id
    assert await images_spent(runtime, MIA) == 4  # the first and the new reroll


async def test_a_reroll_whose_job_failed_is_refunded_to_the_drawer_and_works_again(
    runtime: BotRuntime,
) -> None:
    await alice_shares_rex(runtime)
    first = await runtime.core.imagine(MIA, DEST, "[rex] on the beach", count=2)
    await finish(runtime, first.job_id)
    reroll = await runtime.core.reimagine(MIA, DEST, first.job_id, upscale=True, index=1)
    assert await images_spent(runtime, MIA) == 3

    sink = RecordingSink()
    failure = Failure(job_id=reroll.job_id, message="the GPU ran out of memory")
    await Deliverer(runtime.core, sink).failure(failure.model_dump())

    assert sink.failures[reroll.job_id] == (
        "Your image could not be drawn: the GPU ran out of memory"
    )
    assert await images_spent(runtime, MIA) == 2  # back to the drawer
    assert await images_spent(runtime, ALICE) == 0  # the owner never paid
    again = await runtime.core.reimagine(MIA, DEST, first.job_id, upscale=True, index=1)
    assert again.job_id != reroll.job_id


async def test_a_reroll_job_shows_the_prompt_as_typed_in_jobs_cancel_and_its_result(
    runtime: BotRuntime,
) -> None:
    await alice_shares_rex(runtime)
    first = await runtime.core.imagine(MIA, DEST, "[rex] on the beach", count=2)
    await finish(runtime, first.job_id)
    reroll = await runtime.core.reimagine(MIA, DEST, first.job_id)

    jobs = await runtime.core.jobs_text(MIA)

    # As she typed it, not with the token the redo keeps drawing by.
    assert f"  {reroll.job_id[:8]}  images “[rex] on the beach”  waiting #1" in jobs
    cancelled = await runtime.core.cancel(MIA, reroll.job_id[:6])
    assert cancelled.text.startswith(
        f"Cancelled your images “[rex] on the beach” (job {reroll.job_id[:8]})"
    )
    assert await images_spent(runtime, MIA) == 2
    vary = await runtime.core.reimagine(MIA, DEST, first.job_id, vary=True)
    [delivery] = (await finish(runtime, vary.job_id)).results.values()
    assert delivery.text.startswith("“[rex] on the beach” · variations of image 1 · seed 5")
    # Once she has a rex of her own, a redo shows Alice's by its token, as she must write it;
    # and a redo of the redo still draws Alice's rex.
    await ready_subject(runtime, MIA, "rex", "bkt")
    third = await runtime.core.reimagine(MIA, DEST, vary.job_id)
    assert (await queued_request(runtime, third.job_id)).prompt == "zqv dog on the beach"
    job = await runtime.store.get_job(third.job_id)
    assert job is not None and job.prompt == "[zqv] on the beach"


async def test_a_cancelled_reroll_can_be_pressed_again_and_a_second_press_points_at_the_new_job(
    runtime: BotRuntime,
) -> None:
    first = await runtime.core.imagine(MIA, DEST, "a red fox", count=1)
    await finish(runtime, first.job_id, count=1)
    reroll = await runtime.core.reimagine(MIA, DEST, first.job_id)
    await runtime.core.cancel(MIA)

    again = await runtime.core.reimagine(MIA, DEST, first.job_id)
    with pytest.raises(UserError, match=f"job {again.job_id[:8]} is waiting in the queue"):
        await runtime.core.reimagine(MIA, DEST, first.job_id)

    assert again.job_id != reroll.job_id
    assert await images_spent(runtime, MIA) == 2


# Sharing both ways, and models.


async def test_two_users_sharing_with_each_other_draw_both_in_one_prompt_on_the_drawers_quota(
    runtime: BotRuntime,
) -> None:
    await alice_shares_rex(runtime)
    luna = await ready_subject(runtime, MIA, "luna", "pfx")
    await runtime.core.sharing.share(MIA, "luna", ALICE.user_id)

    mias = await runtime.core.imagine(MIA, DEST, "[luna] and [rex] on a sofa", count=3)
    alices = await runtime.core.imagine(ALICE, DEST, "[rex] and [luna] on a sofa", count=1)

    assert [a.token for a in (await queued_request(runtime, mias.job_id)).adapters] == [
        "pfx",
        "zqv",
    ]
    assert [a.token for a in (await queued_request(runtime, alices.job_id)).adapters] == [
        "zqv",
        "pfx",
    ]
    assert (await images_spent(runtime, MIA), await images_spent(runtime, ALICE)) == (3, 1)
    # Neither may redraw the other's images (each draws a subject of the other's).
    await finish(runtime, mias.job_id, count=3)
    with pytest.raises(UserError, match="Only mia can reroll these images"):
        await runtime.core.reimagine(ALICE, DEST, mias.job_id)
    # A subject of another base model can't join them.
    configure_second_model(runtime.settings, "xl")
    kit = await ready_subject(runtime, BOB, "kit", "gmx")
    await runtime.store.update_subject(kit.id, base_model="xl")
    await runtime.core.sharing.share(BOB, "kit", EVERYONE)
    with pytest.raises(UserError) as refused:
        await runtime.core.imagine(MIA, DEST, "[luna] and [kit]")
    assert refused.value.message == (
        f"Those subjects were trained on different base models (luna ({luna.base_model}), "
        "kit (xl)), so one image can't hold them all. Nothing was queued."
    )


async def test_a_banned_user_pressing_a_redo_button_is_told_of_the_ban_first(
    runtime: BotRuntime,
) -> None:
    await alice_shares_rex(runtime)
    mias = await runtime.core.imagine(MIA, DEST, "[rex] on the beach", count=1)
    await finish(runtime, mias.job_id, count=1)
    await runtime.core.sharing.unshare(ALICE, "rex")
    await moderator(runtime).ban(MIA.user_id, "spam")

    with pytest.raises(UserError, match="You're banned from using dreambot here"):
        await runtime.core.reimagine(MIA, DEST, mias.job_id)
