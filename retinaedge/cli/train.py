"""Training commands: train, pretrain, evaluate, operating-point, distill, synth. Options mirror TrainConfig /
PretrainConfig keys; a YAML (-c) gives defaults and flags win (training.config.resolve_config)."""
from __future__ import annotations

import dataclasses
import json
from functools import partial
from pathlib import Path

import typer
from rich.table import Table

from retinaedge.cli._app import app, console, out_console
from retinaedge.cli._common import fail, flag_overrides, run_logged, yaml_overrides


@app.command()
def train(
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML with TrainConfig keys (CLI flags win)."),
    model: str | None = typer.Option(None, help="Registered model, e.g. efficientnet_b4, tf_efficientnet_lite0."),
    data: list[str] | None = typer.Option(None, help="Dataset folder(s); none = synthetic fundus data."),
    epochs: int | None = typer.Option(None), batch_size: int | None = typer.Option(None),
    lr: float | None = typer.Option(None), input_size: int | None = typer.Option(None),
    pretrained: bool | None = typer.Option(None, "--pretrained/--no-pretrained"),
    pretrained_file: str | None = typer.Option(None, help="Local ImageNet checkpoint (offline machines)."),
    init_from: str | None = typer.Option(None, help="Fundus backbone.pt from `retinaedge pretrain` (replaces ImageNet)."),
    loss: str | None = typer.Option(None, help="ce | focal"), device: str | None = typer.Option(None),
    max_minutes: float | None = typer.Option(None), resume: bool | None = typer.Option(None, "--resume"),
    out: str | None = typer.Option(None), seed: int | None = typer.Option(None),
    head: list[str] | None = typer.Option(None, help="Heads (repeatable): grade, dme. E.g. --head grade --head dme."),
    grade_head: str | None = typer.Option(None, help="softmax | ordinal (one severity score, adjacent-category logits)."),
    set_values: list[str] | None = typer.Option(None, "--set", help="Any other config key as KEY=VALUE, the value "
                                                "in YAML (repeatable), e.g. --set label_smoothing=0.1; flags win."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Fine-tune a registered model (defaults -> YAML -> flags). Works under torchrun for multi-GPU."""
    from training.config import TrainConfig, resolve_config
    from training.train import fit

    try:
        cfg = resolve_config(TrainConfig, config, yaml_overrides(set_values) | flag_overrides(
            model=model, data=data, epochs=epochs, batch_size=batch_size, lr=lr, input_size=input_size,
            pretrained=pretrained, pretrained_file=pretrained_file, init_from=init_from, loss=loss, device=device,
            max_minutes=max_minutes, resume=resume, out=out, seed=seed, heads=head, grade_head=grade_head))
        result = run_logged(Path(cfg.out) / "train.log", verbose,
                             f"training {cfg.model}, {cfg.epochs} epochs (per-epoch lines in the log)",
                             partial(fit, cfg))
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        fail(exc)
    if result.metrics.get("val"):
        _metrics_table(result.metrics, f"{cfg.model} -> {result.best_checkpoint}")


@app.command()
def pretrain(
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML with PretrainConfig keys (CLI flags win)."),
    model: str | None = typer.Option(None, help="Registered model whose backbone to pretrain."),
    data: list[str] | None = typer.Option(None, help="Labelled fundus folder(s) (repeatable); their train splits train."),
    epochs: int | None = typer.Option(None), batch_size: int | None = typer.Option(None),
    lr: float | None = typer.Option(None), input_size: int | None = typer.Option(None),
    pretrained: bool | None = typer.Option(None, "--pretrained/--no-pretrained", help="Start from ImageNet or random."),
    device: str | None = typer.Option(None), max_minutes: float | None = typer.Option(None),
    out: str | None = typer.Option(None), seed: int | None = typer.Option(None),
    set_values: list[str] | None = typer.Option(None, "--set", help="Any other config key as KEY=VALUE, the value "
                                                "in YAML (repeatable), e.g. --set label_smoothing=0.1; flags win."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Pretrain a backbone on labelled fundus folders (grade, abnormal, DME heads) for `train --init-from`."""
    from training.config import resolve_config
    from training.pretrain import PretrainConfig
    from training.pretrain import pretrain as run_pretrain

    try:
        cfg = resolve_config(PretrainConfig, config, yaml_overrides(set_values) | flag_overrides(
            model=model, data=data, epochs=epochs, batch_size=batch_size, lr=lr, input_size=input_size,
            pretrained=pretrained, device=device, max_minutes=max_minutes, out=out, seed=seed))
        path = run_logged(Path(cfg.out) / "pretrain.log", verbose,
                           f"pretraining {cfg.model}, {cfg.epochs} epochs (per-epoch lines in the log)",
                           partial(run_pretrain, cfg))
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        fail(exc)
    val = json.loads(path.with_suffix(".json").read_text())["val"]
    out_console.print(f"backbone: {path} (val grade QWK {val['grade_qwk']:.3f}, abnormal AUC {val['abnormal_auc']:.3f}, "
                      f"DME AUC {val['dme_auc']:.3f} on {val['n_dme']} photos); use `retinaedge train --init-from {path}`")


def _metrics_table(metrics: dict, title: str) -> None:
    from benchmarks.report import with_ci

    table = Table(title=title, caption="[ ] = 95% interval (Wilson; AUC, QWK: bootstrap). Assists screening; does not diagnose.")
    for column in ("split", "n (ref+)", "QWK", "ref. sensitivity", "ref. specificity", "ref. AUC", "uncertain"):
        table.add_column(column)
    for split in ("val", "test"):
        if split in metrics:
            m = metrics[split]
            table.add_row(split, f"{m['n']} ({m.get('n_positive', '-')})", with_ci(m, "qwk"),
                          with_ci(m, "referable_sensitivity"), with_ci(m, "referable_specificity"),
                          with_ci(m, "referable_auc"), str(m.get("uncertain", "-")))
    out_console.print(table)
    for split in ("val", "test"):
        dme = (metrics.get(split) or {}).get("dme")
        if dme:
            out_console.print(f"DME {split} (n={dme['n']}, n+={dme['n_positive']}, unlabelled {dme['n_missing']}): "
                              f"AUC {with_ci(dme, 'auc')}, sensitivity {with_ci(dme, 'sensitivity')}, "
                              f"specificity {with_ci(dme, 'specificity')}; {dme.get('operating_point', '')}")
    point = metrics.get("operating_point") or (metrics.get("test") or {}).get("operating_point")
    if point:
        from edge_runtime.contract import OperatingPoint

        out_console.print(f"operating point: {point if isinstance(point, str) else OperatingPoint(**point).describe()}")


@app.command()
def evaluate(checkpoint: Path = typer.Option(...), data: Path = typer.Option(...), split: str = typer.Option("test"),
             out: Path | None = typer.Option(None, help="Folder for eval_<data>_<split>.json/.png (default: beside the checkpoint).")):
    """Evaluate a checkpoint on one split of a labelled folder: QWK, accuracy, referable sensitivity/specificity/AUC."""
    from training.evaluate import evaluate as run_evaluate

    try:
        metrics = run_evaluate(checkpoint, data, split, out=out or checkpoint.parent)
    except (ValueError, FileNotFoundError) as exc:
        fail(exc)
    _metrics_table({"test": metrics}, f"{metrics['model']} on {data.name}/{split}")
    cal = metrics["calibration"]
    out_console.print(f"calibration on these photos (T={cal['temperature']:.3f}): ECE {cal['ece_before']:.3f} -> "
                      f"{cal['ece_after']:.3f}, Brier {cal['brier_before']:.3f} -> {cal['brier_after']:.3f}, referable "
                      f"ECE {cal['referable_ece_before']:.3f} -> {cal['referable_ece_after']:.3f} (n={int(cal['n'])})")
    out_console.print(f"ROC with the operating point: {metrics['roc_png']}")


@app.command("operating-point")
def operating_point(
    checkpoint: Path = typer.Option(..., help="best.pt to re-calibrate; its metadata is updated in place."),
    data: list[Path] = typer.Option(..., help="Labelled folder(s) whose val split chooses the point (repeatable)."),
    split: str = typer.Option("val"),
    rule: str = typer.Option("sensitivity", help="sensitivity | specificity | youden"),
    target: float = typer.Option(0.90, help="The val sensitivity (or specificity) to reach."),
    band_fraction: float = typer.Option(0.05, help="Share of val photos nearest the threshold reported uncertain."),
    dme_rule: str | None = typer.Option(None, help="DME head: sensitivity | specificity | youden (default: the "
                                        "checkpoint's DME rule)."),
    dme_target: float | None = typer.Option(None, help="DME head: the val sensitivity (or specificity) to reach on "
                                            "the photos with a DME label (default: the checkpoint's DME target)."),
    per_folder: bool = typer.Option(False, "--per-folder", help="Weight each --data folder (camera) equally "
                                    "instead of pooling their photos."),
):
    """Choose the temperature and referral threshold of a checkpoint on labelled val photos (and, for a model with a
    DME head, its DME temperature and threshold on those photos that have a DME label)."""
    from training.evaluate import choose_point_for_checkpoint

    try:
        point, dme_point = choose_point_for_checkpoint(checkpoint, data, split, rule, target, band_fraction,
                                                       dme_rule=dme_rule, dme_target=dme_target, per_folder=per_folder)
    except (ValueError, FileNotFoundError) as exc:
        fail(exc)
    out_console.print(f"{checkpoint}: {point.describe()}; T={point.temperature:.3f}, band {point.uncertain_band}")
    out_console.print_json(json.dumps(point.calibration))
    if dme_point is not None:
        out_console.print(f"DME point: {dme_point.describe()}; T={dme_point.temperature:.3f}, specificity "
                          f"{dme_point.specificity:.3f} (n-={dme_point.n_negative})")


@app.command()
def distill(
    teacher: list[Path] | None = typer.Option(None, help="Teacher checkpoint (best.pt of a train run); repeat for "
                                              "an ensemble (mean of calibrated outputs). Or `teacher:` in the YAML."),
    student: str = typer.Option("tf_efficientnet_lite0", help="Registered student model."),
    config: Path | None = typer.Option(None, "--config", "-c"),
    data: list[str] | None = typer.Option(None, help="Labelled dataset folder(s); none = synthetic fundus data."),
    unlabelled: list[str] | None = typer.Option(None, help="Folder of extra photos the teachers label (repeatable; "
                                                "any layout, labels ignored; never one of the --data folders)."),
    distill_on_calib: bool | None = typer.Option(None, "--distill-on-calib/--no-distill-on-calib",
                                                 help="Also distil on the --data folders' calib split (default on)."),
    teacher_batch_size: int | None = typer.Option(None, help="Batch of the teachers' forward passes (default 4 x batch)."),
    device: str | None = typer.Option(None, help="auto | cpu | cuda | cuda:N; the teachers run there too."),
    epochs: int | None = typer.Option(None),
    alpha: float | None = typer.Option(None), temperature: float | None = typer.Option(None),
    cam_weight: float | None = typer.Option(None, help="CAM-attention transfer weight (0 = off)."),
    input_size: int | None = typer.Option(None), pretrained: bool | None = typer.Option(None, "--pretrained/--no-pretrained"),
    pretrained_file: str | None = typer.Option(None, help="Local ImageNet checkpoint for the student (offline machines)."),
    batch_size: int | None = typer.Option(None), lr: float | None = typer.Option(None),
    max_minutes: float | None = typer.Option(None), out: str | None = typer.Option(None),
    grade_head: str | None = typer.Option(None, help="Student's grade head: softmax | ordinal."),
    set_values: list[str] | None = typer.Option(None, "--set", help="Any other config key as KEY=VALUE, the value "
                                                "in YAML (repeatable), e.g. --set label_smoothing=0.1; flags win."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Distil a teacher into a student: soft targets (KL at temperature T) + class-weighted CE (+ CAM transfer)."""
    from compression.distill import distill as run_distill
    from training.config import TrainConfig, resolve_config

    try:
        cfg = resolve_config(TrainConfig, config, yaml_overrides(set_values) | flag_overrides(
            teacher=teacher, model=student, data=data, unlabelled=unlabelled, distill_on_calib=distill_on_calib,
            teacher_batch_size=teacher_batch_size, device=device, epochs=epochs, alpha=alpha, temperature=temperature,
            cam_weight=cam_weight, input_size=input_size, pretrained=pretrained, pretrained_file=pretrained_file,
            batch_size=batch_size, lr=lr, max_minutes=max_minutes, out=out, grade_head=grade_head))
        if out is None and cfg.out == TrainConfig().out:  # neither YAML nor flags chose a folder
            cfg = dataclasses.replace(cfg, out="runs/distill")
        run, report = run_logged(Path(cfg.out) / "distill.log", verbose,
                                  f"distilling into {cfg.model}, {cfg.epochs} epochs (details in the log)",
                                  partial(run_distill, cfg))
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        fail(exc)
    table = Table(title=f"student vs teacher on {report['split']} (n={report['n']})")
    for column in ("model", "QWK", "ref. sens", "ref. spec", "ref. AUC"):
        table.add_column(column)
    rows = [("student", report["student"]), ("teacher" if len(report["teachers"]) == 1 else "ensemble", report["teacher"])]
    if len(report["teachers"]) > 1:
        rows += [(f"  {m['model']} (T={m['temperature']:.2f}) {m['checkpoint']}", m) for m in report["teachers"]]
    for name, m in rows:
        table.add_row(name, *(f"{m[k]:.3f}" for k in ("qwk", "referable_sensitivity", "referable_specificity", "referable_auc")))
    out_console.print(table)
    photos = report["photos"]
    out_console.print(f"photos: {photos['labelled']} labelled + {photos['unlabelled']} labelled by the teacher "
                      f"{photos['unlabelled_sources']}; teacher outputs on {report['device']}")
    out_console.print(f"grade agreement {report['agreement']:.3f}, CAM correlation {report['cam_correlation']:.3f}")


@app.command()
def synth(out: Path = typer.Argument(...), per_grade: int = typer.Option(40), size: int = typer.Option(256),
          seed: int = typer.Option(0)):
    """Write a synthetic fundus dataset (labels.csv layout)."""
    from training.data.synthetic import write_synthetic_dataset

    write_synthetic_dataset(out, per_grade, size, seed)
    console.print(f"wrote {per_grade * 5} images to {out}")
