import pytest
import torch

from vlrm.value_head import ValueHead


def test_shape_dtype_and_zero_start():
    head = ValueHead(hidden_size=8, inner_size=4)
    values = head(torch.randn(3, 5, 8, dtype=torch.bfloat16))
    assert values.shape == (3, 5) and values.dtype == torch.float32
    assert torch.equal(values, torch.zeros(3, 5))  # last layer starts at zero


def test_wrong_hidden_size_is_a_clear_error():
    with pytest.raises(ValueError, match="hidden size 8, got 6"):
        ValueHead(8)(torch.randn(1, 2, 6))


def test_learns_a_target():
    torch.manual_seed(0)
    head = ValueHead(4, 16)
    x, y = torch.randn(1, 32, 4), torch.randn(1, 32)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    first = None
    for _ in range(200):
        loss = ((head(x) - y) ** 2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad(); loss.backward(); opt.step()
    assert loss.item() < 0.2 * first
