"""The contract every RetinaEdge package shares: ICDR grades, the artifact manifest and the screening result.

Torch-free on purpose: the edge runtime, the exporters and the companion server all read these types.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any

from .errors import ManifestError

# 2: operating_point replaces referable_threshold; 3: heads + dme_operating_point; 4: quantization counts as integers;
# 5: quantization.bias_correction
MANIFEST_SCHEMA_VERSION = 5
SCREENING_DISCLAIMER = (
    "RetinaEdge assists diabetic-retinopathy screening; it does not diagnose. "
    "A qualified clinician must confirm every result."
)


class Grade(int, Enum):
    """International Clinical Diabetic Retinopathy (ICDR) severity scale."""

    NO_DR = 0
    MILD = 1
    MODERATE = 2
    SEVERE = 3
    PROLIFERATIVE = 4

    @property
    def label(self) -> str:
        return GRADE_NAMES[int(self)]

    @property
    def referable(self) -> bool:
        """Referable DR is "more than mild": moderate NPDR or worse."""
        return int(self) >= REFERABLE_MIN_GRADE


GRADE_NAMES: tuple[str, ...] = ("No DR", "Mild NPDR", "Moderate NPDR", "Severe NPDR", "Proliferative DR")
NUM_GRADES = len(GRADE_NAMES)
REFERABLE_MIN_GRADE = 2
OUTPUT_NAMES: tuple[str, str] = ("logits", "cam")


@dataclass(frozen=True)
class HeadSpec:
    """One supervised head over the shared pooled features: its graph outputs (a logit tensor and its exact CAM)."""

    name: str  # how manifests, checkpoints and configs name it
    outputs: tuple[str, str]  # (logits N x k, cam N x k x h x w): logits[j] = mean(cam[j]) + bias[j]
    classes: int  # k
    description: str


# Every artifact has the grade head, first; the others are optional and follow in this order.
HEADS: dict[str, HeadSpec] = {
    spec.name: spec
    for spec in (
        HeadSpec("grade", OUTPUT_NAMES, NUM_GRADES, "ICDR grades 0-4 (softmax); referable DR = P(grade >= 2)"),
        HeadSpec("dme", ("dme_logit", "dme_cam"), 1, "diabetic macular edema present (sigmoid)"),
    )
}
DEFAULT_HEADS: tuple[str, ...] = ("grade",)


def check_heads(heads: Any, what: str = "heads") -> tuple[str, ...]:
    """Validated head names in canonical order: ``grade`` first, each known head at most once."""
    if isinstance(heads, str):
        heads = (heads,)
    heads = tuple(heads)
    unknown = [h for h in heads if h not in HEADS]
    if unknown or len(set(heads)) != len(heads) or not heads or heads[0] != "grade":
        raise ManifestError(f"{what} must list 'grade' first and then any of {list(HEADS)[1:]} once each, "
                            f"got {list(heads)}" + (f" (unknown: {unknown})" if unknown else ""))
    return tuple(h for h in HEADS if h in heads)


def output_names_for(heads: tuple[str, ...]) -> tuple[str, ...]:
    """The graph's output names for these heads, in order: logits, cam[, dme_logit, dme_cam]."""
    return tuple(name for head in check_heads(heads) for name in HEADS[head].outputs)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file, or of every file under a directory artifact (e.g. a CoreML .mlpackage)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as fh:
            while block := fh.read(chunk):
                digest.update(block)
    return digest.hexdigest()


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class PreprocessPolicy:
    """How a raw fundus photo becomes a model input. Every consumer reads it from the manifest."""

    input_size: int = 224  # square side in pixels after crop + pad + resize
    color_order: str = "RGB"  # channel order the model expects
    mean: tuple[float, float, float] = IMAGENET_MEAN  # per channel, on 0-1 scaled pixels
    std: tuple[float, float, float] = IMAGENET_STD
    crop_to_fundus: bool = True  # detect the circular field of view and crop to its bounding box
    fov_threshold: int = 12  # 8-bit intensity above which a pixel is inside the field of view
    ben_graham: bool = False  # local-contrast normalisation: 4*img - 4*blur(img) + 128
    ben_graham_sigma_fraction: float = 1 / 30  # Gaussian sigma as a fraction of input_size
    resize_interpolation: str = "INTER_AREA"
    layout: str = "NCHW"

    def __post_init__(self) -> None:
        if not 16 <= int(self.input_size) <= 2048:
            raise ManifestError(f"preprocess.input_size must be in [16, 2048], got {self.input_size!r}")
        if self.color_order not in ("RGB", "BGR"):
            raise ManifestError(f"preprocess.color_order must be 'RGB' or 'BGR', got {self.color_order!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise ManifestError(f"preprocess.mean/std must be 3 values with std > 0, got {self.mean}/{self.std}")
        if self.layout not in ("NCHW", "NHWC"):
            raise ManifestError(f"preprocess.layout must be 'NCHW' or 'NHWC', got {self.layout!r}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessPolicy:
        """From a checkpoint's or manifest's JSON-ish dict (lists become tuples; unknown keys are an error)."""
        return _sub(cls, {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}, "preprocess")


@dataclass(frozen=True)
class BiasCorrectionInfo:
    """The empirical output-bias correction an INT8 artifact was made with (``compression.bias_correction``):
    FP32's classifier biases minus the mean (INT8 - FP32) head outputs measured on ``split`` photos, then quantized
    again. Values are per head output the referral decision uses (``logits``: 5 values; ``dme_logit``: 1)."""

    passes: int  # how many times the shift was measured, subtracted and the model quantized again
    subtracted: dict[str, tuple[float, ...]]  # the total taken off FP32's bias, per output
    measured: tuple[dict[str, tuple[float, ...]], ...]  # mean (INT8 - FP32) before each pass
    residual: dict[str, tuple[float, ...]]  # mean (INT8 - FP32) of the artifact that stands, on the same photos
    split: str = "calib"  # the photos that chose it: never the gate set
    n: int = 0
    fingerprint: str | None = None  # of those photos (``ExportPhotos.digest``)
    photo_ids: tuple[str, ...] = ()  # per photo: SHA-1 (12 hex) of its preprocessed pixels

    def __post_init__(self) -> None:
        if isinstance(self.passes, bool) or not isinstance(self.passes, int) or self.passes < 1:
            raise ManifestError(f"quantization.bias_correction.passes must be an integer >= 1, got {self.passes!r}")

        def values(d) -> dict[str, tuple[float, ...]]:
            if not isinstance(d, dict):
                raise ManifestError(f"quantization.bias_correction values must be objects, got {type(d).__name__}")
            return {str(k): tuple(float(x) for x in v) for k, v in d.items()}

        object.__setattr__(self, "subtracted", values(self.subtracted))
        object.__setattr__(self, "measured", tuple(values(d) for d in self.measured))
        object.__setattr__(self, "residual", values(self.residual))
        object.__setattr__(self, "photo_ids", tuple(self.photo_ids))
        if len(self.measured) != self.passes:
            raise ManifestError(f"quantization.bias_correction lists {len(self.measured)} measured shifts for "
                                f"{self.passes} passes")
        if self.photo_ids and len(self.photo_ids) != self.n:
            raise ManifestError(f"quantization.bias_correction lists {len(self.photo_ids)} photo ids for n={self.n}")


@dataclass(frozen=True)
class QuantizationInfo:
    """How the weights and activations of an artifact are stored."""

    precision: str = "fp32"  # fp32 | fp16 | int8
    recipe: str | None = None  # registered recipe name, e.g. "ort", "nncf", "pt2e"
    activation_type: str | None = None  # e.g. "uint8"
    weight_type: str | None = None  # e.g. "uint8" (U8U8 on AVX2 without VNNI, see TOOLCHAIN.md)
    per_channel: bool | None = None
    calibration: str | None = None  # minmax | percentile | entropy
    calibration_images: int | None = None
    target: str | None = None  # CPU class the recipe was chosen for, e.g. "x86_avx2"
    notes: str | None = None  # the recipe's choices in words (layers kept in float by pattern, reduced range)
    # What the file really runs, read back from it rather than from the recipe (a weight stored as int8 does not
    # make a convolution integer): weighted layers (Conv/Gemm/MatMul), the names of those left in float, and the
    # convolutions the runtime fuses into integer kernels. None where the format cannot be inspected here.
    weighted_layers: int | None = None
    float_layers: tuple[str, ...] = ()
    convolutions: int | None = None
    integer_kernels: int | None = None
    bias_correction: BiasCorrectionInfo | None = None  # set when the recipe corrected FP32's output biases

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "fp16", "int8"):
            raise ManifestError(f"quantization.precision must be fp32|fp16|int8, got {self.precision!r}")
        if isinstance(self.bias_correction, dict):
            object.__setattr__(self, "bias_correction",
                               _sub(BiasCorrectionInfo, self.bias_correction, "quantization.bias_correction"))
        object.__setattr__(self, "float_layers", tuple(self.float_layers))
        for name in ("weighted_layers", "convolutions", "integer_kernels"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ManifestError(f"quantization.{name} must be a count (an integer >= 0), got {value!r}")
        if None not in (self.integer_kernels, self.convolutions) and self.integer_kernels > self.convolutions:
            raise ManifestError(f"quantization.integer_kernels ({self.integer_kernels}) exceeds convolutions "
                                f"({self.convolutions})")

    @property
    def fully_integer(self) -> bool | None:
        """Every convolution runs as an integer kernel; None where the runtime's graph was not inspected."""
        if self.integer_kernels is None or self.convolutions is None:
            return None
        return self.integer_kernels == self.convolutions

    def describe(self) -> str:
        """One line for tables and logs, e.g. "0 of 51 weighted layers in float; 50 of 50 convolutions integer"."""
        parts = [self.notes] if self.notes else []
        if self.weighted_layers is not None:
            named = f" ({', '.join(self.float_layers[:8])}{', ...' if len(self.float_layers) > 8 else ''})"
            parts.append(f"{len(self.float_layers)} of {self.weighted_layers} weighted layers in float"
                         + (named if self.float_layers else ""))
        if self.convolutions is not None:
            parts.append(f"{self.integer_kernels} of {self.convolutions} convolutions run as integer kernels")
        return "; ".join(parts)


class GateStatus(StrEnum):
    """The fidelity gate's verdict. A StrEnum: it compares equal to, and serialises as, its value."""

    PASSED = "passed"
    FAILED = "failed"
    INSUFFICIENT_EVIDENCE = "insufficient_evidence"  # nothing failed, but too few photos to say it passed
    NOT_RUN = "not_run"  # e.g. an INT8 artifact whose runtime cannot run here and has no torch graph to judge
    NOT_REQUIRED = "not_required"  # FP32, and FP16 within its parity tolerance


GATE_STATUSES = tuple(status.value for status in GateStatus)


@dataclass(frozen=True)
class GateCriterion:
    """One line of the fidelity gate: a number, its interval and the bound judged against the threshold."""

    name: str
    value: float | None  # point estimate (None: could not be computed, e.g. no referable photos)
    bound: float | None = None  # one-sided confidence bound (lower for "min", upper for "max"), when judged on evidence
    threshold: float | None = None  # None: reported only
    margin: float | None = None  # how far (bound, else value) clears the threshold; negative when it fails
    passed: bool | None = None  # None: reported only, or not computable
    interval: tuple[float, float] | None = None  # two-sided interval at the gate's confidence, for the reader
    n: int | None = None  # photos the number rests on
    method: str = ""  # how the interval/bound was computed
    photos_needed: int | None = None  # agreement criteria: fewest photos with which perfect agreement clears it
    direction: str = "min"  # "min": must reach the threshold; "max": must stay at or below it

    @property
    def evidence_limited(self) -> bool:
        """Failed only for want of photos: the observed value reaches the threshold, but with n below
        ``photos_needed`` not even perfect agreement could lift the bound to it."""
        return (self.passed is False and self.photos_needed is not None and self.n is not None
                and self.n < self.photos_needed and self.value is not None and self.threshold is not None
                and self.value >= self.threshold)

    def __post_init__(self) -> None:
        if self.interval is not None:
            object.__setattr__(self, "interval", tuple(float(v) for v in self.interval))
        if self.direction not in ("min", "max"):
            raise ManifestError(f"gate criterion {self.name}: direction must be min|max, got {self.direction!r}")


@dataclass(frozen=True)
class GateResult:
    """Outcome of the fidelity gate (INT8 vs FP32 of the same model) or of FP parity checks."""

    status: GateStatus = GateStatus.NOT_RUN
    metrics: dict[str, float] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    failures: tuple[str, ...] = ()
    criteria: tuple[GateCriterion, ...] = ()  # the gate's table; empty for FP parity checks and v1 manifests

    def __post_init__(self) -> None:
        if self.status not in GATE_STATUSES:
            raise ManifestError(f"gate.status must be {'|'.join(GATE_STATUSES)}, got {self.status!r}")
        object.__setattr__(self, "status", GateStatus(self.status))
        object.__setattr__(self, "failures", tuple(self.failures))
        object.__setattr__(self, "criteria", tuple(
            c if isinstance(c, GateCriterion) else _sub(GateCriterion, c, "gate.criteria[]") for c in self.criteria))


REFERRAL_RULES = ("sensitivity", "specificity", "youden", "default")


def _interval(value: Any, name: str) -> tuple[float, float] | None:
    if value is None:
        return None
    low, high = (float(v) for v in value)
    if not 0.0 <= low <= high <= 1.0:
        raise ManifestError(f"operating_point.{name} must be 0 <= low <= high <= 1, got {value!r}")
    return low, high


@dataclass(frozen=True)
class OperatingPoint:
    """Where the referral decision is taken, chosen on labelled val photos and recorded with its evidence."""

    rule: str = "default"  # sensitivity | specificity | youden | default (0.5, not chosen on data)
    target: float | None = None  # the sensitivity/specificity aimed for
    threshold: float = 0.5  # on the calibrated referable probability P(grade >= 2)
    temperature: float = 1.0  # probabilities = softmax(logits / temperature)
    uncertain_band: tuple[float, float] | None = None  # [low, high): "uncertain", never a clean negative
    sensitivity: float | None = None  # on the val photos at this threshold
    sensitivity_ci: tuple[float, float] | None = None  # 95% Wilson interval
    specificity: float | None = None
    specificity_ci: tuple[float, float] | None = None
    n_positive: int | None = None  # referable val photos the point was chosen on
    n_negative: int | None = None
    val_fingerprint: str | None = None  # which photos: sha256 over their names and labels
    calibration: dict[str, float] = field(default_factory=dict)  # ECE / Brier before and after temperature scaling

    def __post_init__(self) -> None:
        if self.rule not in REFERRAL_RULES:
            raise ManifestError(f"operating_point.rule must be one of {REFERRAL_RULES}, got {self.rule!r}")
        if self.target is not None and not 0.0 < float(self.target) < 1.0:
            raise ManifestError(f"operating_point.target must be in (0, 1), got {self.target!r}")
        if not 0.0 < float(self.threshold) < 1.0:
            raise ManifestError(f"operating_point.threshold must be in (0, 1), got {self.threshold!r}")
        if not 0.05 <= float(self.temperature) <= 20.0:
            raise ManifestError(f"operating_point.temperature must be in [0.05, 20], got {self.temperature!r}")
        band = _interval(self.uncertain_band, "uncertain_band")
        if band is not None and not band[0] <= float(self.threshold) <= band[1]:
            raise ManifestError(f"operating_point.uncertain_band {band} must contain the threshold {self.threshold}")
        object.__setattr__(self, "threshold", float(self.threshold))
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "uncertain_band", band)
        object.__setattr__(self, "sensitivity_ci", _interval(self.sensitivity_ci, "sensitivity_ci"))
        object.__setattr__(self, "specificity_ci", _interval(self.specificity_ci, "specificity_ci"))

    @property
    def chosen_on_data(self) -> bool:
        return self.rule != "default"

    def describe(self) -> str:
        """One line for people: where referral is decided and on what evidence."""
        if not self.chosen_on_data:
            return f"threshold {self.threshold:.3f} (default, not chosen on data)"
        text = f"threshold {self.threshold:.3f} for {self.rule}"
        if self.target is not None:
            text += f" >= {self.target:.2f}"
        if self.sensitivity is not None and self.sensitivity_ci is not None:
            low, high = self.sensitivity_ci
            text += f"; val sensitivity {self.sensitivity:.3f} [{low:.3f}, {high:.3f}] (n+={self.n_positive})"
        return text


@dataclass(frozen=True)
class ArtifactManifest:
    """Self-description every artifact carries (embedded and beside it as <name>.manifest.json)."""

    model_name: str
    model_version: str
    format: str  # key into exporters.formats.FORMATS
    preprocess: PreprocessPolicy = field(default_factory=PreprocessPolicy)
    class_names: tuple[str, ...] = GRADE_NAMES
    output_names: tuple[str, ...] = OUTPUT_NAMES  # output_names_for(heads)
    cam_shape: tuple[int, int] | None = None  # (h, w) of the cam output (every head's CAM has this grid)
    operating_point: OperatingPoint = field(default_factory=OperatingPoint)  # where referral is decided
    heads: tuple[str, ...] = DEFAULT_HEADS  # HEADS the graph outputs; manifests before schema 3: grade only
    # Where "DME present" is decided (threshold on sigmoid(dme_logit / temperature)); set exactly when heads has dme.
    dme_operating_point: OperatingPoint | None = None
    quantization: QuantizationInfo = field(default_factory=QuantizationInfo)
    gate: GateResult = field(default_factory=GateResult)
    sha256: str | None = None  # of the model file; None only while the file is being written
    training_data_fingerprint: str | None = None
    git_sha: str | None = None
    created_at: str = field(default_factory=utcnow)
    schema_version: int = MANIFEST_SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    # Ed25519 over the canonical manifest without this field (edge_runtime.signing); None when unsigned.
    signature: dict[str, str] | None = None

    def __post_init__(self) -> None:
        for name in ("model_name", "model_version", "format"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ManifestError(f"manifest.{name} must be a non-empty string, got {getattr(self, name)!r}")
        if len(self.class_names) != NUM_GRADES:
            raise ManifestError(f"manifest.class_names must list {NUM_GRADES} ICDR grades, got {len(self.class_names)}")
        object.__setattr__(self, "heads", check_heads(self.heads, "manifest.heads"))
        expected = output_names_for(self.heads)
        if tuple(self.output_names) != expected:
            raise ManifestError(f"manifest.output_names must be {expected} for heads {list(self.heads)}, "
                                f"got {tuple(self.output_names)}")
        if ("dme" in self.heads) != (self.dme_operating_point is not None):
            raise ManifestError("manifest.dme_operating_point is set exactly when heads lists 'dme' "
                                f"(heads {list(self.heads)}, dme_operating_point {self.dme_operating_point!r})")
        if self.schema_version > MANIFEST_SCHEMA_VERSION:
            raise ManifestError(
                f"manifest.schema_version {self.schema_version} is newer than this RetinaEdge understands "
                f"({MANIFEST_SCHEMA_VERSION}); upgrade retinaedge"
            )
        if self.sha256 is not None and (len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256)):
            raise ManifestError(f"manifest.sha256 must be 64 lowercase hex characters, got {self.sha256!r}")
        object.__setattr__(self, "class_names", tuple(self.class_names))
        object.__setattr__(self, "output_names", tuple(self.output_names))
        if self.cam_shape is not None:
            object.__setattr__(self, "cam_shape", tuple(int(v) for v in self.cam_shape))

    @property
    def has_dme(self) -> bool:
        return "dme" in self.heads

    @property
    def ready(self) -> bool:
        """An artifact is ready for screening unless its fidelity gate failed or never ran on INT8."""
        return self.gate.status in (GateStatus.PASSED, GateStatus.NOT_REQUIRED)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArtifactManifest:
        if not isinstance(data, dict):
            raise ManifestError(f"manifest must be a JSON object, got {type(data).__name__}")
        try:
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = set(data) - known - ({"referable_threshold"} if data.get("schema_version", 1) < 2 else set())
            if unknown:
                raise ManifestError(f"manifest has unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
            missing = [n for n in ("model_name", "model_version", "format") if n not in data]
            if missing:
                raise ManifestError(f"manifest is missing required field(s) {missing}")
            kwargs = dict(data)
            if "referable_threshold" in kwargs:  # schema 1 kept a bare threshold, never chosen on data
                kwargs["operating_point"] = {"threshold": kwargs.pop("referable_threshold")}
            kwargs["operating_point"] = _sub(OperatingPoint, kwargs.get("operating_point", {}), "operating_point")
            if kwargs.get("dme_operating_point") is not None:
                kwargs["dme_operating_point"] = _sub(OperatingPoint, kwargs["dme_operating_point"], "dme_operating_point")
            kwargs["preprocess"] = _sub(PreprocessPolicy, data.get("preprocess", {}), "preprocess")
            kwargs["quantization"] = _sub(QuantizationInfo, data.get("quantization", {}), "quantization")
            kwargs["gate"] = _sub(GateResult, data.get("gate", {}), "gate")
            return cls(**kwargs)
        except ManifestError:
            raise
        except (TypeError, ValueError, RecursionError) as exc:
            raise ManifestError(f"invalid manifest: {str(exc)[:300]}") from None

    @classmethod
    def from_json(cls, text: str | bytes) -> ArtifactManifest:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:  # RecursionError: nested too deeply
            raise ManifestError(f"manifest is not valid JSON (or nested too deeply): {str(exc)[:200]}") from None
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> ArtifactManifest:
        return dataclasses.replace(self, **changes)


def _sub(cls: type, data: Any, name: str) -> Any:
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ManifestError(f"manifest.{name} must be an object, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ManifestError(f"manifest.{name} has unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
    return cls(**data)


def manifest_path_for(artifact: str | Path) -> Path:
    """The sidecar path: model_int8.onnx -> model_int8.onnx.manifest.json (one per artifact, whatever the format)."""
    artifact = Path(artifact)
    return artifact.with_name(artifact.name + ".manifest.json")

