import pytest
import torch

from vlrm.errors import ConfigError
from vlrm.rewards import CompositeReward, RewardTerm
from vlrm.structs import RewardOutput
from vlrm.testing import check_reward, make_rollout


class WordCount:
    """Test double: one sequence reward per caption, its word count."""

    def __call__(self, rollout):
        words = [float(len(c.split())) for c in rollout.captions]
        return RewardOutput(sequence=torch.tensor(words), metrics={"seen": 1.0})


class FirstTokenBonus:
    """Test double: a per-token reward of 0.5 on each caption's first token."""

    def __call__(self, rollout):
        token = torch.zeros(rollout.tokens.shape)
        token[:, 0] = 0.5
        return RewardOutput(token=token * rollout.mask)


def test_weighted_sum_places_each_term_where_it_belongs():
    rollout = make_rollout([["a b c", "d"]])  # T = 3; caption 2 has one token
    composite = CompositeReward({"words": RewardTerm(WordCount(), 2.0),
                                 "first": RewardTerm(FirstTokenBonus(), -1.0)})
    out = composite(rollout)
    # caption 1: 2*3 on its last token (index 2), -0.5 on token 0
    # caption 2: one token carrying both 2*1 and -0.5
    expected = torch.tensor([[-0.5, 0.0, 6.0], [1.5, 0.0, 0.0]])
    assert torch.equal(out.token, expected)
    assert out.metrics["words"] == pytest.approx(2.0)      # mean unweighted (3 + 1) / 2
    assert out.metrics["first"] == pytest.approx(0.5)
    assert out.metrics["total"] == pytest.approx(3.5)      # mean of 5.5 and 1.5
    assert out.metrics["words/seen"] == 1.0


def test_composite_passes_the_reward_contract():
    check_reward(CompositeReward({"words": RewardTerm(WordCount()),
                                  "first": RewardTerm(FirstTokenBonus(), 0.3)}))


def test_empty_terms_is_an_error():
    with pytest.raises(ConfigError, match="reward.terms is empty"):
        CompositeReward({})


def test_wrong_shape_names_the_term():
    class Bad:
        def __call__(self, rollout):
            return RewardOutput(sequence=torch.zeros(1))

    with pytest.raises(ValueError, match="reward 'bad'.*shape"):
        CompositeReward({"bad": RewardTerm(Bad())})(make_rollout())
