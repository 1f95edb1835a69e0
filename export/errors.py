"""The export's one error type (its own module, so every export module can raise it without import cycles)."""

from __future__ import annotations


class ExportError(RuntimeError):
    """Export could not produce a verified bundle; nothing is left at the target."""
