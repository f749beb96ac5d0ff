"""The shared-prefill sampler: same draws as transformers' generate, fewer prompt passes."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from vlrm.sampling import process_logits, token_logprobs
from vlrm_plugins.blip2_opt import tiny_blip2_opt


def generate_reference(policy, images, k):
    """The obvious rollout: transformers' generate with num_return_sequences (prompt per sample)."""
    prefix = policy.prefix_embeds(policy.encode_images(images))
    config = GenerationConfig(
        do_sample=True, num_return_sequences=k, max_new_tokens=policy.max_new_tokens,
        temperature=policy.temperature, top_p=policy.top_p, top_k=policy.top_k,
        bos_token_id=policy.bos_token_id, eos_token_id=policy.eos_token_id,
        pad_token_id=policy.pad_token_id, suppress_tokens=policy.suppressed or None,
        output_logits=True, return_dict_in_generate=True)
    out = policy.model.language_model.generate(
        inputs_embeds=prefix, attention_mask=torch.ones(prefix.shape[:2], dtype=torch.long),
        generation_config=config)
    return out.sequences[:, -len(out.logits):], torch.stack(out.logits, dim=1)


@pytest.mark.parametrize("settings", [dict(), dict(temperature=0.7, top_k=50, top_p=0.9)])
def test_shared_prefill_draws_what_generate_draws(settings, photos):
    policy = tiny_blip2_opt(seed=3, init_std=0.5, max_new_tokens=12, **settings)
    images = [img for _, img in photos[:3]]
    torch.manual_seed(11)
    want_tokens, want_logits = generate_reference(policy, images, 4)
    torch.manual_seed(11)
    rollout = policy.sample(images, ["a", "b", "c"], 4)
    assert torch.equal(rollout.tokens, want_tokens)
    want = token_logprobs(want_logits, want_tokens, policy.temperature, policy.suppressed)
    torch.testing.assert_close(rollout.logprobs, want * rollout.mask, atol=1e-5, rtol=1e-5)
    assert rollout.group.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]


def test_the_prompt_runs_once_per_image(photos):
    policy = tiny_blip2_opt(seed=3, max_new_tokens=5)
    rows = []
    lm = policy.model.language_model
    handle = lm.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(tuple(
            (kwargs["inputs_embeds"] if kwargs.get("inputs_embeds") is not None
             else kwargs["input_ids"]).shape[:2])), with_kwargs=True)
    try:
        policy.sample([img for _, img in photos[:2]], ["a", "b"], 4)
    finally:
        handle.remove()
    prompt = policy.num_query_tokens + 1
    assert rows[0] == (2, prompt)  # the prefill: one row per image, not per sample
    assert all(shape == (8, 1) for shape in rows[1:])  # then one new token per sample


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(process_logits(logits, top_k=2)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(process_logits(logits, top_p=0.75)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(process_logits(logits, top_p=0.01)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(process_logits(logits, suppressed=[0])).tolist() == [[False, True, True, True]]


def test_gradient_checkpointing_gives_the_same_gradients(photos):
    grads = []
    for checkpointing in (False, True):
        policy = tiny_blip2_opt(seed=4, max_new_tokens=6, gradient_checkpointing=checkpointing)
        torch.manual_seed(0)
        rollout = policy.sample([img for _, img in photos[:2]], ["a", "b"], 2)
        out = policy.evaluate(rollout)
        (out.logprobs * rollout.mask).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in policy.trainable_parameters()]))
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0].abs().sum() > 0


def test_bf16_autocast_scores_close_to_fp32(photos):
    fp32 = tiny_blip2_opt(seed=4, max_new_tokens=6)
    bf16 = tiny_blip2_opt(seed=4, max_new_tokens=6, autocast="bfloat16")
    torch.manual_seed(0)
    rollout = fp32.sample([img for _, img in photos[:2]], ["a", "b"], 2)
    want, got = fp32.evaluate(rollout).logprobs, bf16.evaluate(rollout).logprobs
    assert got.dtype == torch.float32
    torch.testing.assert_close(got * rollout.mask, want * rollout.mask, atol=0.1, rtol=0.05)
