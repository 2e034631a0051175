"""CPU time of the quality gate per stage, before and after, on the same photos in the same process.

For a machine that is not idle (a training job owning the cores), wall-clock times of a low-priority process
measure the scheduler; CPU time (``time.process_time``: every thread of the process) measures the gate. Each photo
is decoded as the Screener decodes it for a 224-px model and its field of view found once; the gate of
``--before-ref`` (imported from a temporary copy) and the working tree's gate then run ``assess`` in alternating
rounds. A line tracer on ``quality_metrics`` charges each line's CPU time (calls made from it included) to the
stage its text names (``STAGES``), so both revisions are split the same way; ``verdict`` is the rest of
``assess`` (rule reasons, the learned score, the report). Per photo the minimum over rounds, per stage the median
over photos; the totals are timed without the tracer.

    python -m benchmarks.quality_stages --before-ref HEAD --n 40 --rounds 5 --threads 2
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
from scipy.stats import bootstrap

from .quality_report import load_before_module
from .quality_speed import cpu_int8_features, screened_photos

# stage -> words of the source lines charged to it (first match wins, in this order)
STAGES = {
    "view and field": r"gate_view|detect_fov|surround_fov|field_crop|_field_planes|n_inner < 100|NoFundusError|h_in, w_in",
    "field circle": r"field_circle|circle\.|decentering|field_diameter",
    "field hole": r"field_hole",
    "redness": r"redness",
    "blockiness": r"_blockiness",
    "wavelet": r"_haar_hf_ratio|boundingRect|box =",
    "patches": r"_patches",
    "illumination balance": r"thirds|bands|t_h, t_w|gray_in|band|inside",
    "noise": r"shifted|hp_median|noise",
    "red clipped": r"red_clipped|clipped",
    "glare": r"glare|value|bright|chroma",
    "local contrast": r"GaussianBlur|detail_energy|blurred|green_float|\bg = |copyto\(g",
    "directional": r"core|energies|_DIRECTIONS|where|step|\ba = |\bb = ",
    "laplacian and tenengrad": r"Laplacian|lap_|Sobel|tenengrad|gradient|mask16|green_mean|green_in",
    "planes and histograms": r"split|cvtColor|hist|whiteness|dark_channel|_hist_stats",
}


def stage_of_lines(function) -> dict[int, str]:
    """Line number -> stage for every line of ``function``'s source; lines of no stage are "other"."""
    lines, first = inspect.getsourcelines(function)
    out = {}
    for offset, text in enumerate(lines):
        code = text.split("#")[0]
        out[first + offset] = next((stage for stage, words in STAGES.items() if re.search(words, code)), "other")
    return out


class LineClock:
    """Charges CPU time between line events of one function's frames to the stage of the line that ran."""

    def __init__(self, function) -> None:
        self.code, self.stages = function.__code__, stage_of_lines(function)
        self.spent: dict[str, int] = defaultdict(int)
        self.line, self.started = None, 0

    def _local(self, frame, event, arg):
        now = time.process_time_ns()
        if self.line is not None:
            self.spent[self.stages.get(self.line, "other")] += now - self.started
        self.line = frame.f_lineno if event == "line" else None
        self.started = time.process_time_ns()
        return self._local

    def _global(self, frame, event, arg):
        return self._local if frame.f_code is self.code else None

    def run(self, call):
        self.spent.clear()
        self.line = None
        sys.settrace(self._global)
        try:
            call()
        finally:
            sys.settrace(None)
        return dict(self.spent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, nargs="+", default=[Path("../shared/data") / name for name in
                                                                  ("eyepacs_full", "messidor2", "mexico_dme")])
    parser.add_argument("--split", default="val")
    parser.add_argument("--n", type=int, default=40, help="photos per folder")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="OpenCV threads, the same for both gates")
    parser.add_argument("--before-ref", default="HEAD", help="git revision whose gate is the 'before'")
    args = parser.parse_args()
    cv2.setNumThreads(args.threads)
    photos = screened_photos(args.data, args.split, args.n)
    load_before_module(args.before_ref)
    gates = {f"before ({args.before_ref})": (importlib.import_module("edge_runtime_before.quality"),
                                             importlib.import_module("edge_runtime_before.preprocess")),
             "after": (importlib.import_module("edge_runtime.quality"), importlib.import_module("edge_runtime.preprocess"))}
    fovs = {name: [pre.detect_fov(img) for _, img in photos] for name, (_, pre) in gates.items()}
    stages = [*STAGES, "other", "verdict"]
    total = {name: np.full(len(photos), np.inf) for name in gates}
    per_stage = {name: {s: np.full(len(photos), np.inf) for s in stages} for name in gates}
    clocks = {name: LineClock(quality.quality_metrics) for name, (quality, _) in gates.items()}
    for name, (quality, _) in gates.items():  # warm-up: imports, kernel caches, scratch buffers
        for i, (_, img) in enumerate(photos):
            quality.assess(img, fov=fovs[name][i])
    for _ in range(args.rounds):
        for name, (quality, _) in gates.items():
            for i, (_, img) in enumerate(photos):
                started = time.process_time_ns()
                quality.assess(img, fov=fovs[name][i])
                total[name][i] = min(total[name][i], (time.process_time_ns() - started) / 1e6)
                started = time.process_time_ns()
                spent = clocks[name].run(lambda: quality.assess(img, fov=fovs[name][i]))  # noqa: B023
                traced = (time.process_time_ns() - started) / 1e6
                spent_ms = {s: v / 1e6 for s, v in spent.items()}
                spent_ms["verdict"] = max(0.0, traced - sum(spent_ms.values()))
                for s in stages:
                    per_stage[name][s][i] = min(per_stage[name][s][i], spent_ms.get(s, 0.0))
    names = list(gates)
    print(f"# Quality gate CPU time per photo (ms, process_time), {len(photos)} photos ({', '.join(d.name for d in args.data)}; "
          f"split {args.split}), {args.threads} OpenCV threads, min of {args.rounds} alternating rounds per photo")
    print(f"CPU int8 features: {cpu_int8_features()}\n")
    print("| stage | " + " | ".join(f"{n} p50" for n in names) + " |\n|---|" + "---|" * len(names))
    for s in stages:
        print(f"| {s} | " + " | ".join(f"{np.median(per_stage[n][s]):.3f}" for n in names) + " |")
    print("| **total (untraced)** | " + " | ".join(f"**{np.median(total[n]):.2f}** (p90 {np.percentile(total[n], 90):.2f})"
                                                  for n in names) + " |")
    ratio = total[names[1]] / total[names[0]]
    low, high = _median_interval(ratio)
    print(f"\nafter / before (median of per-photo ratios, n={len(photos)}): {np.median(ratio):.3f} "
          f"(95% bootstrap interval {low:.3f}-{high:.3f})")
    for n in names:
        low, high = _median_interval(total[n])
        print(f"{n}: total p50 {np.median(total[n]):.2f} ms (95% bootstrap interval {low:.2f}-{high:.2f})")


def _median_interval(values: np.ndarray) -> tuple[float, float]:
    """95% bootstrap interval (BCa, scipy) of the median of ``values``."""
    interval = bootstrap((values,), np.median, confidence_level=0.95, random_state=0).confidence_interval
    return float(interval.low), float(interval.high)


if __name__ == "__main__":
    main()
