"""A2C must actually learn: a reward that pays for one token makes the policy emit it more.

The reward here is a test double (the engine is under test, not a reward model); the policy
is the real tiny BLIP-2 OPT, trained only through its Q-Former, queries and projection.
"""

import pytest
import torch

from vlrm.objective import A2C
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
                           save_every=0, progress=False)
    trainer = Trainer(policy, PayForToken(chosen), data, config, tmp_path,
                      objective=A2C(value_lr=1e-2, whiten_advantages=True))
    batches = trainer._batches()
    rewards = [trainer.train_step(next(batches))["reward/total"] for _ in range(config.max_steps)]

    start, end = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert end > start + 0.5 and end > 3 * start, rewards
    changed = {n.split(".")[0] for n, p in policy.model.named_parameters()
               if not torch.equal(p, before[n])}
    assert changed == {"qformer", "query_tokens", "language_projection"}
    assert trainer.value_head.net[-1].weight.abs().sum() > 0  # the critic trained too



@pytest.mark.parametrize("detach", [True, False])
def test_the_value_loss_reaches_the_policy_only_without_value_detach(tiny_policy_factory, tmp_path,
                                                                      detach):
    from vlrm_plugins.bundled_photos import bundled_photos

    policy = tiny_policy_factory(seed=0, max_new_tokens=4)
    data = bundled_photos()
    config = TrainerConfig(max_steps=1, images_per_step=2, samples_per_image=2,
                           save_every=0, progress=False)
    trainer = Trainer(policy, PayForToken(0), data, config, tmp_path,
                      objective=A2C(value_detach=detach))
    torch.nn.init.normal_(trainer.value_head.net[-1].weight)
    ids, images = zip(*next(trainer._batches()))
    rollout = policy.sample(images, ids, 2)
    trainer.objective.critic(policy.evaluate(rollout)).pow(2).sum().backward()
    reached = any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.trainable_parameters())
    assert reached is not detach
    assert trainer.value_head.net[0].weight.grad.abs().sum() > 0  # the critic learns either way


def test_a_step_logs_policy_and_value_gradient_norms_apart(tiny_policy_factory, tmp_path):
    from vlrm_plugins.bundled_photos import bundled_photos

    policy = tiny_policy_factory(seed=0, max_new_tokens=4)
    config = TrainerConfig(max_steps=1, images_per_step=2, samples_per_image=2, save_every=0,
                           progress=False, max_grad_norm=1e-3)
    trainer = Trainer(policy, PayForToken(0), bundled_photos(), config, tmp_path)
    torch.nn.init.normal_(trainer.value_head.net[-1].weight)
    metrics = trainer.train_step(next(trainer._batches()))
    assert metrics["grad/value_norm"] > 0 and metrics["grad/policy_norm"] > 0
    # Each group is clipped to max_grad_norm on its own (norms are measured before clipping).
    for params in (list(policy.trainable_parameters()), list(trainer.value_head.parameters())):
        norm = torch.sqrt(sum((p.grad ** 2).sum() for p in params if p.grad is not None))
        assert norm <= 1e-3 * 1.01
