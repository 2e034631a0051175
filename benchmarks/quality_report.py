"""Quality-gate report: agreement with human graders, false rejects per camera, code-made degradations, other
cameras' framings, non-fundus captures and the verdict's dependence on the model's input size, before and after.

Every photo goes through the device's own path: encoded bytes (the file as stored; a code-made copy saved as
JPEG 95, or as its reframing says) are decoded the way the Screener decodes them for a model of ``--input-size``
px and assessed. ``--before-ref`` also runs the gate of another git revision (its quality and preprocess
modules, imported from a temporary copy) on the very same bytes, decoded as that revision's Screener decoded them.

Tables (each cell: share [Wilson 95%] (k/n)):

- real labels: EyeQ grades of the eyepacs_full photos (``quality_eyeq.csv``): good / usable / reject, rejected;
- per folder (camera): originals rejected; for eyepacs_full the photos graders called good or usable, and all; for
  a folder with nearly black photos also those whose field's mean luminance is >= 40;
- per code-made degradation (``benchmarks/degradations.py``), caught, by strength third;
- other cameras (``REFRAMINGS``): copies of gradable originals (messidor2, mexico_dme, EyeQ good/usable) rejected;
  and of those whose original the gate passes (what the framing alone does);
- not a fundus (``NON_FUNDUS``): refused as "not a fundus photo";
- one verdict per photo: originals whose verdict at a 128- and a 380-px model's decode equals the 224-px one.

    python -m benchmarks.quality_report --split test --before-ref 4ccc32f --out reports/quality_gate
"""
from __future__ import annotations

import argparse
import csv
import importlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from edge_runtime.contract import PreprocessPolicy
from edge_runtime.metrics import wilson_interval
from edge_runtime.preprocess import decode_image, read_image
from edge_runtime.quality import DEFAULT_THRESHOLDS, QualityThresholds, assess
from edge_runtime.screen import decode_side

from .degradations import DEGRADATIONS, NON_FUNDUS, REFRAMINGS, degrade, strength_bin
from .report import write_markdown_and_json

ORIGINAL = "original"
INPUT_SIZE = 224  # the student's input: the decode every table but the last uses
OTHER_INPUT_SIZES = (128, 380)  # a smaller student and the teacher: the verdict must not change with them
GRADABLE_LABELS = ("good", "usable")
EYEQ_FILE = "quality_eyeq.csv"
NOT_FUNDUS = "not a fundus photo"


@dataclass(frozen=True)
class Verdict:
    """One gate's verdict on one photo."""

    gradable: bool
    score: float
    not_fundus: bool  # refused as not a fundus photo (never graded)
    fired: str  # "rules", "learned", "rules+learned" or "" (gradable)
    field_mean: float | None = None  # mean luminance of the field (None: refused before it was measured)


Gate = Callable[[bytes, int], Verdict]  # (encoded photo, model input size) -> verdict


def photo_rows(data: Path, splits: tuple[str, ...], limit: int | None) -> list[dict]:
    """Rows of ``labels.csv`` in ``splits`` (at most ``limit``), each with its EyeQ ``quality`` label or None."""
    labels = {}
    if (data / EYEQ_FILE).is_file():
        labels = {r["image"]: r["quality"] for r in csv.DictReader(open(data / EYEQ_FILE))}
    rows = [dict(r, quality=labels.get(r["image"])) for r in csv.DictReader(open(data / "labels.csv"))
            if r.get("split") in splits]
    return rows[:limit] if limit else rows


def as_jpeg(img: np.ndarray, quality: int = 95) -> bytes:
    """Encode as a camera would (JPEG 95)."""
    return cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()


def _fired(report) -> str:
    learned = any(r.startswith("learned") for r in report.reasons)
    rules = any(not r.startswith("learned") for r in report.reasons)
    return "+".join(name for name, on in (("rules", rules), ("learned", learned)) if on)


def current_gate(thresholds: QualityThresholds = DEFAULT_THRESHOLDS) -> Gate:
    """The working tree's gate, through the Screener's decode for a model of the given input size."""

    def gate(data: bytes, input_size: int) -> Verdict:
        img = decode_image(data, min_side=decode_side(PreprocessPolicy(input_size=input_size)))
        report = assess(img, thresholds)
        not_fundus = bool(report.reasons) and report.reasons[0].startswith(NOT_FUNDUS)
        return Verdict(bool(report.gradable), float(report.score), not_fundus, _fired(report),
                       report.metrics.get("mean"))

    return gate


def load_before_module(ref: str):
    """The ``edge_runtime`` package of git revision ``ref`` as ``edge_runtime_before``, from a temp copy."""
    root = Path(tempfile.mkdtemp(prefix="gate_before_"))
    package = root / "edge_runtime_before"
    package.mkdir()
    repo = Path(__file__).resolve().parents[1]
    listed = subprocess.run(["git", "ls-tree", "-r", "--name-only", ref, "edge_runtime/"], cwd=repo,
                            capture_output=True, text=True, check=True).stdout.split()
    for name in listed:
        target = package / Path(name).relative_to("edge_runtime")
        target.parent.mkdir(parents=True, exist_ok=True)
        shown = subprocess.run(["git", "show", f"{ref}:{name}"], cwd=repo, capture_output=True, check=True)
        target.write_bytes(shown.stdout)
    sys.path.insert(0, str(root))
    return importlib.import_module("edge_runtime_before")


def load_before_gate(ref: str) -> Gate:
    """The gate of git revision ``ref``, through that revision's Screener decode."""
    load_before_module(ref)
    quality = importlib.import_module("edge_runtime_before.quality")
    preprocess = importlib.import_module("edge_runtime_before.preprocess")
    contract = importlib.import_module("edge_runtime_before.contract")
    screen = importlib.import_module("edge_runtime_before.screen")

    def gate(data: bytes, input_size: int) -> Verdict:
        side = screen.decode_side(contract.PreprocessPolicy(input_size=input_size))
        img = preprocess.decode_image(data, min_side=side)
        report = quality.assess(img)
        reasons = tuple(report.reasons)
        not_fundus = bool(reasons) and (reasons[0].startswith(NOT_FUNDUS) or reasons[0].startswith("no fundus"))
        return Verdict(bool(report.gradable), float(report.score), not_fundus, _fired(report))

    return gate


def _cases(image: np.ndarray | None, rng: np.random.Generator, reframings: bool,
           original_bytes: bytes | None) -> list[tuple[str, bytes, float | None]]:
    """The original (unless ``original_bytes`` is None) and, with an ``image``, its degraded and reframed copies
    (drawn from ``rng`` in a fixed order, so a photo's copies are the same in every run)."""
    cases = [] if original_bytes is None else [(ORIGINAL, original_bytes, None)]
    if image is None:
        return cases
    for name in DEGRADATIONS:
        degraded, strength = degrade(image, name, rng)
        cases.append((name, as_jpeg(degraded), strength))
    if reframings:
        cases += [(name, make(image), None) for name, make in REFRAMINGS.items()]
    return cases


def collect(datasets: list[Path], splits: tuple[str, ...], gates: dict[str, Gate], limit: int | None = None,
            seed: int = 0, progress: bool = True, extras: bool = True, originals: bool = True,
            copies_every: int = 1) -> list[dict]:
    """One record per (photo, case) with each gate's verdict at the student's decode, and for originals at the
    other input sizes' decodes; plus one record per code-made non-fundus capture (with the originals). ``extras``
    off: originals and degradations at the student's decode only. ``originals`` off: the copies only;
    ``copies_every``: copies of every k-th photo of a folder only (0: none), the same copies as a full run's."""
    records = []
    started = time.time()
    for data in datasets:
        rows = photo_rows(data, splits, limit)
        for i, row in enumerate(rows):
            rng = np.random.default_rng([seed, i, len(data.name)])
            raw = (data / "images" / row["image"]).read_bytes() if originals else None
            copies = copies_every > 0 and i % copies_every == 0
            image = read_image(data / "images" / row["image"]) if copies else None
            for case, encoded, strength in _cases(image, rng, extras, raw):
                record = {"dataset": data.name, "image": row["image"], "split": row["split"],
                          "quality": row["quality"], "case": case, "strength": strength, "verdicts": {}}
                for name, gate in gates.items():
                    sizes = (INPUT_SIZE, *OTHER_INPUT_SIZES) if case == ORIGINAL and extras else (INPUT_SIZE,)
                    record["verdicts"][name] = {str(size): vars(gate(encoded, size)) for size in sizes}
                records.append(record)
            if progress and (i + 1) % 25 == 0:
                print(f"{data.name}: {i + 1}/{len(rows)} photos, {time.time() - started:.0f} s", file=sys.stderr)
    rng = np.random.default_rng(seed)
    for name, make in NON_FUNDUS.items() if extras and originals else ():
        for k in range(3):
            encoded = as_jpeg(make(rng))
            records.append({"dataset": "non_fundus", "image": f"{name}_{k}", "split": "-", "quality": None,
                            "case": name, "strength": None,
                            "verdicts": {g: {str(INPUT_SIZE): vars(gate(encoded, INPUT_SIZE))} for g, gate in gates.items()}})
    return records


def _share(hits: int, n: int) -> dict:
    if n == 0:
        return {"rate": None, "ci": None, "k": 0, "n": 0}
    low, high = wilson_interval(hits, n)
    return {"rate": hits / n, "ci": (low, high), "k": hits, "n": n}


def _verdict(record: dict, gate: str, size: int = INPUT_SIZE) -> dict:
    return record["verdicts"][gate][str(size)]


DARK_FIELD_MEAN = 40.0  # a field this dark (mean luminance) is one a grader would likely reject, though diagnosed


def _field_mean(record: dict) -> float | None:
    """The field's mean luminance from whichever gate measured it (the photo is the same for every gate)."""
    means = [v[str(INPUT_SIZE)].get("field_mean") for v in record["verdicts"].values()]
    return next((m for m in means if m is not None), None)


def summarise(records: list[dict], gate: str) -> dict:
    """The report's tables for one gate, as {table: {row: share}}."""
    photos = [r for r in records if r["dataset"] != "non_fundus"]
    originals = [r for r in photos if r["case"] == ORIGINAL]
    rejected = lambda rows: _share(sum(not _verdict(r, gate)["gradable"] for r in rows), len(rows))  # noqa: E731
    out: dict[str, dict] = {"real labels": {}, "per folder": {}, "degradations": {}, "other cameras": {},
                            "framing flips": {}, "not a fundus": {}, "one verdict": {}, "which fired": {}}
    for label in ("good", "usable", "reject"):
        out["real labels"][label] = rejected([r for r in originals if r["quality"] == label])
    out["real labels"]["good + usable"] = rejected([r for r in originals if r["quality"] in GRADABLE_LABELS])
    for folder in sorted({r["dataset"] for r in originals}):
        rows = [r for r in originals if r["dataset"] == folder]
        if any(r["quality"] for r in rows):
            out["per folder"][f"{folder} (graders: good or usable)"] = rejected(
                [r for r in rows if r["quality"] in GRADABLE_LABELS])
            out["per folder"][f"{folder} (all, graders' rejects included)"] = rejected(rows)
        else:
            out["per folder"][folder] = rejected(rows)
            bright = [r for r in rows if (_field_mean(r) or 0.0) >= DARK_FIELD_MEAN]
            if len(bright) < len(rows):
                out["per folder"][f"  {folder}, field mean >= {DARK_FIELD_MEAN:.0f}"] = rejected(bright)
    for name in DEGRADATIONS:
        cases = [r for r in photos if r["case"] == name]
        out["degradations"][name] = rejected(cases)
        for bin_name in ("mild", "moderate", "severe"):
            out["degradations"][f"  {name} {bin_name}"] = rejected(
                [r for r in cases if strength_bin(r["strength"]) == bin_name])
    gradable = {(r["dataset"], r["image"]) for r in originals if r["quality"] in GRADABLE_LABELS
                or (r["quality"] is None and r["dataset"] != "eyepacs_full")}
    for name in REFRAMINGS:
        out["other cameras"][name] = rejected(
            [r for r in photos if r["case"] == name and (r["dataset"], r["image"]) in gradable])
    # The framing alone: copies of the photos this gate passes, so the originals' own rejects are not counted again.
    passed = {(r["dataset"], r["image"]) for r in originals if _verdict(r, gate)["gradable"]}
    for name in REFRAMINGS:
        out["framing flips"][name] = rejected(
            [r for r in photos if r["case"] == name and (r["dataset"], r["image"]) in gradable & passed])
    non_fundus = [r for r in records if r["dataset"] == "non_fundus"]
    for name in NON_FUNDUS:
        rows = [r for r in non_fundus if r["case"] == name]
        out["not a fundus"][name] = _share(sum(_verdict(r, gate)["not_fundus"] for r in rows), len(rows))
    out["not a fundus"]["all (refused as not a fundus)"] = _share(
        sum(_verdict(r, gate)["not_fundus"] for r in non_fundus), len(non_fundus))
    out["not a fundus"]["all (not graded: refused or ungradable)"] = _share(
        sum(not _verdict(r, gate)["gradable"] for r in non_fundus), len(non_fundus))
    for size in OTHER_INPUT_SIZES:
        out["one verdict"][f"{size}-px model's decode: same verdict as {INPUT_SIZE}-px"] = _share(
            sum(_verdict(r, gate, size)["gradable"] == _verdict(r, gate)["gradable"] for r in originals), len(originals))
        rejects = [r for r in originals if r["quality"] == "reject"]
        out["one verdict"][f"  graders' rejects caught at the {size}-px decode"] = _share(
            sum(not _verdict(r, gate, size)["gradable"] for r in rejects), len(rejects))
    labelled = [r for r in originals if r["quality"]]
    for label in ("good", "usable", "reject"):
        rows = [r for r in labelled if r["quality"] == label and not _verdict(r, gate)["gradable"]]
        for fired in ("rules", "learned", "rules+learned"):
            out["which fired"][f"{label}: {fired}"] = _share(sum(_verdict(r, gate)["fired"] == fired for r in rows),
                                                             len(rows))
    return out


TITLES = {
    "real labels": "Real labels (EyeQ graders, eyepacs_full): photos rejected by the gate",
    "per folder": "Per folder (camera): originals rejected (false rejects where the photos are gradable)",
    "degradations": "Code-made degradations: copies caught (all folders)",
    "other cameras": "Other cameras' framings of gradable photos: copies rejected (false rejects)",
    "framing flips": "Other cameras' framings of gradable photos the gate passes: copies rejected",
    "not a fundus": "Not a fundus (code-made captures): refused",
    "one verdict": "One verdict per photo: originals, decoded for other model input sizes",
    "which fired": "Which part fired, among the labelled photos the gate rejected",
}


def cell(share: dict) -> str:
    if not share["n"]:
        return "-"
    low, high = share["ci"]
    return f"{share['rate']:.1%} [{low:.1%}, {high:.1%}] ({share['k']}/{share['n']})"


def to_markdown(summaries: dict[str, dict], title: str) -> str:
    lines = [f"# {title}", ""]
    first = next(iter(summaries.values()))
    for table, rows in first.items():
        lines += [f"## {TITLES[table]}", "", "| case | " + " | ".join(summaries) + " |", "|---|" + "---|" * len(summaries)]
        for row in rows:
            label = row.replace("  ", "&nbsp;&nbsp;", 1) if row.startswith("  ") else row
            lines.append(f"| {label} | " + " | ".join(cell(s[table][row]) for s in summaries.values()) + " |")
        lines.append("")
    lines.append("Shares with Wilson 95% intervals (k/n). Strength thirds of each degradation's range "
                 "(benchmarks/degradations.py). This tool assists screening; it does not diagnose.")
    return "\n".join(lines) + "\n"


def run(data: Path, split: str, limit: int | None = None, seed: int = 0,
        thresholds: QualityThresholds = DEFAULT_THRESHOLDS) -> dict:
    """One folder and split with the current gate: {"n", "false_reject_rate", "detection": {class: rate}}; false
    rejects among the originals graders called good or usable where the folder has quality labels, else all."""
    records = collect([data], (split,), {"after": current_gate(thresholds)}, limit, seed, progress=False, extras=False)
    originals = [r for r in records if r["case"] == ORIGINAL]
    if any(r["quality"] for r in originals):
        originals = [r for r in originals if r["quality"] in GRADABLE_LABELS]
    rejected = sum(not _verdict(r, "after")["gradable"] for r in originals)
    detection = {name: float(np.mean([not _verdict(r, "after")["gradable"] for r in records if r["case"] == name]))
                 for name in DEGRADATIONS}
    return {"n": len(originals), "false_reject_rate": rejected / max(len(originals), 1), "detection": detection}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, nargs="+", default=[Path("../shared/data/eyepacs_full"),
                        Path("../shared/data/messidor2"), Path("../shared/data/mexico_dme")])
    parser.add_argument("--split", nargs="+", default=["test"])
    parser.add_argument("--limit", type=int, help="at most this many photos per folder")
    parser.add_argument("--before-ref", help="git revision whose gate is the 'before' (e.g. 1c4167e)")
    parser.add_argument("--no-after", action="store_true", help="only the --before-ref gate (a baseline run)")
    parser.add_argument("--thresholds", type=Path, help="JSON of QualityThresholds fields (default: the packaged ones)")
    parser.add_argument("--cache", type=Path, help="reuse/store the verdicts (JSON)")
    parser.add_argument("--reuse", type=Path, help="a --cache of an earlier run on the same photos: its gates' "
                        "verdicts join this run's (same seed, same copies), e.g. a saved --before-ref baseline")
    parser.add_argument("--copies-every", type=int, default=1,
                        help="degraded and reframed copies of every k-th photo of a folder only (0: none)")
    parser.add_argument("--no-originals", action="store_true", help="the copies only (a second stage of a run)")
    parser.add_argument("--merge", type=Path, nargs="*", default=[],
                        help="--cache files of earlier stages whose records join this run's (e.g. the originals)")
    parser.add_argument("--out", type=Path, default=Path("reports/quality_gate"))
    args = parser.parse_args()
    gates: dict[str, Gate] = {}
    if args.before_ref:
        gates[f"before ({args.before_ref})"] = load_before_gate(args.before_ref)
    if not args.no_after:
        thresholds = (QualityThresholds.from_dict(json.loads(args.thresholds.read_text())["thresholds"])
                      if args.thresholds else DEFAULT_THRESHOLDS)
        gates["after"] = current_gate(thresholds)
    if args.cache and args.cache.is_file():
        records = json.loads(args.cache.read_text())
    else:
        records = collect(args.data, tuple(args.split), gates, args.limit, originals=not args.no_originals,
                          copies_every=args.copies_every)
        if args.cache:
            args.cache.parent.mkdir(parents=True, exist_ok=True)
            args.cache.write_text(json.dumps(records))
    records += [r for path in args.merge for r in json.loads(path.read_text())]
    if args.reuse:
        earlier = {(r["dataset"], r["image"], r["case"]): r["verdicts"] for r in json.loads(args.reuse.read_text())}
        for r in records:
            r["verdicts"] = {**earlier[(r["dataset"], r["image"], r["case"])], **r["verdicts"]}
    summaries = {name: summarise(records, name) for name in records[0]["verdicts"]}
    markdown = to_markdown(summaries, f"Quality gate, split {'+'.join(args.split)}, the Screener's decode for a "
                                      f"{INPUT_SIZE}-px model")
    write_markdown_and_json(args.out, markdown, summaries)
    print(markdown)


if __name__ == "__main__":
    main()
