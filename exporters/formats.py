"""The export half of the format table: what each format can be exported as, how closely it must match
PyTorch, and what a failed INT8 gate may retry. The runtime half (suffix, backend, tensor names, where the
manifest sits) is ``edge_runtime.formats``; every row here extends one row there.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

from compression.quantize import (
    POST_TRAINING_ONNX_RECIPES,
    POST_TRAINING_PT2E_RECIPES,
    QuantRecipe,
    sensitive_layers,
)
from edge_runtime.formats import RUNTIME_FORMATS, RuntimeFormat
from edge_runtime.formats import format_for_path as runtime_format_for_path
from edge_runtime.registry import unknown_name


@dataclass(frozen=True)
class EscalationStep:
    """One retry after a failed INT8 gate, as data: which recipes it may follow, what it needs, what it changes.

    Steps are planned from the recipe the format starts INT8 with (``FormatSpec.int8_recipe``: the plan's recipe
    for ONNX, PT2E for TFLite and CoreML); each runs only if the one before failed.
    """

    name: str  # how FormatSpec.int8_escalation names it
    label: str  # what logs and the index row say; ``{qat_steps}`` is filled in
    after: tuple[str, ...] | None = None  # recipes this step may follow (None: any)
    not_after: tuple[str, ...] = ()  # recipes it must not follow (it would repeat them)
    recipe: str | None = None  # the recipe to switch to (None: keep it)
    keep_sensitive_in_float: bool = False  # add the recipe's sensitive layers (``sensitive_layers``) to its exclusions
    clear_exclusions: bool = False
    needs_no_exclusions: bool = False  # skip when the recipe already keeps layers in float
    needs_tuning_images: bool = False  # unlabelled train-split photos (accuracy control, QAT)
    needs_qat_steps: bool = False  # a QATConfig with steps > 0

    def applies(self, recipe: QuantRecipe, has_tuning_images: bool, qat_steps: int) -> bool:
        return ((self.after is None or recipe.name in self.after) and recipe.name not in self.not_after
                and not (self.needs_no_exclusions and recipe.exclude)
                and not (self.needs_tuning_images and not has_tuning_images)
                and not (self.needs_qat_steps and qat_steps <= 0))

    def retry_recipe(self, recipe: QuantRecipe) -> QuantRecipe:
        changed = replace(recipe, name=self.recipe or recipe.name, exclude=() if self.clear_exclusions else recipe.exclude)
        return changed.with_exclusions(sensitive_layers(changed.name)) if self.keep_sensitive_in_float else changed

    def describe(self, qat_steps: int) -> str:
        return self.label.format(qat_steps=qat_steps)


ESCALATION_STEPS: dict[str, EscalationStep] = {
    step.name: step
    for step in (
        # Stem, squeeze-excite gating, head and the in-graph CAM head are what INT8 hurts most: ONNX nodes after
        # the ONNX recipes, torch modules after PT2E (TFLite, CoreML).
        EscalationStep("sensitive_float", "sensitive layers in float",
                       after=POST_TRAINING_ONNX_RECIPES + POST_TRAINING_PT2E_RECIPES, keep_sensitive_in_float=True,
                       needs_no_exclusions=True),
        # Layers go back to float in order of sensitivity until INT8 grades the tuning photos like FP32.
        EscalationStep("accuracy_control", "accuracy-controlled mixed precision", after=POST_TRAINING_ONNX_RECIPES,
                       recipe="nncf_ac", clear_exclusions=True, needs_tuning_images=True),
        # Fine-tune the fake-quantized model towards FP32 (NNCF for ONNX, PT2E for TFLite/CoreML).
        EscalationStep("qat", "quantization-aware fine-tuning ({qat_steps} steps)", not_after=("qat", "pt2e_qat"),
                       recipe="qat",
                       clear_exclusions=True, needs_tuning_images=True, needs_qat_steps=True),
    )
}


@dataclass(frozen=True, kw_only=True)
class FormatSpec(RuntimeFormat):
    precisions: tuple[str, ...]  # what the exporter can produce
    atol_fp32: float  # max |delta logits| vs PyTorch for fp32 artifacts (times max(1, max |logit|))
    atol_fp16: float  # same for fp16
    int8_escalation: tuple[EscalationStep, ...] = ()  # what a failed INT8 gate retries, in order
    pt2e_target: str | None = None  # INT8 through PT2E for these kernels (None: the plan's recipe, on ONNX)
    notes: str = ""

    @classmethod
    def extend(cls, name: str, **export_half) -> FormatSpec:
        return cls(**asdict(RUNTIME_FORMATS[name]), **export_half)

    def int8_recipe(self, recipe: QuantRecipe) -> QuantRecipe:
        """The recipe this format quantizes with when ``recipe`` is asked for."""
        return recipe if self.pt2e_target is None else pt2e_recipe(recipe, self.pt2e_target)


def pt2e_recipe(recipe: QuantRecipe, target: str) -> QuantRecipe:
    """The PT2E recipe TFLite and CoreML use for ``recipe``: PT2E QAT where ``qat`` was asked for (directly or by
    the escalation), else post-training PT2E; ``target`` names the runtime kernels. A PT2E recipe keeps its float
    modules; an ONNX recipe's exclusions are ONNX node names, which name no torch module, and are dropped."""
    name = "pt2e_qat" if recipe.name in ("qat", "pt2e_qat") else "pt2e"
    exclude = recipe.exclude if recipe.name in ("pt2e", "pt2e_qat") else ()
    return QuantRecipe(name, activation_type="int8", weight_type="int8", exclude=exclude, target=target,
                       bias_correction=recipe.bias_correction, bias_correction_passes=recipe.bias_correction_passes)


def _steps(*names: str) -> tuple[EscalationStep, ...]:
    return tuple(ESCALATION_STEPS[n] for n in names)


FORMATS: dict[str, FormatSpec] = {
    spec.name: spec
    for spec in (
        FormatSpec.extend("onnx", precisions=("fp32", "int8"), atol_fp32=1e-3, atol_fp16=5e-2,
                          int8_escalation=_steps("sensitive_float", "accuracy_control", "qat"),
                          notes="INT8 as QDQ; opset 18"),
        # PT2E keeps modules in float (stem, head, CAM head), then fine-tunes; ONNX-only NNCF accuracy control
        # has no PT2E counterpart.
        FormatSpec.extend("tflite", precisions=("fp32", "fp16", "int8"), atol_fp32=1e-3, atol_fp16=5e-2,
                          int8_escalation=_steps("sensitive_float", "qat"), pt2e_target="litert_xnnpack",
                          notes="litert-torch; FP16 weights via ai-edge-quantizer float casting; INT8 through the PT2E "
                                "quantizer (W8A8, per-channel weights); when the gate fails, sensitive modules in "
                                "float, then PT2E QAT"),
        FormatSpec.extend("coreml", precisions=("fp16", "int8"), atol_fp32=1e-3, atol_fp16=5e-2,
                          int8_escalation=_steps("sensitive_float", "qat"), pt2e_target="apple_ane",
                          notes="ML program; prediction needs macOS, Linux verifies the spec only"),
    )
}


def get_format(name: str) -> FormatSpec:
    if name not in FORMATS:
        raise unknown_name("format", name, FORMATS)
    return FORMATS[name]


def format_for_path(path: str | Path) -> FormatSpec:
    """The format of an artifact, from its suffix."""
    return FORMATS[runtime_format_for_path(path).name]
