"""Frozen towers held once when the policy and a reward model have identical weights."""

from __future__ import annotations

import torch

from vlrm.rewards import CompositeReward, RewardTerm
from vlrm.sharing import module_digest, parameter_bytes, share_frozen_towers
from vlrm_plugins.blip2_itm_reward import tiny_blip2_itm_reward
from vlrm_plugins.blip2_opt import tiny_blip2_opt


def test_digest_sees_one_changed_weight():
    policy = tiny_blip2_opt(seed=0)
    vision = policy.model.vision_model
    before = module_digest(vision)
    assert module_digest(vision) == before
    with torch.no_grad():
        next(vision.parameters()).view(-1)[0] += 1e-3
    assert module_digest(vision) != before


def test_identical_vision_towers_are_shared_and_scores_do_not_change(photos):
    policy = tiny_blip2_opt(seed=0)
    itm = tiny_blip2_itm_reward(seed=1)  # same architecture as the policy's ViT, other weights
    reward = CompositeReward({"itm": RewardTerm(itm)})
    assert share_frozen_towers(policy, reward) == {}  # different weights: nothing shared
    itm.model.vision_model.load_state_dict(policy.model.vision_model.state_dict())

    images, ids = [img for _, img in photos[:2]], ["a", "b"]
    torch.manual_seed(0)
    rollout = policy.sample(images, ids, 2)
    before = itm(rollout).sequence
    itm._cache = type(itm._cache)(0)

    saved = share_frozen_towers(policy, reward)
    assert saved == {"itm.vision_model": parameter_bytes(policy.model.vision_model)}
    assert itm.model.vision_model is policy.model.vision_model
    torch.testing.assert_close(itm(rollout).sequence, before)


def test_a_trainable_tower_is_never_shared():
    policy = tiny_blip2_opt(seed=0, trainable=["qformer", "vision_model"])
    itm = tiny_blip2_itm_reward(seed=1)
    itm.model.vision_model.load_state_dict(policy.model.vision_model.state_dict())
    assert share_frozen_towers(policy, itm) == {}
    assert itm.model.vision_model is not policy.model.vision_model
