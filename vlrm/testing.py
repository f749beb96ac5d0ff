"""Contract checks for plugin authors: call them from your own tests.

    from vlrm.testing import check_reward
    def test_my_reward_honours_the_contract():
        check_reward(MyReward())

Each check raises ``ContractError`` (an ``AssertionError``) saying what is wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from vlrm.structs import RewardOutput, Rollout
from vlrm.text import token_char_ends, words_with_spans

DEFAULT_CAPTIONS = (
    ("a red bus parked on a city street", "a bus"),
    ("two cats sleeping on a green sofa next to a window", "cats on a sofa"),
    ("a plate of food", "a white plate with rice, beans and a slice of lemon on a table"),
)


class ContractError(AssertionError):
    """A component does not honour its vlrm protocol."""


def synthetic_images(n: int, size: int = 48) -> list[Any]:
    """``n`` distinct RGB PIL images (colour gradients), for checks that need any image."""
    from PIL import Image

    images = []
    for i in range(n):
        y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
        phase = i / max(n, 1)
        rgb = torch.stack([x, y, (x + y + phase) % 1.0], dim=-1) * 255
        images.append(Image.fromarray(rgb.to(torch.uint8).numpy(), mode="RGB"))
    return images


def make_rollout(
    captions: Sequence[Sequence[str]] = DEFAULT_CAPTIONS,
    images: Sequence[Any] | None = None,
    tokenizer: Any = None,
) -> Rollout:
    """A rollout of hand-written captions, ``captions[i]`` being the samples of image i.

    Args:
        captions: Per image, its sampled captions (any number each).
        images: The images; default ``synthetic_images``.
        tokenizer: A transformers tokenizer for ``tokens``; default one id per word.
    """
    images = list(images) if images is not None else synthetic_images(len(captions))
    flat = [c for per_image in captions for c in per_image]
    group = torch.tensor([i for i, per_image in enumerate(captions) for _ in per_image])
    if tokenizer is not None:
        rows = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in flat]
    else:
        vocab: dict[str, int] = {}
        rows = [[vocab.setdefault(w, len(vocab) + 1) for w, _, _ in words_with_spans(c)]
                for c in flat]
    t = max(len(r) for r in rows)
    if tokenizer is not None:
        ends = token_char_ends(tokenizer, rows, flat, t)
    else:
        ends = torch.tensor([[e for _, _, e in words_with_spans(c)] + [len(c)] * (t - len(r))
                             for c, r in zip(flat, rows)], dtype=torch.long)
    tokens = torch.zeros((len(rows), t), dtype=torch.long)
    mask = torch.zeros((len(rows), t), dtype=torch.bool)
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, :len(row)] = True
    return Rollout(images=images, image_ids=[f"image-{i}" for i in range(len(images))],
                   group=group, tokens=tokens, mask=mask,
                   logprobs=torch.zeros(tokens.shape), captions=flat, token_ends=ends)


def permute_samples(rollout: Rollout, order: torch.Tensor) -> Rollout:
    """The same rollout with its captions in another order (images unchanged)."""
    return Rollout(images=rollout.images, image_ids=rollout.image_ids, group=rollout.group[order],
                   tokens=rollout.tokens[order], mask=rollout.mask[order],
                   logprobs=rollout.logprobs[order],
                   token_ends=None if rollout.token_ends is None else rollout.token_ends[order],
                   captions=[rollout.captions[i] for i in order.tolist()])


def _check_tensor(name: str, value: torch.Tensor, shape: tuple[int, ...], who: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise ContractError(f"{who}: {name} is {type(value).__name__}, not a tensor")
    if tuple(value.shape) != shape:
        raise ContractError(f"{who}: {name} has shape {tuple(value.shape)}, expected {shape}")
    if not value.is_floating_point():
        raise ContractError(f"{who}: {name} has dtype {value.dtype}, expected a float dtype")
    if value.requires_grad:
        raise ContractError(f"{who}: {name} requires grad; rewards must run under no_grad")
    if not torch.isfinite(value).all():
        raise ContractError(f"{who}: {name} has non-finite values: {value}")


def _check_output(out: Any, rollout: Rollout, who: str) -> RewardOutput:
    if not isinstance(out, RewardOutput):
        raise ContractError(f"{who}: returned {type(out).__name__}, expected vlrm.structs.RewardOutput")
    b, t = rollout.tokens.shape
    if out.sequence is not None:
        _check_tensor("sequence", out.sequence, (b,), who)
    if out.token is not None:
        _check_tensor("token", out.token, (b, t), who)
        if (out.token.cpu()[~rollout.mask] != 0).any():
            raise ContractError(f"{who}: token rewards are non-zero on padding")
    for key, value in out.metrics.items():
        if not isinstance(value, (int, float)) or value != value:
            raise ContractError(f"{who}: metric {key!r} is {value!r}, expected a finite number")
    return out


def _same(a: torch.Tensor | None, b: torch.Tensor | None, atol: float) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return torch.allclose(a.float().cpu(), b.float().cpu(), atol=atol, rtol=1e-4)


def check_reward(reward: Any, rollout: Rollout | None = None, atol: float = 1e-5) -> RewardOutput:
    """Check a reward against the ``vlrm.protocols.Reward`` contract.

    Checks: it returns a ``RewardOutput``; sequence rewards are (B,) and token rewards
    (B, T) float tensors, finite, without gradient, zero on padding; metrics are finite
    numbers; gradient mode is left as it was; and permuting the captions permutes the
    rewards the same way (batch-order equivariance), also when asked twice (caches).

    Args:
        reward: The reward to check.
        rollout: The rollout to score; default ``make_rollout()``.
        atol: Tolerance of the equivariance check.

    Returns:
        The reward's output on ``rollout``.
    """
    who = type(reward).__name__
    rollout = rollout if rollout is not None else make_rollout()
    with torch.enable_grad():
        out = _check_output(reward(rollout), rollout, who)
        if not torch.is_grad_enabled():
            raise ContractError(f"{who}: calling the reward switched gradient mode off globally")
    again = _check_output(reward(rollout), rollout, who)
    if not (_same(again.sequence, out.sequence, atol) and _same(again.token, out.token, atol)):
        raise ContractError(f"{who}: scoring the same rollout twice gave different rewards")
    order = torch.randperm(rollout.batch_size, generator=torch.Generator().manual_seed(0))
    if torch.equal(order, torch.arange(rollout.batch_size)):
        order = order.flip(0)
    shuffled = permute_samples(rollout, order)
    permuted = _check_output(reward(shuffled), shuffled, who)
    for name in ("sequence", "token"):
        expected = getattr(out, name)
        expected = expected[order] if expected is not None else None
        if not _same(getattr(permuted, name), expected, atol):
            raise ContractError(
                f"{who}: {name} rewards are not batch-order equivariant: permuting the "
                f"captions by {order.tolist()} changed their scores")
    return out
