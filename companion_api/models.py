"""SQLAlchemy 2 tables. Handlers return the pydantic *Public schemas, never these."""
from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def now() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """Timestamps are stored in UTC and come back timezone-aware on every backend.

    SQLite has no timezone type: SQLAlchemy writes the wall-clock digits and drops the offset, so 10:00+05:30
    came back as 10:00 and landed in the wrong since/until window. Converting to UTC before binding (values and
    query parameters alike) keeps stored strings comparable; on the way out the UTC zone is put back.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: the server stores timezone-aware UTC timestamps only")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    pass


class Principal(Base):
    __tablename__ = "principals"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(120), unique=True, index=True)
    role: Mapped[str] = mapped_column(String(16))  # device | reviewer | publisher
    token_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=now)


class Result(Base):
    """A device's result. The key is (device, result_id): result ids are chosen by devices, so a global key would
    let one device squat another's ids and answer "belongs to another device" (an id oracle)."""

    __tablename__ = "results"
    # One index per history view, in the views' order (captured_at, device, result_id), so every page is an index
    # range read from its cursor, never a scan or a count of the table (migration 0004).
    __table_args__ = (
        Index("ix_results_encounter", "device", "encounter_id"),
        Index("ix_results_page", "captured_at", "device", "result_id"),
        Index("ix_results_device_page", "device", "captured_at", "result_id"),
        Index("ix_results_grade_page", "grade", "captured_at", "device", "result_id"),
        Index("ix_results_referable_page", "referable", "captured_at", "device", "result_id"),
        Index("ix_results_dme_page", "dme_present", "captured_at", "device", "result_id"),
    )
    device: Mapped[str] = mapped_column(String(120), ForeignKey("principals.name"), primary_key=True)
    result_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    content_hash: Mapped[str] = mapped_column(String(64))
    payload: Mapped[str] = mapped_column(Text)  # ScreeningResult JSON
    outcome: Mapped[str] = mapped_column(String(16), index=True)
    grade: Mapped[int | None] = mapped_column(Integer, nullable=True)
    referable: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    confidence: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Models with a DME head (migration 0003); NULL for DR-only models and ungradable captures.
    dme_present: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    dme_probability: Mapped[float | None] = mapped_column(Float, nullable=True)
    captured_at: Mapped[datetime] = mapped_column(UTCDateTime)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=now)
    # The device clock was outside the plausible window: captured_at is then the server's receive time, and this
    # the device's claim minus it (the claim itself stays in payload). NULL: the device's time was used.
    clock_skew_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    overlay_png: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    image: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    encounter_id: Mapped[str | None] = mapped_column(String(64), nullable=True)  # one patient visit, both eyes
    eye: Mapped[str | None] = mapped_column(String(5), nullable=True)  # left | right


class Encounter(Base):
    """One patient visit of a device: kept beside its results so the visit list pages by an index (newest visit
    first) instead of grouping every result; ``captures`` bounds how many results one visit may hold."""

    __tablename__ = "encounters"
    __table_args__ = (
        Index("ix_encounters_page", "last_captured_at", "device", "encounter_id"),
        Index("ix_encounters_device_page", "device", "last_captured_at", "encounter_id"),
    )
    device: Mapped[str] = mapped_column(String(120), ForeignKey("principals.name"), primary_key=True)
    encounter_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    last_captured_at: Mapped[datetime] = mapped_column(UTCDateTime)
    captures: Mapped[int] = mapped_column(Integer)
    # A clinician's decision for the visit (migration 0006): it replaces the automatic one, which stays shown.
    override_decision: Mapped[str | None] = mapped_column(String(16), nullable=True)  # refer | no_referral
    override_reason: Mapped[str | None] = mapped_column(String(500), nullable=True)
    override_by: Mapped[str | None] = mapped_column(String(120), nullable=True)
    override_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Insight(Base):
    __tablename__ = "insights"
    __table_args__ = (ForeignKeyConstraint(["device", "result_id"], ["results.device", "results.result_id"]),)
    device: Mapped[str] = mapped_column(String(120), primary_key=True)
    result_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    source: Mapped[str] = mapped_column(String(16))  # gemini | guideline
    body: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=now)


class ModelArtifact(Base):
    __tablename__ = "model_artifacts"
    __table_args__ = (Index("ix_model_artifacts_release", "format", "sequence"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    format: Mapped[str] = mapped_column(String(16), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    sha256: Mapped[str] = mapped_column(String(64))
    manifest: Mapped[str] = mapped_column(Text)
    path: Mapped[str] = mapped_column(String(500))
    uploaded_by: Mapped[str] = mapped_column(String(120))
    uploaded_at: Mapped[datetime] = mapped_column(UTCDateTime, default=now)
    # The signed release's sequence (edge_runtime.signing.Release): /latest is the highest, not the newest upload.
    # NULL only for unsigned uploads a development server accepted (ALLOW_UNSIGNED_MODELS).
    sequence: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # published: devices cap the download


class AuditEvent(Base):
    __tablename__ = "audit_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=now, index=True)
    principal: Mapped[str] = mapped_column(String(120), index=True)
    action: Mapped[str] = mapped_column(String(40))
    target: Mapped[str | None] = mapped_column(String(200), nullable=True)
    detail: Mapped[str | None] = mapped_column(String(500), nullable=True)
