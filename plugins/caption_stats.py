"""Caption statistics: the paper's "longer, more colour-rich, still clean" claims, measured.

Reference-free. Word-level numbers use vlrm's word splitter (lower-cased ``\\w+`` words);
the bad-phrase and repetition rates use the reward plugins' own detectors, so a caption the
reward penalised is exactly a caption counted here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from vlrm import hookimpl
from vlrm.evaluation import CaptionSet, Metric
from vlrm.text import words_with_spans
from vlrm_plugins.text_penalties import DEFAULT_PHRASES, YEAR_PATTERN, BadPhrasePenalty, RepetitionPenalty

# Berlin and Kay's eleven basic colour terms (with both spellings of grey), plus the colour
# names common in COCO captions. A colour word counts once per occurrence. [ours]
COLOUR_WORDS = frozenset({
    "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white",
    "gray", "grey",
    "violet", "beige", "tan", "gold", "golden", "silver", "maroon", "navy", "teal",
    "turquoise", "cyan", "magenta", "crimson", "olive", "lavender", "blond", "blonde",
})


def distinct_n(word_lists: Sequence[Sequence[str]], n: int) -> float:
    """Distinct-n: unique word n-grams over all n-grams, pooled across captions (0 if none)."""
    grams = [tuple(words[i:i + n]) for words in word_lists for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


class CaptionStats:
    """Length, colour words, diversity, and bad-phrase and repetition rates of captions.

    Metrics: ``length`` (mean words), ``tokens`` (mean policy tokens, when known),
    ``colour_words`` (mean colour words per caption), ``colour_rate`` (share of captions with
    one), ``distinct1`` / ``distinct2``, ``vocab`` (distinct words), ``bad_phrase_rate`` and
    ``repetition_rate`` (share of captions the penalties would hit), ``empty_rate``,
    ``objects_mentioned`` and, with references, ``object_recall``.

    Args:
        colour_words: The colour lexicon [ours: ``COLOUR_WORDS``].
        phrases: Bad phrases, as for ``BadPhrasePenalty`` [ours: its defaults].
        patterns: Bad-phrase patterns, as for ``BadPhrasePenalty`` [ours: years].
        ngram: Repeated n-gram length, as for ``RepetitionPenalty`` [ours: 3].
        objects: Also ``objects_mentioned`` (COCO object categories a caption names, by
            ``vlrm_plugins.chair``'s synonym list) and, where references exist,
            ``object_recall`` (share of the categories the image's references name that
            the caption names) [ours: on].
    """

    def __init__(self, colour_words: Sequence[str] = tuple(sorted(COLOUR_WORDS)),
                 phrases: Sequence[str] = DEFAULT_PHRASES, patterns: Sequence[str] = (YEAR_PATTERN,),
                 ngram: int = 3, objects: bool = True) -> None:
        self.colours = frozenset(w.lower() for w in colour_words)
        self.bad = BadPhrasePenalty(phrases, patterns)
        self.repeat = RepetitionPenalty(ngram=ngram)
        self.objects = None
        if objects:
            from vlrm_plugins.chair import ObjectMentions

            self.objects = ObjectMentions()

    def __call__(self, captions: CaptionSet) -> Mapping[str, Metric]:
        texts = list(captions.captions)
        n = max(len(texts), 1)
        words = [[w for w, _, _ in words_with_spans(t)] for t in texts]
        colours = [sum(w in self.colours for w in ws) for ws in words]
        out: dict[str, Metric] = {
            "length": sum(map(len, words)) / n,
            "colour_words": sum(colours) / n,
            "colour_rate": sum(c > 0 for c in colours) / n,
            "distinct1": distinct_n(words, 1),
            "distinct2": distinct_n(words, 2),
            "vocab": len({w for ws in words for w in ws}),
            "bad_phrase_rate": sum(bool(self.bad.events(t)) for t in texts) / n,
            "repetition_rate": sum(bool(self.repeat.events(t)) for t in texts) / n,
            "empty_rate": sum(not ws for ws in words) / n,
        }
        if captions.num_tokens is not None:
            out["tokens"] = sum(captions.num_tokens) / n
        if self.objects is not None:
            found = [self.objects(t) for t in texts]
            out["objects_mentioned"] = sum(map(len, found)) / n
            if captions.references is not None:
                recall = []
                for mentioned, refs in zip(found, captions.references):
                    named = set().union(*(self.objects(r) for r in refs)) if refs else set()
                    if named:
                        recall.append(len(mentioned & named) / len(named))
                out["object_recall"] = sum(recall) / len(recall) if recall else 0.0
        return out


@hookimpl
def vlrm_register_evaluators() -> dict[str, Any]:
    return {"caption_stats": CaptionStats}
