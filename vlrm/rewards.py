"""Combining reward terms into the per-token reward of the A2C update."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.profiler import record_function
from attrs import frozen

from vlrm.errors import ConfigError, is_finite_real
from vlrm.protocols import PolicyAware, Reward
from vlrm.rl import group_mean, group_std, identity, place_on_last_token
from vlrm.structs import RewardOutput, Rollout


@frozen
class RewardTerm:
    """One weighted term of a composite reward.

    Args:
        reward: The reward model.
        weight: Multiplies the term before it is added to the total.
        normalize: Standardise the term with running statistics of its per-caption score
            before weighting [ours: off].
        clip: Clamp each per-token value (after normalising) to [-clip, clip]; 0 = off
            [ours: off].
    """

    reward: Reward
    weight: float = 1.0
    normalize: bool = False
    clip: float = 0.0

    def __attrs_post_init__(self) -> None:
        for key in ("weight", "clip"):
            value = getattr(self, key)
            if not is_finite_real(value):
                raise ConfigError(f"reward term {key} must be a finite number, got {value!r}")
        if not isinstance(self.normalize, bool):
            raise ConfigError(f"reward term normalize must be true or false, got {self.normalize!r}")


class RunningMoments:
    """Running mean and variance of a stream of scores (Chan et al.'s parallel update).

    Attributes:
        count: Scores seen.
        mean: Their mean.
        var: Their population variance.
    """

    def __init__(self) -> None:
        self.count, self.mean, self.var = 0, 0.0, 1.0

    def update(self, x: torch.Tensor) -> None:
        """Fold in a batch. Shape: (B,)."""
        x = x.detach().double().flatten()
        n = x.numel()
        if n == 0:
            return
        batch_mean, batch_var = x.mean().item(), x.var(unbiased=False).item()
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = (self.var * self.count + batch_var * n + delta * delta * self.count * n / total)
        self.mean += delta * n / total
        self.var = m2 / total
        self.count = total

    @property
    def std(self) -> float:
        return max(self.var, 0.0) ** 0.5

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "var": self.var}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.var = int(state["count"]), float(state["mean"]), float(state["var"])


def standardize(per_token: torch.Tensor, mask: torch.Tensor, mean: float, std: float,
                eps: float = 1e-8) -> torch.Tensor:
    """Rescale per-token rewards so each caption's total becomes (total - mean) / std.

    Every token is divided by std and the mean is taken off the last token, so the terms
    keep their placement.

    Args:
        per_token: Shape: (B, T).
        mask: Shape: (B, T), bool.

    Returns:
        Shape: (B, T), zero on padding.
    """
    scaled = per_token / (std + eps)
    shift = torch.full((per_token.shape[0],), mean / (std + eps), device=per_token.device)
    return (scaled - place_on_last_token(shift, mask)) * mask


@frozen
class GroupSpread:
    """One term's statistics within each image's group, per caption. Shapes: (B,) each.

    Attributes:
        valid: The caption's total is finite (only those enter the statistics).
        mean: Its group's mean total.
        std: Its group's std of the totals.
        tied: Its group's std is at most ``tie_tol`` x max(1, |mean|) (float noise between
            identical captions counts as a tie).
    """

    valid: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    tied: torch.Tensor


def group_spread(per_token: torch.Tensor, group: torch.Tensor, tie_tol: float = 1e-5
                 ) -> GroupSpread:
    """The group statistics of per-token rewards (B, T) by their captions' totals."""
    totals = per_token.sum(dim=1)
    valid = torch.isfinite(totals)
    safe = torch.where(valid, totals, torch.zeros_like(totals))
    mean = group_mean(safe, group, valid)
    std = group_std(safe, group, valid)
    return GroupSpread(valid, mean, std, std <= tie_tol * mean.abs().clamp(min=1.0))


def group_standardize(per_token: torch.Tensor, mask: torch.Tensor, group: torch.Tensor,
                      eps: float = 1e-4, tie_tol: float = 1e-5,
                      spread: GroupSpread | None = None) -> torch.Tensor:
    """Rescale per-token rewards so each caption's total becomes its z-score within its
    image's group: (total - group mean) / (group std + eps), placement kept as
    ``standardize`` keeps it. Captions with a non-finite total never enter the statistics
    (and stay non-finite, to be dropped by the trainer). A tied group (spread at most
    ``tie_tol`` x max(1, |group mean|)) gets 0 at every token.

    Args:
        per_token: Shape: (B, T).
        mask: Shape: (B, T), bool.
        group: Shape: (B,), long, image index of each caption.
        spread: ``group_spread(per_token, group, tie_tol)`` when the caller has it already.

    Returns:
        Shape: (B, T), zero on padding.
    """
    spread = group_spread(per_token, group, tie_tol) if spread is None else spread
    # A tied group (every caption's total the same, e.g. K identical captions) has nothing to
    # rank: its z-scores are 0, and so is the term at every token. Dividing its per-token
    # rewards by std + eps instead would scale them by up to 1 / eps, and the returns-to-go
    # between them (sum to 0 over the caption, not token by token) with them.
    scale = torch.where(spread.tied, torch.full_like(spread.std, math.inf), spread.std + eps)
    return (per_token / scale.unsqueeze(1) - place_on_last_token(spread.mean / scale, mask)) * mask


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
    term's own metrics appear as ``<name>/<key>``. A term with ``normalize`` also logs
    ``<name>/normalized`` (its mean score after normalising and clipping) and the running
    ``<name>/running_mean`` and ``<name>/running_std``; one with ``clip`` logs
    ``<name>/clipped``, the share of its nonzero token values that were clipped.

    With ``group_normalize`` each term is first normalised within each image's group of K
    captions (its per-caption totals become z-scores, ``group_standardize``) before the
    weighted sum, as BalCapRL does: a term with a large spread can then no longer drown the
    others, whatever its scale. A group whose captions tie on a term (K identical captions,
    or the same penalty count) gets 0 from that term. It logs ``<name>/group_std``, the term's
    mean spread, and ``<name>/group_tied``, the share of captions in tied groups.

    Args:
        terms: Reward terms keyed by name.
        group_normalize: Normalise each term within its image's group before the weighted
            sum (decoupled normalisation) [ours: off; needs trainer.samples_per_image >= 2].
    """

    def __init__(self, terms: dict[str, RewardTerm], group_normalize: bool = False) -> None:
        if not terms:
            raise ConfigError("reward.terms is empty: configure at least one reward term")
        self.terms = dict(terms)
        if not isinstance(group_normalize, bool):
            raise ConfigError(f"reward.group_normalize must be true or false, got {group_normalize!r}")
        self.group_normalize = group_normalize
        for name, term in self.terms.items():
            if term.clip < 0:
                raise ConfigError(f"reward.terms.{name}.clip must be >= 0, got {term.clip}")
        self.moments = {name: RunningMoments() for name, term in self.terms.items() if term.normalize}
        self._gather = identity

    def gather_statistics_with(self, gather: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Update the running normalisation with ``gather(scores)`` instead of this process's
        scores: with a batch split over processes (``World.all_gather``), every process then
        keeps the statistics of the whole batch."""
        self._gather = gather

    def bind_policy(self, policy: object) -> None:
        """Hand the policy to every term that asks for it (e.g. one reusing the policy's LM)."""
        for term in self.terms.values():
            bind_if_policy_aware(term.reward, policy)

    @torch.no_grad()
    def __call__(self, rollout: Rollout) -> RewardOutput:
        total = torch.zeros(rollout.mask.shape, dtype=torch.float32, device=rollout.mask.device)
        metrics: dict[str, float] = {}
        raw: dict[str, torch.Tensor] = {}
        for name, term in self.terms.items():
            with record_function(f"vlrm.reward.{name}"):
                output = term.reward(rollout)
            per_token = to_token_rewards(output, rollout.mask, name)
            raw[name] = per_token.sum(dim=1)
            metrics[name] = raw[name].mean().item()
            metrics.update({f"{name}/{key}": value for key, value in output.metrics.items()})
            if self.group_normalize:
                group = rollout.group.to(per_token.device)
                spread = group_spread(per_token, group)
                valid = spread.valid
                metrics[f"{name}/group_std"] = spread.std[valid].mean().item() if valid.any() else 0.0
                metrics[f"{name}/group_tied"] = (spread.tied[valid].float().mean().item()
                                                 if valid.any() else 0.0)
                per_token = group_standardize(per_token, rollout.mask, group, spread=spread)
            per_token = self._shape(name, term, per_token, rollout.mask, metrics)
            total = total + term.weight * per_token
        metrics["total"] = total.sum(dim=1).mean().item()
        return RewardOutput(token=total, metrics=metrics, terms=raw)

    def _shape(self, name: str, term: RewardTerm, per_token: torch.Tensor, mask: torch.Tensor,
               metrics: dict[str, float]) -> torch.Tensor:
        """Running normalisation, then clipping, of one term; logs what each did."""
        if term.normalize:
            moments = self.moments[name]
            totals = self._gather(per_token.sum(dim=1))
            moments.update(totals[torch.isfinite(totals)])  # a NaN must not poison the statistics
            per_token = standardize(per_token, mask, moments.mean, moments.std)
            metrics[f"{name}/running_mean"] = moments.mean
            metrics[f"{name}/running_std"] = moments.std
        if term.clip:
            nonzero = (per_token != 0) & mask
            clipped = (per_token.abs() > term.clip) & nonzero
            metrics[f"{name}/clipped"] = clipped.sum().item() / max(nonzero.sum().item(), 1)
            per_token = per_token.clamp(-term.clip, term.clip)
        if term.normalize or term.clip:
            metrics[f"{name}/normalized"] = per_token.sum(dim=1).mean().item()
        return per_token

    def state_dict(self) -> dict[str, dict[str, float]]:
        """Running normalisation statistics, per term (saved with the trainer state)."""
        return {name: m.state_dict() for name, m in self.moments.items()}

    def load_state_dict(self, state: dict[str, dict[str, float]]) -> None:
        for name, values in state.items():
            if name in self.moments:
                self.moments[name].load_state_dict(values)
