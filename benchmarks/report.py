"""Plots, HTML and cross-device comparison for benchmark reports."""
from __future__ import annotations

import csv
import html
import json
from pathlib import Path


def format_ci(value, ci, ci_digits: int = 3) -> str:
    """"0.912 [0.858, 0.957]"; "-" for a missing or NaN value (e.g. a DME AUC on a folder without DME labels); the
    bare value when the interval is missing or NaN."""
    if value is None or value != value:
        return "-"
    if not ci or ci[0] != ci[0]:
        return f"{value:.3f}"
    return f"{value:.3f} [{ci[0]:.{ci_digits}f}, {ci[1]:.{ci_digits}f}]"


def number_or_dash(value: float | None, spec: str) -> str:
    """A figure the photos could not estimate (e.g. a criterion without a referable photo) shows as "-"."""
    return "-" if value is None else format(value, spec)


def with_ci(values: dict, key: str, ci_digits: int = 3) -> str:
    """``format_ci`` of ``values[key]`` and its interval ``values[key + "_ci"]``, the metrics dicts' convention."""
    return format_ci(values.get(key), values.get(f"{key}_ci"), ci_digits)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(report: dict, out: Path, suffix: str = "") -> list[Path]:
    plt = _plt()
    rows = [r for r in report["rows"] if r.get("status") == "ok" and r.get("latency_ms")]
    paths = []
    if not rows:
        return paths
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        qwk = r.get("qwk")
        ax.scatter(r["latency_ms"]["p50"], qwk if qwk is not None else 0, s=30 + 10 * r["size_mb"])
        ax.annotate(f"{r['model']} {r['format']} {r['precision']}", (r["latency_ms"]["p50"], qwk or 0), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("p50 latency, batch 1 (ms, log)")
    ax.set_ylabel("QWK (labelled split)")
    ax.set_title(f"Latency vs QWK - {report['device']['cpu'][:50]}")
    fig.tight_layout()
    paths.append(out / f"latency_vs_qwk{suffix}.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(rows)))
    labels = [f"{r['model']} {r['format']} {r['precision']}" for r in rows]
    ax.barh(labels, [r["latency_ms"]["p50"] for r in rows], xerr=[r["latency_ms"]["std"] for r in rows], color="#4a90d9")
    ax.scatter([r["latency_ms"]["p99"] for r in rows], labels, marker="|", color="k", label="p99")
    ax.set_xlabel("latency ms (bar p50 ± std, tick p99)")
    ax.legend()
    fig.tight_layout()
    paths.append(out / f"latency_distribution{suffix}.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def write_html(report: dict, out: Path) -> Path:
    """report.html: the device, the plots (embedded) and one HTML table of every row."""
    from .html_report import fmt, latency_size_plot, png_img, section, status, table

    d = report["device"]
    device_rows = [("CPU", d.get("cpu")), ("cores", d.get("cores")), ("RAM GB", d.get("ram_gb")), ("OS", d.get("os")),
                   ("INT8 dot-product (VNNI)", d.get("avx512_vnni")), ("runtimes", ", ".join(
                       f"{k} {v}" for k, v in (d.get("runtimes") or {}).items())),
                   ("measured GEMM peak GMAC/s", ", ".join(f"{k} {v:.0f}" for k, v in (report.get("peak_gmacs") or {}).items()))]
    images = [png_img(p.read_bytes(), p.stem.replace("_", " ")) for p in sorted(out.glob("latency_*.png"))]
    sized = [r for r in report["rows"] if r.get("size_mb")]
    if sized:
        images.append(png_img(latency_size_plot(sized), "latency vs size"))
    rows = []
    for r in report["rows"]:
        lat = r.get("latency_ms") or {}
        rows.append((r.get("name"), r.get("format"), r.get("precision"), fmt(r.get("size_mb"), ".2f"),
                     fmt(r.get("load_ms"), ".0f"), fmt(lat.get("p50"), ".2f"), fmt(lat.get("p90"), ".2f"),
                     fmt(lat.get("p99"), ".2f"), fmt(r.get("fps_batch1"), ".1f"), fmt(r.get("rss_added_mb"), ".0f"),
                     fmt(r.get("qwk"), ".3f"), fmt(r.get("referable_sensitivity"), ".3f"),
                     fmt(r.get("referable_specificity"), ".3f"), fmt(r.get("dme_auc"), ".3f"),
                     fmt(r.get("dme_sensitivity"), ".3f"), fmt(r.get("dme_specificity"), ".3f"),
                     fmt(r.get("agreement_fp32"), ".3f"),
                     fmt(r.get("cam_corr_fp32"), ".3f"), fmt(r.get("pointing_game"), ".2f"), fmt(r.get("roofline_pct"), ".1f"),
                     status(r.get("gate")), status(r.get("status")), (r.get("error") or "")[:80]))
    headers = ["artifact", "format", "prec.", "MB", "load ms", "p50 ms", "p90 ms", "p99 ms", "FPS b1", "+RSS MB", "QWK",
               "ref. sens", "ref. spec", "DME AUC", "DME sens", "DME spec", "agree FP32", "CAM corr", "pointing", "roofline %", "gate", "status", "note"]
    ratios = "".join(f"<li>{html.escape(line[2:])}</li>" for line in ratio_lines(report["rows"]) if line.startswith("- "))
    body = (section("Device", table(["", ""], device_rows)) +
            section("Plots", "<div class='grid'>" + "".join(images) + "</div>") +
            section("Every artifact", table(headers, rows, numeric=list(range(3, 20))), f"<ul>{ratios}</ul>",
                    explain="Latency at batch 1 after warm-up. Accuracy on the labelled split; agreement and CAM "
                            "correlation against the FP32 outputs of the same model; DME columns (models with a DME "
                            "head) on the photos with a DME label; 'skipped' rows cannot run on this OS."))
    from edge_runtime.contract import SCREENING_DISCLAIMER

    from .html_report import page

    path = out / "report.html"
    path.write_text(page("RetinaEdge benchmark", f"{d.get('cpu')}, {report.get('created_at')}", SCREENING_DISCLAIMER,
                         [body]))
    return path


def compare(reports: list[Path], out: Path) -> str:
    """Merge reports from several devices into one Markdown table and one plot."""
    plt = _plt()
    loaded = [json.loads(p.read_text()) for p in reports]
    lines = ["| device | artifact | p50 ms | p90 ms | FPS b1 | QWK | agree FP32 | roofline % |", "|---|---|---|---|---|---|---|---|"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for report in loaded:
        device = f"{report['device']['cpu'][:28]} ({report['device']['cores']}c)"
        rows = [r for r in report["rows"] if r.get("status") == "ok" and r.get("latency_ms")]
        for r in rows:
            lines.append(f"| {device} | {r['name']} | {r['latency_ms']['p50']:.2f} | {r['latency_ms']['p90']:.2f} | "
                         f"{r.get('fps_batch1', 0):.1f} | {r.get('qwk') if r.get('qwk') is None else round(r['qwk'], 3)} | "
                         f"{r.get('agreement_fp32', '-')} | {r.get('roofline_pct') and round(r['roofline_pct'], 1)} |")
        ax.plot([r["name"] for r in rows], [r["latency_ms"]["p50"] for r in rows], marker="o", label=device)
    ax.set_ylabel("p50 latency ms")
    ax.tick_params(axis="x", rotation=60, labelsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "compare.png", dpi=110)
    plt.close(fig)
    markdown = "\n".join(lines) + "\n"
    (out / "compare.md").write_text(markdown)
    return markdown


def write_markdown_and_json(out: Path, markdown: str, data) -> None:
    """``out``.md and ``out``.json side by side (the command-line benchmarks' printed table and its numbers)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(markdown)
    out.with_suffix(".json").write_text(json.dumps(data, indent=2, default=_plain))


def _plain(value):
    """numpy numbers as numbers, anything else (paths, enums) as text."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def _fmt(value, spec=".2f") -> str:
    return "-" if value is None else format(value, spec)


def to_markdown(report: dict) -> str:
    d = report["device"]
    int8 = (d.get("cpu_int8") or {}).get("int8")
    lines = [f"# RetinaEdge benchmark - {d['cpu']} ({d['cores']} cores, {d['ram_gb']} GB, {d['os']})", "",
             f"CPU int8 dot-product features: {', '.join(int8) if int8 else 'none'} "
             f"(INT8 preset for this CPU: {d.get('int8_target', '-')}).", "",
             f"Measured GEMM peak: {report['peak_gmacs']} GMAC/s. Latency at batch 1 after warm-up. "
             "Accuracy on the labelled split; agreement and CAM correlation against the FP32 outputs of the same model. "
             "DME (models with a DME head): on the photos with a DME label; referral agreement is then of referable DR "
             "or DME, as the device refers.", "",
             "| artifact | format | prec. | size MB | load ms | p50 ms | p90 ms | p99 ms | mean±std ms | FPS b1 | FPS best | "
             "+RSS MB | QWK | threshold | ref. sens [95% CI] | ref. spec [95% CI] | AUC | DME AUC [95% CI] (n) | "
             "DME sens [95% CI] | DME spec [95% CI] | referral agree FP32 (95% lower) | grade agree FP32 | cosine FP32 | "
             "CAM corr | pointing | roofline % | gate | status |",
             "|" + "---|" * 28]
    for r in report["rows"]:
        lat = r.get("latency_ms") or {}
        lines.append("| " + " | ".join([
            r.get("name", "-"), r.get("format", "-"), r.get("precision", "-"), _fmt(r.get("size_mb")), _fmt(r.get("load_ms"), ".0f"),
            _fmt(lat.get("p50")), _fmt(lat.get("p90")), _fmt(lat.get("p99")),
            f"{lat['mean']:.2f}±{lat['std']:.2f}" if lat else "-", _fmt(r.get("fps_batch1"), ".1f"), _fmt(r.get("fps_best"), ".1f"),
            _fmt(r.get("rss_added_mb"), ".0f"), _fmt(r.get("qwk"), ".3f"), _fmt(r.get("threshold"), ".3f"),
            with_ci(r, "referable_sensitivity", 2), with_ci(r, "referable_specificity", 2), _fmt(r.get("referable_auc"), ".3f"),
            f"{with_ci(r, 'dme_auc', 2)} (n={r['dme_n']})" if "dme_n" in r else "-",
            with_ci(r, "dme_sensitivity", 2), with_ci(r, "dme_specificity", 2),
            f"{r['referral_agreement_fp32']:.3f} ({r['referral_agreement_lower']:.3f})" if "referral_agreement_fp32" in r else "-",
            _fmt(r.get("agreement_fp32"), ".3f"),
            _fmt(r.get("logit_cosine_fp32"), ".4f"), _fmt(r.get("cam_corr_fp32"), ".3f"), _fmt(r.get("pointing_game"), ".2f"), _fmt(r.get("roofline_pct"), ".1f"),
            r.get("gate", "-"), r.get("status", "-") + (f": {r['error'][:60]}" if r.get("error") else "")]) + " |")
    ratios = ratio_lines(report["rows"])
    return "\n".join(lines + ([""] + ratios if ratios else [])) + "\n"


def ratio_lines(rows: list[dict]) -> list[str]:
    ok = [r for r in rows if r.get("status") == "ok" and r.get("latency_ms")]
    # The teacher is the largest FP32 model run in PyTorch eager (several --torch-checkpoint rows may be present).
    teacher = max((r for r in ok if r["format"] == "torch"), key=lambda r: r["size_mb"], default=None)
    if teacher is None:
        return []
    out = [f"Ratios against the largest FP32 model in PyTorch eager, the teacher when it was benchmarked "
           f"({teacher['name']}, p50 {teacher['latency_ms']['p50']:.1f} ms, {teacher['size_mb']:.1f} MB):", ""]
    for r in ok:
        if r is teacher:
            continue
        out.append(f"- {r['name']}: {teacher['latency_ms']['p50'] / r['latency_ms']['p50']:.1f}x faster, "
                   f"{teacher['size_mb'] / r['size_mb']:.1f}x smaller" + (f", QWK {r['qwk']:.3f}" if r.get("qwk") is not None else ""))
    return out


def write_report(report: dict, out: Path) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    (out / "report.md").write_text(to_markdown(report))
    write_plots(report, out)
    write_html(report, out)
    with open(out / "history.csv", "a", newline="") as fh:  # one line per row per run, appended
        writer = csv.writer(fh)
        for r in report["rows"]:
            writer.writerow([report["created_at"], report["device"]["cpu"], r.get("name"), r.get("format"), r.get("precision"),
                             (r.get("latency_ms") or {}).get("p50"), r.get("qwk"), r.get("status")])
