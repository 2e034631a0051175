from datetime import datetime, timedelta, timezone

from fastapi import APIRouter, HTTPException, Request
from sqlalchemy.exc import DBAPIError

from ...crud import CaptureWindow, ImageLimits, store_batch
from ...errors import RetryableDatabaseError, is_retryable
from ...imaging import DecodeBusyError
from ...schemas import SyncRequest, SyncResponse
from ..deps import DeviceDep, SessionDep, audit

router = APIRouter(prefix="/v1", tags=["sync"])
ATTEMPTS = 3  # a serialization failure or deadlock is retried here before the client is told to retry


@router.post("/sync", response_model=SyncResponse)
def sync(body: SyncRequest, caller: DeviceDep, session: SessionDep, request: Request) -> SyncResponse:
    """Store a batch of device results; idempotent on result UUID, per-item status, one transaction.

    Each result is validated on its own against the wire schema (edge_runtime.wire.ScreeningResult) and the
    server's capture window; an invalid one is ``rejected`` with the reason, the others are stored.
    """
    settings = request.app.state.settings
    if len(body.results) > settings.MAX_SYNC_ITEMS:
        raise HTTPException(413, f"batch of {len(body.results)} results; at most {settings.MAX_SYNC_ITEMS} per request")
    window = CaptureWindow(received_at=datetime.now(timezone.utc), earliest=settings.CAPTURED_AT_MIN,
                           max_future=timedelta(seconds=settings.CAPTURED_AT_MAX_FUTURE_S))
    for attempt in range(ATTEMPTS):
        try:
            items = store_batch(session=session, device=caller.name, entries=body.results,
                                limits=ImageLimits(settings.MAX_IMAGE_BYTES, settings.MAX_IMAGE_PIXELS), window=window,
                                slots=request.app.state.decode_slots, max_captures=settings.MAX_CAPTURES_PER_ENCOUNTER)
            audit(session, caller, "sync", None, f"{sum(i.status == 'stored' for i in items)} stored of {len(items)}")
            session.commit()
            return SyncResponse(items=items)
        except DecodeBusyError as exc:
            session.rollback()
            raise HTTPException(503, str(exc), headers={"Retry-After": "5"}) from exc
        except DBAPIError as exc:
            session.rollback()
            if not is_retryable(exc):
                raise
            if attempt == ATTEMPTS - 1:
                raise RetryableDatabaseError("database busy (concurrent sync of the same results); retry") from exc
    raise AssertionError("unreachable")
