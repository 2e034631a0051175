"""Dataset layouts, the preprocessed-crop cache and the synthetic fundus generator."""
from .layouts import Sample, assign_splits, detect_layout, fingerprint, read_dataset, select
from .synthetic import generate_fundus, synthetic_batch, write_synthetic_dataset

__all__ = ["Sample", "assign_splits", "detect_layout", "fingerprint", "read_dataset", "select",
           "generate_fundus", "synthetic_batch", "write_synthetic_dataset"]
