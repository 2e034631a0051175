"""INT8 quantization recipes, registered by name, calibrated on real fundus photos.

Two kinds, two typed protocols: ONNX-graph recipes (``ort``, ``nncf``, ``nncf_ac``) turn an FP32 ONNX file
into a QDQ one; torch-graph recipes (``qat``, ``pt2e``, ``pt2e_qat``) quantize the torch module before it is
exported (ONNX) or converted (TFLite, CoreML).
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from edge_runtime.contract import OperatingPoint, QuantizationInfo
from edge_runtime.decision import decide_batch
from edge_runtime.registry import Registry, unknown_name

from .errors import QuantizationConfigError

if TYPE_CHECKING:
    from .qat import QATConfig

log = logging.getLogger(__name__)


# More passes than this re-measure noise: one pass removes the shift up to the re-quantization's own change.
MAX_BIAS_CORRECTION_PASSES = 3

@dataclass(frozen=True)
class QuantRecipe:
    """How to quantize one artifact.

    Args:
        name (`str`): registered recipe: ``ort`` (ONNX Runtime QDQ), ``nncf`` (NNCF PTQ on ONNX),
            ``nncf_ac`` (NNCF PTQ, then the most sensitive layers back to float until INT8 grades held-out
            photos like FP32), ``qat`` (NNCF quantization-aware fine-tuning towards FP32, exported as QDQ ONNX),
            ``pt2e`` (torch PT2E, used by the TFLite and CoreML exporters) or ``pt2e_qat`` (PT2E
            quantization-aware fine-tuning towards FP32, what ``qat`` means for TFLite and CoreML).
        calibration (`str`, defaults to ``minmax``): activation range estimator, minmax | percentile | entropy.
        activation_type / weight_type (`str`): uint8 | int8.
        per_channel (`bool`, defaults to True): per-output-channel weight scales.
        exclude (`tuple[str, ...]`): layers kept in float (mixed precision): ONNX node-name substrings for the ONNX
            recipes, module patterns (``compression.pt2e.runs_in``) for ``pt2e``.
        reduce_range (`bool`, defaults to False): 7-bit weights, so the U8S8 AVX2 kernels of CPUs without VNNI
            cannot saturate their 16-bit accumulators; lets those CPUs run the fast U8S8 path (ort recipe).
        target (`str`): CPU class the recipe was chosen for; recorded in the manifest.
        bias_correction (`bool`, defaults to False): empirical output-bias correction (Nagel et al. 2019): after a
            first quantization, the mean (INT8 - FP32) of every head output the referral decision uses, measured on
            the calibration photos, is subtracted from FP32's classifier biases and the model is quantized again
            (``compression.bias_correction``). Any recipe, any INT8 format; the manifest records the values.
        bias_correction_passes (`int`, defaults to 1): how many times to measure, subtract and quantize again.
    """

    name: str = "ort"
    calibration: str = "minmax"
    activation_type: str = "uint8"
    weight_type: str = "uint8"
    per_channel: bool = True
    exclude: tuple[str, ...] = ()
    target: str = "x86_avx2"
    reduce_range: bool = False
    bias_correction: bool = False
    bias_correction_passes: int = 1

    def __post_init__(self) -> None:
        if self.name not in ONNX_RECIPES and self.name not in TORCH_RECIPES:
            raise unknown_name("quantization recipe", self.name, ONNX_RECIPES.names() + TORCH_RECIPES.names())
        if self.calibration not in ("minmax", "percentile", "entropy"):
            raise QuantizationConfigError(f"calibration must be minmax|percentile|entropy, got {self.calibration!r}")
        for kind in ("activation_type", "weight_type"):
            if getattr(self, kind) not in ("uint8", "int8"):
                raise QuantizationConfigError(f"{kind} must be uint8|int8, got {getattr(self, kind)!r}")
        object.__setattr__(self, "exclude", tuple(self.exclude))
        if not isinstance(self.bias_correction, bool):
            raise QuantizationConfigError(f"bias_correction must be True or False, got {self.bias_correction!r}")
        passes = self.bias_correction_passes
        if isinstance(passes, bool) or not isinstance(passes, int) or not 1 <= passes <= MAX_BIAS_CORRECTION_PASSES:
            raise QuantizationConfigError(f"bias_correction_passes must be an integer in [1, "
                                          f"{MAX_BIAS_CORRECTION_PASSES}], got {passes!r}")

    @staticmethod
    def for_target(target: str, name: str = "ort") -> QuantRecipe:
        """Presets per CPU class; ``auto`` picks the one for the CPU this runs on (from its int8 features)."""
        if target == "auto":
            from edge_runtime.backends.options import int8_target

            target = int8_target()
        presets = {
            # AVX2 without VNNI: ORT's U8S8 kernels saturate (b0 cosine 0.58 vs 0.92 U8U8, TOOLCHAIN.md).
            "x86_avx2": QuantRecipe(name, activation_type="uint8", weight_type="uint8", target="x86_avx2"),
            # Same CPUs, fast U8S8 kernels: 7-bit weights keep pmaddubsw's 16-bit sums from saturating.
            "x86_avx2_fast": QuantRecipe(name, activation_type="uint8", weight_type="int8", reduce_range=True,
                                         target="x86_avx2"),
            # VNNI and ARM64 dot-product kernels handle U8S8 without saturation and run it fastest.
            "x86_vnni": QuantRecipe(name, activation_type="uint8", weight_type="int8", target="x86_vnni"),
            "arm64": QuantRecipe(name, activation_type="uint8", weight_type="int8", target="arm64"),
            "jetson_orin": QuantRecipe(name, activation_type="int8", weight_type="int8", target="jetson_orin"),
        }
        if target not in presets:
            raise QuantizationConfigError(f"unknown target {target!r}; known: auto, {', '.join(sorted(presets))}")
        return presets[target]

    def with_bias_correction(self, passes: int = 1) -> QuantRecipe:
        """The same recipe with empirical output-bias correction (``passes`` rounds of measure, subtract, quantize)."""
        return replace(self, bias_correction=True, bias_correction_passes=passes)

    @property
    def quantization_key(self) -> QuantRecipe:
        """What decides a quantized graph of one FP32 model: the recipe without the manifest's label (``target``)
        and without the bias correction, which changes the FP32 model rather than how it is quantized."""
        return replace(self, target="", bias_correction=False, bias_correction_passes=1)

    def with_exclusions(self, patterns: tuple[str, ...]) -> QuantRecipe:
        return replace(self, exclude=tuple(dict.fromkeys(self.exclude + patterns)))

    def info(self, calibration_images: int, activation_type: str | None = None, weight_type: str | None = None,
             **read_back: Any) -> QuantizationInfo:
        """Manifest record; pass what was read back from the artifact where it can differ from the recipe
        (types, and the counts of ``QuantizationInfo``: weighted_layers, float_layers, convolutions, integer_kernels)."""
        return QuantizationInfo("int8", self.name, activation_type or self.activation_type,
                                weight_type or self.weight_type, self.per_channel,
                                self.calibration, calibration_images, self.target, self.notes(), **read_back)

    def notes(self) -> str | None:
        parts = ([f"float kept for {list(self.exclude)}"] if self.exclude else []) + (
            ["7-bit weight range (reduce_range)"] if self.reduce_range else []) + (
            [f"output biases corrected on the calibration photos ({self.bias_correction_passes} "
             f"pass{'es' if self.bias_correction_passes > 1 else ''})"] if self.bias_correction else [])
        return "; ".join(parts) or None


# Fallback for a failing gate: keep the parts INT8 hurts most in float (stem, SE gating, head/CAM).
# Node-name substrings of timm models exported by exporters.onnx; "/Conv" alone is the in-graph CAM head.
SENSITIVE_PATTERNS = ("conv_stem", "/se/", "conv_head", "Sigmoid")
CAM_HEAD_NODES = ("/Conv", "/ReduceMean", "/Add")
# The same layers in torch graphs (PT2E, for TFLite and CoreML): module-path substrings of DRClassifier
# (``compression.pt2e.runs_in``); EfficientNet-Lite has no squeeze-excite, ".se." keeps B0's in float too. The
# in-graph CAM head is no module: DRClassifier.forward_outputs runs it as functional ops, called as a method by
# ExportModule.forward (the root of every exported graph), so those ops belong to these classes' own forward.
SENSITIVE_MODULES = ("conv_stem", ".se.", "conv_head", "classifier")
CAM_HEAD_MODULES = ("ExportModule", "DRClassifier")
# The post-training ONNX recipes, which a failed gate may retry with layers in float.
POST_TRAINING_ONNX_RECIPES = ("ort", "nncf")
# The post-training torch recipe of TFLite and CoreML, which a failed gate may retry with modules in float.
POST_TRAINING_PT2E_RECIPES = ("pt2e",)


def sensitive_layers(recipe: str) -> tuple[str, ...]:
    """What "sensitive layers in float" keeps in float for ``recipe``: module patterns for the torch graphs PT2E
    quantizes, node-name patterns for the ONNX graphs of the other recipes."""
    if recipe in POST_TRAINING_PT2E_RECIPES:
        return SENSITIVE_MODULES + CAM_HEAD_MODULES
    return SENSITIVE_PATTERNS + CAM_HEAD_NODES


@dataclass(frozen=True)
class AccuracyTarget:
    """What accuracy-controlled quantization must keep on ``images``: FP32's referral decisions at
    ``operating_point`` (what the fidelity gate judges), or FP32's grades when there is no point chosen on data.

    ``images`` are unlabelled photos from the train split (N x C x S x S, normalised), never the val photos
    the gate later judges, so the gate stays an independent check.
    """

    images: np.ndarray
    min_agreement: float = 0.995
    operating_point: OperatingPoint | None = None

    @property
    def judges(self) -> str:
        return "grade" if self.operating_point is None else "referral"

    def agreement(self, reference: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """Per photo: 1 if ``logits`` keep the reference's decision, minus a tie-breaker below 1e-4.

        NNCF ranks layers by this score (its output-distance ranking is OpenVINO-only), and on agreement alone
        most single layers tie at no change. The tie-breaker (how far the referable probability, or the logits,
        moved) stays below 1e-4, so it never outweighs one changed decision in fewer than 10,000 photos and
        the restorer's stopping rule is still agreement.
        """
        reference, logits = np.asarray(reference, np.float64), np.asarray(logits, np.float64)
        if self.operating_point is None:
            kept = logits.argmax(axis=1) == reference.argmax(axis=1)
            error = np.sum((logits - reference) ** 2, axis=1) / (np.sum(reference ** 2, axis=1) + 1e-12)
        else:
            ref, test = decide_batch(reference, self.operating_point), decide_batch(logits, self.operating_point)
            kept = ref.referable == test.referable
            error = np.abs(test.referable_probability - ref.referable_probability)
        return kept.astype(np.float64) - 1e-4 * np.minimum(error, 1.0)

    def __post_init__(self) -> None:
        if not 0 <= self.min_agreement <= 1:
            raise QuantizationConfigError(f"min_agreement must be in [0, 1], got {self.min_agreement}")


class OnnxGraphRecipe(Protocol):
    """Post-training INT8 of an FP32 ONNX file: writes the QDQ model to ``out_path`` and returns it.
    ``target`` is what accuracy control holds (``nncf_ac``); the other recipes ignore it."""

    def __call__(self, fp32_path: Path, out_path: Path, calib: np.ndarray, recipe: QuantRecipe,
                 target: AccuracyTarget | None) -> Path: ...


@dataclass(frozen=True)
class TorchRecipeInputs:
    """The photos (and QAT settings) a torch-graph recipe calibrates or fine-tunes on."""

    calib: np.ndarray  # calibration photos, N x C x S x S normalised
    tuning_images: np.ndarray  # unlabelled train-split photos QAT fine-tunes on (never the val photos)
    qat: QATConfig | None = None  # None: QATConfig's defaults


@dataclass(frozen=True)
class QuantizedGraph:
    """What a torch-graph recipe made, calibrated or fine-tuned once; ``convert`` gives the graph a converter
    takes, as often as formats need it (TFLite and CoreML convert one PT2E graph with different folding)."""

    prepared: Any  # the calibrated / fine-tuned module
    quantizer: Any | None  # the PT2E quantizer litert-torch lowers with; None for NNCF
    converter: Callable[[Any, bool], Any]  # (prepared, fold_quantize) -> quantized module; must not mutate

    def convert(self, fold_quantize: bool = False):
        """``fold_quantize=False`` keeps weights float + quantize/dequantize (litert-torch lowers that);
        ``True`` stores int8 weights (coremltools lowers that)."""
        return self.converter(self.prepared, fold_quantize)


class TorchGraphRecipe(Protocol):
    """Quantization of a torch module (inputs -> (logits, cam)) before export or conversion."""

    def __call__(self, module, inputs: TorchRecipeInputs, recipe: QuantRecipe) -> QuantizedGraph: ...


ONNX_RECIPES: Registry[OnnxGraphRecipe] = Registry("ONNX-graph quantization recipe")
TORCH_RECIPES: Registry[TorchGraphRecipe] = Registry("torch-graph quantization recipe")


def quantize_onnx(fp32_path: Path, out_path: Path, calib: np.ndarray, recipe: QuantRecipe,
                  target: AccuracyTarget | None = None) -> Path:
    """Apply an ONNX-graph recipe to ``fp32_path``, calibrated on ``calib`` (N x C x S x S).

    ``target`` is needed by ``nncf_ac`` only: the photos whose FP32 grades the INT8 model must keep.
    """
    if recipe.name not in ONNX_RECIPES:
        raise QuantizationConfigError(f"recipe {recipe.name!r} does not post-training-quantize ONNX files; "
                          f"use one of {ONNX_RECIPES.names()}")
    if len(calib) == 0:
        raise QuantizationConfigError("static INT8 needs calibration images; pass --calib with real fundus photos")
    return ONNX_RECIPES.get(recipe.name)(Path(fp32_path), Path(out_path), calib, recipe, target)


def quantize_torch(module, inputs: TorchRecipeInputs, recipe: QuantRecipe) -> QuantizedGraph:
    """Apply a torch-graph recipe to ``module`` (inputs -> (logits, cam))."""
    if recipe.name not in TORCH_RECIPES:
        raise QuantizationConfigError(f"recipe {recipe.name!r} does not quantize torch graphs; use one of {TORCH_RECIPES.names()}")
    if len(inputs.calib) == 0:
        raise QuantizationConfigError("INT8 calibrates activations on real fundus photos: pass --calib")
    return TORCH_RECIPES.get(recipe.name)(module, inputs, recipe)


def _excluded_nodes(model_path: Path, patterns: tuple[str, ...]) -> list[str]:
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    exact = {p for p in patterns if p in CAM_HEAD_NODES}
    partial = [p for p in patterns if p not in CAM_HEAD_NODES]
    return [n.name for n in graph.node if n.name in exact or any(p in n.name or p == n.op_type for p in partial)]


@ONNX_RECIPES.decorator("ort")
def _ort_recipe(fp32_path: Path, out_path: Path, calib: np.ndarray, recipe: QuantRecipe,
                target: AccuracyTarget | None = None) -> Path:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from .onnx_channels import align_dead_channel_zero_points, zero_negligible_channels

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(calib[i:i + 1] for i in range(len(calib)))

        def get_next(self):
            item = next(self.items, None)
            return None if item is None else {"input": item.astype(np.float32)}

    prepped = out_path.with_suffix(".prep.onnx")
    quant_pre_process(str(fp32_path), str(prepped), skip_symbolic_shape=True)
    zero_negligible_channels(prepped)  # else their int32 biases overflow and are clipped
    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    quantize_static(str(prepped), str(out_path), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=types[recipe.activation_type], weight_type=types[recipe.weight_type],
                    per_channel=recipe.per_channel, reduce_range=recipe.reduce_range,
                    calibrate_method=methods[recipe.calibration],
                    nodes_to_exclude=_excluded_nodes(prepped, recipe.exclude),
                    extra_options={"ActivationSymmetric": recipe.activation_type == "int8", "WeightSymmetric": True})
    prepped.unlink(missing_ok=True)
    align_dead_channel_zero_points(out_path)  # mixed zero points take depthwise convolutions off the fast path
    return out_path


def _nncf_inputs(fp32_path: Path, calib: np.ndarray, recipe: QuantRecipe):
    import nncf

    dataset = nncf.Dataset([{"input": calib[i:i + 1].astype(np.float32)} for i in range(len(calib))])
    ignored = nncf.IgnoredScope(names=_excluded_nodes(fp32_path, recipe.exclude), validate=False) if recipe.exclude else None
    # NNCF chooses its own range estimators per preset; recipe.calibration applies to the ort recipe only.
    # uint8 activation targets get asymmetric activations (MIXED): on the trained Lite0 that kept every val
    # grade, where symmetric ones (PERFORMANCE, what int8-activation targets such as TensorRT want) flipped 2 of 86.
    preset = nncf.QuantizationPreset.MIXED if recipe.activation_type == "uint8" else nncf.QuantizationPreset.PERFORMANCE
    kwargs = {"ignored_scope": ignored} if ignored else {}
    return dataset, dict(subset_size=len(calib), preset=preset, **kwargs)


@ONNX_RECIPES.decorator("nncf")
def _nncf_recipe(fp32_path: Path, out_path: Path, calib: np.ndarray, recipe: QuantRecipe,
                 target: AccuracyTarget | None = None) -> Path:
    import nncf
    import onnx

    dataset, kwargs = _nncf_inputs(fp32_path, calib, recipe)
    onnx.save(nncf.quantize(onnx.load(str(fp32_path)), dataset, **kwargs), str(out_path))
    return out_path


@ONNX_RECIPES.decorator("nncf_ac")
def _nncf_accuracy_control_recipe(fp32_path: Path, out_path: Path, calib: np.ndarray, recipe: QuantRecipe,
                                  target: AccuracyTarget | None = None) -> Path:
    """NNCF PTQ, then NNCF's accuracy restorer: layers ranked by how far their quantization moves FP32's
    decisions go back to float one by one until the INT8 model keeps FP32's referral decision (or grade, see
    ``AccuracyTarget``) on ``target.images``. The result is as much INT8 as that agreement allows."""
    import nncf
    import onnx
    import onnxruntime as ort
    from nncf.parameters import DropType
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    if target is None or not len(target.images):
        raise QuantizationConfigError("recipe nncf_ac needs unlabelled photos to hold FP32's decisions on (the train split of --calib)")

    def session(model) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        return ort.InferenceSession(model.SerializeToString() if hasattr(model, "SerializeToString") else str(model),
                                    options, providers=["CPUExecutionProvider"])

    images = target.images.astype(np.float32)
    fp32 = session(fp32_path)
    reference = [fp32.run(["logits"], {"input": images[i:i + 1]})[0] for i in range(len(images))]

    def agreement_with_fp32(model, items) -> tuple[float, list[float]]:
        runner = session(model)
        logits = np.concatenate([runner.run(["logits"], {"input": x})[0] for _, x in items])
        scores = target.agreement(np.concatenate([reference[index] for index, _ in items]), logits)
        return float(np.mean(scores)), [float(v) for v in scores]

    validation = nncf.Dataset([(i, images[i:i + 1]) for i in range(len(images))], lambda item: {"input": item[1]})
    dataset, kwargs = _nncf_inputs(fp32_path, calib, recipe)
    restorer = AdvancedAccuracyRestorerParameters(ranking_subset_size=min(len(images), 128), num_ranking_workers=1)
    quantized = nncf.quantize_with_accuracy_control(
        onnx.load(str(fp32_path)), dataset, validation, agreement_with_fp32,
        max_drop=1.0 - target.min_agreement, drop_type=DropType.ABSOLUTE,
        advanced_accuracy_restorer_parameters=restorer, **kwargs)
    onnx.save(quantized, str(out_path))
    return out_path


@TORCH_RECIPES.decorator("pt2e")
def _pt2e_recipe(module, inputs: TorchRecipeInputs, recipe: QuantRecipe) -> QuantizedGraph:
    """PT2E W8A8 calibrated on ``inputs.calib`` (TFLite and CoreML); see compression/pt2e.py."""
    from .pt2e import convert_prepared, pt2e_calibrate

    prepared, quantizer = pt2e_calibrate(module, inputs.calib, recipe.per_channel, float_modules=recipe.exclude)
    return QuantizedGraph(prepared, quantizer, convert_prepared)


@TORCH_RECIPES.decorator("pt2e_qat")
def _pt2e_qat_recipe(module, inputs: TorchRecipeInputs, recipe: QuantRecipe) -> QuantizedGraph:
    """PT2E fake-quantization fine-tuned towards the FP32 outputs (TFLite and CoreML); see compression/pt2e.py."""
    from .pt2e import convert_prepared, pt2e_qat_train

    prepared, quantizer = pt2e_qat_train(module, inputs.calib, inputs.tuning_images, inputs.qat, recipe.per_channel,
                                         float_modules=recipe.exclude)
    return QuantizedGraph(prepared, quantizer, convert_prepared)


@TORCH_RECIPES.decorator("qat")
def _nncf_qat_recipe(module, inputs: TorchRecipeInputs, recipe: QuantRecipe) -> QuantizedGraph:
    """NNCF fake-quantization fine-tuned towards the FP32 outputs; converts to a stripped native-torch module
    that ``torch.onnx.export`` writes as QDQ ONNX (there is no folding choice: the ONNX exporter folds)."""
    from .qat import QATConfig, fidelity_qat

    return nncf_qat_graph(fidelity_qat(module, inputs.calib, inputs.tuning_images, inputs.qat or QATConfig()))


def nncf_qat_graph(stripped) -> QuantizedGraph:
    """A stripped NNCF QAT module (``qat.fidelity_qat``) as the graph the ONNX exporter writes; each conversion is
    a copy, so one fine-tuned module serves every export."""
    return QuantizedGraph(stripped, None, lambda prepared, _fold_quantize: copy.deepcopy(prepared))
