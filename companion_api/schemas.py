"""Request/response schemas (pydantic). The sync shapes follow the contract in edge_runtime.sync."""
from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field


class QualityIn(BaseModel):
    gradable: bool
    score: float = Field(ge=0, le=1)
    reasons: list[str] = Field(default_factory=list, max_length=50)
    metrics: dict[str, float] = Field(default_factory=dict)


class ResultIn(BaseModel):
    """A ScreeningResult as the edge runtime serialises it."""

    result_id: str = Field(pattern=r"^[0-9a-fA-F-]{36}$")
    device_id: str = Field(max_length=120)
    model_version: str = Field(max_length=200)
    model_sha256: str = Field(max_length=64)
    backend: str = Field(max_length=40)
    provider: str = Field(max_length=80)
    quality: QualityIn
    grade: int | None = Field(default=None, ge=0, le=4)
    grade_name: str | None = None
    probabilities: list[float] | None = Field(default=None, min_length=5, max_length=5)
    confidence: float | None = Field(default=None, ge=0, le=1)
    referable: bool | None = None
    outcome: Literal["graded", "ungradable"] = "graded"
    cam_peak: list[float] | None = Field(default=None, min_length=2, max_length=2)
    latency_ms: dict[str, float] = Field(default_factory=dict)
    captured_at: datetime
    image_name: str | None = Field(default=None, max_length=255)
    disclaimer: str | None = None


class SyncEntry(BaseModel):
    result: ResultIn
    content_hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    overlay_png_b64: str | None = None
    image_b64: str | None = None


class SyncRequest(BaseModel):
    results: list[SyncEntry] = Field(max_length=1000)


class SyncItemStatus(BaseModel):
    result_id: str
    status: Literal["stored", "duplicate", "conflict", "rejected"]
    detail: str = ""


class SyncResponse(BaseModel):
    items: list[SyncItemStatus]


class ResultPublic(BaseModel):
    result_id: str
    device: str
    outcome: str
    grade: int | None
    grade_name: str | None
    referable: bool | None
    confidence: float | None
    captured_at: datetime
    received_at: datetime
    has_overlay: bool
    result: dict[str, Any]
    disclaimer: str


class ResultsPublic(BaseModel):
    data: list[ResultPublic]
    count: int
    offset: int
    limit: int


class InsightBody(BaseModel):
    """What an insight must contain, whichever source wrote it."""

    summary: str = Field(max_length=1200)
    follow_up_interval: str = Field(max_length=120)
    referral_urgency: Literal["none", "routine", "soon", "urgent", "retake"]
    caveats: list[str] = Field(default_factory=list, max_length=8)


class InsightPublic(InsightBody):
    result_id: str
    source: Literal["gemini", "guideline"]
    disclaimer: str


class PredictResponse(BaseModel):
    result_id: str
    grade: int | None
    grade_name: str | None
    confidence: float | None
    probabilities: list[float] | None
    referable: bool | None
    outcome: str
    quality: QualityIn
    model_version: str
    overlay_png_b64: str | None
    disclaimer: str


class ModelPublic(BaseModel):
    format: str
    filename: str
    sha256: str
    manifest: dict[str, Any]
    download_url: str
    uploaded_at: datetime
