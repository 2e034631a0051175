"""Typed runtime options: validated, passed to every backend, recorded; CPU int8 features pick the INT8 preset."""
import pytest

from edge_runtime.backends import RuntimeOptions, cpu_features, int8_target, resolve_options
from edge_runtime.errors import ConfigError

VNNI_CPUINFO = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma avx512f avx512bw avx512_vnni amx_int8\n"
AVX2_CPUINFO = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n"
ARM_CPUINFO = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32 asimddp\n"


@pytest.mark.parametrize("bad", [dict(threads=0), dict(threads=True), dict(graph_optimization="max"),
                                 dict(execution_mode="async"), dict(providers="CPUExecutionProvider"),
                                 dict(compute_units="GPU")])
def test_invalid_options_are_config_errors(bad):
    with pytest.raises(ConfigError):
        RuntimeOptions(**bad)


def test_overrides_replace_fields_and_unknown_names_fail():
    options = resolve_options(RuntimeOptions(threads=4, execution_mode="parallel"), threads=2, providers=None)
    assert options == RuntimeOptions(threads=2, execution_mode="parallel")
    with pytest.raises(ConfigError, match="num_thread"):
        resolve_options(num_thread=2)


@pytest.mark.parametrize("cpuinfo, machine, int8, target", [
    (VNNI_CPUINFO, "x86_64", ("avx512_vnni", "amx_int8"), "x86_vnni"),
    (AVX2_CPUINFO, "x86_64", (), "x86_avx2"),
    (ARM_CPUINFO, "aarch64", ("asimddp",), "arm64"),
])
def test_cpu_int8_features_pick_the_preset(cpuinfo, machine, int8, target):
    features = cpu_features(cpuinfo, machine)
    assert features.int8 == int8 and features.has_int8_dot_product == bool(int8)
    assert int8_target(features) == target


def test_auto_target_is_this_cpus_preset():
    from compression.quantize import QuantRecipe

    assert QuantRecipe.for_target("auto").target == int8_target()


def test_backends_apply_and_record_options(tiny_artifacts):
    from edge_runtime.backends import open_session

    records = tiny_artifacts[0]
    onnx = open_session(records[("onnx", "fp32")].path, allow_ungated=True,
                        options=RuntimeOptions(threads=1, graph_optimization="basic", spin_wait=False))
    assert onnx.info.extra["options"]["graph_optimization"] == "basic"
    assert onnx.session.get_session_options().intra_op_num_threads == 1
    tflite = open_session(records[("tflite", "fp32")].path, allow_ungated=True, threads=2, xnnpack=False)
    assert tflite.info.extra["options"]["threads"] == 2 and tflite.info.provider.endswith("/builtin")
