from fastapi import APIRouter, Request
from sqlalchemy import text

router = APIRouter(tags=["health"])


@router.get("/health")
def health(request: Request) -> dict:
    """Liveness, database reachability and where rate limits are counted (no authentication).

    ``status`` is ``degraded`` while Redis is configured but unreachable: limits then hold per worker only.
    """
    with request.app.state.sessionmaker() as session:
        session.execute(text("SELECT 1"))
    limits = request.app.state.limiter.backend
    return {"status": "degraded" if "unreachable" in limits else "ok", "rate_limits": limits}
