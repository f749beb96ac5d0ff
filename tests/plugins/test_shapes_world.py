import pytest

from vlrm.errors import ConfigError
from vlrm_shapes.world import (COLOURS, SHAPES, SIZES, Parsed, ShapesImages, ShapesWorld,
                                       ShapesCaptionStats, Stated, Thing, describe, judge, parse,
                                       parse_image_id, repeats_beyond_scene)


@pytest.fixture(scope="module")
def world():
    return ShapesWorld(seed=0)


def test_scenes_are_deterministic_and_ordered_left_to_right(world):
    again = ShapesWorld(seed=0)
    other = ShapesWorld(seed=1)
    for i in range(50):
        scene = world.scene("train", i)
        assert scene == again.scene("train", i)
        assert 1 <= len(scene) <= 3
        assert [t.x for t in scene] == sorted(t.x for t in scene)
        assert all(t.shape in SHAPES and t.colour in COLOURS and t.size in SIZES for t in scene)
    assert any(world.scene("train", i) != other.scene("train", i) for i in range(10))
    assert world.scene("test", 0) != world.scene("train", 0) or world.scene("test", 1) != world.scene("train", 1)
    assert world.image("test", 3).tobytes() == again.image("test", 3).tobytes()
    assert world.image("test", 3).size == (64, 64)


def test_the_image_shows_the_scene_colours(world):
    import numpy as np

    for i in range(20):
        pixels = np.asarray(world.image("val", i)).reshape(-1, 3)
        for thing in world.scene("val", i):
            assert (np.abs(pixels - np.array(COLOURS[thing.colour])).sum(1) == 0).sum() > 30


def test_full_captions_parse_back_exactly(world):
    for i in range(100):
        scene = world.scene("train", i)
        parsed = parse(world.full_caption("train", i))
        assert parsed.grammatical and not parsed.meta and not parsed.year
        assert parsed.objects == tuple(Stated(t.shape, t.colour, t.size) for t in scene)
        verdict = judge(world.full_caption("train", i), scene)
        assert verdict.correct == verdict.stated == 3 * len(scene) and verdict.invented == 0


def test_grammar_by_hand():
    assert parse("a small red circle and a large blue square") == Parsed(True, (
        Stated("circle", "red", "small"), Stated("square", "blue", "large")))
    assert parse("an orange diamond").objects == (Stated("diamond", "orange", None),)
    assert parse("An image of a circle in 1998") == Parsed(True, (Stated("circle"),), meta=True, year=True)
    for bad in ("a orange circle", "an red circle", "a red small circle", "circle", "a circle and",
                "a circle a square", "a big circle", "", "a circle, a square"):
        assert not parse(bad).grammatical, bad


def test_judge_counts_true_attributes_and_invented_objects(world):
    scene = world.scene("train", 0)  # a small red circle, a large yellow diamond, a large yellow triangle
    assert describe(scene) == "a small red circle and a large yellow diamond and a large yellow triangle"
    v = judge("a small blue circle and a large yellow diamond", scene)
    assert (v.grammatical, v.correct, v.stated, v.invented, v.colours) == (True, 5, 6, 0, 2)
    v = judge("a circle and a diamond and a triangle and a square", scene)
    assert (v.correct, v.stated, v.invented) == (3, 3, 1)
    assert judge("red red red", scene) == judge("", scene) and not judge("", scene).grammatical


def test_repeats_beyond_scene_counts_only_what_the_image_does_not_hold():
    two_red = [Thing("square", "red", "small", 10, 30), Thing("square", "red", "large", 40, 30)]
    assert not repeats_beyond_scene("a square and a square", two_red)
    assert not repeats_beyond_scene("a red square and a red square", two_red)
    assert repeats_beyond_scene("a small red square and a small red square", two_red)
    assert repeats_beyond_scene("a circle and a circle", two_red)  # none there: twice is a repeat
    assert not repeats_beyond_scene("a circle", two_red)  # wrong, but said once
    assert repeats_beyond_scene("a square and a square and a square", two_red)
    assert repeats_beyond_scene("square square", two_red) is None


def test_caption_stats_report_both_repetition_measures(world):
    from vlrm.evaluation import CaptionSet

    ids = ["shapes/train/000000"] * 2  # a small red circle, a large yellow diamond, a large yellow triangle
    texts = ["a large yellow diamond and a large yellow diamond",  # twice, once there
             "a small red circle and a large yellow diamond and a large yellow triangle"]
    m = ShapesCaptionStats(0)(CaptionSet(image_ids=ids, captions=texts, load_image=None))
    assert m["repeats_beyond_scene"] == 0.5
    # the n-gram detector (the penalty's) fires on neither: no 5-gram repeats
    assert m["repetition_rate"] == 0.0


def test_biased_captions_follow_the_mix():
    world = ShapesWorld(seed=0, mix=(0.6, 0.15, 0.05, 0.2))
    kinds = {"shapes": 0, "meta": 0, "year": 0, "full": 0}
    n = 2000
    for i in range(n):
        caption = world.biased_caption("train", i)
        parsed = parse(caption)
        assert parsed.grammatical
        if parsed.meta:
            kinds["meta"] += 1
        elif parsed.year:
            kinds["year"] += 1
        elif caption == world.full_caption("train", i):
            kinds["full"] += 1
        else:
            assert all(o.colour is None and o.size is None for o in parsed.objects)
            kinds["shapes"] += 1
    # one-object scenes with shapes only are still shapes only; allow sampling error
    assert abs(kinds["shapes"] / n - 0.6) < 0.04 and abs(kinds["full"] / n - 0.2) < 0.03
    assert abs(kinds["meta"] / n - 0.15) < 0.03 and abs(kinds["year"] / n - 0.05) < 0.02
    only_full = ShapesWorld(seed=0, mix=(0, 0, 0, 1))
    assert all(only_full.biased_caption("train", i) == only_full.full_caption("train", i) for i in range(50))
    with pytest.raises(ConfigError, match="mix"):
        ShapesWorld(mix=(0.5, 0.5))


def test_images_source_ids_and_errors():
    data = ShapesImages("test", num_images=10)
    assert len(data) == 10 and data.ids()[3] == "shapes/test/000003"
    assert data.references("shapes/test/000003") == [data.world.full_caption("test", 3)]
    batch = next(data.batches(4, seed=0))
    assert len(batch) == 4 and all(image.size == (64, 64) for _, image in batch)
    assert parse_image_id("shapes/val/000012") == ("val", 12)
    with pytest.raises(ValueError):
        parse_image_id("photos/x.png")
    with pytest.raises(ConfigError, match="split"):
        ShapesImages("holdout")


def test_vocabulary_covers_every_caption(world):
    vocab = set(world.vocabulary())
    for i in range(300):
        for caption in (world.full_caption("train", i), world.biased_caption("train", i),
                        world.partial_caption("train", i)):
            assert set(caption.split()) <= vocab, caption
