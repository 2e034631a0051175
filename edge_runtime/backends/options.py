"""Typed runtime options every backend takes, and the CPU's int8 features they are tuned for.

One frozen dataclass instead of untyped ``**options``: a misspelt or unsupported option is an error, never
silently dropped (the LiteRT backend used to ignore everything but ``threads``).
"""
from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

GRAPH_OPTIMIZATION_LEVELS = ("disabled", "basic", "extended", "all")
EXECUTION_MODES = ("sequential", "parallel")
COREML_COMPUTE_UNITS = ("ALL", "CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE")

# /proc/cpuinfo flags of instructions that multiply-accumulate int8 in one step (what makes INT8 beat FP32).
INT8_DOT_PRODUCT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")
# Wider vector flags worth recording beside them (the FP32 and non-VNNI int8 paths use these).
VECTOR_FLAGS = ("avx2", "avx512f", "avx512bw", "fma", "asimd", "sve")


@dataclass(frozen=True)
class RuntimeOptions:
    """How a backend runs an artifact on this device; recorded in ``SessionInfo.extra['options']``.

    Args:
        threads: intra-op threads (ONNX Runtime) or XNNPACK/interpreter threads (LiteRT); None = runtime default.
        graph_optimization: ONNX Runtime graph optimisation level, disabled | basic | extended | all.
        execution_mode: ONNX Runtime operator scheduling, sequential | parallel (parallel only helps branchy graphs).
        inter_op_threads: ONNX Runtime threads across operators (parallel mode only); None = runtime default.
        spin_wait: ONNX Runtime intra-op threads spin between operators: lower latency, busier idle cores.
        providers: ONNX Runtime execution providers in order of preference; None = CPU.
        allow_fallback: use the CPU provider when a requested provider is missing (recorded as a fallback).
        xnnpack: LiteRT applies its default XNNPACK delegate; False runs the built-in kernels only.
        compute_units: CoreML compute units, ALL | CPU_ONLY | CPU_AND_GPU | CPU_AND_NE.
    """

    threads: int | None = None
    graph_optimization: str = "all"
    execution_mode: str = "sequential"
    inter_op_threads: int | None = None
    spin_wait: bool = True
    providers: tuple[str, ...] | None = None
    allow_fallback: bool = False
    xnnpack: bool = True
    compute_units: str = "ALL"

    def __post_init__(self) -> None:
        for name in ("threads", "inter_op_threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"RuntimeOptions.{name} must be a positive int or None, got {value!r}")
        if self.graph_optimization not in GRAPH_OPTIMIZATION_LEVELS:
            raise ConfigError(f"RuntimeOptions.graph_optimization must be one of {GRAPH_OPTIMIZATION_LEVELS}, "
                              f"got {self.graph_optimization!r}")
        if self.execution_mode not in EXECUTION_MODES:
            raise ConfigError(f"RuntimeOptions.execution_mode must be one of {EXECUTION_MODES}, got {self.execution_mode!r}")
        if self.compute_units not in COREML_COMPUTE_UNITS:
            raise ConfigError(f"RuntimeOptions.compute_units must be one of {COREML_COMPUTE_UNITS}, "
                              f"got {self.compute_units!r}")
        if self.providers is not None:
            if isinstance(self.providers, str) or not self.providers:
                raise ConfigError(f"RuntimeOptions.providers must be a non-empty sequence of names, got {self.providers!r}")
            object.__setattr__(self, "providers", tuple(self.providers))


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """Instruction-set flags of this CPU from /proc/cpuinfo (x86 ``flags``, ARM ``Features``); empty elsewhere."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    if not flags and platform.system() == "Darwin" and platform.machine() == "arm64":
        flags.update({"asimd", "asimddp"})  # every Apple-silicon core has the ARMv8.2 dot product
    return flags


@dataclass(frozen=True)
class CpuFeatures:
    """What this CPU offers INT8 inference."""

    machine: str
    int8: tuple[str, ...]  # int8 dot-product instructions present, e.g. ("avx512_vnni", "amx_int8")
    vector: tuple[str, ...]

    @property
    def has_int8_dot_product(self) -> bool:
        return bool(self.int8)

    def to_dict(self) -> dict:
        return {"machine": self.machine, "int8": list(self.int8), "vector": list(self.vector),
                "int8_dot_product": self.has_int8_dot_product}


def cpu_features(cpuinfo: str | None = None, machine: str | None = None) -> CpuFeatures:
    flags = cpu_flags(cpuinfo)
    return CpuFeatures(machine or platform.machine(), tuple(f for f in INT8_DOT_PRODUCT_FLAGS if f in flags),
                       tuple(f for f in VECTOR_FLAGS if f in flags))


def int8_target(features: CpuFeatures | None = None) -> str:
    """The INT8 preset (``compression.quantize.QuantRecipe.for_target``) for a CPU: U8S8 where int8 dot products
    exist (VNNI/AMX, ARM dotprod), U8U8 on x86 without them (U8S8 saturates in ORT's AVX2 kernels)."""
    features = features or cpu_features()
    is_arm = features.machine.lower() in ("aarch64", "arm64") or "asimd" in features.vector
    if any(f in features.int8 for f in ("avx512_vnni", "avx_vnni", "amx_int8")):
        return "x86_vnni"
    if is_arm:
        return "arm64"
    return "x86_avx2"


DEFAULT_OPTIONS = RuntimeOptions()
