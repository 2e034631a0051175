"""Self-contained HTML reports: tables, explanations and matplotlib plots embedded as base64 PNG.

One page is one file (no external assets), so it can be mailed, archived beside the artifacts or opened offline.
Used by the demo report (retinaedge.demo) and the benchmark report (benchmarks.report).
"""
from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from edge_runtime.contract import GRADE_NAMES

# Format -> colour and precision -> marker, shared by every plot so a reader learns them once.
FORMAT_COLOURS = {"torch": "#555555", "onnx": "#1f77b4", "tflite": "#ff7f0e", "coreml": "#2ca02c"}
PRECISION_MARKERS = {"fp32": "o", "fp16": "s", "int8": "^"}
STAGE_ORDER = ("decode", "quality", "preprocess", "infer", "cam", "store")

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:1.5rem auto;max-width:1180px;color:#222;line-height:1.4}
h1{margin-bottom:.2rem} h2{margin-top:2rem;border-bottom:2px solid #e5e5e5;padding-bottom:.2rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.92rem} caption{text-align:left;color:#555;padding:.2rem 0}
th,td{padding:.28rem .6rem;border-bottom:1px solid #ddd;text-align:left;vertical-align:top}
th{background:#f4f6f8} td.num{text-align:right;font-variant-numeric:tabular-nums}
.disclaimer{background:#fff4e5;border-left:5px solid #f0a020;padding:.6rem 1rem;font-weight:600}
.explain{color:#444;font-size:.92rem;max-width:70rem} .grid{display:flex;flex-wrap:wrap;gap:1rem;align-items:flex-start}
figure{margin:0} figcaption{font-size:.85rem;color:#444;max-width:26rem}
.ok{color:#1a7f37;font-weight:600} .bad{color:#c62828;font-weight:600} .warn{color:#a15c00;font-weight:600}
.cards{display:flex;flex-wrap:wrap;gap:.8rem} .card{border:1px solid #ddd;border-radius:6px;padding:.6rem .9rem;min-width:11rem}
.card b{font-size:1.35rem;display:block}
img.cam{width:240px;height:auto;border-radius:4px}
figure.cam figcaption{max-width:240px}
"""


@dataclass(frozen=True)
class Raw:
    """Trusted HTML (built by this module), inserted without escaping."""

    html: str


def esc(value) -> str:
    return value.html if isinstance(value, Raw) else html.escape("-" if value is None else str(value))


def fmt(value, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    return format(value, spec)


def with_ci(value: float | None, ci: Sequence[float] | None, spec: str = ".2f") -> str:
    """'0.93 (0.88-0.97)': the estimate and its 95% interval."""
    if value is None:
        return "-"
    if ci is None or any(c is None or not np.isfinite(c) for c in ci):
        return fmt(value, spec)
    return f"{fmt(value, spec)} ({fmt(ci[0], spec)}-{fmt(ci[1], spec)})"


def status(text: str | None) -> Raw:
    """A verdict string shown as is, coloured by whether it is good news."""
    word = "-" if text is None else str(text)
    css = {"passed": "ok", "ok": "ok", "not_required": "ok", "failed": "bad", "error": "bad"}.get(word, "warn")
    return Raw(f"<span class='{css}'>{html.escape(word)}</span>")


def table(headers: Sequence[str], rows: Iterable[Sequence], caption: str | None = None,
          numeric: Sequence[int] = ()) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td{' class=num' if i in numeric else ''}>{esc(c)}</td>" for i, c in enumerate(row))
                   + "</tr>" for row in rows)
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def cards(items: Iterable[tuple[str, str, str]]) -> str:
    """Headline numbers: (label, value, one line of explanation)."""
    return "<div class='cards'>" + "".join(
        f"<div class='card'>{esc(label)}<b>{esc(value)}</b><span class='explain'>{esc(note)}</span></div>"
        for label, value, note in items) + "</div>"


def png_img(png: bytes, alt: str, width: int | None = None, css_class: str = "plot") -> str:
    size = f" width='{width}'" if width else ""
    return (f"<img class='{css_class}' alt='{html.escape(alt)}'{size} "
            f"src='data:image/png;base64,{base64.b64encode(png).decode()}'>")


def figure(img_html: str, caption: str, css_class: str = "") -> str:
    return f"<figure class='{css_class}'>{img_html}<figcaption>{esc(caption)}</figcaption></figure>"


def section(title: str, *parts: str, explain: str | None = None) -> str:
    note = f"<p class='explain'>{esc(explain)}</p>" if explain else ""
    return f"<section><h2>{esc(title)}</h2>{note}{''.join(parts)}</section>"


def page(title: str, subtitle: str, disclaimer: str, sections: Iterable[str]) -> str:
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>"
            f"<meta name='viewport' content='width=device-width,initial-scale=1'><style>{_CSS}</style></head><body>"
            f"<h1>{esc(title)}</h1><p>{esc(subtitle)}</p><p class='disclaimer'>{esc(disclaimer)}</p>"
            + "".join(sections) + "</body></html>")


# ---------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fig_png(fig, dpi: int = 100) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    _plt().close(fig)
    return buffer.getvalue()


@dataclass(frozen=True)
class RocCurve:
    """One model's referable-DR ROC and the point its threshold picks."""

    label: str
    labels: np.ndarray  # 1 = referable (grade >= 2)
    scores: np.ndarray  # P(grade >= 2)
    threshold: float
    auc: float | None = None
    auc_ci: tuple[float, float] | None = None
    extra: dict = field(default_factory=dict)


def roc_plot(curves: Sequence[RocCurve]) -> bytes:
    from sklearn.metrics import roc_curve

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    for curve in curves:
        labels = np.asarray(curve.labels, bool)
        if labels.all() or not labels.any():
            continue
        fpr, tpr, _ = roc_curve(labels, curve.scores)
        name = f"{curve.label} (AUC {with_ci(curve.auc, curve.auc_ci)})" if curve.auc is not None else curve.label
        line, = ax.plot(fpr, tpr, lw=2, label=name)
        predicted = np.asarray(curve.scores) >= curve.threshold
        sens, spec = predicted[labels].mean(), (~predicted[~labels]).mean()
        ax.plot([1 - spec], [sens], marker="o", ms=10, mfc="white", mec=line.get_color(), mew=2.5)
        ax.annotate(f"threshold {curve.threshold:.2f}\nsens {sens:.2f}, spec {spec:.2f}", (1 - spec, sens),
                    xytext=(12, -28), textcoords="offset points", fontsize=8, color=line.get_color())
    ax.plot([0, 1], [0, 1], ls=":", color="#999", lw=1)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.05)
    ax.set_xlabel("1 - specificity (non-referable photos flagged)")
    ax.set_ylabel("sensitivity (referable photos caught)")
    ax.set_title("Referable DR (grade >= 2): ROC and operating point")
    ax.legend(loc="lower right", fontsize=8)
    return fig_png(fig)


def latency_size_plot(rows: Sequence[dict]) -> bytes:
    """p50 latency against file size for every artifact; colour = format, marker = precision.
    Artifacts this OS cannot run (CoreML on Linux) appear as size ticks on the bottom axis."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    ran = [r for r in rows if r.get("latency_ms")]
    not_run = [r for r in rows if not r.get("latency_ms") and r.get("size_mb")]
    for r in ran:
        ax.scatter(r["size_mb"], r["latency_ms"]["p50"], s=70, c=FORMAT_COLOURS.get(r["format"], "k"),
                   marker=PRECISION_MARKERS.get(r["precision"], "D"), edgecolors="k", linewidths=0.5, zorder=3)
        ax.annotate(r.get("label") or r["name"], (r["size_mb"], r["latency_ms"]["p50"]), xytext=(5, 4),
                    textcoords="offset points", fontsize=7)
    for r in not_run:
        ax.axvline(r["size_mb"], color=FORMAT_COLOURS.get(r["format"], "k"), ls="--", lw=1, alpha=0.7)
        ax.annotate(f"{r.get('label') or r['name']}\n(not runnable here)", (r["size_mb"], 0.02),
                    xycoords=("data", "axes fraction"), fontsize=7, rotation=90, va="bottom", ha="right")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("file size (MB, log)")
    ax.set_ylabel("p50 latency, batch 1 (ms, log)")
    ax.set_title("Latency vs size (lower left is better)")
    handles = [plt.Line2D([], [], ls="", marker="o", color=c, label=f) for f, c in FORMAT_COLOURS.items()
               if any(r["format"] == f for r in rows)]
    handles += [plt.Line2D([], [], ls="", marker=m, color="#777", label=p) for p, m in PRECISION_MARKERS.items()
                if any(r["precision"] == p for r in rows)]
    ax.legend(handles=handles, fontsize=8, loc="best")
    ax.grid(True, which="both", alpha=0.25)
    return fig_png(fig)


def confusion_plot(cm: Sequence[Sequence[int]], title: str) -> bytes:
    plt = _plt()
    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(4.3, 3.9))
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.nan_to_num(cm / cm.sum(1, keepdims=True))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if share[i, j] > 0.5 else "black", fontsize=10)
    ticks = [f"{g}" for g in range(len(cm))]
    ax.set_xticks(range(len(cm)), ticks)
    ax.set_yticks(range(len(cm)), [f"{g} {GRADE_NAMES[g]}" if g < len(GRADE_NAMES) else str(g) for g in range(len(cm))],
                  fontsize=8)
    ax.set_xlabel("predicted grade")
    ax.set_ylabel("reference grade")
    ax.set_title(title, fontsize=10)
    return fig_png(fig)


def stage_bar_plot(stage_ms: dict[str, float], title: str) -> bytes:
    """Median milliseconds per on-device stage as one stacked horizontal bar plus one bar per stage."""
    plt = _plt()
    stages = [s for s in STAGE_ORDER if s in stage_ms]
    fig, ax = plt.subplots(figsize=(6.4, 2.9))
    colours = plt.get_cmap("tab10").colors
    ax.barh(stages[::-1], [stage_ms[s] for s in stages][::-1], color=[colours[i] for i in range(len(stages))][::-1])
    for i, s in enumerate(stages[::-1]):
        ax.annotate(f"{stage_ms[s]:.1f} ms", (stage_ms[s], i), xytext=(4, 0), textcoords="offset points", va="center",
                    fontsize=8)
    ax.set_xlabel("median milliseconds per photo")
    ax.set_title(title, fontsize=10)
    ax.set_xlim(0, max(stage_ms[s] for s in stages) * 1.25 + 1e-6)
    return fig_png(fig)


def draw_boxes(png: bytes, boxes: Sequence[tuple[float, float, float, float]], peak: tuple[float, float] | None = None) -> bytes:
    """Outline normalised (cx, cy, w, h) lesion boxes, and mark the CAM peak, on a PNG of the whole photo."""
    import cv2

    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    h, w = image.shape[:2]
    thickness = max(2, round(max(h, w) / 300))
    for cx, cy, bw, bh in boxes:
        x0, y0 = int((cx - bw / 2) * w), int((cy - bh / 2) * h)
        x1, y1 = int((cx + bw / 2) * w), int((cy + bh / 2) * h)
        cv2.rectangle(image, (x0, y0), (x1, y1), (255, 255, 255), thickness + 2)
        cv2.rectangle(image, (x0, y0), (x1, y1), (0, 200, 0), thickness)
    if peak is not None:
        centre = (int(peak[0] * w), int(peak[1] * h))
        cv2.drawMarker(image, centre, (255, 255, 255), cv2.MARKER_CROSS, 12 * thickness, thickness + 2)
        cv2.drawMarker(image, centre, (0, 0, 0), cv2.MARKER_CROSS, 12 * thickness, thickness)
    ok, out = cv2.imencode(".png", image)
    if not ok:
        raise RuntimeError("PNG encoding of the lesion-box overlay failed")
    return out.tobytes()


def thumbnail(png: bytes, max_side: int = 320) -> bytes:
    """Smaller PNG for galleries, so a report with many overlays stays a few MB."""
    import cv2

    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    scale = min(1.0, max_side / max(image.shape[:2]))
    if scale < 1:
        image = cv2.resize(image, (int(image.shape[1] * scale), int(image.shape[0] * scale)), interpolation=cv2.INTER_AREA)
    return cv2.imencode(".png", image)[1].tobytes()
