"""One `retinaedge demo --quick` per test session, shared by test_demo.py and test_report_browser.py."""
from __future__ import annotations

import atexit
import functools
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .conftest import ROOT


@dataclass(frozen=True)
class DemoRun:
    out: Path
    returncode: int
    console: str  # stdout + stderr as the user sees them


@functools.cache
def quick_demo() -> DemoRun:
    folder = Path(tempfile.mkdtemp(prefix="retinaedge_demo_"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    out = folder / "demo"
    proc = subprocess.run([sys.executable, "-m", "retinaedge.cli", "demo", "--quick", "--out", str(out)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, timeout=900)
    return DemoRun(out, proc.returncode, proc.stdout)
