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


def test_per_token_returns_of_a_composite_by_hand():
    from vlrm.rl import discounted_returns

    # 2 captions x 5 tokens: "a b c d e" (5 tokens) and "f g" (2 tokens, 3 padding)
    rollout = make_rollout([["a b c d e"], ["f g"]])
    composite = CompositeReward({"words": RewardTerm(WordCount(), 0.5),
                                 "first": RewardTerm(FirstTokenBonus(), 2.0)})
    rewards = composite(rollout).token
    # row 0: 2*0.5 = 1 on token 0, 0.5*5 = 2.5 on token 4; row 1: 1 on token 0, 0.5*2 = 1 on token 1
    assert torch.equal(rewards, torch.tensor([[1.0, 0, 0, 0, 2.5], [1.0, 1.0, 0, 0, 0]]))
    returns = discounted_returns(rewards, rollout.mask, gamma=1.0)
    # R(t_k) = sum of rewards from k on: row 0 (3.5, 2.5, 2.5, 2.5, 2.5); row 1 (2, 1, pad)
    assert torch.equal(returns, torch.tensor([[3.5, 2.5, 2.5, 2.5, 2.5], [2.0, 1.0, 0, 0, 0]]))
