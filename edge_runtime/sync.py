"""Drains the outbox to the companion server: batches, idempotency by result UUID, backoff, Retry-After.

The sync contract (the companion API implements it):
    POST {server}/v1/sync   Authorization: Bearer <device token>
    {"results": [{"result": ScreeningResult.to_dict(), "content_hash": str, "overlay_png_b64": str | null,
                  "image_b64": str | null}]}
    -> 200 {"items": [{"result_id": str, "status": "stored" | "duplicate" | "conflict" | "rejected", "detail": str}]}
Only ``stored`` and ``duplicate`` acknowledge a result; ``conflict``/``rejected`` keep it, marked rejected. Any
other status keeps it due (a newer server may say "retry later" in words this client does not know).

The network is hostile: an answer that is not the protocol (a captive portal's HTML 200) is a typed
``UnexpectedResponseError`` and the batch stays due; an answer that moves nothing forward (``{"items": []}``)
counts as a failed round with backoff, and a one-shot sync gives up after ``max_stalled_rounds`` such rounds
(``SyncStalledError``) instead of posting forever.
"""
from __future__ import annotations

import base64
import json
import logging
import random
import time
from dataclasses import dataclass

import httpx

from .errors import OutboxError
from .outbox import Outbox

log = logging.getLogger(__name__)
ACK_STATUSES = ("stored", "duplicate")
FINAL_REFUSALS = ("conflict", "rejected")  # the server will never store these as sent


@dataclass
class SyncReport:
    sent: int = 0
    acknowledged: int = 0
    rejected: int = 0
    errors: int = 0
    rounds: int = 0
    quarantined: int = 0  # outbox rows kept aside because they cannot be decoded (never sent, never deleted)
    pruned: int = 0  # acknowledged results past the retention, deleted from the outbox


class SyncError(RuntimeError):
    """The server could not be reached or refused the batch; the outbox is unchanged apart from attempt counts."""


class TokenRefusedError(SyncError):
    """401/403: retrying cannot help until the device has a valid token."""


class UnexpectedResponseError(SyncError):
    """The server (or something pretending to be it) answered outside the sync protocol; nothing was acknowledged."""


class NoProgressError(SyncError):
    """The server answered but acknowledged or refused none of the batch."""


class SyncStalledError(SyncError):
    """A one-shot sync gave up after several rounds in a row that moved nothing forward; results stay due."""


class SyncClient:
    def __init__(self, server: str, token: str, outbox: Outbox, batch_size: int = 25, timeout: float = 30.0,
                 base_delay: float = 1.0, max_delay: float = 300.0, transport: httpx.BaseTransport | None = None,
                 sleep=time.sleep, max_stalled_rounds: int = 5, retain_acknowledged_s: float = 7 * 86_400):
        """``retain_acknowledged_s``: how long an acknowledged result stays in the outbox before it is pruned."""
        self.outbox, self.batch_size, self.max_stalled_rounds = outbox, batch_size, max_stalled_rounds
        self.retain_acknowledged_s = retain_acknowledged_s
        self.base_delay, self.max_delay, self.sleep = base_delay, max_delay, sleep
        self.client = httpx.Client(base_url=server.rstrip("/"), timeout=timeout, transport=transport,
                                   headers={"Authorization": f"Bearer {token}"})

    def _prune(self) -> int:
        """Acknowledged results past the retention leave the outbox (the server keeps them)."""
        try:
            return self.outbox.prune_acknowledged(self.retain_acknowledged_s)
        except OutboxError as exc:
            log.warning("could not prune acknowledged results (%s)", exc)
            return 0

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
        try:
            self.outbox.mark_sent(ids)
        except OutboxError as exc:  # e.g. a full disk: the attempt count is bookkeeping, the send still matters
            log.warning("could not record the send attempt (%s); sending anyway", exc)
        try:
            response = self.client.post("/v1/sync", json=self._payload(items))
        except httpx.HTTPError as exc:
            self.outbox.record_error(ids, f"{type(exc).__name__}: {exc}")
            raise SyncError(f"network error: {type(exc).__name__}: {exc}") from exc
        if response.status_code == 429:
            raise RetryAfter(_retry_after(response))
        if response.status_code in (401, 403):
            raise TokenRefusedError(f"server refused the device token ({response.status_code}); ask an administrator "
                                    "for a new one")
        if response.status_code >= 400:
            self.outbox.record_error(ids, f"HTTP {response.status_code}")
            raise SyncError(f"server answered HTTP {response.status_code}: {response.text[:200]}")
        try:
            entries = _protocol_items(response, len(ids))
        except UnexpectedResponseError as exc:
            self.outbox.record_error(ids, str(exc))
            raise
        acked, rejected, unknown = [], 0, []
        for entry in entries:
            result_id, status = entry["result_id"], entry.get("status")
            if result_id not in ids:
                continue  # only what this batch sent can be settled by this answer
            if status in ACK_STATUSES:
                acked.append(result_id)
            elif status in FINAL_REFUSALS:
                self.outbox.mark_rejected(result_id, f"{status}: {entry.get('detail', '')}")
                rejected += 1
            else:
                unknown.append(result_id)
        if unknown:
            log.warning("server answered an unknown status for %d result(s); they stay due", len(unknown))
            self.outbox.record_error(unknown, "unknown status from the server; kept for the next sync")
        # Only what the server confirmed is acknowledged; anything it did not mention stays due.
        try:
            self.outbox.mark_acknowledged(acked)
        except OutboxError:  # a full disk: free the space acknowledged results hold, then record it
            self._prune()
            self.outbox.mark_acknowledged(acked)
        if not acked and not rejected:
            raise NoProgressError(f"the server answered but settled none of {len(ids)} result(s); they stay due")
        return len(items)

    def run(self, loop: bool = False, max_rounds: int | None = None, idle_interval: float = 30.0) -> SyncReport:
        """Push until drained (or forever with ``loop``), backing off exponentially with jitter on failure."""
        report, failures, stalled = SyncReport(), 0, 0
        while max_rounds is None or report.rounds < max_rounds:
            report.rounds += 1
            try:
                sent = self.push_batch()
                failures = stalled = 0
            except RetryAfter as wait:
                log.warning("server asked to slow down; retrying in %.1fs", wait.seconds)
                self.sleep(wait.seconds)
                continue
            except SyncError as exc:
                if isinstance(exc, TokenRefusedError):
                    raise
                if isinstance(exc, (NoProgressError, UnexpectedResponseError)):
                    stalled += 1
                    if not loop and stalled >= self.max_stalled_rounds:
                        raise SyncStalledError(
                            f"{stalled} rounds in a row moved nothing forward (last: {exc}); results stay due. "
                            "Check the server URL and the network (a captive portal?), then sync again.") from exc
                failures += 1
                report.errors += 1
                delay = min(self.max_delay, self.base_delay * 2 ** min(failures, 16)) * random.uniform(0.5, 1.5)
                log.warning("sync failed (%s); retrying in %.1fs", exc, delay)
                self.sleep(delay)
                continue
            report.sent += sent
            if sent == 0:  # drained: acknowledged results past the retention leave
                report.pruned += self._prune()
                if not loop:
                    break
                self.sleep(idle_interval)
        counts = self.outbox.counts()
        report.acknowledged, report.rejected = counts["acknowledged"], counts["rejected"]
        report.quarantined = len(self.outbox.quarantined())
        return report


def _protocol_items(response: httpx.Response, batch: int) -> list[dict]:
    """The ``items`` of a sync answer, or UnexpectedResponseError when the answer is not the protocol."""
    kept = f"{batch} result(s) kept for the next sync"
    content_type = response.headers.get("content-type", "no content type")
    if response.status_code != 200:
        raise UnexpectedResponseError(f"server answered HTTP {response.status_code} ({content_type}); {kept}")
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UnexpectedResponseError(f"server answered HTTP 200 with {content_type[:60]}, not JSON (a captive "
                                      f"portal or proxy login page?); {kept}") from exc
    if not isinstance(body, dict) or not isinstance(body.get("items"), list):
        raise UnexpectedResponseError(f"server answered JSON without an items list (not the sync protocol); {kept}")
    return [e for e in body["items"] if isinstance(e, dict) and isinstance(e.get("result_id"), str)]


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
