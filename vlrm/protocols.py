"""The interfaces every policy, reward and evaluator plugin implements.

They are Protocols: a plugin class matches them by shape and never inherits code from
vlrm. ``vlrm.testing`` checks a component against its contract.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from vlrm.evaluation import CaptionSet
from vlrm.structs import PolicyOutput, RewardOutput, Rollout


@runtime_checkable
class Policy(Protocol):
    """A captioner that samples captions and scores its own samples with gradients.

    Attributes:
        hidden_size: H, the size of ``PolicyOutput.hidden`` (the value head's input).
    """

    hidden_size: int

    def sample(self, images: Sequence[Any], image_ids: Sequence[str], num_samples: int) -> Rollout:
        """Sample ``num_samples`` captions per image, without gradients.

        A policy may also accept ``seeds`` (one int per image): each image's samples are then
        drawn from a generator seeded with its seed, independent of the rest of the batch.
        The trainer passes it with ``sample_seeding: per_image`` (needed for a run that is
        the same on any number of processes).
        """

    def evaluate(self, rollout: Rollout) -> PolicyOutput:
        """Log-probs, entropy and hidden states of the rollout's tokens, with gradients."""

    def trainable_parameters(self) -> Iterable[torch.nn.Parameter]:
        """The parameters the optimiser updates; everything else stays frozen."""

    def save_pretrained(self, path: str) -> None:
        """Write the policy so that its native library loads it back (e.g. transformers)."""


@runtime_checkable
class Reward(Protocol):
    """Scores the captions of a rollout. Runs without gradients."""

    def __call__(self, rollout: Rollout) -> RewardOutput:
        """Return per-caption (B,) and/or per-token (B, T) rewards."""


@runtime_checkable
class Evaluator(Protocol):
    """Measures one policy's captions (a ``CaptionSet``: one caption per image, image
    loader, optional references); returns flat metric names, without a prefix, and values
    (numbers, or strings recording the protocol used, e.g. the CLIP backbone)."""

    def __call__(self, captions: CaptionSet) -> Mapping[str, float | int | str]:
        """Return metrics such as ``{"r1": 0.42, "backbone": "ViT-g-14"}``."""


@runtime_checkable
class PolicyAware(Protocol):
    """Optional for rewards: a reward that needs the policy (e.g. to reuse its frozen
    language model as the reference LM) implements this; the trainer calls it once."""

    def bind_policy(self, policy: Policy) -> None:
        """Keep a reference to the policy being trained."""
