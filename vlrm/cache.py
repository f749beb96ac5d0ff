"""A bounded cache of per-image tensors keyed by image id, shared by reward models."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence

import torch


class EmbeddingCache:
    """Least-recently-used store of one tensor per image id.

    Args:
        size: Entries kept; 0 keeps nothing (every call computes).
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._store: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._store)

    def __iter__(self) -> Iterator[str]:
        return iter(self._store)

    def get(self, ids: Sequence[str], compute: Callable[[list[int]], torch.Tensor]) -> torch.Tensor:
        """Stacked tensors for ``ids``; ``compute(indices)`` makes the missing ones.

        Args:
            ids: N image ids.
            compute: Given the positions in ``ids`` not cached, returns their tensors
                stacked along dim 0.

        Returns:
            Shape: (N, ...), in the order of ``ids``.
        """
        missing = [i for i, key in enumerate(ids) if key not in self._store]
        fresh = dict(zip((ids[i] for i in missing), compute(missing))) if missing else {}
        out = torch.stack([fresh[k] if k in fresh else self._store[k] for k in ids])
        if self.size:
            self._store.update(fresh)
            for key in ids:
                self._store.move_to_end(key)
            while len(self._store) > self.size:
                self._store.popitem(last=False)
        return out
