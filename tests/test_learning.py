"""A2C must actually learn: a reward that pays for one token makes the policy emit it more.

The reward here is a test double (the engine is under test, not a reward model); the policy
is the real tiny BLIP-2 OPT, trained only through its Q-Former, queries and projection.
"""

import pytest
import torch

from vlrm.structs import RewardOutput
from vlrm.trainer import Trainer, TrainerConfig


class PayForToken:
    """Reward 1 for every generated occurrence of one token."""

    def __init__(self, token: int) -> None:
        self.token = token

    def __call__(self, rollout):
        return RewardOutput(token=((rollout.tokens == self.token) & rollout.mask).float())


@pytest.mark.slow
def test_a2c_raises_the_reward_through_the_qformer(tiny_policy_factory, tmp_path):
    from vlrm_plugins.bundled_photos import bundled_photos

    # init_std 0.5 gives the random OPT a peaked next-token distribution that the Q-Former's
    # prefix can steer; with 0.02 it is uniform over 50k tokens and nothing is ever paid.
    policy = tiny_policy_factory(seed=0, max_new_tokens=8, init_std=0.5)
    data = bundled_photos()
    torch.manual_seed(0)
    ids, images = zip(*[(str(p), data.load(p)) for p in data.paths[:8]])
    probe = policy.sample(images, ids, num_samples=4)
    candidates = probe.tokens[probe.mask & (probe.tokens != policy.eos_token_id)]
    values, counts = candidates.unique(return_counts=True)
    chosen = int(values[counts.argmax()])  # a token the policy emits, but rarely

    before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    config = TrainerConfig(max_steps=25, images_per_step=4, samples_per_image=4, policy_lr=1e-3,
                           value_lr=1e-2, whiten_advantages=True, save_every=0, progress=False)
    trainer = Trainer(policy, PayForToken(chosen), data, config, tmp_path)
    batches = trainer._batches()
    rewards = [trainer.train_step(next(batches))["reward/total"] for _ in range(config.max_steps)]

    start, end = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert end > start + 0.5 and end > 3 * start, rewards
    changed = {n.split(".")[0] for n, p in policy.model.named_parameters()
               if not torch.equal(p, before[n])}
    assert changed == {"qformer", "query_tokens", "language_projection"}
    assert trainer.value_head.net[-1].weight.abs().sum() > 0  # the critic trained too
