"""One table of several training runs, each evaluated on the same test split (the tables of docs/studies/).

    python -m studies.training_study runs/study18/l0_imagenet runs/study18/l0_random ... \\
        --data ../shared/data/messidor2 --baseline l0_imagenet --out reports/study18

Every run is a `retinaedge train` output folder (``best.pt``, ``metrics.json``, ``config.yaml``). Each checkpoint is
re-evaluated here on the ``--split`` photos of every ``--data`` folder (training.evaluate.evaluate, at the
checkpoint's own val-chosen operating point), so rows trained before a metric was added still get it and every row
is scored by the same code. A row carries what makes it differ (model, input size, backbone init, heads, CAM-guided
augmentation), how long it trained and where (minutes, epochs, device, CPU), its val QWK, and the test figures with n
and 95% intervals (QWK and AUC: bootstrap; sensitivity and specificity: Wilson; DME: the folder's labelled photos).
With ``--baseline RUN`` every row also gets its referable AUC over the baseline's on the same photos, with a paired
bootstrap interval (edge_runtime.metrics.paired_bootstrap_auc_ratio): overlapping per-row intervals cannot say
whether two runs differ, the paired ratio can.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from benchmarks.device import fingerprint as device_fingerprint
from benchmarks.report import format_ci, with_ci, write_markdown_and_json

COLUMNS = ("run", "model @px", "init", "heads", "distilled from", "CAM aug.", "epochs", "train min", "device", "val QWK",
           "test n (ref+)", "QWK", "ref. sensitivity", "ref. specificity", "ref. AUC", "AUC / baseline", "DME n (+)", "DME AUC", "DME sens.", "DME spec.")


def study_row_meta(run: Path) -> dict:
    """What a run folder says about how it was trained (config.yaml, metrics.json)."""
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    trained = json.loads((run / "metrics.json").read_text())
    return {
        "run": run.name, "model": cfg["model"], "input_size": cfg.get("input_size"),
        "init": trained.get("backbone_init", "imagenet" if cfg.get("pretrained", True) else "random"),
        "heads": list(cfg.get("heads", ["grade"])), "grade_head": cfg.get("grade_head", "softmax"),
        "teachers": list(cfg.get("teacher") or []), "cam_augment": cfg.get("cam_augment", "off"),
        "epochs_run": len(trained.get("history") or []), "train_minutes": trained.get("train_minutes"),
        "device": trained.get("device", cfg.get("device")), "val_qwk": trained["val"]["qwk"],
    }


def study_row(run: Path, data: Path, split: str, cache_dir: str) -> dict:
    """The evaluated row of one run folder on one data folder."""
    from training.evaluate import evaluate

    test = evaluate(run / "best.pt", data, split, cache_dir=cache_dir, with_scores=True)
    return {**study_row_meta(run), "data": str(data), "split": split, "test": test, "dme": test.get("dme") or None}


def ensemble_row(name: str, runs: list[Path], data: Path, val_data: list[Path], split: str, cache_dir: str) -> dict:
    """The row of an ensemble of trained runs (mean of their calibrated logits; compression.distill's teacher),
    its referral point chosen on the val photos of every ``--data`` folder. Minutes: the members' together."""
    from compression.distill import evaluate_ensemble

    members = [study_row_meta(run) for run in runs]
    test = evaluate_ensemble([run / "best.pt" for run in runs], data, val_data, split, cache_dir)
    minutes = [m["train_minutes"] for m in members]
    return {
        "run": name, "model": "+".join(m["model"] for m in members),
        "input_size": "/".join(str(m["input_size"]) for m in members),
        "init": "/".join(m["init"] for m in members), "heads": ["grade"], "cam_augment": "off",
        "epochs_run": sum(m["epochs_run"] for m in members),
        "train_minutes": sum(minutes) if all(minutes) else None, "device": members[0]["device"],
        "val_qwk": None, "data": str(data), "split": split, "test": test, "dme": None,
        "members": [str(run) for run in runs],
    }


def add_baseline_ratios(rows: list[dict], baseline: str) -> None:
    """Each row's referable AUC / the baseline run's on the same data folder, paired bootstrap 95% interval."""
    from edge_runtime.metrics import is_referable, paired_bootstrap_auc_ratio

    reference = {r["data"]: r["test"] for r in rows if r["run"] == baseline}
    if not reference:
        raise SystemExit(f"--baseline {baseline} is not one of the runs: {sorted({r['run'] for r in rows})}")
    for row in rows:
        ref = reference[row["data"]]
        if ref["grades"] != row["test"]["grades"]:  # the same photos in the same order, or no pairing
            raise SystemExit(f"{row['run']} and {baseline} were not scored on the same {row['data']} photos")
        boot = paired_bootstrap_auc_ratio(is_referable(ref["grades"]), row["test"]["referable_probability"],
                                          ref["referable_probability"])
        row["auc_ratio_vs_baseline"] = {"baseline": baseline, "estimate": boot.estimate, "ci": [boot.low, boot.high],
                                        "n": boot.n, "method": f"paired {boot.method} bootstrap"}


def markdown(rows: list[dict], cpu: str) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        t, d = r["test"], r["dme"] or {}
        heads = "+".join(r["heads"]) + (" (ordinal)" if r.get("grade_head") == "ordinal" else "")
        teachers = ", ".join(Path(t).parent.name for t in r.get("teachers") or []) or "-"
        cells = [r["run"], f"{r['model']} @{r['input_size']}", r["init"], heads, teachers, r["cam_augment"],
                 str(r["epochs_run"]), f"{r['train_minutes']:.1f}" if r["train_minutes"] else "-", r["device"],
                 f"{r['val_qwk']:.3f}" if r["val_qwk"] is not None else "-", f"{t['n']} ({t['n_positive']})", with_ci(t, "qwk"),
                 with_ci(t, "referable_sensitivity"),
                 with_ci(t, "referable_specificity"),
                 with_ci(t, "referable_auc"),
                 format_ci(r["auc_ratio_vs_baseline"]["estimate"], r["auc_ratio_vs_baseline"]["ci"])
                 if r.get("auc_ratio_vs_baseline") else "-",
                 f"{d['n']} ({d['n_positive']})" if d else "-", with_ci(d, "auc"),
                 with_ci(d, "sensitivity"), with_ci(d, "specificity")]
        lines.append("| " + " | ".join(cells) + " |")
    split = rows[0]["split"] if rows else "test"
    return "\n".join([
        *lines, "",
        f"Scored on the {split} split at each checkpoint's own val-chosen operating point (an ensemble: the mean of "
        "its members' calibrated logits, at a point chosen on the val photos of every folder); [ ] = 95% interval (QWK and "
        "AUC: percentile bootstrap, 2,000 resamples; sensitivity/specificity: Wilson). Training device CPU: "
        f"{cpu}. Assists screening; does not diagnose."])


def _parse_ensemble(parser: argparse.ArgumentParser, spec: str) -> tuple[str, list[Path]]:
    name, _, runs = spec.partition("=")
    members = [Path(r) for r in runs.split(",") if r]
    if not name or len(members) < 2:
        parser.error(f"--ensemble {spec!r}: expected NAME=RUN,RUN[,RUN...] (two or more run folders)")
    missing = [str(m) for m in members if not (m / "best.pt").is_file()]
    if missing:
        parser.error(f"--ensemble {name}: no best.pt in {', '.join(missing)}")
    return name, members


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="`retinaedge train` output folders")
    parser.add_argument("--data", type=Path, action="append", required=True, help="folder(s) whose split scores every run")
    parser.add_argument("--split", default="test")
    parser.add_argument("--baseline", help="run folder name every row's AUC is compared with (paired bootstrap)")
    parser.add_argument("--ensemble", action="append", default=[], metavar="NAME=RUN,RUN",
                        help="an ensemble row: the mean of these runs' calibrated logits (repeatable)")
    parser.add_argument("--cache-dir", default=".cache/retinaedge")
    parser.add_argument("--out", type=Path, default=Path("reports/training_study"))
    args = parser.parse_args(argv)
    missing = [str(r) for r in args.runs if not (r / "best.pt").is_file() or not (r / "metrics.json").is_file()]
    if missing:
        parser.error(f"not finished `retinaedge train` folders (need best.pt and metrics.json): {', '.join(missing)}")
    ensembles = [_parse_ensemble(parser, spec) for spec in args.ensemble]
    rows = [study_row(run, data, args.split, args.cache_dir) for data in args.data for run in args.runs]
    rows += [ensemble_row(name, members, data, args.data, args.split, args.cache_dir)
             for data in args.data for name, members in ensembles]
    if args.baseline:
        add_baseline_ratios(rows, args.baseline)
    fingerprint = device_fingerprint()
    cpu = f"{fingerprint['cpu']}, {fingerprint['cores']} cores (int8: {', '.join(fingerprint['cpu_int8']['int8']) or 'none'})"
    text = markdown(rows, cpu)
    print(text)
    write_markdown_and_json(args.out, text, {"device": fingerprint, "rows": rows})


if __name__ == "__main__":
    main()
