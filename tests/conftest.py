"""Shared fixtures: a tiny model trained on synthetic fundus data, its exported artifacts, real-data paths."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "eyepacs_full" / "labels.csv").is_file():
        pytest.skip("../shared/data is not beside this checkout (real fundus samples live there)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    from training.data.synthetic import write_synthetic_dataset

    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), n_per_grade=12, size=160, seed=3)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, synthetic_dir):
    """test_dr_tiny trained for a few epochs on synthetic data (seconds)."""
    from training.config import TrainConfig
    from training.train import fit

    out = tmp_path_factory.mktemp("tiny_run")
    cfg = TrainConfig(model="test_dr_tiny", data=(str(synthetic_dir),), pretrained=False, input_size=64, epochs=3,
                      batch_size=16, lr=3e-3, out=str(out), cache_dir=str(out / "cache"))
    return fit(cfg, progress=False)


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory, tiny_run, synthetic_dir):
    """ONNX fp32 + int8 and TFLite fp32 + fp16 + int8 of the tiny model, verified by the export pipeline."""
    from compression.gate import GateThresholds
    from exporters.pipeline import ExportPipeline, ExportPlan, export_all, load_inputs

    out = tmp_path_factory.mktemp("artifacts")
    # Loose gate so the tiny random-ish model's INT8 can be used by runtime tests; gate tests set their own.
    inputs = load_inputs(tiny_run.best_checkpoint, out, synthetic_dir, synthetic_dir,
                         thresholds=GateThresholds.profile("strict", min_referral_agreement=0.0,
                                                           min_sensitivity_difference=-1.0,
                                                           min_specificity_difference=-1.0, min_auc_ratio=0.0),
                         calib_limit=16, val_limit=24)
    pipeline = ExportPipeline(inputs, ExportPlan(("onnx", "tflite"), ("fp32", "fp16", "int8")))
    records = export_all(inputs, pipeline.plan, progress=False, pipeline=pipeline)
    return {(r.format, r.precision): r for r in records}, out, pipeline


@pytest.fixture
def fundus_bgr() -> np.ndarray:
    from training.data.synthetic import generate_fundus

    return generate_fundus(2, 256, np.random.default_rng(7)).image


def encode(image: np.ndarray, ext: str = ".jpg") -> bytes:
    import cv2

    ok, buf = cv2.imencode(ext, image)
    assert ok
    return buf.tobytes()


POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
SERVER_TABLES = ("audit_events", "insights", "model_artifacts", "encounters", "results", "principals", "alembic_version")


def postgres_available() -> bool:
    from sqlalchemy import create_engine, text

    from companion_api.core.config import Settings

    try:
        with create_engine(Settings(DATABASE_URL=POSTGRES_URL).DATABASE_URL).connect() as conn:
            conn.execute(text("SELECT 1"))
        return True
    except Exception:  # noqa: BLE001 - any failure means "not reachable here"
        return False


def reset_postgres() -> None:
    """Drop the server's tables in the shared `test` database so migrations start from scratch."""
    from sqlalchemy import create_engine, text

    from companion_api.core.config import Settings

    with create_engine(Settings(DATABASE_URL=POSTGRES_URL).DATABASE_URL).begin() as conn:
        for table in SERVER_TABLES:
            conn.execute(text(f"DROP TABLE IF EXISTS {table} CASCADE"))


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@pytest.fixture(autouse=True)
def _restore_root_logging():
    """CLI commands under test call ``logging.basicConfig(stream=sys.stderr, force=True)``; under pytest that
    stream is a capture file closed after the test, and a library logging at interpreter exit (JAX does) would
    then write to a closed file. Give the root logger back its handlers and level after every test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers, root.level = handlers, level


def database_at_revision(url: str, revision: str):
    """A database migrated to an old Alembic ``revision`` with device ``dev-a`` registered, for migration tests:
    returns (alembic config, engine); the test inserts its old rows, then ``command.upgrade(config, "head")``."""
    from datetime import datetime, timezone

    from alembic import command
    from alembic.config import Config
    from sqlalchemy import create_engine, text

    from companion_api.core.db import HERE

    config = Config()
    config.set_main_option("script_location", str(HERE / "alembic"))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))  # configparser interpolation
    command.upgrade(config, revision)
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO principals (name, role, token_hash, revoked, created_at) "
                          "VALUES ('dev-a', 'device', :h, false, :t)"), {"h": "0" * 64, "t": datetime.now(timezone.utc)})
    return config, engine
