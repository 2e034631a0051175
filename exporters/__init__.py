"""Exporters. ``exporters.formats`` is torch-free (the edge runtime reads it); the rest needs the export extra."""
