"""Model registry over timm: teacher, students and a tiny test model."""
from ._registry import ModelCfg, create_model, get_model_cfg, list_models, register_model
from .dr_classifier import DRClassifier, ExportModule, load_checkpoint

__all__ = ["ModelCfg", "create_model", "get_model_cfg", "list_models", "register_model", "DRClassifier",
           "ExportModule", "load_checkpoint"]
