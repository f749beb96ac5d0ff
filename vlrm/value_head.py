"""The learnable value head V(s_k) of the A2C critic."""

from __future__ import annotations

import torch
from torch import nn


class ValueHead(nn.Module):
    """MLP over the policy's last-layer hidden states: Linear(H, H') - GELU - Linear(H', 1).

    Computed in the head's own dtype (float32 unless the trainer made it float64 for a
    float64 policy) whatever the policy's dtype, so the value targets (sums of rewards) keep
    their precision. The input size comes from ``Policy.hidden_size``; the head never
    inspects a model config.

    Args:
        hidden_size: H, the policy's hidden size.
        inner_size: H', the width of the hidden layer.
    """

    def __init__(self, hidden_size: int, inner_size: int = 256) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.net = nn.Sequential(
            nn.Linear(hidden_size, inner_size), nn.GELU(), nn.Linear(inner_size, 1)
        )
        # A zero last layer starts every value at 0, so early advantages equal the returns.
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Values of the states.

        Args:
            hidden: Shape: (B, T, H), any float dtype.

        Returns:
            Shape: (B, T), in the head's dtype (float32 by default).
        """
        if hidden.shape[-1] != self.hidden_size:
            raise ValueError(
                f"value head expects hidden size {self.hidden_size}, got {hidden.shape[-1]}"
            )
        return self.net(hidden.to(self.net[0].weight.dtype)).squeeze(-1)
