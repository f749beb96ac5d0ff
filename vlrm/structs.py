"""Value objects passed between the stages of a training step.

Shape letters used throughout vlrm:
    N  images in a step
    B  sampled captions in a step (N * K, K samples per image)
    T  generated tokens (padded to the longest caption in the step)
    H  hidden size of the policy's language model
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from attrs import field, frozen


def _check_bt(name: str, value: torch.Tensor | None, shape: tuple[int, int]) -> None:
    if value is not None and tuple(value.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {shape}")


@frozen
class Rollout:
    """Captions sampled by a policy for a batch of images.

    Attributes:
        images: The N input images (PIL images), in the order of ``image_ids``.
        image_ids: N stable identifiers (e.g. file paths), used for caching and logging.
        group: Shape: (B,). Index into ``images`` of the image each caption describes.
        tokens: Shape: (B, T). Generated token ids, padding after the end of a caption.
        mask: Shape: (B, T). Bool, True = a real generated token (the end token included).
        logprobs: Shape: (B, T). Log-probabilities of ``tokens`` under the sampling policy.
        captions: B decoded captions.
        values: Shape: (B, T). Value estimates, when the caller computed them.
        token_ends: Shape: (B, T), long. Characters of ``captions[b]`` covered by tokens
            0..k; lets text rewards put a penalty on the token that completes a phrase.
            None when the policy cannot tell (rewards then use the last token).
        policy_state: Policy-private data reused when the policy scores its own rollout
            (e.g. frozen image features). Rewards must not rely on it.
    """

    images: Sequence[Any]
    image_ids: Sequence[str]
    group: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor
    logprobs: torch.Tensor
    captions: Sequence[str]
    values: torch.Tensor | None = None
    token_ends: torch.Tensor | None = None
    policy_state: Any = field(default=None, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        n, (b, t) = len(self.images), tuple(self.tokens.shape)
        if len(self.image_ids) != n:
            raise ValueError(f"{len(self.image_ids)} image_ids for {n} images")
        if tuple(self.group.shape) != (b,):
            raise ValueError(f"group has shape {tuple(self.group.shape)}, expected ({b},)")
        if len(self.captions) != b:
            raise ValueError(f"{len(self.captions)} captions for {b} token rows")
        if self.mask.dtype != torch.bool:
            raise ValueError(f"mask must be bool, got {self.mask.dtype}")
        for name in ("mask", "logprobs", "values", "token_ends"):
            _check_bt(name, getattr(self, name), (b, t))

    @property
    def batch_size(self) -> int:
        """B, the number of sampled captions."""
        return int(self.tokens.shape[0])

    @property
    def lengths(self) -> torch.Tensor:
        """Shape: (B,). Number of real generated tokens per caption."""
        return self.mask.sum(dim=1)


@frozen
class PolicyOutput:
    """What a policy computes, with gradients, for the tokens of a rollout.

    Attributes:
        logprobs: Shape: (B, T). log pi(t_k | image, t_<k).
        entropy: Shape: (B, T). Entropy of the policy's distribution at each position.
        hidden: Shape: (B, T, H). Last-layer hidden state of the state that emitted t_k,
            the input of the value head.
    """

    logprobs: torch.Tensor
    entropy: torch.Tensor
    hidden: torch.Tensor


@frozen
class RewardOutput:
    """A reward model's judgement of a rollout.

    At least one of ``sequence`` and ``token`` is set. A per-sequence reward is placed on
    the last generated token of its caption; a per-token reward is added where it stands.

    Attributes:
        sequence: Shape: (B,). One score per caption, float32, no gradient.
        token: Shape: (B, T). A score per generated token, zero on padding, float32.
        metrics: Extra scalars to log under ``reward/<term>/<key>``.
        terms: A composite reward's terms, each caption's total before weighting and
            normalisation: ``{term: (B,)}`` (for the trackers' sample tables).
    """

    sequence: torch.Tensor | None = None
    token: torch.Tensor | None = None
    metrics: dict[str, float] = field(factory=dict)
    terms: dict[str, torch.Tensor] = field(factory=dict)

    def __attrs_post_init__(self) -> None:
        if self.sequence is None and self.token is None:
            raise ValueError("a RewardOutput needs a sequence or a token reward")


@frozen
class Sample:
    """One captioned training image, as the trackers' sample tables show it.

    Attributes:
        image_id: The image's id.
        image: The RGB image (PIL).
        caption: One sampled caption.
        reward: The caption's total reward (sum over its tokens of the weighted terms).
        terms: Each reward term's total for the caption, before weighting.
        advantage: The mean advantage over the caption's tokens; None when the estimator
            computes advantages inside its loss (A2C: they need the critic's values).
    """

    image_id: str
    image: Any
    caption: str
    reward: float
    terms: dict[str, float]
    advantage: float | None
