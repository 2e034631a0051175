"""Site validation: an artifact's referral figures on a clinic's own labelled photos, the evidence rule, and a
signed site operating point that only the matching key, artifact and evidence can apply."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from statsmodels.stats.proportion import proportion_confint

from edge_runtime.errors import ConfigError, ManifestSignatureError
from edge_runtime.screen import Screener
from edge_runtime.signing import generate_key_pair, sign_manifest
from edge_runtime.site import (
    Evidence,
    SiteEvidence,
    SitePhoto,
    choose_site_point,
    load_site_point,
    site_photos,
    site_point_document,
    validate_site,
)
from training.data.layouts import read_partial_labels


@pytest.mark.parametrize("proportion", [0.9, 0.8, 0.5, 0.99])
def test_photos_needed_is_the_fewest_that_reach_the_half_width(proportion):
    evidence = SiteEvidence(max_half_width=0.10)
    n = evidence.photos_needed(proportion)

    def half(k):  # statsmodels' Wilson interval, independent of edge_runtime.metrics
        low, high = proportion_confint(round(proportion * k), k, alpha=0.05, method="wilson")
        return (high - low) / 2

    assert half(n) <= 0.10 < half(n - 1)
    assert evidence.photos_needed(0.9) < SiteEvidence(max_half_width=0.05).photos_needed(0.9)


def test_a_photo_is_referable_by_grade_or_dme_and_unknown_without_either():
    assert SitePhoto(Path("a"), 2).referable and SitePhoto(Path("a"), 0, dme=True).referable
    assert SitePhoto(Path("a"), None, dme=True).referable  # DME-only label: referable whatever the grade
    assert SitePhoto(Path("a"), 1, dme=False).referable is False
    assert SitePhoto(Path("a"), None, dme=False).referable is None  # e.g. "NPDR" of unstated stage, no DME
    with pytest.raises(ConfigError):
        SiteEvidence(max_half_width=0.0)


@pytest.fixture(scope="module")
def site(tiny_artifacts, synthetic_dir):
    artifact = tiny_artifacts[0][("onnx", "fp32")].path
    photos = site_photos((p.path, p.grade, p.dme) for p in read_partial_labels(synthetic_dir))
    return Screener.from_artifact(artifact), photos


def test_site_figures_count_what_the_device_sends_on(site):
    screener, photos = site
    report = validate_site(screener, photos, SiteEvidence(max_half_width=0.03))
    assert report.n_photos == len(photos) and sum(report.outcomes.values()) == report.n_photos
    n_ref = sum(p.referable for p in photos)
    assert (report.sensitivity.n, report.specificity.n) == (n_ref, len(photos) - n_ref)
    # Referred, uncertain and ungradable all reach a clinician: the false negatives are the clean negatives only.
    missed = report.sensitivity.n - round(report.sensitivity.value * report.sensitivity.n)
    kept_home = round(report.specificity.value * report.specificity.n)
    assert missed + kept_home == report.outcomes["not_referable"]
    assert report.sensitivity.ci[0] <= report.sensitivity.value <= report.sensitivity.ci[1]
    assert report.evidence is Evidence.INSUFFICIENT  # +-0.03 needs several hundred photos of each class
    assert report.to_dict()["sensitivity"]["more_needed"] == report.sensitivity.more_needed
    assert any("more referable" in line for line in report.lines())
    with pytest.raises(ConfigError, match="more referable"):
        choose_site_point(report, screener.operating_point)


def test_a_site_point_is_chosen_only_with_evidence_and_applied_only_when_signed_for_this_artifact(site, tmp_path):
    screener, photos = site
    manifest = screener.session.info.manifest
    loose = validate_site(screener, photos, SiteEvidence(max_half_width=0.45))
    assert loose.evidence is Evidence.SUFFICIENT
    chosen_on = replace(screener.operating_point, rule="sensitivity", target=0.9)
    point = choose_site_point(loose, chosen_on)
    assert point.sensitivity >= 0.9 and point.n_positive == sum(loose.labels)
    private, public = generate_key_pair()
    signed = sign_manifest(site_point_document(loose, point, manifest, "clinic-7"), private)
    path = tmp_path / "site_point.json"
    path.write_text(json.dumps(signed))

    applied, site_id = load_site_point(path, manifest, public)
    assert applied.threshold == pytest.approx(point.threshold) and site_id == "clinic-7"
    screener_at_site = Screener(screener.session, operating_point=applied)
    result = screener_at_site.screen_file(photos[0].path).result
    assert result.outcome == "ungradable" or result.threshold == pytest.approx(point.threshold)

    with pytest.raises(ConfigError, match="public key"):
        load_site_point(path, manifest, None)
    with pytest.raises(ManifestSignatureError):
        load_site_point(path, manifest, generate_key_pair()[1])  # another site's key
    altered = dict(signed, operating_point={**signed["operating_point"], "threshold": 0.99})
    path.write_text(json.dumps(altered))
    with pytest.raises(ManifestSignatureError):
        load_site_point(path, manifest, public)
    other = sign_manifest({**site_point_document(loose, point, manifest, "clinic-7"), "artifact_sha256": "0" * 64},
                          private)
    path.write_text(json.dumps(other))
    with pytest.raises(ConfigError, match="another artifact"):
        load_site_point(path, manifest, public)


def test_cli_validate_site_reports_the_evidence_verdict(tiny_artifacts, synthetic_dir):
    artifact = tiny_artifacts[0][("onnx", "fp32")].path
    def run(half_width: str):
        return subprocess.run([sys.executable, "-m", "retinaedge.cli", "validate-site", "--artifact", artifact,
                               "--data", str(synthetic_dir), "--max-half-width", half_width, "--json"],
                              capture_output=True, text=True, timeout=300)

    strict, loose = run("0.03"), run("0.45")
    assert strict.returncode == 1, strict.stderr[-2000:]  # insufficient evidence is not a usable site figure
    report = json.loads(strict.stdout.strip().splitlines()[-1])
    assert report["evidence"] == "insufficient_evidence" and report["n_photos"] > 0
    assert report["sensitivity"]["n"] + report["specificity"]["n"] == report["n_photos"]
    assert report["sensitivity"]["more_needed"] + report["specificity"]["more_needed"] > 0
    assert loose.returncode == 0 and json.loads(loose.stdout.strip().splitlines()[-1])["evidence"] == "sufficient"


def test_evidence_plans_at_the_harder_proportion_and_warns_when_the_gate_rejects_a_site():
    from edge_runtime.site import SiteFigure, SiteReport, _planning_proportion

    # The proportion nearer 0.5 needs more photos: a site below its validated sensitivity must show more evidence.
    assert _planning_proportion(0.864, 0.90) == 0.864 and _planning_proportion(0.95, 0.90) == 0.90
    figure = SiteFigure(1.0, (0.97, 1.0), 128, 35)
    report = SiteReport("m", "v", "onnxruntime", "p", 229, 0, {"ungradable": 229}, figure,
                        SiteFigure(0.0, (0.0, 0.04), 101, 62), None, None, Evidence.SUFFICIENT, 0.10)
    assert any(line.startswith("WARNING: 229 of 229 photos ungradable") for line in report.lines())
