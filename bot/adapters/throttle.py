"""Rate-limiting edits of progress messages: the latest update wins, at most one per interval.

Shared by the chat adapters (Discord, Slack): both promise their platform a bounded edit rate
on each progress message, however chatty the engine is, and, where the platform limits edits
across messages (Slack's ``chat.update``), a bounded rate over all of them together.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
Send = Callable[[], Awaitable[None]]


class EditThrottle:
    """Coalesces updates per key: at most one send per ``interval`` seconds; the latest wins.

    An update that comes too soon is kept and sent when the interval has passed, so the last
    state is always shown but a chatty job never exceeds the rate promised to the platform.
    With a ``spacing``, sends of all keys together are also at least that many seconds apart
    (taken in turn), so many jobs at once stay within a platform-wide limit: each then shows
    its latest state less often.
    """

    def __init__(
        self,
        interval: float,
        *,
        spacing: float = 0.0,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.interval = interval
        self.spacing = spacing
        self.clock = clock
        self.sleep = sleep
        self._next_slot = -math.inf  # when the next send of any key may go
        self._last: dict[str, float] = {}
        self._pending: dict[str, Send] = {}
        self._flushers: dict[str, asyncio.Task[None]] = {}

    async def submit(self, key: str, send: Send) -> None:
        """Send now if the key's interval has passed, else send the latest update later."""
        last = self._last.get(key)
        now = self.clock()
        due = last is None or now - last >= self.interval
        if key not in self._flushers and due and now >= self._next_slot:
            self._take_slot()
            self._last[key] = now
            await send()
            return
        self._pending[key] = send
        if key not in self._flushers:
            self._flushers[key] = asyncio.create_task(self._flush_later(key))

    async def _flush_later(self, key: str) -> None:
        try:
            while key in self._pending:
                last = self._last.get(key)
                if last is not None:
                    await self.sleep(max(0.0, last + self.interval - self.clock()))
                wait = self._take_slot()
                if wait > 0:
                    await self.sleep(wait)
                send = self._pending.pop(key, None)
                if send is None:
                    break
                self._last[key] = self.clock()
                try:
                    await send()
                except Exception:
                    log.exception("delayed update of %s failed", key)
        finally:
            self._flushers.pop(key, None)

    def _take_slot(self) -> float:
        """Take the next send slot shared by all keys; how many seconds until it comes."""
        now = self.clock()
        slot = max(now, self._next_slot)
        self._next_slot = slot + self.spacing
        return slot - now

    def sent(self, key: str) -> None:
        """Record that the key's message was just written another way (e.g. posted)."""
        self._last[key] = self.clock()

    def forget(self, key: str) -> None:
        """Drop the key's pending update (its job finished)."""
        self._pending.pop(key, None)
        self._last.pop(key, None)
        task = self._flushers.pop(key, None)
        if task is not None:
            task.cancel()
