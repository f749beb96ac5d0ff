import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlrm.errors import ConfigError
from vlrm.testing import check_reward, make_rollout
from vlrm_plugins.blip2_opt import gpt2_tokenizer
from vlrm_plugins.text_penalties import BadPhrasePenalty, RepetitionPenalty


@pytest.fixture(scope="module")
def tok():
    return gpt2_tokenizer()


def penalised_prefixes(reward, caption, tok):
    """The decoded text up to each penalised token, and the penalties."""
    rollout = make_rollout([[caption]], tokenizer=tok)
    out = reward(rollout).token[0]
    ids = rollout.tokens[0][rollout.mask[0]].tolist()
    hits = out.nonzero().flatten().tolist()
    return [tok.decode(ids[:k + 1]) for k in hits], out[hits].tolist()


def test_bad_phrase_lands_on_the_completing_tokens(tok):
    prefixes, values = penalised_prefixes(BadPhrasePenalty(), "an image of a dog in 1998", tok)
    assert prefixes == ["an image of", "an image of a dog in 1998"]
    assert values == [-1.0, -1.0]


def test_bad_phrase_is_case_insensitive_and_on_word_boundaries(tok):
    reward = BadPhrasePenalty(penalty=2.0)
    prefixes, values = penalised_prefixes(reward, "A Photo  Of a cat", tok)
    assert prefixes == ["A Photo  Of"] and values == [-2.0]
    assert reward.events("a photo often taken") == []       # "of" inside "often"
    assert reward.events("bus 19981 and 1750") == []        # not a year 1800-2099
    assert reward.events("since 2024") == [10]


def test_repetition_lands_on_the_second_word(tok):
    prefixes, values = penalised_prefixes(RepetitionPenalty(), "a red red car", tok)
    assert prefixes == ["a red red"] and values == [-1.0]


def test_repeated_ngram(tok):
    reward = RepetitionPenalty(ngram=3, consecutive=False)
    caption = "a dog on a beach and a dog on a rock"
    prefixes, _ = penalised_prefixes(reward, caption, tok)
    # both "a dog on" and "dog on a" come back: each repeated trigram costs once
    assert prefixes == ["a dog on a beach and a dog on", "a dog on a beach and a dog on a"]
    assert RepetitionPenalty(ngram=0, consecutive=False).events(caption) == []


def test_clean_caption_costs_nothing(tok):
    rollout = make_rollout([["a brown dog runs on green grass"]], tokenizer=tok)
    for reward in (BadPhrasePenalty(), RepetitionPenalty()):
        out = reward(rollout)
        assert torch.equal(out.token, torch.zeros_like(out.token)) and out.metrics["rate"] == 0


def test_without_token_offsets_the_penalty_falls_on_the_last_token():
    rollout = make_rollout([["an image of a cat"]])
    rollout = type(rollout)(**{f: getattr(rollout, f) for f in (
        "images", "image_ids", "group", "tokens", "mask", "logprobs", "captions")})
    assert reward_positions(BadPhrasePenalty(), rollout) == [4]


def reward_positions(reward, rollout):
    return reward(rollout).token[0].nonzero().flatten().tolist()


@pytest.mark.parametrize("reward", [BadPhrasePenalty(), RepetitionPenalty()],
                         ids=["bad_phrase", "repetition"])
def test_contract(reward, tok):
    captions = [["an image of a red red bus in 2001", "a bus"], ["a dog a dog a dog", "x"]]
    check_reward(reward, make_rollout(captions, tokenizer=tok))


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="invalid regular expression"):
        BadPhrasePenalty(patterns=["(unclosed"])
    with pytest.raises(ConfigError, match="penalty"):
        RepetitionPenalty(penalty=-1)


captions = st.lists(st.text(max_size=40), min_size=1, max_size=4)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(captions, min_size=1, max_size=3))
def test_any_unicode_caption_is_safe(per_image):
    rollout = make_rollout(per_image)
    for reward in (BadPhrasePenalty(), RepetitionPenalty(ngram=2)):
        out = check_reward(reward, rollout)  # shapes, finite, batch-order equivariant
        assert (out.token <= 0).all()        # penalties never pay
