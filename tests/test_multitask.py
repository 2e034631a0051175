"""One student on several sources with partial labels: coarse and missing grades, per-folder sampling and referral
points, and consistency under the fidelity gate's nuisance model. Tiny models, synthetic photos."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edge_runtime.contract import PreprocessPolicy
from edge_runtime.errors import ConfigError
from edge_runtime.metrics import is_referable
from edge_runtime.nuisance import NuisanceModel, to_rgb8
from edge_runtime.preprocess import normalize
from training.config import TrainConfig
from training.consistency import NuisanceConsistency, ReferralCentre, referable_log_odds
from training.data.layouts import (
    MISSING,
    Sample,
    allowed_grade_mask,
    read_partial_samples,
    source_draw_weights,
)
from training.data.synthetic import write_synthetic_dataset
from training.errors import DatasetError
from training.referral import choose_folder_weighted_point, folder_weights
from training.train import labelled_loss, marginal_grade_loss


def as_coarse_source(folder: Path) -> Path:
    """Rewrite a synthetic labels.csv the way mexico_dme publishes its labels: a ``dme`` label on every photo, the
    grade kept only where ``dr_label`` fixes it (0 -> 0, 4 -> PDR), grades 1-3 reduced to NPDR or unknown."""
    rows = list(csv.DictReader(open(folder / "labels.csv", newline="")))
    with open(folder / "labels.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image", "grade", "patient", "eye", "dme", "dr_label", "split"])
        writer.writeheader()
        for i, row in enumerate(rows):
            grade = int(row["grade"])
            if grade == 0 or grade == 4:
                dr_label, kept = ("0", "0") if grade == 0 else ("PDR", "4")
            else:
                dr_label, kept = ("NPDR", "") if i % 3 else ("-", "")
            if grade == 0 and i % 4 == 1:
                dr_label, kept = "-", ""  # an unknown photo of a healthy eye: must not be read as grade 0
            writer.writerow({"image": row["image"], "grade": kept, "patient": row["patient"], "eye": "left",
                             "dme": str(int(grade >= 3)), "dr_label": dr_label, "split": row["split"]})
    return folder


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("multitask")
    graded = write_synthetic_dataset(root / "graded", n_per_grade=8, size=96, seed=1)
    coarse = as_coarse_source(write_synthetic_dataset(root / "coarse", n_per_grade=8, size=96, seed=2))
    return Path(graded), Path(coarse)


# ---------------------------------------------------------------- reading partial labels
def test_blank_grades_stay_missing_and_npdr_becomes_a_coarse_set(sources):
    _, coarse = sources
    samples = read_partial_samples(coarse)
    rows = {r["image"]: r for r in csv.DictReader(open(coarse / "labels.csv"))}
    for s in samples:
        row = rows[s.path.name]
        if row["dr_label"] == "NPDR":
            assert s.grade == MISSING and s.allowed_grades == (1, 2, 3)
        elif row["dr_label"] == "-":
            assert s.grade == MISSING and s.allowed_grades is None  # blank is unknown, never grade 0
        else:
            assert s.grade == int(row["grade"]) and s.allowed_grades is None
    mask = allowed_grade_mask(samples)
    assert mask.sum(1).tolist() == [1 if s.grade != MISSING else (3 if s.allowed_grades else 0) for s in samples]
    assert len(samples) == len(rows)


def test_a_fully_graded_folder_reads_as_before(sources):
    from training.data.layouts import read_dataset

    graded, _ = sources
    assert read_partial_samples(graded) == read_dataset(graded)


def test_a_grade_that_contradicts_its_coarse_label_is_refused(tmp_path):
    folder = write_synthetic_dataset(tmp_path / "bad", n_per_grade=2, size=64, seed=0)
    rows = list(csv.DictReader(open(folder / "labels.csv")))
    with open(folder / "labels.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[*rows[0], "dr_label"])
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "dr_label": "PDR" if row["grade"] == "0" else "-"})
    with pytest.raises(DatasetError, match="contradicting the grade"):
        read_partial_samples(folder)


# ---------------------------------------------------------------- the marginal grade loss
def test_marginal_loss_is_the_mass_on_the_allowed_grades_and_masks_the_unknown():
    torch.manual_seed(0)
    logits = torch.randn(5, 5, requires_grad=True)
    allowed = torch.zeros(5, 5, dtype=torch.bool)
    allowed[0, 2] = True  # an exact grade
    allowed[1, [1, 2, 3]] = True  # NPDR
    allowed[2, 4] = True
    allowed[4] = True  # every grade allowed: nothing to learn
    # row 3: nothing known
    loss = marginal_grade_loss(logits, allowed, None)
    p = F.softmax(logits, 1)
    expected = -(p[0, 2].log() + p[1, 1:4].sum().log() + p[2, 4].log()) / 3
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert torch.count_nonzero(logits.grad[3]) == 0 and torch.count_nonzero(logits.grad[4]) == 0


def test_marginal_loss_equals_the_cross_entropy_on_exact_grades():
    torch.manual_seed(1)
    logits, y = torch.randn(12, 5), torch.randint(0, 5, (12,))
    y[3] = MISSING
    weight = torch.tensor([0.5, 2.0, 1.0, 3.0, 1.5])
    allowed = torch.zeros(12, 5, dtype=torch.bool)
    allowed[torch.arange(12)[y != MISSING], y[y != MISSING]] = True
    for kwargs in ({}, {"label_smoothing": 0.1}, {"focal_gamma": 2.0}):
        plain = labelled_loss(logits, y, weight, **kwargs)
        assert labelled_loss(logits, y, weight, allowed=allowed, **kwargs).item() == pytest.approx(plain.item(),
                                                                                                  rel=1e-5)
    nothing = marginal_grade_loss(logits[:4], torch.zeros(4, 5, dtype=torch.bool), weight)
    assert nothing.item() == 0.0


def test_a_coarse_row_takes_the_mean_class_weight_of_its_grades():
    logits = torch.zeros(2, 5)
    allowed = torch.zeros(2, 5, dtype=torch.bool)
    allowed[0, 0] = True
    allowed[1, [1, 2, 3]] = True
    weight = torch.tensor([1.0, 3.0, 3.0, 3.0, 1.0])
    # uniform p: row 0 nll = log 5 (weight 1), row 1 nll = log(5/3) (weight 3)
    expected = (np.log(5) + 3 * np.log(5 / 3)) / 4
    assert marginal_grade_loss(logits, allowed, weight).item() == pytest.approx(expected, rel=1e-6)


def test_reports_leave_photos_without_a_grade_out_of_the_grade_figures():
    from edge_runtime.contract import OperatingPoint
    from training.metrics import report_at

    rng = np.random.default_rng(0)
    y = np.array([0, 1, 2, MISSING, 4, 0, 3, MISSING, 2, 0])
    logits = rng.normal(size=(10, 5))
    dme = np.array([0, 1, MISSING, 1, 0, 0, 1, 0, MISSING, 1])
    partial = report_at(OperatingPoint(), y, logits, auc_ci=False, dme_labels=dme, dme_logits=rng.normal(size=10))
    graded = y != MISSING
    assert partial["n"] == graded.sum() and partial["n_without_grade"] == 2
    assert np.asarray(partial["confusion_matrix"]).sum() == graded.sum()
    assert partial["dme"]["n"] == 8 and partial["referred"] <= 10
    alone = report_at(OperatingPoint(), y[graded], logits[graded], auc_ci=False)
    assert partial["qwk"] == alone["qwk"] and partial["referable_auc"] == alone["referable_auc"]


# ---------------------------------------------------------------- sampling weights per source
def test_source_weights_give_each_folder_its_share_of_the_draws():
    samples = ([Sample(Path(f"a{i}.png"), 0, "p", "train", source="/d/big") for i in range(90)]
               + [Sample(Path(f"b{i}.png"), 0, "p", "train", source="/d/small") for i in range(10)])
    draw = source_draw_weights(samples, {"big": 1.0, "small": 1.0})
    assert draw[:90].sum() == pytest.approx(0.5) and draw[90:].sum() == pytest.approx(0.5)
    draw = source_draw_weights(samples, {"big": 3.0, "small": 1.0})
    assert draw[:90].sum() == pytest.approx(0.75)
    extra = samples + [Sample(Path("u.png"), MISSING, "u", None, source="")]
    draw = source_draw_weights(extra, {"big": 1.0, "small": 1.0})
    assert draw[-1] == pytest.approx(1 / 101) and draw.sum() == pytest.approx(1.0)


def test_config_refuses_weights_for_folders_it_does_not_train_on(sources):
    graded, coarse = (str(p) for p in sources)
    with pytest.raises(ConfigError, match="did you mean 'coarse'"):
        TrainConfig(data=(graded, coarse), source_weights={"graded": 1, "corse": 1})
    with pytest.raises(ConfigError, match="missing"):
        TrainConfig(data=(graded, coarse), source_weights={"graded": 1})
    with pytest.raises(ConfigError, match="> 0"):
        TrainConfig(data=(graded, coarse), source_weights={"graded": 1, "coarse": 0})
    with pytest.raises(ConfigError, match="referral_weighting"):
        TrainConfig(data=(graded,), referral_weighting="folder")
    with pytest.raises(ConfigError, match="consistency_target"):
        TrainConfig(consistency_weight=1.0, consistency_target="grades")
    assert TrainConfig(data=(graded, coarse), source_weights={"graded": 2, "coarse": 1}).source_weights["graded"] == 2.0


# ---------------------------------------------------------------- the folder-weighted referral point
def test_each_camera_counts_the_same_when_the_point_is_chosen():
    rng = np.random.default_rng(0)
    # A large folder the model separates well and a small one where referable photos score lower.
    big_y = np.r_[np.zeros(400, int), np.full(100, 2)]
    small_y = np.r_[np.zeros(40, int), np.full(20, 3)]
    big_score = np.r_[rng.normal(-2, 1, 400), rng.normal(2, 1, 100)]
    small_score = np.r_[rng.normal(-2, 1, 40), rng.normal(0, 1, 20)]
    y = np.r_[big_y, small_y]
    logits = np.zeros((len(y), 5))
    logits[:, 2] = np.r_[big_score, small_score]
    folders = np.array(["big"] * 500 + ["small"] * 60)
    from edge_runtime.calibration import choose_operating_point

    pooled = choose_operating_point(y, logits, rule="sensitivity", target=0.9)
    point, record = choose_folder_weighted_point(y, logits, folders, rule="sensitivity", target=0.9)
    assert set(record["folders"]) == {"big", "small"} and record["weighting"] == "per_folder"
    assert record["folder_mean_sensitivity"] >= 0.9
    assert record["folders"]["small"]["n_positive"] == 20 and record["folders"]["big"]["n_positive"] == 100
    # The pooled point leaves the small camera behind: its folder mean misses the target the weighted one meets.
    from edge_runtime.decision import decide_batch

    referred = decide_batch(logits, pooled).referable_probability >= pooled.threshold
    small = folders == "small"
    pooled_mean = np.mean([referred[~small & is_referable(y)].mean(), referred[small & is_referable(y)].mean()])
    assert pooled_mean < 0.9 <= record["folder_mean_sensitivity"]
    assert point.threshold < pooled.threshold and point.temperature == pooled.temperature


def test_folder_weights_sum_to_one_per_folder_and_side():
    positive = np.array([1, 1, 0, 0, 0, 1, 0], bool)
    folders = np.array(["a", "a", "a", "a", "a", "b", "b"])
    w = folder_weights(positive, folders)
    for f in "ab":
        for side in (True, False):
            rows = (folders == f) & (positive == side)
            assert w[rows].sum() == pytest.approx(1.0)


# ---------------------------------------------------------------- consistency under the nuisance model
def test_the_consistency_draw_is_the_gate_nuisance_model_itself():
    from compression.noise_floor import NuisanceModel as GateNuisance

    assert GateNuisance is NuisanceModel  # one implementation, imported by the gate and by training
    policy = PreprocessPolicy(input_size=48)
    rgb = np.random.default_rng(0).integers(0, 256, (3, 48, 48, 3), dtype=np.uint8)
    x = torch.from_numpy(normalize(rgb, policy))
    term = NuisanceConsistency(policy, weight=1.0, seed=7)
    moved = term.perturbed(x, np.array([4, 5, 6]), draw=2)
    expected = np.stack([NuisanceModel(seed=7).perturb(img, k, 2) for img, k in zip(rgb, [4, 5, 6], strict=True)])
    assert np.array_equal(to_rgb8(moved.numpy(), policy), expected)
    assert not np.array_equal(to_rgb8(term.perturbed(x, np.array([4, 5, 6]), draw=3).numpy(), policy), expected)


def test_consistency_loss_is_zero_for_equal_views_and_pulls_views_together():
    policy = PreprocessPolicy(input_size=48)
    torch.manual_seed(0)
    clean = torch.randn(6, 5)
    term = NuisanceConsistency(policy, weight=1.0, target="grade")
    assert term.loss(clean, clean.clone()).item() == pytest.approx(0.0, abs=1e-7)
    moved = (clean + 0.5 * torch.randn(6, 5)).requires_grad_(True)
    loss = term.loss(clean, moved)
    assert loss.item() > 0
    loss.backward()
    with torch.no_grad():
        closer = moved - 0.1 * moved.grad
    assert term.loss(clean, closer).item() < loss.item()
    dme = torch.randn(6)
    assert term.loss(clean, clean, dme, dme + 1).item() > 0  # the DME head's views are compared too
    referable_only = NuisanceConsistency(policy, weight=1.0, target="referable")
    swapped = clean[:, [1, 0, 3, 2, 4]]  # grades moved within each side of the referral line
    assert referable_only.loss(clean, swapped).item() == pytest.approx(0.0, abs=1e-6)


def test_the_margin_term_weighs_photos_near_the_threshold_more():
    policy = PreprocessPolicy(input_size=48)
    term = NuisanceConsistency(policy, weight=0.0, margin_weight=1.0)
    term.centre = ReferralCentre(threshold=0.5, temperature=1.0)
    near, far = torch.zeros(1, 5), torch.zeros(1, 5)
    near[0, :2] = np.log(1.5)  # P(referable) = 0.5: log-odds 0, on the threshold
    far[0, 2:] = 3.0  # far above it
    assert abs(referable_log_odds(near).item()) < 1e-6
    shift = torch.tensor([[0.0, 0.0, 0.3, 0.3, 0.3]])
    assert term.loss(near, near + shift).item() > 5 * term.loss(far, far + shift).item()


# ---------------------------------------------------------------- end to end on two sources
@pytest.fixture(scope="module")
def multitask_run(sources, tmp_path_factory):
    from training.train import fit

    root = tmp_path_factory.mktemp("multitask_run")
    graded, coarse = (str(p) for p in sources)
    cfg = TrainConfig(model="test_dr_tiny", data=(graded, coarse), pretrained=False, input_size=48, epochs=2,
                      batch_size=16, lr=3e-3, heads=("grade", "dme"), referral_weighting="per_folder",
                      source_weights={"graded": 1.0, "coarse": 1.0}, consistency_weight=1.0,
                      consistency_margin_weight=0.5, dme_rule="youden", out=str(root / "run"),
                      cache_dir=str(root / "cache"))
    return fit(cfg, progress=False)


def test_a_multitask_run_trains_on_both_sources_and_says_which_photos_chose_its_point(multitask_run, sources):
    from training.models import load_checkpoint

    model, meta = load_checkpoint(multitask_run.best_checkpoint)
    assert model.has_dme
    photos = meta.referral_point_photos
    assert photos["weighting"] == "per_folder" and set(photos["folders"]) == {"graded", "coarse"}
    assert photos["val_fingerprint"] == meta.operating_point.val_fingerprint
    coarse_val = [s for s in read_partial_samples(sources[1]) if s.split == "val"]
    assert photos["folders"]["coarse"]["n_positive"] + photos["folders"]["coarse"]["n_negative"] == sum(
        s.grade != MISSING for s in coarse_val)
    val = multitask_run.metrics["val"]
    assert val["n_without_grade"] == sum(s.grade == MISSING for s in coarse_val)
    # DME is judged on every val photo with a DME label, graded or not.
    graded_val = [s for s in read_partial_samples(sources[0]) if s.split == "val"]
    assert val["dme"]["n"] == len(coarse_val) and val["dme"]["n_missing"] == len(graded_val)
    assert all(np.isfinite(h["train_loss"]) for h in multitask_run.metrics["history"])


def test_evaluate_reads_a_folder_with_partial_grades(multitask_run, sources, tmp_path):
    from training.evaluate import evaluate

    metrics = evaluate(multitask_run.best_checkpoint, sources[1], "test", cache_dir=str(tmp_path))
    test = [s for s in read_partial_samples(sources[1]) if s.split == "test"]
    assert metrics["n"] == sum(s.grade != MISSING for s in test) and metrics["dme"]["n"] == len(test)
    assert metrics["n_without_grade"] == sum(s.grade == MISSING for s in test) > 0


def test_the_study_compares_two_arms_per_folder_with_paired_ratios_and_noise_floors(multitask_run, sources,
                                                                                      tmp_path):
    import shutil

    from edge_runtime.nuisance import NuisanceModel
    from studies.multitask_study import compare, markdown
    from training.train import fit

    graded, coarse = sources
    out = tmp_path / "study"
    baseline = fit(TrainConfig(model="test_dr_tiny", data=(str(graded),), pretrained=False, input_size=48, epochs=1,
                               batch_size=16, out=str(out / "baseline"), cache_dir=str(tmp_path / "cache")),
                   progress=False)
    assert baseline.best_checkpoint.is_file()
    shutil.copytree(multitask_run.out_dir, out / "multitask")
    report = compare(out, graded.parent, str(tmp_path / "cache"), test_folders=("graded", "coarse"),
                     floor_folders=("graded", "coarse"), nuisance=NuisanceModel(draws=2))
    referable = report["folders"]["graded"]["referable"]
    assert referable["auc_ratio"] == pytest.approx(referable["auc"] / referable["baseline_auc"])
    low, high = referable["auc_ratio_ci"]
    assert low <= referable["auc_ratio"] <= high and referable["auc_ratio_lower_bound"] >= low
    # The baseline has no DME head: the multi-task DME AUC stands alone, pooled over the labelled test photos.
    assert "auc_ratio" not in report["folders"]["coarse"]["dme"]
    assert report["pooled_dme"]["n"] == sum(s.split == "test" for s in read_partial_samples(coarse))
    for arm in ("baseline", "multitask"):
        floor = report["arms"][arm]["noise_floor"]
        assert floor["folders"] == ["coarse", "graded"] and floor["draws"] == 2
        assert 0 <= floor["referral"]["d0"] <= 0.5 and floor["referral"]["d0_ci"][0] <= floor["referral"]["d0"]
    baseline_floor = report["arms"]["baseline"]["noise_floor"]
    assert baseline_floor["dr_referral"]["d0"] == baseline_floor["referral"]["d0"]  # no DME head: one decision
    assert "| graded | referable |" in markdown(report) and (out / "study.md").is_file()
