"""Server settings: the only place (with the CLI) that reads the environment or .env."""
from __future__ import annotations

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RETINAEDGE_", env_file=".env", extra="ignore")

    ENV: str = "development"  # development | production
    DATABASE_URL: str = "sqlite:///./retinaedge.db"  # postgresql://user@host/db in production
    REDIS_URL: str | None = None  # shared rate-limit counters across workers; in-process when unset
    RATE_LIMIT: str = "600/minute"  # per token
    MAX_BODY_BYTES: int = 25 * 1024 * 1024
    MAX_IMAGE_BYTES: int = 15 * 1024 * 1024
    MAX_IMAGE_PIXELS: int = 40_000_000
    MAX_SYNC_ITEMS: int = 200
    CORS_ORIGINS: list[str] = Field(default_factory=list)  # CORS is off unless origins are listed
    TEACHER_CHECKPOINT: str | None = None  # FP32 teacher for /v1/predict
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
        if self.ENV == "production" and self.DATABASE_URL.startswith("sqlite"):
            raise ValueError("production needs PostgreSQL: set RETINAEDGE_DATABASE_URL=postgresql://...")
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.DATABASE_URL.startswith("sqlite")
