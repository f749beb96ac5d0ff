"""Caption -> image retrieval metrics (CLIP Recall, as IC3 and VLRM measure it).

Pure tensor math with shape docs; the CLIP that produces the similarities lives in the
evaluator plugin.
"""

from __future__ import annotations

import torch


def true_ranks(sim: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
    """1-based rank of each query's true item, ties broken against the true item.

    A candidate that scores exactly as high as the true item is ranked above it, so a
    caption that matches every image equally earns no credit.

    Args:
        sim: Shape: (Q, N). Similarity of query q (a caption) to candidate n (an image).
        targets: Shape: (Q,), long. Index of each query's true candidate; default q -> q
            (requires Q == N).

    Returns:
        Shape: (Q,), long, in [1, N].
    """
    q, n = sim.shape
    if targets is None:
        if q != n:
            raise ValueError(f"similarities of shape {(q, n)} need explicit targets")
        targets = torch.arange(q, device=sim.device)
    true = sim.gather(1, targets.view(-1, 1))  # (Q, 1)
    at_least = (sim >= true).sum(dim=1)  # counts the true item itself once
    return at_least.long()


def retrieval_metrics(ranks: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """R@k, mean reciprocal rank, mean and median rank.

    Args:
        ranks: Shape: (Q,). 1-based ranks of the true items.
        ks: The k of each R@k.

    Returns:
        ``r<k>`` for each k, ``mrr``, ``mean_rank``, ``median_rank``.
    """
    if ranks.numel() == 0:
        raise ValueError("no queries to rank")
    r = ranks.double()
    out = {f"r{k}": (r <= k).double().mean().item() for k in ks}
    out["mrr"] = (1.0 / r).mean().item()
    out["mean_rank"] = r.mean().item()
    out["median_rank"] = r.median().item()  # the lower middle value for an even count
    return out
