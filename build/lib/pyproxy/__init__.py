"""pyproxy: a streaming HTTP/1.1 reverse proxy for PyPy and CPython."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
