"""The learned gradability score: a logistic model over the quality gate's own indicators.

Rules name what they catch ("too bright"); a photo that human graders reject can fail no single limit and still be
poor everywhere at once (soft, a little hazy, a little dark). The model weighs every indicator together. It was
fitted by ``python -m studies.quality_model`` to the EyeQ graders' labels of the train photos plus code-made
degradations of them, and its threshold chosen out of fold on train/val/calib for a target share of the graders'
rejects caught; the operating point records that share and the graders' good photos kept, each with a 95% Wilson
interval (like the referral point).

It is numpy only, with its coefficients in a data file (``edge_runtime/data/quality_model.json``) shipped with the
runtime: it runs wherever the edge runtime runs, beside every exported model format, and is independent of the
grading model. The decision is taken by :func:`edge_runtime.decision.decide_gradability` at its operating point.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any

import numpy as np

from .contract import OperatingPoint
from .errors import ConfigError

MODEL_FILE = "data/quality_model.json"
LOG_OFFSET = 1e-3  # log(value + offset) for the positive, heavy-tailed indicators


@dataclass(frozen=True)
class GradabilityModel:
    """Standardised (log) indicators -> logit of P(ungradable)."""

    features: tuple[str, ...]
    log_features: frozenset[str]
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    point: OperatingPoint  # threshold on P(ungradable); sensitivity = graders' rejects caught where it was chosen
    version: str  # sha256 of the coefficients (first 12 hex digits)

    def __post_init__(self) -> None:
        n = len(self.features)
        if not n or any(len(a) != n for a in (self.mean, self.scale, self.coef)):
            raise ConfigError(f"quality model: features, mean, scale and coef must have one entry per feature ({n})")
        if not (np.all(np.isfinite(self.coef)) and np.all(self.scale > 0) and np.isfinite(self.intercept)):
            raise ConfigError("quality model: coefficients must be finite and scales positive; re-run studies.quality_model")

    def inputs(self, metrics: dict[str, float]) -> np.ndarray:
        """The standardised feature vector of one photo's indicators."""
        missing = [f for f in self.features if f not in metrics]
        if missing:
            raise ConfigError(f"quality model needs indicators {missing} that the gate did not measure")
        x = np.array([np.log(max(metrics[f], 0.0) + LOG_OFFSET) if f in self.log_features else metrics[f]
                      for f in self.features], np.float64)
        return (x - self.mean) / self.scale

    def logit(self, metrics: dict[str, float]) -> float:
        return float(self.inputs(metrics) @ self.coef + self.intercept)

    def to_dict(self) -> dict[str, Any]:
        return {"features": list(self.features), "log_features": sorted(self.log_features),
                "mean": self.mean.tolist(), "scale": self.scale.tolist(), "coef": self.coef.tolist(),
                "intercept": self.intercept, "operating_point": _point_dict(self.point)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GradabilityModel:
        try:
            arrays = {k: np.asarray(data[k], np.float64) for k in ("mean", "scale", "coef")}
            point = OperatingPoint(**{k: tuple(v) if isinstance(v, list) else v
                                      for k, v in data["operating_point"].items()})
            version = hashlib.sha256(json.dumps([data["features"], data["coef"], data["intercept"]],
                                                sort_keys=True).encode()).hexdigest()[:12]
            return cls(tuple(data["features"]), frozenset(data.get("log_features", ())), **arrays,
                       intercept=float(data["intercept"]), point=point, version=version)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"quality model data is malformed ({exc}); re-run studies.quality_model") from exc


def _point_dict(point: OperatingPoint) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(point).items()}


def packaged_model() -> GradabilityModel | None:
    """The model shipped with the runtime (``data/quality_model.json``); None where it has not been fitted."""
    path = resources.files(__package__).joinpath(MODEL_FILE)
    if not path.is_file():
        return None
    return GradabilityModel.from_dict(json.loads(path.read_text()))
