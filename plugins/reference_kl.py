"""KL penalty to the initial policy: per token, -(log pi(t_k) - log pi_ref(t_k)).

The reference is the policy as it was when training started. It is never a second full
model: the policy keeps a frozen copy of only its trainable parts (for the paper's setup,
the Q-Former, queries and projection: 107 M of BLIP-2 OPT-2.7B's 3.7 B parameters) and, with LoRA, runs with the
adapters disabled (see ``Blip2OptPolicy.reference``). log pi is the sampling-time log-prob
stored in the rollout, so the penalty costs one extra forward pass of the policy.
"""

from __future__ import annotations

from typing import Any

import torch

from vlrm import hookimpl
from vlrm.errors import ConfigError
from vlrm.protocols import ReferenceScorer, explain
from vlrm.structs import RewardOutput, Rollout


class ReferenceKLPenalty:
    """Per-token penalty -(log pi - log pi_ref) on each generated token [ours: optional term].

    Summed over a caption it is minus the sampled estimate of KL(pi || pi_ref). Its weight in
    the composite reward is the usual KL coefficient (w_kl in the paper's notation).

    Args:
        clamp: Clamp each token's log-ratio to [-clamp, clamp] (0 = no clamp) [ours: 0].
    """

    def __init__(self, clamp: float = 0.0) -> None:
        if clamp < 0:
            raise ConfigError(f"ReferenceKLPenalty clamp must be >= 0, got {clamp}")
        self.clamp = clamp
        self.policy: Any = None
        self.reference_parameters = 0

    def bind_policy(self, policy: Any) -> None:
        """Called by the trainer before the first update: fixes the reference there."""
        problems = explain(policy, ReferenceScorer)
        if problems:
            raise ConfigError(f"ReferenceKLPenalty needs a policy that implements "
                              f"vlrm.protocols.ReferenceScorer; {type(policy).__name__}: "
                              f"{'; '.join(problems)}")
        self.reference_parameters = policy.snapshot_reference()
        self.policy = policy

    @torch.no_grad()
    def __call__(self, rollout: Rollout) -> RewardOutput:
        if self.policy is None:
            raise ConfigError("ReferenceKLPenalty was not bound to a policy (the trainer binds "
                              "it; in your own code call bind_policy before training)")
        mask = rollout.mask.cpu()
        ref = self.policy.reference_logprobs(rollout).float().cpu()
        ratio = (rollout.logprobs.float().cpu() - ref) * mask
        if self.clamp:
            ratio = ratio.clamp(-self.clamp, self.clamp)
        per_caption = ratio.sum(1)
        return RewardOutput(token=-ratio, metrics={"kl": per_caption.mean().item()})


@hookimpl
def vlrm_register_rewards() -> dict[str, Any]:
    return {"reference_kl": ReferenceKLPenalty}
