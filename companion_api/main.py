"""FastAPI application factory for the companion server."""
from __future__ import annotations

import logging
from functools import partial

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from .api.deps import has_valid_token
from .api.routes import health, insights, models, predict, results, review, sync, webapp
from .core.config import Settings
from .core.db import make_engine, make_sessionmaker, run_migrations
from .errors import install_error_handlers
from .imaging import DecodeSlots
from .middleware import BodyLimitMiddleware, HardeningMiddleware
from .ratelimit import RateLimiter

log = logging.getLogger("companion_api")


def create_app(settings: Settings | None = None, migrate: bool = True) -> FastAPI:
    settings = settings or Settings()
    if migrate:
        run_migrations(settings.DATABASE_URL)
    engine = make_engine(settings.DATABASE_URL)
    app = FastAPI(title="RetinaEdge companion API", version="0.1.0",
                  description="Device sync, history, server-side grading and clinical insights. "
                              "RetinaEdge assists screening; it does not diagnose.")
    app.state.settings, app.state.engine = settings, engine
    app.state.sessionmaker = make_sessionmaker(engine)
    app.state.limiter = RateLimiter(settings.RATE_LIMIT, settings.REDIS_URL, settings.REDIS_RETRY_S)
    app.state.decode_slots = DecodeSlots(settings.DECODE_CONCURRENCY, settings.DECODE_WAIT_S)
    app.state.auth_failures = RateLimiter(settings.AUTH_FAILURE_LIMIT, settings.REDIS_URL, settings.REDIS_RETRY_S)
    if settings.CORS_ORIGINS:
        app.add_middleware(CORSMiddleware, allow_origins=settings.CORS_ORIGINS, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    @app.middleware("http")
    async def access_log(request: Request, call_next):
        response = await call_next(request)
        # Structured access log without bodies, tokens or patient data.
        log.info("request method=%s path=%s status=%s", request.method, request.url.path, response.status_code)
        return response

    install_error_handlers(app)
    # Added last = outermost: the body limit and the target checks run before routing and authentication.
    app.add_middleware(HardeningMiddleware)
    app.add_middleware(BodyLimitMiddleware, limit=settings.MAX_BODY_BYTES, preauth_limit=settings.PREAUTH_BODY_BYTES,
                       preauth_timeout_s=settings.PREAUTH_BODY_TIMEOUT_S, timeout_s=settings.BODY_TIMEOUT_S,
                       idle_timeout_s=settings.BODY_IDLE_TIMEOUT_S, authenticate=partial(has_valid_token, app))
    if settings.TRUSTED_PROXIES:  # outermost: every later layer sees the forwarded client address
        app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=settings.TRUSTED_PROXIES)
    for module in (health, sync, results, predict, insights, models, review, webapp):
        app.include_router(module.router)
    return app
