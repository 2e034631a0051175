"""Per-key rate limits with the `limits` library: Redis when configured (shared by workers), memory otherwise.

Redis is a shared counter, not a dependency the API may die with: when it is unreachable the limiter degrades to
in-process counters (each worker limits on its own), logs it once, reports it in /health, and tries Redis again
every ``retry_s`` seconds.
"""
from __future__ import annotations

import logging
import math
import threading
import time

from limits import parse
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter

log = logging.getLogger(__name__)


class RateLimiter:
    def __init__(self, rule: str, redis_url: str | None = None, retry_s: float = 30.0):
        self.item = parse(rule)
        self.redis_url, self.retry_s = redis_url, retry_s
        self.memory = MovingWindowRateLimiter(storage_from_string("memory://"))
        self.shared = None
        if redis_url:
            # wrap_exceptions: every backend failure arrives as limits.errors.StorageError (plus socket timeouts).
            storage = storage_from_string(redis_url, wrap_exceptions=True, socket_timeout=0.5, socket_connect_timeout=0.5)
            self.shared = MovingWindowRateLimiter(storage)
        self.degraded_since: float | None = None
        self._lock = threading.Lock()

    @property
    def backend(self) -> str:
        if self.shared is None:
            return "memory"
        return "memory (Redis unreachable)" if self.degraded_since is not None else "redis"

    def _limiter(self) -> MovingWindowRateLimiter:
        if self.shared is None:
            return self.memory
        with self._lock:
            if self.degraded_since is not None and time.monotonic() - self.degraded_since < self.retry_s:
                return self.memory
        return self.shared

    def _call(self, method: str, *args):
        limiter = self._limiter()
        if limiter is self.memory:
            return getattr(limiter, method)(*args)
        try:
            answer = getattr(limiter, method)(*args)
        except Exception as exc:  # noqa: BLE001 - any Redis failure: degrade, never fail the request
            with self._lock:
                if self.degraded_since is None:
                    log.warning("rate-limit store unreachable (%s); using in-process limits", type(exc).__name__)
                self.degraded_since = time.monotonic()
            return getattr(self.memory, method)(*args)
        if self.degraded_since is not None:
            with self._lock:
                self.degraded_since = None
            log.warning("rate-limit store reachable again; shared limits restored")
        return answer

    def hit(self, key: str) -> bool:
        return self._call("hit", self.item, key)

    def test(self, key: str) -> bool:
        """True when ``key`` may make another request (does not count one)."""
        return self._call("test", self.item, key)

    def retry_after(self, key: str) -> int:
        reset, _ = self._call("get_window_stats", self.item, key)
        return max(1, math.ceil(reset - time.time()))
