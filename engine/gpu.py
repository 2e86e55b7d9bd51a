"""Fair sharing of one GPU between long trainings and quick generations.

Training holds the GPU but calls ``yield_to_generations`` between chunks of steps; when a
generation is waiting, training parks there until the waiting generations have run. So a
generation submitted during a ten-minute training starts within one chunk instead of waiting
for the whole run.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class GpuScheduler:
    """A GPU lock where generations go first and training yields between chunks."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._busy = False
        self._generations_waiting = 0
        self.yields = 0
        """How often training stepped aside (for tests and metrics)."""

    @contextmanager
    def generation(self) -> Iterator[None]:
        """Hold the GPU for one generation (blocks the calling thread until it is free)."""
        with self._cond:
            self._generations_waiting += 1
            try:
                while self._busy:
                    self._cond.wait()
            finally:
                self._generations_waiting -= 1
            self._busy = True
        try:
            yield
        finally:
            self._release()

    @contextmanager
    def training(self) -> Iterator[None]:
        """Hold the GPU for a training job; waiting generations go first."""
        with self._cond:
            while self._busy or self._generations_waiting:
                self._cond.wait()
            self._busy = True
        try:
            yield
        finally:
            self._release()

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
