"""runs/demo/report.html: what the demo did and what each number means, readable at a glance.

Tables and embedded plots only (benchmarks.html_report); the raw numbers are in summary.json beside it.
"""
from __future__ import annotations

from pathlib import Path

from benchmarks.html_report import (
    RocCurve,
    cards,
    confusion_plot,
    esc,
    figure,
    fmt,
    latency_size_plot,
    page,
    png_img,
    roc_plot,
    section,
    stage_bar_plot,
    status,
    table,
    thumbnail,
    with_ci,
)
from edge_runtime.contract import GRADE_NAMES, SCREENING_DISCLAIMER

ESCALATION_COMMAND = ("retinaedge export --checkpoint runs/demo/student/best.pt --calib runs/demo/data "
                      "--val runs/demo/data --qat-steps 200 --out runs/demo/escalated")


def _m(metric: dict | None, spec: str = ".2f") -> str:
    """'0.93 (0.88-0.97), n=60' from {'value', 'ci', 'n'}."""
    if not metric or metric.get("value") is None:
        return "-"
    n = metric.get("n")
    return with_ci(metric["value"], metric.get("ci"), spec) + (f", n={n}" if n is not None else "")


def _label(row: dict) -> str:
    return f"{'teacher' if row.get('role') == 'teacher' or str(row.get('name', '')).startswith('teacher') else 'student'} " \
           f"{row['format']} {row['precision']}"


def write_report(out: Path, summary: dict, bench: dict) -> Path:
    sections = [_headline(summary, bench), _steps(summary), _models(summary), _artifacts(summary), _gate(summary),
                _speed(summary, bench),
                _gallery(out, summary), _server(summary), _files(summary)]
    source = "synthetic photos, not patients" if summary["synthetic"] else summary["data"]
    subtitle = (f"{summary['mode']} run on {summary['device']['cpu']} ({summary['device']['cores']} cores), "
                f"{summary.get('total_s', '-')} s in all; data: {source}")
    path = out / "report.html"
    path.write_text(page("RetinaEdge end-to-end demo", subtitle, SCREENING_DISCLAIMER, sections))
    return path


def _by_role(summary: dict) -> tuple[dict | None, dict | None, dict | None]:
    models = summary["evaluation"]["models"]
    teacher = next((m for m in models if m["role"] == "teacher"), None)
    fp32 = next((m for m in models if m["role"] == "student" and m["precision"] == "fp32"), None)
    int8 = next((m for m in models if m["role"] == "student" and m["precision"] == "int8"), None)
    return teacher, fp32, int8


def _int8_features(device: dict) -> str:
    """The CPU's int8 dot-product features as the benchmark recorded them, e.g. 'avx512_vnni' or 'none'."""
    features = [name for name, present in (device.get("cpu_int8") or {}).items() if present is True]
    return ", ".join(features) or ("avx512_vnni" if device.get("avx512_vnni") else "none")


def _headline(summary: dict, bench: dict) -> str:
    teacher, fp32, int8 = _by_role(summary)
    chosen = summary["screening_artifact"]
    rows = [r for r in bench["rows"] if r.get("status") == "ok" and r.get("latency_ms")]
    items = []
    if teacher:
        items.append(("teacher QWK", fmt(teacher["qwk"]["value"], ".2f"),
                      f"agreement with the reference grades, 1 = perfect, 0 = chance (n={teacher['n']})"))
    student = int8 if chosen["precision"] == "int8" else fp32
    if student:
        items.append((f"student {chosen['precision'].upper()} QWK", fmt(student["qwk"]["value"], ".2f"),
                      "the same measure for the artifact the device uses"))
        items.append(("referable sensitivity", fmt(student["sensitivity"]["value"], ".2f"),
                      f"share of grade >= 2 photos flagged (n={student['sensitivity']['n']})"))
    int8_gate = next((a["gate"] for a in summary["artifacts"] if a["format"] == "onnx" and a["precision"] == "int8"), None)
    items.append(("ONNX INT8 gate", int8_gate or "-", f"does INT8 refer like FP32? The device screened with "
                  f"{Path(chosen['path']).name}"))
    student_rows = {r["precision"]: r for r in rows if r["format"] == "onnx" and not r["name"].startswith("teacher")}
    if "fp32" in student_rows and "int8" in student_rows:
        ratio = student_rows["fp32"]["latency_ms"]["p50"] / student_rows["int8"]["latency_ms"]["p50"]
        items.append(("INT8 vs FP32 on this CPU", f"{ratio:.2f}x {'faster' if ratio >= 1 else 'the speed'}",
                      f"p50 latency, student ONNX FP32 {student_rows['fp32']['latency_ms']['p50']:.2f} ms vs INT8 "
                      f"{student_rows['int8']['latency_ms']['p50']:.2f} ms; CPU int8 features: "
                      f"{_int8_features(bench['device'])}"))
    cost = summary.get("student_cost")
    if cost:
        s, b4 = cost["student"], cost["b4"]
        items.append(("student vs an EfficientNet-B4", f"{b4['macs'] / s['macs']:.0f}x fewer MACs",
                      f"{s['model']} at {s['input_size']} px: {s['macs'] / 1e9:.2f} GMACs, {s['params'] / 1e6:.1f} M "
                      f"parameters; B4 at 380 px: {b4['macs'] / 1e9:.2f} GMACs, {b4['params'] / 1e6:.1f} M"))
    onnx_sizes = {a["precision"]: a["size_mb"] for a in summary["artifacts"] if a["format"] == "onnx" and a["status"] == "ok"}
    if "fp32" in onnx_sizes and "int8" in onnx_sizes:
        items.append(("INT8 file vs FP32", f"{onnx_sizes['fp32'] / onnx_sizes['int8']:.1f}x smaller",
                      "ONNX; the device uses INT8 only when its gate passed"))
    return section("At a glance", cards(items), explain=(
        "QWK (quadratic weighted kappa) compares predicted and reference ICDR grades 0-4, counting a grade far off "
        "as worse than one step off. Brackets everywhere on this page are 95% confidence intervals; n is the number "
        "of photos behind a figure. Few photos mean wide intervals: read them before the point estimate."))


def _gate(summary: dict) -> str:
    """Each gated artifact's criteria table, exactly as its manifest records it."""
    gates = summary.get("gates") or {}
    if not gates:
        return ""
    parts = []
    for name, gate in gates.items():
        rows = []
        for c in gate["criteria"]:
            judged = c["threshold"] is not None
            verdict = "reported" if not judged else "n/a" if c["passed"] is None else "pass" if c["passed"] else "FAIL"
            relation = ">=" if c.get("direction", "min") == "min" else "<="
            interval = "-" if c["interval"] is None else f"[{c['interval'][0]:.4f}, {c['interval'][1]:.4f}]"
            rows.append((c["name"], fmt(c["value"], ".4f"), interval, fmt(c["bound"], ".4f"),
                         f"{relation} {c['threshold']:.4f}" if judged else "-",
                         "-" if c["margin"] is None else f"{c['margin']:+.4f}", fmt(c["n"], "d"), status(verdict)))
        parts.append(f"<h3>{esc(name)}: {esc(status(gate['status']))}</h3>")
        parts.append(table(["criterion", "value", "95% interval", "bound", "threshold", "margin", "n", "verdict"],
                           rows, numeric=[1, 3, 5, 6]))
        if gate["failures"]:
            parts.append("".join(f"<p class='explain'>{esc(line)}</p>" for line in gate["failures"]))
    explain = ("The fidelity gate (docs/reference/fidelity_gate.md) judges a converted artifact on the gate set at the parent's "
               "operating point. Against the labels: sensitivity and specificity may not fall (Tango's score "
               "interval, lower bound >= -0.05, point >= -0.02) and the AUC must keep 99%. Against FP32's own noise "
               "floor: 16 seeded re-capture draws of each photo (sensor noise of one 8-bit level, exposure +-3%, "
               "white balance +-2%, a 2-px shift, 1 degree, JPEG 90-95); D0 is how often FP32 disagrees with itself "
               "across two draws, E the candidate's excess over it (upper bound <= 0.02), with no referable photo that "
               "FP32 always refers un-referred (hard flips) and no systematic score shift. Below 600 photos (150 "
               "referable) the verdict is insufficient_evidence.")
    return section("The INT8 fidelity gate, criterion by criterion", *parts, explain=explain)


def _steps(summary: dict) -> str:
    timings, cpu = summary.get("timings_s", {}), summary.get("cpu_s", {})
    rows = [(name, fmt(timings.get(name), ".1f") if name in timings else "skipped", fmt(cpu.get(name), ".1f"), note)
            for name, note in summary["step_notes"].items()]
    rows.append(("total", fmt(summary.get("total_s"), ".1f"), fmt(sum(cpu.values()), ".1f") if cpu else "-",
                 "wall clock of the pipeline (Python start-up and imports not included)"))
    load = summary.get("load_average")
    explain = ("Wall seconds are what you waited; CPU seconds are this process's own work summed over its threads "
               "(more than the wall time when both cores were busy, less when other programs took turns). ")
    if load:
        explain += f"Load average at the end: {load[0]} / {load[1]} / {load[2]} (1/5/15 min) on {summary['device']['cores']} cores."
    return section("What ran", table(["step", "wall s", "CPU s", "what it does"], rows, numeric=[1, 2]), explain=explain)


def _models(summary: dict) -> str:
    models = summary["evaluation"]["models"]
    plan = summary["plan"]
    rows = []
    for m in models:
        size = plan["teacher_size"] if m["role"] == "teacher" else plan["student_size"]
        model = plan["teacher"] if m["role"] == "teacher" else plan["student"]
        agree = m.get("agreement_with_teacher")
        rows.append((f"{m['role']} ({model}, {size} px)", m["precision"], m["name"], _m(m["qwk"]), _m(m["accuracy"]),
                     _m(m["sensitivity"]), _m(m["specificity"]), _m(m["auc"]), _m(agree) if agree else "-",
                     f"{m['threshold']:.2f} ({m['rule']})"))
    explain = ("Each model runs as its exported ONNX file on the test split, photos none of them trained on. "
               "Sensitivity: share of referable photos (grade >= 2) the model flags. Specificity: share of "
               "non-referable photos it leaves unflagged. AUC: chance a random referable photo scores higher than a "
               "random non-referable one (1 = perfect ranking, 0.5 = coin toss). Agreement: share of photos where the "
               "student gives the teacher's grade. The threshold is the operating point on P(grade >= 2) stored in "
               "each artifact's manifest.")
    curves = [RocCurve(f"{m['role']} {m['precision']}", [y >= 2 for y in m["labels"]], m["referable_probability"],
                       m["threshold"], m["auc"]["value"], tuple(m["auc"]["ci"]) if m["auc"]["ci"] else None)
              for m in models]
    plots = [figure(png_img(roc_plot(curves), "ROC curve with operating points"),
                    "ROC: every threshold's trade-off; the circles mark the threshold each artifact uses.")]
    for m in models:
        if m["role"] == "teacher" or m["precision"] == summary["screening_artifact"]["precision"]:
            plots.append(figure(png_img(confusion_plot(m["confusion_matrix"], f"{m['role']} {m['precision']} (n={m['n']})"),
                                        f"confusion matrix, {m['role']} {m['precision']}"),
                                f"{m['role']} {m['precision']}: rows are reference grades, columns predicted; "
                                "the diagonal is right, colour is the share of each row."))
    distill = summary["distillation"]
    distill_line = (f"Distillation (PyTorch, {distill['split']} split, n={distill['n']}): the student gives the teacher's "
                    f"grade on {distill['agreement']:.0%} of photos; its CAMs correlate with the teacher's at "
                    f"{distill['cam_correlation']:.2f} (Pearson, 1 = the same heat map).")
    headers = ["model", "precision", "artifact", "QWK", "accuracy", "ref. sensitivity", "ref. specificity", "AUC",
               "agrees with teacher", "threshold (rule)"]
    return section("Teacher and student on held-out photos", table(headers, rows),
                   f"<p class='explain'>{distill_line}</p>", "<div class='grid'>" + "".join(plots) + "</div>",
                   explain=explain)


def _artifacts(summary: dict) -> str:
    rows = []
    for a in summary["artifacts"] + ([summary["teacher_artifact"]] if summary.get("teacher_artifact") else []):
        p = a.get("parity") or {}
        teacher = "teacher" in Path(a.get("path") or "").name
        note = a.get("error") or a.get("verified") or ""
        rows.append(("teacher" if teacher else "student", a["format"], a["precision"], fmt(a.get("size_mb"), ".2f"),
                     status(a["status"]), status(a.get("gate")), fmt(p.get("agreement"), ".3f"),
                     fmt(p.get("max_abs_logit_diff"), ".1e"), fmt(p.get("cam_correlation"), ".3f"),
                     fmt(a.get("export_seconds"), ".1f"), note[:140]))
    explain = ("Every file is run (or, where this OS cannot run it, its spec is checked) against the PyTorch model it "
               "came from on the validation split. FP32/FP16 must match within a numeric tolerance. INT8 must pass the "
               "fidelity gate: same grade as FP32 on nearly every photo, QWK and referable sensitivity kept; the "
               "verdict is shown exactly as the gate wrote it. 'not_run' means the format cannot run on this OS "
               "(CoreML needs macOS). The demo allows only the seconds-long fallback after a failed INT8 gate "
               f"(sensitive layers kept in float); the minutes-long escalation is its own command: {ESCALATION_COMMAND}")
    if summary.get("escalate"):
        explain += " (this run used --escalate)."
    headers = ["model", "format", "precision", "MB", "export", "gate", "agreement with FP32", "max |Δ logit|",
               "CAM corr.", "export s", "how it was checked"]
    return section("Artifacts and the INT8 fidelity gate", table(headers, rows, numeric=[3, 6, 7, 8, 9]), explain=explain)


def _speed(summary: dict, bench: dict) -> str:
    d = bench["device"]
    rows, points = [], []
    for r in bench["rows"]:
        label = f"{'teacher' if r['format'] == 'torch' or r.get('name', '').startswith('teacher') else 'student'} " \
                f"{r['format']} {r['precision']}"
        points.append({**r, "label": label})
        lat = r.get("latency_ms") or {}
        rows.append((label, r.get("name"), fmt(r.get("size_mb"), ".2f"), fmt(lat.get("p50"), ".2f"),
                     fmt(lat.get("p90"), ".2f"), fmt(r.get("fps_batch1"), ".0f"), fmt(r.get("rss_added_mb"), ".0f"),
                     fmt(r.get("qwk"), ".3f"), fmt(r.get("agreement_fp32"), ".3f"),
                     status(r.get("status")) if r.get("status") != "skipped" else f"skipped: {r.get('error', '')}"))
    flags = "AVX-512 VNNI" if d.get("avx512_vnni") else ("AVX2, no VNNI" if d.get("avx2") else "no AVX2")
    n_eval = summary["plan"]["bench_eval_images"]
    explain = (f"Measured on {d['cpu']} ({d['cores']} cores, {flags}; INT8 speed depends on these) at batch 1 after "
               f"warm-up, at least {summary['plan']['bench_runs']} runs each; the machine may have been shared, so "
               f"compare rows with each other, not with other machines. QWK here is on up to {n_eval} test photos; "
               "agreement is with the FP32 outputs of the same model. +RSS is the memory the loaded model added.")
    headers = ["model", "file", "MB", "p50 ms", "p90 ms", "photos/s", "+RSS MB", "QWK", "agrees with FP32", "status"]
    plots = [figure(png_img(latency_size_plot([p for p in points if p.get("size_mb")]), "latency vs size"),
                    "Latency against size for every artifact: colour is the format, marker the precision.")]
    if summary.get("stage_ms"):
        chosen = Path(summary["screening_artifact"]["path"]).name
        n = summary["screened"]["graded"]
        plots.append(figure(png_img(stage_bar_plot(summary["stage_ms"], f"on-device screening, {chosen} (median of {n})"),
                                    "per-stage latency"),
                            "Where one screening's time goes: decode the file, check quality, crop and resize, run "
                            "the model, make the CAM overlay, store the result durably in the outbox."))
    return section("Speed and size on this machine", "<div class='grid'>" + "".join(plots) + "</div>",
                   table(headers, rows, numeric=[2, 3, 4, 5, 6, 7, 8]), explain=explain)


def _gallery(out: Path, summary: dict) -> str:
    items = []
    for g in summary["graded"]:
        if not g.get("overlay"):
            continue
        png = thumbnail((out / g["overlay"]).read_bytes())
        reference = "no grade (lesion photo)" if g["reference_grade"] is None else \
            f"reference {g['reference_grade']} {GRADE_NAMES[g['reference_grade']]}"
        verdict = "REFERABLE" if g["referable"] else "not referable"
        boxes = f"; green boxes: {g['lesion_boxes']} annotated lesions, cross: CAM peak" if g.get("lesion_boxes") else ""
        caption = (f"{g['image']} ({g['source']}): {reference}; predicted {g['grade']} {GRADE_NAMES[g['grade']]}, "
                   f"P(referable) {fmt(g['referable_probability'], '.2f')} -> {verdict}; quality {g['quality_score']:.2f}{boxes}")
        items.append(figure(png_img(png, f"CAM overlay {g['image']}", css_class="cam"), caption, "cam"))
    ungradable = [g for g in summary["graded"] if g["outcome"] != "graded"]
    extra = "".join(f"<p>{g['image']}: ungradable ({'; '.join(g['quality_reasons'])})</p>" for g in ungradable)
    pointing = summary.get("pointing_game")
    pointing_html = ""
    if pointing:
        pointing_html = (f"<p>Pointing game on the lesion photos: the CAM's hottest point (most likely DR grade 1-4) "
                         f"falls inside an annotated lesion box on {_m(pointing)} photos ({pointing['k']} hits).</p>")
    return section("Where the model looked (CAM gallery)", "<div class='grid'>" + "".join(items) + "</div>", extra,
                   pointing_html, explain=(
                       "Class activation maps of the predicted grade, red = strongest evidence, from the artifact the "
                       "device uses. A CAM shows where the evidence came from, not that the grade is right."))


def _server(summary: dict) -> str:
    server = summary["server"]
    rows = [(i["image"], i["grade"], i.get("source"), i.get("summary", "")) for i in server["insights"]]
    counts = server["outbox"]
    explain = (f"The device stored {summary['screened']['graded'] + summary['screened']['ungradable']} results in its "
               f"outbox before showing them, then synced: {server['synced']} sent, {server['stored_on_server']} stored "
               f"on the server; outbox now {', '.join(f'{v} {k}' for k, v in counts.items())}. Insights come from the server: 'guideline' is the rule-based "
               "ICDR follow-up text; 'gemini' appears only when an API key is configured.")
    return section("Companion server", table(["image", "grade", "source", "insight"], rows), explain=explain)


def _files(summary: dict) -> str:
    rows = [("summary.json", "every number on this page"), ("demo.log", "third-party output and warnings of this run"),
            ("artifacts/index.json", "exported files with their manifests and gate verdicts"),
            ("bench/report.html", "the full benchmark table"), ("teacher/, student/", "checkpoints and training metrics"),
            ("overlays/", "full-size CAM overlays"), ("server.db", "the companion server's SQLite database")]
    return section("Files", table(["path (under the run folder)", "what"], rows))
