"""Drains the outbox to the companion server: batches, idempotency by result UUID, backoff, Retry-After.

The sync contract (the companion API implements it):
    POST {server}/v1/sync   Authorization: Bearer <device token>
    {"results": [{"result": ScreeningResult.to_dict(), "content_hash": str, "overlay_png_b64": str | null,
                  "image_b64": str | null}]}
    -> 200 {"items": [{"result_id": str, "status": "stored" | "duplicate" | "conflict" | "rejected", "detail": str}]}
Only ``stored`` and ``duplicate`` acknowledge a result; ``conflict``/``rejected`` keep it, marked rejected.
"""
from __future__ import annotations

import base64
import logging
import random
import time
from dataclasses import dataclass

import httpx

from .outbox import Outbox

log = logging.getLogger(__name__)
ACK_STATUSES = ("stored", "duplicate")


@dataclass
class SyncReport:
    sent: int = 0
    acknowledged: int = 0
    rejected: int = 0
    errors: int = 0
    rounds: int = 0


class SyncError(RuntimeError):
    """The server could not be reached or refused the batch; the outbox is unchanged apart from attempt counts."""


class SyncClient:
    def __init__(self, server: str, token: str, outbox: Outbox, batch_size: int = 25, timeout: float = 30.0,
                 base_delay: float = 1.0, max_delay: float = 300.0, transport: httpx.BaseTransport | None = None,
                 sleep=time.sleep):
        self.outbox, self.batch_size = outbox, batch_size
        self.base_delay, self.max_delay, self.sleep = base_delay, max_delay, sleep
        self.client = httpx.Client(base_url=server.rstrip("/"), timeout=timeout, transport=transport,
                                   headers={"Authorization": f"Bearer {token}"})

    def _payload(self, items) -> dict:
        return {"results": [{
            "result": item.result.to_dict(), "content_hash": item.content_hash,
            "overlay_png_b64": base64.b64encode(item.overlay).decode() if item.overlay else None,
            "image_b64": base64.b64encode(item.image).decode() if item.image else None,
        } for item in items]}

    def push_batch(self) -> int:
        """Send one batch; returns how many results it held (0 when the outbox is drained)."""
        items = self.outbox.due(self.batch_size)
        if not items:
            return 0
        ids = [item.result.result_id for item in items]
        self.outbox.mark_sent(ids)
        try:
            response = self.client.post("/v1/sync", json=self._payload(items))
        except httpx.HTTPError as exc:
            self.outbox.record_error(ids, f"{type(exc).__name__}: {exc}")
            raise SyncError(f"network error: {type(exc).__name__}: {exc}") from exc
        if response.status_code == 429:
            raise RetryAfter(_retry_after(response))
        if response.status_code in (401, 403):
            raise SyncError(f"server refused the device token ({response.status_code}); ask an administrator for a new one")
        if response.status_code >= 400:
            self.outbox.record_error(ids, f"HTTP {response.status_code}")
            raise SyncError(f"server answered HTTP {response.status_code}: {response.text[:200]}")
        acked, rejected = [], 0
        for entry in response.json().get("items", []):
            if entry.get("status") in ACK_STATUSES:
                acked.append(entry["result_id"])
            elif entry.get("result_id") in ids:
                self.outbox.mark_rejected(entry["result_id"], f"{entry.get('status')}: {entry.get('detail', '')}")
                rejected += 1
        # Only what the server confirmed is acknowledged; anything it did not mention stays due.
        self.outbox.mark_acknowledged([a for a in acked if a in ids])
        return len(items)

    def run(self, loop: bool = False, max_rounds: int | None = None, idle_interval: float = 30.0) -> SyncReport:
        """Push until drained (or forever with ``loop``), backing off exponentially with jitter on failure."""
        report, failures = SyncReport(), 0
        while max_rounds is None or report.rounds < max_rounds:
            report.rounds += 1
            try:
                sent = self.push_batch()
                failures = 0
            except RetryAfter as wait:
                log.warning("server asked to slow down; retrying in %.1fs", wait.seconds)
                self.sleep(wait.seconds)
                continue
            except SyncError as exc:
                if "token" in str(exc):
                    raise
                failures += 1
                report.errors += 1
                delay = min(self.max_delay, self.base_delay * 2 ** min(failures, 16)) * random.uniform(0.5, 1.5)
                log.warning("sync failed (%s); retrying in %.1fs", exc, delay)
                self.sleep(delay)
                continue
            report.sent += sent
            if sent == 0:
                if not loop:
                    break
                self.sleep(idle_interval)
        counts = self.outbox.counts()
        report.acknowledged, report.rejected = counts["acknowledged"], counts["rejected"]
        return report


class RetryAfter(Exception):
    def __init__(self, seconds: float):
        super().__init__(f"retry after {seconds}s")
        self.seconds = seconds


def _retry_after(response: httpx.Response) -> float:
    try:
        return max(0.0, min(3600.0, float(response.headers.get("Retry-After", "5"))))
    except ValueError:
        return 5.0


def wait_until_healthy(base_url: str, timeout: float = 30.0) -> None:
    """Poll ``{base_url}/health`` until the server answers 200; raises SyncError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base_url.rstrip('/')}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SyncError(f"{base_url} did not become healthy within {timeout:.0f}s")
