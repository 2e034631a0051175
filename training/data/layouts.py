"""Readers for the dataset layouts RetinaEdge understands; each yields a list of :class:`Sample`.

Layouts: generic ``labels.csv`` (image,grade[,patient,split]) as in ../shared/data, APTOS 2019
(``train.csv`` id_code,diagnosis + ``train_images/``), Kaggle/EyePACS (``trainLabels.csv`` image,level),
IDRiD grading CSV (``Image name``,``Retinopathy grade``) and folder-per-grade (``0/`` .. ``4/``).
"""
from __future__ import annotations

import csv
import hashlib
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from edge_runtime.preprocess import IMAGE_SUFFIXES
from edge_runtime.registry import Registry
from training.errors import DatasetError

SPLITS = ("train", "val", "calib", "test")
UNLABELLED = -1  # the grade of a photo only a teacher labels (distillation): it has no cross-entropy term
MISSING = UNLABELLED  # any per-photo label a folder lacks (pretraining's DME): masked out of that task's loss
# What a published coarse DR label allows, where a source gives a range instead of an ICDR grade (mexico_dme's
# ``dr_label``: "NPDR" = non-proliferative of unstated stage). None: the label says nothing about the grade.
COARSE_GRADES: dict[str, tuple[int, ...] | None] = {
    "0": (0,), "NPDR": (1, 2, 3), "PDR": (4,), "-": None, "": None,
}


@dataclass(frozen=True)
class Sample:
    path: Path
    grade: int  # ICDR 0-4; MISSING where the folder gives no single grade
    patient: str
    split: str | None = None
    # The grades a coarse label allows (e.g. (1, 2, 3) for NPDR) when ``grade`` is MISSING; the grade loss is then
    # the probability mass on them (training.train.labelled_loss). None: no grade information.
    allowed_grades: tuple[int, ...] | None = None
    source: str = ""  # the data folder it was read from (per-folder sampling weights and operating points)


@dataclass(frozen=True)
class Layout:
    """A dataset layout: how to recognise its folder and how to read it."""

    detect: Callable[[Path], bool]
    read: Callable[[Path], list[Sample]]


# Detection tries layouts in registration order.
LAYOUTS: Registry[Layout] = Registry("dataset layout")


def register_layout(name: str, detect: Callable[[Path], bool]):
    """Register ``reader(root) -> list[Sample]`` for folders where ``detect(root)`` holds."""
    def decorator(reader: Callable[[Path], list[Sample]]):
        LAYOUTS.register(name, Layout(detect, reader))
        return reader
    return decorator


def _find_image(folder: Path, stem: str) -> Path | None:
    for suffix in ("",) + IMAGE_SUFFIXES:
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _read_rows(csv_path: Path) -> list[dict[str, str]]:
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:
        return [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in csv.DictReader(fh)]


def _build(rows: list[tuple[str, str, str | None, str | None]], image_dir: Path, source: Path) -> list[Sample]:
    """rows: (image stem or name, grade text, patient, split). One error listing the first offenders."""
    samples, missing, bad = [], [], []
    for stem, grade_text, patient, split in rows:
        path = _find_image(image_dir, stem)
        try:
            grade = int(float(grade_text))
            if grade not in range(5):
                raise ValueError
        except ValueError:
            bad.append(f"{stem}: {grade_text!r}")
            continue
        if path is None:
            missing.append(stem)
            continue
        if split is not None and split not in SPLITS:
            bad.append(f"{stem}: split {split!r}")
            continue
        samples.append(Sample(path, grade, patient or Path(stem).stem, split or None))
    if missing or bad:
        parts = []
        if missing:
            parts.append(f"{len(missing)} image(s) missing under {image_dir} (first: {missing[:5]})")
        if bad:
            parts.append(f"{len(bad)} row(s) with a grade outside 0-4 or an unknown split (first: {bad[:5]})")
        raise DatasetError(f"{source}: " + "; ".join(parts))
    if not samples:
        raise DatasetError(f"{source}: no labelled images found")
    return samples


@register_layout("labels_csv", lambda root: (root / "labels.csv").is_file())
def read_labels_csv(root: Path) -> list[Sample]:
    rows = _read_rows(root / "labels.csv")
    image_dir = root / "images" if (root / "images").is_dir() else root
    return _build([(r["image"], r["grade"], r.get("patient"), r.get("split")) for r in rows], image_dir, root / "labels.csv")


@register_layout("aptos", lambda root: (root / "train.csv").is_file() and (root / "train_images").is_dir())
def read_aptos(root: Path) -> list[Sample]:
    rows = _read_rows(root / "train.csv")
    return _build([(r["id_code"], r["diagnosis"], None, None) for r in rows], root / "train_images", root / "train.csv")


@register_layout("eyepacs", lambda root: (root / "trainLabels.csv").is_file())
def read_eyepacs(root: Path) -> list[Sample]:
    rows = _read_rows(root / "trainLabels.csv")
    image_dir = next((root / d for d in ("train", "images") if (root / d).is_dir()), root)
    # Kaggle names images <patient>_<left|right>; both eyes of a patient must share a split.
    return _build([(r["image"], r["level"], r["image"].rsplit("_", 1)[0], None) for r in rows], image_dir,
                  root / "trainLabels.csv")


def _idrid_csv(root: Path) -> Path | None:
    for csv_path in sorted(root.glob("*.csv")) + sorted(root.glob("*/*.csv")):
        with open(csv_path, encoding="utf-8-sig") as fh:
            if "Retinopathy grade" in fh.readline():
                return csv_path
    return None


@register_layout("idrid", lambda root: _idrid_csv(root) is not None)
def read_idrid(root: Path) -> list[Sample]:
    csv_path = _idrid_csv(root)
    rows = _read_rows(csv_path)
    image_dir = next((p for p in sorted(root.rglob("*")) if p.is_dir() and any(p.glob("IDRiD_*.jpg"))), root)
    return _build([(r["Image name"], r["Retinopathy grade"], None, None) for r in rows], image_dir, csv_path)


@register_layout("folders", lambda root: any((root / str(g)).is_dir() for g in range(5)))
def read_folders(root: Path) -> list[Sample]:
    samples = []
    for grade in range(5):
        folder = root / str(grade)
        if folder.is_dir():
            samples += [Sample(p, grade, p.stem) for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not samples:
        raise DatasetError(f"{root}: grade folders 0-4 contain no images ({', '.join(IMAGE_SUFFIXES)})")
    return samples


def _find_layout(root: Path) -> str | None:
    return next((name for name, layout in LAYOUTS.items() if layout.detect(root)), None)


def detect_layout(root: str | Path) -> str:
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist")
    name = _find_layout(root)
    if name is not None:
        return name
    raise DatasetError(
        f"{root}: unknown dataset layout; expected one of: labels.csv (image,grade[,patient,split]), "
        "APTOS train.csv + train_images/, EyePACS trainLabels.csv, an IDRiD grading CSV, or folders 0/..4/"
    )


def read_dataset(root: str | Path, layout: str | None = None) -> list[Sample]:
    root = Path(root)
    layout = layout or detect_layout(root)
    return LAYOUTS.get(layout).read(root)


@dataclass(frozen=True)
class LabelledPhoto:
    """A photo with whatever its folder knows about it: a grade, a DME label, or either missing (None)."""

    path: Path
    grade: int | None
    dme: int | None
    split: str | None = None


def read_partial_labels(root: str | Path, split: str | None = None) -> list[LabelledPhoto]:
    """Every photo of a folder with the labels it has, blanks kept as None rather than refused or guessed (a
    clinic's or a public set's ``labels.csv`` often grades only some photos, or labels DME only): for any
    layout, its grades and ``read_dme``'s labels; for ``labels.csv`` also rows whose grade is blank."""
    root = Path(root)
    dme = read_dme(root)
    if detect_layout(root) != "labels_csv":
        photos = [LabelledPhoto(s.path, s.grade, dme.get(s.path), s.split) for s in read_dataset(root)]
    else:
        image_dir = root / "images" if (root / "images").is_dir() else root
        photos, bad = [], []
        for row in _read_rows(root / "labels.csv"):
            path, text = _find_image(image_dir, row["image"]), (row.get("grade") or "").strip()
            try:
                grade = int(float(text)) if text else None
            except ValueError:
                grade = -1  # not a grade: refused below
            if path is None or (grade is not None and grade not in range(5)) or row.get("split") not in (None, "", *SPLITS):
                bad.append(row["image"])
                continue
            photos.append(LabelledPhoto(path, grade, dme.get(path), row.get("split") or None))
        if bad:
            raise DatasetError(f"{root / 'labels.csv'}: {len(bad)} row(s) without an image, with a grade outside 0-4 "
                               f"or an unknown split (first: {bad[:5]})")
    return [p for p in photos if split is None or p.split == split]


def read_partial_samples(root: str | Path) -> list[Sample]:
    """Training samples of a folder whose photos may lack a grade: a generic ``labels.csv`` with blank grades keeps
    them as ``MISSING``, with the grades a ``dr_label`` column allows (``COARSE_GRADES``) where it gives a range; a
    folder with every grade given reads exactly as ``read_dataset``. Blank means unknown, never grade 0; a photo
    with neither a grade nor a coarse set stays in for its other labels (DME) and adds nothing to the grade loss."""
    root = Path(root)
    if detect_layout(root) != "labels_csv":
        return read_dataset(root)
    rows = _read_rows(root / "labels.csv")
    if all((r.get("grade") or "").strip() for r in rows) and "dr_label" not in (rows[0] if rows else {}):
        return read_dataset(root)
    image_dir = root / "images" if (root / "images").is_dir() else root
    samples, bad = [], []
    for r in rows:
        path, text, coarse = _find_image(image_dir, r["image"]), r.get("grade", ""), r.get("dr_label", "")
        try:
            grade = int(float(text)) if text else MISSING
            allowed = COARSE_GRADES[coarse]
        except (ValueError, KeyError):
            bad.append(f"{r['image']}: grade {text!r}, dr_label {coarse!r}")
            continue
        split = r.get("split") or None
        if (path is None or (grade != MISSING and grade not in range(5)) or split not in (None, *SPLITS)
                or (grade != MISSING and allowed is not None and grade not in allowed)):
            bad.append(f"{r['image']}: grade {text!r}, dr_label {coarse!r}, split {split!r}")
            continue
        if grade == MISSING and allowed is not None and len(allowed) == 1:
            grade, allowed = allowed[0], None  # a coarse label that fixes the grade is the grade
        samples.append(Sample(path, grade, r.get("patient") or Path(r["image"]).stem, split,
                              allowed if grade == MISSING else None))
    if bad:
        raise DatasetError(f"{root / 'labels.csv'}: {len(bad)} row(s) without an image, with a grade outside 0-4, a "
                           f"dr_label outside {sorted(k for k in COARSE_GRADES if k)} or contradicting the grade, or "
                           f"an unknown split (first: {bad[:5]})")
    if not samples:
        raise DatasetError(f"{root / 'labels.csv'}: no photos")
    return samples


def allowed_grade_mask(samples: list[Sample]) -> np.ndarray:
    """(n, 5) bool: the grades each photo's label allows; one-hot for a grade, the coarse set for a range, all
    False where nothing is known (no grade term)."""
    mask = np.zeros((len(samples), 5), bool)
    for i, s in enumerate(samples):
        if s.grade != MISSING:
            mask[i, s.grade] = True
        elif s.allowed_grades:
            mask[i, list(s.allowed_grades)] = True
    return mask


def read_dme(root: str | Path) -> dict[Path, int]:
    """Diabetic macular edema labels (0/1) by image path, or {} when the folder has none: a ``dme`` column of a
    generic ``labels.csv``, else Messidor-2's ``provenance.csv`` (``adjudicated_dme``; photos adjudicated
    ungradable get none). Blank cells are left out, so those photos count as unlabelled, not as "no edema"."""
    root = Path(root)
    image_dir = root / "images" if (root / "images").is_dir() else root
    for name, column in (("labels.csv", "dme"), ("provenance.csv", "adjudicated_dme")):
        rows = _read_rows(root / name) if (root / name).is_file() else []
        if not rows or column not in rows[0]:
            continue
        labels, bad = {}, []
        for r in rows:
            if not r[column] or r.get("adjudicated_gradable", "1") == "0":
                continue
            path = _find_image(image_dir, r["image"])
            if r[column] not in ("0", "1") or path is None:
                bad.append(f"{r['image']}: {r[column]!r}")
                continue
            labels[path] = int(r[column])
        if bad:
            raise DatasetError(f"{root / name}: {len(bad)} {column} row(s) not 0/1 or without an image (first: {bad[:5]})")
        return labels
    return {}


def read_unlabelled(root: str | Path) -> list[Sample]:
    """Every photo of a folder, graded ``UNLABELLED``: a supported layout's photos (its labels and splits
    ignored), otherwise every image file below ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"unlabelled photo folder {root} does not exist")
    layout = _find_layout(root)
    if layout is not None:  # a recognised but broken layout raises: fix it rather than read it as loose files
        samples = read_dataset(root, layout)
    else:
        samples = [Sample(p, UNLABELLED, p.stem) for p in sorted(root.rglob("*"))
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not samples:
        raise DatasetError(f"{root}: no photos ({', '.join(IMAGE_SUFFIXES)}) for distillation")
    return [replace(s, grade=UNLABELLED, split=None) for s in samples]


def assign_splits(samples: list[Sample], fractions: dict[str, float] | None = None, seed: int = 0) -> list[Sample]:
    """Patient-level split stratified by each patient's worst grade; keeps splits already given."""
    if all(s.split for s in samples):
        return samples
    fractions = fractions or {"train": 0.7, "val": 0.1, "calib": 0.05, "test": 0.15}
    by_patient: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_patient[s.patient].append(s)
    strata: dict[int, list[str]] = defaultdict(list)
    for patient, items in sorted(by_patient.items()):
        strata[max(s.grade for s in items)].append(patient)
    rng = np.random.default_rng(seed)
    names, cuts = list(fractions), np.cumsum(list(fractions.values()))
    split_of: dict[str, str] = {}
    for grade in sorted(strata):
        patients = strata[grade]
        rng.shuffle(patients)
        for i, patient in enumerate(patients):
            position = (i + 0.5) / len(patients) * cuts[-1]
            split_of[patient] = names[min(int(np.searchsorted(cuts, position, side="right")), len(names) - 1)]
    return [s if s.split else replace(s, split=split_of[s.patient]) for s in samples]


def source_draw_weights(samples: list[Sample], weights: dict[str, float]) -> np.ndarray:
    """Per-photo draw probabilities that give each data folder (``Sample.source``, matched by folder name) its share
    ``weights[name] / sum(weights)`` of the draws, spread evenly over its photos. Photos of no listed folder (e.g.
    a distillation's unlabelled folder) keep their natural share, 1 / n each; the listed folders share the rest."""
    names = np.array([Path(s.source).name if s.source else "" for s in samples])
    listed = np.isin(names, list(weights))
    total = sum(weights[name] for name in set(names[listed]))
    draw = np.full(len(samples), 1.0 / max(1, len(samples)))
    for name in set(names[listed]):
        rows = names == name
        draw[rows] = listed.mean() * weights[name] / total / rows.sum()
    return draw / draw.sum()


def select(samples: list[Sample], split: str | tuple[str, ...]) -> list[Sample]:
    wanted = (split,) if isinstance(split, str) else split
    return [s for s in samples if s.split in wanted]


def fingerprint(samples: list[Sample]) -> str:
    """Identifies a training set: names, grades and file sizes (not paths, so it survives moves)."""
    digest = hashlib.sha256()
    for s in sorted(samples, key=lambda s: (s.path.name, s.grade)):
        # A coarse label joins the grade's text only where there is one, so fully graded sets keep their fingerprint.
        grade = s.grade if s.allowed_grades is None else f"{s.grade}{list(s.allowed_grades)}"
        digest.update(f"{s.path.parent.name}/{s.path.name}:{grade}:{s.path.stat().st_size};".encode())
    return digest.hexdigest()[:16]
