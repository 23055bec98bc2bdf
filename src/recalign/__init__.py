"""recalign: align large language models to recommendation."""

__version__ = "0.1.0"
