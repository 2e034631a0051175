"""Image decoding on the server: bounded, off the event loop, behind the header checks of edge_runtime.preprocess.

A decode holds width x height x 3 bytes (twice that for 16-bit PNG) however small the upload, so the number of
decodes in flight, not the number of requests, is what bounds a worker's memory. Every decode in this process
(``/v1/predict`` and the overlay check of ``/v1/sync``) takes one of ``DECODE_CONCURRENCY`` slots; a request that
cannot get one within ``DECODE_WAIT_S`` is answered 503 with Retry-After instead of queueing without end.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import TypeVar

import anyio

T = TypeVar("T")

# Overlays are rendered at display size (edge_runtime.cam.DISPLAY_SIDE = 512); 2 MP leaves room for a larger
# screen and refuses anything a reviewer's browser should not be asked to draw.
OVERLAY_MAX_PIXELS = 2_000_000


class DecodeBusyError(RuntimeError):
    """Every decode slot stayed taken for the whole wait; the client should retry."""


class DecodeSlots:
    """At most ``slots`` decodes at once in this process, shared by threads and async routes."""

    def __init__(self, slots: int, wait_s: float):
        self.slots, self.wait_s = slots, wait_s
        self._semaphore = threading.BoundedSemaphore(slots)
        self._limiter: anyio.CapacityLimiter | None = None  # created inside the event loop, on first use

    @contextmanager
    def held(self) -> Iterator[None]:
        if not self._semaphore.acquire(timeout=self.wait_s):
            raise DecodeBusyError(f"all {self.slots} image-decode slots stayed busy for {self.wait_s:.0f}s; retry")
        try:
            yield
        finally:
            self._semaphore.release()

    def _call(self, fn: Callable[..., T], *args, **kwargs) -> T:
        with self.held():
            return fn(*args, **kwargs)

    async def run(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """``fn(*args, **kwargs)`` in a worker thread holding a slot; the event loop stays free meanwhile. Callers
        beyond ``slots`` wait on the loop (no thread each) for at most ``wait_s``, then get DecodeBusyError."""
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.slots)
        try:
            with anyio.fail_after(self.wait_s):
                await self._limiter.acquire()
        except TimeoutError:
            raise DecodeBusyError(f"all {self.slots} image-decode slots stayed busy for {self.wait_s:.0f}s; "
                                  "retry") from None
        try:  # the thread is never abandoned: the slot is released only when its decode has ended
            return await anyio.to_thread.run_sync(partial(self._call, fn, *args, **kwargs))
        finally:
            self._limiter.release()
