"""INT8 that ships: one INT8 recipe per format through the noise-floor fidelity gate, with the gate's controls.

Exports one checkpoint's FP32 ONNX and one INT8 artifact per format recipe (ONNX U8S8 for VNNI / ARM dot-product
CPUs, ONNX U8U8 for AVX2-only CPUs, TFLite PT2E INT8, CoreML W8A8 judged on the quantized torch graph it converts),
each at the parent's operating point and through the default gate (``compression.gate.GateThresholds()``) on every
graded val photo of the folders given, with the escalation each format has when the first recipe fails. Then the
controls the gate must pass and fail:

- an FP32 re-export (the FP32 ONNX, judged as a candidate) must pass;
- ONNX U8S8 INT8 calibrated on 8 black frames must fail;
- the FP32 model with its weights perturbed until val sensitivity drops by >= 5 points must fail;
- FP32 itself at its threshold + 0.1 must fail.

Then, on the test split of each folder: sensitivity and specificity (95% Wilson) and AUC (95% stratified
bootstrap) of FP32 and every INT8 artifact that passed, at the parent's point; size; p50 latency at batch 1, all
timed in one interleaved run, with the CPU's int8 features.

    python -m studies.int8_gate runs/lite0_gate/best.pt --data ../shared/data/eyepacs_full \\
        --data ../shared/data/eyepacs_256 --data ../shared/data/messidor2 --out reports/int8_gate

Output-bias correction (``QuantRecipe.bias_correction``): ``<recipe>_bc`` is the same recipe with one pass of the
correction, measured on the calib photos (never the gate set); asking for any adds the black-frames control with the
correction. The default student (docs/studies/2026-12-07_int8_gate_default_student.md), every recipe uncorrected
and corrected, on the same gate set and draws:

    python -m studies.int8_gate runs/lite0_distill/best.pt --data ../shared/data/eyepacs_full \\
        --data ../shared/data/eyepacs_256 --data ../shared/data/messidor2 --recipe onnx_u8s8 --recipe onnx_u8s8_bc \\
        --recipe onnx_u8u8 --recipe onnx_u8u8_bc --recipe tflite_int8 --recipe tflite_int8_bc \\
        --recipe coreml_w8a8 --recipe coreml_w8a8_bc --out reports/int8_gate_bias_correction
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import io
import json
import os
import time
from pathlib import Path

import numpy as np

from benchmarks.device import fingerprint
from benchmarks.int8_speed import time_interleaved
from compression.gate import Draws, GateThresholds, criteria_table, folder_table, judge
from compression.quantize import QuantRecipe
from edge_runtime.backends import cpu_features, open_session
from edge_runtime.backends.base import HeadOutputs
from edge_runtime.decision import decide_batch
from edge_runtime.metrics import binary_sensitivity_specificity, is_referable, roc_auc

RECIPES = {  # name: (format, INT8 recipe it starts from)
    "onnx_u8s8": ("onnx", QuantRecipe.for_target("x86_vnni")),
    "onnx_u8u8": ("onnx", QuantRecipe.for_target("x86_avx2")),
    "tflite_int8": ("tflite", QuantRecipe()),
    "coreml_w8a8": ("coreml", QuantRecipe()),
}
DEFAULT_RECIPES = tuple(RECIPES)
# <name>_bc: the same recipe with one pass of output-bias correction on the calib photos (QuantRecipe.bias_correction).
RECIPES |= {f"{name}_bc": (fmt, recipe.with_bias_correction()) for name, (fmt, recipe) in RECIPES.items()}


def table_text(table) -> str:
    from rich.console import Console

    console = Console(file=io.StringIO(), width=170, record=True, color_system=None)
    console.print(table)
    return console.export_text()


def perturbed_model(model, photos, labels, point, seed: int = 0, target_drop: float = 0.05):
    """A copy of ``model`` whose weights carry multiplicative Gaussian noise, the smallest of a doubling series of
    noise levels whose val sensitivity at ``point`` is >= ``target_drop`` below FP32's."""
    import torch

    def sensitivity(m) -> float:
        with torch.no_grad():
            logits = np.concatenate([m.forward_outputs(torch.from_numpy(photos[i:i + 32]).float())[0].numpy()
                                     for i in range(0, len(photos), 32)])
        referable = is_referable(labels)
        return float(decide_batch(logits, point).referable[referable].mean())

    base = sensitivity(model)
    sigma = 0.01
    while sigma < 2.0:
        noisy = copy.deepcopy(model).eval()
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in noisy.parameters():
                p.mul_(1 + sigma * torch.randn(p.shape, generator=generator))
        drop = base - sensitivity(noisy)
        if drop >= target_drop:
            return noisy, sigma, base, base - drop
        sigma *= 1.5
    raise RuntimeError("no weight noise up to sigma 2 dropped val sensitivity by 5 points")


def torch_runner(model):
    import torch

    @torch.no_grad()
    def run(x: np.ndarray) -> HeadOutputs:
        parts = [model.forward_outputs(torch.from_numpy(x[i:i + 16]).float()) for i in range(0, len(x), 16)]
        return HeadOutputs(*(np.concatenate([p[k].numpy() for p in parts]) for k in range(len(parts[0]))))

    return run


def gate_row(name: str, gate, extra: dict | None = None) -> dict:
    criteria = {c.name: c for c in gate.criteria}

    def pick(key):
        c = criteria.get(key)
        return None if c is None else {"value": c.value, "bound": c.bound, "interval": c.interval,
                                       "threshold": c.threshold, "margin": c.margin, "passed": c.passed,
                                       "direction": c.direction, "n": c.n}

    return {"name": name, "verdict": gate.status, "failures": list(gate.failures),
            "criteria": {k: pick(k) for k in criteria}, "metrics": gate.metrics, **(extra or {})}


def test_split_metrics(run, point, batches: dict) -> dict:
    """Per folder (``batches``: name -> its test split): sensitivity and specificity (95% Wilson) and AUC (95%
    stratified bootstrap) at ``point``."""
    from training.metrics import auc_interval

    out = {}
    for name, batch in batches.items():
        decisions = decide_batch(run(batch.x).logits, point)
        referable = is_referable(batch.grades)
        ss = binary_sensitivity_specificity(referable, decisions.referable)
        out[name] = {"n": len(batch.x), "n_positive": ss["n_positive"], "n_negative": ss["n_negative"],
                            "sensitivity": ss["sensitivity"], "sensitivity_ci": list(ss["sensitivity_ci"]),
                            "specificity": ss["specificity"], "specificity_ci": list(ss["specificity_ci"]),
                            "auc": roc_auc(referable, decisions.referable_probability),
                            "auc_ci": list(auc_interval(batch.grades, decisions.referable_probability))}
    return out


def run(checkpoint: Path, data: list[Path], out: Path, threads: int, runs: int, calib_limit: int,
        qat_steps: int, recipes: list[str], save=lambda report: None) -> dict:
    """The whole study; ``save(report)`` is called after every stage (a long run leaves its partial results)."""
    from compression.qat import QATConfig
    from edge_runtime.preprocess import normalize
    from exporters.base import Reference
    from exporters.pipeline import ExportPipeline, ExportPlan, load_inputs

    started = time.monotonic()
    thresholds = GateThresholds()
    inputs = load_inputs(checkpoint, out / "artifacts", data, data, thresholds, calib_limit=calib_limit,
                         tuning_limit=256 if qat_steps else 0)
    reference = Reference.compute(inputs)
    qat = QATConfig(steps=qat_steps) if qat_steps else None
    base_plan = ExportPlan(("onnx",), ("fp32",), QuantRecipe.for_target("x86_vnni"), qat, escalate=True)
    fp32_pipeline = ExportPipeline(inputs, base_plan, reference)
    fp32 = fp32_pipeline.export("onnx", "fp32")
    if fp32.status != "ok":
        raise RuntimeError(f"FP32 ONNX export failed: {fp32.error}")
    fp32_session = open_session(Path(fp32.path), allow_ungated=True, threads=threads)
    point = inputs.meta.operating_point
    gate_set = fp32_pipeline.gate_set()
    photos = inputs.photos

    def judge_run(run_heads, test_point=point, draws=None):
        outputs = run_heads(photos.val)
        draws = draws or fp32_pipeline.draws_for(run_heads)
        gate = judge(reference.logits, reference.cam, outputs.logits, outputs.cam, photos.val_labels, test_point,
                     thresholds, ref_operating_point=point, draws=draws, gate_set=gate_set)
        return gate, draws

    report: dict = {"checkpoint": str(checkpoint), "data": [str(d) for d in data], "device": fingerprint(),
                    "cpu_features": cpu_features().to_dict(), "threads": threads, "point": dataclasses.asdict(point),
                    "nuisance": base_plan.nuisance.as_dict(), "thresholds": dataclasses.asdict(thresholds),
                    "n": len(photos.val), "n_referable": int(is_referable(photos.val_labels).sum()), "formats": [],
                    "controls": [], "tables": {}}
    # FP32's draws run through its ONNX export (parity-checked against PyTorch above): the same numbers at a
    # fraction of eager PyTorch's time, computed once and shared by every pipeline below.
    fp32_pipeline.reference_draws = fp32_pipeline._draw_outputs(fp32_session.run_heads)
    fp32_onnx_draws = Draws(*fp32_pipeline.reference_draws[:1], fp32_pipeline.reference_draws[0],
                            nuisance=base_plan.nuisance)
    save(report)
    # The FP32 re-export control: the same FP32 model through another converter (TFLite FP32) as the candidate.
    tflite_fp32 = ExportPipeline(dataclasses.replace(inputs, name="control_reexport"),
                                 dataclasses.replace(base_plan, formats=("tflite",)), reference).export("tflite", "fp32")
    tflite_session = open_session(Path(tflite_fp32.path), allow_ungated=True, threads=threads)
    control, _ = judge_run(tflite_session.run_heads)
    report["controls"].append(gate_row("FP32 re-export (TFLite FP32 as the candidate)", control, {"expected": "passed"}))
    report["tables"]["control: FP32 re-export"] = table_text(criteria_table(control, "control: FP32 re-export"))
    report["tables"]["per folder: FP32 re-export"] = table_text(folder_table(control, "per folder: FP32 re-export"))
    # The threshold control is cheap (the FP32 draws again): first, so a cut-short run still has it.
    shifted = dataclasses.replace(point, threshold=point.threshold + 0.1,
                                  uncertain_band=None if point.uncertain_band is None else
                                  tuple(v + 0.1 for v in point.uncertain_band))
    gate, _ = judge_run(fp32_session.run_heads, shifted, fp32_onnx_draws)
    report["controls"].append(gate_row(f"FP32 at threshold {point.threshold:.3f} + 0.1", gate, {"expected": "failed"}))
    report["tables"]["control: threshold + 0.1"] = table_text(criteria_table(gate, "control: threshold + 0.1"))
    save(report)

    passed: dict[str, tuple] = {}

    def export_recipe(name: str) -> None:
        fmt, recipe = RECIPES[name]
        plan = dataclasses.replace(base_plan, formats=(fmt,), precisions=("int8",), recipe=recipe)
        pipeline = ExportPipeline(dataclasses.replace(inputs, name=f"gate_{name}"), plan, reference,
                                  reference_draws=fp32_pipeline.reference_draws,
                                  draw_images=fp32_pipeline.draw_images)
        t0 = time.monotonic()
        record = pipeline.export(fmt, "int8")
        row = {"name": name, "format": fmt, "status": record.status, "error": record.error, "path": record.path,
               "size_mb": record.size_mb, "how": record.verified, "seconds": round(time.monotonic() - t0, 1)}
        if record.status == "ok":
            from edge_runtime.backends import load_manifest

            manifest = load_manifest(record.path)
            gate = manifest.gate
            row.update(gate_row(name, gate), quantization=dataclasses.asdict(manifest.quantization))
            report["tables"][f"{name}"] = table_text(criteria_table(gate, f"{name} ({record.verified})"))
            report["tables"][f"per folder: {name}"] = table_text(folder_table(gate, f"per folder: {name}"))
            if gate.status == "passed":
                if fmt == "coreml":  # the ONNX twin its exporter made and the gate ran
                    passed[name] = (pipeline.runners[(fmt, "int8")], record)
                else:
                    passed[name] = (open_session(Path(record.path), allow_ungated=True, threads=threads).run_heads,
                                    record)
        report["formats"].append(row)
        save(report)

    # The formats this CPU runs first; the controls; CoreML (judged on its torch graph, one photo at a time) last.
    for name in [r for r in recipes if RECIPES[r][0] != "coreml"]:
        export_recipe(name)

    # Controls that must fail.
    black = normalize(np.zeros((8, inputs.policy.input_size, inputs.policy.input_size, 3), np.uint8), inputs.policy)
    black_inputs = dataclasses.replace(inputs, name="control_black_frames",
                                       photos=dataclasses.replace(photos, calib=black, calib_labels=None))
    black_plan = dataclasses.replace(base_plan, precisions=("int8",), escalate=False)
    black_record = ExportPipeline(black_inputs, black_plan, reference, reference_draws=fp32_pipeline.reference_draws,
                                  draw_images=fp32_pipeline.draw_images).export("onnx", "int8")
    if black_record.status == "ok":
        from edge_runtime.backends import load_manifest

        gate = load_manifest(black_record.path).gate
        report["controls"].append(gate_row("ONNX U8S8 INT8 calibrated on 8 black frames", gate, {"expected": "failed"}))
        report["tables"]["control: black frames"] = table_text(criteria_table(gate, "control: 8 black frames"))
        save(report)
    if any(name.endswith("_bc") for name in recipes):  # the correction must not rescue a collapsed INT8
        black_bc = ExportPipeline(dataclasses.replace(black_inputs, name="control_black_frames_bc"),
                                  dataclasses.replace(black_plan, recipe=base_plan.recipe.with_bias_correction()),
                                  reference, reference_draws=fp32_pipeline.reference_draws,
                                  draw_images=fp32_pipeline.draw_images).export("onnx", "int8")
        if black_bc.status == "ok":
            from edge_runtime.backends import load_manifest

            gate = load_manifest(black_bc.path).gate
            report["controls"].append(gate_row("ONNX U8S8 INT8 + output-bias correction, calibrated and corrected on "
                                               "8 black frames", gate, {"expected": "failed"}))
            report["tables"]["control: black frames + bias correction"] = table_text(
                criteria_table(gate, "control: 8 black frames + bias correction"))
            save(report)
    noisy, sigma, sens, noisy_sens = perturbed_model(inputs.model, photos.val, photos.val_labels, point)
    noisy_record = ExportPipeline(dataclasses.replace(inputs, model=noisy, name="control_perturbed"), base_plan,
                                  Reference.compute(dataclasses.replace(inputs, model=noisy))).export("onnx", "fp32")
    gate, _ = judge_run(open_session(Path(noisy_record.path), allow_ungated=True, threads=threads).run_heads)
    report["controls"].append(gate_row(f"FP32 weights x (1 + {sigma:.3f} N(0,1)): val sensitivity {sens:.3f} -> "
                                       f"{noisy_sens:.3f}", gate, {"expected": "failed"}))
    report["tables"]["control: perturbed weights"] = table_text(criteria_table(gate, "control: perturbed weights"))
    save(report)

    for name in [r for r in recipes if RECIPES[r][0] == "coreml"]:
        export_recipe(name)

    # Test splits, per folder, at the parent's point: FP32 and every INT8 that passed.
    from compression.calibration import load_photos

    tests = {folder.name: load_photos(folder, inputs.policy, "test") for folder in data}
    report["test"] = {"fp32": test_split_metrics(fp32_session.run_heads, point, tests)}
    for name, (run_heads, _) in passed.items():
        report["test"][name] = test_split_metrics(run_heads, point, tests)
    save(report)

    # Latency: every artifact this CPU runs, interleaved in one run.
    timed = [("onnx fp32", Path(fp32.path))] + [(r["name"], Path(r["path"])) for r in report["formats"]
                                                 if r["status"] == "ok" and r["format"] != "coreml"]
    sessions = [open_session(p, allow_ungated=True, threads=threads) for _, p in timed]
    samples = time_interleaved(sessions, rounds=max(1, runs // 10))
    report["latency"] = [{"name": label, "size_mb": round(p.stat().st_size / 1e6 if p.is_file() else 0, 3),
                          "p50_ms": float(np.percentile(s, 50)), "p90_ms": float(np.percentile(s, 90)),
                          "samples": len(s)} for (label, p), s in zip(timed, samples, strict=True)]
    report["fp32_size_mb"] = fp32.size_mb
    report["load_average"] = os.getloadavg()
    report["seconds"] = round(time.monotonic() - started, 1)
    return report


def to_markdown(report: dict) -> str:
    features = ", ".join(report["cpu_features"].get("int8", [])) or "none"
    lines = [f"# INT8 through the noise-floor gate: {report['checkpoint']}", "",
             f"CPU: {report['device']['cpu']} ({report['device']['cores']} cores), int8 features **{features}**, "
             f"{report['threads']} threads. Gate set: n = {report['n']} val photos ({report['n_referable']} referable) "
             f"of {', '.join(Path(d).name for d in report['data'])}, {report['nuisance']['draws']} nuisance draws each, "
             f"at the parent's operating point (threshold {report['point']['threshold']:.4f}, temperature "
             f"{report['point']['temperature']:.3f}). Load average at the end: "
             f"{', '.join(f'{v:.1f}' for v in report.get('load_average', os.getloadavg()))}; "
             f"{report.get('seconds', float('nan')):.0f} s in all.", "",
             "## Per format", "",
             "| recipe | verdict | D0 (95% CI) | E (upper bound) | D1/D0 | hard flips | sens. diff (bound) | "
             "spec. diff (bound) | AUC ratio | score shift (bound) | size MB | how |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def cell(row, key, spec=".4f", bound=True):
        c = (row.get("criteria") or {}).get(key)
        if not c or c["value"] is None:
            return "-"
        text = format(c["value"], spec)
        if bound and c["bound"] is not None:
            text += f" ({c['bound']:{spec}})"
        return text

    for r in report["formats"]:
        if r["status"] != "ok":
            lines.append(f"| {r['name']} | export failed: {r['error']} | | | | | | | | | | |")
            continue
        d0 = r["criteria"]["noise_floor"]
        lines.append(f"| {r['name']} | **{r['verdict']}** | {d0['value']:.4f} ({d0['interval'][0]:.4f}-"
                     f"{d0['interval'][1]:.4f}) | {cell(r, 'excess_disagreement')} | "
                     f"{cell(r, 'disagreement_ratio', '.3f', False)} | {cell(r, 'hard_flips', '.0f', False)} | "
                     f"{cell(r, 'sensitivity_difference')} | {cell(r, 'specificity_difference')} | "
                     f"{cell(r, 'auc_ratio', '.4f', False)} | {cell(r, 'score_shift', '.3f')} | {r['size_mb']:.2f} | "
                     f"{r['how']} |")
    corrected = [r for r in report["formats"] if (r.get("quantization") or {}).get("bias_correction")]
    if corrected:
        lines += ["", "## Output-bias correction (mean INT8 - FP32 logit per output, on the calib photos)", "",
                  "| recipe | photos | passes | measured before | subtracted | residual after |", "|---|---|---|---|---|---|"]
        for r in corrected:
            bc = r["quantization"]["bias_correction"]

            def values(d):
                return "; ".join(f"{k} [{', '.join(f'{v:+.3f}' for v in vs)}]" for k, vs in d.items())

            lines.append(f"| {r['name']} | {bc['n']} {bc['split']} ({bc['fingerprint']}) | {bc['passes']} | "
                         f"{values(bc['measured'][0])} | {values(bc['subtracted'])} | {values(bc['residual'])} |")
    lines += ["", "## Controls", "", "| control | expected | verdict | failing criteria |", "|---|---|---|---|"]
    for c in report["controls"]:
        failing = ", ".join(k for k, v in c["criteria"].items() if v and v["passed"] is False) or "-"
        ok = "" if c["verdict"] == c["expected"] else " (too few photos to judge)" \
            if c["verdict"] == "insufficient_evidence" else " **(the gate is wrong here)**"
        lines.append(f"| {c['name']} | {c['expected']} | {c['verdict']}{ok} | {failing} |")
    lines += ["", "## Test splits at the parent's operating point", "",
              "| model | folder | n (referable) | sensitivity (95% CI) | specificity (95% CI) | AUC (95% CI) |",
              "|---|---|---|---|---|---|"]
    for model, folders in report.get("test", {}).items():
        for folder, m in folders.items():
            lines.append(f"| {model} | {folder} | {m['n']} ({m['n_positive']}) | {m['sensitivity']:.3f} "
                         f"({m['sensitivity_ci'][0]:.3f}-{m['sensitivity_ci'][1]:.3f}) | {m['specificity']:.3f} "
                         f"({m['specificity_ci'][0]:.3f}-{m['specificity_ci'][1]:.3f}) | {m['auc']:.3f} "
                         f"({m['auc_ci'][0]:.3f}-{m['auc_ci'][1]:.3f}) |")
    lines += ["", f"## Latency (batch 1, {report['threads']} threads, interleaved; int8 features: {features})", "",
              "| artifact | size MB | p50 ms | p90 ms | samples |", "|---|---|---|---|---|"]
    lines += [f"| {row['name']} | {row['size_mb']:.2f} | {row['p50_ms']:.2f} | {row['p90_ms']:.2f} | {row['samples']} |"
              for row in report.get("latency", [])]
    lines += ["", "## Criteria tables, as the gate printed them", ""]
    for title, text in report["tables"].items():
        lines += [f"### {title}", "", "```", text.rstrip(), "```", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data", type=Path, action="append", required=True,
                        help="folder whose calib split calibrates and whose val split is the gate set (repeatable)")
    parser.add_argument("--recipe", action="append", choices=sorted(RECIPES),
                        help=f"default: {', '.join(DEFAULT_RECIPES)}; <name>_bc adds output-bias correction")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=200, help="latency samples per artifact")
    parser.add_argument("--calib-limit", type=int, default=64, help="calibration photos per folder")
    parser.add_argument("--qat-steps", type=int, default=0, help="> 0: a failed gate may escalate to QAT")
    parser.add_argument("--out", type=Path, default=Path("reports/int8_gate"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    def save(report: dict, name: str = "int8_gate.partial") -> str:
        text = to_markdown(report)
        (args.out / f"{name}.md").write_text(text)
        (args.out / f"{name}.json").write_text(json.dumps(report, indent=1, default=str))
        return text

    report = run(args.checkpoint, args.data, args.out, args.threads, args.runs, args.calib_limit, args.qat_steps,
                 args.recipe or list(DEFAULT_RECIPES), save)
    print(save(report, "int8_gate"))


if __name__ == "__main__":
    main()
