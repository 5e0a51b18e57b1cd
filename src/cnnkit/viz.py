"""Plotting helpers: a headless pyplot and atomic figure saving."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

from cnnkit.io import atomic_path


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (works without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> Path:
    """Lay out, write atomically as PNG, and close ``fig``."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    pyplot().close(fig)
    return path
