"""Site validation: how an artifact refers on a clinic's own labelled photos, and whether those photos are enough.

An operating point chosen on other cameras' val photos need not hold on a new camera or population. A clinic runs
``retinaedge validate-site`` on photos its graders labelled; every photo goes through the device's own path
(decode, quality gate, preprocessing, ``decide()`` at the artifact's point), and the figures come back with their
n and 95% intervals:

- sensitivity on the referable photos (ICDR grade >= 2, or DME present where labelled), counting what the device
  sends on: a referral, an uncertain result ("refer or get a second read") and an ungradable photo ("retake, or
  refer if a retake fails") all reach a clinician, so none of them is a miss;
- specificity on the other photos, where the same three outcomes cost a clinic visit;
- the referable AUC on the gradable photos (stratified bootstrap interval).

Evidence: the figures count only when each class has the photos a Wilson interval of +- ``max_half_width`` needs
at the harder of the observed proportion and the one the artifact was validated at (its val sensitivity and
specificity: the one nearer 0.5); below that the verdict is
``insufficient_evidence`` with how many more referable and non-referable photos are needed. Nothing here chooses
anything on the photos unless asked (``choose_site_point``), and then only with enough evidence.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from .calibration import pick_threshold
from .contract import REFERABLE_MIN_GRADE, OperatingPoint
from .errors import ConfigError, ImageError, ManifestError
from .metrics import CONFIDENCE, binary_auc_interval, roc_auc, wilson_interval

MAX_PHOTOS_PLANNED = 100_000  # beyond this a half-width is not worth planning for
UNGRADABLE_WARNING = 0.20  # share of ungradable photos that the report calls out (Thailand's deployment saw 21%)


class Evidence(str, Enum):
    SUFFICIENT = "sufficient"
    INSUFFICIENT = "insufficient_evidence"


@dataclass(frozen=True)
class SiteEvidence:
    """When a site's photos are enough: each 95% Wilson interval no wider than +- ``max_half_width``.

    Args:
        max_half_width (`float`, defaults to 0.10): half-width of the sensitivity and specificity intervals that
            makes a site's figure usable for a go/no-go decision; 0.10 needs about 35 referable photos at a
            sensitivity of 0.90 and about 62 non-referable photos at a specificity of 0.80.
        confidence (`float`, defaults to 0.95): of every interval.
    """

    max_half_width: float = 0.10
    confidence: float = CONFIDENCE

    def __post_init__(self) -> None:
        if not 0.0 < self.max_half_width < 0.5:
            raise ConfigError(f"SiteEvidence.max_half_width must be in (0, 0.5), got {self.max_half_width}")
        if not 0.5 < self.confidence < 1.0:
            raise ConfigError(f"SiteEvidence.confidence must be in (0.5, 1), got {self.confidence}")

    def half_width(self, successes: int, n: int) -> float:
        low, high = wilson_interval(successes, n, self.confidence)
        return (high - low) / 2

    def photos_needed(self, proportion: float) -> int:
        """Fewest photos whose Wilson interval at ``proportion`` is no wider than +- max_half_width."""
        if not 0.0 <= proportion <= 1.0:
            raise ConfigError(f"a planning proportion must be in [0, 1], got {proportion}")
        low, high = 1, MAX_PHOTOS_PLANNED
        while low < high:  # the half-width shrinks with n at a fixed proportion
            n = (low + high) // 2
            if self.half_width(round(proportion * n), n) <= self.max_half_width:
                high = n
            else:
                low = n + 1
        return low


@dataclass(frozen=True)
class SitePhoto:
    """One labelled photo of the site: its file and the graders' reference, either part possibly unknown."""

    path: Path
    grade: int | None  # ICDR 0-4; None where the site gives no grade (e.g. a DME-only label)
    dme: bool | None = None  # DME present, where the site labels it

    @property
    def referable(self) -> bool | None:
        """Referable DR or DME present; None where the labels cannot tell (no grade and no DME found)."""
        if self.dme or (self.grade is not None and self.grade >= REFERABLE_MIN_GRADE):
            return True
        if self.grade is None:
            return None
        return False


@dataclass(frozen=True)
class SiteFigure:
    """A proportion on the site's photos with its interval, and how many photos it takes to be usable."""

    value: float | None
    ci: tuple[float, float] | None
    n: int
    needed: int  # photos of this class the evidence rule asks for

    @property
    def more_needed(self) -> int:
        return max(0, self.needed - self.n)


@dataclass(frozen=True)
class SiteReport:
    artifact: str
    model_version: str
    backend: str
    operating_point: str  # OperatingPoint.describe() of the point the photos were screened at
    n_photos: int
    n_unreadable: int  # files the decoder refused: not counted anywhere else
    outcomes: dict[str, int]  # referable / not_referable / uncertain / ungradable
    sensitivity: SiteFigure
    specificity: SiteFigure
    auc: float | None  # referable AUC on the gradable photos
    auc_ci: tuple[float, float] | None
    evidence: Evidence
    max_half_width: float
    scores: tuple[float, ...] = field(default=(), repr=False)  # P(referable) of the gradable photos, in order
    labels: tuple[bool, ...] = field(default=(), repr=False)  # their reference referability

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["evidence"] = self.evidence.value
        for name in ("scores", "labels"):
            data.pop(name)
        for name in ("sensitivity", "specificity"):
            data[name]["more_needed"] = getattr(self, name).more_needed
        return data

    def lines(self) -> list[str]:
        def fig(name: str, f: SiteFigure) -> str:
            if f.value is None:
                return f"{name}: - (no photos)"
            return f"{name}: {f.value:.3f} [{f.ci[0]:.3f}, {f.ci[1]:.3f}] (n = {f.n})"

        out = [f"{self.artifact} ({self.model_version}, {self.backend}) at {self.operating_point}",
               f"photos: {self.n_photos} screened ({', '.join(f'{k} {v}' for k, v in self.outcomes.items())}), "
               f"{self.n_unreadable} unreadable",
               fig("sensitivity (referred, uncertain or ungradable)", self.sensitivity),
               fig("specificity", self.specificity),
               "referable AUC (gradable photos): " + ("-" if self.auc is None else
                                                      f"{self.auc:.3f} [{self.auc_ci[0]:.3f}, {self.auc_ci[1]:.3f}]")]
        ungradable = self.outcomes.get("ungradable", 0)
        if self.n_photos and ungradable / self.n_photos > UNGRADABLE_WARNING:
            out.append(f"WARNING: {ungradable} of {self.n_photos} photos ungradable: the quality gate rejects many of "
                       "this site's photos (camera, framing or pre-processing); every one is sent on, which costs "
                       "specificity: see docs/reference/quality_gate.md")
        if self.evidence is Evidence.SUFFICIENT:
            out.append(f"evidence: sufficient (each interval within +-{self.max_half_width:.2f})")
        else:
            out.append(f"evidence: INSUFFICIENT for +-{self.max_half_width:.2f} intervals: "
                       f"{self.sensitivity.more_needed} more referable and {self.specificity.more_needed} more "
                       "non-referable labelled photos needed")
        return out


def _planning_proportion(observed: float | None, validated: float | None) -> float:
    # Plan at what the artifact was validated at; a site below that needs more photos, so the worse of the two.
    values = [v for v in (observed, validated) if v is not None]
    return min(values, key=lambda v: abs(v - 0.5)) if values else 0.5


def validate_site(screener, photos: Sequence[SitePhoto], evidence: SiteEvidence = SiteEvidence()) -> SiteReport:
    """Screen every photo through ``screener`` (an ``edge_runtime.screen.Screener``, usually without an outbox)
    and report the referral figures with their evidence verdict."""
    manifest = screener.session.info.manifest
    point: OperatingPoint = screener.operating_point
    outcomes = {"referable": 0, "not_referable": 0, "uncertain": 0, "ungradable": 0}
    sent_on, truth, scores, graded_truth, unreadable = [], [], [], [], 0
    photos = [p for p in photos if p.referable is not None]  # a photo counts only where its reference is known
    if not photos:
        raise ConfigError("no labelled photos to validate on: give a folder with labels.csv (image, grade[, dme]) "
                          "whose photos have a grade or a DME-present label")
    for photo in photos:
        try:
            result = screener.screen_file(photo.path).result
        except ImageError:
            unreadable += 1
            continue
        key = result.outcome if result.outcome in ("uncertain", "ungradable") else (
            "referable" if result.referable else "not_referable")
        outcomes[key] += 1
        sent_on.append(key != "not_referable")
        truth.append(photo.referable)
        if result.outcome != "ungradable":
            scores.append(float(result.referable_probability))
            graded_truth.append(photo.referable)
    sent_on_arr, truth_arr = np.asarray(sent_on, bool), np.asarray(truth, bool)
    n_pos, n_neg = int(truth_arr.sum()), int((~truth_arr).sum())
    tp, tn = int((sent_on_arr & truth_arr).sum()), int((~sent_on_arr & ~truth_arr).sum())
    sens = tp / n_pos if n_pos else None
    spec = tn / n_neg if n_neg else None
    sensitivity = SiteFigure(sens, wilson_interval(tp, n_pos, evidence.confidence) if n_pos else None, n_pos,
                             evidence.photos_needed(_planning_proportion(sens, point.sensitivity)))
    specificity = SiteFigure(spec, wilson_interval(tn, n_neg, evidence.confidence) if n_neg else None, n_neg,
                             evidence.photos_needed(_planning_proportion(spec, point.specificity)))
    labels = np.asarray(graded_truth, bool)
    auc = auc_ci = None
    if labels.any() and (~labels).any():
        auc = roc_auc(labels, np.asarray(scores))
        low, high = binary_auc_interval(labels, np.asarray(scores), evidence.confidence)
        auc_ci = None if np.isnan(low) else (low, high)
    enough = all(f.n > 0 and f.more_needed == 0 for f in (sensitivity, specificity))
    return SiteReport(str(manifest.model_name), manifest.model_version, screener.session.info.backend,
                      point.describe(), len(sent_on), unreadable, outcomes, sensitivity, specificity, auc, auc_ci,
                      Evidence.SUFFICIENT if enough else Evidence.INSUFFICIENT, evidence.max_half_width,
                      tuple(scores), tuple(bool(v) for v in labels))


def choose_site_point(report: SiteReport, point: OperatingPoint) -> OperatingPoint:
    """The artifact's point with its threshold re-chosen on the site's gradable photos for the same rule and target
    (temperature and the band's width kept). Refused without sufficient evidence or for a point that was never
    chosen on data (its rule has no target to keep)."""
    if report.evidence is not Evidence.SUFFICIENT:
        raise ConfigError("too few labelled site photos to choose a site operating point: "
                          f"{report.sensitivity.more_needed} more referable and {report.specificity.more_needed} "
                          "more non-referable photos needed")
    if not point.chosen_on_data:
        raise ConfigError("the artifact's operating point was not chosen on data (rule 'default'): there is no "
                          "rule and target to re-choose it for; re-export with a chosen point")
    labels, scores = np.asarray(report.labels, bool), np.asarray(report.scores, float)
    threshold = float(np.clip(pick_threshold(labels, scores, point.rule, point.target), 1e-6, 1 - 1e-6))
    band = None
    if point.uncertain_band is not None:
        low, high = point.uncertain_band
        band = (max(1e-6, threshold - (point.threshold - low)), min(1 - 1e-6, threshold + (high - point.threshold)))
    referred = scores >= threshold
    tp, n_pos = int((referred & labels).sum()), int(labels.sum())
    tn, n_neg = int((~referred & ~labels).sum()), int((~labels).sum())
    return replace(point, threshold=threshold, uncertain_band=band, sensitivity=tp / n_pos,
                   sensitivity_ci=wilson_interval(tp, n_pos), specificity=tn / n_neg,
                   specificity_ci=wilson_interval(tn, n_neg), n_positive=n_pos, n_negative=n_neg,
                   val_fingerprint=None)


def site_photos(rows: Iterable[tuple[Path, int | None, int | None]]) -> list[SitePhoto]:
    """Site photos from (path, grade or None, DME 0/1 or None) rows."""
    return [SitePhoto(Path(path), None if grade is None else int(grade), None if dme is None else bool(dme))
            for path, grade, dme in rows]


SITE_POINT_KIND = "retinaedge.site_operating_point"


def site_point_document(report: SiteReport, point: OperatingPoint, manifest, site: str) -> dict[str, Any]:
    """What a site's own operating point carries: the point, which artifact it is for (sha256), which site chose
    it and on how many photos; signed with the site's key (``edge_runtime.signing.sign_manifest``)."""
    from .contract import utcnow

    if not site or any(ch in site for ch in "\n\r\t"):
        raise ConfigError(f"a site id is a short opaque name (no patient data), got {site!r}")
    return {"kind": SITE_POINT_KIND, "site": site, "artifact_sha256": manifest.sha256,
            "model_version": manifest.model_version, "operating_point": asdict(point),
            "evidence": {"referable": report.sensitivity.n, "non_referable": report.specificity.n,
                         "max_half_width": report.max_half_width, "verdict": report.evidence.value},
            "created_at": utcnow()}


def load_site_point(path: str | Path, manifest, trusted_key) -> tuple[OperatingPoint, str]:
    """The (operating point, site id) of a signed site-point file, after every check: signed by ``trusted_key``
    (the site's public key; refused unsigned), chosen for this very artifact (its sha256) and with sufficient
    evidence recorded."""
    import json

    from .signing import verify_manifest

    if trusted_key is None:
        raise ConfigError("a site operating point is applied only with the site's public key (--site-key): an "
                          "unsigned point could move every referral")
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a readable site-point JSON file ({exc})") from exc
    if not isinstance(data, dict) or data.get("kind") != SITE_POINT_KIND:
        raise ConfigError(f"{path}: not a RetinaEdge site operating point")
    verify_manifest(data, trusted_key, what=f"{Path(path).name}: site operating point")
    if data.get("artifact_sha256") != manifest.sha256:
        raise ConfigError(f"{path}: chosen for another artifact (sha256 {str(data.get('artifact_sha256'))[:12]}...), "
                          f"not this one ({str(manifest.sha256)[:12]}...); validate the site again with this model")
    if (data.get("evidence") or {}).get("verdict") != Evidence.SUFFICIENT.value:
        raise ConfigError(f"{path}: recorded without sufficient evidence; refusing to apply it")
    try:
        point = OperatingPoint(**{k: tuple(v) if isinstance(v, list) else v
                                  for k, v in data["operating_point"].items()})
    except (KeyError, TypeError, ManifestError) as exc:
        raise ConfigError(f"{path}: invalid operating point ({exc})") from exc
    return point, str(data["site"])
