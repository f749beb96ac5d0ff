"""The generic image-text-to-text policy on every tested family (tiny random-weight models of
the real transformers classes, built in-process): the policy contract, three A2C steps that
train only the chosen parts, the reference-LM and KL terms, and a native reload."""

import pytest
import torch

from vlrm.testing import check_policy, synthetic_images
from vlrm_plugins.hf_captioner import hf_captioner, tiny_hf_captioner
from vlrm_plugins.hf_inputs import native_captions
from vlrm_plugins.hf_tiny import FAMILIES, save_tiny_captioner


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster on one thread than on two contended ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("family", FAMILIES)
def test_policy_contract_and_native_reload(family):
    policy = tiny_hf_captioner(family, max_new_tokens=6)
    rollout = check_policy(policy, num_samples=2, native_captions=native_captions, max_new_tokens=5)
    assert rollout.batch_size == 6 and rollout.tokens.shape[1] <= 6


class Tokens:
    """A test reward: pays 1 per generated token whose id is even (any family can earn it)."""

    def __call__(self, rollout):
        from vlrm.structs import RewardOutput

        return RewardOutput(token=((rollout.tokens % 2 == 0) & rollout.mask).float().cpu())


@pytest.mark.parametrize("family", FAMILIES)
def test_three_a2c_steps_train_only_the_chosen_parts(family, tmp_path):
    from vlrm.rewards import CompositeReward, RewardTerm
    from vlrm.trainer import Trainer, TrainerConfig
    from vlrm_plugins.reference_kl import ReferenceKLPenalty
    from vlrm_plugins.bundled_photos import bundled_photos
    from vlrm_plugins.reference_lm import ReferenceLMReward

    policy = tiny_hf_captioner(family, max_new_tokens=5)
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    trained = {n for n, p in policy.model.named_parameters() if p.requires_grad}
    reward = CompositeReward({"tokens": RewardTerm(Tokens()),
                              "ref": RewardTerm(ReferenceLMReward(), weight=0.1),
                              "kl": RewardTerm(ReferenceKLPenalty(), weight=0.05)})
    config = TrainerConfig(max_steps=3, images_per_step=2, samples_per_image=2, policy_lr=0.05,
                           save_every=0, progress=False, sample_seeding="per_image")
    trainer = Trainer(policy, reward, bundled_photos(), config, tmp_path)
    trainer.train()
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 3
    assert all('"reward/ref"' in r and '"reward/kl/kl"' in r for r in rows)
    after = dict(policy.model.named_parameters())
    moved = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert moved and moved <= trained, f"frozen parts changed: {sorted(moved - trained)[:3]}"
    frozen_identical = all(torch.equal(before[n], after[n].detach()) for n in before if n not in trained)
    assert frozen_identical
    # the checkpoint reloads with plain transformers and captions
    folder = tmp_path / "checkpoints" / "last" / "policy"
    captions = native_captions(str(folder), synthetic_images(2), 4)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)


@pytest.mark.parametrize("family", ["llava", "blip2_t5"])
def test_lora_trains_adapters_and_the_reference_disables_them(family, tmp_path):
    policy = tiny_hf_captioner(family, max_new_tokens=5, lora_rank=4)
    names = [n for n, p in policy.model.named_parameters() if p.requires_grad]
    assert any(".lora_" in n for n in names)
    torch.manual_seed(0)
    rollout = policy.sample(synthetic_images(2), ["a", "b"], 2)
    policy.snapshot_reference()
    with torch.no_grad():  # move the adapters: the policy changes, the reference does not
        for name, param in policy.model.named_parameters():
            if "lora_B" in name:
                param.add_(0.5)
    moved = policy.evaluate(rollout).logprobs.detach()
    reference = policy.reference_logprobs(rollout)
    assert ((reference - rollout.logprobs) * rollout.mask).abs().max() < 1e-4
    assert ((moved - rollout.logprobs) * rollout.mask).abs().max() > 1e-3
    policy.save_pretrained(str(tmp_path / "p"))
    again = hf_captioner(str(tmp_path / "p"))
    assert again.lora == policy.lora
    assert torch.allclose(again.evaluate(rollout).logprobs, moved, atol=1e-5)


def test_a_pattern_that_matches_nothing_is_an_error_naming_it(tmp_path):
    from vlrm.errors import ConfigError

    spec = save_tiny_captioner("llava", tmp_path)
    with pytest.raises(ConfigError, match="model.no_such_projector"):
        hf_captioner(str(tmp_path), trainable=["model.no_such_projector"], prompt=spec.prompt)
    with pytest.raises(ConfigError, match="trainable"):
        hf_captioner(str(tmp_path), prompt=spec.prompt)
    # LLaVA's image placeholder lives in the prompt: none at all is a config error
    with pytest.raises(ConfigError, match="policy.init_args.prompt.*LlavaForConditionalGeneration"):
        hf_captioner(str(tmp_path), trainable=list(spec.trainable), prompt=None)


def test_a_missing_folder_names_the_key():
    from vlrm.errors import ConfigError

    with pytest.raises(ConfigError, match="policy.init_args.model"):
        hf_captioner("./no/such/folder", trainable=["x"])


def test_shared_prefill_draws_what_generate_draws():
    """Decoder-only: K samples from one prefill per image equal generate(num_return_sequences=K)
    for the same global seed (Qwen2-VL's 3-D positions included)."""
    for family in ("llava", "qwen2_vl", "instructblip"):
        policy = tiny_hf_captioner(family, max_new_tokens=6)
        images = synthetic_images(2)
        draws = []
        for shared in (True, False):
            policy.shared_prefill = shared
            torch.manual_seed(3)
            draws.append(policy.sample(images, ["a", "b"], 3))
        assert torch.equal(draws[0].tokens, draws[1].tokens), family
        assert torch.allclose(draws[0].logprobs, draws[1].logprobs, atol=1e-5), family


def test_text_logprobs_is_the_language_model_without_the_image():
    policy = tiny_hf_captioner("llava", max_new_tokens=6)
    torch.manual_seed(0)
    rollout = policy.sample(synthetic_images(2), ["a", "b"], 2)
    text = policy.text_logprobs(rollout.tokens, rollout.mask)
    assert text.shape == rollout.tokens.shape and torch.isfinite(text).all()
    assert (text[~rollout.mask] == 0).all()
    # the image changes the captioner's distribution, text alone does not see it
    assert not torch.allclose(text, rollout.logprobs, atol=1e-4)


@pytest.mark.parametrize("family", ["llava", "florence2", "git"])
def test_allowed_tokens_sees_the_caption_without_the_prompt(family):
    """The constraint gets the caption so far: empty at the first step, whatever the prompt."""
    policy = tiny_hf_captioner(family, max_new_tokens=4)
    seen = []
    chosen = policy.tokenizer.convert_tokens_to_ids(policy.tokenizer.tokenize("red")[:1])

    def allowed(batch_id, ids):
        seen.append(len(ids))
        return chosen

    captions, lengths = policy.caption(synthetic_images(2), max_new_tokens=3, allowed_tokens=allowed)
    assert min(seen) == 0 and max(seen) == 2
    assert captions == policy.decode([chosen * 3] * 2) and lengths == [3, 3]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "paligemma", "instructblip"])
def test_scoring_from_one_prefill_per_image_equals_the_full_forward(family):
    """Scoring runs each image's prompt once and shares its cache among the image's captions;
    log-probs, hidden states and the trainable parts' gradients equal those of one forward of
    prompt + caption per caption."""
    import attrs

    policy = tiny_hf_captioner(family, max_new_tokens=5)
    torch.manual_seed(1)
    rollout = policy.sample(synthetic_images(2), ["a", "b"], 3)
    assert rollout.policy_state.shared
    results = []
    for state in (rollout.policy_state, attrs.evolve(rollout.policy_state, shared=False)):
        out = policy.evaluate(attrs.evolve(rollout, policy_state=state))
        params = list(policy.trainable_parameters())
        grads = torch.autograd.grad((out.logprobs * rollout.mask).sum()
                                    + (out.hidden * rollout.mask[..., None]).sum(), params)
        results.append((out.logprobs.detach(), out.hidden.detach(), grads))
    (lp1, h1, g1), (lp2, h2, g2) = results
    mask = rollout.mask
    assert torch.allclose(lp1[mask], lp2[mask], atol=1e-5)
    assert torch.allclose(h1[mask], h2[mask], atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(g1, g2))


@pytest.mark.parametrize("family", ["llava", "instructblip", "florence2"])
def test_frozen_parts_in_bfloat16_with_float32_trained_parts(family, tmp_path):
    """The family configs' setting (dtype bfloat16, trainable_dtype float32): the parts'
    dtypes differ, so the policy runs under autocast; sampling, scoring and the backward work,
    the trained parts stay float32 and get gradients."""
    spec = save_tiny_captioner(family, tmp_path)
    policy = hf_captioner(str(tmp_path), trainable=list(spec.trainable), prompt=spec.prompt,
                          dtype="bfloat16", trainable_dtype="float32", max_new_tokens=4)
    params = list(policy.trainable_parameters())
    assert {p.dtype for p in params} == {torch.float32}
    assert any(p.dtype == torch.bfloat16 for p in policy.model.parameters())
    torch.manual_seed(0)
    rollout = policy.sample(synthetic_images(2), ["a", "b"], 2)
    out = policy.evaluate(rollout)
    gap = ((out.logprobs.float() - rollout.logprobs) * rollout.mask).abs().max()
    assert gap < 0.05  # bfloat16 arithmetic; the same path on both sides
    (out.logprobs * rollout.mask).sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)
    assert len(policy.caption(synthetic_images(1), max_new_tokens=3)[0]) == 1
