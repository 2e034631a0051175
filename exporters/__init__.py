"""Exporters. ``exporters.formats`` stays light (no torch); ``exporters.pipeline`` registers every exporter."""
