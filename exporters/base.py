"""The types every exporter shares: what an export reads (``ExportInputs``), the FP32 ``Reference`` it is
judged against, what one exporter is asked (``ExportRequest``) and gives back (``ExportResult``), the exporter
registry and the index row. The order of work lives in ``exporters.pipeline``; the manifest in
``exporters.manifest``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import numpy as np
import torch

from compression.gate import GateThresholds
from compression.quantize import AccuracyTarget, QuantizedGraph, QuantRecipe
from edge_runtime.backends.base import HeadOutputs
from edge_runtime.contract import GateResult, GateStatus, OperatingPoint, PreprocessPolicy, QuantizationInfo
from edge_runtime.registry import Registry
from training.checkpoint import CheckpointMeta

from .errors import ExportConfigError
from .formats import get_format

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportPhotos:
    """Real fundus photos, preprocessed once by ``edge_runtime.preprocess``: normalised N x C x S x S float32."""

    calib: np.ndarray  # calibrates INT8 activations (the `calib` split)
    val: np.ndarray  # what parity and the gate judge (the `val` split)
    val_labels: np.ndarray | None  # grades of ``val``; None for an unlabelled folder
    tuning: np.ndarray  # unlabelled train-split photos for accuracy control and QAT; never calib or val photos
    val_dme: np.ndarray | None = None  # DME labels of ``val`` (0/1, MISSING where none); models with a DME head
    val_folders: np.ndarray | None = None  # the folder (camera) of each val photo: the gate weighs folders equally
    val_patients: np.ndarray | None = None  # the patient of each val photo: the gate's bootstrap clusters
    calib_labels: np.ndarray | None = None  # grades of ``calib``: an operating point re-chosen off the gate set

    def __post_init__(self) -> None:
        shapes = {a.shape[1:] for a in (self.calib, self.val, self.tuning) if len(a)}
        if len(shapes) > 1:
            raise ExportConfigError(f"calib, val and tuning photos must share one input shape, got {sorted(shapes)}")
        for name in ("val_labels", "val_dme", "val_folders", "val_patients", "calib_labels"):
            labels = getattr(self, name)
            photos = self.calib if name == "calib_labels" else self.val
            if labels is not None and len(labels) != len(photos):
                raise ExportConfigError(f"{len(labels)} {name} for {len(photos)} photos")

    def digest(self, name: str) -> str:
        """Identifies one set of photos (cache keys, export_config.yaml)."""
        return hashlib.sha1(np.ascontiguousarray(getattr(self, name)).view(np.uint8)).hexdigest()[:16]

    def summary(self) -> dict:
        return {name: {"n": len(getattr(self, name)), "sha1": self.digest(name)} for name in ("calib", "val", "tuning")}


@dataclass(frozen=True)
class ExportInputs:
    """What one checkpoint's exports are made from and judged against; loaded once (``pipeline.load_inputs``)."""

    checkpoint: Path
    model: torch.nn.Module  # DRClassifier in eval mode, padding frozen to the manifest's input size
    meta: CheckpointMeta  # the checkpoint's validated metadata
    photos: ExportPhotos
    thresholds: GateThresholds = field(default_factory=GateThresholds)
    out_dir: Path = Path("artifacts")
    name: str | None = None  # artifact file stem (default: the model name)

    @property
    def policy(self) -> PreprocessPolicy:
        return self.meta.preprocess

    @property
    def stem(self) -> str:
        return self.name or self.meta.model_name

    def example(self) -> torch.Tensor:
        size = self.policy.input_size
        val = self.photos.val
        return torch.from_numpy(val[:1]).float() if len(val) else torch.randn(1, 3, size, size)

    def accuracy_target(self) -> AccuracyTarget | None:
        """FP32's referral decisions at the checkpoint's operating point (its grades when the point was not
        chosen on data) on the tuning photos, to be kept by recipe nncf_ac."""
        if not len(self.photos.tuning):
            return None
        point = self.meta.operating_point if self.meta.operating_point.chosen_on_data else None
        return AccuracyTarget(self.photos.tuning, self.thresholds.tuning_agreement, point)


@dataclass(frozen=True)
class Reference:
    """The FP32 PyTorch model's outputs on the val photos (every head's) and its MACs: computed once per inputs."""

    logits: np.ndarray  # N x 5
    cam: np.ndarray  # N x 5 x h x w
    macs: int
    val_sha1: str  # which val photos these outputs belong to
    dme_logit: np.ndarray | None = None  # N x 1, models with a DME head
    dme_cam: np.ndarray | None = None  # N x 1 x h x w

    @property
    def cam_shape(self) -> tuple[int, int] | None:
        return tuple(int(v) for v in self.cam.shape[2:]) if len(self.cam) else None

    @classmethod
    @torch.no_grad()
    def compute(cls, inputs: ExportInputs) -> Reference:
        from training.models.profile import count_macs

        model, val = inputs.model.eval(), inputs.photos.val
        size = inputs.policy.input_size
        batches = [model.forward_outputs(torch.from_numpy(val[i:i + 16]).float()) for i in range(0, len(val), 16)]
        if not batches:  # no val photos: the shapes still tell which outputs exist
            batches = [tuple(t[:0] for t in model.forward_outputs(torch.zeros(1, 3, size, size)))]
        outputs = [np.concatenate([b[k].numpy() for b in batches]) for k in range(len(batches[0]))]
        return cls(outputs[0], outputs[1], count_macs(model, size), inputs.photos.digest("val"), *outputs[2:])


class TorchGraphs:
    """Torch-graph recipes applied once per (recipe, QAT config, photos) and shared by formats: TFLite and
    CoreML convert the same calibrated (or fine-tuned) PT2E graph."""

    def __init__(self, model: torch.nn.Module, photos: ExportPhotos, qat) -> None:
        self._model, self._photos, self._qat = model, photos, qat
        self._made: dict[tuple, QuantizedGraph] = {}

    def quantize(self, recipe: QuantRecipe) -> QuantizedGraph:
        from compression.quantize import TorchRecipeInputs, quantize_torch
        from training.models import ExportModule

        key = self._key(recipe)
        if key not in self._made:
            inputs = TorchRecipeInputs(self._photos.calib, self._photos.tuning, self._qat)
            self._made[key] = quantize_torch(ExportModule(self._model), inputs, recipe)
        return self._made[key]

    def provide(self, recipe: QuantRecipe, graph: QuantizedGraph) -> None:
        """Use ``graph``, made elsewhere, for ``recipe``: a study that watches QAT step by step
        (``studies.qat_schedule``) then exports and gates exactly the model it watched."""
        self._made[self._key(recipe)] = graph

    def _key(self, recipe: QuantRecipe) -> tuple:
        # ``target`` only labels the manifest (which kernels the format runs on): one graph serves every target;
        # the output-bias correction quantizes another FP32 model (another TorchGraphs), not this one differently.
        return recipe.quantization_key, self._qat

    def __len__(self) -> int:
        return len(self._made)


@dataclass(frozen=True)
class ExportRequest:
    """One export attempt: a format's exporter writes ``path`` at ``precision`` with ``recipe`` (INT8)."""

    inputs: ExportInputs
    precision: str
    recipe: QuantRecipe
    path: Path
    graphs: TorchGraphs


@dataclass(frozen=True)
class ExportResult:
    """What an exporter made. The file carries no manifest yet: ``exporters.manifest`` writes it once, last."""

    path: Path
    quantization: QuantizationInfo
    # Every head's outputs on the val photos of the quantized torch graph that was converted, for formats whose
    # runtime cannot run here (CoreML on Linux); the gate judges these. None where the runtime runs the file itself.
    outputs: HeadOutputs | None = None
    spec_checks: dict[str, float] = field(default_factory=dict)  # what was read back from the file's spec
    # Runs what those outputs came from on any N x C x S x S photos (CoreML's ONNX twin), made once per export: the
    # gate's nuisance draws and the output-bias correction use it. None where the runtime runs the file itself.
    runner: Callable[[np.ndarray], HeadOutputs] | None = None


@dataclass(frozen=True)
class Exporter:
    export: Callable[[ExportRequest], ExportResult]
    embed_manifest: Callable[[Path, str], None]  # writes the manifest JSON into the file, where its format keeps it


EXPORTERS: Registry[Exporter] = Registry("exporter")


def register_exporter(fmt: str, embed_manifest: Callable[[Path, str], None]):
    """Register ``export(request) -> ExportResult`` for a format of the table, with the format's manifest writer."""
    get_format(fmt)

    def decorator(export: Callable[[ExportRequest], ExportResult]):
        EXPORTERS.register(fmt, Exporter(export, embed_manifest))
        return export

    return decorator


class ExportStatus(StrEnum):
    OK = "ok"
    FAILED = "failed"  # the export itself failed (``error`` says why); a failed gate is ``gate``, not this


@dataclass(frozen=True)
class Attempt:
    """One gated try at an artifact: the recipe as asked, then each escalation step while the INT8 gate fails."""

    step: str  # "as asked", or the escalation step's label (``EscalationStep.describe``)
    recipe: str  # the quantization recipe the try used ("-" for FP32/FP16)
    gate: GateResult  # its verdict, with the criteria table


@dataclass
class ArtifactRecord:
    """One row of artifacts/index.json: what the export returned, so nothing re-reads manifests to report it."""

    format: str
    precision: str
    status: ExportStatus
    path: str | None = None
    sha256: str | None = None
    size_mb: float | None = None
    export_seconds: float | None = None
    gate: GateStatus | None = None  # the verdict of the artifact that stands (the last attempt)
    parity: dict = field(default_factory=dict)
    verified: str | None = None  # how the artifact that stands was verified
    error: str | None = None
    failures: list[str] = field(default_factory=list)  # why its gate failed (the manifest's gate.failures)
    attempts: list[Attempt] = field(default_factory=list)  # every gated try, in order; the last one stands
    operating_point: OperatingPoint | None = None  # where the artifact that stands refers (its manifest's)

    def __post_init__(self) -> None:
        self.status = ExportStatus(self.status)
        self.gate = None if self.gate is None else GateStatus(self.gate)

    @property
    def gate_result(self) -> GateResult | None:
        """The standing artifact's gate, criteria included."""
        return self.attempts[-1].gate if self.attempts else None


def size_mb(path: Path) -> float:
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    return round(sum(p.stat().st_size for p in files) / 1e6, 3)


def write_index(out_dir: Path, records: list[ArtifactRecord], meta: CheckpointMeta) -> Path:
    index = {"schema_version": 2, "model_name": meta.model_name, "data_fingerprint": meta.data_fingerprint,
             "artifacts": [dataclasses.asdict(r) for r in records]}
    path = out_dir / "index.json"
    path.write_text(json.dumps(index, indent=2, default=float))
    return path
