"""Plots, HTML and cross-device comparison for benchmark reports."""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path


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
    from .runner import to_markdown

    images = "".join(f"<img src='data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}' style='max-width:48%'>"
                     for p in sorted(out.glob("latency_*.png")))
    table = html.escape(to_markdown(report))
    page = (f"<html><head><meta charset='utf-8'><title>RetinaEdge benchmark</title></head><body style='font-family:sans-serif'>"
            f"<h1>RetinaEdge benchmark</h1><pre>{html.escape(json.dumps(report['device'], indent=1))}</pre>{images}"
            f"<pre style='font-size:11px'>{table}</pre></body></html>")
    path = out / "report.html"
    path.write_text(page)
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
