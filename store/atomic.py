"""Atomic file writes: a temp name in the same folder, fsync, then rename over the target.

A reader (or a crash) sees the old file or the new one, never half of one; a file that another
process has memory-mapped is replaced, not rewritten in place.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """A temp path beside `path` to write; on success it is fsynced and renamed over `path`, on failure removed."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per-process name: two writers do not collide
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, data: bytes) -> None:
    with replacing(path) as tmp:
        tmp.write_bytes(data)


def save_figure(fig, path: str | Path, dpi: int = 100) -> None:
    """A matplotlib figure as a PNG, written atomically; the figure is closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    write_atomic(path, buf.getvalue())
