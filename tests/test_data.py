import csv

import cv2
import numpy as np
import pytest

from training.data.layouts import assign_splits, detect_layout, fingerprint, read_dataset
from training.data.synthetic import generate_fundus, synthetic_batch
from training.errors import DatasetError


def _img(path, grade=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), generate_fundus(grade, 64, np.random.default_rng(grade)).image)


def test_generic_labels_csv(synthetic_dir):
    samples = read_dataset(synthetic_dir)
    assert detect_layout(synthetic_dir) == "labels_csv" and len(samples) == 60
    assert {s.split for s in samples} == {"train", "val", "calib", "test"}


def test_aptos_layout(tmp_path):
    for i in range(4):
        _img(tmp_path / "train_images" / f"id{i}.png", i)
    (tmp_path / "train.csv").write_text("id_code,diagnosis\n" + "".join(f"id{i},{i}\n" for i in range(4)))
    assert detect_layout(tmp_path) == "aptos"
    assert [s.grade for s in read_dataset(tmp_path)] == [0, 1, 2, 3]


def test_eyepacs_layout_pairs_eyes_by_patient(tmp_path):
    rows = []
    for p in range(20):
        for eye in ("left", "right"):
            _img(tmp_path / "train" / f"{p}_{eye}.jpeg", p % 5)
            rows.append(f"{p}_{eye},{p % 5}\n")
    (tmp_path / "trainLabels.csv").write_text("image,level\n" + "".join(rows))
    samples = assign_splits(read_dataset(tmp_path), seed=1)
    by_patient = {}
    for s in samples:
        by_patient.setdefault(s.patient, set()).add(s.split)
    assert all(len(splits) == 1 for splits in by_patient.values())  # both eyes share a split
    assert {"train", "test"} <= {s.split for s in samples}


def test_idrid_and_folder_layouts(tmp_path):
    idrid = tmp_path / "idrid"
    _img(idrid / "images" / "IDRiD_001.jpg", 3)
    (idrid / "labels.csv.txt").write_text("")
    with open(idrid / "IDRiD_Disease Grading_Training Labels.csv", "w") as fh:
        fh.write("Image name,Retinopathy grade,Risk of macular edema \nIDRiD_001,3,1\n")
    assert detect_layout(idrid) == "idrid" and read_dataset(idrid)[0].grade == 3
    folders = tmp_path / "folders"
    _img(folders / "0" / "a.png", 0)
    _img(folders / "4" / "b.png", 4)
    assert detect_layout(folders) == "folders" and sorted(s.grade for s in read_dataset(folders)) == [0, 4]


def test_bad_rows_listed_in_one_error(tmp_path):
    _img(tmp_path / "images" / "ok.png")
    with open(tmp_path / "labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerows([["image", "grade"], ["ok.png", 0], ["missing1.png", 1], ["missing2.png", 1], ["ok.png", 7]])
    with pytest.raises(DatasetError) as err:
        read_dataset(tmp_path)
    assert "missing1.png" in str(err.value) and "missing2.png" in str(err.value) and "'7'" in str(err.value)


def test_unknown_layout(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset layout"):
        detect_layout(tmp_path)


def test_fingerprint_is_stable_and_sensitive(synthetic_dir):
    samples = read_dataset(synthetic_dir)
    assert fingerprint(samples) == fingerprint(list(reversed(samples)))
    assert fingerprint(samples) != fingerprint(samples[1:])


def test_synthetic_is_seeded_and_grade_dependent():
    a, ga = synthetic_batch(10, 96, seed=5)
    b, gb = synthetic_batch(10, 96, seed=5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True)) and np.array_equal(ga, gb)
    lesions = [len(generate_fundus(g, 128, np.random.default_rng(0)).lesion_boxes) for g in range(5)]
    assert lesions[0] == 0 and lesions[1] < lesions[2] < lesions[3]


def test_synthetic_data_is_learnable(tmp_path):
    """A tiny model reaches QWK >= 0.8 on held-out synthetic images within about a minute on CPU."""
    from training.config import TrainConfig
    from training.train import fit

    cfg = TrainConfig(model="test_dr_tiny", pretrained=False, synthetic_per_grade=80, synthetic_size=192, input_size=96,
                      epochs=20, patience=20, batch_size=16, lr=4e-3, out=str(tmp_path / "run"),
                      cache_dir=str(tmp_path / "cache"))
    result = fit(cfg, progress=False)
    assert result.metrics["test"]["qwk"] >= 0.8, result.metrics["test"]
