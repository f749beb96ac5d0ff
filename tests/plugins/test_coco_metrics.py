import math
import sys

import pytest

from vlrm.errors import ConfigError
from vlrm.evaluation import CaptionSet
from vlrm.plugins import get_registry
from vlrm_plugins.coco_metrics import CocoMetrics

pytest.importorskip("pycocoevalcap.bleu.bleu", reason="needs pip install 'vlrm[eval]'")

KEYS = {"bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider"}

# Four images, 2 to 5 references each, with little vocabulary shared between images (so
# CIDEr's idf, computed over these four images, is non-zero for most n-grams).
REFERENCES = [
    ["a brown dog running along the wet sand of a beach",
     "a dog runs across the beach near the ocean waves"],
    ["two grey cats sleeping together on a red leather couch",
     "a pair of cats napping on a sofa in the living room",
     "two kittens curled up asleep on a red couch"],
    ["a man riding a bicycle down a busy city street",
     "a cyclist pedals past parked cars on an urban road",
     "a person on a bike travelling through downtown traffic",
     "a man on a bicycle rides between cars in the city"],
    ["a plate of pasta with tomato sauce and fresh basil",
     "spaghetti covered in red sauce served on a white plate",
     "a bowl of noodles topped with tomato sauce and herbs",
     "a dinner plate holding pasta and a basil leaf",
     "close view of spaghetti with marinara sauce"],
]
IDENTICAL = [refs[0] for refs in REFERENCES]
# No word here occurs in any reference (checked below), nor is a likely METEOR paraphrase.
DISJOINT = [
    "purple zeppelin hovering above quiet volcanic glaciers",
    "ancient typewriter keys scattered beside broken violins",
    "neon jellyfish drifting beyond frozen cathedral windows",
    "rusty anchors stacked inside abandoned lighthouse corridors",
]
PARTIAL = [
    "a brown dog running near purple zeppelin glaciers",
    "two grey cats sleeping beside broken violins",
    "a man riding a bicycle beyond frozen cathedral windows",
    "a plate of pasta inside abandoned lighthouse corridors",
]


def caption_set(captions, references=REFERENCES):
    references = None if references is None else references[:len(captions)]
    return CaptionSet(image_ids=[f"img{i}.jpg" for i in range(len(captions))],
                      captions=captions, load_image=lambda _: None, references=references)


@pytest.fixture(scope="module")
def coco():
    # One instance for the module: METEOR's Java process loads its paraphrase table once.
    return CocoMetrics()


@pytest.fixture(scope="module")
def scores(coco):
    return {name: coco(caption_set(caps))
            for name, caps in [("identical", IDENTICAL), ("disjoint", DISJOINT),
                               ("partial", PARTIAL)]}


def test_identical_captions_score_top(scores):
    s = scores["identical"]
    assert set(s) == KEYS and all(isinstance(v, float) for v in s.values())
    for n in (1, 2, 3, 4):
        assert s[f"bleu{n}"] == pytest.approx(1.0, abs=1e-6)
    assert s["meteor"] > 0.99
    assert s["rouge_l"] == pytest.approx(1.0)
    # CIDEr-D = 10 * mean over an image's m references of the length-penalised cosine
    # similarity of tf-idf n-gram vectors. The reference equal to the candidate gives
    # cosine 1 and no length penalty, the others >= 0, and no cosine exceeds 1; so each
    # image scores between 10/m and 10 (pycocoevalcap gives 3.85 on this fixture, the bound 3.21).
    lower = 10 * sum(1 / len(refs) for refs in REFERENCES) / len(REFERENCES)
    assert lower - 1e-9 <= s["cider"] <= 10.0
    assert s["cider"] > 1.0


def test_disjoint_vocabulary_scores_zero(scores):
    reference_words = {w for refs in REFERENCES for r in refs for w in r.split()}
    assert not reference_words & {w for c in DISJOINT for w in c.split()}
    s = scores["disjoint"]
    for key in ("bleu1", "bleu4", "rouge_l", "cider"):
        assert s[key] == pytest.approx(0.0, abs=1e-6), key
    assert s["meteor"] < 0.02


def test_partial_overlap_lies_between(scores):
    for key in KEYS:
        assert scores["disjoint"][key] < scores["partial"][key] < scores["identical"][key], key


def test_empty_and_punctuation_only_captions_score_zero(coco, scores):
    # "..." is all punctuation, which the COCO tokenizer drops: it is empty as well.
    s = coco(caption_set(["", "...", IDENTICAL[2], IDENTICAL[3]]))
    assert set(s) == KEYS and all(math.isfinite(v) for v in s.values())
    assert s["rouge_l"] == pytest.approx(0.5)  # mean of 0, 0, 1, 1
    # BLEU is corpus-level: n-gram counts and lengths are pooled over images, so the two
    # exact captions give precision 1 at every n, and the empty ones only add reference
    # length (their closest reference, the shortest) to the brevity penalty.
    hyp_len = sum(len(c.split()) for c in IDENTICAL[2:])
    ref_len = hyp_len + sum(min(len(r.split()) for r in refs) for refs in REFERENCES[:2])
    for n in (1, 2, 3, 4):
        assert s[f"bleu{n}"] == pytest.approx(math.exp(1 - ref_len / hyp_len), rel=1e-6)
    assert 0 < s["meteor"] < scores["identical"]["meteor"]
    assert all(v == 0.0 for v in coco(caption_set(["", "", "", "."])).values())


def test_line_breaks_inside_a_caption_do_not_shift_the_others(coco, scores):
    # The tokenizer works line by line; a stray line break used to misalign every later
    # caption with its image.
    broken = [IDENTICAL[0].replace(" dog ", " dog\r"), IDENTICAL[1].replace(" on ", "\u2028on "),
              IDENTICAL[2], IDENTICAL[3] + "\n"]
    s = coco(caption_set(broken))
    assert s["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert s["rouge_l"] == pytest.approx(1.0)
    assert s["cider"] == pytest.approx(scores["identical"]["cider"])


def test_cider_is_zero_on_a_single_image(coco):
    # idf = log(images) - log(document frequency) = log 1 - log 1 for every n-gram.
    s = coco(caption_set(IDENTICAL[:1]))
    assert s["cider"] == 0.0 and s["rouge_l"] == pytest.approx(1.0)


def test_missing_references_name_the_evaluator(coco):
    with pytest.raises(ConfigError, match="CocoMetrics"):
        coco(caption_set(IDENTICAL, references=None))


def test_an_image_without_references_is_an_error(coco):
    with pytest.raises(ConfigError, match="img1.jpg"):
        coco(caption_set(IDENTICAL[:2], references=[REFERENCES[0], []]))


def test_missing_java_fails_when_constructed(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no java
    with pytest.raises(ConfigError, match="Java") as e:
        CocoMetrics()
    assert "CocoMetrics" in str(e.value) and "default-jre-headless" in str(e.value)


def test_missing_pycocoevalcap_says_what_to_install(monkeypatch):
    for name in [m for m in sys.modules if m.split(".")[0] == "pycocoevalcap"] + ["pycocoevalcap"]:
        monkeypatch.setitem(sys.modules, name, None)  # importing it now fails
    with pytest.raises(ConfigError, match=r"pip install 'vlrm\[eval\]'"):
        CocoMetrics()


def test_only_the_chosen_metrics_are_computed():
    coco = CocoMetrics(meteor=False, cider=False)
    assert set(coco(caption_set(IDENTICAL))) == {"bleu1", "bleu2", "bleu3", "bleu4", "rouge_l"}
    with pytest.raises(ConfigError, match="every metric"):
        CocoMetrics(bleu=False, meteor=False, rouge=False, cider=False)


def test_registered_as_an_evaluator():
    component = get_registry().get("evaluators", "coco_metrics")
    assert component.factory is CocoMetrics and component.distribution == "vlrm"
