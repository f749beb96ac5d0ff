"""CaptionStats on hand-written captions, every number worked out by hand."""

from __future__ import annotations

import pytest

from vlrm.evaluation import CaptionSet, run_evaluators
from vlrm.plugins import load_plugins
from vlrm_plugins.caption_stats import COLOUR_WORDS, CaptionStats, distinct_n
from vlrm_plugins.text_penalties import BadPhrasePenalty, RepetitionPenalty


def caption_set(captions, num_tokens=None) -> CaptionSet:
    return CaptionSet(image_ids=[f"img{i}" for i in range(len(captions))], captions=captions,
                      load_image=lambda i: None, references=None, num_tokens=num_tokens)


# Words (lower-cased \w+), colour words, and which detector hits each caption:
CAPTIONS = [
    "A Red car and a red-brown dog",  # a red car and a red brown dog: 8 words, 3 colours
    "an image of a dog",              # an image of a dog: 5 words; bad phrase "an image of"
    "a red red car",                  # a red red car: 4 words, 2 colours; repeat "red red"
    "",                               # no words: empty
    "a bus in 1998",                  # a bus in 1998: 4 words; bad phrase: a year
    "imagery of a dog",               # imagery of a dog: 4 words; no bad phrase
]
NUM_TOKENS = [10, 7, 6, 1, 6, 5]


def test_every_metric_by_hand():
    stats = CaptionStats()(caption_set(CAPTIONS, NUM_TOKENS))
    # words: 8 + 5 + 4 + 0 + 4 + 4 = 25 over 6 captions
    assert stats["length"] == pytest.approx(25 / 6)
    # tokens: 10 + 7 + 6 + 1 + 6 + 5 = 35 over 6
    assert stats["tokens"] == pytest.approx(35 / 6)
    # colour words: 3 + 0 + 2 + 0 + 0 + 0 = 5 over 6; captions with one: 2 of 6
    assert stats["colour_words"] == pytest.approx(5 / 6)
    assert stats["colour_rate"] == pytest.approx(2 / 6)
    # vocab: a red car and brown dog | an image of | bus in 1998 | imagery = 6 + 3 + 3 + 1 = 13
    assert stats["vocab"] == 13
    # distinct1: 13 unique words over 25 words
    assert stats["distinct1"] == pytest.approx(13 / 25)
    # distinct2, bigrams per caption (* = seen before):
    #   c0: a-red red-car car-and and-a a-red* red-brown brown-dog   7 bigrams, 6 new
    #   c1: an-image image-of of-a a-dog                             4 bigrams, 4 new
    #   c2: a-red* red-red red-car*                                  3 bigrams, 1 new
    #   c3: (none)
    #   c4: a-bus bus-in in-1998                                     3 bigrams, 3 new
    #   c5: imagery-of of-a* a-dog*                                  3 bigrams, 1 new
    # 15 unique over 20 bigrams
    assert stats["distinct2"] == pytest.approx(15 / 20)
    # bad phrases: c1 ("an image of") and c4 (1998); not c5 ("imagery of" is not "image of")
    assert stats["bad_phrase_rate"] == pytest.approx(2 / 6)
    # repetition: c2 only ("red red")
    assert stats["repetition_rate"] == pytest.approx(1 / 6)
    assert stats["empty_rate"] == pytest.approx(1 / 6)
    # COCO objects named: c0 car, dog; c1 dog; c2 car; c3 none; c4 bus; c5 dog = 6 over 6
    assert stats["objects_mentioned"] == pytest.approx(6 / 6)
    assert set(stats) == {"length", "tokens", "colour_words", "colour_rate", "distinct1",
                          "distinct2", "vocab", "bad_phrase_rate", "repetition_rate", "empty_rate",
                          "objects_mentioned"}  # no references: no object_recall


def test_object_recall_against_the_references():
    captions = CaptionSet(image_ids=["a", "b", "c"], captions=["a horse", "a dog and a cat", "sky"],
                          load_image=lambda i: None,
                          references=[["a man riding a horse", "a person on a horse by a dog"],
                                      ["a cat"], ["clouds"]])
    stats = CaptionStats()(captions)
    # a: refs name person, horse, dog; the caption horse: 1/3. b: refs cat; caption dog, cat: 1/1.
    # c: refs name no object: left out
    assert stats["object_recall"] == pytest.approx((1 / 3 + 1) / 2)
    assert stats["objects_mentioned"] == pytest.approx(3 / 3)
    assert "objects_mentioned" not in CaptionStats(objects=False)(captions)


def test_tokens_absent_without_token_counts():
    stats = CaptionStats()(caption_set(CAPTIONS))
    assert "tokens" not in stats
    assert stats["length"] == pytest.approx(25 / 6)


def test_colour_words_count_every_occurrence_case_insensitively():
    stats = CaptionStats()(caption_set(["A Red car and a red-brown dog"]))
    assert stats["colour_words"] == 3  # Red, red, brown
    assert stats["colour_rate"] == 1.0
    stats = CaptionStats()(caption_set(["GREY and gray and Golden", "a dog", "reddish tan"]))
    # c0: grey gray golden = 3; c1: 0; c2: tan = 1 ("reddish" is not "red") -> 4 / 3
    assert stats["colour_words"] == pytest.approx(4 / 3)
    assert stats["colour_rate"] == pytest.approx(2 / 3)


def test_custom_colour_words_replace_the_lexicon():
    stats = CaptionStats(colour_words=["Car", "dog"])(caption_set(["A Red car and a red-brown dog"]))
    assert stats["colour_words"] == 2  # car, dog; red and brown no longer count
    stats = CaptionStats(colour_words=[])(caption_set(["a red car"]))
    assert stats["colour_words"] == 0
    assert stats["colour_rate"] == 0


def test_colour_lexicon():
    basic = {"red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black",
             "white", "gray", "grey"}
    assert basic <= COLOUR_WORDS
    assert all(w == w.lower() for w in COLOUR_WORDS)
    assert "dog" not in COLOUR_WORDS


def test_bad_phrase_rate_uses_the_configured_phrases():
    captions = ["imagery of a dog", "an image of a cat", "a bus in 1998", "a cat"]
    # default phrases: "an image of a cat" and the year -> 2 of 4
    assert CaptionStats()(caption_set(captions))["bad_phrase_rate"] == pytest.approx(2 / 4)
    # phrases=["a dog"]: "imagery of a dog" is now a hit, "an image of" no longer; years stay
    assert CaptionStats(phrases=["a dog"])(caption_set(captions))["bad_phrase_rate"] == \
        pytest.approx(2 / 4)
    hits = CaptionStats(phrases=["a dog"])(caption_set(["imagery of a dog", "an image of a cat"]))
    assert hits["bad_phrase_rate"] == pytest.approx(1 / 2)
    # no phrases and no patterns: nothing is bad
    assert CaptionStats(phrases=[], patterns=[])(caption_set(captions))["bad_phrase_rate"] == 0


def test_repetition_rate_uses_the_configured_ngram():
    captions = ["a dog on a beach and a dog on a beach", "a red red car", "a cat on a mat"]
    # ngram 3: c0 repeats "a dog on"; c1 "red red"; c2 no 3-gram twice -> 2 of 3
    assert CaptionStats()(caption_set(captions))["repetition_rate"] == pytest.approx(2 / 3)
    # ngram 2: still 2 of 3 (c2's bigrams a-cat cat-on on-a a-mat are all different)
    assert CaptionStats(ngram=2)(caption_set(captions))["repetition_rate"] == pytest.approx(2 / 3)
    # ngram 1: c2 says "a" twice
    assert CaptionStats(ngram=1)(caption_set(captions))["repetition_rate"] == 1.0


def test_rates_agree_with_the_reward_plugins_detectors():
    captions = CAPTIONS + ["a photo of a photo of a cat", "A CLOSE-UP OF a pizza from 2015",
                           "two dogs playing", "the the end"]
    stats = CaptionStats()(caption_set(captions))
    bad, repeat = BadPhrasePenalty(), RepetitionPenalty()
    assert stats["bad_phrase_rate"] == pytest.approx(
        sum(bool(bad.events(c)) for c in captions) / len(captions))
    assert stats["repetition_rate"] == pytest.approx(
        sum(bool(repeat.events(c)) for c in captions) / len(captions))
    # and by hand: bad = c1, c4, "a photo of...", "A CLOSE-UP OF ... 2015" = 4 of 10;
    # repeat = c2, "a photo of a photo of" ("a photo of" twice), "the the" = 3 of 10
    assert stats["bad_phrase_rate"] == pytest.approx(4 / 10)
    assert stats["repetition_rate"] == pytest.approx(3 / 10)


def test_only_empty_captions_do_not_crash():
    stats = CaptionStats()(caption_set(["", "  ", "..."], num_tokens=[0, 1, 1]))
    assert stats == {"length": 0, "tokens": pytest.approx(2 / 3), "colour_words": 0,
                     "colour_rate": 0, "distinct1": 0.0, "distinct2": 0.0, "vocab": 0,
                     "bad_phrase_rate": 0, "repetition_rate": 0, "empty_rate": 1.0,
                     "objects_mentioned": 0.0}


def test_no_captions_at_all():
    stats = CaptionStats()(caption_set([], num_tokens=[]))
    assert stats["length"] == 0 and stats["empty_rate"] == 0 and stats["tokens"] == 0
    assert stats["distinct1"] == 0.0 and stats["vocab"] == 0


def test_distinct_n():
    assert distinct_n([], 1) == 0.0
    assert distinct_n([[], []], 2) == 0.0
    assert distinct_n([["dog"]], 2) == 0.0  # one word has no bigram
    # a b a b: bigrams ab ba ab -> 2 unique of 3
    assert distinct_n([["a", "b", "a", "b"]], 2) == pytest.approx(2 / 3)
    # pooled, not per caption: [a b] [a b] -> ab ab -> 1 of 2
    assert distinct_n([["a", "b"], ["a", "b"]], 2) == pytest.approx(1 / 2)
    # no n-gram spans two captions: [a] [b] has no bigram
    assert distinct_n([["a"], ["b"]], 2) == 0.0
    # unigrams: a b a c -> 3 of 4
    assert distinct_n([["a", "b"], ["a", "c"]], 1) == pytest.approx(3 / 4)


def test_registered_as_an_evaluator():
    registry = load_plugins(autoload=False)
    component = registry.get("evaluators", "caption_stats")
    assert component.factory is CaptionStats
    assert component.distribution == "vlrm"
    assert component.path == "vlrm_plugins.caption_stats.CaptionStats"
    results = run_evaluators({"caption": component.factory()}, caption_set(["a red red car"]))
    assert results["caption/length"] == 4
    assert results["caption/colour_words"] == 2
    assert results["caption/repetition_rate"] == 1.0
