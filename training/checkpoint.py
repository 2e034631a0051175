"""What a RetinaEdge checkpoint says about itself: one typed, validated record instead of a dict read with defaults."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from edge_runtime.contract import DEFAULT_HEADS, GRADE_NAMES, OperatingPoint, PreprocessPolicy, check_heads
from edge_runtime.errors import ManifestError

from .errors import CheckpointError

# The forms the 5-grade head can take (training.models.GRADE_HEADS builds them): plain softmax over five linear
# logits, or the adjacent-category ordinal model (one severity score; training.models.OrdinalGradeHead).
GRADE_HEAD_FORMS = ("softmax", "ordinal")


@dataclass(frozen=True)
class CheckpointMeta:
    """The metadata ``training.train.fit`` saves beside the weights (``best.pt["meta"]``)."""

    model_name: str  # registered name (training.models.list_models())
    preprocess: PreprocessPolicy  # how photos become this model's input
    operating_point: OperatingPoint = field(default_factory=OperatingPoint)  # referral point chosen on val
    data_fingerprint: str | None = None  # of the training photos
    num_features: int | None = None  # width of the pooled features (the CAM head's input)
    class_names: tuple[str, ...] = GRADE_NAMES
    heads: tuple[str, ...] = DEFAULT_HEADS  # the model's heads (edge_runtime.contract.HEADS); older checkpoints: grade
    grade_head: str = "softmax"  # softmax | ordinal (training.models.GRADE_HEADS); older checkpoints: softmax
    dme_operating_point: OperatingPoint | None = None  # where "DME present" is decided, chosen on val (DME head only)
    # Which val photos chose the referral point, and how: weighting (pooled | per_folder), the val fingerprint, and
    # per folder n, n_positive, n_negative and the val sensitivity/specificity at the point (training.referral).
    referral_point_photos: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)  # val/test metrics at the operating point
    config: dict[str, Any] = field(default_factory=dict)  # the resolved TrainConfig
    ema_weights: bool = False  # model_state is the moving average of the weights (config ema_decay), not one step's
    distillation: dict[str, Any] = field(default_factory=dict)  # teachers and photos of a distilled model
    git_sha: str | None = None
    created_at: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model_name, str) or not self.model_name:
            raise CheckpointError(f"checkpoint meta.model_name must be a non-empty string, got {self.model_name!r}")
        if tuple(self.class_names) != GRADE_NAMES:
            raise CheckpointError(f"checkpoint meta.class_names must be the ICDR grades {GRADE_NAMES}, "
                                  f"got {self.class_names!r}")
        object.__setattr__(self, "class_names", tuple(self.class_names))
        if self.grade_head not in GRADE_HEAD_FORMS:
            raise CheckpointError(f"checkpoint meta.grade_head must be one of {GRADE_HEAD_FORMS}, got {self.grade_head!r}")
        try:
            object.__setattr__(self, "heads", check_heads(self.heads, "checkpoint meta.heads"))
        except ManifestError as exc:
            raise CheckpointError(str(exc)) from exc

    @property
    def has_dme(self) -> bool:
        return "dme" in self.heads

    @property
    def dme_point(self) -> OperatingPoint | None:
        """The DME operating point a manifest carries: the one chosen on val, else the default 0.5 (DME head
        only; None without one)."""
        if not self.has_dme:
            return None
        return self.dme_operating_point or OperatingPoint()

    def rule_and_target(self, head: str) -> tuple[str, float | None]:
        """The rule and target that re-choose ``head``'s point (``grade``: referral; ``dme``) on other outputs of this
        model (an exported artifact's, or new val photos): those of the point recorded here when it was chosen on
        data, else the training config's (``dme_rule``/``dme_target``) or sensitivity >= 0.90."""
        point = self.operating_point if head == "grade" else self.dme_operating_point
        if point is not None and point.chosen_on_data:
            return point.rule, point.target
        if head == "grade":
            return "sensitivity", 0.90
        return self.config.get("dme_rule", "sensitivity"), self.config.get("dme_target", 0.90)

    @property
    def input_size(self) -> int:
        return self.preprocess.input_size

    def model_version(self, precision: str) -> str:
        """The one model-version string: model, training-data fingerprint, precision (e.g. lite0-1a2b3c4d-int8)."""
        return f"{self.model_name}-{(self.data_fingerprint or 'nodata')[:8]}-{precision}"

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["input_size"] = self.input_size  # kept for readers of older RetinaEdge versions
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "checkpoint") -> CheckpointMeta:
        """Validate a saved ``meta``; older checkpoints kept a bare ``referable_threshold`` (never chosen on data)."""
        if not isinstance(data, dict):
            raise CheckpointError(f"{source}: meta must be a dict, got {type(data).__name__}; re-train or re-save it")
        data = dict(data)
        data.pop("input_size", None)  # derived from preprocess
        threshold = data.pop("referable_threshold", None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CheckpointError(f"{source}: unknown meta field(s) {unknown}; known: {sorted(known)}")
        for required in ("model_name", "preprocess"):
            if required not in data:
                raise CheckpointError(f"{source}: meta has no {required!r}; it was not written by `retinaedge train`")
        try:
            data["preprocess"] = PreprocessPolicy.from_dict(data["preprocess"])
            point = data.get("operating_point")
            if isinstance(point, dict):
                data["operating_point"] = OperatingPoint(**point)
            elif point is None:
                data["operating_point"] = OperatingPoint(threshold=float(threshold if threshold is not None else 0.5))
            if isinstance(data.get("dme_operating_point"), dict):
                data["dme_operating_point"] = OperatingPoint(**data["dme_operating_point"])
            return cls(**data)
        except (ManifestError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{source}: invalid meta: {exc}") from exc
