"""vlrm.testing must catch rewards that break the contract (test doubles of rewards)."""

import pytest
import torch

from vlrm.structs import RewardOutput
from vlrm.testing import ContractError, check_reward, make_rollout


class WordCount:
    """A well-behaved reward: words per caption."""

    def __call__(self, rollout):
        return RewardOutput(sequence=torch.tensor([float(len(c.split())) for c in rollout.captions]))


class Broken(WordCount):
    def __init__(self, how):
        self.how, self.calls = how, 0

    def __call__(self, rollout):
        self.calls += 1
        seq = super().__call__(rollout).sequence
        if self.how == "shape":
            return RewardOutput(sequence=seq[:-1])
        if self.how == "grad":
            return RewardOutput(sequence=seq.requires_grad_())
        if self.how == "nan":
            return RewardOutput(sequence=seq / 0 * 0)
        if self.how == "order":  # depends on position in the batch
            return RewardOutput(sequence=seq + torch.arange(len(seq)))
        if self.how == "padding":
            return RewardOutput(token=torch.ones(rollout.tokens.shape))
        if self.how == "type":
            return {"reward": seq}
        if self.how == "state":  # drifts between calls
            return RewardOutput(sequence=seq + self.calls)
        if self.how == "int":
            return RewardOutput(sequence=seq.long())
        raise AssertionError(self.how)


def test_a_good_reward_passes():
    out = check_reward(WordCount())
    assert out.sequence.tolist()[:2] == [8.0, 2.0]


@pytest.mark.parametrize("how, message", [
    ("shape", "shape"), ("grad", "requires grad"), ("nan", "non-finite"),
    ("order", "equivariant"), ("padding", "padding"), ("type", "RewardOutput"),
    ("state", "twice"), ("int", "float dtype")])
def test_broken_rewards_are_caught(how, message):
    with pytest.raises(ContractError, match=message):
        check_reward(Broken(how))


def test_make_rollout_with_a_real_tokenizer():
    from vlrm_plugins.blip2_opt import gpt2_tokenizer

    tok = gpt2_tokenizer()
    rollout = make_rollout([["a dog", "hello world again"]], tokenizer=tok)
    assert rollout.tokens[1, :3].tolist() == tok("hello world again")["input_ids"]
    assert rollout.mask.sum(1).tolist() == [2, 3]


def test_example_third_party_reward_passes():
    from vlrm_example_reward import CaptionLengthReward

    out = check_reward(CaptionLengthReward(target_words=2))
    assert out.sequence[1].item() == pytest.approx(1.0)  # "a bus": exactly 2 words
