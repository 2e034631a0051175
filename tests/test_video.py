"""Best-frame selection: a synthetic clip whose best frame is known (defocus ramp down to it and back up,
motion blur before it, over-exposure after it), bursts by eye, and one stored result per eye."""
import cv2
import numpy as np
import pytest

from benchmarks.video_speed import synthetic_photo, write_clip
from edge_runtime.errors import UnreadableImageError
from edge_runtime.outbox import Outbox
from edge_runtime.screen import Screener
from edge_runtime.video import (
    RETAKE,
    centre_square,
    choose_frame,
    eye_of,
    group_burst,
    screen_video,
    video_frames,
)

from .conftest import encode

FRAMES, BEST = 24, 15


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", synthetic_photo(480, seed=2), FRAMES, BEST,
                      frame_size=(640, 480))


@pytest.fixture(scope="module")
def blurred_clip(tmp_path_factory):
    photo = cv2.GaussianBlur(synthetic_photo(480, seed=3), (0, 0), 9)
    return write_clip(tmp_path_factory.mktemp("blurred") / "blurred.mp4", photo, 8, 4, frame_size=(640, 480))


def test_clip_decodes_every_frame_as_centre_squares(clip):
    frames = list(video_frames(clip))
    assert [i for i, _ in frames] == list(range(FRAMES))
    assert all(f.shape == (480, 480, 3) and f.dtype == np.uint8 for _, f in frames)
    assert [i for i, _ in video_frames(clip, stride=5)] == [0, 5, 10, 15, 20]


def test_best_frame_is_the_known_one(clip):
    choice = choose_frame(video_frames(clip))
    assert choice.index == BEST and choice.gradable
    assert len(choice.scored) == FRAMES
    far = [q for q in choice.scored if abs(q.index - BEST) >= FRAMES // 3]
    assert far and not any(q.report.gradable for q in far)  # the ramps' ends are ungradable


def test_stride_still_finds_a_frame_near_the_best(clip):
    assert abs(choose_frame(video_frames(clip, stride=3)).index - BEST) <= 3


def test_unreadable_video_is_a_typed_error(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all")
    with pytest.raises(UnreadableImageError):
        list(video_frames(bad))
    with pytest.raises(UnreadableImageError, match="not found"):
        list(video_frames(tmp_path / "missing.mp4"))


def test_centre_square_of_wide_frame():
    frame = np.zeros((720, 1280, 3), np.uint8)
    frame[:, 280:1000] = 7
    square = centre_square(frame)
    assert square.shape == (720, 720, 3) and (square == 7).all()


def test_eye_from_names_and_burst_groups(tmp_path):
    assert [eye_of(n) for n in ("p1_left_003.jpg", "OD-2.png", "burst_os_1.jpg", "frame_007.jpg")] == \
        ["left", "right", "left", None]
    paths = [tmp_path / n for n in ("a_left_1.jpg", "a_left_0.jpg", "a_right_0.jpg")]
    assert group_burst(paths) == {"left": [paths[1], paths[0]], "right": [paths[2]]}


def test_video_stores_one_result_with_frame_and_score(tiny_artifacts, clip, tmp_path):
    path = tiny_artifacts[0][("onnx", "fp32")].path
    box = Outbox(tmp_path / "o.db")
    screener = Screener.from_artifact(path, allow_ungated=True, outbox=box)
    screening, choice = screen_video(screener, clip, eye="left")
    result = screening.result
    assert result.image_name == f"clip.mp4#eye=left&frame={BEST}" and result.outcome != "ungradable"
    assert result.quality.score == choice.report.score and result.grade is not None
    assert box.counts()["pending"] == 1


def test_all_ungradable_clip_is_stored_as_retake(tiny_artifacts, blurred_clip, tmp_path):
    path = tiny_artifacts[0][("onnx", "fp32")].path
    box = Outbox(tmp_path / "o.db")
    screener = Screener.from_artifact(path, allow_ungated=True, outbox=box)
    screening, choice = screen_video(screener, blurred_clip)
    result = screening.result
    assert result.outcome == "ungradable" and result.grade is None and not choice.gradable
    assert result.quality.reasons[0].startswith(RETAKE) and len(result.quality.reasons) > 1
    assert box.get(result.result_id)[0].image_name == f"blurred.mp4#frame={choice.index}"


def test_watch_burst_grades_best_frame_per_eye_once(tiny_artifacts, tmp_path):
    from edge_runtime.watch import watch_bursts
    from training.data.synthetic import generate_fundus

    photo = generate_fundus(0, 384, np.random.default_rng(5)).image
    burst = tmp_path / "captures" / "visit1"
    burst.mkdir(parents=True)
    for i, sigma in enumerate((6, 0, 4)):  # frame 1 is the sharp one, for each eye
        frame = cv2.GaussianBlur(photo, (0, 0), sigma) if sigma else photo
        for eye in ("left", "right"):
            (burst / f"{eye}_{i:03d}.jpg").write_bytes(encode(frame))
    box = Outbox(tmp_path / "o.db")
    screener = Screener.from_artifact(tiny_artifacts[0][("onnx", "fp32")].path, allow_ungated=True, outbox=box)
    assert watch_bursts(tmp_path / "captures", screener, box, once=True) == 2
    assert watch_bursts(tmp_path / "captures", screener, box, once=True) == 0  # exactly once, across polls
    names = sorted(item.result.image_name for item in box.due())
    assert names == ["visit1#eye=left&frame=1", "visit1#eye=right&frame=1"]


def test_parallel_gate_decides_like_the_serial_one(tiny_artifacts, tmp_path):
    from training.data.synthetic import generate_fundus

    photo = generate_fundus(2, 384, np.random.default_rng(9)).image
    path = tiny_artifacts[0][("onnx", "fp32")].path
    serial = Screener.from_artifact(path, allow_ungated=True)
    parallel = Screener.from_artifact(path, allow_ungated=True, parallel_gate=True, outbox=Outbox(tmp_path / "o.db"))
    for image in (photo, cv2.GaussianBlur(photo, (0, 0), 8)):
        a, b = serial.screen_bytes(encode(image)).result, parallel.screen_bytes(encode(image)).result
        assert (a.outcome, a.grade, a.quality.reasons) == (b.outcome, b.grade, b.quality.reasons)
        assert "gate_wait" in b.latency_ms and "gate_wait" not in a.latency_ms  # inference ran beside the gate
    assert parallel.outbox.counts()["pending"] == 2
