"""The shell's /mod and /quota: parsed, answered, and refused for non-moderators."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.adapters.shell import ShellAdapter
from bot.launcher import BotRuntime, open_core
from tests.conftest import TEST_PLATFORM, make_settings, queued


async def _say(shell: ShellAdapter, line: str) -> str:
    out = shell.out
    assert isinstance(out, io.StringIO)
    out.seek(0)
    out.truncate()
    await shell.handle(line)
    return out.getvalue()


@pytest.fixture
def shell(runtime: BotRuntime) -> ShellAdapter:
    """The shell of user 'tester', a moderator by default (DREAMBOT_SHELL_MODERATORS unset)."""
    return ShellAdapter(runtime.core, "tester", out=io.StringIO())


async def test_mod_commands_parse_and_answer_in_the_shell(shell: ShellAdapter) -> None:
    assert "DREAMBOT_SHELL_MODERATORS" in await _say(shell, "/mod help")
    assert "Blocked as rule #1" in await _say(shell, "/mod block add evil clown")
    assert "evil clown" in await _say(shell, "/mod block list")
    assert "isn't allowed here" in await _say(shell, "/imagine an evil  c.l.o.w.n --count 1")
    assert "evil clown" in await _say(shell, "/mod blocked")
    assert "✗ The safe regex engine" in await _say(shell, r"/mod block add-regex (a)\1")

    reply = await _say(shell, "/mod ban bob posting spam 12h")
    assert "Banned bob until" in reply and ": posting spam." in reply
    assert "bob until" in await _say(shell, "/mod bans")
    assert "bob may use dreambot again" in await _say(shell, "/mod unban bob")
    assert "✗ `bob` isn't banned here." in await _say(shell, "/mod unban @bob")

    assert "Images per day for bob: now 7" in await _say(shell, "/mod quota set bob images 7")
    assert "images:    0 of 7" in await _say(shell, "/mod quota show bob")
    assert "Jobs at once for role 42: now 9" in await _say(shell, "/mod quota set role:42 jobs 9")
    assert "role 42: jobs at once 9" in await _say(shell, "/mod quota list")
    assert "✗ `lots` isn't a number" in await _say(shell, "/mod quota set bob images lots")

    assert "queued (position 1)" in await _say(shell, "/imagine a cat --count 1")
    assert "Image jobs: 1 waiting, 0 running." in await _say(shell, "/mod status")
    queue = await _say(shell, "/mod queue")
    assert "tester  waiting #1  image “a cat”" in queue
    job_id = queue.splitlines()[1].split()[0]
    assert "Cancelled job" in await _say(shell, f"/mod cancel {job_id} duplicate")
    assert "bob has no subjects" in await _say(shell, "/mod subjects bob")
    log = await _say(shell, "/mod log 50")
    for action in ("block-add", "ban bob", "unban bob", "quota-set bob", "cancel"):
        assert action in log
    assert "✗ Unknown /mod command `frobnicate`" in await _say(shell, "/mod frobnicate")


async def test_quota_in_the_shell_shows_usage_and_the_utc_reset(shell: ShellAdapter) -> None:
    await _say(shell, "/imagine a cat --count 2")
    reply = await _say(shell, "/quota")
    assert "images:    2 of 100" in reply
    assert "reset at 00:00 UTC (in " in reply


async def test_mod_quota_show_says_the_shell_cannot_see_roles_when_role_limits_exist(
    shell: ShellAdapter,
) -> None:
    # No role limits: roles could change nothing, so nothing is said about them.
    shown = await _say(shell, "/mod quota show bob")
    assert "images:    0 of 100" in shown and "roles" not in shown.lower()

    await _say(shell, "/mod quota set role:42 images 7")
    await _say(shell, "/mod quota set role:7 jobs 1")
    shown = await _say(shell, "/mod quota show bob")
    # The base limits are shown, but not passed off as bob's whole story.
    assert "images:    0 of 100" in shown
    assert (
        "Roles: I can't see bob's roles here, so role limits (role:42, role:7) are not "
        "counted above." in shown
    )


@pytest.fixture
async def strict_runtime(tmp_path: Path, redis_clean: str) -> AsyncIterator[BotRuntime]:
    """A core whose shell moderators are only 'alice'."""
    settings = make_settings(tmp_path / "data", redis_clean, shell_moderators="alice")
    async with open_core(settings, TEST_PLATFORM) as runtime:
        yield runtime


async def test_a_shell_user_not_listed_as_moderator_is_refused(
    strict_runtime: BotRuntime,
) -> None:
    shell = ShellAdapter(strict_runtime.core, "tester", out=io.StringIO())
    await _say(shell, "/imagine a cat --count 1")
    for line in ("/mod help", "/mod ban bob", "/mod queue", "/mod block add cat"):
        assert "✗ Only moderators can use /mod" in await _say(shell, line)
    assert await queued(strict_runtime.queue) == 1
    alice = ShellAdapter(strict_runtime.core, "alice", out=io.StringIO())
    assert "tester" in await _say(alice, "/mod queue")


async def test_a_role_limit_set_in_the_shell_says_it_applies_to_nobody(
    tmp_path: Path, redis_clean: str
) -> None:
    from bot.adapters import shell as shell_adapter
    from bot.adapters import slack as slack_adapter
    from bot.core.moderation import PLATFORMS_WITHOUT_ROLES

    assert {shell_adapter.PLATFORM, slack_adapter.PLATFORM} == PLATFORMS_WITHOUT_ROLES
    settings = make_settings(tmp_path / "data", redis_clean)
    async with open_core(settings, shell_adapter.PLATFORM) as runtime:
        shell = ShellAdapter(runtime.core, "tester", out=io.StringIO())
        reply = await _say(shell, "/mod quota set role:42 images 7")
    assert "Images per day for role 42: now 7." in reply
    assert "shell doesn't tell me people's roles, so role limits apply to nobody here" in reply
