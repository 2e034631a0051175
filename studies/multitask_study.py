"""The matched study: today's default student recipe against the multi-task student, same training budget, each at
its own val-chosen referral point.

Arms (both distilled from the same Lite2 teacher, same epochs, batch, LR and ``max_minutes``):
- baseline: ``training/configs/lite0_distill.yaml`` (eyepacs_full, eyepacs_256, messidor2; grade head) with a DME
  head added (``--baseline-heads``), so its DME head learns from Messidor-2's labels alone, as DME was measured
  before, and the DME AUC ratio has a reference;
- multi-task: ``training/configs/lite0_multitask.yaml`` (mexico_dme joins with its partial labels, consistency
  under the gate's nuisance model, the referral point chosen per folder), with the per-source sampling weights that
  won on val (``weights``).

Reported, per test folder (camera): referable-DR AUC of each arm with 95% intervals and the paired AUC ratio
multi-task / baseline (``edge_runtime.metrics.paired_bootstrap_auc_ratio``: 95% interval and one-sided lower bound;
target >= 0.97), the same for DME on the photos with a DME label, the pooled DME AUC (target >= 0.90);
sensitivity and specificity at each arm's point (Wilson); the referral noise floor D0 on the raw-camera val photos
(eyepacs_full, messidor2) under the gate's nuisance model (``compression.noise_floor``: the same K seeded draws for
both arms, folder-weighted, patient bootstrap; target <= 2.5%); training minutes.

Commands (2-core CPU; the Lite2 teacher at runs/lite2_teacher/best.pt must exist):

    # 1. per-source sampling weights, chosen on val: short multi-task runs, one per candidate (here 3 x 10 min)
    nice -n 10 python -m studies.multitask_study weights --out runs/multitask_study --minutes 10 \\
        --candidate eyepacs_full=1,eyepacs_256=1,messidor2=1,mexico_dme=1 \\
        --candidate eyepacs_full=2,eyepacs_256=1,messidor2=2,mexico_dme=1 \\
        --candidate eyepacs_full=1,eyepacs_256=0.5,messidor2=1,mexico_dme=1
    # 2. both arms at one budget (28 min each, the default recipe's), then the comparison (about 10 min)
    nice -n 10 python -m studies.multitask_study run --out runs/multitask_study --minutes 28
    # 3. the tables again from the saved checkpoints (no training)
    nice -n 10 python -m studies.multitask_study compare --out runs/multitask_study

A smoke run of the whole pipeline on the real folders (test_dr_tiny at 96 px, one epoch per arm, no teacher):

    nice -n 10 python -m studies.multitask_study run --out runs/multitask_smoke --no-teacher --minutes 1 \
        --set model=test_dr_tiny --set pretrained=false --set input_size=96 --set epochs=1

``run`` reads the weights ``weights`` chose (``<out>/weights.json``) unless ``--source-weights`` is given; without
either, every photo is drawn once per epoch. ``--no-teacher`` trains both arms alone (no distillation), e.g. for a
smoke run before the teacher exists.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader

from compression.noise_floor import ClusteredBootstrap, NuisanceModel, noise_floor
from edge_runtime.decision import decide_batch
from edge_runtime.metrics import (
    binary_auc_interval,
    binary_sensitivity_specificity,
    is_referable,
    paired_bootstrap_auc_ratio,
    roc_auc,
)
from edge_runtime.preprocess import normalize
from training.config import TrainConfig, resolve_config
from training.data.dataset import FundusDataset, cache_images
from training.data.layouts import MISSING, assign_splits, read_dme, read_partial_samples, select
from training.inference import predict
from training.models import load_checkpoint
from training.train import fit, load_samples

log = logging.getLogger("studies.multitask_study")

CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TEST_FOLDERS = ("eyepacs_full", "messidor2", "mexico_dme", "eyepacs_256")
NOISE_FLOOR_FOLDERS = ("eyepacs_full", "messidor2")  # raw-camera val photos, as the INT8 gate's noise floor
GATE_NUISANCE = NuisanceModel()  # the gate's frozen defaults: 16 draws per photo


# ---------------------------------------------------------------- training the arms
def arm_config(yaml_path: Path, out: Path, minutes: float | None, overrides: dict | None = None) -> TrainConfig:
    """An arm's resolved config with the study's budget and output folder."""
    values = {"out": str(out), **({"max_minutes": minutes} if minutes else {}), **(overrides or {})}
    return resolve_config(TrainConfig, yaml_path, values)


def train_arm(cfg: TrainConfig) -> Path:
    """Train one arm; with ``cfg.teacher`` distilled exactly as ``retinaedge distill`` does (teacher outputs on every
    training photo and on the calib split), without its student-vs-teacher report. Returns best.pt."""
    if not cfg.teacher:
        return fit(cfg, progress=False).best_checkpoint
    from compression.distill import distillation_loss, distillation_photos, load_teachers, teacher_targets
    from training.train import resolve_device

    teachers = load_teachers(cfg.teacher)
    photos = distillation_photos(cfg, load_samples(cfg))
    targets = teacher_targets(teachers, photos.all, cfg, resolve_device(cfg.device), False)
    return fit(cfg, extra_loss=distillation_loss(cfg), extra_targets=targets, progress=False,
               unlabelled=photos.unlabelled).best_checkpoint


def parse_weights(text: str) -> dict[str, float]:
    """``eyepacs_full=1,mexico_dme=0.5`` -> {"eyepacs_full": 1.0, "mexico_dme": 0.5}."""
    pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
    if any(len(p) != 2 for p in pairs):
        raise SystemExit(f"--candidate/--source-weights must read FOLDER=WEIGHT,...; got {text!r}")
    return {name.strip(): float(value) for name, value in pairs}


def val_score(metrics: dict) -> float:
    """What chooses the sampling weights on val: the mean of the val referable AUC and, with a DME head, the val
    DME AUC (both threshold-free, so the referral point does not enter)."""
    val = metrics["val"]
    parts = [val["referable_auc"]] + ([val["dme"]["auc"]] if "dme" in val else [])
    return float(np.mean(parts))


def choose_weights(out: Path, candidates: list[dict[str, float]], minutes: float, config: Path,
                   extra: dict | None = None) -> dict:
    """Train the multi-task recipe once per candidate weighting (same budget) and keep the best on val."""
    rows = []
    for i, weights in enumerate(candidates):
        overrides = {"source_weights": weights, **(extra or {})}
        cfg = arm_config(config, out / f"weights_{i}", minutes, overrides)
        best = train_arm(cfg)
        metrics = json.loads((best.parent / "metrics.json").read_text())
        rows.append({"source_weights": weights, "val_score": val_score(metrics), "run": str(best.parent),
                     "val_referable_auc": metrics["val"]["referable_auc"],
                     "val_dme_auc": metrics["val"].get("dme", {}).get("auc"),
                     "train_minutes": metrics["train_minutes"]})
        log.info("weights %s: val score %.4f", weights, rows[-1]["val_score"])
    chosen = max(rows, key=lambda r: r["val_score"])
    record = {"chosen": chosen["source_weights"], "rule": "max mean(val referable AUC, val DME AUC)",
              "candidates": rows}
    (out / "weights.json").write_text(json.dumps(record, indent=2))
    return record


# ---------------------------------------------------------------- scoring a checkpoint
@dataclasses.dataclass(frozen=True)
class FolderScores:
    """One checkpoint on one folder's split: labels and the decisions at its own points."""

    grades: np.ndarray  # MISSING where no single grade
    dme: np.ndarray  # MISSING where no DME label
    referable_probability: np.ndarray
    referred: np.ndarray  # referable DR at the referral point
    dme_probability: np.ndarray | None
    dme_present: np.ndarray | None


def folder_samples(folder: Path, split: str):
    return select(assign_splits(read_partial_samples(folder)), split)


def score_folder(checkpoint: Path, folder: Path, split: str, cache_dir: str) -> FolderScores:
    model, meta = load_checkpoint(checkpoint)
    samples = folder_samples(folder, split)
    grades = np.array([s.grade for s in samples])
    labels = read_dme(folder)
    dme = np.array([labels.get(s.path, MISSING) for s in samples])
    images = cache_images(samples, meta.preprocess, cache_dir, False)
    logits, dme_logits = predict(model, DataLoader(FundusDataset(images, grades, meta.preprocess), batch_size=32),
                                 torch.device("cpu"), heads=True)
    decisions = decide_batch(logits, meta.operating_point, dme_logits, meta.dme_point)
    return FolderScores(grades, dme, decisions.referable_probability, decisions.dr_referable
                        if decisions.dr_referable is not None else decisions.referable,
                        decisions.dme_probability, decisions.dme_present)


def _auc_row(positive: np.ndarray, test: np.ndarray, reference: np.ndarray | None) -> dict:
    row = {"n": int(len(positive)), "n_positive": int(positive.sum()),
           "auc": roc_auc(positive, test), "auc_ci": binary_auc_interval(positive, test)}
    if reference is not None:
        row["baseline_auc"], row["baseline_auc_ci"] = roc_auc(positive, reference), binary_auc_interval(positive,
                                                                                                         reference)
        ratio = paired_bootstrap_auc_ratio(positive, test, reference)
        row["auc_ratio"], row["auc_ratio_ci"], row["auc_ratio_lower_bound"] = (ratio.estimate, (ratio.low, ratio.high),
                                                                               ratio.lower_bound)
    return row


def compare_folder(multitask: FolderScores, baseline: FolderScores) -> dict:
    """Referable-DR and DME AUCs of both arms on the same photos, the paired ratios, and each arm's sensitivity and
    specificity at its own point."""
    graded = multitask.grades != MISSING
    out: dict = {"n_photos": int(len(graded)), "n_graded": int(graded.sum())}
    positive = is_referable(multitask.grades[graded])
    if positive.any() and (~positive).any() and graded.sum() >= 4:
        out["referable"] = _auc_row(positive, multitask.referable_probability[graded],
                                    baseline.referable_probability[graded])
        out["referable"]["multitask_at_point"] = binary_sensitivity_specificity(positive, multitask.referred[graded])
        out["referable"]["baseline_at_point"] = binary_sensitivity_specificity(positive, baseline.referred[graded])
    labelled = multitask.dme != MISSING
    if multitask.dme_probability is not None and labelled.sum() >= 4:
        dme_positive = multitask.dme[labelled] == 1
        if dme_positive.any() and (~dme_positive).any():
            reference = None if baseline.dme_probability is None else baseline.dme_probability[labelled]
            out["dme"] = _auc_row(dme_positive, multitask.dme_probability[labelled], reference)
            out["dme"]["multitask_at_point"] = binary_sensitivity_specificity(dme_positive,
                                                                              multitask.dme_present[labelled])
    return out


def referral_noise_floor(checkpoint: Path, folders: list[Path], split: str, cache_dir: str,
                         nuisance: NuisanceModel = GATE_NUISANCE) -> dict:
    """D0 = mean_i 2 q_i (1 - q_i) of the checkpoint's referrals over ``nuisance.draws`` seeded re-captures of each
    photo (the gate's draws: photo i of the set, draw k), folder-weighted with a patient bootstrap
    (``compression.noise_floor``); for the device's referral (referable DR or DME present) and for DR alone."""
    model, meta = load_checkpoint(checkpoint)
    samples, names = [], []
    for folder in folders:
        chosen = folder_samples(folder, split)
        samples += chosen
        names += [Path(folder).name] * len(chosen)
    names = np.array(names)
    patients = np.array([s.patient for s in samples])
    crops = np.asarray(cache_images(samples, meta.preprocess, cache_dir, False))
    referred, dr_referred = [], []
    for k in range(nuisance.draws):
        moved = normalize(np.stack([nuisance.perturb(img, i, k) for i, img in enumerate(crops)]), meta.preprocess)
        with torch.no_grad():
            outputs = [model(torch.from_numpy(moved[i:i + 32]), heads=True) for i in range(0, len(moved), 32)]
        logits = torch.cat([o.logits for o in outputs]).numpy()
        dme = torch.cat([o.dme_logit for o in outputs]).numpy() if model.has_dme else None
        decisions = decide_batch(logits, meta.operating_point, dme, meta.dme_point)
        referred.append(decisions.referable)
        dr_referred.append(decisions.dr_referable if decisions.dr_referable is not None else decisions.referable)
    boot = ClusteredBootstrap(names, patients)
    out = {"n": len(samples), "draws": nuisance.draws, "folders": sorted(set(names.tolist())),
           "nuisance": nuisance.as_dict()}
    for key, decisions in (("referral", referred), ("dr_referral", dr_referred)):
        q = np.mean(decisions, axis=0)
        floor = noise_floor(q, q, boot, draws=nuisance.draws)
        out[key] = {"d0": floor.d0, "d0_ci": floor.d0_interval, "method": floor.method}
    return out


def compare(out: Path, data: Path, cache_dir: str, split: str = "test", test_folders=TEST_FOLDERS,
            floor_folders=NOISE_FLOOR_FOLDERS, nuisance: NuisanceModel = GATE_NUISANCE) -> dict:
    """The study's figures from the two arms' best.pt under ``out``: ``test_folders`` of ``data`` scored on
    ``split``, the noise floor on the val photos of ``floor_folders``."""
    arms = {name: out / name / "best.pt" for name in ("baseline", "multitask")}
    report: dict = {"split": split, "folders": {}, "arms": {}}
    for name, checkpoint in arms.items():
        metrics = json.loads((checkpoint.parent / "metrics.json").read_text())
        _, meta = load_checkpoint(checkpoint)
        report["arms"][name] = {
            "checkpoint": str(checkpoint), "train_minutes": metrics["train_minutes"],
            "epochs": len(metrics["history"]), "operating_point": meta.operating_point.describe(),
            "referral_point_photos": meta.referral_point_photos,
            "noise_floor": referral_noise_floor(checkpoint, [data / f for f in floor_folders], "val", cache_dir,
                                                nuisance)}
    pooled_dme: list[tuple[np.ndarray, np.ndarray]] = []
    for folder in test_folders:
        if not (data / folder).is_dir():
            continue
        multitask = score_folder(arms["multitask"], data / folder, split, cache_dir)
        baseline = score_folder(arms["baseline"], data / folder, split, cache_dir)
        report["folders"][folder] = compare_folder(multitask, baseline)
        if multitask.dme_probability is not None:
            labelled = multitask.dme != MISSING
            pooled_dme.append((multitask.dme[labelled] == 1, multitask.dme_probability[labelled]))
    if pooled_dme:
        positive, score = (np.concatenate(parts) for parts in zip(*pooled_dme, strict=True))
        report["pooled_dme"] = {"n": int(len(positive)), "n_positive": int(positive.sum()),
                                "auc": roc_auc(positive, score), "auc_ci": binary_auc_interval(positive, score)}
    (out / "study.json").write_text(json.dumps(report, indent=2, default=float))
    (out / "study.md").write_text(markdown(report))
    return report


def _ci(pair) -> str:
    return f"[{pair[0]:.3f}, {pair[1]:.3f}]"


def markdown(report: dict) -> str:
    """The study's tables, as the dated write-up quotes them."""
    lines = ["| arm | training minutes | epochs | point | D0 referral (raw-camera val) | D0 DR only |", "|---|---|---|---|---|---|"]
    for name, arm in report["arms"].items():
        floor = arm["noise_floor"]
        lines.append(f"| {name} | {arm['train_minutes']:.1f} | {arm['epochs']} | {arm['operating_point']} | "
                     f"{floor['referral']['d0']:.4f} {_ci(floor['referral']['d0_ci'])} (n = {floor['n']}) | "
                     f"{floor['dr_referral']['d0']:.4f} {_ci(floor['dr_referral']['d0_ci'])} |")
    lines += ["", f"Per {report['split']} folder (multi-task / baseline; ratio: paired bootstrap, 95% interval and "
              "one-sided lower bound):", "",
              "| folder | finding | n (positive) | multi-task AUC | baseline AUC | ratio | lower bound |",
              "|---|---|---|---|---|---|---|"]
    for folder, figures in report["folders"].items():
        for finding in ("referable", "dme"):
            row = figures.get(finding)
            if row is None:
                continue
            base = (f"{row['baseline_auc']:.3f} {_ci(row['baseline_auc_ci'])}" if "baseline_auc" in row else "-")
            ratio = (f"{row['auc_ratio']:.3f} {_ci(row['auc_ratio_ci'])}" if "auc_ratio" in row else "-")
            bound = f"{row['auc_ratio_lower_bound']:.3f}" if "auc_ratio_lower_bound" in row else "-"
            lines.append(f"| {folder} | {finding} | {row['n']} ({row['n_positive']}) | {row['auc']:.3f} "
                         f"{_ci(row['auc_ci'])} | {base} | {ratio} | {bound} |")
    if "pooled_dme" in report:
        pooled = report["pooled_dme"]
        lines += ["", f"Pooled DME AUC (multi-task, every {report['split']} photo with a DME label): "
                  f"{pooled['auc']:.3f} {_ci(pooled['auc_ci'])} (n = {pooled['n']}, {pooled['n_positive']} positive)"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("stage", choices=("weights", "run", "compare"))
    parser.add_argument("--out", type=Path, default=Path("runs/multitask_study"))
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--minutes", type=float, default=None, help="max_minutes of every training run")
    parser.add_argument("--candidate", action="append", default=[], help="weights: FOLDER=W,... (repeatable)")
    parser.add_argument("--source-weights", default=None, help="run: FOLDER=W,... instead of <out>/weights.json")
    parser.add_argument("--baseline-config", type=Path, default=CONFIGS / "lite0_distill.yaml")
    parser.add_argument("--multitask-config", type=Path, default=CONFIGS / "lite0_multitask.yaml")
    parser.add_argument("--baseline-heads", default="grade,dme")
    parser.add_argument("--no-teacher", action="store_true", help="train both arms alone (no distillation)")
    parser.add_argument("--cache-dir", default=".cache/retinaedge")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config key of every training run, YAML value (e.g. model=test_dr_tiny for a smoke run)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    overrides: dict = {"teacher": []} if args.no_teacher else {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key.strip()] = yaml.safe_load(value)
    if args.stage == "weights":
        if not args.candidate:
            raise SystemExit("weights needs at least one --candidate FOLDER=W,...")
        record = choose_weights(args.out, [parse_weights(c) for c in args.candidate], args.minutes,
                                args.multitask_config, overrides)
        log.info("chosen on val: %s", record["chosen"])
        return
    if args.stage == "run":
        weights = (parse_weights(args.source_weights) if args.source_weights else
                   json.loads((args.out / "weights.json").read_text())["chosen"]
                   if (args.out / "weights.json").is_file() else {})
        train_arm(arm_config(args.baseline_config, args.out / "baseline", args.minutes,
                             {"heads": args.baseline_heads.split(","), **overrides}))
        train_arm(arm_config(args.multitask_config, args.out / "multitask", args.minutes,
                             {"source_weights": weights, **overrides}))
    report = compare(args.out, args.data, args.cache_dir)
    print(markdown(report))  # noqa: T201 - the study's table on stdout


if __name__ == "__main__":
    main()
