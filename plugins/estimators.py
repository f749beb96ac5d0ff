"""Advantage estimators beside the paper's A2C: RLOO, GRPO, Dr. GRPO, SCST, and PPO-clip on
top of any of them. Registered through ``vlrm_register_objectives``, as a third party's would be.

How a per-caption baseline meets per-token rewards (the penalties stay per token): every
estimator starts from the per-token returns R_{i,k} = sum_{s >= k} gamma^(s-k) r_{i,s} of
caption i (token k), and compares them with a baseline b_i computed from whole captions'
returns R_{j,0} (the caption totals), the same at every token of caption i:

    RLOO      A_{i,k} = R_{i,k} - mean_{j in G(i), j != i} R_{j,0}
    GRPO      A_{i,k} = (R_{i,k} - mean_{j in G(i)} R_{j,0}) / (s_i + eps)
              s_i = std of G(i)'s totals (group), of the whole batch's (batch), or 1 (none)
    Dr. GRPO  A_{i,k} = R_{i,k} - mean_{j in G(i)} R_{j,0}
    SCST      A_{i,k} = R_{i,k} - R^greedy_{g(i),0}

G(i) is the group of caption i: the K captions of its image (captions dropped for a
non-finite reward left out). A penalty on token k thus lowers the advantages of tokens 0..k
of its own caption only, and every caption's first token carries its total against the
baseline, as a sequence-level estimator would have it.
"""

from __future__ import annotations

from typing import Any

import torch
from attrs import define, evolve, field

from vlrm import hookimpl
from vlrm import rl
from vlrm.errors import ConfigError, is_real
from vlrm.objective import A2C, Estimator, StepBatch, Targets
from vlrm.protocols import GreedySampler, Objective, ReferenceScorer, implements, require
from vlrm.rewards import to_token_rewards
from vlrm.structs import PolicyOutput

SCALINGS = ("group", "batch", "none")


def _totals(batch: StepBatch, returns: torch.Tensor) -> torch.Tensor:
    """Each caption's total return R_{i,0}. Shape: (B,)."""
    return returns[:, 0] if returns.shape[1] else returns.new_zeros(returns.shape[0])


def _spread(totals: torch.Tensor, batch: StepBatch) -> dict[str, float]:
    """How much the groups' totals vary: groups with no spread teach nothing."""
    std = rl.group_std(totals, batch.rollout.group.to(totals.device), batch.valid)
    return {"group_std": std[batch.valid].mean().item() if batch.valid.any() else 0.0,
            "flat_groups": (std[batch.valid] < 1e-6).float().mean().item()
            if batch.valid.any() else 0.0}


def _needs_groups(name: str, batch: StepBatch) -> None:
    if batch.rollout.batch_size <= len(batch.rollout.images):
        raise ConfigError(f"objective {name} compares the K captions of each image: set "
                          "trainer.samples_per_image >= 2 (it is 1)")


@define
class RLOO(Estimator):
    """REINFORCE leave-one-out (Ahmadian et al. 2024): each caption's baseline is the mean
    total of the other K-1 captions of its image. Unbiased, no critic.

    Args:
        gamma, ent_coef, aggregation, max_tokens: See ``vlrm.objective.Estimator``
            [ours: token mean, as A2C].
    """

    def advantages(self, batch: StepBatch, returns: torch.Tensor) -> tuple[torch.Tensor, dict]:
        _needs_groups("RLOO", batch)
        totals = _totals(batch, returns)
        group = batch.rollout.group.to(totals.device)
        baseline = rl.leave_one_out_mean(totals, group, batch.valid)
        return rl.baseline_advantages(returns, baseline, batch.mask), _spread(totals, batch)


@define
class GRPO(Estimator):
    """Group-relative advantages (Shao et al. 2024, DeepSeekMath): the caption's return
    against its group's mean, divided by a spread.

    Args:
        scale_rewards: ``group`` (each group's std, the original), ``batch`` (the whole
            step's std over every process, as TRL's option) or ``none``.
        eps: Added to the std.
        aggregation: [original GRPO: ``sequence``, each caption's token mean].
        gamma, ent_coef, max_tokens: See ``vlrm.objective.Estimator``.
    """

    aggregation: str = "sequence"
    scale_rewards: str = "group"
    eps: float = 1e-4

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if self.scale_rewards not in SCALINGS:
            raise ConfigError(f"objective GRPO: scale_rewards must be one of {', '.join(SCALINGS)}, "
                              f"got {self.scale_rewards!r}")
        if not is_real(self.eps) or not self.eps > 0:
            raise ConfigError(f"objective GRPO: eps must be a number > 0, got {self.eps!r}")

    def advantages(self, batch: StepBatch, returns: torch.Tensor) -> tuple[torch.Tensor, dict]:
        _needs_groups(type(self).__name__, batch)
        totals = _totals(batch, returns)
        group = batch.rollout.group.to(totals.device)
        baseline = rl.group_mean(totals, group, batch.valid)
        if self.scale_rewards == "group":
            scale = rl.group_std(totals, group, batch.valid)
        elif self.scale_rewards == "batch":
            scale = rl.batch_std(totals, batch.valid, self._reduce)
        else:
            scale = None
        return (rl.baseline_advantages(returns, baseline, batch.mask, scale, self.eps),
                _spread(totals, batch))


@define
class DrGRPO(GRPO):
    """GRPO done right (Liu et al. 2025): no std scaling, and no per-caption length
    normalisation (the loss is summed over tokens and divided by captions x max_tokens,
    a constant), which removes GRPO's biases towards short right and long wrong answers.

    Args:
        max_tokens: The length constant; 0 = the policy's ``max_new_tokens``.
        gamma, ent_coef: See ``vlrm.objective.Estimator``.
    """

    aggregation: str = "fixed"
    scale_rewards: str = "none"


@define
class SCST(Estimator):
    """Self-critical sequence training (Rennie et al. 2017): the baseline of an image's
    captions is the reward of its greedy caption, decoded once more each step (without
    gradient) and scored by the same reward (so terms with running normalisation see the
    greedy captions too). An image whose greedy reward is not finite falls back to the mean
    of its sampled captions.

    Args:
        gamma, ent_coef, aggregation, max_tokens: See ``vlrm.objective.Estimator``.
    """

    _policy: Any = field(default=None, init=False, repr=False)
    _reward: Any = field(default=None, init=False, repr=False)

    def setup(self, policy: Any, reward: Any, world: Any, seed: int) -> None:
        super().setup(policy, reward, world, seed)
        if not implements(policy, GreedySampler):
            raise ConfigError(f"objective SCST needs a policy that samples greedily "
                              f"(vlrm.protocols.GreedySampler: sample(..., greedy=True)); "
                              f"{type(policy).__name__} does not")
        self._policy, self._reward = policy, reward

    @torch.no_grad()
    def greedy_totals(self, batch: StepBatch) -> torch.Tensor:
        """Total reward of each image's greedy caption. Shape: (N,)."""
        rollout = batch.rollout
        greedy = self._policy.sample(list(rollout.images), list(rollout.image_ids), 1,
                                     greedy=True)
        per_token = to_token_rewards(self._reward(greedy), greedy.mask, "greedy")
        return per_token.sum(dim=1).to(batch.rewards.device)

    def advantages(self, batch: StepBatch, returns: torch.Tensor) -> tuple[torch.Tensor, dict]:
        totals = _totals(batch, returns)
        group = batch.rollout.group.to(totals.device)
        greedy = self.greedy_totals(batch)
        baseline = greedy[group]
        fallback = rl.group_mean(totals, group, batch.valid)
        baseline = torch.where(torch.isfinite(baseline), baseline, fallback)
        stats = {"greedy_reward": greedy[torch.isfinite(greedy)].mean().item()
                 if torch.isfinite(greedy).any() else 0.0,
                 "beats_greedy": (totals > baseline)[batch.valid].float().mean().item()
                 if batch.valid.any() else 0.0}
        return rl.baseline_advantages(returns, baseline, batch.mask), stats


@define
class PPOClip:
    """PPO's clipped surrogate on top of any estimator's advantages: ``epochs`` passes over
    each rollout in ``minibatches`` parts of its images, the ratio pi / pi_old taken against
    the rollout's own log-probs and clipped to [1 - clip, 1 + clip]. Advantages are fixed
    before the first update (an estimator with a critic, A2C, runs one extra forward pass
    for its values). Optionally a KL penalty in the loss, Schulman's k3 estimator against
    the initial policy (beside any reward-side KL term). Logs ``ppo/clip_fraction`` and
    ``ppo/approx_kl`` (k3 of pi_old against pi).

    Args:
        estimator: The advantages (``vlrm.objective.A2C``, GRPO, RLOO, ...).
        epochs: Passes over each rollout [ours: 2].
        minibatches: Parts of each process's images per pass [ours: 2].
        clip: epsilon [ours: 0.2].
        kl_coef: Weight of the k3 KL penalty against the initial policy; 0 = off (it needs
            a policy that scores under its initial self, vlrm.protocols.ReferenceScorer).
    """

    estimator: Objective
    epochs: int = 2
    minibatches: int = 2
    clip: float = 0.2
    kl_coef: float = 0.0
    _policy: Any = field(default=None, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        require(self.estimator, Objective, "objective PPOClip: estimator")
        if not hasattr(self.estimator, "aggregate"):
            raise ConfigError("objective PPOClip: estimator must be a vlrm.objective.Estimator "
                              f"(its loss takes the surrogate); {type(self.estimator).__name__} "
                              "is not")
        for key, low in (("epochs", 1), ("minibatches", 1), ("clip", 0.0), ("kl_coef", 0.0)):
            value = getattr(self, key)
            if not is_real(value) or not value >= low or (key == "clip" and value == 0):
                raise ConfigError(f"objective PPOClip: {key} must be a number "
                                  f"{'>' if key == 'clip' else '>='} {low}, got {value!r}")

    @property
    def critic(self) -> Any:
        return self.estimator.critic

    @property
    def value_head(self) -> Any:
        return getattr(self.estimator, "value_head", None)

    def setup(self, policy: Any, reward: Any, world: Any, seed: int) -> None:
        self.estimator.setup(policy, reward, world, seed)
        if self.kl_coef:
            if not implements(policy, ReferenceScorer):
                raise ConfigError(f"objective PPOClip: kl_coef needs a policy that implements "
                                  f"vlrm.protocols.ReferenceScorer; {type(policy).__name__} does not")
            policy.snapshot_reference()
        self._policy = policy

    def param_groups(self) -> list[dict[str, Any]]:
        return self.estimator.param_groups()

    def prepare(self, batch: StepBatch) -> Targets:
        targets = self.estimator.prepare(batch)
        if targets.advantages is None:  # A2C: values before the update
            targets = self.estimator.with_values(targets, batch.values())
        if self.kl_coef:
            ref = self._policy.reference_logprobs(batch.rollout).to(batch.mask.device)
            targets = evolve(targets, ref_logprobs=ref)
        return targets

    def loss(self, targets: Targets, out: PolicyOutput, values: torch.Tensor | None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mask = targets.mask
        surrogate, clipped, log_ratio = rl.clipped_surrogate(
            out.logprobs, targets.old_logprobs.to(out.logprobs.device), targets.advantages,
            self.clip)
        loss, stats = self.estimator.loss(targets, out, values, policy_term=surrogate)
        if self.kl_coef:
            kl = self.estimator.aggregate(rl.k3_kl(out.logprobs, targets.ref_logprobs, mask), mask)
            loss = loss + self.kl_coef * kl
            stats["loss/kl"] = kl.detach()
            stats["loss/total"] = loss.detach()
        stats["ppo/clip_fraction"] = self.estimator.token_mean(clipped.float(), mask)
        stats["ppo/approx_kl"] = self.estimator.token_mean(log_ratio.exp() - 1 - log_ratio, mask)
        return loss, stats

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.estimator.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.estimator.load_state_dict(state)

    def describe(self) -> dict[str, Any]:
        return {**self.estimator.describe(), "estimator": type(self.estimator).__name__,
                "epochs": self.epochs, "minibatches": self.minibatches}


@hookimpl
def vlrm_register_objectives() -> dict[str, Any]:
    return {"a2c": A2C, "rloo": RLOO, "grpo": GRPO, "dr_grpo": DrGRPO, "scst": SCST,
            "ppo_clip": PPOClip}
