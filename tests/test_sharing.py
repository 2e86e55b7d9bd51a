"""Sharing subjects on purpose (/share, /unshare) and drawing shared subjects, on the real core
(SQLite + Redis), without the engine."""

from __future__ import annotations

import pytest

from bot.core.errors import UserError
from bot.core.moderation import Moderation
from bot.core.store import EVERYONE, Owner, Subject
from bot.launcher import BotRuntime
from engine.api import GenerateRequest, ShowcaseRequest
from tests.conftest import TEST_PLATFORM, configure_second_model, ready_subject

DEST = {"channel": "c1"}
MIA = Owner(TEST_PLATFORM, "guild-1", "mia")
BOB = Owner(TEST_PLATFORM, "guild-1", "bob")
ELSEWHERE = Owner(TEST_PLATFORM, "guild-2", "mia")
"""The same user id in another workspace of the same platform (Discord ids are global)."""


async def queued_request(runtime: BotRuntime, job_id: str) -> GenerateRequest:
    """The generation request queued for ``job_id``."""
    info = await runtime.queue._get_job_def(job_id.encode(), None)
    return GenerateRequest.model_validate(info.args[0])


async def share_count(runtime: BotRuntime) -> int:
    async with runtime.store.db.execute("SELECT count(*) FROM subject_shares") as cur:
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def test_a_shared_subject_is_drawn_with_the_owners_adapter_on_the_callers_quota(
    runtime: BotRuntime, owner: Owner
) -> None:
    rex = await ready_subject(runtime, owner, "rex", "zqv")
    reply = await runtime.core.sharing.share(owner, "rex", MIA.user_id)
    assert reply.startswith("Shared rex (dog) with mia: they can draw it as [rex]")

    receipt = await runtime.core.imagine(MIA, DEST, "[rex] on the beach", count=2)

    request = await queued_request(runtime, receipt.job_id)
    assert request.prompt == "zqv dog on the beach"
    [adapter] = request.adapters
    assert (adapter.name, adapter.url, adapter.token) == (rex.id, rex.adapter_url, "zqv")
    job = await runtime.store.get_job(receipt.job_id)
    assert job is not None and job.owner == MIA and job.subject_id == rex.id
    # The caller pays, not the owner.
    assert (await runtime.store.usage(MIA)).images == 2
    assert (await runtime.store.usage(owner)).images == 0


async def test_a_subject_nobody_shared_stays_private(runtime: BotRuntime, owner: Owner) -> None:
    await ready_subject(runtime, owner, "rex", "zqv")
    await runtime.core.sharing.share(owner, "rex", BOB.user_id)

    for ref in ("rex", "zqv"):
        with pytest.raises(UserError, match=f"You have no subject called `{ref}`"):
            await runtime.core.imagine(MIA, DEST, f"[{ref}] on the beach")
    with pytest.raises(UserError, match="no subject called `rex`"):
        await runtime.core.showcase(MIA, DEST, "rex")


async def test_the_callers_own_subject_comes_before_a_shared_one_of_that_name(
    runtime: BotRuntime, owner: Owner
) -> None:
    await ready_subject(runtime, owner, "rex", "zqv")
    await runtime.core.sharing.share(owner, "rex", EVERYONE)
    mine = await ready_subject(runtime, MIA, "rex", "bkt")

    receipt = await runtime.core.imagine(MIA, DEST, "[rex] and [zqv] in a park")

    request = await queued_request(runtime, receipt.job_id)
    # [rex] is her own; the shared one is written with its token.
    assert request.prompt == "bkt dog and zqv dog in a park"
    assert [a.token for a in request.adapters] == ["bkt", "zqv"]
    assert (await runtime.store.find_subject(MIA, "rex")) == mine


async def test_two_shared_subjects_of_one_name_are_listed_and_their_tokens_tell_them_apart(
    runtime: BotRuntime, owner: Owner
) -> None:
    await ready_subject(runtime, owner, "rex", "zqv")
    await ready_subject(runtime, BOB, "rex", "bkt")
    await runtime.core.sharing.share(owner, "rex", MIA.user_id)
    await runtime.core.sharing.share(BOB, "rex", EVERYONE)

    with pytest.raises(UserError) as refused:
        await runtime.core.imagine(MIA, DEST, "[rex] on a sofa")
    message = refused.value.message
    assert message.startswith("2 subjects shared with you are called rex: ")
    assert "[bkt] (bob's dog)" in message and "[zqv] (user-1's dog)" in message
    assert "Write the token of the one you mean" in message
    assert await runtime.store.unfinished_jobs(TEST_PLATFORM) == []

    receipt = await runtime.core.imagine(MIA, DEST, "[BKT] on a sofa")
    assert (await queued_request(runtime, receipt.job_id)).prompt == "bkt dog on a sofa"


async def test_everyone_means_everyone_in_that_workspace_only(
    runtime: BotRuntime, owner: Owner
) -> None:
    await ready_subject(runtime, owner, "rex", "zqv")
    reply = await runtime.core.sharing.share(owner, "rex", EVERYONE)
    assert reply.startswith("Shared rex (dog) with everyone here: anyone here can draw it")

    for user in (MIA, BOB):
        await runtime.core.imagine(user, DEST, "[rex] in the snow")
    # The same user id in another workspace sees nothing, by name or by token.
    for ref in ("rex", "zqv"):
        with pytest.raises(UserError, match=f"no subject called `{ref}`"):
            await runtime.core.imagine(ELSEWHERE, DEST, f"[{ref}] in the snow")
    assert "Shared with you" not in await runtime.core.subjects_text(ELSEWHERE)
    assert await runtime.store.subjects_shared_with(ELSEWHERE) == []


async def test_only_the_owner_shares_and_unshares(runtime: BotRuntime, owner: Owner) -> None:
    await ready_subject(runtime, owner, "rex", "zqv")
    await runtime.core.sharing.share(owner, "rex", MIA.user_id)

    for call in (
        runtime.core.sharing.share(MIA, "rex", BOB.user_id),
        runtime.core.sharing.unshare(MIA, "rex"),
    ):
        with pytest.raises(UserError, match="belongs to user-1: only its owner can share it"):
            await call
    with pytest.raises(UserError, match="You have no subject called `rex`"):
        await runtime.core.sharing.share(BOB, "rex", EVERYONE)
    assert await runtime.store.subject_shares(owner) == {"id-rex-zqv": ["mia"]}


async def test_sharing_again_changes_nothing_and_says_so(runtime: BotRuntime, owner: Owner) -> None:
    await ready_subject(runtime, owner, "rex", "zqv")
    await runtime.core.sharing.share(owner, "rex", MIA.user_id)

    assert await runtime.core.sharing.share(owner, "REX", MIA.user_id) == (
        "rex is already shared with mia; nothing changed."
    )
    assert await share_count(runtime) == 1


async def test_unshare_stops_one_user_or_everyone_and_says_who_can_still_draw_it(
    runtime: BotRuntime, owner: Owner
) -> None:
    await ready_subject(runtime, owner, "rex", "zqv")
    sharing = runtime.core.sharing
    await sharing.share(owner, "rex", MIA.user_id)
    await sharing.share(owner, "rex", EVERYONE)
    assert "(It is shared with everyone here as well.)" in await sharing.share(
        owner, "rex", BOB.user_id
    )

    said = await sharing.unshare(owner, "rex", MIA.user_id)
    assert said.startswith("Stopped sharing rex with mia. It is still shared with everyone here")
    assert "`/unshare rex everyone` stops that" in said
    await runtime.core.imagine(MIA, DEST, "[rex]")  # through "everyone"
    assert await sharing.unshare(owner, "rex", MIA.user_id) == (
        "rex isn't shared with mia (it is shared with bob and everyone here); nothing changed."
    )

    # Mia's image through "everyone" is stopped: only its owner can draw rex now.
    assert await sharing.unshare(owner, "rex") == (
        "Stopped sharing rex (it was shared with bob and everyone here). Only you can draw it "
        "now. 1 image job drawing it was stopped, and the quota it took is given back."
    )
    assert await sharing.unshare(owner, "rex") == "rex isn't shared with anyone; nothing changed."
    with pytest.raises(UserError, match="no subject called `rex`"):
        await runtime.core.imagine(BOB, DEST, "[rex]")


async def test_forget_ends_the_sharing(runtime: BotRuntime, owner: Owner) -> None:
    await ready_subject(runtime, owner, "rex", "zqv")
    await runtime.core.sharing.share(owner, "rex", MIA.user_id)
    await runtime.core.sharing.share(owner, "rex", EVERYONE)

    said = await runtime.core.forget(owner, "rex")

    assert "It is no longer shared with mia and everyone here." in said
    assert await share_count(runtime) == 0  # ON DELETE CASCADE
    with pytest.raises(UserError, match="no subject called `rex`"):
        await runtime.core.imagine(MIA, DEST, "[rex]")


async def test_a_moderators_deletion_ends_the_sharing_too(
    runtime: BotRuntime, owner: Owner
) -> None:
    await ready_subject(runtime, owner, "rex", "zqv")
    await runtime.core.sharing.share(owner, "rex", EVERYONE)
    moderation: Moderation = runtime.core.moderation

    await moderation.acting(BOB, True).delete_subject(owner.user_id, "rex")

    assert await share_count(runtime) == 0


async def test_a_shared_subject_still_training_says_so(runtime: BotRuntime, owner: Owner) -> None:
    rex = await ready_subject(runtime, owner, "rex", "zqv")
    await runtime.store.update_subject(rex.id, status="training")
    reply = await runtime.core.sharing.share(owner, "rex", MIA.user_id)
    assert "It is still training; it can be drawn once it is ready." in reply

    with pytest.raises(UserError, match="rex, shared with you by user-1, is still training"):
        await runtime.core.imagine(MIA, DEST, "[rex] on the beach")
    with pytest.raises(UserError, match="is still training"):
        await runtime.core.showcase(MIA, DEST, "rex")


async def test_a_failed_subject_cannot_be_shared_nor_with_yourself(
    runtime: BotRuntime, owner: Owner
) -> None:
    rex = await ready_subject(runtime, owner, "rex", "zqv")
    with pytest.raises(UserError, match="That's you"):
        await runtime.core.sharing.share(owner, "rex", owner.user_id)
    await runtime.store.update_subject(rex.id, status="failed")
    with pytest.raises(UserError, match="rex failed to train, so there is nothing to share"):
        await runtime.core.sharing.share(owner, "rex", EVERYONE)
    assert await share_count(runtime) == 0


async def test_a_banned_owner_cannot_share(runtime: BotRuntime, owner: Owner) -> None:
    await ready_subject(runtime, owner, "rex", "zqv")
    await runtime.core.moderation.acting(BOB, True).ban(owner.user_id, "spam")

    with pytest.raises(UserError, match="You're banned"):
        await runtime.core.sharing.share(owner, "rex", EVERYONE)


async def test_v_stays_the_callers_own_subject(runtime: BotRuntime, owner: Owner) -> None:
    await ready_subject(runtime, owner, "rex", "zqv")
    await runtime.core.sharing.share(owner, "rex", EVERYONE)

    with pytest.raises(UserError, match="you have none yet"):
        await runtime.core.imagine(MIA, DEST, "a [V] dog")
    with pytest.raises(UserError, match="you have none yet"):
        await runtime.core.showcase(MIA, DEST)


async def test_an_unknown_name_also_lists_the_subjects_shared_with_the_caller(
    runtime: BotRuntime, owner: Owner
) -> None:
    await ready_subject(runtime, owner, "rex", "zqv")
    await ready_subject(runtime, BOB, "rex", "bkt")
    await ready_subject(runtime, MIA, "luna", "pfx")
    await runtime.core.sharing.share(owner, "rex", EVERYONE)
    await runtime.core.sharing.share(BOB, "rex", MIA.user_id)

    with pytest.raises(UserError) as refused:
        await runtime.core.imagine(MIA, DEST, "[fido] in the snow")

    assert refused.value.message == (
        "You have no subject called `fido`. Your subjects: luna. "
        "Shared with you: [bkt] by bob, [zqv] by user-1."
    )


async def test_own_and_shared_subjects_mix_in_one_prompt_unless_their_models_differ(
    runtime: BotRuntime, owner: Owner
) -> None:
    await ready_subject(runtime, owner, "rex", "zqv")
    await runtime.core.sharing.share(owner, "rex", MIA.user_id)
    await ready_subject(runtime, MIA, "luna", "pfx")

    receipt = await runtime.core.imagine(MIA, DEST, "[luna] and [rex] on a sofa")
    request = await queued_request(runtime, receipt.job_id)
    assert [a.token for a in request.adapters] == ["pfx", "zqv"]

    configure_second_model(runtime.settings, "xl")
    xl = await ready_subject(runtime, BOB, "kit", "gmx")
    await runtime.store.update_subject(xl.id, base_model="xl")
    await runtime.core.sharing.share(BOB, "kit", EVERYONE)
    with pytest.raises(UserError, match="trained on different base models"):
        await runtime.core.imagine(MIA, DEST, "[luna] and [kit] on a sofa")


async def test_showcase_of_a_shared_subject_uses_its_adapter_and_the_callers_quota(
    runtime: BotRuntime, owner: Owner
) -> None:
    rex = await ready_subject(runtime, owner, "rex", "zqv")
    await runtime.core.sharing.share(owner, "rex", EVERYONE)

    receipt = await runtime.core.showcase(MIA, DEST, "rex")

    info = await runtime.queue._get_job_def(receipt.job_id.encode(), None)
    request = ShowcaseRequest.model_validate(info.args[0])
    assert (request.subject.url, request.token) == (rex.adapter_url, "zqv")
    assert (await runtime.store.usage(MIA)).images == 10
    assert (await runtime.store.usage(owner)).images == 0


async def test_a_reroll_of_a_shared_subject_keeps_drawing_that_subject(
    runtime: BotRuntime, owner: Owner
) -> None:
    await ready_subject(runtime, owner, "rex", "zqv")
    await runtime.core.sharing.share(owner, "rex", MIA.user_id)
    first = await runtime.core.imagine(MIA, DEST, "[rex] on the beach", count=1)
    job = await runtime.store.get_job(first.job_id)
    assert job is not None and job.options["prompt"] == "[zqv] on the beach"
    # She trains a subject of that name afterwards: her Reroll still draws the shared one.
    await ready_subject(runtime, MIA, "rex", "bkt")

    again = await runtime.core.reimagine(MIA, DEST, first.job_id)

    assert (await queued_request(runtime, again.job_id)).prompt == "zqv dog on the beach"
    # Someone else still can't redraw an image of a subject (as before sharing).
    with pytest.raises(UserError, match="Only mia can reroll"):
        await runtime.core.reimagine(BOB, DEST, first.job_id)


async def test_subjects_lists_whom_yours_are_shared_with_and_what_is_shared_with_you(
    runtime: BotRuntime, owner: Owner
) -> None:
    await ready_subject(runtime, owner, "rex", "zqv")
    await ready_subject(runtime, owner, "fido", "gmx")
    await ready_subject(runtime, BOB, "rex", "bkt")
    await ready_subject(runtime, BOB, "kit", "pfx")
    await runtime.core.sharing.share(owner, "rex", MIA.user_id)
    await runtime.core.sharing.share(owner, "rex", EVERYONE)
    await runtime.core.sharing.share(BOB, "rex", EVERYONE)
    await runtime.core.sharing.share(BOB, "kit", MIA.user_id)

    mine = (await runtime.core.subjects_text(owner)).splitlines()
    [rex_line] = [line for line in mine if line.startswith("  rex:")]
    assert rex_line.endswith(" · shared with mia and everyone here")
    [fido_line] = [line for line in mine if line.startswith("  fido:")]
    assert "shared" not in fido_line
    assert mine[-2:] == [
        "Shared with you (write them as shown):",
        "  [bkt]  rex: dog, ready, by bob",
    ]

    hers = (await runtime.core.subjects_text(MIA)).splitlines()
    assert hers == [
        "You have no subjects yet. Train one: `/train <name> <class> <photos…>`.",
        "Shared with you (write them as shown):",
        "  [kit]  kit: dog, ready, by bob",
        "  [bkt]  rex: dog, ready, by bob",
        "  [zqv]  rex: dog, ready, by user-1",
    ]


async def test_store_shares_by_workspace_and_subject(runtime: BotRuntime, owner: Owner) -> None:
    rex = await ready_subject(runtime, owner, "rex", "zqv")
    other: Subject = await ready_subject(runtime, ELSEWHERE, "rex", "zqx")
    assert await runtime.store.share_subject(rex.id, MIA.user_id)
    assert not await runtime.store.share_subject(rex.id, MIA.user_id)
    assert await runtime.store.share_subject(other.id, EVERYONE)

    assert await runtime.store.subjects_shared_with(MIA) == [rex]
    # ELSEWHERE's own subject is never "shared with" its owner.
    assert await runtime.store.subjects_shared_with(ELSEWHERE) == []
    assert await runtime.store.subject_shares(ELSEWHERE) == {other.id: [EVERYONE]}
    assert await runtime.store.unshare_subject(rex.id) == [MIA.user_id]
