from fastapi import APIRouter, Request
from sqlalchemy import text

router = APIRouter(tags=["health"])


@router.get("/health")
def health(request: Request) -> dict:
    """Liveness and database reachability (no authentication)."""
    with request.app.state.sessionmaker() as session:
        session.execute(text("SELECT 1"))
    return {"status": "ok"}
