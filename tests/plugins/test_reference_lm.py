import pytest
import torch
from torch import nn

from vlrm.errors import ConfigError
from vlrm.rewards import CompositeReward, RewardTerm
from vlrm.testing import check_reward, make_rollout
from vlrm_plugins.blip2_opt import gpt2_tokenizer
from vlrm_plugins.reference_lm import ReferenceLMReward

CAPTIONS = [["a dog on the grass", "a cat"], ["two red buses parked by a wall"]]


@pytest.fixture(scope="module")
def policy(tiny_policy_factory):
    return tiny_policy_factory(seed=2)


@pytest.fixture(scope="module")
def rollout():
    return make_rollout(CAPTIONS, tokenizer=gpt2_tokenizer())


def direct_mean_logprob(lm, bos, ids):
    with torch.no_grad():
        logits = lm(input_ids=torch.tensor([[bos] + ids])).logits[0, :-1]
    return torch.log_softmax(logits, -1)[torch.arange(len(ids)), ids].mean()


def modules_of(obj):
    return [v for v in vars(obj).values() if isinstance(v, nn.Module)]


def test_reuses_the_policys_frozen_lm(policy, rollout):
    reward = ReferenceLMReward()
    composite = CompositeReward({"ref": RewardTerm(reward, 0.3)})
    composite.bind_policy(policy)
    assert reward.policy is policy and reward.lm is None
    # the parameter count does not grow: every parameter the reward reaches is the policy's
    policy_params = {id(p): p.numel() for p in policy.parameters()}
    reachable = {id(p): p.numel() for m in modules_of(reward) for p in m.parameters()}
    combined = {**policy_params, **reachable}
    assert sum(combined.values()) == sum(policy_params.values())
    got = reward(rollout).sequence
    lm = policy.model.language_model
    for b, row in enumerate(rollout.tokens):
        ids = row[rollout.mask[b]].tolist()
        assert got[b].item() == pytest.approx(direct_mean_logprob(lm, policy.bos_token_id, ids).item(), abs=1e-5)
    check_reward(reward, rollout)


def test_a_separate_reference_model(policy, rollout, tmp_path):
    lm = policy.model.language_model
    lm.save_pretrained(tmp_path)
    policy.tokenizer.save_pretrained(tmp_path)
    reward = ReferenceLMReward(model=str(tmp_path))
    own = reward(rollout).sequence
    bound = ReferenceLMReward()
    bound.bind_policy(policy)
    # same weights, same tokenizer: the same scores by either path
    assert torch.allclose(own, bound(rollout).sequence, atol=1e-5)


def test_unbound_and_trainable_lm_are_config_errors(tiny_policy_factory, rollout):
    with pytest.raises(ConfigError, match="bind_policy"):
        ReferenceLMReward()(rollout)
    trains_lm = tiny_policy_factory(trainable=("qformer", "language_model"))
    with pytest.raises(ConfigError, match="no longer the reference"):
        trains_lm.text_logprobs(rollout.tokens, rollout.mask)  # no snapshot: an error


def test_a_trainable_lm_is_scored_by_its_initial_snapshot(tiny_policy_factory, rollout):
    trains_lm = tiny_policy_factory(trainable=("qformer", "language_model"))
    untouched = tiny_policy_factory(trainable=("qformer", "language_model"))
    reward = ReferenceLMReward()
    reward.bind_policy(trains_lm)  # snapshots the initial policy, OPT included
    before = reward(rollout).sequence
    with torch.no_grad():
        for p in trains_lm.model.language_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    live = trains_lm.model.language_model.get_input_embeddings().weight
    assert not torch.allclose(live, untouched.model.language_model.get_input_embeddings().weight)
    after = reward(rollout).sequence  # the live LM has moved, the reference has not
    assert torch.allclose(before, after, atol=1e-5)
    fresh = ReferenceLMReward()
    fresh.bind_policy(untouched)
    assert torch.allclose(after, fresh(rollout).sequence, atol=1e-5)
