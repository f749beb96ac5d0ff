"""Pure RL math for the A2C update: tensors in, tensors out.

No state, no logging, no ``.item()``. Shape letters: B captions, T generated tokens.
Masks are bool with True = a real generated token; padding never enters a mean.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

#: Sums a tensor over processes (identity in one process); see ``vlrm.distributed``.
Reduce = Callable[[torch.Tensor], torch.Tensor]


def identity(x: torch.Tensor) -> torch.Tensor:
    """The ``Reduce`` of a single process: ``x`` itself."""
    return x


def masked_mean(x: torch.Tensor, mask: torch.Tensor,
                count: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is True.

    Args:
        x: Shape: (B, T).
        mask: Shape: (B, T), bool.
        count: The denominator, default ``mask.sum()``. With a batch split over processes,
            the real tokens of the whole batch: each process's result is then its share of
            the mean, and the shares add up to the mean of the whole batch.

    Returns:
        Shape: (). Zero when the mask is empty.
    """
    m = mask.to(x.dtype)
    count = m.sum() if count is None else count.to(x.dtype)
    return (x * m).sum() / count.clamp(min=1.0)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8,
                  reduce: Reduce = identity) -> torch.Tensor:
    """Shift and scale ``x`` to zero mean and unit variance over the masked positions.

    Args:
        x: Shape: (B, T).
        mask: Shape: (B, T), bool.
        reduce: Sums over processes, so the statistics are those of the whole batch.

    Returns:
        Shape: (B, T), zero on padding.
    """
    m = mask.to(x.dtype)
    count = reduce(m.sum()).clamp(min=1.0)
    mean = reduce((x * m).sum()) / count
    var = reduce(((x - mean) ** 2 * m).sum()) / count
    return ((x - mean) * torch.rsqrt(var + eps)) * mask


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Position of the last real token of each row.

    Args:
        mask: Shape: (B, T), bool; each row has at least one True.

    Returns:
        Shape: (B,), long.
    """
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask, positions, -1).amax(dim=1)


def place_on_last_token(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Turn one reward per caption into per-token rewards on each caption's last token.

    Args:
        rewards: Shape: (B,).
        mask: Shape: (B, T), bool.

    Returns:
        Shape: (B, T): ``rewards[b]`` at the last real token of row b, zero elsewhere.
    """
    out = torch.zeros(mask.shape, dtype=rewards.dtype, device=rewards.device)
    last = last_token_index(mask)
    has_token = last >= 0
    rows = torch.arange(mask.shape[0], device=mask.device)[has_token]
    out[rows, last[has_token]] = rewards[has_token]
    return out


def drop_nonfinite(rewards: torch.Tensor, mask: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Leave out of the update every caption with a NaN or infinite reward on a real token.

    Args:
        rewards: Shape: (B, T). Per-token rewards.
        mask: Shape: (B, T), bool.

    Returns:
        rewards: Shape: (B, T), zero on the dropped rows and on padding.
        mask: Shape: (B, T), bool, all False on the dropped rows.
        dropped: Shape: (B,), bool.
    """
    dropped = (~torch.isfinite(rewards) & mask).any(dim=1)
    mask = mask & ~dropped.unsqueeze(1)
    return torch.where(mask, rewards, torch.zeros_like(rewards)), mask, dropped


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Per-token returns R(t_k) = sum_{s >= k} gamma^(s - k) r_s within each caption.

    Args:
        rewards: Shape: (B, T). Per-token rewards r_s.
        mask: Shape: (B, T), bool.
        gamma: Discount; the paper uses 1.

    Returns:
        Shape: (B, T), zero on padding.
    """
    rewards = rewards * mask
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for k in range(rewards.shape[1] - 1, -1, -1):
        running = rewards[:, k] + gamma * running
        returns[:, k] = running
    return returns * mask


def advantages(
    returns: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, whiten: bool = False,
    reduce: Reduce = identity,
) -> torch.Tensor:
    """A_k = R(t_k) - V(s_k), with the values detached; optionally whitened.

    Args:
        returns: Shape: (B, T).
        values: Shape: (B, T).
        mask: Shape: (B, T), bool.
        whiten: Normalise to zero mean, unit variance over real tokens.
        reduce: Sums over processes (whitening then uses the whole batch's statistics).

    Returns:
        Shape: (B, T), no gradient, zero on padding.
    """
    adv = (returns - values.detach()) * mask
    return masked_whiten(adv, mask, reduce=reduce) if whiten else adv


def a2c_loss(
    logprobs: torch.Tensor,
    values: torch.Tensor,
    entropy: torch.Tensor,
    returns: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    vf_coef: float = 0.5,
    ent_coef: float = 0.0,
    num_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Advantage actor-critic loss over the generated tokens.

    L = -mean(A * log pi) + vf_coef * mean((V - R)^2) - ent_coef * mean(entropy),
    every mean taken over real tokens only.

    Args:
        logprobs: Shape: (B, T). log pi(t_k), with gradient.
        values: Shape: (B, T). V(s_k), with gradient.
        entropy: Shape: (B, T). Policy entropy at each position.
        returns: Shape: (B, T). Targets R(t_k).
        advantages: Shape: (B, T). Treated as constants.
        mask: Shape: (B, T), bool.
        vf_coef: Weight c_v of the value loss.
        ent_coef: Weight c_e of the entropy bonus.
        num_tokens: Denominator of every mean (see ``masked_mean``); default the real
            tokens of ``mask``. A process holding part of a batch passes the whole batch's
            count, and the loss and stats of all processes add up to the whole batch's.

    Returns:
        The scalar loss and a dict of detached scalars: ``loss/policy``, ``loss/value``,
        ``loss/entropy``, ``loss/total``, ``value/mean``, ``advantage/mean``.
    """
    pg_loss = -masked_mean(advantages.detach() * logprobs, mask, num_tokens)
    vf_loss = masked_mean((values - returns.detach()) ** 2, mask, num_tokens)
    ent = masked_mean(entropy, mask, num_tokens)
    loss = pg_loss + vf_coef * vf_loss - ent_coef * ent
    stats = {
        "loss/policy": pg_loss.detach(),
        "loss/value": vf_loss.detach(),
        "loss/entropy": ent.detach(),
        "loss/total": loss.detach(),
        "value/mean": masked_mean(values.detach(), mask, num_tokens),
        "advantage/mean": masked_mean(advantages.detach(), mask, num_tokens),
    }
    return loss, stats
