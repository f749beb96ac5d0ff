"""Rollout throughput: K captions per image from one vision, Q-Former and prompt pass."""

from __future__ import annotations

from benchmarks.naive import generate_rollout, per_sample_rollout

TARGETS = {"small": 2.0}  # vs per-sample generate, K = 4, CPU (issue 6)
LONG_PROMPT_TARGETS = {"small": 1.5}  # vs one batched generate, K = 8, >= 256 prompt tokens (issue 17)


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


def test_rollout_long_prompt_vs_batched_generate(compare, preset_name):
    """K = 8 captions of each image after a prompt of 256 image tokens + the chat template's
    (``presets.long_prompt_captioner``, LLaVA layout): vlrm prefills each image's prompt
    once; the baseline is the same model sampling with one ``generate(num_return_sequences=8)``
    (``shared_prefill: false``), which prefills it once per caption."""
    import torch

    from benchmarks.presets import long_prompt_captioner, photos

    ours = long_prompt_captioner(preset_name)
    generate = long_prompt_captioner(preset_name, shared_prefill=False)
    generate.model.load_state_dict(ours.model.state_dict())
    images, ids = photos(4)
    k = 8
    prompt = ours.sample(images[:1], ids[:1], 1)
    state = prompt.policy_state.inputs[0]
    prompt_tokens = int(state["input_ids"].shape[-1])
    assert prompt_tokens >= 256, prompt_tokens
    torch.manual_seed(0)
    compare(lambda: ours.sample(images, ids, k), lambda: generate.sample(images, ids, k),
            units=len(images) * k, unit="captions", baseline_name="batched generate, K = 8",
            target=LONG_PROMPT_TARGETS.get(preset_name),
            extra=lambda _: {"prompt_tokens": prompt_tokens, "k": k})
