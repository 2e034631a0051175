"""`retinaedge bench`: every artifact this device can run -> size, load time, latency percentiles, throughput,
peak RSS, accuracy/fidelity against FP32, CAM pointing game, roofline. A failing artifact is a row, not a crash."""
from __future__ import annotations

import csv
import gc
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_runtime.backends import open_session
from edge_runtime.backends.base import HeadOutputs
from edge_runtime.contract import (
    ArtifactManifest,
    OperatingPoint,
    PreprocessPolicy,
    manifest_path_for,
)
from edge_runtime.decision import decide_batch
from edge_runtime.errors import ImageError
from edge_runtime.formats import RUNTIME_FORMATS, format_for_path
from edge_runtime.preprocess import preprocess_file

from .device import fingerprint, peak_gmacs
from .report import write_report

log = logging.getLogger(__name__)
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class BenchConfig:
    runs: int = 100  # minimum timed runs
    min_seconds: float = 10.0  # ... and minimum timed duration, whichever is longer
    warmup: int = 10
    threads: int | None = None
    batch_sizes: tuple[int, ...] = (1, 4, 8)
    mlperf: bool = False  # MLPerf single-stream: >= 1024 queries and >= 60 s, p90 reported
    eval_limit: int | None = None  # cap labelled images (None = all of the split)
    split: str = "test"

    def __post_init__(self) -> None:
        if self.mlperf:
            object.__setattr__(self, "runs", max(self.runs, 1024))
            object.__setattr__(self, "min_seconds", max(self.min_seconds, 60.0))


def _rss_mb(field: str = "VmHWM") -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> None:
    try:  # Linux: writing 5 resets the peak-RSS high-water mark of this process
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def latency_stats(samples_ms: list[float]) -> dict:
    a = np.asarray(samples_ms)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99)),
            "mean": float(a.mean()), "std": float(a.std()), "n": int(len(a))}


def time_runs(run, x: np.ndarray, cfg: BenchConfig) -> list[float]:
    for _ in range(cfg.warmup):
        run(x)
    samples, started = [], time.perf_counter()
    while len(samples) < cfg.runs or time.perf_counter() - started < cfg.min_seconds:
        t0 = time.perf_counter()
        run(x)
        samples.append((time.perf_counter() - t0) * 1000)
    return samples


def load_eval_set(data: Path, policy: PreprocessPolicy, split: str, limit: int | None):
    """The split's photos, grades and DME labels (``compression.calibration.PhotoBatch``)."""
    from compression.calibration import load_photos

    return load_photos(data, policy, split, limit)


def pointing_game(run, policy: PreprocessPolicy, lesion_dir: Path) -> float | None:
    """Share of lesion images whose CAM peak (most likely DR grade 1-4) falls inside a lesion box."""
    boxes_csv = lesion_dir / "boxes.csv"
    if not boxes_csv.is_file():
        return None
    boxes: dict[str, list] = {}
    for row in csv.DictReader(open(boxes_csv)):
        if row["class_name"] != "optic_disc":
            boxes.setdefault(row["image"], []).append([float(row[k]) for k in ("x_center", "y_center", "width", "height")])
    hits = total = 0
    for name, lesions in sorted(boxes.items()):
        try:
            pre = preprocess_file(lesion_dir / "images" / name, policy)
        except ImageError:
            continue
        logits, cam = run(pre.tensor)
        grade = 1 + int(np.argmax(logits[0, 1:]))
        heat = cam[0, grade]
        row, col = np.unravel_index(int(np.argmax(heat)), heat.shape)
        x, y = pre.to_original((col + 0.5) / heat.shape[1], (row + 0.5) / heat.shape[0])
        total += 1
        hits += any(abs(x - cx) <= w / 2 and abs(y - cy) <= h / 2 for cx, cy, w, h in lesions)
    return hits / total if total else None


def roofline(macs: int, p50_ms: float, peak_gmacs: float) -> tuple[float, float]:
    """Achieved GMAC/s at the median latency and its share (%) of the device's measured GEMM peak."""
    achieved = macs / (p50_ms / 1000) / 1e9
    return achieved, 100 * achieved / peak_gmacs


def bench_session(name: str, fmt: str, precision: str, model: str, size_mb: float, macs: int | None, run, load_s: float,
                  policy: PreprocessPolicy, cfg: BenchConfig, eval_set, reference, lesion_dir, peaks, max_batch: int,
                  rss_before_mb: float | None = None, point: OperatingPoint | None = None,
                  run_heads=None, dme_point: OperatingPoint | None = None) -> dict:
    """One row. ``reference`` is the FP32 model's (logits, cams, referral decisions) on the same photos.

    With ``run_heads`` (batch -> ``HeadOutputs``) and the DME head's ``dme_point``, the labelled split is decided as
    the device decides it (referral: referable DR or DME present) and the row gains the DME AUC, sensitivity and
    specificity with n and 95% intervals on the photos with a DME label (``dme_*``)."""
    from compression.gate import cam_correlation
    from edge_runtime.metrics import clopper_pearson_interval, clopper_pearson_lower, screening_metrics

    point = point or OperatingPoint()

    x1 = np.zeros((1, 3, policy.input_size, policy.input_size), np.float32)
    if eval_set is not None:
        x1 = eval_set.x[:1]
    samples = time_runs(run, x1, cfg)
    stats = latency_stats(samples)
    throughput = {"1": 1000 / stats["mean"]}
    for batch in cfg.batch_sizes:
        if batch == 1 or batch > max_batch:
            continue
        xb = np.repeat(x1, batch, axis=0)
        quick = time_runs(run, xb, BenchConfig(runs=10, min_seconds=1.0, warmup=2))
        throughput[str(batch)] = batch * 1000 / float(np.mean(quick))
    row = {"name": name, "format": fmt, "precision": precision, "model": model, "status": "ok", "size_mb": size_mb,
           "load_ms": load_s * 1000, "latency_ms": stats, "fps_batch1": throughput["1"],
           "fps_best": max(throughput.values()), "best_batch": int(max(throughput, key=throughput.get)),
           "peak_rss_mb": _rss_mb(), "macs": macs,
           # What this artifact added to the process (loaded runtime + buffers), comparable across rows;
           # peak_rss_mb is the whole benchmark process's high-water mark where the kernel cannot reset it.
           "rss_added_mb": (_rss_mb("VmRSS") - rss_before_mb) if rss_before_mb is not None and _rss_mb("VmRSS") else None}
    runtime_peak = max(peaks.values()) if peaks else None  # the device's best measured FP32 GEMM rate
    if macs and runtime_peak:
        row["gmacs_per_s"], row["roofline_pct"] = roofline(macs, stats["p50"], runtime_peak)
    if eval_set is not None:
        x, y = eval_set.x, eval_set.grades
        with_dme = run_heads is not None and dme_point is not None
        outs = HeadOutputs.concatenate([run_heads(x[i:i + 1]) if with_dme else HeadOutputs(*run(x[i:i + 1]))
                                        for i in range(len(x))])
        logits, cams = outs.logits, outs.cam
        decisions = decide_batch(logits, point, outs.dme_logit if with_dme else None, dme_point if with_dme else None)
        row.update(threshold=point.threshold, operating_rule=point.rule, n_eval=len(x),
                   uncertain=int(decisions.uncertain.sum()))
        if with_dme:
            from training.data.layouts import MISSING
            from training.metrics import dme_metrics

            labels = eval_set.dme if eval_set.dme is not None else np.full(len(x), MISSING)
            dme = dme_metrics(labels, decisions.dme_probability, decisions.dme_present)
            row.update({f"dme_{k}": v for k, v in dme.items()}, dme_threshold=dme_point.threshold,
                       dme_rule=dme_point.rule, referred=int(decisions.referable.sum()))
        if y is not None:
            m = screening_metrics(y, decisions.probabilities, point.threshold)
            row.update({k: m[k] for k in ("qwk", "accuracy", "referable_sensitivity", "referable_sensitivity_ci",
                                          "referable_specificity", "referable_specificity_ci", "referable_auc",
                                          "n_positive", "n_negative")})
        if reference is not None and reference[0].shape == logits.shape:
            row["agreement_fp32"] = float((reference[0].argmax(1) == logits.argmax(1)).mean())
            same = int((reference[2] == decisions.referable).sum())
            row["referral_agreement_fp32"] = same / len(x)
            row["referral_agreement_ci"] = clopper_pearson_interval(same, len(x))
            row["referral_agreement_lower"] = clopper_pearson_lower(same, len(x))
            num = (reference[0] * logits).sum(1)
            row["logit_cosine_fp32"] = float(np.mean(num / (np.linalg.norm(reference[0], axis=1) * np.linalg.norm(logits, axis=1) + 1e-12)))
            if reference[1].shape == cams.shape:
                row["cam_corr_fp32"] = cam_correlation(reference[1], cams, reference[0].argmax(1))
        row["_outputs"] = (logits, cams, decisions.referable)
    if lesion_dir is not None:
        row["pointing_game"] = pointing_game(run, policy, lesion_dir)
    return row


def run_benchmark(artifacts: Path, out: Path, data: Path | None = None, lesion_dir: Path | None = None,
                  torch_checkpoints: list[Path] | None = None, cfg: BenchConfig = BenchConfig(),
                  progress: bool = True) -> dict:
    """Benchmark every runnable artifact under ``artifacts`` (its index.json or any files with manifests)."""
    out.mkdir(parents=True, exist_ok=True)
    device = fingerprint()
    peaks = peak_gmacs(cfg.threads)
    paths = sorted(p for p in artifacts.rglob("*") if p.suffix in {s.suffix for s in RUNTIME_FORMATS.values()}
                   and manifest_path_for(p).is_file() and ".tmp" not in p.name)
    rows: list[dict] = []
    eval_sets: dict = {}
    references: dict = {}

    def eval_for(policy: PreprocessPolicy):
        key = repr(policy)
        if data is not None and key not in eval_sets:
            eval_sets[key] = load_eval_set(data, policy, cfg.split, cfg.eval_limit)
        return eval_sets.get(key)

    from rich.progress import track

    # FP32 first so INT8/FP16 rows can be compared with the FP32 outputs of the same model.
    order = sorted(paths, key=lambda p: (ArtifactManifest.from_json(manifest_path_for(p).read_text()).quantization.precision != "fp32", p.name))
    for checkpoint in torch_checkpoints or []:
        rows.append(_bench_torch(checkpoint, cfg, eval_for, references, lesion_dir, peaks))
    for path in (track(order, description="benchmarking") if progress else order):
        spec = format_for_path(path)
        manifest = ArtifactManifest.from_json(manifest_path_for(path).read_text())
        precision = manifest.quantization.precision
        base = {"name": path.name, "format": spec.name, "precision": precision, "model": manifest.model_name,
                "size_mb": artifact_size_mb(path), "gate": manifest.gate.status}
        if not spec.runs_here:
            rows.append({**base, "status": "skipped", "error": f"{spec.runtime} runs only on {', '.join(spec.runs_on)}"})
            continue
        try:
            gc.collect()
            _reset_peak_rss()
            rss_before = _rss_mb("VmRSS")
            started = time.perf_counter()
            session = open_session(path, allow_ungated=True, threads=cfg.threads)
            load_s = time.perf_counter() - started
            max_batch = min(spec.max_batch or max(cfg.batch_sizes), max(cfg.batch_sizes))
            row = bench_session(path.name, spec.name, precision, manifest.model_name, base["size_mb"],
                                manifest.extra.get("macs"), session.run, load_s, manifest.preprocess, cfg,
                                eval_for(manifest.preprocess), references.get(manifest.model_name), lesion_dir, peaks, max_batch,
                                rss_before, manifest.operating_point, session.run_heads, manifest.dme_operating_point)
            row.update(gate=manifest.gate.status, backend=session.info.backend, provider=session.info.provider)
            outputs = row.pop("_outputs", None)
            if precision == "fp32" and outputs is not None and manifest.model_name not in references:
                references[manifest.model_name] = outputs
            rows.append(row)
            del session
        except Exception as exc:  # noqa: BLE001 - a failing artifact becomes a row; the run continues
            log.error("%s failed: %s", path.name, exc)
            rows.append({**base, "status": "failed", "error": f"{type(exc).__name__}: {exc}"})
    report = {"schema_version": SCHEMA_VERSION, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "device": device, "peak_gmacs": peaks, "config": cfg.__dict__, "rows": rows}
    write_report(report, out)
    return report


def _bench_torch(checkpoint: Path, cfg, eval_for, references, lesion_dir, peaks) -> dict:
    """Full-precision PyTorch eager baseline (e.g. the B4 teacher), measured in the same run."""
    try:
        import torch

        from training.models import load_checkpoint
        from training.models.profile import count_macs

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        _reset_peak_rss()
        rss_before = _rss_mb("VmRSS")
        started = time.perf_counter()
        model, meta = load_checkpoint(checkpoint)
        load_s = time.perf_counter() - started
        policy = meta.preprocess

        @torch.no_grad()
        def run(x):
            logits, cam = model.forward_with_cam(torch.from_numpy(x))
            return logits.numpy(), cam.numpy()

        @torch.no_grad()
        def run_heads(x):
            return HeadOutputs(*(t.numpy() for t in model.forward_outputs(torch.from_numpy(x))))

        row = bench_session(checkpoint.name, "torch", "fp32", meta.model_name, round(checkpoint.stat().st_size / 1e6, 3),
                            count_macs(model, policy.input_size), run, load_s, policy, cfg, eval_for(policy), None,
                            lesion_dir, peaks, max(cfg.batch_sizes), rss_before, meta.operating_point, run_heads,
                            meta.dme_point)
        outputs = row.pop("_outputs", None)
        if outputs is not None:
            references.setdefault(meta.model_name, outputs)
        row.update(backend="pytorch", provider="eager", gate="not_required")
        return row
    except Exception as exc:  # noqa: BLE001
        return {"name": checkpoint.name, "format": "torch", "precision": "fp32", "status": "failed", "error": str(exc)}


def artifact_size_mb(path: Path) -> float:
    """An artifact's size on disk in MB: its file, or every file of a package folder (CoreML .mlpackage)."""
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    return round(sum(p.stat().st_size for p in files) / 1e6, 3)
