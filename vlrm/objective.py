"""Objectives: how a step's per-token rewards become the loss the optimiser follows.

The trainer asks an objective (``vlrm.protocols.Objective``) two things each step::

    targets = objective.prepare(batch)                     # no gradient: advantages, ...
    for each of objective.epochs passes over the rollout:
        for each of objective.minibatches parts of its images:
            out, values = learner(part)                    # policy scores, critic values
            loss, stats = objective.loss(targets.select(rows), out, values)
            update

``Estimator`` holds what every estimator shares (discounted per-token returns, the loss
aggregation, the entropy bonus); ``A2C`` is the paper's actor-critic with the learnable value
head. The critic-free estimators (RLOO, GRPO, Dr. GRPO, SCST) and PPO-clip live in
``vlrm_plugins.estimators`` and register through the ``vlrm_register_objectives`` hook, as a
third-party estimator would.

Shape letters: see ``vlrm.structs`` (N images, B = N * K captions, T tokens, H hidden size).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from attrs import define, evolve, field, frozen
from torch import nn

from vlrm import rl
from vlrm.errors import ConfigError, is_real
from vlrm.structs import PolicyOutput, Rollout
from vlrm.value_head import ValueHead

AGGREGATIONS = ("token", "sequence", "fixed")


@frozen
class StepBatch:
    """What an objective is given to prepare a step's targets.

    Attributes:
        rollout: The captions this process sampled (its share of the step's images).
        rewards: Shape: (B, T). Per-token rewards (sequence rewards on the last token),
            zero on padding and on dropped captions.
        mask: Shape: (B, T), bool. Real tokens of the captions kept in the update.
        valid: Shape: (B,), bool. False for captions dropped for a non-finite reward.
        values: Computes V(s_k) of the rollout before any update, shape (B, T), without
            gradient: one extra forward pass, so only an estimator that needs values ahead
            of the update calls it (A2C under PPO-clip). None without a critic.
        seed: The run's seed and the step, for anything an objective draws at random.
    """

    rollout: Rollout
    rewards: torch.Tensor
    mask: torch.Tensor
    valid: torch.Tensor
    values: Callable[[], torch.Tensor] | None = None
    seed: tuple[int, int] = (0, 0)


@frozen
class Targets:
    """The detached quantities a loss is computed against, row-aligned with the rollout.

    Attributes:
        mask: Shape: (B, T), bool.
        returns: Shape: (B, T). Per-token returns R(t_k).
        old_logprobs: Shape: (B, T). log pi of the sampling policy (the rollout's).
        advantages: Shape: (B, T); None when they need the critic's values of the same
            forward pass (plain A2C computes them inside ``loss``).
        ref_logprobs: Shape: (B, T). The reference policy's, for a KL penalty; else None.
        stats: Scalars measured while preparing (averaged over processes in the log).
    """

    mask: torch.Tensor
    returns: torch.Tensor
    old_logprobs: torch.Tensor
    advantages: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    stats: dict[str, float] = field(factory=dict)

    def select(self, rows: torch.Tensor | None) -> Targets:
        """The targets of some rows (all of them for ``rows`` None)."""
        if rows is None:
            return self

        def pick(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x[rows.to(x.device)]

        return Targets(mask=pick(self.mask), returns=pick(self.returns),
                       old_logprobs=pick(self.old_logprobs), advantages=pick(self.advantages),
                       ref_logprobs=pick(self.ref_logprobs), stats=self.stats)


def select_images(rollout: Rollout, images: list[int]) -> tuple[Rollout, torch.Tensor]:
    """The part of a rollout that describes some of its images, for a minibatch.

    The policy's private state is dropped (the policy recomputes it from the images), so any
    policy can score the part.

    Returns:
        The sub-rollout, and the rows (B_part,) of the whole rollout it holds.
    """
    keep = torch.as_tensor(images, dtype=torch.long, device=rollout.group.device)
    rows = torch.nonzero(torch.isin(rollout.group, keep)).squeeze(1)
    remap = torch.full((len(rollout.images),), -1, dtype=torch.long, device=rollout.group.device)
    remap[keep] = torch.arange(len(images), device=rollout.group.device)

    def pick(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x[rows.to(x.device)]

    part = Rollout(images=[rollout.images[i] for i in images],
                   image_ids=[rollout.image_ids[i] for i in images],
                   group=remap[rollout.group[rows]], tokens=pick(rollout.tokens),
                   mask=pick(rollout.mask), logprobs=pick(rollout.logprobs),
                   captions=[rollout.captions[r] for r in rows.tolist()],
                   values=pick(rollout.values), token_ends=pick(rollout.token_ends))
    return part, rows


def minibatch_images(num_images: int, minibatches: int) -> list[list[int]]:
    """Image indices of each minibatch: image i goes to part i mod M.

    Strided, so that with the step's images split evenly over processes (each a multiple
    of M), part m of every process together is part m of the whole step.
    """
    return [list(range(m, num_images, minibatches)) for m in range(minibatches)]


def _check(owner: str, values: dict[str, Any], at_least: dict[str, float]) -> None:
    for key, low in at_least.items():
        value = values[key]
        if not is_real(value) or not value >= low:  # also catches NaN and null
            raise ConfigError(f"objective {owner}: {key} must be a number >= {low}, got {value!r}")


@define
class Estimator:
    """What every estimator shares: per-token discounted returns, the entropy bonus, and how
    the per-token loss is reduced (``rl.aggregate``). A subclass computes ``advantages``.

    Args:
        gamma: Discount of the per-token returns [paper: 1].
        ent_coef: Weight of the entropy bonus [ours: 0].
        aggregation: ``token`` (mean over all real tokens), ``sequence`` (mean of each
            caption's token mean) or ``fixed`` (sum / (captions x max_tokens)).
        max_tokens: ``fixed``'s length constant; 0 = the policy's ``max_new_tokens``.
    """

    gamma: float = 1.0
    ent_coef: float = 0.0
    aggregation: str = "token"
    max_tokens: int = 0
    #: Passes over each rollout and parts per pass: 1 and 1 but under PPO-clip.
    epochs = 1
    minibatches = 1
    #: The learnable part the objective trains beside the policy (A2C's critic), or None.
    critic: nn.Module | None = field(default=None, init=False, repr=False)
    _reduce: rl.Reduce = field(default=rl.identity, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        _check(type(self).__name__, {"ent_coef": self.ent_coef, "max_tokens": self.max_tokens},
               {"ent_coef": 0.0, "max_tokens": 0})
        if not is_real(self.gamma) or not 0.0 <= self.gamma <= 1.0:
            raise ConfigError(f"objective {type(self).__name__}: gamma must be in [0, 1], "
                              f"got {self.gamma!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(f"objective {type(self).__name__}: aggregation must be one of "
                              f"{', '.join(AGGREGATIONS)}, got {self.aggregation!r}")

    # -- the Objective protocol -------------------------------------------------------

    def setup(self, policy: Any, reward: Any, world: Any, seed: int) -> None:
        """Called once by the trainer, before the policy is wrapped for several processes."""
        self._reduce = world.all_reduce
        if self.aggregation == "fixed" and not self.max_tokens:
            limit = getattr(policy, "max_new_tokens", None)
            if not isinstance(limit, int) or limit < 1:
                raise ConfigError(f"objective {type(self).__name__}: aggregation fixed needs "
                                  "max_tokens (the policy has no max_new_tokens to use)")
            self.max_tokens = limit

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimiser groups of the objective's own parameters (each with a ``name``)."""
        return []

    def prepare(self, batch: StepBatch) -> Targets:
        returns = rl.discounted_returns(batch.rewards, batch.mask, self.gamma)
        advantages, stats = self.advantages(batch, returns)
        return Targets(mask=batch.mask, returns=returns,
                       old_logprobs=batch.rollout.logprobs.to(batch.mask.device),
                       advantages=advantages, stats=stats)

    def loss(self, targets: Targets, out: PolicyOutput, values: torch.Tensor | None,
             policy_term: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Policy-gradient loss with the estimator's advantages.

        L = agg(-A_k log pi(t_k)) - ent_coef * agg(entropy_k); ``policy_term`` (B, T)
        replaces -A_k log pi(t_k) (PPO-clip passes its clipped surrogate).

        Returns:
            The scalar loss and detached stats, each this process's share of the whole
            batch's value (they add up over processes).
        """
        mask = targets.mask
        if policy_term is None:
            policy_term = -(targets.advantages.detach() * out.logprobs)
        pg = self.aggregate(policy_term, mask)
        ent = self.aggregate(out.entropy, mask)
        # ent_coef 0: no entropy term at all (its backward through the (B, T, V) entropy
        # would only add zeros)
        loss = pg - self.ent_coef * ent if self.ent_coef else pg
        return loss, {"loss/policy": pg.detach(), "loss/entropy": ent.detach(),
                      "loss/total": loss.detach(),
                      "advantage/mean": self.token_mean(targets.advantages, mask)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors to checkpoint (whole tensors on every process); none here."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ConfigError(f"objective {type(self).__name__} keeps no state, but the "
                              f"checkpoint holds {sorted(state)[:3]}")

    def describe(self) -> dict[str, Any]:
        """Settings a checkpoint records and a resume must find unchanged."""
        return {}

    # -- for subclasses ---------------------------------------------------------------

    def advantages(self, batch: StepBatch, returns: torch.Tensor
                   ) -> tuple[torch.Tensor | None, dict[str, float]]:
        """Shape: (B, T) advantages, detached, zero on padding; and stats to log."""
        raise NotImplementedError

    def aggregate(self, per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``rl.aggregate`` with the whole batch's counts (over processes)."""
        return rl.aggregate(per_token, mask, self.aggregation,
                            num_tokens=self._reduce(mask.sum()),
                            num_captions=self._reduce(mask.any(dim=1).sum()),
                            max_tokens=self.max_tokens)

    def token_mean(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """This process's share of the mean of ``x`` over the whole batch's real tokens."""
        return rl.masked_mean(x.detach(), mask, self._reduce(mask.sum()))


class Critic(nn.Module):
    """A2C's critic: the value head over the policy's hidden states.

    Args:
        value_head: V(s_k).
        detach: Feed it detached hidden states (the value loss never moves the policy).
    """

    def __init__(self, value_head: ValueHead, detach: bool) -> None:
        super().__init__()
        self.value_head, self.detach = value_head, detach

    def forward(self, out: PolicyOutput) -> torch.Tensor:
        """Shape: (B, T)."""
        return self.value_head(out.hidden.detach() if self.detach else out.hidden)


@define
class A2C(Estimator):
    """The paper's advantage actor-critic: A_k = R(t_k) - V(s_k) with a learnable value head.

    L = -mean(A log pi) + vf_coef * mean((V - R)^2) - ent_coef * mean(entropy), means over
    real tokens (the paper's loss; A2C takes no ``aggregation``).

    Args:
        value_lr: AdamW learning rate of the value head [ours: 1e-4].
        vf_coef: Value-loss weight c_v [ours: 0.5].
        whiten_advantages: Normalise advantages over each batch [ours: off].
        value_detach: Train the value head on detached hidden states, so the value loss
            never moves the policy [ours: on; off = a shared trunk, as in TRL's value head].
        value_hidden: Width H' of the value head's hidden layer [ours: 256].
    """

    #: Always the token mean (the paper's loss); not an argument, so that switching a config's
    #: objective from A2C to another estimator never carries an A2C aggregation over to it.
    aggregation: str = field(default="token", init=False)
    value_lr: float = 1e-4
    vf_coef: float = 0.5
    whiten_advantages: bool = False
    value_detach: bool = True
    value_hidden: int = 256

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        _check("A2C", {"value_lr": self.value_lr, "vf_coef": self.vf_coef,
                       "value_hidden": self.value_hidden},
               {"value_lr": 0.0, "vf_coef": 0.0, "value_hidden": 1})

    @property
    def value_head(self) -> ValueHead | None:
        return None if self.critic is None else self.critic.value_head

    def setup(self, policy: Any, reward: Any, world: Any, seed: int) -> None:
        super().setup(policy, reward, world, seed)
        first = next(iter(policy.trainable_parameters()))
        # Seeded from the run's seed, apart from the global stream: the head starts the same
        # in every run of a config, whether or not the policy's builder seeded torch.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            head = ValueHead(policy.hidden_size, self.value_hidden).to(
                first.device, torch.float64 if first.dtype == torch.float64 else torch.float32)
        self.critic = Critic(head, self.value_detach)

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.critic.parameters()), "lr": self.value_lr, "name": "value"}]

    def advantages(self, batch: StepBatch, returns: torch.Tensor) -> tuple[None, dict[str, float]]:
        return None, {}  # from the values of the update's own forward pass (``loss``)

    def with_values(self, targets: Targets, values: torch.Tensor) -> Targets:
        """Fix the advantages from values computed before the update (PPO-clip's epochs)."""
        adv = rl.advantages(targets.returns, values, targets.mask, self.whiten_advantages,
                            reduce=self._reduce)
        return evolve(targets, advantages=adv)

    def loss(self, targets: Targets, out: PolicyOutput, values: torch.Tensor | None,
             policy_term: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mask, returns = targets.mask, targets.returns
        num_tokens = self._reduce(mask.sum())
        advantages = targets.advantages
        if advantages is None:
            advantages = rl.advantages(returns, values, mask, self.whiten_advantages,
                                       reduce=self._reduce)
        if policy_term is None:
            return rl.a2c_loss(out.logprobs, values, out.entropy, returns, advantages, mask,
                               self.vf_coef, self.ent_coef, num_tokens=num_tokens)
        pg = rl.masked_mean(policy_term, mask, num_tokens)
        vf = rl.masked_mean((values - returns.detach()) ** 2, mask, num_tokens)
        ent = rl.masked_mean(out.entropy, mask, num_tokens)
        loss = pg + self.vf_coef * vf
        if self.ent_coef:  # see rl.a2c_loss
            loss = loss - self.ent_coef * ent
        return loss, {"loss/policy": pg.detach(), "loss/value": vf.detach(),
                      "loss/entropy": ent.detach(), "loss/total": loss.detach(),
                      "value/mean": rl.masked_mean(values.detach(), mask, num_tokens),
                      "advantage/mean": rl.masked_mean(advantages.detach(), mask, num_tokens)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The value head's weights, whole (gathered from FSDP2 shards: a collective call)."""
        return {k: full_tensor(v.detach()) for k, v in self.value_head.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        mine = self.value_head.state_dict(keep_vars=True)
        if set(state) != set(mine):
            raise ConfigError(f"the checkpoint's value head has weights {sorted(state)[:4]}, "
                              f"A2C's has {sorted(mine)[:4]}")
        with torch.no_grad():
            for name, param in mine.items():
                copy_into(param, state[name])

    def describe(self) -> dict[str, Any]:
        return {"value_hidden": self.value_hidden}


#: The file in a checkpoint that holds an objective's ``state_dict`` (A2C's value head,
#: named as before objectives were components, so older checkpoints still resume).
STATE_FILE = "value_head.safetensors"


def copy_into(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a whole saved tensor into a parameter, or into this rank's FSDP2 shard of it."""
    value = value.to(param.device, param.dtype)
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value, param.device_mesh, param.placements)
    param.copy_(value)


def full_tensor(x: torch.Tensor) -> torch.Tensor:
    """A plain tensor from an FSDP2 DTensor (itself otherwise)."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x
