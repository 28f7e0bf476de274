"""Figures as files: matplotlib with no display, and the save every figure goes through.

Here, below the tools, so that the inspection figures (`parity.tools.figures`) and the
sweep's plots share one save.
"""

from __future__ import annotations

from typing import Optional

from parity.core.files import atomic_path


def pyplot():
    """matplotlib.pyplot on the Agg backend: files only, no display needed."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str, dpi: float, flag: Optional[str] = None) -> str:
    """Writes `fig` to `path` (its format from the suffix) atomically, then closes it; returns `path`.

    A failed save leaves no half-written image (`atomic_path`). Never bbox_inches='tight':
    the size in pixels stays what the figure was made at times `dpi`.
    """
    try:
        with atomic_path(path, flag) as tmp:
            fig.savefig(tmp, dpi=dpi)
    finally:
        pyplot().close(fig)
    return path
