"""Model registry: one decorated entrypoint per architecture, looked up by name."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from edge_runtime.registry import Registry


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


@dataclass(frozen=True)
class ModelEntry:
    cfg: ModelCfg
    build: Callable  # fn(pretrained=False, pretrained_file=None, **kwargs) -> DRClassifier


MODELS: Registry[ModelEntry] = Registry("model")


def register_model(cfg: ModelCfg) -> Callable[[Callable], Callable]:
    """Register ``fn(pretrained=False, pretrained_file=None, **kwargs) -> DRClassifier`` under ``cfg.name``."""

    def decorator(fn: Callable) -> Callable:
        MODELS.register(cfg.name, ModelEntry(cfg, fn))
        return fn

    return decorator


def list_models(role: str | None = None) -> list[str]:
    return sorted(n for n, entry in MODELS.items() if role is None or entry.cfg.role == role)


def get_model_cfg(name: str) -> ModelCfg:
    return MODELS.get(name).cfg


def create_model(name: str, pretrained: bool = False, pretrained_file: str | None = None, **kwargs):
    """Build a registered DR model.

    Args:
        name (str): registered name, e.g. ``"efficientnet_b4"`` or ``"tf_efficientnet_lite0"``.
        pretrained (bool): load ImageNet weights (timm's hub, or a weights package where one ships them).
        pretrained_file (str | None): a local ImageNet checkpoint; use this offline.
        **kwargs: ``drop_rate`` sets the head's dropout; ``heads`` the supervised heads (default ``("grade",)``;
            ``("grade", "dme")`` adds the DME head); the rest go to ``timm.create_model`` for the backbone,
            e.g. ``drop_path_rate`` (stochastic depth). ``None`` values are dropped so timm's defaults apply.

    Example:
        >>> model = create_model("test_dr_tiny")
        >>> logits, cam = model.forward_with_cam(torch.randn(1, 3, 64, 64))
    """
    build = MODELS.get(name).build
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return build(pretrained=pretrained, pretrained_file=pretrained_file, **kwargs)
