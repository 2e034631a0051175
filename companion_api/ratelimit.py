"""Per-token rate limits with the `limits` library: Redis when configured (shared by workers), memory otherwise."""
from __future__ import annotations

import math
import time

from limits import parse
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter


class RateLimiter:
    def __init__(self, rule: str, redis_url: str | None = None):
        self.item = parse(rule)
        self.storage = storage_from_string(redis_url or "memory://")
        self.limiter = MovingWindowRateLimiter(self.storage)

    def hit(self, key: str) -> bool:
        return self.limiter.hit(self.item, key)

    def retry_after(self, key: str) -> int:
        reset, _ = self.limiter.get_window_stats(self.item, key)
        return max(1, math.ceil(reset - time.time()))
