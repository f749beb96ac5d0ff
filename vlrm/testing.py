"""Contract checks for plugin authors: call them from your own tests.

    from vlrm.testing import check_reward
    def test_my_reward_honours_the_contract():
        check_reward(MyReward())

``check_reward`` and ``check_policy`` are the contracts ``vlrm-run`` relies on.
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


def _check_rollout(rollout: Any, n: int, k: int, who: str) -> None:
    if not isinstance(rollout, Rollout):
        raise ContractError(f"{who}: sample() returned {type(rollout).__name__}, expected a Rollout")
    b = n * k
    if rollout.batch_size != b or len(rollout.images) != n:
        raise ContractError(f"{who}: sample() of {n} images x {k} gave {rollout.batch_size} "
                            f"captions for {len(rollout.images)} images")
    if not torch.equal(rollout.group.cpu(), torch.arange(n).repeat_interleave(k)):
        raise ContractError(f"{who}: group {rollout.group.tolist()} is not image-major "
                            f"(the K samples of image 0 first)")
    mask = rollout.mask.cpu()
    if (mask[:, 1:] & ~mask[:, :-1]).any():
        raise ContractError(f"{who}: mask has a real token after padding (masks are "
                            "True up to each caption's end, then False)")
    logprobs = rollout.logprobs.float().cpu()
    if not torch.isfinite(logprobs).all() or (logprobs[mask] > 1e-6).any():
        raise ContractError(f"{who}: sampled log-probs must be finite and <= 0")
    if (logprobs[~mask] != 0).any():
        raise ContractError(f"{who}: sampled log-probs are non-zero on padding")
    if not all(isinstance(c, str) for c in rollout.captions):
        raise ContractError(f"{who}: captions must be strings")


def _check_scoring(policy: Any, rollout: Rollout, atol: float, who: str) -> None:
    """Scoring reproduces the sampled log-probs; gradients reach trainable parameters only."""
    trainable = list(policy.trainable_parameters())
    if not trainable:
        raise ContractError(f"{who}: trainable_parameters() is empty")
    frozen = [p for p in getattr(policy, "parameters", lambda: [])()
              if not any(p is q for q in trainable)]
    out = policy.evaluate(rollout)
    b, t = rollout.tokens.shape
    for name, shape in (("logprobs", (b, t)), ("entropy", (b, t)), ("hidden", (b, t, policy.hidden_size))):
        if tuple(getattr(out, name).shape) != shape:
            raise ContractError(f"{who}: evaluate() {name} has shape "
                                f"{tuple(getattr(out, name).shape)}, expected {shape}")
    mask = rollout.mask.to(out.logprobs.device)
    gap = ((out.logprobs.detach().float() - rollout.logprobs.to(out.logprobs.device).float()) * mask).abs().max()
    if gap > atol:
        raise ContractError(f"{who}: evaluate() log-probs differ from the sampled ones by "
                            f"{gap.item():.2e} (> {atol}): scoring must reproduce sampling")
    if (out.entropy.detach()[mask] < -1e-5).any():
        raise ContractError(f"{who}: negative entropy")
    for p in trainable:
        p.grad = None
    ((out.logprobs * mask).sum() + (out.hidden * mask.unsqueeze(-1)).sum()).backward()
    if not any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in trainable):
        raise ContractError(f"{who}: no trainable parameter received a gradient")
    leaked = [p for p in frozen if p.grad is not None]
    if leaked:
        raise ContractError(f"{who}: {len(leaked)} parameter(s) outside trainable_parameters() "
                            "received gradients (frozen parts must stay frozen)")
    for p in trainable:
        p.grad = None


def _check_seeding(policy: Any, images: Sequence[Any], k: int, who: str) -> None:
    """The same seeds give the same captions, whatever else is in the batch."""
    from vlrm.protocols import SeededSampler, implements

    ids = [f"image-{i}" for i in range(len(images))]
    if implements(policy, SeededSampler):
        seeds = list(range(11, 11 + len(images)))
        one = policy.sample(images, ids, k, seeds=seeds)
        two = policy.sample(images, ids, k, seeds=seeds)
        alone = policy.sample(images[:1], ids[:1], k, seeds=seeds[:1])
        t = alone.tokens.shape[1]
        if not torch.equal(one.tokens, two.tokens) or \
                not torch.equal(one.tokens[:k, :t].cpu(), alone.tokens.cpu()):
            raise ContractError(f"{who}: sample(seeds=...) is not a function of each image's seed")
        return
    torch.manual_seed(5)
    one = policy.sample(images, ids, k)
    torch.manual_seed(5)
    two = policy.sample(images, ids, k)
    if not torch.equal(one.tokens, two.tokens):
        raise ContractError(f"{who}: the same global seed gave different captions")


def check_policy(policy: Any, images: Sequence[Any] | None = None, num_samples: int = 2,
                 atol: float = 1e-4, native_captions: Any = None, max_new_tokens: int = 8) -> Rollout:
    """Check a policy against ``vlrm.protocols.Policy`` and its declared capabilities.

    Checks: ``sample`` returns an image-major ``Rollout`` whose masks end each caption once
    and whose log-probs are finite, <= 0 and zero on padding; ``evaluate`` has the documented
    shapes and reproduces the sampled log-probs within ``atol``; gradients reach only
    ``trainable_parameters()``; the same seeds give the same captions (per image with
    ``SeededSampler``); and, given ``native_captions``, a ``save_pretrained`` folder reloaded by
    the native library captions greedily as the policy's ``caption`` does.

    Args:
        policy: The policy to check.
        images: N images; default three ``synthetic_images``.
        num_samples: K captions per image.
        atol: Tolerance of the log-prob reproduction (float32).
        native_captions: ``fn(folder, images, max_new_tokens) -> list[str]``: greedy
            captions by the native library from a saved folder (e.g.
            ``vlrm_plugins.hf_inputs.native_captions``); None skips the reload check.
        max_new_tokens: Caption length for the reload check.

    Returns:
        The first rollout sampled.
    """
    import tempfile

    from vlrm.protocols import Captioner, Policy, explain, implements

    who = type(policy).__name__
    problems = explain(policy, Policy)
    if problems:
        raise ContractError(f"{who} is not a vlrm Policy: {'; '.join(problems)}")
    images = list(images) if images is not None else synthetic_images(3)
    ids = [f"image-{i}" for i in range(len(images))]
    rollout = policy.sample(images, ids, num_samples)
    _check_rollout(rollout, len(images), num_samples, who)
    _check_scoring(policy, rollout, atol, who)
    _check_seeding(policy, images, num_samples, who)
    if native_captions is not None:
        if not implements(policy, Captioner):
            raise ContractError(f"{who}: the reload check needs caption(): "
                                f"{'; '.join(explain(policy, Captioner))}")
        mine, _ = policy.caption(images, max_new_tokens=max_new_tokens)
        with tempfile.TemporaryDirectory() as folder:
            policy.save_pretrained(folder)
            theirs = list(native_captions(folder, images, max_new_tokens))
        if mine != theirs:
            raise ContractError(f"{who}: the saved folder, reloaded natively, captions "
                                f"{theirs[:2]} where the policy captions {mine[:2]}")
    return rollout
