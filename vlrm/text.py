"""Text helpers shared by text rewards: words with their character spans, and where each
generated token ends inside its decoded caption."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

WORD = re.compile(r"\w+(?:'\w+)?", re.UNICODE)


def words_with_spans(text: str) -> list[tuple[str, int, int]]:
    """Lower-cased words of ``text`` with their [start, end) character offsets."""
    return [(m.group(0).lower(), m.start(), m.end()) for m in WORD.finditer(text)]


def token_char_ends(tokenizer: Any, rows: Sequence[Sequence[int]], captions: Sequence[str],
                    width: int) -> torch.Tensor:
    """How many characters of each caption its first k+1 tokens decode to.

    Decodes every prefix of every row in one batched call, so the offsets follow the
    tokens actually generated (not a re-tokenisation of the text).

    Args:
        tokenizer: Any tokenizer with ``batch_decode``.
        rows: Per caption, its real generated token ids.
        captions: The decoded captions (``decode(row).strip()``).
        width: T, the padded token width.

    Returns:
        Shape: (B, T), long, non-decreasing along T; padding holds the caption length.
    """
    prefixes = [list(row[:k + 1]) for row in rows for k in range(len(row))]
    texts = iter(tokenizer.batch_decode(prefixes, skip_special_tokens=True)) if prefixes else iter(())
    ends = torch.zeros((len(rows), width), dtype=torch.long)
    for b, (row, caption) in enumerate(zip(rows, captions)):
        lead = None
        for k in range(len(row)):
            text = next(texts)
            if lead is None and text.strip():
                lead = len(text) - len(text.lstrip())  # the caption was stripped on the left
            covered = len(text.rstrip()) - (lead or 0) if text.strip() else 0
            ends[b, k] = min(max(covered, 0), len(caption))
        ends[b, len(row):] = len(caption)
    return torch.cummax(ends, dim=1).values


def token_at_char(ends: torch.Tensor, char_end: int) -> int:
    """The first token whose text reaches ``char_end`` (the token completing a span).

    Args:
        ends: Shape: (T,), one row of ``token_char_ends``.
        char_end: Exclusive end offset of a span in the caption.
    """
    reached = (ends >= char_end).nonzero()
    return int(reached[0]) if len(reached) else int(ends.shape[0]) - 1
