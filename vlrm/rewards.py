"""Combining reward terms into the per-token reward of the A2C update."""

from __future__ import annotations

import torch
from attrs import frozen

from vlrm.errors import ConfigError
from vlrm.protocols import PolicyAware, Reward
from vlrm.rl import place_on_last_token
from vlrm.structs import RewardOutput, Rollout


@frozen
class RewardTerm:
    """One weighted term of a composite reward.

    Args:
        reward: The reward model.
        weight: Multiplies the term before it is added to the total.
    """

    reward: Reward
    weight: float = 1.0


def to_token_rewards(output: RewardOutput, mask: torch.Tensor, name: str) -> torch.Tensor:
    """Per-token view of a reward: a sequence score lands on the caption's last token.

    Args:
        output: The reward's output for a rollout of B captions and T tokens.
        mask: Shape: (B, T), bool.
        name: The term's name, for error messages.

    Returns:
        Shape: (B, T), float32, zero on padding.
    """
    b, t = mask.shape
    total = torch.zeros((b, t), dtype=torch.float32, device=mask.device)
    if output.sequence is not None:
        if tuple(output.sequence.shape) != (b,):
            raise ValueError(f"reward {name!r} returned sequence rewards of shape "
                             f"{tuple(output.sequence.shape)}, expected ({b},)")
        total = total + place_on_last_token(output.sequence.float().to(mask.device), mask)
    if output.token is not None:
        if tuple(output.token.shape) != (b, t):
            raise ValueError(f"reward {name!r} returned token rewards of shape "
                             f"{tuple(output.token.shape)}, expected ({b}, {t})")
        total = total + output.token.float().to(mask.device) * mask
    return total


def bind_if_policy_aware(reward: object, policy: object) -> None:
    """Give ``policy`` to a reward that implements ``PolicyAware``; others are untouched."""
    if isinstance(reward, PolicyAware):
        reward.bind_policy(policy)


class CompositeReward:
    """A weighted sum of named reward terms, itself a ``Reward``.

    The terms are a mapping so that one can be reweighted or added from the command line
    (``--reward.terms.clip.weight 0.5``). Metrics: ``<name>`` is the mean unweighted
    score per caption of each term, ``total`` the mean weighted sum per caption, and each
    term's own metrics appear as ``<name>/<key>``.

    Args:
        terms: Reward terms keyed by name.
    """

    def __init__(self, terms: dict[str, RewardTerm]) -> None:
        if not terms:
            raise ConfigError("reward.terms is empty: configure at least one reward term")
        self.terms = dict(terms)

    def bind_policy(self, policy: object) -> None:
        """Hand the policy to every term that asks for it (e.g. one reusing the policy's LM)."""
        for term in self.terms.values():
            bind_if_policy_aware(term.reward, policy)

    @torch.no_grad()
    def __call__(self, rollout: Rollout) -> RewardOutput:
        total = torch.zeros(rollout.mask.shape, dtype=torch.float32, device=rollout.mask.device)
        metrics: dict[str, float] = {}
        for name, term in self.terms.items():
            output = term.reward(rollout)
            per_token = to_token_rewards(output, rollout.mask, name)
            total = total + term.weight * per_token
            metrics[name] = per_token.sum(dim=1).mean().item()
            metrics.update({f"{name}/{key}": value for key, value in output.metrics.items()})
        metrics["total"] = total.sum(dim=1).mean().item()
        return RewardOutput(token=total, metrics=metrics)
