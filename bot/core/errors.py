"""The one exception type for errors a user can cause, and how its messages echo what they
typed and list things."""

from __future__ import annotations

from collections.abc import Sequence


class UserError(Exception):
    """Something the user can fix; ``message`` is shown to them as is, in plain words."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def as_typed(text: str) -> str:
    """``text`` in a code span, where Discord's markdown and Slack's mrkdwn show it as typed
    (a refused name such as ``*rex*`` or ``my__dog`` is neither bold nor underlined there);
    a backtick, which would end the span, shows as ˋ."""
    return f"`{text.replace('`', 'ˋ')}`"


def spoken_list(items: Sequence[str]) -> str:
    """``a, b and c``: items as a reply lists them (``a`` alone, nothing for none)."""
    if len(items) < 2:
        return "".join(items)
    return f"{', '.join(items[:-1])} and {items[-1]}"
