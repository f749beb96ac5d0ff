"""The paper's text penalties, each placed on the generated token that earned it.

``bad(s, t_1..t_n)`` penalises unwanted phrases (meta-prefixes such as "an image of",
invented years); ``repeat(s, t_1..t_n)`` penalises repetition. Both return per-token
rewards (B, T): a negative value at the token that completes the phrase or the repeat,
found through ``Rollout.token_ends`` (the character offsets of the generated tokens), and
zero elsewhere. The composite reward's weight scales them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

from vlrm import hookimpl
from vlrm.errors import ConfigError
from vlrm.structs import RewardOutput, Rollout
from vlrm.text import token_at_char, words_with_spans

# Meta-prefixes that describe the medium instead of the scene [ours: the paper names
# "an image of", "a video of" and stated years; the rest are the same pattern].
DEFAULT_PHRASES = (
    "an image of", "a picture of", "a photo of", "a photograph of", "a video of",
    "a close up of", "a closeup of", "a close-up of", "an illustration of", "a screenshot of",
    "a still of", "a frame of", "in this image", "in this picture", "in this photo",
    "this is an image", "this is a picture", "this is a photo",
)
# A four-digit year, 1800-2099: a captioner cannot know it from pixels [paper: years].
YEAR_PATTERN = r"\b(?:18|19|20)\d\d\b"


def _phrase_regex(phrase: str) -> str:
    words = [re.escape(w) for w in phrase.split()]
    return r"(?<!\w)" + r"\s+".join(words) + r"(?!\w)"


def _place(rollout: Rollout, events: list[list[int]], value: float) -> torch.Tensor:
    """Per-token penalties from, per caption, the character ends of its events."""
    out = torch.zeros(rollout.tokens.shape, dtype=torch.float32)
    mask = rollout.mask.cpu()
    for b, ends in enumerate(events):
        real = int(mask[b].sum())
        if not ends or real == 0:
            continue
        for char_end in ends:
            if rollout.token_ends is not None:
                k = min(token_at_char(rollout.token_ends[b, :real].cpu(), char_end), real - 1)
            else:
                k = real - 1
            out[b, k] -= value
    return out * mask


class BadPhrasePenalty:
    """Penalty for unwanted phrases, on the token that completes each occurrence.

    Matching is case-insensitive and on word boundaries; whitespace inside a phrase may
    vary. Each occurrence costs ``penalty``.

    Args:
        phrases: Literal phrases [ours: meta-prefixes such as "an image of"].
        patterns: Regular expressions [ours: four-digit years 1800-2099].
        penalty: Cost of one occurrence, a positive number [ours: 1.0].
    """

    def __init__(self, phrases: Sequence[str] = DEFAULT_PHRASES,
                 patterns: Sequence[str] = (YEAR_PATTERN,), penalty: float = 1.0) -> None:
        if penalty < 0:
            raise ConfigError(f"BadPhrasePenalty.penalty must be >= 0, got {penalty}")
        try:
            parts = [_phrase_regex(p) for p in phrases if p.strip()] + list(patterns)
            self.regex = re.compile("|".join(f"(?:{p})" for p in parts), re.IGNORECASE) \
                if parts else None
        except re.error as exc:
            raise ConfigError(f"BadPhrasePenalty.patterns: invalid regular expression: {exc}") from exc
        self.penalty = penalty

    def events(self, caption: str) -> list[int]:
        """Character ends of every unwanted phrase in ``caption``."""
        return [m.end() for m in self.regex.finditer(caption)] if self.regex else []

    @torch.no_grad()
    def __call__(self, rollout: Rollout) -> RewardOutput:
        events = [self.events(c) for c in rollout.captions]
        hit = sum(1 for e in events if e) / max(len(events), 1)
        return RewardOutput(token=_place(rollout, events, self.penalty), metrics={"rate": hit})


class RepetitionPenalty:
    """Penalty for repetition, on the token that completes each repeat.

    Two kinds of repeat, each costing ``penalty``: a word said twice in a row ("a red red
    car": the second "red"), and a word n-gram (n = ``ngram``) seen earlier in the caption
    ("a dog on a beach, a dog on a beach": the second "dog on a").

    Args:
        ngram: Length of the repeated n-grams looked for anywhere [ours: 3]; 0 turns it off.
        consecutive: Penalise a word repeated right after itself [ours: on].
        penalty: Cost of one repeat, a positive number [ours: 1.0].
    """

    def __init__(self, ngram: int = 3, consecutive: bool = True, penalty: float = 1.0) -> None:
        if ngram < 0 or penalty < 0:
            raise ConfigError(f"RepetitionPenalty: ngram and penalty must be >= 0, got "
                              f"ngram={ngram}, penalty={penalty}")
        self.ngram, self.consecutive, self.penalty = ngram, consecutive, penalty

    def events(self, caption: str) -> list[int]:
        """Character ends of every repeat in ``caption``."""
        words = words_with_spans(caption)
        ends = set()
        if self.consecutive:
            ends.update(words[i][2] for i in range(1, len(words)) if words[i][0] == words[i - 1][0])
        n = self.ngram
        if n:
            seen: set[tuple[str, ...]] = set()
            for i in range(len(words) - n + 1):
                gram = tuple(w for w, _, _ in words[i:i + n])
                if gram in seen:
                    ends.add(words[i + n - 1][2])
                seen.add(gram)
        return sorted(ends)

    @torch.no_grad()
    def __call__(self, rollout: Rollout) -> RewardOutput:
        events = [self.events(c) for c in rollout.captions]
        hit = sum(1 for e in events if e) / max(len(events), 1)
        return RewardOutput(token=_place(rollout, events, self.penalty), metrics={"rate": hit})


@hookimpl
def vlrm_register_rewards() -> dict[str, Any]:
    return {"bad_phrase": BadPhrasePenalty, "repetition": RepetitionPenalty}
