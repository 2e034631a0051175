"""Model registry: one decorated entrypoint per architecture, looked up by name."""
from __future__ import annotations

import difflib
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from edge_runtime.errors import ConfigError


@dataclass(frozen=True)
class ModelCfg:
    """Facts about a registered DR model; attached to the built model as ``model.dr_cfg``."""

    name: str
    timm_name: str  # backbone architecture in timm
    input_size: int  # native square input resolution
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    role: str  # teacher | student | test
    pretrained_source: str  # how ImageNet weights are found when pretrained=True
    license: str = "Apache-2.0"


_MODEL_ENTRYPOINTS: dict[str, Callable] = {}
_MODEL_CFGS: dict[str, ModelCfg] = {}


def register_model(cfg: ModelCfg) -> Callable[[Callable], Callable]:
    """Register ``fn(pretrained=False, pretrained_file=None, **kwargs) -> DRClassifier`` under ``cfg.name``."""

    def decorator(fn: Callable) -> Callable:
        if cfg.name in _MODEL_ENTRYPOINTS:
            warnings.warn(f"model {cfg.name!r} re-registered; the newer definition wins", stacklevel=2)
        _MODEL_ENTRYPOINTS[cfg.name] = fn
        _MODEL_CFGS[cfg.name] = cfg
        return fn

    return decorator


def list_models(role: str | None = None) -> list[str]:
    return sorted(n for n, c in _MODEL_CFGS.items() if role is None or c.role == role)


def get_model_cfg(name: str) -> ModelCfg:
    if name not in _MODEL_CFGS:
        close = difflib.get_close_matches(name, list(_MODEL_CFGS), n=3)
        hint = f" Did you mean {close}?" if close else ""
        raise ConfigError(f"unknown model {name!r}; registered models: {list_models()}.{hint}")
    return _MODEL_CFGS[name]


def create_model(name: str, pretrained: bool = False, pretrained_file: str | None = None, **kwargs):
    """Build a registered DR model.

    Args:
        name (str): registered name, e.g. ``"efficientnet_b4"`` or ``"tf_efficientnet_lite0"``.
        pretrained (bool): load ImageNet weights (timm's hub, or a weights package where one ships them).
        pretrained_file (str | None): a local ImageNet checkpoint; use this offline.

    Example:
        >>> model = create_model("test_dr_tiny")
        >>> logits, cam = model.forward_with_cam(torch.randn(1, 3, 64, 64))
    """
    get_model_cfg(name)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return _MODEL_ENTRYPOINTS[name](pretrained=pretrained, pretrained_file=pretrained_file, **kwargs)
