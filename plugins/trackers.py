"""Experiment trackers (``loggers:`` in a config): TensorBoard.

    loggers:
      tb: {class_path: tensorboard}                  # writes <output_dir>/tensorboard

Scalars every step under their metrics.jsonl names; every ``trainer.samples_every`` steps a
sample table: each sampled image (``samples/<row>``) and one markdown table (``samples``)
of image id, caption, total reward, each reward term and the advantage. Needs the
``tensorboard`` extra (``pip install 'vlrm[tensorboard]'``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vlrm import hookimpl
from vlrm.errors import ConfigError


def markdown_table(samples: list[Any]) -> str:
    """The samples as a markdown table (TensorBoard's text plugin renders it)."""
    terms = sorted({t for s in samples for t in s.terms})
    head = ["row", "image", "caption", "reward", *terms, "advantage"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, s in enumerate(samples):
        cells = [str(i), s.image_id, s.caption.replace("|", "\\|"), f"{s.reward:.4f}",
                 *(f"{s.terms[t]:.4f}" if t in s.terms else "" for t in terms),
                 "" if s.advantage is None else f"{s.advantage:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


class TensorBoardLogger:
    """Logs to TensorBoard event files.

    Args:
        log_dir: Where the event files go; default ``<output_dir>/tensorboard``.
        flush_secs: How often the writer flushes to disk.
    """

    def __init__(self, log_dir: str | None = None, flush_secs: int = 30) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ModuleNotFoundError as exc:
            raise ConfigError("loggers: tensorboard needs the tensorboard package: "
                              "pip install 'vlrm[tensorboard]'") from exc
        self.log_dir, self.flush_secs = log_dir, flush_secs
        self.writer: Any = None

    def open(self, output_dir: Path, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        folder = Path(self.log_dir) if self.log_dir else Path(output_dir) / "tensorboard"
        self.writer = SummaryWriter(str(folder), flush_secs=self.flush_secs)
        if config:
            import yaml

            self.writer.add_text("config", "```yaml\n" + yaml.safe_dump(config, sort_keys=False)
                                 + "```", 0)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(name, value, step)

    def log_samples(self, step: int, samples: list[Any]) -> None:
        seen: set[str] = set()
        for i, s in enumerate(samples):
            if s.image_id in seen:  # an image's K captions share one picture
                continue
            seen.add(s.image_id)
            pixels = np.asarray(s.image.convert("RGB"), dtype=np.uint8)
            self.writer.add_image(f"samples/{i}", pixels, step, dataformats="HWC")
        self.writer.add_text("samples", markdown_table(samples), step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@hookimpl
def vlrm_register_loggers() -> dict[str, Any]:
    return {"tensorboard": TensorBoardLogger}
