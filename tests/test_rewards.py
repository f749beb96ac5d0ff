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


def test_running_moments_match_the_whole_stream():
    from vlrm.rewards import RunningMoments

    gen = torch.Generator().manual_seed(0)
    chunks = [torch.randn(n, generator=gen) * 3 + 2 for n in (1, 5, 17, 2)]
    moments = RunningMoments()
    for chunk in chunks:
        moments.update(chunk)
    everything = torch.cat(chunks).double()
    assert moments.count == 25
    assert moments.mean == pytest.approx(everything.mean().item(), abs=1e-12)
    assert moments.var == pytest.approx(everything.var(unbiased=False).item(), abs=1e-12)
    again = RunningMoments()
    again.load_state_dict(moments.state_dict())
    assert again.state_dict() == moments.state_dict()


def test_standardize_keeps_placement_and_standardises_caption_totals():
    from vlrm.rewards import standardize

    per_token = torch.tensor([[1.0, 0.0, 2.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    out = standardize(per_token, mask, mean=1.0, std=2.0)
    # every token / 2, and 1/2 taken off each caption's last token
    assert torch.allclose(out, torch.tensor([[0.5, 0.0, 0.5], [1.5, 0.0, 0.0]]))
    assert torch.allclose(out.sum(1), (per_token.sum(1) - 1.0) / 2.0)


def test_normalized_term_uses_running_statistics_and_logs_them():
    rollout = make_rollout([["a b c", "d"], ["e f"]])  # word counts 3, 1, 2
    composite = CompositeReward({"words": RewardTerm(WordCount(), 2.0, normalize=True),
                                 "first": RewardTerm(FirstTokenBonus(), 1.0)})
    out = composite(rollout)
    counts = torch.tensor([3.0, 1.0, 2.0])
    z = (counts - counts.mean()) / counts.std(unbiased=False)
    expected_total = 2.0 * z + 0.5
    assert torch.allclose(out.token.sum(1), expected_total, atol=1e-6)
    assert out.metrics["words"] == pytest.approx(2.0)              # raw score is still logged
    assert out.metrics["words/normalized"] == pytest.approx(0.0, abs=1e-6)
    assert out.metrics["words/running_mean"] == pytest.approx(2.0)
    assert out.metrics["words/running_std"] == pytest.approx(counts.std(unbiased=False).item())
    assert "first/normalized" not in out.metrics
    # a second batch is scaled with the statistics of both batches
    second = composite(make_rollout([["a b c d e f"]]))
    stream = torch.tensor([3.0, 1.0, 2.0, 6.0])
    z6 = (6.0 - stream.mean()) / stream.std(unbiased=False)
    assert second.metrics["words/normalized"] == pytest.approx(z6.item(), rel=1e-5)
    state = composite.state_dict()
    assert state["words"]["count"] == 4


def test_clip_bounds_each_token_and_logs_the_clipped_share():
    rollout = make_rollout([["a b c", "d"]])  # word counts 3 and 1
    composite = CompositeReward({"words": RewardTerm(WordCount(), 1.0, clip=2.0)})
    out = composite(rollout)
    assert out.token.max().item() == 2.0
    assert out.metrics["words/clipped"] == pytest.approx(0.5)     # the 3 was clipped, the 1 not
    assert out.metrics["words/normalized"] == pytest.approx(1.5)  # (2 + 1) / 2
    assert out.metrics["words"] == pytest.approx(2.0)


def test_negative_clip_is_a_config_error():
    with pytest.raises(ConfigError, match="reward.terms.words.clip"):
        CompositeReward({"words": RewardTerm(WordCount(), clip=-1.0)})
