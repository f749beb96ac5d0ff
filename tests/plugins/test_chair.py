"""CHAIR on a hand-made COCO instances file: every number counted by hand."""

import json

import pytest

from vlrm.errors import ConfigError
from vlrm.evaluation import CaptionSet
from vlrm_plugins.chair import Chair, ObjectMentions, coco_image_number, singular

CATEGORIES = [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 3, "name": "car"},
              {"id": 62, "name": "chair"}, {"id": 55, "name": "orange"},
              {"id": 88, "name": "teddy bear"}, {"id": 46, "name": "wine glass"},
              {"id": 47, "name": "cup"}, {"id": 17, "name": "cat"}, {"id": 6, "name": "bus"},
              {"id": 23, "name": "bear"}]


@pytest.fixture
def annotations(tmp_path):
    images = [{"id": 391895, "file_name": "COCO_val2014_000000391895.jpg"},
              {"id": 522418, "file_name": "COCO_val2014_000000522418.jpg"},
              {"id": 184613, "file_name": "COCO_val2014_000000184613.jpg"}]
    anns = [(391895, 1), (391895, 1), (391895, 18),  # two people and a dog
            (522418, 88), (522418, 62),              # a teddy bear on a chair
            (184613, 55), (184613, 47)]              # oranges and a cup
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": images, "categories": CATEGORIES, "annotations": [
        {"id": i, "image_id": img, "category_id": cat} for i, (img, cat) in enumerate(anns)]}))
    return path


def test_mentions_singular_plural_and_multiword_names():
    find = ObjectMentions()
    assert find("Two men walking their dogs past parked cars.") == {"person", "dog", "car"}
    assert find("a teddy bear sitting in a chair") == {"teddy bear", "chair"}  # not "bear"
    assert find("wine glasses next to a coffee mug") == {"wine glass", "cup"}
    assert find("an orange cat on a bus") == {"cat", "bus"}  # a colour, not the fruit
    assert find("a bowl of oranges") == {"orange"} | find("a bowl") and "orange" in find("an orange")
    assert find("people and children") == {"person"}  # one category, counted once
    assert [singular(w) for w in ("knives", "buses", "ties", "puppies", "glass")] == [
        "knife", "bus", "tie", "puppy", "glass"]
    assert coco_image_number("/data/coco/val2014/COCO_val2014_000000391895.jpg") == 391895


def test_chair_i_and_chair_s_counted_by_hand(annotations):
    chair = Chair(str(annotations))
    ids = ["val2014/COCO_val2014_000000391895.jpg", "val2014/COCO_val2014_000000522418.jpg",
           "val2014/COCO_val2014_000000184613.jpg", "val2014/COCO_val2014_000000000042.jpg"]
    captions = ["a man and a woman walking a dog next to a car",  # person, dog ok; car wrong
                "a teddy bear sitting on a chair",                # both right
                "oranges in a bowl next to a cup and a cat",      # orange, cup ok; cat wrong
                "a dog"]                                          # image not in the file
    out = chair(CaptionSet(ids, captions, load_image=lambda i: None))
    # mentions: {person, dog, car} + {teddy bear, chair} + {orange, cup, cat} = 8, 2 wrong
    assert out["chair_i"] == pytest.approx(2 / 8)
    assert out["chair_s"] == pytest.approx(2 / 3)
    assert out["objects_mentioned"] == pytest.approx(8 / 3)
    assert out["object_recall"] == pytest.approx((2 / 2 + 2 / 2 + 2 / 2) / 3)
    assert out["unannotated"] == 1.0
    short = chair(CaptionSet(ids[:1], ["a dog"], load_image=lambda i: None))
    assert short["chair_i"] == 0.0 and short["object_recall"] == pytest.approx(1 / 2)


def test_bad_files_are_config_errors(tmp_path, annotations):
    with pytest.raises(ConfigError, match="does not exist"):
        Chair(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text('{"images": []}')
    with pytest.raises(ConfigError, match="not a COCO instances file"):
        Chair(str(tmp_path / "bad.json"))
    (tmp_path / "syn.json").write_text(json.dumps({"unicorn": ["unicorn"]}))
    with pytest.raises(ConfigError, match="categories instances.json does not have: unicorn"):
        Chair(str(annotations), synonyms=str(tmp_path / "syn.json"))


def test_the_synonym_list_covers_cocos_80_categories_once():
    from vlrm_plugins.chair import SYNONYMS

    assert len(SYNONYMS) == 80
    phrases = [p for words in SYNONYMS.values() for p in words]
    assert len(phrases) == len(set(phrases))  # no word names two categories
