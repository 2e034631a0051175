"""`retinaedge export`: checkpoint -> self-describing artifacts, each verified, INT8 behind the fidelity gate.
Gate and QAT settings are the typed configs' own fields (``--gate FIELD=VALUE``, ``--qat FIELD=VALUE``)."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from retinaedge.cli._app import app, out_console
from retinaedge.cli._common import config_overrides, fail, quiet


@app.command()
def export(
    checkpoint: Path = typer.Option(..., help="Checkpoint from train/distill."),
    formats: str = typer.Option("onnx,tflite,coreml", help="Comma-separated: onnx, tflite, coreml."),
    precisions: str = typer.Option("fp32,fp16,int8", help="Comma-separated; each format makes those it supports."),
    calib: list[Path] | None = typer.Option(None, help="Real fundus photos for INT8 calibration (`calib` split) and "
                                            "tuning (`train` split); repeat for several folders."),
    val: list[Path] | None = typer.Option(None, help="Labelled photos for parity and the fidelity gate (`val` split); "
                                          "repeat to judge the val splits of several folders together."),
    val_limit: int | None = typer.Option(None, help="At most this many val photos per --val folder (grades "
                                         "stratified; default: every graded val photo, the gate's minimum evidence)."),
    out: Path = typer.Option(Path("artifacts"), help="Output folder (gets index.json)."),
    recipe: str = typer.Option("ort", help="INT8 recipe: ort | nncf | nncf_ac (ONNX; TFLite/CoreML use PT2E) | "
                               "qat (ONNX through NNCF, TFLite/CoreML through PT2E)."),
    target: str = typer.Option("x86_avx2", help="CPU class preset: auto (this CPU's int8 features) | x86_avx2 | x86_avx2_fast | x86_vnni | arm64 | jetson_orin."),
    calibration: str = typer.Option("minmax", help="minmax | percentile | entropy (ort recipe)."),
    keep_float: list[str] | None = typer.Option(None, "--keep-float", help="ONNX ort/nncf recipes: keep nodes whose "
                                                "name contains this, or of this op type, in float (mixed precision; "
                                                "repeatable; studies/float_islands.py measures what each costs)."),
    bias_correction: int = typer.Option(0, "--bias-correction", help="INT8, every format: passes of output-bias "
                                        "correction (the mean INT8 - FP32 logits on the calib photos come off FP32's "
                                        "classifier biases, then INT8 again; 0: off; docs/reference/fidelity_gate.md)."),
    gate: list[str] | None = typer.Option(None, "--gate", help="Fidelity-gate threshold as FIELD=VALUE (repeatable), "
                                          "any field of compression.gate.GateThresholds, e.g. --gate "
                                          "min_auc_ratio=0.995 (docs/reference/fidelity_gate.md gives each default's reason)."),
    gate_profile: str = typer.Option("default", "--gate-profile", help="Named gate thresholds the --gate values "
                                     "override: default (noise floor + non-inferiority) | strict (the previous gate)."),
    name: str | None = typer.Option(None, help="Artifact file stem (default: model name)."),
    qat_steps: int = typer.Option(0, help="Quantization-aware fine-tuning steps when post-training INT8 and its "
                                  "mixed-precision retries all fail the gate (0: off); uses --calib's train split."),
    qat: list[str] | None = typer.Option(None, "--qat", help="QAT setting as FIELD=VALUE (repeatable), any field of "
                                         "compression.qat.QATConfig, e.g. --qat lr=3e-5 --qat schedule=cosine."),
    qat_margin_weight: float = typer.Option(0.0, help="QAT: weight of the margin-aware referral term, which holds "
                                            "the referable log-odds of photos near the checkpoint's operating point "
                                            "(and a DME head's near its DME point; 0: off)."),
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
        if bias_correction:
            quant = quant.with_bias_correction(bias_correction)
        thresholds = GateThresholds.profile(gate_profile, **config_overrides(GateThresholds, gate, "--gate"))
        qat_settings = config_overrides(QATConfig, qat, "--qat")
        # --recipe qat goes straight to QAT: its default length unless --qat-steps says otherwise.
        qat_settings.setdefault("steps", qat_steps or (QATConfig().steps if recipe == "qat" else 0))
        plan = ExportPlan(tuple(formats.split(",")), tuple(precisions.split(",")), quant, QATConfig(**qat_settings),
                          escalate, qat_margin_weight=qat_margin_weight)
        with quiet(out / "export.log", verbose):
            inputs = load_inputs(checkpoint, out, calib, val, thresholds, val_limit=val_limit, name=name,
                                 tuning_limit=tuning_images if plan.needs_tuning_images else 0)
            records = export_all(inputs, plan)
    except (ValueError, FileNotFoundError) as exc:
        fail(exc)
    _print_records(records)
    _print_gate_criteria(records)
    if any(r.status != "ok" or r.gate in ("failed", "insufficient_evidence") for r in records):
        raise typer.Exit(1)


def _print_gate_criteria(records) -> None:
    """Each gated artifact's criteria (value, bound, threshold, margin) and every try the escalation made, as the
    export returned them."""
    from compression.gate import criteria_table
    from edge_runtime.contract import GateStatus

    judged = (GateStatus.PASSED, GateStatus.FAILED, GateStatus.INSUFFICIENT_EVIDENCE)
    for r in records:
        if r.status != "ok" or r.gate not in judged:
            continue
        out_console.print(criteria_table(r.gate_result, title=f"{Path(r.path).name}: fidelity gate"))
        out_console.print(f"operating point: {r.operating_point.describe()}")
        for failure in r.failures:
            out_console.print(f"  - {failure}")
        if len(r.attempts) > 1:
            out_console.print("tries: " + "; ".join(f"{a.step} ({a.recipe}): {a.gate.status}" for a in r.attempts))


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
