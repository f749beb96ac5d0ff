"""Experiment trackers around the training loop: scalars every step, a table of samples every
``trainer.samples_every`` steps, on rank 0 only. A tracker that fails is reported by name and
dropped; the run goes on (metrics.jsonl is the record of the run)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from vlrm.protocols import Logger, require
from vlrm.structs import RewardOutput, Rollout, Sample


def sample_rows(ids: Sequence[str], images: Sequence[Any], rollout: Rollout,
                rewards: RewardOutput, advantages: torch.Tensor | None,
                limit: int) -> list[Sample]:
    """The first ``limit`` captions of a step as samples.

    Args:
        ids: Shape: (N,). The step's image ids (this rank's share).
        images: Shape: (N,). Their images.
        rollout: B = N * K captions; ``rollout.group[b]`` is caption b's image.
        rewards: The composite reward: ``token`` (B, T) and ``terms`` {term: (B,)}.
        advantages: Shape: (B, T), or None.
    """
    mask = rollout.mask
    total = rewards.token.sum(dim=1) if rewards.token is not None else rewards.sequence
    rows = []
    for b in range(min(limit, len(rollout.captions))):
        i = int(rollout.group[b])
        adv = None
        if advantages is not None:
            m = mask[b].to(advantages.device)
            adv = float(advantages[b][m].mean()) if m.any() else 0.0
        rows.append(Sample(image_id=str(ids[i]), image=images[i], caption=rollout.captions[b],
                           reward=float(total[b]),
                           terms={k: float(v[b]) for k, v in rewards.terms.items()},
                           advantage=adv))
    return rows


class Trackers:
    """The configured loggers, by name."""

    def __init__(self, loggers: Mapping[str, Logger] | None) -> None:
        self.loggers = dict(loggers or {})
        for name, logger in self.loggers.items():
            require(logger, Logger, f"loggers.{name}")

    def __bool__(self) -> bool:
        return bool(self.loggers)

    def _each(self, method: str, *args: Any) -> None:
        for name, logger in list(self.loggers.items()):
            try:
                getattr(logger, method)(*args)
            except Exception as exc:  # a tracker must not stop training
                warnings.warn(f"logger {name!r} ({type(logger).__name__}) failed in {method} and "
                              f"is dropped for the rest of the run: {exc!r}", RuntimeWarning,
                              stacklevel=2)
                del self.loggers[name]

    def open(self, output_dir: Path, config: dict[str, Any], step: int = 0) -> None:
        self._each("open", Path(output_dir), config, step)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self._each("log_metrics", step, metrics)

    def log_samples(self, step: int, samples: list[Sample]) -> None:
        self._each("log_samples", step, samples)

    def close(self) -> None:
        self._each("close")
