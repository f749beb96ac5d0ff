"""A reward for caption length: the closer to ``target_words`` words, the better."""

from __future__ import annotations

import torch

from vlrm.structs import RewardOutput


class CaptionLengthReward:
    """Pays 1 for a caption of exactly ``target_words`` words, less the further it is.

    r = -|words - target| / target + 1, per caption.

    Args:
        target_words: The length that earns the full reward.
    """

    def __init__(self, target_words: int = 10) -> None:
        if target_words <= 0:
            raise ValueError(f"target_words must be positive, got {target_words}")
        self.target_words = target_words

    # No annotations needed: vlrm matches a reward by shape (a __call__ taking `rollout`).
    @torch.no_grad()
    def __call__(self, rollout):
        words = torch.tensor([len(c.split()) for c in rollout.captions], dtype=torch.float32)
        score = 1.0 - (words - self.target_words).abs() / self.target_words
        return RewardOutput(sequence=score, metrics={"words": words.mean().item()})
