"""Device fingerprint and a measured compute peak, so reports from different devices compare fairly."""
from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from edge_runtime.backends import cpu_features, int8_target


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def cpu_model() -> str:
    info = _read("/proc/cpuinfo") or ""
    for line in info.splitlines():
        if line.lower().startswith(("model name", "hardware", "cpu model")):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def fingerprint() -> dict:
    mem = _read("/proc/meminfo") or ""
    total_kb = next((int(line.split()[1]) for line in mem.splitlines() if line.startswith("MemTotal")), 0)
    flags = _read("/proc/cpuinfo") or ""
    features = cpu_features(flags)
    versions = {}
    for module in ("onnxruntime", "ai_edge_litert", "numpy", "cv2", "torch"):
        try:
            versions[module] = __import__(module).__version__ if module != "ai_edge_litert" else _litert_version()
        except Exception:  # noqa: BLE001 - absent runtimes are simply not listed
            continue
    providers = []
    try:
        import onnxruntime

        providers = onnxruntime.get_available_providers()
    except ImportError:
        pass
    return {
        "hostname_hash": abs(hash(platform.node())) % 10**8,  # distinguishes devices without naming them
        "cpu": cpu_model(), "cores": os.cpu_count(), "ram_gb": round(total_kb / 1e6, 1),
        "os": f"{platform.system()} {platform.release()}", "machine": platform.machine(),
        "python": sys.version.split()[0], "runtimes": versions, "onnxruntime_providers": providers,
        "cpu_governor": _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"),
        "avx2": " avx2" in flags, "avx512_vnni": "avx512_vnni" in flags or "avx_vnni" in flags,
        # int8 dot-product instructions (VNNI, AMX, ARM dotprod/i8mm): where INT8 can beat FP32.
        "cpu_int8": features.to_dict(), "int8_target": int8_target(features),
    }


def _litert_version() -> str:
    from importlib.metadata import version

    return version("ai-edge-litert")


def peak_gmacs(threads: int | None = None, size: int = 1024, repeats: int = 5) -> dict:
    """Measured FP32 GEMM peak (GMAC/s) through ONNX Runtime (and numpy), the roofline's denominator."""
    peaks = {}
    a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)

    def best_rate(fn) -> float:
        # Fastest of several runs: a peak is what the device *can* do, not what it did while busy.
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return size ** 3 / min(times) / 1e9

    peaks["numpy"] = best_rate(lambda: a @ a)
    try:
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper

        graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm",
                                  [helper.make_tensor_value_info(n, TensorProto.FLOAT, [size, size]) for n in "ab"],
                                  [helper.make_tensor_value_info("c", TensorProto.FLOAT, [size, size])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        peaks["onnxruntime"] = best_rate(lambda: session.run(None, {"a": a, "b": a}))
        del onnx
    except ImportError:
        pass
    return {k: round(v, 2) for k, v in peaks.items()}
