"""Wording shared by the chat adapters."""

from __future__ import annotations

from bot.adapters.common import FENCE, queue_place, split_text
from bot.core.commands import Receipt


def test_the_first_progress_message_gives_the_place_only_when_the_queue_confirmed_it() -> None:
    assert queue_place(Receipt("job-1", 3, "queued")) == "(position 3)"
    unconfirmed = queue_place(Receipt("job-2", 3, "sent", confirmed=False))
    assert "position" not in unconfirmed
    assert "not confirmed" in unconfirmed


def test_a_short_reply_is_one_message_unchanged() -> None:
    assert split_text("Your subjects:\n  rex: dog, ready", 2000) == [
        "Your subjects:\n  rex: dog, ready"
    ]


def test_a_long_reply_is_split_between_lines_and_loses_none() -> None:
    lines = [f"  #{n}  word  “a phrase long enough to matter {n}”" for n in range(150)]
    parts = split_text("\n".join(lines), 2000)

    assert len(parts) > 1
    assert all(len(part) <= 2000 for part in parts)
    assert "\n".join(parts).split("\n") == lines


def test_a_code_block_cut_in_two_is_closed_and_opened_again() -> None:
    text = "\n".join(
        ["```", *[f"/mod command {n} with its explanation" for n in range(100)], "```"]
    )
    text += "\nA note after the block."
    parts = split_text(text, 1000)

    assert len(parts) > 1
    for part in parts:
        assert len(part) <= 1000
        assert part.count(FENCE) % 2 == 0, part
    assert parts[-1].endswith("```\nA note after the block.")
    shown = [line for part in parts for line in part.split("\n") if line != FENCE]
    assert shown == [line for line in text.split("\n") if line != FENCE]


def test_lines_beyond_the_last_message_are_counted_not_dropped_silently() -> None:
    lines = [f"line {n} " + "x" * 90 for n in range(300)]
    parts = split_text("\n".join(lines), 2000, max_parts=5)

    assert len(parts) == 5
    assert all(len(part) <= 2000 for part in parts)
    shown = sum(part.count("\n") + 1 for part in parts) - 1
    assert parts[-1].endswith(f"… {300 - shown} more lines not shown.")
    assert parts[0].startswith("line 0 ")


def test_a_line_longer_than_a_message_is_cut_with_an_ellipsis() -> None:
    parts = split_text("short\n" + "y" * 5000 + "\nafter", 2000)

    assert all(len(part) <= 2000 for part in parts)
    assert parts[0] == "short"
    assert parts[1].endswith("…") and len(parts[1]) == 2000
    assert parts[2] == "after"


def test_five_full_messages_need_no_note() -> None:
    lines = [f"{n:02d}" + "z" * 97 for n in range(100)]  # 20 lines of 99 fill a message
    parts = split_text("\n".join(lines), 2000, max_parts=5)

    assert [len(part) for part in parts] == [1999] * 5
    assert "\n".join(parts).split("\n") == lines
