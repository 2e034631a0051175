from fastapi import APIRouter, HTTPException, Request

from ...crud import store_batch
from ...schemas import SyncRequest, SyncResponse
from ..deps import DeviceDep, SessionDep, audit

router = APIRouter(prefix="/v1", tags=["sync"])


@router.post("/sync", response_model=SyncResponse)
def sync(body: SyncRequest, caller: DeviceDep, session: SessionDep, request: Request) -> SyncResponse:
    """Store a batch of device results; idempotent on result UUID, per-item status, one transaction."""
    settings = request.app.state.settings
    if len(body.results) > settings.MAX_SYNC_ITEMS:
        raise HTTPException(413, f"batch of {len(body.results)} results; at most {settings.MAX_SYNC_ITEMS} per request")
    items = store_batch(session=session, device=caller.name, entries=body.results, max_image_bytes=settings.MAX_IMAGE_BYTES)
    audit(session, caller, "sync", None, f"{sum(i.status == 'stored' for i in items)} stored of {len(items)}")
    session.commit()
    return SyncResponse(items=items)
