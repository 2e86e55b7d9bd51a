"""The hints in replies (what to type next) as each platform types the command: the shell's
``/unshare rex``, Slack's ``/dreambot unshare rex``, Discord's ``/unshare subject:rex``."""

from __future__ import annotations

import pytest

from bot.adapters.slack import SYNTAX as SLACK_SYNTAX
from bot.core.errors import UserError
from bot.core.store import EVERYONE, Owner
from bot.core.syntax import DISCORD_SYNTAX, TEXT_SYNTAX, CommandSyntax, train_example
from bot.launcher import BotRuntime
from tests.conftest import ready_subject
from tests.test_commands import _photos

DEST = {"channel": "c1"}
SLACK_LIKE = CommandSyntax(prefix="/dreambot ", own_commands=frozenset({"train", "forget"}))


def test_each_platform_types_a_command_with_arguments_its_own_way() -> None:
    args = (("subject", "rex"), ("everyone", True))
    assert TEXT_SYNTAX.hint("unshare", *args) == "/unshare rex everyone"
    assert SLACK_LIKE.hint("unshare", *args) == "/dreambot unshare rex everyone"
    assert DISCORD_SYNTAX.hint("unshare", *args) == "/unshare subject:rex everyone:True"
    train = (("name", "rex"), ("class", "dog"), "…")
    assert SLACK_LIKE.hint("train", *train) == "/train rex dog …"  # a slash command of its own
    assert DISCORD_SYNTAX.hint("train", *train) == "/train name:rex class:dog …"


async def test_on_discord_the_hints_name_the_commands_options(
    runtime: BotRuntime, owner: Owner
) -> None:
    runtime.core.syntax = DISCORD_SYNTAX  # as Discord's adapter sets it
    sharing = runtime.core.sharing
    await ready_subject(runtime, owner, "mia", "bkt")
    await runtime.core.use(owner, "mia")
    rex = await ready_subject(runtime, owner, "rex", "zqv")

    shared = await sharing.share(owner, "rex", "user-2")
    assert shared.endswith("`/unshare subject:rex` stops sharing it.")
    await sharing.share(owner, "rex", EVERYONE)
    unshared = await sharing.unshare(owner, "rex", "user-2")
    assert "`/unshare subject:rex everyone:True` stops that." in unshared
    with pytest.raises(UserError) as taken:
        await runtime.core.check_new_subject(owner, "rex", "dog")
    assert "or `/forget name:rex` first." in taken.value.message
    ready = await runtime.core.ready_text(rex, "60 steps in 0:31")
    assert ready.endswith("`/use subject:rex` to draw rex as [V].")
    await runtime.store.update_subject(rex.id, status="training")
    with pytest.raises(UserError) as training:
        await runtime.core.use(owner, "rex")
    assert "`/use subject:rex` works once it is ready." in training.value.message
    await runtime.store.update_subject(rex.id, status="failed")
    with pytest.raises(UserError) as failed:
        await sharing.share(owner, "rex", EVERYONE)
    assert "(`/train name:rex class:dog …`)" in failed.value.message

    await runtime.core.train(owner, DEST, "kit", "cat", _photos(3))
    cancelled = await runtime.core.cancel(owner, "kit")
    assert cancelled.text.endswith(
        "`/train name:kit` again (with other photos or another class) replaces it, or "
        "`/forget name:kit` deletes it."
    )


def test_the_first_training_is_suggested_with_each_platforms_options() -> None:
    assert train_example(TEXT_SYNTAX) == "/train <name> <class> <photos…>"
    assert train_example(SLACK_SYNTAX) == "/train <name> <class> <photos…>"
    assert train_example(DISCORD_SYNTAX) == (
        "/train name:<name> class:<class> photo1:… photo2:… photo3:…"
    )


async def test_on_discord_the_train_imagine_and_cancel_hints_name_their_options(
    runtime: BotRuntime, owner: Owner
) -> None:
    runtime.core.syntax = DISCORD_SYNTAX  # as Discord's adapter sets it
    train = "`/train name:<name> class:<class> photo1:… photo2:… photo3:…`"
    assert await runtime.core.subjects_text(owner) == (
        f"You have no subjects yet. Train one: {train}."
    )
    with pytest.raises(UserError) as no_subject:
        await runtime.core.imagine(owner, DEST, "a [V] on the beach", count=1)
    assert no_subject.value.message.endswith(f"Train one first: {train}.")
    with pytest.raises(UserError) as empty:
        await runtime.core.imagine(owner, DEST, "   ", count=1)
    assert empty.value.message == (
        "Tell me what to draw, e.g. `/imagine prompt:a [V] dog on the beach`."
    )

    rex = await ready_subject(runtime, owner, "rex", "zqv")
    used = await runtime.core.use(owner, "rex")
    assert "`/imagine prompt:a [V] on the beach` draws it." in used
    ready = await runtime.core.ready_text(rex, "60 steps in 0:31")
    assert ready == "rex is ready — try /imagine prompt:a [V] dog on the beach  (60 steps in 0:31)"

    await runtime.core.imagine(owner, DEST, "a [V] on the beach", count=1)
    assert (await runtime.core.jobs_text(owner)).endswith(
        "Cancel one with /cancel target:<id> (a training also by its subject's name); "
        "/cancel alone cancels the newest."
    )
    with pytest.raises(UserError) as unknown:
        await runtime.core.cancel(owner, "fido")
    assert unknown.value.message.endswith("the first 4 characters of a job id from /jobs.")


async def test_on_slack_the_train_and_imagine_hints_are_their_own_slash_commands(
    runtime: BotRuntime, owner: Owner
) -> None:
    runtime.core.syntax = SLACK_SYNTAX  # as Slack's adapter sets it
    assert await runtime.core.subjects_text(owner) == (
        "You have no subjects yet. Train one: `/train <name> <class> <photos…>`."
    )
    with pytest.raises(UserError) as empty:
        await runtime.core.imagine(owner, DEST, "   ", count=1)
    assert empty.value.message == "Tell me what to draw, e.g. `/imagine a [V] dog on the beach`."

    rex = await ready_subject(runtime, owner, "rex", "zqv")
    used = await runtime.core.use(owner, "rex")
    assert "`/imagine a [V] on the beach` draws it." in used
    assert used.endswith("`/dreambot use` alone goes back to your newest ready subject.")
    ready = await runtime.core.ready_text(rex, "60 steps in 0:31")
    assert ready == "rex is ready — try /imagine a [V] dog on the beach  (60 steps in 0:31)"
