"""Wording shared by the chat adapters."""

from __future__ import annotations

from bot.adapters.common import queue_place
from bot.core.commands import Receipt


def test_the_first_progress_message_gives_the_place_only_when_the_queue_confirmed_it() -> None:
    assert queue_place(Receipt("job-1", 3, "queued")) == "(position 3)"
    unconfirmed = queue_place(Receipt("job-2", 3, "sent", confirmed=False))
    assert "position" not in unconfirmed
    assert "not confirmed" in unconfirmed
