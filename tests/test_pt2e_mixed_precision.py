"""PT2E mixed precision: modules kept in float between quantized ones, through litert-torch and coremltools, and
the "sensitive layers in float" retry of the TFLite and CoreML INT8 exports."""
from dataclasses import replace
from functools import cache
from pathlib import Path

import numpy as np
import torch

from compression.quantize import CAM_HEAD_MODULES, SENSITIVE_MODULES, QuantRecipe

SENSITIVE = SENSITIVE_MODULES + CAM_HEAD_MODULES


@cache
def _calibrated(float_modules: tuple[str, ...]):
    """test_dr_tiny (squeeze-excite in its later blocks) calibrated by PT2E, ``float_modules`` unannotated."""
    from compression.pt2e import pt2e_calibrate
    from training.models import ExportModule, create_model

    torch.manual_seed(0)
    module = ExportModule(create_model("test_dr_tiny").eval())
    calib = np.random.default_rng(0).standard_normal((4, 3, 64, 64)).astype(np.float32)
    return pt2e_calibrate(module, calib, float_modules=float_modules), calib


def _conv_weights(graph) -> dict[str, tuple[str, str]]:
    """Each conv of a converted PT2E graph: (module path, what feeds its weight: a dequantize or a float tensor)."""
    from compression.pt2e import CONV_OPS, module_source

    convs = {}
    for node in graph.graph.nodes:
        if node.op == "call_function" and str(node.target) in CONV_OPS:
            weight = node.args[1]
            while weight.op == "call_function" and "dequantize" not in str(weight.target) and weight.args:
                weight = weight.args[0]  # through the CAM head's unsqueezes
            convs[node.name] = (module_source(node)[0], "int8" if "dequantize" in str(weight.target) else "float")
    return convs


def test_excluded_modules_stay_float_and_the_rest_integer():
    from compression.pt2e import convert_prepared

    (prepared, _), _ = _calibrated(SENSITIVE)
    convs = _conv_weights(convert_prepared(prepared))
    floating = {path for path, kind in convs.values() if kind == "float"}
    # The stem, the head conv and the CAM head (run by the root ExportModule itself, module path "") stay float,
    # and so do the squeeze-excite convs; nothing else.
    named = {"model.backbone.conv_stem", "model.backbone.conv_head", ""}
    assert named <= floating and all(".se." in path + "." for path in floating - named)
    integer = [path for path, kind in convs.values() if kind == "int8"]
    assert integer and not any(p in path + "." for path in integer for p in ("conv_stem", "conv_head", ".se."))
    (everything, _), _ = _calibrated(())
    assert all(kind == "int8" for _, kind in _conv_weights(convert_prepared(everything)).values())


def test_mixed_graph_lowers_to_tflite_and_runs_like_its_torch_graph(tmp_path):
    import litert_torch
    from ai_edge_litert.interpreter import Interpreter
    from litert_torch.quantize.quant_config import QuantConfig

    from compression.pt2e import convert_prepared
    from exporters.tflite import float_io, integer_ops

    (prepared, quantizer), calib = _calibrated(SENSITIVE)
    graph = convert_prepared(prepared)
    path = tmp_path / "mixed.tflite"
    example = torch.from_numpy(calib[:1])
    litert_torch.convert(graph, (example,), quant_config=QuantConfig(pt2e_quantizer=quantizer)).export(str(path))
    float_io(path)
    counted = integer_ops(path)
    # The float convs of the torch graph keep float weights and inputs in the file; every other one is an integer kernel.
    floating = sum(kind == "float" for _, kind in _conv_weights(graph).values())
    assert len(counted["float_layers"]) == floating >= 3
    assert counted["integer_kernels"] == counted["convolutions"] - floating > 0
    interpreter = Interpreter(str(path))
    interpreter.allocate_tensors()
    (given,), outputs = interpreter.get_input_details(), interpreter.get_output_details()
    for i in range(len(calib)):
        interpreter.set_tensor(given["index"], calib[i:i + 1])
        interpreter.invoke()
        ran = {interpreter.get_tensor(o["index"]).shape: interpreter.get_tensor(o["index"]) for o in outputs}
        with torch.no_grad():
            expected = [t.numpy() for t in graph(torch.from_numpy(calib[i:i + 1]))]
        for tensor in expected:  # logits (1 x 5) and CAM (1 x 5 x h x w): distinct shapes
            # Same scales on both sides; kernels may round an int8 step differently.
            assert np.abs(ran[tensor.shape] - tensor).max() < 0.05 * max(1.0, np.abs(tensor).max())


def test_mixed_graph_converts_to_coreml():
    import coremltools as ct

    from compression.pt2e import convert_prepared
    from exporters.coreml import _weight_kinds

    (prepared, _), calib = _calibrated(SENSITIVE)
    graph = convert_prepared(prepared, fold_quantize=True)
    program = torch.export.export(graph, (torch.from_numpy(calib[:1]),)).run_decompositions({})
    model = ct.convert(program, inputs=[ct.TensorType(name="input", shape=(1, 3, 64, 64))], convert_to="mlprogram",
                       minimum_deployment_target=ct.target.iOS17)
    counted = _weight_kinds(model.get_spec())
    floating = sum(kind == "float" for _, kind in _conv_weights(graph).values())
    assert len(counted["float_layers"]) == floating >= 3 and counted["weighted_layers"] > floating


def test_pt2e_formats_escalate_through_sensitive_modules_then_qat():
    from compression.qat import QATConfig
    from exporters.formats import FORMATS
    from exporters.pipeline import ExportPlan

    for fmt, expected in (("onnx", ["sensitive_float", "accuracy_control", "qat"]),
                          ("tflite", ["sensitive_float", "qat"]), ("coreml", ["sensitive_float", "qat"])):
        assert [s.name for s in FORMATS[fmt].int8_escalation] == expected
    # Whatever ONNX recipe the plan names, TFLite and CoreML start from PT2E and keep torch modules in float.
    for asked in ("ort", "nncf", "nncf_ac"):
        plan = ExportPlan(("tflite", "coreml"), ("int8",), QuantRecipe(asked), qat=QATConfig(steps=3))
        for fmt in ("tflite", "coreml"):
            first, second = plan.escalation(fmt, has_tuning_images=True)
            retry = first.retry_recipe(FORMATS[fmt].int8_recipe(plan.recipe))
            assert retry.name == "pt2e" and retry.exclude == SENSITIVE
            assert FORMATS[fmt].int8_recipe(retry) == retry  # the exporter keeps the float modules
            assert second.name == "qat" and FORMATS[fmt].int8_recipe(second.retry_recipe(retry)).name == "pt2e_qat"
            assert FORMATS[fmt].int8_recipe(second.retry_recipe(retry)).exclude == ()
    # ONNX keeps its node-name patterns; asked for QAT, the PT2E formats have nothing left to retry.
    onnx_retry = ExportPlan(("onnx",), ("int8",), QuantRecipe("ort")).escalation("onnx", False)[0]
    assert "/se/" in onnx_retry.retry_recipe(QuantRecipe("ort")).exclude
    assert ExportPlan(("tflite",), ("int8",), QuantRecipe("qat"), qat=QATConfig(steps=3)).escalation("tflite", True) == []


def test_failed_tflite_gate_retries_with_sensitive_modules_in_float(tiny_artifacts, tmp_path):
    from compression.gate import GateThresholds
    from edge_runtime.backends import open_session
    from edge_runtime.contract import ArtifactManifest, manifest_path_for
    from exporters.formats import FORMATS
    from exporters.pipeline import ExportPipeline

    base = tiny_artifacts[2]
    # An impossible threshold forces the retry; without tuning photos the escalation stops before QAT.
    photos = replace(base.inputs.photos, tuning=base.inputs.photos.tuning[:0])
    inputs = replace(base.inputs, out_dir=tmp_path, photos=photos,
                     thresholds=GateThresholds.profile("strict", min_logit_cosine=1.0))
    pipeline = ExportPipeline(inputs, base.plan, base.reference)
    record = pipeline.export("tflite", "int8")
    assert record.status == "ok", record.error
    assert [(a.step, a.recipe) for a in record.attempts] == [("as asked", "ort"), ("sensitive layers in float", "pt2e")]
    assert any("logit_cosine" in f for f in record.attempts[1].gate.failures)
    quantization = ArtifactManifest.from_json(manifest_path_for(record.path).read_text()).quantization
    assert quantization.recipe == "pt2e" and "conv_stem" in quantization.notes
    # The standing file runs in the LiteRT backend like the torch graph it was converted from, and its counts,
    # read back from the file, are that graph's float convs.
    graph = pipeline.graphs.quantize(FORMATS["tflite"].int8_recipe(QuantRecipe("pt2e", exclude=SENSITIVE))).convert()
    assert len(pipeline.graphs) == 2  # that graph is the retry's: no third calibration
    floating = sum(kind == "float" for _, kind in _conv_weights(graph).values())
    assert len(quantization.float_layers) == floating >= 3 and quantization.fully_integer is False
    assert quantization.integer_kernels == quantization.convolutions - floating
    val = inputs.photos.val
    logits, _ = open_session(Path(record.path), allow_ungated=True).run(val)
    with torch.no_grad():
        expected = np.concatenate([graph(torch.from_numpy(val[i:i + 1]))[0].numpy() for i in range(len(val))])
    assert np.abs(logits - expected).max() < 0.05 * max(1.0, np.abs(expected).max())
