"""A request's deadline and its client's presence: work a route awaits stops when the deadline
passes (504) or the client goes away (499, counted in `coordtok_requests_cancelled`)."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from coordtok.service.engine import DeadlineExceeded
from coordtok.service.errors import ClientGone
from coordtok.service.metrics import Metrics


class RequestClock:
    """The deadline of a request's work (`request_timeout_s` from the end of its body), and
    whether its client has gone: `check` raises DeadlineExceeded or ClientGone, and media
    functions call it before each frame (their `check_stop`)."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s, self.deadline, self.gone = timeout_s, time.monotonic() + timeout_s, False

    def check(self) -> None:
        if self.gone:
            raise ClientGone()
        if time.monotonic() > self.deadline:
            raise DeadlineExceeded(f"the request did not finish within {self.timeout_s:g} s")

    async def run(self, request: Request, metrics: Metrics, route: str, function, *args, **kwargs):
        """`function(*args, check_stop=self.check, **kwargs)` in a worker thread; it stops at its
        next frame when the deadline passes or the client disconnects."""
        self.check()
        work = run_in_threadpool(function, *args, check_stop=self.check, **kwargs)
        return await unless_disconnected(request, work, metrics, route, on_gone=self.mark_gone)

    async def within(self, awaitable):
        """Await `awaitable` (engine work, a send) until the deadline: past it, it is cancelled
        and DeadlineExceeded raised."""
        try:
            return await asyncio.wait_for(awaitable, max(self.deadline - time.monotonic(), 0.0))
        except TimeoutError:
            raise DeadlineExceeded(f"the request did not finish within {self.timeout_s:g} s") from None

    def mark_gone(self) -> None:
        self.gone = True


async def unless_disconnected(request: Request, work, metrics: Metrics, route: str, on_gone: Callable[[], None] | None = None):
    """Await `work` (engine calls, media work in a thread), cancelling it if the client
    disconnects first: cancelled work still queued is skipped by the engine; `on_gone` tells work
    in a thread to stop. Counted in `coordtok_requests_cancelled`."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.05)

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    if on_gone is not None:
        on_gone()
    task.cancel()
    task.add_done_callback(lambda done: done.cancelled() or done.exception())  # its ClientGone is expected
    metrics.cancelled.labels(route).inc()
    raise ClientGone()
