"""Atomic file writes: a temp name in the same folder, fsync, then rename over the target.

A reader (or a crash) sees the old file or the new one, never half of one; a file that another
process has memory-mapped is replaced, not rewritten in place.
"""

from __future__ import annotations

import io
import os
from pathlib import Path


def write_atomic(path: str | Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per-process name: two writers do not collide
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_figure(fig, path: str | Path, dpi: int = 100) -> None:
    """A matplotlib figure as a PNG, written atomically; the figure is closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    write_atomic(path, buf.getvalue())
