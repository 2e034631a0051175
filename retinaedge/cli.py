"""The `retinaedge` command. Each subcommand is thin and imports its package lazily, so the edge
commands (grade, watch, sync, info) run in an install without torch."""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
from functools import partial
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="RetinaEdge: DR screening from a full-precision teacher to INT8 edge artifacts. "
                  "A screening aid, not a diagnosis.", no_args_is_help=True, add_completion=False)
admin_app = typer.Typer(help="Companion-server administration: tokens.", no_args_is_help=True)
bench_app = typer.Typer(help="Per-device benchmarks of every artifact.", invoke_without_command=True)
app.add_typer(admin_app, name="admin")
app.add_typer(bench_app, name="bench")
console = Console(stderr=True)
# Tables go to stdout; logs and CI are not terminals, where rich would wrap them to 80 columns.
out_console = Console(width=None if sys.stdout.isatty() else 200)
DISCLAIMER = "RetinaEdge assists screening; it does not diagnose. A clinician must confirm every result."


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr, force=True)


def _quiet(log_path: Path, verbose: bool):
    """Third-party warnings and progress dumps go to ``log_path`` unless --verbose (retinaedge.console)."""
    from retinaedge.console import quiet_output

    if not verbose:
        console.print(f"[dim]details: {log_path} (--verbose prints them here)[/dim]")
    return quiet_output(log_path, verbose)


def _run_logged(log_path: Path, verbose: bool, status: str, run):
    """``run()`` with its output on the console (--verbose), or ``run(progress=False)`` behind a status line
    with the details in ``log_path``."""
    with _quiet(log_path, verbose) as where:
        if verbose:
            return run()
        with where.console.status(status):
            return run(progress=False)


def _fail(exc: Exception, code: int = 2) -> None:
    console.print(f"[red]error:[/red] {type(exc).__name__}: {exc}")
    raise typer.Exit(code)


# ---------------------------------------------------------------- training and compression
def _train_overrides(**kwargs) -> dict:
    """Flags given on the command line; a repeatable flag given zero times leaves the YAML's value alone."""
    return {k: tuple(str(p) for p in v) if isinstance(v, list) else v for k, v in kwargs.items()
            if v is not None and v != []}


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
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Fine-tune a registered model (defaults -> YAML -> flags). Works under torchrun for multi-GPU."""
    from training.config import TrainConfig, resolve_config
    from training.train import fit

    try:
        cfg = resolve_config(TrainConfig, config, _train_overrides(
            model=model, data=data, epochs=epochs, batch_size=batch_size, lr=lr, input_size=input_size,
            pretrained=pretrained, pretrained_file=pretrained_file, init_from=init_from, loss=loss, device=device,
            max_minutes=max_minutes, resume=resume, out=out, seed=seed, heads=head, grade_head=grade_head))
        result = _run_logged(Path(cfg.out) / "train.log", verbose,
                             f"training {cfg.model}, {cfg.epochs} epochs (per-epoch lines in the log)",
                             partial(fit, cfg))
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        _fail(exc)
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
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Pretrain a backbone on labelled fundus folders (grade, abnormal, DME heads) for `train --init-from`."""
    from training.config import resolve_config
    from training.pretrain import PretrainConfig
    from training.pretrain import pretrain as run_pretrain

    try:
        cfg = resolve_config(PretrainConfig, config, _train_overrides(
            model=model, data=data, epochs=epochs, batch_size=batch_size, lr=lr, input_size=input_size,
            pretrained=pretrained, device=device, max_minutes=max_minutes, out=out, seed=seed))
        path = _run_logged(Path(cfg.out) / "pretrain.log", verbose,
                           f"pretraining {cfg.model}, {cfg.epochs} epochs (per-epoch lines in the log)",
                           partial(run_pretrain, cfg))
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        _fail(exc)
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
        _fail(exc)
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
):
    """Choose the temperature and referral threshold of a checkpoint on labelled val photos (and, for a model with a
    DME head, its DME temperature and threshold on those photos that have a DME label)."""
    from training.evaluate import choose_point_for_checkpoint

    try:
        point, dme_point = choose_point_for_checkpoint(checkpoint, data, split, rule, target, band_fraction,
                                                       dme_rule=dme_rule, dme_target=dme_target)
    except (ValueError, FileNotFoundError) as exc:
        _fail(exc)
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
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Distil a teacher into a student: soft targets (KL at temperature T) + class-weighted CE (+ CAM transfer)."""
    from compression.distill import distill as run_distill
    from training.config import TrainConfig, resolve_config

    try:
        cfg = resolve_config(TrainConfig, config, _train_overrides(
            teacher=teacher, model=student, data=data, unlabelled=unlabelled, distill_on_calib=distill_on_calib,
            teacher_batch_size=teacher_batch_size, device=device, epochs=epochs, alpha=alpha, temperature=temperature,
            cam_weight=cam_weight, input_size=input_size, pretrained=pretrained, pretrained_file=pretrained_file,
            batch_size=batch_size, lr=lr, max_minutes=max_minutes, out=out, grade_head=grade_head))
        if out is None and cfg.out == TrainConfig().out:  # neither YAML nor flags chose a folder
            cfg = dataclasses.replace(cfg, out="runs/distill")
        run, report = _run_logged(Path(cfg.out) / "distill.log", verbose,
                                  f"distilling into {cfg.model}, {cfg.epochs} epochs (details in the log)",
                                  partial(run_distill, cfg))
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        _fail(exc)
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
def export(
    checkpoint: Path = typer.Option(..., help="Checkpoint from train/distill."),
    formats: str = typer.Option("onnx,tflite,coreml", help="Comma-separated: onnx, tflite, coreml."),
    precisions: str = typer.Option("fp32,fp16,int8", help="Comma-separated; each format makes those it supports."),
    calib: list[Path] | None = typer.Option(None, help="Real fundus photos for INT8 calibration (`calib` split) and "
                                            "tuning (`train` split); repeat for several folders."),
    val: list[Path] | None = typer.Option(None, help="Labelled photos for parity and the fidelity gate (`val` split); "
                                          "repeat to judge the val splits of several folders together."),
    val_limit: int = typer.Option(128, help="At most this many val photos per --val folder (grades stratified)."),
    out: Path = typer.Option(Path("artifacts"), help="Output folder (gets index.json)."),
    recipe: str = typer.Option("ort", help="INT8 recipe: ort | nncf | nncf_ac (ONNX; TFLite/CoreML use PT2E) | "
                               "qat (ONNX through NNCF, TFLite/CoreML through PT2E)."),
    target: str = typer.Option("x86_avx2", help="CPU class preset: auto (this CPU's int8 features) | x86_avx2 | x86_avx2_fast | x86_vnni | arm64 | jetson_orin."),
    calibration: str = typer.Option("minmax", help="minmax | percentile | entropy (ort recipe)."),
    keep_float: list[str] | None = typer.Option(None, "--keep-float", help="ONNX ort/nncf recipes: keep nodes whose "
                                                "name contains this, or of this op type, in float (mixed precision; "
                                                "repeatable; studies/float_islands.py measures what each costs)."),
    min_referral_agreement: float = typer.Option(0.98, help="Gate: one-sided 95% lower bound of INT8-FP32 referral "
                                                 "agreement (docs/fidelity_gate.md)."),
    min_sensitivity_difference: float = typer.Option(-0.02, help="Gate: lower bound of INT8 - FP32 sensitivity."),
    min_specificity_difference: float = typer.Option(-0.02, help="Gate: lower bound of INT8 - FP32 specificity."),
    min_auc_ratio: float = typer.Option(0.99, help="Gate: referable AUC, INT8 / FP32."),
    min_dme_agreement: float = typer.Option(0.98, help="Gate (DME head): one-sided 95% lower bound of INT8-FP32 "
                                            "DME-present agreement."),
    min_dme_auc_ratio: float = typer.Option(0.99, help="Gate (DME head): DME AUC, INT8 / FP32, on the val photos "
                                            "with a DME label."),
    min_grade_agreement: float | None = typer.Option(None, help="Gate (optional): lower bound of grade agreement."),
    min_clean_referral_agreement: float | None = typer.Option(
        None, help="Gate (optional): lower bound of the share of photos not referred oppositely with both outside "
        "their uncertainty bands."),
    min_qwk_ratio: float | None = typer.Option(None, help="Gate (optional): QWK, INT8 / FP32."),
    min_logit_cosine: float | None = typer.Option(None, help="Gate (optional): mean logit cosine with FP32."),
    min_cam_correlation: float | None = typer.Option(None, help="Gate (optional): mean CAM correlation with FP32."),
    name: str | None = typer.Option(None, help="Artifact file stem (default: model name)."),
    qat_steps: int = typer.Option(0, help="Quantization-aware fine-tuning steps when post-training INT8 and its "
                                  "mixed-precision retries all fail the gate (0: off); uses --calib's train split."),
    qat_lr: float | None = typer.Option(None, help="QAT learning rate (Adam; default QATConfig's 1e-5)."),
    qat_schedule: str = typer.Option("constant", help="QAT learning-rate schedule: constant | cosine (decays to 0 "
                                     "over --qat-steps)."),
    qat_margin_weight: float = typer.Option(0.0, help="QAT: weight of the margin-aware referral term, which holds "
                                            "the referable log-odds of photos near the checkpoint's threshold (a DME head: its DME "
                                            "log-odds near its DME threshold too; 0: off)."),
    tuning_images: int = typer.Option(256, help="Unlabelled photos from --calib's train split that accuracy-"
                                      "controlled mixed precision and QAT hold to FP32's grades (0: none)."),
    escalate: bool = typer.Option(True, "--escalate/--no-escalate",
                                  help="After a failed INT8 gate retry with sensitive layers in float, then accuracy-"
                                  "controlled mixed precision (ONNX), then QAT (with --qat-steps; every format); off: "
                                  "report the recipe as is."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Export self-describing artifacts, verify each numerically, gate INT8; non-zero exit if any fails."""
    from dataclasses import replace

    from compression.gate import GateThresholds
    from compression.qat import QATConfig
    from compression.quantize import QuantRecipe
    from exporters.pipeline import ExportPlan, export_all, load_inputs

    try:
        quant = replace(QuantRecipe.for_target(target, recipe), calibration=calibration).with_exclusions(
            tuple(keep_float or ()))
        thresholds = GateThresholds(
            min_referral_agreement=min_referral_agreement, min_sensitivity_difference=min_sensitivity_difference,
            min_specificity_difference=min_specificity_difference, min_auc_ratio=min_auc_ratio,
            min_dme_agreement=min_dme_agreement, min_dme_auc_ratio=min_dme_auc_ratio,
            min_grade_agreement=min_grade_agreement, min_clean_referral_agreement=min_clean_referral_agreement,
            min_qwk_ratio=min_qwk_ratio, min_logit_cosine=min_logit_cosine,
            min_cam_correlation=min_cam_correlation)
        # --recipe qat goes straight to QAT: its default length unless --qat-steps says otherwise.
        qat = QATConfig(steps=qat_steps or (QATConfig().steps if recipe == "qat" else 0), schedule=qat_schedule,
                        **({"lr": qat_lr} if qat_lr is not None else {}))
        plan = ExportPlan(tuple(formats.split(",")), tuple(precisions.split(",")), quant, qat, escalate)
        with _quiet(out / "export.log", verbose):
            inputs = load_inputs(checkpoint, out, calib, val, thresholds, val_limit=val_limit, name=name,
                                 tuning_limit=tuning_images if plan.needs_tuning_images else 0)
            if qat_margin_weight > 0:  # the referral decisions the gate judges are taken at the checkpoint's point
                plan = replace(plan, qat=qat.holding_margins(qat_margin_weight, inputs.meta.operating_point,
                                                             inputs.meta.dme_point))
            records = export_all(inputs, plan)
    except (ValueError, FileNotFoundError) as exc:
        _fail(exc)
    _print_records(records)
    _print_gate_criteria(records)
    if any(r.status != "ok" or r.gate in ("failed", "insufficient_evidence") for r in records):
        raise typer.Exit(1)


def _print_gate_criteria(records) -> None:
    """Each gated artifact's criteria: value, bound, threshold, margin; and how many more val photos are needed."""
    from compression.gate import criteria_table
    from edge_runtime.contract import ArtifactManifest, manifest_path_for

    for r in records:
        if r.status != "ok" or not r.path or r.gate not in ("passed", "failed", "insufficient_evidence"):
            continue
        manifest = ArtifactManifest.from_json(manifest_path_for(r.path).read_text())
        out_console.print(criteria_table(manifest.gate, title=f"{Path(r.path).name}: fidelity gate"))
        out_console.print(f"operating point: {manifest.operating_point.describe()}")
        for failure in manifest.gate.failures:
            out_console.print(f"  - {failure}")


def _print_records(records) -> None:
    table = Table(title="artifacts")
    for column in ("format", "precision", "status", "size MB", "max|dlogit|", "agreement", "CAM corr", "gate", "s", "note"):
        table.add_column(column)
    def fmt(parity: dict, key: str, spec: str = "{:.4f}") -> str:
        return spec.format(parity[key]) if key in parity else "-"

    for r in records:
        p = r.parity
        table.add_row(r.format, r.precision, r.status, f"{r.size_mb or 0:.2f}", fmt(p, "max_abs_logit_diff", "{:.2e}"),
                      fmt(p, "agreement"), fmt(p, "cam_correlation"), r.gate or "-", f"{r.export_seconds or 0:.1f}",
                      (r.error or "; ".join(r.failures) or r.verified or "")[:80])
    out_console.print(table)


# ---------------------------------------------------------------- edge
@app.command()
def grade(
    images: list[Path] | None = typer.Argument(None, help="Fundus photos, or one folder per encounter (visit): its "
                                               "photos' names say the eye (left/right/OS/OD)."),
    encounter: str | None = typer.Option(None, help="Visit id the photos belong to (an opaque id, never a name); "
                                         "prints the visit's referral decision over both eyes."),
    video: list[Path] | None = typer.Option(None, "--video", help="Capture video(s): the sharpest gradable frame of "
                                            "each is graded and stored as one result (repeat for several)."),
    eye: str | None = typer.Option(None, help="left | right: the eye the photos or --video show (default: from "
                                   "each file name)."),
    stride: int = typer.Option(1, help="--video: score every n-th frame."),
    store_overlays: bool = typer.Option(False, "--store-overlays", help="Render each CAM overlay inside the step and "
                                        "store it with the result (for the server's review page); off: on demand."),
    artifact: Path = typer.Option(..., help="An exported artifact (.onnx, .tflite, .mlpackage) with its manifest."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object per image."),
    save_overlay: Path | None = typer.Option(None, help="Folder for CAM overlay PNGs."),
    outbox: Path | None = typer.Option(None, help="Outbox database; results are stored before they are printed."),
    device_id: str = typer.Option("local"), threads: int | None = typer.Option(None),
    allow_ungated: bool = typer.Option(False, "--allow-ungated", help="Use an artifact that failed its fidelity gate."),
):
    """Grade fundus photos on this device (no torch needed)."""
    from edge_runtime.errors import ImageError, RetinaEdgeError
    from edge_runtime.outbox import Outbox
    from edge_runtime.screen import Screener

    try:
        screener = Screener.from_artifact(artifact, allow_ungated=allow_ungated, threads=threads, device_id=device_id,
                                          outbox=Outbox(outbox) if outbox else None, store_overlays=store_overlays)
    except (RetinaEdgeError, ImportError) as exc:
        _fail(exc)
    if eye not in (None, "left", "right"):
        _fail(ValueError(f"--eye must be left or right, got {eye!r}"))
    if not images and not video:
        _fail(ValueError("give fundus photos and/or --video clips"))
    from edge_runtime.screen import Visit
    from edge_runtime.video import eye_of

    captures: list[tuple[Path, Visit]] = []
    for item in images or []:
        if item.is_dir():  # a folder per encounter: its name is the visit id, the file names say the eye
            for photo in sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
                captures.append((photo, Visit(encounter or item.name, eye or eye_of(photo.name))))
        else:
            captures.append((item, Visit(encounter, eye or eye_of(item.name))))
    failures, visits = 0, {}
    for clip in video or []:
        from edge_runtime.video import screen_video

        try:
            screening, choice = screen_video(screener, clip, eye=eye, stride=stride, encounter_id=encounter)
        except ImageError as exc:
            failures += 1
            _report_capture_error("video", clip, exc, json_output)
            continue
        result = screening.result
        if json_output:
            print(json.dumps({**_grade_json(result, None), "frame": choice.index, "frames_scored": len(choice.scored),
                              "gradable_frames": sum(q.report.gradable for q in choice.scored)}))
        else:
            verdict = _verdict(result)
            out_console.print(f"{result.image_name}: frame {choice.index} of {len(choice.scored)} scored, quality "
                              f"{result.quality.score:.2f}: {verdict}  [{result.backend}/{result.provider}]")
        visits.setdefault(encounter, []).append(screening.result)
    for image, visit in captures:
        try:
            screening = screener.screen_file(image, visit=visit)
        except ImageError as exc:
            failures += 1
            _report_capture_error("image", image, exc, json_output)
            continue
        result = screening.result
        overlay_path = None
        if save_overlay and screening.overlay_png:
            save_overlay.mkdir(parents=True, exist_ok=True)
            overlay_path = save_overlay / f"{image.stem}_cam.png"
            overlay_path.write_bytes(screening.overlay_png)
        if json_output:
            print(json.dumps(_grade_json(result, overlay_path)))
        else:
            verdict = _verdict(result)
            out_console.print(f"{image.name}: {verdict}  [{result.backend}/{result.provider}, {result.model_version}]")
        visits.setdefault(visit.encounter_id, []).append(result)
    _print_encounters(visits, json_output)
    if not json_output:
        console.print(DISCLAIMER)
    raise typer.Exit(1 if failures else 0)


def _report_capture_error(kind: str, path: Path, exc: Exception, json_output: bool) -> None:
    if json_output:
        print(json.dumps({kind: str(path), "error": type(exc).__name__, "detail": str(exc)}))
    else:
        console.print(f"[red]{path.name}: {exc}[/red]")


def _verdict(result) -> str:
    if result.outcome == "ungradable":
        return "UNGRADABLE - retake, or refer if a retake fails: " + "; ".join(result.quality.reasons)
    text = (f"grade {result.grade} ({result.grade_name}), P(referable) {result.referable_probability:.2f} at "
            f"threshold {result.threshold:.2f}")
    if result.has_dme:
        text += f", P(DME) {result.dme_probability:.2f} at {result.dme_threshold:.2f}"
    if result.outcome == "uncertain":
        return text + ": UNCERTAIN - refer or get a second read"
    return text + (f": REFER ({result.referral_reason})" if result.referable else ": no referral")


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")


def _print_encounters(visits: dict, json_output: bool) -> None:
    """Each visit's referral decision over both eyes (refer if either eye is referable, uncertain or ungradable)."""
    from edge_runtime.wire import encounter_decision

    for encounter_id, results in visits.items():
        if encounter_id is None:
            continue
        decision = encounter_decision(results)
        if json_output:
            print(json.dumps({"encounter": encounter_id, "decision": decision.decision, "reason": decision.reason,
                              "eyes": {eye: r.result_id for eye, r in decision.eyes.items()}}))
        else:
            out_console.print(f"visit {encounter_id}: [bold]{decision.decision.upper()}[/bold] - {decision.reason}")


def _grade_json(result, overlay_path) -> dict:
    return {"image": result.image_name, "result_id": result.result_id, "outcome": result.outcome, "grade": result.grade,
            "grade_name": result.grade_name, "probabilities": result.probabilities, "confidence": result.confidence,
            "referable": result.referable, "referable_probability": result.referable_probability,
            "threshold": result.threshold, "encounter_id": result.encounter_id, "eye": result.eye,
            "quality": {"gradable": result.quality.gradable, "score": result.quality.score,
                        "reasons": list(result.quality.reasons), "metrics": result.quality.metrics},
            "cam_peak": result.cam_peak, "overlay": str(overlay_path) if overlay_path else None,
            **({"dme_probability": result.dme_probability, "dme_present": result.dme_present,
                "dme_threshold": result.dme_threshold, "referral_reason": result.referral_reason}
               if result.has_dme else {}),
            "model_version": result.model_version, "model_sha256": result.model_sha256, "backend": result.backend,
            "provider": result.provider, "latency_ms": result.latency_ms, "disclaimer": result.disclaimer}


@app.command()
def watch(
    folder: Path = typer.Argument(..., help="Capture folder to watch."),
    artifact: Path = typer.Option(...), outbox: Path = typer.Option(Path("retinaedge_outbox.db")),
    device_id: str = typer.Option("local"), interval: float = typer.Option(2.0),
    once: bool = typer.Option(False, "--once", help="Grade what is there now, then exit."),
    allow_ungated: bool = typer.Option(False, "--allow-ungated"),
    burst: bool = typer.Option(False, "--burst", help="Each sub-folder is a burst of frames of one capture: grade "
                               "only the sharpest gradable frame per eye (eye from the file names: left/right/OS/OD)."),
    store_overlays: bool = typer.Option(False, "--store-overlays", help="Store each CAM overlay with its result."),
):
    """Grade each new image in a capture folder exactly once, surviving restarts."""
    _logging(False)
    from edge_runtime.outbox import Outbox
    from edge_runtime.screen import Screener
    from edge_runtime.watch import watch_bursts, watch_folder

    box = Outbox(outbox)
    screener = Screener.from_artifact(artifact, allow_ungated=allow_ungated, device_id=device_id, outbox=box,
                                      store_overlays=store_overlays)
    graded = (watch_bursts if burst else watch_folder)(folder, screener, box, interval=interval, once=once)
    console.print(f"graded {graded} new image(s); outbox {box.counts()}")


@app.command()
def sync(
    server: str = typer.Option(..., help="Companion server URL."), token: str = typer.Option(..., envvar="RETINAEDGE_TOKEN"),
    outbox: Path = typer.Option(Path("retinaedge_outbox.db"), help="An existing outbox (sync never creates one)."),
    loop: bool = typer.Option(False, "--loop"), batch_size: int = typer.Option(25), max_rounds: int | None = typer.Option(None),
):
    """Send unacknowledged results to the companion server (idempotent; resumes after restarts)."""
    _logging(False)
    from edge_runtime.errors import OutboxError
    from edge_runtime.outbox import Outbox
    from edge_runtime.sync import SyncClient, SyncError

    try:
        box = Outbox(outbox, create=False)
        report = SyncClient(server, token, box, batch_size).run(loop=loop, max_rounds=max_rounds)
        counts = box.counts()
        quarantined = box.quarantined() if report.quarantined else []
    except (SyncError, OutboxError) as exc:
        _fail(exc)
    console.print(f"sent {report.sent}, outbox {counts}, errors {report.errors}, quarantined {report.quarantined}")
    for row in quarantined[:10]:
        console.print(f"[yellow]quarantined (kept in {outbox}, never sent): {row.result_id}: {row.reason}[/yellow]")


@app.command("update-model")
def update_model(
    server: str = typer.Option(...), token: str = typer.Option(..., envvar="RETINAEDGE_TOKEN"),
    format: str = typer.Option("onnx"), dest: Path = typer.Option(Path("models")),
    trusted_key: str | None = typer.Option(None, "--trusted-key", envvar="RETINAEDGE_TRUSTED_KEY",
                                           help="Publisher's Ed25519 public key (PEM file, PEM text or raw base64); "
                                                "unsigned or altered manifests are then refused."),
    max_mb: float = typer.Option(512.0, help="Largest model this device accepts, MiB."),
    deadline: float = typer.Option(900.0, help="Seconds the whole update may take."),
):
    """Download the newest artifact; it replaces the current one only after every load-time check passed."""
    from edge_runtime.errors import RetinaEdgeError
    from edge_runtime.updates import UpdateLimits, install_latest_model

    try:
        limits = UpdateLimits(max_model_bytes=int(max_mb * 2**20), deadline_s=deadline)
        installed = install_latest_model(server, token, format, dest, limits=limits, trusted_key=trusted_key)
    except (RetinaEdgeError, OSError, ValueError) as exc:
        _fail(exc)
    kept = f"; previous kept at {installed.previous}" if installed.previous else ""
    out_console.print(f"verified and installed {installed.manifest.model_version}: screen with {installed.path}{kept}")


@app.command()
def info(artifact: Path = typer.Argument(...), allow_ungated: bool = typer.Option(True)):
    """Show an artifact's manifest, backend and active providers."""
    from edge_runtime.backends import open_session
    from edge_runtime.errors import RetinaEdgeError

    try:
        session = open_session(artifact, allow_ungated=allow_ungated)
        manifest, backend = session.info.manifest.to_dict(), {"backend": session.info.backend, "provider": session.info.provider,
                                                               **session.info.extra}
    except ImportError as exc:  # e.g. CoreML on Linux: still show the manifest
        from edge_runtime.backends import load_manifest

        manifest, backend = load_manifest(artifact).to_dict(), {"unavailable": str(exc)}
    except RetinaEdgeError as exc:
        _fail(exc)
    print(json.dumps({"manifest": manifest, "runtime": backend}, indent=2, default=str))


@app.command()
def synth(out: Path = typer.Argument(...), per_grade: int = typer.Option(40), size: int = typer.Option(256),
          seed: int = typer.Option(0)):
    """Write a synthetic fundus dataset (labels.csv layout)."""
    from training.data.synthetic import write_synthetic_dataset

    write_synthetic_dataset(out, per_grade, size, seed)
    console.print(f"wrote {per_grade * 5} images to {out}")


# ---------------------------------------------------------------- benchmarks
@bench_app.callback()
def bench(
    ctx: typer.Context,
    artifacts: Path | None = typer.Option(None, help="Folder of exported artifacts (with manifests)."),
    data: Path | None = typer.Option(None, help="Labelled photos for accuracy (its `test` split)."),
    lesions: Path | None = typer.Option(None, help="lesion_boxes folder for the CAM pointing game."),
    torch_checkpoint: list[Path] | None = typer.Option(None, help="PyTorch eager baselines, e.g. the B4 teacher."),
    runs: int = typer.Option(100), min_seconds: float = typer.Option(10.0), threads: int | None = typer.Option(None),
    mlperf: bool = typer.Option(False, "--mlperf", help="MLPerf single-stream: >= 1024 queries and >= 60 s."),
    eval_limit: int | None = typer.Option(None), split: str = typer.Option("test"),
    out: Path = typer.Option(Path("bench")), verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Benchmark every artifact this device can run; writes JSON, Markdown, plots and HTML."""
    if ctx.invoked_subcommand is not None:
        return
    if artifacts is None:
        _fail(ValueError("--artifacts DIR is required"))
    from benchmarks.runner import BenchConfig, run_benchmark, to_markdown

    cfg = BenchConfig(runs=runs, min_seconds=min_seconds, threads=threads, mlperf=mlperf, eval_limit=eval_limit, split=split)
    with _quiet(out / "bench.log", verbose) as where:
        with where.console.status(f"benchmarking {artifacts} (runs >= {runs}, >= {min_seconds} s each)"):
            report = run_benchmark(artifacts, out, data, lesions, torch_checkpoint, cfg, progress=False)
    print(to_markdown(report))
    if any(r.get("status") == "failed" for r in report["rows"]):
        raise typer.Exit(1)


@bench_app.command("compare")
def bench_compare(reports: list[Path] = typer.Argument(...), out: Path = typer.Option(Path("bench/compare"))):
    """Merge report.json files from several devices into one table and plot."""
    from benchmarks.report import compare

    print(compare(reports, out))


# ---------------------------------------------------------------- companion server
@app.command()
def serve(host: str = typer.Option("127.0.0.1"), port: int = typer.Option(8000), workers: int = typer.Option(1)):
    """Run the companion API (migrations are applied at start). Settings from RETINAEDGE_* / .env."""
    import uvicorn

    from companion_api.core.config import Settings
    from companion_api.core.db import run_migrations

    settings = Settings()
    run_migrations(settings.DATABASE_URL)
    if workers > 1 and settings.is_sqlite:
        console.print("[yellow]several workers on SQLite serialise on one file; use PostgreSQL for scale-out[/yellow]")
    uvicorn.run("companion_api.asgi:app", host=host, port=port, workers=workers, log_level="info")


def _admin_session():
    from companion_api.core.config import Settings
    from companion_api.core.db import make_engine, make_sessionmaker, run_migrations

    settings = Settings()
    run_migrations(settings.DATABASE_URL)
    return make_sessionmaker(make_engine(settings.DATABASE_URL))()


def _create(name: str, role: str) -> None:
    from companion_api.crud import create_principal

    with _admin_session() as session:
        try:
            token = create_principal(session=session, name=name, role=role)
        except ValueError as exc:
            _fail(exc)
    console.print(f"{role} {name!r} created; the token is shown once:")
    print(token)


@admin_app.command("create-device")
def create_device(name: str):
    """Create a device token (stored hashed)."""
    _create(name, "device")


@admin_app.command("create-reviewer")
def create_reviewer(name: str):
    """Create a reviewer token (reads every device's results)."""
    _create(name, "reviewer")


@admin_app.command()
def revoke(name: str):
    """Revoke a device or reviewer token."""
    from companion_api.crud import revoke_principal

    with _admin_session() as session:
        try:
            revoke_principal(session=session, name=name)
        except ValueError as exc:
            _fail(exc)
    console.print(f"revoked {name!r}")


@app.command()
def demo(quick: bool = typer.Option(False, "--quick", help="Toy sizes (tests): about half a minute."),
         data: Path | None = typer.Option(None, help="A real labelled folder instead of synthetic data."),
         lesions: Path | None = typer.Option(None, help="A lesion_boxes folder: CAM gallery with lesion boxes and "
                                              "the pointing game."),
         escalate: bool = typer.Option(False, "--escalate", help="After a failed INT8 gate also try accuracy-controlled "
                                       "mixed precision and QAT (minutes on a CPU); off: only the seconds-long retry."),
         out: Path = typer.Option(Path("runs/demo")), verbose: bool = typer.Option(False, "--verbose", "-v")):
    """End-to-end demo: data -> teacher -> distilled student -> INT8 + gate -> exports -> bench -> grade -> sync -> report."""
    from retinaedge.demo import run_demo

    (out / "demo.log").unlink(missing_ok=True)  # one run's details per log
    try:
        with _quiet(out / "demo.log", verbose) as where:
            summary = run_demo(out, quick, data, lesions, escalate, console=where.console)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        _fail(exc)
    table = Table(title=f"RetinaEdge demo ({summary['mode']}): {summary['total_s']} s")
    table.add_column("step")
    table.add_column("wall s", justify="right")
    table.add_column("CPU s", justify="right")
    for step, seconds in summary["timings_s"].items():
        table.add_row(step, f"{seconds:.1f}", f"{summary['cpu_s'][step]:.1f}")
    table.add_row("total", f"{summary['total_s']:.1f}", f"{sum(summary['cpu_s'].values()):.1f}", style="bold")
    out_console.print(table)
    load = summary.get("load_average")
    if load:
        out_console.print(f"load average {load[0]} / {load[1]} / {load[2]} (1/5/15 min) on {summary['device']['cores']} cores")
    out_console.print(_demo_headline(summary))
    out_console.print(f"report: {out / 'report.html'}   log: {out / 'demo.log'}   artifacts: {out / 'artifacts'}")
    console.print(DISCLAIMER)


def _demo_headline(summary: dict) -> str:
    def value(metric: dict) -> str:
        ci = metric.get("ci")
        return f"{metric['value']:.2f}" + (f" ({ci[0]:.2f}-{ci[1]:.2f})" if ci else "") if metric.get("value") is not None else "-"

    lines = []
    for m in summary["evaluation"]["models"]:
        lines.append(f"{m['role']} {m['precision']}: QWK {value(m['qwk'])}, referable sensitivity {value(m['sensitivity'])}, "
                     f"specificity {value(m['specificity'])} (test n={m['n']})")
    gates = ", ".join(f"{a['format']} {a['precision']} {a['gate']}" for a in summary["artifacts"] if a["precision"] == "int8")
    chosen = summary["screening_artifact"]
    lines.append(f"INT8 gate: {gates or '-'}; the device screened with {Path(chosen['path']).name}")
    return "\n".join(lines)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
