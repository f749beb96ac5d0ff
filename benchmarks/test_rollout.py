"""Rollout throughput: K captions per image from one vision, Q-Former and prompt pass."""

from __future__ import annotations

from benchmarks.naive import generate_rollout, per_sample_rollout

TARGETS = {"small": 2.0}  # vs per-sample generate, K = 4, CPU (issue 6)


def test_rollout_vs_per_sample_generate(compare, preset):
    policy = preset.policy
    args = (preset.images, preset.image_ids, preset.samples_per_image)
    tokens = []

    def ours():
        tokens.append(int(policy.sample(*args).mask.sum()))

    compare(ours, lambda: per_sample_rollout(policy, *args), units=len(preset.images) * args[2],
            unit="captions", target=TARGETS.get(preset.name),
            extra=lambda seconds: {"vlrm_tokens_per_s": round(sum(tokens) / len(tokens) / seconds, 1)})
    assert min(tokens) >= len(preset.images) * args[2]  # at least the end token per caption


def test_rollout_vs_batched_generate(compare, preset):
    """The gain of the shared prompt prefill alone, over one batched ``generate``."""
    policy = preset.policy
    args = (preset.images, preset.image_ids, preset.samples_per_image)
    compare(lambda: policy.sample(*args), lambda: generate_rollout(policy, *args),
            units=len(preset.images) * args[2], unit="captions", baseline_name="batched generate")
