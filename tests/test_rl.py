import pytest
import torch

from vlrm import rl

T, F = True, False


def test_masked_mean_ignores_padding():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 100.0, 100.0]])
    mask = torch.tensor([[T, T, F], [T, F, F]])
    # (1 + 2 + 3) / 3 real tokens
    assert rl.masked_mean(x, mask).item() == pytest.approx(2.0)


def test_masked_mean_of_empty_mask_is_zero():
    assert rl.masked_mean(torch.ones(2, 2), torch.zeros(2, 2, dtype=torch.bool)).item() == 0.0


def test_masked_whiten():
    x = torch.tensor([[1.0, 3.0, 50.0]])
    mask = torch.tensor([[T, T, F]])
    # mean 2, biased var 1 -> (-1, 1), padding zeroed
    assert torch.allclose(rl.masked_whiten(x, mask), torch.tensor([[-1.0, 1.0, 0.0]]), atol=1e-4)


def test_place_on_last_token():
    rewards = torch.tensor([5.0, 7.0, 9.0])
    mask = torch.tensor([[T, T, F], [T, T, T], [F, F, F]])
    expected = torch.tensor([[0.0, 5.0, 0.0], [0.0, 0.0, 7.0], [0.0, 0.0, 0.0]])
    assert torch.equal(rl.place_on_last_token(rewards, mask), expected)


def test_returns_with_gamma_one_are_reverse_cumulative_sums():
    r = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 99.0]])
    mask = torch.tensor([[T, T, T], [T, T, F]])
    # row 0: (1+2+3, 2+3, 3); row 1: (4+5, 5, pad); the padded 99 never counts
    expected = torch.tensor([[6.0, 5.0, 3.0], [9.0, 5.0, 0.0]])
    assert torch.equal(rl.discounted_returns(r, mask, gamma=1.0), expected)


def test_returns_with_discount():
    r = torch.tensor([[1.0, 0.0, 2.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    # R0 = 1 + 0.5*0 + 0.25*2 = 1.5; R1 = 0 + 0.5*2 = 1; R2 = 2
    assert torch.allclose(rl.discounted_returns(r, mask, gamma=0.5), torch.tensor([[1.5, 1.0, 2.0]]))


def test_advantages_detach_values_and_zero_padding():
    returns = torch.tensor([[3.0, 2.0, 0.0]])
    values = torch.tensor([[1.0, 1.5, 8.0]], requires_grad=True)
    mask = torch.tensor([[T, T, F]])
    adv = rl.advantages(returns, values, mask)
    assert torch.equal(adv, torch.tensor([[2.0, 0.5, 0.0]]))
    assert not adv.requires_grad


def test_a2c_loss_value_and_gradients():
    logprobs = torch.tensor([[-1.0, -2.0, -5.0]], requires_grad=True)
    values = torch.tensor([[0.5, 1.0, 3.0]], requires_grad=True)
    entropy = torch.tensor([[2.0, 4.0, 9.0]])
    returns = torch.tensor([[1.5, 1.0, 0.0]])
    mask = torch.tensor([[T, T, F]])
    adv = rl.advantages(returns, values, mask)  # (1.0, 0.0, 0)
    loss, stats = rl.a2c_loss(logprobs, values, entropy, returns, adv, mask,
                              vf_coef=0.5, ent_coef=0.1)
    # policy: -mean(1*-1, 0*-2) = 0.5; value: mean((0.5-1.5)^2, (1-1)^2) = 0.5
    # entropy: mean(2, 4) = 3 -> total 0.5 + 0.5*0.5 - 0.1*3 = 0.45
    assert stats["loss/policy"].item() == pytest.approx(0.5)
    assert stats["loss/value"].item() == pytest.approx(0.5)
    assert stats["loss/entropy"].item() == pytest.approx(3.0)
    assert loss.item() == pytest.approx(0.45)
    loss.backward()
    # d/dlogp = -A/n = (-0.5, 0, 0); d/dV = 0.5 * 2 (V - R) / n = (-0.5, 0, 0)
    assert torch.allclose(logprobs.grad, torch.tensor([[-0.5, 0.0, 0.0]]))
    assert torch.allclose(values.grad, torch.tensor([[-0.5, 0.0, 0.0]]))
    assert all(not v.requires_grad for v in stats.values())
