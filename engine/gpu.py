"""Fair sharing of one GPU between long trainings and quick generations.

Training holds the GPU but calls ``yield_to_generations`` between chunks of steps; when a
generation is waiting, training parks there until the waiting generations have run. So a
generation submitted during a ten-minute training starts within one chunk instead of waiting
for the whole run.

A job waiting for the GPU passes its cancel event (``CancelWatch.event``): when it is set
(arq aborted the job, or a moderator cancelled it) the wait ends within ``CANCEL_POLL``
seconds with ``JobCancelled``, so a cancelled job gives back its worker slot at once instead
of after the training or generation ahead of it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from engine.reporting import JobCancelled

CANCEL_POLL = 0.1
"""Seconds between looks at a waiting job's cancel event."""


class GpuScheduler:
    """A GPU lock where generations go first and training yields between chunks."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._busy = False
        self._generations_waiting = 0
        self.yields = 0
        """How often training stepped aside (for tests and metrics)."""

    @contextmanager
    def generation(self, cancel: threading.Event | None = None) -> Iterator[None]:
        """Hold the GPU for one generation (blocks the calling thread until it is free, or
        raises JobCancelled once ``cancel`` is set while it waits)."""
        with self._cond:
            self._generations_waiting += 1
            try:
                while self._busy:
                    self._wait(cancel)
            finally:
                self._generations_waiting -= 1
                # A training parked in yield_to_generations waits for this count to drop.
                self._cond.notify_all()
            self._busy = True
        try:
            yield
        finally:
            self._release()

    @contextmanager
    def training(self, cancel: threading.Event | None = None) -> Iterator[None]:
        """Hold the GPU for a training job; waiting generations go first. Raises
        JobCancelled once ``cancel`` is set while it waits."""
        with self._cond:
            while self._busy or self._generations_waiting:
                self._wait(cancel)
            self._busy = True
        try:
            yield
        finally:
            self._release()

    def _wait(self, cancel: threading.Event | None) -> None:
        """Wait for a change (the condition held), polling ``cancel`` while waiting."""
        if cancel is None:
            self._cond.wait()
            return
        if cancel.is_set():
            raise JobCancelled
        self._cond.wait(CANCEL_POLL)
        if cancel.is_set():
            raise JobCancelled

    def _release(self) -> None:
        with self._cond:
            self._busy = False
            self._cond.notify_all()

    def yield_to_generations(self) -> None:
        """Called by the training thread (which holds the GPU) between chunks of steps."""
        with self._cond:
            if not self._generations_waiting:
                return
            self.yields += 1
            self._busy = False
            self._cond.notify_all()
            while self._busy or self._generations_waiting:
                self._cond.wait()
            self._busy = True
