import pytest
import torch

from vlrm.errors import ConfigError
from vlrm_plugins.blip2_opt import LORA_CONFIG, LORA_WEIGHTS, blip2_opt


@pytest.fixture(scope="module")
def lora_policy(tiny_policy_factory):
    policy = tiny_policy_factory(seed=0, max_new_tokens=8, lora_rank=4, lora_alpha=8,
                                 lora_targets=("q_proj", "v_proj", "fc1"))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # as if trained: nonzero adapters
        for name, p in policy.model.named_parameters():
            if ".lora_B" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return policy


def test_lora_is_off_by_default(tiny_policy_factory):
    policy = tiny_policy_factory(seed=0)
    assert policy.lora is None
    assert not any(".lora_" in n for n, _ in policy.model.named_parameters())


def test_adapters_on_the_configured_layers_train(lora_policy, photos):
    names = [n for n, p in lora_policy.model.named_parameters() if ".lora_" in n]
    layers = {n.split(".lora_")[0].rsplit(".", 1)[1] for n in names}
    assert layers == {"q_proj", "v_proj", "fc1"}
    assert all(n.startswith("language_model.") for n in names)
    assert {n.split(".")[0] for n, p in lora_policy.model.named_parameters() if p.requires_grad} == {
        "qformer", "query_tokens", "language_projection", "language_model"}
    frozen_lm = [n for n, p in lora_policy.model.language_model.named_parameters()
                 if ".lora_" not in n and p.requires_grad]
    assert frozen_lm == []
    torch.manual_seed(0)
    ids, images = zip(*photos[:2])
    rollout = lora_policy.sample(images, ids, 2)
    out = lora_policy.evaluate(rollout)
    assert torch.allclose(out.logprobs * rollout.mask, rollout.logprobs, atol=1e-4)
    lora_policy.model.zero_grad()
    (out.logprobs * rollout.mask).sum().backward()
    grads = [p.grad for n, p in lora_policy.model.named_parameters() if ".lora_" in n]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    lora_policy.model.zero_grad()


def test_reference_lm_is_opt_without_adapters(lora_policy, tiny_policy_factory, photos):
    base = tiny_policy_factory(seed=0, max_new_tokens=8)
    torch.manual_seed(0)
    ids, images = zip(*photos[:2])
    rollout = lora_policy.sample(images, ids, 2)
    assert torch.allclose(lora_policy.text_logprobs(rollout.tokens, rollout.mask),
                          base.text_logprobs(rollout.tokens, rollout.mask), atol=1e-5)


def test_saved_with_adapters_and_read_back(lora_policy, photos, tmp_path):
    from transformers import Blip2ForConditionalGeneration

    lora_policy.save_pretrained(str(tmp_path))
    assert (tmp_path / LORA_WEIGHTS).is_file() and (tmp_path / LORA_CONFIG).is_file()
    # the folder itself is a plain transformers directory of the base architecture
    plain = Blip2ForConditionalGeneration.from_pretrained(str(tmp_path))
    assert not any(".lora_" in k or "base_layer" in k for k in plain.state_dict())
    again = blip2_opt(str(tmp_path), max_new_tokens=8)
    assert again.lora == lora_policy.lora
    torch.manual_seed(0)
    ids, images = zip(*photos[:2])
    rollout = lora_policy.sample(images, ids, 2)
    assert torch.allclose(again.evaluate(rollout).logprobs, lora_policy.evaluate(rollout).logprobs,
                          atol=1e-6)
    with pytest.raises(ConfigError, match="holds LoRA adapters"):
        blip2_opt(str(tmp_path), lora_rank=2)


def test_bad_lora_settings_are_config_errors(tiny_policy_factory):
    with pytest.raises(ConfigError, match="lora_targets"):
        tiny_policy_factory(lora_rank=2, lora_targets=("no_such_layer",))
    with pytest.raises(ConfigError, match="exclude each other"):
        tiny_policy_factory(lora_rank=2, trainable=("qformer", "language_model"))
