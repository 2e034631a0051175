import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from .conftest import ROOT


def test_bench_report_rows_and_failed_artifact(tiny_artifacts, tiny_run, synthetic_dir, tmp_path):
    import torch

    from benchmarks.runner import BenchConfig, run_benchmark
    from edge_runtime.contract import ArtifactManifest, manifest_path_for
    from training.checkpoint import CheckpointMeta
    from training.data.layouts import assign_splits, read_dataset, select

    _, art_dir, _ = tiny_artifacts
    broken = art_dir / "broken_fp32.onnx"
    broken.write_bytes(b"not onnx")
    (art_dir / "broken_fp32.onnx.manifest.json").write_text(
        (art_dir / next(p.name for p in art_dir.glob("*_fp32.onnx.manifest.json") if "broken" not in p.name)).read_text())
    cfg = BenchConfig(runs=5, min_seconds=0.05, warmup=1, batch_sizes=(1, 2), eval_limit=10, split="test")
    report = run_benchmark(art_dir, tmp_path / "bench", synthetic_dir, None, [tiny_run.best_checkpoint], cfg, progress=False)
    rows = {r["name"]: r for r in report["rows"]}
    trained_point = CheckpointMeta.from_dict(torch.load(tiny_run.best_checkpoint, weights_only=False)["meta"]).operating_point
    assert trained_point.rule == "sensitivity"
    n_eval = len(select(assign_splits(read_dataset(synthetic_dir)), "test")[:10])
    assert rows["broken_fp32.onnx"]["status"] == "failed" and rows["broken_fp32.onnx"]["error"]
    ok = [r for r in report["rows"] if r["status"] == "ok"]
    assert {r["format"] for r in ok} == {"torch", "onnx", "tflite"}
    for r in ok:
        assert set(r["latency_ms"]) >= {"p50", "p90", "p99", "mean", "std"} and r["latency_ms"]["n"] >= 5
        assert r["size_mb"] > 0 and r["fps_batch1"] > 0 and "qwk" in r and r["roofline_pct"] > 0
        assert r["rss_added_mb"] is not None and r["peak_rss_mb"] > 0
        # Torch decides at the point training chose on val; each artifact at its own, chosen on its own outputs.
        point = trained_point if r["format"] == "torch" else ArtifactManifest.from_json(
            manifest_path_for(art_dir / r["name"]).read_text()).operating_point
        assert point.rule == "sensitivity" and r["threshold"] == point.threshold and r["n_eval"] == n_eval
    onnx_fp32 = next(r for r in ok if r["format"] == "onnx" and r["precision"] == "fp32")
    # ONNX FP32 decides every photo as the PyTorch model does: agreement 1 and the exact one-sided CP bound for 10/10.
    assert onnx_fp32["agreement_fp32"] == 1.0 and onnx_fp32["referral_agreement_fp32"] == 1.0
    assert onnx_fp32["referral_agreement_lower"] == pytest.approx(0.05 ** (1 / n_eval))
    assert onnx_fp32["fps_best"] >= onnx_fp32["fps_batch1"] * 0.5
    for name in ("report.json", "report.md", "report.html", "latency_vs_qwk.png", "latency_distribution.png"):
        assert (tmp_path / "bench" / name).is_file()
    assert report["device"]["cores"] >= 1 and report["peak_gmacs"]["numpy"] > 0
    assert "| artifact |" in (tmp_path / "bench" / "report.md").read_text()
    broken.unlink()
    (art_dir / "broken_fp32.onnx.manifest.json").unlink()


def test_roofline_of_known_numbers():
    from benchmarks.runner import roofline

    # 2 GMAC in 10 ms is 200 GMAC/s, half of a 400 GMAC/s peak.
    assert roofline(2_000_000_000, 10.0, 400.0) == pytest.approx((200.0, 50.0))


def test_bench_compare_merges_devices(tmp_path):
    report = {"device": {"cpu": "cpu A", "cores": 2}, "rows": [
        {"name": "m.onnx", "status": "ok", "latency_ms": {"p50": 5.0, "p90": 6.0}, "fps_batch1": 200.0, "qwk": 0.8}]}
    other = json.loads(json.dumps(report))
    other["device"]["cpu"] = "cpu B"
    paths = []
    for i, r in enumerate((report, other)):
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(json.dumps(r))
    proc = subprocess.run([sys.executable, "-m", "retinaedge.cli", "bench", "compare", *map(str, paths), "--out",
                           str(tmp_path / "cmp")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "cpu A" in proc.stdout and "cpu B" in proc.stdout and (tmp_path / "cmp" / "compare.png").is_file()


def test_ratio_lines_compare_against_the_largest_torch_model():
    from benchmarks.report import ratio_lines

    def row(name, fmt, size, p50):
        return {"name": name, "format": fmt, "status": "ok", "size_mb": size, "latency_ms": {"p50": p50}}

    lines = ratio_lines([row("student torch", "torch", 14.0, 20.0), row("teacher torch", "torch", 70.0, 140.0),
                         row("student int8", "onnx", 3.5, 2.0)])
    assert "teacher torch" in lines[0]
    assert "- student int8: 70.0x faster, 20.0x smaller" in lines


def test_training_study_scores_every_run_on_the_same_test_photos(tiny_run, synthetic_dir, tmp_path):
    from studies.training_study import main

    main([str(tiny_run.out_dir), "--data", str(synthetic_dir), "--cache-dir", str(tmp_path / "c"),
          "--baseline", tiny_run.out_dir.name, "--out", str(tmp_path / "study")])
    data = json.loads((tmp_path / "study.json").read_text())
    (row,) = data["rows"]
    assert row["model"] == "test_dr_tiny" and row["init"] == "random" and row["heads"] == ["grade"]
    assert row["test"]["n"] == len([1 for line in (synthetic_dir / "labels.csv").read_text().splitlines()
                                     if line.endswith(",test")])
    low, high = row["test"]["qwk_ci"]
    assert low <= high
    assert len(row["test"]["referable_probability"]) == row["test"]["n"]
    ratio = row["auc_ratio_vs_baseline"]  # against itself (the interval itself: test_stats, at a usable n)
    assert (ratio["estimate"], ratio["n"], ratio["baseline"]) == (1.0, row["test"]["n"], tiny_run.out_dir.name)
    table = (tmp_path / "study.md").read_text()
    assert f"| {tiny_run.out_dir.name} | test_dr_tiny @64 | random | grade | - | off | 3 |" in table
    with pytest.raises(SystemExit):  # a folder that is not a finished run is refused by name
        main([str(tmp_path), "--data", str(synthetic_dir)])
    with pytest.raises(SystemExit, match="not one of the runs"):
        main([str(tiny_run.out_dir), "--data", str(synthetic_dir), "--cache-dir", str(tmp_path / "c"),
              "--baseline", "no_such_run", "--out", str(tmp_path / "study2")])


def test_training_study_scores_an_ensemble_of_runs_as_one_model(tiny_run, synthetic_dir, tmp_path):
    """An ensemble row is the mean of the members' calibrated logits at a point chosen on val: a run ensembled
    with itself is that run, up to the re-fitted temperature (which cannot reorder photos)."""
    from studies.training_study import main

    run = str(tiny_run.out_dir)
    main([run, "--data", str(synthetic_dir), "--cache-dir", str(tmp_path / "c"), "--ensemble", f"twice={run},{run}",
          "--baseline", tiny_run.out_dir.name, "--out", str(tmp_path / "study")])
    single, twice = json.loads((tmp_path / "study.json").read_text())["rows"]
    assert twice["run"] == "twice" and twice["model"] == "test_dr_tiny+test_dr_tiny" and twice["val_qwk"] is None
    assert twice["test"]["grades"] == single["test"]["grades"]
    np.testing.assert_allclose(twice["test"]["referable_probability"], single["test"]["referable_probability"],
                               atol=0.05)
    assert twice["test"]["referable_auc"] == pytest.approx(single["test"]["referable_auc"], abs=1e-6)
    assert twice["auc_ratio_vs_baseline"]["estimate"] == pytest.approx(1.0, abs=1e-6)
    assert "| twice | test_dr_tiny+test_dr_tiny @64/64 |" in (tmp_path / "study.md").read_text()
    with pytest.raises(SystemExit):  # an ensemble needs two or more finished runs
        main([run, "--data", str(synthetic_dir), "--ensemble", f"one={run}"])


def test_markdown_shows_an_undefined_metric_as_a_dash():
    from benchmarks.report import with_ci

    nan = float("nan")
    assert with_ci({"dme_auc": nan, "dme_auc_ci": (nan, nan)}, "dme_auc", 2) == "-"  # no DME labels in the folder
    assert with_ci({"dme_auc": 0.8, "dme_auc_ci": (0.7, 0.9)}, "dme_auc", 2) == "0.800 [0.70, 0.90]"


def test_int8_speed_table_has_one_ratio_row_per_input_size_and_format():
    from benchmarks.int8_speed import to_markdown

    options = {"threads": 2, "graph_optimization": "all", "execution_mode": "sequential", "spin_wait": False,
               "xnnpack": True}
    rows = [{"input_size": size, "format": "onnx", "precision": precision, "options": options,
             "p10": p50 * 0.9, "p50": p50, "p90": p50 * 1.2, "n": 50}
            for size, precision, p50 in ((224, "fp32", 6.0), (224, "int8", 2.0), (380, "fp32", 18.0),
                                         (380, "int8", 9.0))]
    report = {"rows": rows, "sweep": rows, "threads": 2, "target": "x86_vnni", "load_average": (0.1, 0.2, 0.3),
              "device": {"cpu": "test CPU", "cores": 2}, "cpu_features": {"int8": ["avx512_vnni"]}}
    text = to_markdown(report)
    assert "@224/380" in text
    assert "| 224 | onnx |" in text and "| 3.00x | avx512_vnni |" in text
    assert "| 380 | onnx |" in text and "| 2.00x | avx512_vnni |" in text


def test_int8_speed_builds_and_times_fp32_and_int8_of_one_model(synthetic_dir, tmp_path):
    """The benchmark's own export path (a checkpoint with a seeded random head, calibrated on real-layout photos),
    end to end on the tiny model: FP32 + INT8 ONNX, each timed, one INT8/FP32 row."""
    from benchmarks.int8_speed import _measure, artifacts_markdown, build_artifacts, time_artifacts
    from edge_runtime.backends import open_session

    artifacts = build_artifacts(tmp_path, synthetic_dir, "x86_vnni", formats=("onnx",), calib_limit=8, input_size=64,
                                model_name="test_dr_tiny", pretrained=False)
    assert set(artifacts) == {("onnx", "fp32"), ("onnx", "int8")}
    assert open_session(artifacts[("onnx", "int8")], allow_ungated=True).info.manifest.quantization.weight_type == "int8"
    assert build_artifacts(tmp_path, synthetic_dir, "x86_vnni", formats=("onnx",), input_size=64,
                           model_name="test_dr_tiny", pretrained=False) == artifacts  # cached, not re-exported
    sweep, rows = _measure(artifacts, threads=1, runs=20)
    assert {(r["format"], r["precision"]) for r in rows} == set(artifacts)
    assert all(r["p50"] > 0 and r["n"] == 20 for r in rows) and len(sweep) >= len(rows)
    # --artifact: the same files timed as given, interleaved, once per thread count, with the CPU's features.
    paths = [artifacts[("onnx", "fp32")], artifacts[("onnx", "int8")]]
    timed = time_artifacts(paths, threads=(1, 2), runs=20)
    assert [(r["artifact"], r["threads"]) for r in timed["rows"]] == [(p.name, n) for n in (1, 2) for p in paths]
    assert all(r["p50"] > 0 and r["n"] == 20 and r["size_mb"] > 0 for r in timed["rows"])
    text = artifacts_markdown(timed)
    assert "int8 features:" in text and f"| {paths[1].name} | 2 |" in text


def test_float_islands_gates_and_times_each_variant(tiny_run, synthetic_dir, tmp_path):
    """Full INT8 against every Conv kept in float, on the tiny trained model: each variant is exported, gated on
    the val photos at its own point and timed against FP32; the float-node count says what was kept."""
    from studies.float_islands import parse_variant, run, to_markdown

    variants = dict([parse_variant("full_int8="), parse_variant("convs=Conv")])
    report = run(tiny_run.best_checkpoint, [synthetic_dir], tmp_path, variants, "x86_vnni", threads=1, runs=10,
                 val_limit=40, calib_limit=8)
    rows = {r["variant"]: r for r in report["rows"]}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    full, convs = rows["full_int8"], rows["convs"]
    assert full["float_nodes"] < full["weighted_nodes"] and convs["float_nodes"] > full["float_nodes"]
    for r in rows.values():
        assert r["n"] > 0 and 0 <= r["clean_flips"] <= r["flips"] <= r["n"]
        assert r["agreement_bound"] <= r["referral_agreement"]
        assert r["verdict"] in ("passed", "failed", "insufficient_evidence") and r["p50_ms"] > 0 and r["speedup"] > 0
    text = to_markdown(report)
    assert "| convs | `Conv` |" in text and "input rounded to the INT8 grid" in text
    perturbed = report["fp32_perturbations"]
    assert [p["perturbation"] for p in perturbed][0] == "input rounded to the INT8 grid" and len(perturbed) == 5
    assert all(0 <= p["flips"] <= p["n"] and p["median_max_abs_logit_change"] >= 0 for p in perturbed)
    # a bigger sigma moves the logits more
    assert perturbed[-1]["median_max_abs_logit_change"] > perturbed[1]["median_max_abs_logit_change"]
    with pytest.raises(Exception, match="NAME=PATTERN"):
        parse_variant("no-equals-sign")


def test_qat_schedule_watches_the_fake_quantized_model_and_gates_the_one_it_watched(tiny_run, synthetic_dir, tmp_path):
    """A short cosine QAT schedule on the tiny model: the curve has a row per --eval-every steps plus the stripped
    model's, and the exported QAT artifact is the watched model (its referral flips at the checkpoint's point match
    the curve's last row), gated and timed beside post-training INT8."""
    from edge_runtime.backends import open_session
    from edge_runtime.decision import decide_batch
    from exporters.base import Reference
    from exporters.pipeline import load_inputs
    from studies.qat_schedule import run, to_markdown

    report = run(tiny_run.best_checkpoint, [synthetic_dir], tmp_path, steps=4, lr=1e-3, schedule="cosine",
                 margin_weight=1.0, batch_size=4, eval_every=2, tuning_limit=16, target="x86_vnni", threads=1, runs=10,
                 val_limit=40, calib_limit=8)
    assert [c["step"] for c in report["curve"]] == [0, 2, 4]
    assert all(0 <= c["flips"] <= c["n"] and c["median_max_abs_logit_change"] >= 0 for c in report["curve"])
    rows = {r["artifact"]: r for r in report["rows"]}
    assert set(rows) == {"post-training INT8 (ort)", "QAT, 4 steps"} and all(r["status"] == "ok" for r in rows.values())
    for r in rows.values():
        assert r["verdict"] in ("passed", "failed", "insufficient_evidence") and r["p50_ms"] > 0
        assert r["agreement_bound"] <= r["referral_agreement"] and 0 <= r["clean_flips"] <= r["flips"] <= r["n"]
    # QAT's activation quantizers are what ORT's integer convolutions take, as post-training INT8's are: one uint8
    # scale per tensor (NNCF's OpenVINO defaults, per-channel at depthwise inputs and int8 where signed, left 38 of
    # Lite0's 50 convolutions in float, 2.4x slower than FP32). The tiny model's SiLU keeps most of its own float.
    ptq, qat = rows["post-training INT8 (ort)"], rows["QAT, 4 steps"]
    assert ptq["integer_convs"] == ptq["convs"] > 0 and qat["integer_convs"] > 0
    activations = _activation_quantizers(onnx.load(qat["path"], load_external_data=False).graph)
    assert activations and all(size == 1 and dtype == np.uint8 for size, dtype in activations)
    # the exported artifact is the model the curve's last row ran: the same referrals at the checkpoint's point
    inputs = load_inputs(tiny_run.best_checkpoint, tmp_path / "check", [synthetic_dir], [synthetic_dir], val_limit=40,
                         tuning_limit=0)
    point = inputs.meta.operating_point
    exported = open_session(Path(rows["QAT, 4 steps"]["path"]), allow_ungated=True).run_heads(inputs.photos.val).logits
    reference = Reference.compute(inputs).logits
    flips = int((decide_batch(exported, point).referable != decide_batch(reference, point).referable).sum())
    assert abs(flips - report["curve"][-1]["flips"]) <= 1
    text = to_markdown(report)
    assert "| QAT, 4 steps |" in text and "| 4 |" in text and "(cosine)" in text


def _activation_quantizers(graph) -> list[tuple[int, np.dtype]]:
    """(scale size, zero-point dtype) of each QuantizeLinear on an activation (not on a stored tensor)."""
    from onnx import numpy_helper

    from exporters.onnx import _constants  # the stored tensors, through torch's Identity aliases

    stored, resolve = _constants(graph)

    def array(name: str) -> np.ndarray:
        return numpy_helper.to_array(stored[resolve(name)])

    return [(array(n.input[1]).size, array(n.input[2]).dtype)
            for n in graph.node if n.op_type == "QuantizeLinear" and resolve(n.input[0]) not in stored]


def test_float_islands_table_shows_criteria_the_photos_could_not_estimate_as_a_dash():
    from studies.float_islands import to_markdown

    row = {"variant": "full_int8", "keep_float": [], "status": "ok", "float_nodes": 0, "weighted_nodes": 50,
           "flips": 2, "clean_flips": 1, "n": 40, "referral_agreement": 0.95, "agreement_bound": 0.85,
           "sensitivity_bound": None, "specificity_bound": -0.01, "auc_ratio": None, "verdict": "insufficient_evidence",
           "p50_ms": 2.0, "speedup": 2.5}
    failed = {"variant": "stem", "keep_float": ["conv_stem"], "status": "failed", "error": "ValueError: x"}
    report = {"target": "x86_vnni", "checkpoint": "c.pt", "device": {"cpu": "test CPU"}, "threads": 2,
              "cpu_features": {"int8": ["avx512_vnni"]}, "load_average": (1.0, 1.0, 1.0), "data": ["d"],
              "fp32_p50_ms": 5.0, "rows": [row, failed], "fp32_perturbations": []}
    text = to_markdown(report)
    assert "| full_int8 | - | 0 / 50 | 2 (1) | 0.950 (0.850) | - | -0.010 | - | insufficient_evidence | 2.00 | 2.50x |" in text
    assert "| stem | `conv_stem` | export failed: ValueError: x |" in text
