import pytest
import torch

from vlrm.errors import ConfigError
from vlrm.rewards import CompositeReward, RewardTerm
from vlrm.testing import check_reward
from vlrm_plugins.reference_kl import ReferenceKLPenalty


def perturb(params, scale=0.05, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def sample(policy, photos, k=2, seed=0):
    torch.manual_seed(seed)
    ids, images = zip(*photos[:3])
    return policy.sample(images, ids, num_samples=k)


@pytest.fixture(scope="module")
def initial(tiny_policy_factory):
    """An untouched copy of the starting policy: the reference, scored directly."""
    return tiny_policy_factory(seed=0, max_new_tokens=8)


def test_zero_at_the_start_then_the_log_ratio_to_the_initial_policy(tiny_policy_factory, initial, photos):
    policy = tiny_policy_factory(seed=0, max_new_tokens=8)
    penalty = ReferenceKLPenalty()
    composite = CompositeReward({"kl": RewardTerm(penalty, 0.1)})
    composite.bind_policy(policy)
    start = sample(policy, photos)
    assert penalty(start).token.abs().max() < 1e-4          # pi == pi_ref before any update

    perturb(policy.trainable_parameters())                    # stands in for some updates
    rollout = sample(policy, photos, seed=1)
    out = penalty(rollout)
    with torch.no_grad():
        ref = initial.evaluate(rollout).logprobs * rollout.mask
    expected = -(rollout.logprobs - ref)
    assert torch.allclose(out.token, expected, atol=1e-4)
    assert out.token.abs().max() > 1e-2
    assert out.metrics["kl"] == pytest.approx(-expected.sum(1).mean().item(), abs=1e-4)
    check_reward(penalty, rollout, atol=1e-4)


def test_the_reference_is_a_copy_of_the_trainable_parts_only(tiny_policy_factory, photos):
    policy = tiny_policy_factory(seed=0, max_new_tokens=8)
    penalty = ReferenceKLPenalty()
    penalty.bind_policy(policy)
    trainable = sum(p.numel() for p in policy.trainable_parameters())
    total = sum(p.numel() for p in policy.parameters())
    assert penalty.reference_parameters == trainable < total / 5
    # scoring under the reference leaves the live weights exactly as they were
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    data = {n: p.data.data_ptr() for n, p in policy.model.named_parameters()}
    perturb(policy.trainable_parameters())
    moved = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    penalty(sample(policy, photos))
    for name, p in policy.model.named_parameters():
        assert torch.equal(p, moved[name]), name
        assert p.data.data_ptr() == data[name], name
    assert any(not torch.equal(moved[n], before[n]) for n in before)
    # binding again does not move the reference
    assert policy.snapshot_reference() == trainable
    assert penalty(sample(policy, photos)).token.abs().max() > 1e-2


def test_with_lora_the_reference_is_the_model_with_adapters_disabled(tiny_policy_factory, initial, photos):
    policy = tiny_policy_factory(seed=0, max_new_tokens=8, lora_rank=4)
    lora = [p for n, p in policy.model.named_parameters() if ".lora_" in n]
    assert lora and all(p.requires_grad for p in lora)
    penalty = ReferenceKLPenalty()
    penalty.bind_policy(policy)
    assert penalty.reference_parameters == sum(
        p.numel() for n, p in policy.model.named_parameters() if p.requires_grad and ".lora_" not in n)
    assert penalty(sample(policy, photos)).token.abs().max() < 1e-4   # LoRA B starts at zero
    perturb(lora, scale=0.2)
    rollout = sample(policy, photos, seed=1)
    with torch.no_grad():
        ref = initial.evaluate(rollout).logprobs * rollout.mask
        current = policy.evaluate(rollout).logprobs * rollout.mask
    assert (current - ref).abs().max() > 1e-2                          # the adapters matter
    assert torch.allclose(penalty(rollout).token, -(rollout.logprobs - ref), atol=1e-4)
    assert all(p.requires_grad for p in lora)                          # re-enabled afterwards


def test_clamp_bounds_the_log_ratio(tiny_policy_factory, photos):
    policy = tiny_policy_factory(seed=0, max_new_tokens=8)
    penalty = ReferenceKLPenalty(clamp=0.01)
    penalty.bind_policy(policy)
    perturb(policy.trainable_parameters(), scale=0.2)
    out = penalty(sample(policy, photos))
    assert out.token.abs().max() <= 0.01 + 1e-7


def test_unbound_and_bad_settings_are_config_errors(photos):
    from vlrm.testing import make_rollout

    with pytest.raises(ConfigError, match="not bound"):
        ReferenceKLPenalty()(make_rollout())
    with pytest.raises(ConfigError, match="clamp"):
        ReferenceKLPenalty(clamp=-1)
    with pytest.raises(ConfigError, match="reference_logprobs"):
        ReferenceKLPenalty().bind_policy(object())
