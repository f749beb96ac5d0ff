import pytest
import torch

from vlrm.errors import ConfigError
from vlrm_plugins.blip2_opt import PAPER_TRAINABLE, blip2_opt


@pytest.fixture(scope="module")
def policy(tiny_policy_factory):
    return tiny_policy_factory(seed=0, max_new_tokens=10)


@pytest.fixture(scope="module")
def rollout(policy, photos):
    torch.manual_seed(0)
    ids, images = zip(*photos[:3])
    return policy.sample(images, ids, num_samples=2)


def test_sample_shapes_and_grouping(policy, rollout):
    b, t = rollout.tokens.shape
    assert b == 6 and 1 <= t <= 10
    assert rollout.group.tolist() == [0, 0, 1, 1, 2, 2]
    assert len(rollout.captions) == 6 and all(isinstance(c, str) for c in rollout.captions)
    assert rollout.mask.dtype == torch.bool and rollout.mask[:, 0].all()
    assert (rollout.logprobs[~rollout.mask] == 0).all()
    assert (rollout.logprobs[rollout.mask] < 0).all()


def test_generated_mask_stops_after_first_eos(policy):
    eos, pad = policy.eos_token_id, policy.pad_token_id
    tokens = torch.tensor([[5, eos, pad, pad], [5, 6, 7, 8], [eos, pad, pad, pad]])
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(policy.generated_mask(tokens), expected)


def test_padding_and_image_token_are_never_sampled(policy, rollout):
    real = rollout.tokens[rollout.mask]
    assert policy.pad_token_id in policy.suppressed
    assert policy.model.config.image_token_index in policy.suppressed
    assert not torch.isin(real, torch.tensor(policy.suppressed)).any()


def test_evaluate_reproduces_sampling_logprobs(policy, rollout):
    out = policy.evaluate(rollout)
    b, t = rollout.tokens.shape
    assert out.logprobs.shape == (b, t) and out.entropy.shape == (b, t)
    assert out.hidden.shape == (b, t, policy.hidden_size)
    assert torch.allclose(out.logprobs * rollout.mask, rollout.logprobs, atol=1e-4)
    # the cached vision features change nothing
    fresh = policy.evaluate(type(rollout)(**{**{f: getattr(rollout, f) for f in (
        "images", "image_ids", "group", "tokens", "mask", "logprobs", "captions")}}))
    assert torch.allclose(fresh.logprobs, out.logprobs, atol=1e-5)


def test_scoring_with_the_prefix_shared_equals_one_pass_per_caption(tiny_policy_factory, photos):
    import attrs

    policy = tiny_policy_factory(seed=3, max_new_tokens=8).double()
    torch.manual_seed(0)
    ids, images = zip(*photos[:3])
    rollout = policy.sample(images, ids, num_samples=3)
    tokens = rollout.tokens.clone()  # captions of 1, 3 and 8 tokens, and padding after them
    tokens[0, 0], tokens[0, 1:] = policy.eos_token_id, policy.pad_token_id
    tokens[4, 2], tokens[4, 3:] = policy.eos_token_id, policy.pad_token_id
    rollout = attrs.evolve(rollout, tokens=tokens, mask=policy.generated_mask(tokens))
    mask = rollout.mask

    def scored(forward):
        policy.model.zero_grad()
        hidden, logits = forward(rollout)
        (logits.logsumexp(-1)[mask].sum() + hidden[mask].pow(2).sum()).backward()
        grads = {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None}
        return hidden.detach(), logits.detach(), grads

    shared = scored(policy._forward)
    full = scored(lambda r: policy._forward_per_caption(policy.prefix_embeds(r.policy_state), r))
    assert mask.sum(1).tolist()[:5] == [1, 8, 8, 8, 3]
    assert torch.allclose(shared[0][mask], full[0][mask], atol=1e-12)
    assert torch.allclose(shared[1][mask], full[1][mask], atol=1e-12)
    assert shared[2].keys() == full[2].keys() and len(full[2]) > 10
    for name, grad in full[2].items():
        assert torch.allclose(shared[2][name], grad, rtol=1e-9, atol=1e-12), name
    policy.model.zero_grad()


def test_only_the_paper_parts_train(policy, rollout):
    names = {n.split(".")[0] for n, p in policy.model.named_parameters() if p.requires_grad}
    assert names == set(PAPER_TRAINABLE)
    policy.model.zero_grad()
    out = policy.evaluate(rollout)
    (out.logprobs * rollout.mask).sum().backward()
    grads = {n.split(".")[0] for n, p in policy.model.named_parameters()
             if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads == set(PAPER_TRAINABLE)
    total = sum(p.grad.norm() ** 2 for p in policy.trainable_parameters()) ** 0.5
    assert torch.isfinite(total) and total < 1e3
    policy.model.zero_grad()


def test_saved_policy_loads_and_generates_with_plain_transformers(policy, photos, tmp_path):
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    policy.save_pretrained(str(tmp_path))
    model = Blip2ForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    processor = Blip2Processor.from_pretrained(str(tmp_path))
    inputs = processor(images=[photos[0][1]], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=6,
                             suppress_tokens=policy.suppressed)
    prompt = policy.num_query_tokens + 1  # image placeholders, then BOS
    generated = out[:, prompt:]
    assert generated.shape[1] >= 1
    assert isinstance(processor.batch_decode(generated, skip_special_tokens=True)[0], str)
    # Greedy tokens of plain transformers are the argmax of our policy's distribution at
    # every step: our prefix (queries + BOS) matches transformers' own generate.
    mask = policy.generated_mask(generated)
    from vlrm.structs import Rollout
    rollout = Rollout(images=[photos[0][1]], image_ids=["x"], group=torch.tensor([0]),
                      tokens=generated, mask=mask, logprobs=torch.zeros(generated.shape),
                      captions=["-"])
    with torch.no_grad():
        logp = policy.evaluate(rollout).logprobs
        full = policy._log_softmax(policy.model.language_model.get_output_embeddings()(
            policy.evaluate(rollout).hidden))
    assert torch.equal(full.argmax(-1)[mask], generated[mask])
    assert torch.allclose(logp[mask], full.max(-1).values[mask])


def test_unknown_trainable_part_is_a_config_error(tiny_policy_factory):
    with pytest.raises(ConfigError, match="'vision'"):
        tiny_policy_factory(trainable=("vision",))


def test_missing_model_dir_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="policy.init_args.model.*nowhere"):
        blip2_opt(str(tmp_path / "nowhere"))


def test_token_ends_follow_the_generated_tokens(policy, rollout):
    ends = rollout.token_ends
    assert ends.shape == rollout.tokens.shape
    assert (ends[:, 1:] >= ends[:, :-1]).all()
    for b, caption in enumerate(rollout.captions):
        real = int(rollout.mask[b].sum())
        assert ends[b, real - 1].item() == len(caption)
        # the text of the first k+1 tokens, stripped, covers exactly ends[k] characters
        ids = rollout.tokens[b, :real].tolist()
        for k in range(real):
            text = policy.tokenizer.decode(ids[:k + 1], skip_special_tokens=True).strip()
            assert caption.startswith(text[:ends[b, k].item()])


def test_bf16_policy_keeps_every_trainable_part_in_fp32(policy, photos, tmp_path):
    """The frozen parts load in bf16; the trainable ones, the bare query Parameter included,
    are cast to ``trainable_dtype`` in place, and the mixed model samples and scores."""
    policy.save_pretrained(str(tmp_path))
    mixed = blip2_opt(str(tmp_path), dtype="bfloat16", max_new_tokens=4)
    assert mixed.model.language_model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert mixed.model.query_tokens.dtype == torch.float32
    assert {p.dtype for p in mixed.trainable_parameters()} == {torch.float32}
    ids, images = zip(*photos[:2])
    rollout = mixed.sample(images, ids, num_samples=2)
    assert torch.isfinite(mixed.evaluate(rollout).logprobs).all()
