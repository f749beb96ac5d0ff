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
    loss = pg_loss + vf_coef * vf_loss
    if ent_coef:  # with 0 the backward would still run through the (B, T, V) entropy for zeros
        loss = loss - ent_coef * ent
    stats = {
        "loss/policy": pg_loss.detach(),
        "loss/value": vf_loss.detach(),
        "loss/entropy": ent.detach(),
        "loss/total": loss.detach(),
        "value/mean": masked_mean(values.detach(), mask, num_tokens),
        "advantage/mean": masked_mean(advantages.detach(), mask, num_tokens),
    }
    return loss, stats


# -- Group baselines (critic-free estimators) -------------------------------------------
#
# A group is the K captions of one image (``Rollout.group``). Every function takes the
# captions' totals x (B,), the group index (B,) and ``valid`` (B,), False for captions left
# out of the update (non-finite reward): those never enter a group's statistics.


def group_sums(x: torch.Tensor, group: torch.Tensor, valid: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-caption sum and count of its group's valid members.

    Args:
        x: Shape: (B,).
        group: Shape: (B,), long, image index of each caption.
        valid: Shape: (B,), bool.

    Returns:
        sums, counts: Shape: (B,) each, the statistic of the caption's own group.
    """
    n = int(group.max().item()) + 1 if group.numel() else 0
    w = valid.to(x.dtype)
    sums = torch.zeros(n, dtype=x.dtype, device=x.device).index_add_(0, group, x * w)
    counts = torch.zeros(n, dtype=x.dtype, device=x.device).index_add_(0, group, w)
    return sums[group], counts[group]


def group_mean(x: torch.Tensor, group: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of each caption's group (itself included). Shape: (B,)."""
    sums, counts = group_sums(x, group, valid)
    return sums / counts.clamp(min=1.0)


def leave_one_out_mean(x: torch.Tensor, group: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """RLOO's baseline: the mean of the *other* valid captions of each caption's group.

    A caption with no valid sibling gets itself as baseline (its advantage is then 0).

    Returns:
        Shape: (B,).
    """
    sums, counts = group_sums(x, group, valid)
    others = counts - valid.to(x.dtype)
    loo = (sums - x * valid.to(x.dtype)) / others.clamp(min=1.0)
    return torch.where(others > 0, loo, x)


def group_std(x: torch.Tensor, group: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Standard deviation of each caption's group, with Bessel's correction (as
    ``torch.std`` and TRL's GRPO); 0 for a group of one. Shape: (B,)."""
    mean = group_mean(x, group, valid)
    sq, counts = group_sums((x - mean) ** 2, group, valid)
    return (sq / (counts - 1).clamp(min=1.0)).sqrt()


def batch_std(x: torch.Tensor, valid: torch.Tensor, reduce: Reduce = identity) -> torch.Tensor:
    """Standard deviation of the valid entries of the whole batch (over processes with
    ``reduce``), with Bessel's correction. Shape: ()."""
    w = valid.to(x.dtype)
    count = reduce(w.sum())
    mean = reduce((x * w).sum()) / count.clamp(min=1.0)
    sq = reduce(((x - mean) ** 2 * w).sum())
    return (sq / (count - 1).clamp(min=1.0)).sqrt()


def baseline_advantages(returns: torch.Tensor, baseline: torch.Tensor, mask: torch.Tensor,
                        scale: torch.Tensor | None = None, eps: float = 1e-4) -> torch.Tensor:
    """A_{i,k} = (R_{i,k} - b_i) / (s_i + eps): per-token returns against a per-caption baseline.

    Per-token rewards stay where they stand: R_{i,k} is caption i's return from token k on,
    so a penalty on token k reaches tokens 0..k only; the baseline b_i (computed from whole
    captions' totals R_{j,0}) is the same at every token of caption i.

    Args:
        returns: Shape: (B, T).
        baseline: Shape: (B,).
        mask: Shape: (B, T), bool.
        scale: Shape: (B,) or (); None = no scaling (eps unused).

    Returns:
        Shape: (B, T), zero on padding.
    """
    adv = returns - baseline.unsqueeze(1)
    if scale is not None:
        adv = adv / (scale.reshape(-1, 1) + eps) if scale.dim() else adv / (scale + eps)
    return adv * mask


# -- Loss pieces ------------------------------------------------------------------------


def caption_token_counts(mask: torch.Tensor) -> torch.Tensor:
    """Shape: (B,), float: real tokens of each caption (0 for a dropped one)."""
    return mask.sum(dim=1).to(torch.float32)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: str, *,
              num_tokens: torch.Tensor, num_captions: torch.Tensor,
              max_tokens: int = 1) -> torch.Tensor:
    """Reduce a per-token loss to a scalar, the way each estimator normalises it.

    ``token``: sum over real tokens / all real tokens (each token weighs the same; A2C,
    RLOO, SCST, DAPO). ``sequence``: each caption's token mean, averaged over captions
    (GRPO: a long caption's tokens weigh less). ``fixed``: sum over real tokens /
    (captions x max_tokens), a constant per batch (Dr. GRPO: no length normalisation).

    Args:
        per_token: Shape: (B, T).
        mask: Shape: (B, T), bool.
        how: ``token``, ``sequence`` or ``fixed``.
        num_tokens: Real tokens of the whole batch (over processes): ``token``'s denominator.
        num_captions: Captions of the whole batch that have tokens: ``sequence``'s and
            ``fixed``'s denominator.
        max_tokens: ``fixed``'s length constant.

    Returns:
        Shape: (); this process's share of the whole batch's value.
    """
    x = per_token * mask.to(per_token.dtype)
    if how == "token":
        return x.sum() / num_tokens.to(x.dtype).clamp(min=1.0)
    if how == "sequence":
        per_caption = x.sum(dim=1) / caption_token_counts(mask).to(x.dtype).clamp(min=1.0)
        return per_caption.sum() / num_captions.to(x.dtype).clamp(min=1.0)
    if how == "fixed":
        return x.sum() / (num_captions.to(x.dtype).clamp(min=1.0) * max_tokens)
    raise ValueError(f"unknown aggregation {how!r}: token, sequence or fixed")


def clipped_surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                      advantages: torch.Tensor, clip: float
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped objective per token, as a loss to minimise.

    L_k = -min(rho_k A_k, clip(rho_k, 1 - clip, 1 + clip) A_k), rho_k = exp(log pi - log pi_old).

    Args:
        logprobs: Shape: (B, T), with gradient.
        old_logprobs: Shape: (B, T), the sampling policy's.
        advantages: Shape: (B, T), constants.
        clip: epsilon.

    Returns:
        loss: Shape: (B, T). clipped: Shape: (B, T), bool, where the clipped term was taken
        (no gradient flows there). log_ratio: Shape: (B, T), detached.
    """
    log_ratio = logprobs - old_logprobs.detach()
    ratio = log_ratio.exp()
    adv = advantages.detach()
    unclipped, clipped = ratio * adv, ratio.clamp(1.0 - clip, 1.0 + clip) * adv
    return -torch.minimum(unclipped, clipped), (clipped < unclipped).detach(), log_ratio.detach()


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
          mask: torch.Tensor | None = None) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || pi_ref) per token: exp(d) - d - 1, d = log pi_ref
    - log pi; unbiased, non-negative, differentiable through ``logprobs``. Shape: (B, T).

    With ``mask`` (B, T) bool, padding gets exactly 0 whatever either log-prob holds there
    (a suppressed pad token scores the smallest float, and exp of the difference would be
    inf, and inf x 0 = NaN in any masked sum), and its gradient is 0 too.
    """
    d = ref_logprobs.detach() - logprobs
    if mask is not None:
        d = torch.where(mask.to(d.device), d, torch.zeros_like(d))
    return d.exp() - d - 1.0
