"""RetinaEdge: diabetic-retinopathy screening from a full-precision teacher to INT8 edge artifacts."""
__version__ = "0.1.0"
