"""The queue of one replica and how its batches are taken.

A batch is the oldest piece of work, then the pieces that may share its forward pass (the same
`batch_key`), until the batch holds `max_frames` frames of work (one piece at least) or `wait_s`
has passed since the first was taken. When the batch closes, work whose request went away (a
cancelled future) is dropped and work past its deadline fails with `DeadlineExceeded` (504).
"""
from __future__ import annotations

import threading
import time
from collections import deque

from coordtok.service.engine.errors import DeadlineExceeded
from coordtok.service.engine.work import Work


class BatchQueue:
    """Thread-safe: routing puts from the event loop, the replica's worker takes."""

    def __init__(self, max_frames: int, wait_s: float) -> None:
        self.max_frames, self.wait_s = max_frames, wait_s
        self.cost = 0  # frames of work waiting
        self._items: deque[Work] = deque()
        self._wake = threading.Condition()
        self._open = True  # false once the replica has left service
        self._stopped = False

    def put(self, work: Work) -> bool:
        """Queue work; False (nothing queued) once the queue is closed."""
        with self._wake:
            if not self._open:
                return False
            self._items.append(work)
            self.cost += work.cost
            self._wake.notify()
            return True

    def take(self) -> list[Work] | None:
        """Block for work, then gather a batch; its live work (possibly none). None once stopped."""
        with self._wake:
            while not self._items and not self._stopped:
                self._wake.wait()
            if self._stopped:
                return None
            first = self._remove(self._items[0])
            batch, frames = [first], first.cost
            closes = time.monotonic() + self.wait_s
            while frames < self.max_frames:
                match = next((w for w in self._items if w.batch_key == first.batch_key
                              and frames + w.cost <= self.max_frames), None)
                if match is not None:
                    batch.append(self._remove(match))
                    frames += match.cost
                    continue
                remaining = closes - time.monotonic()
                if remaining <= 0 or self._stopped:
                    break
                self._wake.wait(remaining)
        return live(batch)

    def close(self) -> list[Work]:
        """Refuse new work; returns the work that was waiting (to be routed elsewhere)."""
        with self._wake:
            self._open = False
            queued = list(self._items)
            self._items.clear()
            self.cost = 0
        return queued

    def stop(self) -> None:
        """Wake the worker: `take` returns None from now on."""
        with self._wake:
            self._stopped = True
            self._wake.notify_all()

    def _remove(self, work: Work) -> Work:
        self._items.remove(work)
        self.cost -= work.cost
        return work


def live(batch: list[Work]) -> list[Work]:
    """The work of `batch` still worth running: requests gone are skipped, those past their
    deadline are failed."""
    now = time.monotonic()
    kept = []
    for work in batch:
        if work.future.cancelled():
            continue
        if now > work.deadline:
            work.finish(error=DeadlineExceeded("the request waited in the queue past its deadline"))
            continue
        kept.append(work)
    return kept
