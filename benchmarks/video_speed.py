"""Best-frame selection speed and correctness on a synthetic capture clip with a known best frame.

The clip is one fundus photo (a real one from ``--photo``, else the synthetic generator's) placed in 720p
frames, with defocus ramping down to the best frame and back up, motion blur at a random angle before it and
an exposure ramp after it, so exactly one frame is sharp and well exposed. Prints frames/s of the quality
scorer alone (frames already decoded) and of decode + score, at ``--threads`` OpenCV threads.

    python -m benchmarks.video_speed --frames 90 --best 57 --threads 2 [--photo ../shared/data/eyepacs_full/images/10_left.jpg]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from edge_runtime.backends import cpu_features
from edge_runtime.quality import assess
from edge_runtime.video import choose_frame, video_frames

from .degradations import DEGRADATIONS


def synthetic_photo(size: int, seed: int = 0) -> np.ndarray:
    from training.data.synthetic import generate_fundus

    return generate_fundus(0, size, np.random.default_rng(seed)).image


def clip_frame(photo: np.ndarray, index: int, best: int, n_frames: int, frame_size: tuple[int, int],
               rng: np.random.Generator) -> np.ndarray:
    """Frame ``index`` of the clip: the photo centred in a black frame, degraded by distance from ``best``."""
    width, height = frame_size
    scale = height / max(photo.shape[:2])
    fundus = cv2.resize(photo, (round(photo.shape[1] * scale), round(photo.shape[0] * scale)), interpolation=cv2.INTER_AREA)
    frame = np.zeros((height, width, 3), np.uint8)
    x0, y0 = (width - fundus.shape[1]) // 2, (height - fundus.shape[0]) // 2
    frame[y0:y0 + fundus.shape[0], x0:x0 + fundus.shape[1]] = fundus
    distance = min(1.0, abs(index - best) / max(1, n_frames // 3))
    if index == best:
        return frame
    frame = DEGRADATIONS["defocus"](frame, -0.4 + 1.4 * distance, rng)  # slight blur next to the best frame
    if index < best:
        frame = DEGRADATIONS["motion_blur"](frame, distance, rng)
    else:
        gain = 1.0 + 1.6 * distance
        frame = np.clip(frame.astype(np.float32) * gain, 0, 255).astype(np.uint8)
    return frame


def write_clip(path: Path, photo: np.ndarray, n_frames: int, best: int, frame_size: tuple[int, int] = (1280, 720),
               fps: int = 30, seed: int = 0) -> Path:
    """An mp4 (MPEG-4 part 2, what every OpenCV build writes) whose best frame is ``best``."""
    rng = np.random.default_rng(seed)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, frame_size)
    if not writer.isOpened():
        raise RuntimeError("OpenCV cannot write mp4 here")
    for index in range(n_frames):
        writer.write(clip_frame(photo, index, best, n_frames, frame_size, rng))
    writer.release()
    return path


def measure(clip: Path, repeats: int = 3) -> dict:
    """Median over ``repeats`` of: the scorer alone on decoded frames, and decode + score + choose."""
    frames = [f for _, f in video_frames(clip)]
    for f in frames[:3]:
        assess(f)
    score_fps, end_to_end_fps = [], []
    for _ in range(repeats):  # alternated, so load from other processes falls on both alike
        started = time.perf_counter()
        for f in frames:
            assess(f)
        score_fps.append(len(frames) / (time.perf_counter() - started))
        started = time.perf_counter()
        choice = choose_frame(video_frames(clip))
        end_to_end_fps.append(len(choice.scored) / (time.perf_counter() - started))
    height, width = cv2.VideoCapture(str(clip)).read()[1].shape[:2]
    return {"frames": len(frames), "frame_size": [width, height], "scored_size": list(frames[0].shape[1::-1]),
            "score_fps": float(np.median(score_fps)), "decode_and_score_fps": float(np.median(end_to_end_fps)),
            "chosen": choice.index, "chosen_score": choice.report.score,
            "gradable_frames": sum(q.report.gradable for q in choice.scored)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=90)
    parser.add_argument("--best", type=int, default=57)
    parser.add_argument("--threads", type=int, default=2, help="OpenCV threads (the scorer's cores)")
    parser.add_argument("--photo", type=Path, help="a real fundus photo to build the clip from")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    cv2.setNumThreads(args.threads)
    photo = cv2.imread(str(args.photo)) if args.photo else synthetic_photo(720)
    with tempfile.TemporaryDirectory() as tmp:
        clip = write_clip(Path(tmp) / "clip.mp4", photo, args.frames, args.best)
        result = measure(clip)
    features = cpu_features()
    result.update(best_expected=args.best, threads=args.threads, load_average=os.getloadavg(),
                  photo=args.photo.name if args.photo else "synthetic", cpu_int8=features.int8)
    lines = [f"# Best-frame selection, {result['frame_size'][0]}x{result['frame_size'][1]}, {args.threads} OpenCV threads",
             "", "| clip | frames | quality scorer frames/s | decode + score frames/s | chosen frame | expected | "
             "gradable frames |", "|---|---|---|---|---|---|---|",
             f"| {result['photo']} | {result['frames']} | {result['score_fps']:.1f} | {result['decode_and_score_fps']:.1f} | "
             f"{result['chosen']} | {args.best} | {result['gradable_frames']} |", "",
             f"Load average (1/5/15 min) {', '.join(f'{v:.1f}' for v in result['load_average'])}; target >= 30 frames/s."]
    markdown = "\n".join(lines) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(markdown)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    print(markdown)


if __name__ == "__main__":
    main()
