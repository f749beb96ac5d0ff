import pytest
import torch

from vlrm.errors import ConfigError
from vlrm.testing import check_reward, make_rollout
from vlrm_plugins.blip2_itm_reward import blip2_itm_reward, tiny_blip2_itm_reward


@pytest.fixture(scope="module")
def itm():
    return tiny_blip2_itm_reward(seed=3)


@pytest.fixture
def rollout(photos):
    return make_rollout([["a cat on a sofa", "a red bus"], ["a rocket"], ["coffee", "two cups"]],
                        images=[img for _, img in photos[:3]])


def direct(reward, rollout, itm_head):
    """The same scores from a plain forward of the transformers model, image by caption."""
    images = [rollout.images[g] for g in rollout.group.tolist()]
    pixels = reward.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    text = reward.tokenizer(list(rollout.captions), padding=True, return_tensors="pt")
    with torch.no_grad():
        out = reward.model(pixel_values=pixels, input_ids=text["input_ids"],
                           attention_mask=text["attention_mask"],
                           use_image_text_matching_head=itm_head)
    logits = out.logits_per_image
    return logits[:, 1] if itm_head else logits.diagonal()


def test_itm_is_the_match_logit_of_the_transformers_model(itm, rollout):
    assert torch.allclose(itm(rollout).sequence, direct(itm, rollout, True), atol=1e-5)


def test_itc_mode_matches_the_transformers_model(rollout):
    itc = tiny_blip2_itm_reward(seed=3, mode="itc")
    assert torch.allclose(itc(rollout).sequence, direct(itc, rollout, False), atol=1e-5)


def test_contract_and_cache(itm, rollout):
    check_reward(itm, rollout)
    assert set(itm._cache) >= {"image-0", "image-1", "image-2"}


def test_bad_mode_and_missing_model_are_config_errors(itm, tmp_path):
    with pytest.raises(ConfigError, match="mode"):
        type(itm)(itm.model, itm.processor, mode="cosine")
    with pytest.raises(ConfigError, match="does not exist"):
        blip2_itm_reward(str(tmp_path / "missing"))
