"""One copy of a frozen tower that the policy and a reward model both hold.

BLIP-2 OPT and BLIP-2 ITM are built on the same frozen EVA-CLIP ViT-g; loaded separately
they hold two identical copies (about 2 GB in bf16). ``share_frozen_towers`` compares the
towers by a hash of their weights and, where equal and frozen on both sides, points the
reward at the policy's copy. Nothing is shared on a name match alone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

def module_digest(module: nn.Module) -> str:
    """SHA-256 of a module's state: every tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        if tensor.is_meta:
            raise ValueError(f"module_digest: {name} is on the meta device (it has no weights)")
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def parameter_bytes(module: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers (works on the meta device)."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def _frozen(module: nn.Module) -> bool:
    return not any(p.requires_grad for p in module.parameters())


def _device(module: nn.Module) -> torch.device | None:
    return next((p.device for p in module.parameters()), None)


def _reward_models(reward: Any) -> Iterator[tuple[str, Any]]:
    """(name, reward) for a reward and, for a ``CompositeReward``, each of its terms."""
    terms = getattr(reward, "terms", None)
    if isinstance(terms, dict):
        for name, term in terms.items():
            yield name, getattr(term, "reward", term)
    else:
        yield type(reward).__name__, reward


def share_frozen_towers(policy: Any, reward: Any) -> dict[str, int]:
    """Point reward models at the policy's frozen towers where the weights are identical.

    The policy offers its towers through ``vlrm.protocols.FrozenTowers``. A reward qualifies
    when it has a ``model`` with a module of the same attribute name (e.g.
    ``vision_model``), both frozen, with the same weight hash.

    Returns:
        Bytes saved per shared tower, keyed ``"<reward term>.<tower>"`` (empty if none).
    """
    from vlrm.protocols import FrozenTowers, implements

    saved: dict[str, int] = {}
    if not implements(policy, FrozenTowers):
        return saved
    for tower, mine in policy.frozen_towers().items():
        if not _frozen(mine):
            continue
        my_digest = None
        for name, term in _reward_models(reward):
            model = getattr(term, "model", None)
            theirs = getattr(model, tower, None) if model is not None else None
            if theirs is None or theirs is mine or not _frozen(theirs):
                continue
            if parameter_bytes(theirs) != parameter_bytes(mine) or _device(theirs) != _device(mine):
                continue
            my_digest = my_digest or module_digest(mine)
            if module_digest(theirs) != my_digest:
                continue
            setattr(model, tower, mine)
            saved[f"{name}.{tower}"] = parameter_bytes(mine)
    return saved
