"""Reward throughput (image-caption pairs/s): vlrm's batched, cached scoring vs per pair."""

from __future__ import annotations

import copy

import pytest
import torch

from benchmarks.naive import NaiveA2C, per_pair_clip, per_pair_itm
from vlrm.cache import EmbeddingCache
from vlrm_plugins.reference_kl import ReferenceKLPenalty
from vlrm_plugins.reference_lm import ReferenceLMReward
from vlrm_plugins.text_penalties import BadPhrasePenalty, RepetitionPenalty

TARGETS = {"small": 3.0}  # vs per-pair scoring, K = 4, CPU (issue 6)


@pytest.fixture(scope="module")
def rollout(preset):
    torch.manual_seed(0)
    return preset.policy.sample(preset.images, preset.image_ids, preset.samples_per_image)


def _fresh_cache(reward):
    """Score as on a step with unseen images: the K samples still share one image pass."""
    def run(rollout):
        reward._cache = EmbeddingCache(reward._cache.size)
        return reward(rollout)
    return run


@pytest.mark.parametrize("cache", ["cold", "warm"])
@pytest.mark.parametrize("model", ["clip", "itm"])
def test_reward_vs_per_pair(compare, preset, rollout, model, cache):
    """cold: images unseen this step (shared across the K samples only); warm: images seen
    in an earlier epoch (embeddings from the cache, keyed by image id)."""
    reward = getattr(preset, model)
    naive = per_pair_clip if model == "clip" else per_pair_itm
    ours = _fresh_cache(reward) if cache == "cold" else reward
    torch.testing.assert_close(ours(rollout).sequence, naive(reward, rollout), atol=1e-3, rtol=1e-3)
    compare(lambda: ours(rollout), lambda: naive(reward, rollout), units=rollout.batch_size,
            unit="pairs", target=TARGETS.get(preset.name) if cache == "cold" else None)


def test_reference_lm_vs_copied_model(compare, preset, rollout):
    """The reference-LM term on the policy's own frozen LM vs a second, copied model."""
    ours = ReferenceLMReward()
    ours.bind_policy(preset.policy)
    naive = NaiveA2C.__new__(NaiveA2C)  # only its reference model is used here
    naive.policy, naive.reference = preset.policy, copy.deepcopy(preset.policy.model).eval()
    want = naive.reference_mean_logprob(rollout).cpu()
    torch.testing.assert_close(ours(rollout).sequence, want, atol=1e-4, rtol=1e-4)
    compare(lambda: ours(rollout), lambda: naive.reference_mean_logprob(rollout),
            units=rollout.batch_size, unit="captions", baseline_name="copied model")


@pytest.mark.parametrize("penalty", [BadPhrasePenalty, RepetitionPenalty])
def test_text_penalty_throughput(benchmark, rollout, penalty):
    reward = penalty()
    out = benchmark(reward, rollout)
    assert out.token.shape == rollout.tokens.shape


def test_reference_kl_throughput(benchmark, preset, rollout):
    """KL to the initial policy: one forward of the policy with its reference snapshot swapped in."""
    reward = ReferenceKLPenalty()
    reward.bind_policy(preset.policy)
    out = benchmark.pedantic(reward, args=(rollout,), rounds=3, iterations=1, warmup_rounds=1)
    assert out.token.shape == rollout.tokens.shape
    assert torch.isfinite(out.token).all()
