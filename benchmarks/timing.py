"""Small pieces the benchmark suite and its command-line tools share."""

from __future__ import annotations

import torch


def sync() -> None:
    """Wait for queued CUDA work, so a wall-clock reading covers it (no-op on a CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def emit(text: str, md: str | None) -> str:
    """Print a result table and, with ``md``, also write it to that file."""
    print(text)
    if md:
        with open(md, "w") as f:
            f.write(text)
    return text
