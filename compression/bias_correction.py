"""Empirical output-bias correction for INT8 (Nagel, van Baalen, Blankevoort and Welling 2019, "Data-Free
Quantization Through Weight Equalization and Bias Correction", section 4.2, its empirical variant).

Quantization errors that do not average to zero shift a layer's expected output. At the last layer that is one
systematic shift of every photo's logits: at a fixed operating point it moves referrals without changing the
ranking (an INT8 artifact that refers more than FP32 on the same photos). The correction measures the shift where
the decision reads it, at the head outputs the referral uses (the 5 grade logits and, with a DME head, the DME
logit), as the mean (INT8 - FP32) over the calibration photos; subtracts it from FP32's classifier biases; and
quantizes the corrected model again, the way the recipe quantized it the first time. The bias enters after the last
weighted layer (``logits = mean_hw(cam) + bias``, ``training.models.dr_classifier``), so the CAM is untouched and
its identity still holds. What the re-quantization itself changes is what a second pass measures.

The shift is measured on the calibration photos (the ``calib`` split), never on the gate set the artifact is then
judged on: ``correct_output_bias`` refuses calibration photos that are also gate photos, and the manifest records
which photos chose the correction (``edge_runtime.contract.BiasCorrectionInfo``).
"""
from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

from edge_runtime.backends.base import HeadOutputs
from edge_runtime.contract import BiasCorrectionInfo

from .errors import QuantizationConfigError

log = logging.getLogger(__name__)

# The head outputs the referral decision reads (edge_runtime.decision.decide_batch), as HeadOutputs names them.
DECISION_OUTPUTS = ("logits", "dme_logit")

Runner = Callable[[np.ndarray], HeadOutputs]
T = TypeVar("T")


class BiasCorrectionError(QuantizationConfigError):
    """The correction cannot be measured as asked (no calibration photos, photos shared with the gate set, a
    missing or non-finite output)."""


def photo_ids(x: np.ndarray) -> tuple[str, ...]:
    """Per photo of ``x`` (N x C x S x S): the SHA-1 (12 hex) of its preprocessed float32 pixels, an id that two
    photo sets can be compared by without their file names."""
    return tuple(hashlib.sha1(np.ascontiguousarray(p, dtype=np.float32).tobytes()).hexdigest()[:12] for p in x)


def measure_shift(reference: HeadOutputs, quantized: HeadOutputs) -> dict[str, np.ndarray]:
    """Mean (quantized - reference) per decision output (``DECISION_OUTPUTS`` present in ``reference``)."""
    shift = {}
    for name in DECISION_OUTPUTS:
        ref, test = getattr(reference, name), getattr(quantized, name)
        if ref is None:
            continue
        if test is None:
            raise BiasCorrectionError(f"the quantized model gave no {name!r}; FP32 has that head")
        ref = np.asarray(ref, np.float64).reshape(len(ref), -1)
        test = np.asarray(test, np.float64).reshape(len(test), -1)
        if ref.shape != test.shape:
            raise BiasCorrectionError(f"{name}: quantized outputs {test.shape}, FP32 {ref.shape}")
        difference = test - ref
        if not np.isfinite(difference).all():
            raise BiasCorrectionError(f"{name}: the quantized model gave non-finite outputs on the calibration photos")
        shift[name] = difference.mean(axis=0)
    return shift


def corrected_model(model, shift: dict[str, np.ndarray]):
    """A copy of ``model`` (a ``DRClassifier``) whose classifier biases are lowered by ``shift`` (per decision
    output: the grade head's 5 biases, or the ordinal head's cut-points, and the DME head's bias)."""
    import torch

    corrected = copy.deepcopy(model)
    heads = {"logits": corrected.head, "dme_logit": getattr(corrected, "dme_head", None)}
    with torch.no_grad():
        for name, values in shift.items():
            head = heads.get(name)
            if head is None:
                raise BiasCorrectionError(f"the model has no head for {name!r}; it has {[k for k, h in heads.items() if h is not None]}")
            # The ordinal grade head keeps its biases as cut-points (``OrdinalGradeHead.bias``).
            bias = head.cutpoints if hasattr(head, "cutpoints") else head.bias
            values = torch.as_tensor(np.asarray(values, np.float64).reshape(bias.shape), dtype=bias.dtype)
            bias.sub_(values)
    return corrected


@dataclass(frozen=True)
class BiasCorrected(Generic[T]):
    """The corrected FP32 model, the artifact quantized from it last, and the manifest record."""

    model: Any
    artifact: T
    info: BiasCorrectionInfo


def _listed(shift: dict[str, np.ndarray]) -> dict[str, tuple[float, ...]]:
    return {k: tuple(float(x) for x in v) for k, v in shift.items()}


def correct_output_bias(model, quantize: Callable[[Any], tuple[T, Runner]], first: tuple[T, Runner], fp32: Runner,
                        calib: np.ndarray, passes: int = 1, gate_photos: np.ndarray | None = None,
                        fingerprint: str | None = None, split: str = "calib") -> BiasCorrected[T]:
    """Empirical output-bias correction of one quantization.

    Args:
        model: the FP32 ``DRClassifier`` that ``first`` was quantized from.
        quantize (`Callable`): FP32 model -> (artifact, runner on N x C x S x S photos), the recipe that made ``first``.
        first (`tuple`): (artifact, runner) of the first quantization, which the first shift is measured on.
        fp32 (`Callable`): runs the uncorrected FP32 model: the reference every pass is measured against.
        calib (`np.ndarray`): the calibration photos the shift is measured on (N x C x S x S, normalised).
        passes (`int`, defaults to 1): rounds of measure, subtract, quantize again.
        gate_photos (`np.ndarray`, optional): the photos the artifact will be judged on; none may be a calib photo.
        fingerprint (`str`, optional): of ``calib``, for the manifest (``ExportPhotos.digest``).
        split (`str`, defaults to ``calib``): which split ``calib`` is, for the manifest.

    Returns:
        `BiasCorrected`: the corrected model, the artifact of its quantization, and what the manifest records
        (every measured shift, the total subtracted, the residual shift of the final artifact, the photos).
    """
    if passes < 1:
        raise BiasCorrectionError(f"passes must be >= 1, got {passes}")
    if not len(calib):
        raise BiasCorrectionError("output-bias correction is measured on calibration photos; none were given")
    ids = photo_ids(calib)
    if gate_photos is not None and len(gate_photos):
        shared = set(ids) & set(photo_ids(gate_photos))
        if shared:
            raise BiasCorrectionError(
                f"{len(shared)} of the {len(ids)} calibration photos are also gate photos; the correction must be "
                f"measured off the gate set it is judged on: pass calib and val photos from disjoint splits")
    reference = fp32(calib)
    artifact, run = first
    total: dict[str, np.ndarray] = {}
    measured = []
    corrected = model
    for k in range(passes):
        shift = measure_shift(reference, run(calib))
        measured.append(shift)
        total = {name: total.get(name, 0.0) + value for name, value in shift.items()}
        log.info("output-bias correction pass %d: mean INT8 - FP32 on %d %s photos %s", k + 1, len(calib), split,
                 {name: np.round(value, 4).tolist() for name, value in shift.items()})
        corrected = corrected_model(model, total)
        del run  # the runner of the artifact the next quantization replaces
        artifact, run = quantize(corrected)
    residual = measure_shift(reference, run(calib))
    info = BiasCorrectionInfo(passes, _listed(total), tuple(_listed(m) for m in measured), _listed(residual), split,
                              len(calib), fingerprint, ids)
    return BiasCorrected(corrected, artifact, info)
