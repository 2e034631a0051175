"""Server settings: the only place (with the CLI) that reads the environment or .env."""
from __future__ import annotations

from datetime import datetime, timezone

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RETINAEDGE_", env_file=".env", extra="ignore")

    ENV: str = "development"  # development | production
    DATABASE_URL: str = "sqlite:///./retinaedge.db"  # postgresql://user@host/db in production
    REDIS_URL: str | None = None  # shared rate-limit counters across workers; in-process when unset
    RATE_LIMIT: str = "600/minute"  # per token
    AUTH_FAILURE_LIMIT: str = "30/minute"  # wrong tokens per client address (guessing is throttled; valid tokens pass)
    # Reverse proxies whose X-Forwarded-For is believed (IPs or networks, e.g. ["10.0.0.0/8"]); the failure limit then
    # counts per forwarded client instead of per proxy. Empty: the peer address counts.
    TRUSTED_PROXIES: list[str] = Field(default_factory=list)
    REDIS_RETRY_S: float = 30.0  # with Redis down, limits are in-process; try Redis again this often
    MAX_BODY_BYTES: int = 25 * 1024 * 1024
    # Before its token is accepted a request may send this much body, within this time; then it is answered.
    PREAUTH_BODY_BYTES: int = Field(default=64 * 1024, ge=1024)
    PREAUTH_BODY_TIMEOUT_S: float = Field(default=10.0, gt=0)
    BODY_TIMEOUT_S: float = Field(default=120.0, gt=0)  # a whole authenticated body (25 MB at ~2 Mbit/s)
    BODY_IDLE_TIMEOUT_S: float = Field(default=30.0, gt=0)  # the longest pause between two chunks of a body
    MAX_IMAGE_BYTES: int = 15 * 1024 * 1024
    MAX_IMAGE_PIXELS: int = 40_000_000
    MAX_SYNC_ITEMS: int = 200
    # One visit's captures (both eyes, retakes included): bounds an encounter's page however a device fills a visit.
    MAX_CAPTURES_PER_ENCOUNTER: int = Field(default=40, ge=2, le=1000)
    # Image decodes in flight per worker (predict and sync overlays): what bounds a worker's memory, not the requests.
    DECODE_CONCURRENCY: int = Field(default=2, ge=1, le=64)
    DECODE_WAIT_S: float = Field(default=30.0, gt=0)  # then 503 + Retry-After instead of an endless queue
    # Plausible capture window: results dated before CAPTURED_AT_MIN or more than CAPTURED_AT_MAX_FUTURE_S after
    # the server received them are rejected (a clock reset to 9999 or 0001 must not take the history down).
    CAPTURED_AT_MIN: datetime = datetime(2000, 1, 1, tzinfo=timezone.utc)
    CAPTURED_AT_MAX_FUTURE_S: int = Field(default=86_400, ge=0, le=30 * 86_400)
    COOKIE_SECURE: bool = True  # the login cookie is sent over HTTPS only; false only for http://localhost tests
    REVIEW_PAGE_SIZE: int = Field(default=50, ge=1, le=500)
    CORS_ORIGINS: list[str] = Field(default_factory=list)  # CORS is off unless origins are listed
    TEACHER_CHECKPOINT: str | None = None  # FP32 teacher for /v1/predict
    # Publisher public keys (PEM paths, PEM text or raw base64, edge_runtime.signing.load_keyring): an uploaded
    # model must be signed by one of them with a release newer than the published one. Revoked key ids are refused.
    PUBLISHER_KEYS: list[str] = Field(default_factory=list)
    REVOKED_PUBLISHER_KEYS: list[str] = Field(default_factory=list)
    # Development only (refused in production): publish uploads without a signed release, or with a failed gate
    # (to test what devices refuse on their own).
    ALLOW_UNSIGNED_MODELS: bool = False
    ARTIFACT_DIR: str = "./model_store"
    RESOURCE_SETTING: str = "standard"  # standard | low: ICO follow-up intervals for low-resource settings
    GEMINI_API_KEY: str | None = Field(default=None, validation_alias="GEMINI_API_KEY")
    GEMINI_MODEL: str = "gemini-2.5-flash"
    GEMINI_BASE_URL: str | None = None  # tests point this at a fake endpoint on loopback
    GEMINI_TIMEOUT_S: float = 15.0

    @field_validator("DATABASE_URL")
    @classmethod
    def _driver(cls, value: str) -> str:
        # psycopg 3 is the PostgreSQL driver we ship.
        if value.startswith("postgres://"):
            value = "postgresql://" + value[len("postgres://"):]
        if value.startswith("postgresql://"):
            value = "postgresql+psycopg://" + value[len("postgresql://"):]
        return value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.RESOURCE_SETTING not in ("standard", "low"):
            raise ValueError(f"RESOURCE_SETTING must be standard|low, got {self.RESOURCE_SETTING!r}")
        if self.CAPTURED_AT_MIN.tzinfo is None:
            raise ValueError("CAPTURED_AT_MIN needs a UTC offset, e.g. 2000-01-01T00:00:00+00:00")
        if self.ENV == "production" and self.ALLOW_UNSIGNED_MODELS:
            raise ValueError("ALLOW_UNSIGNED_MODELS is a development setting; production publishes signed models only")
        if self.ENV == "production" and self.DATABASE_URL.startswith("sqlite"):
            raise ValueError("production needs PostgreSQL: set RETINAEDGE_DATABASE_URL=postgresql://...")
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.DATABASE_URL.startswith("sqlite")
