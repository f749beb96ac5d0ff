"""KarpathyCoco on a small dataset_coco.json in Karpathy's exact format, with real JPEGs."""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from vlrm.coco import KarpathyCoco
from vlrm.data import ImageFolder
from vlrm.errors import ConfigError

# (split, filepath, cocoid, raw sentences) in file order, as in Karpathy's file: val2014
# images are spread over test / val / restval, train2014 images are all train. Some raw
# captions keep the real file's trailing space or lack a final period.
ENTRIES = [
    ("train", "train2014", 57870, [
        "A restaurant has modern wooden tables and chairs.",
        "A long restaurant table with rattan rounded back chairs.",
        "a long table with a plant on top of it surrounded with wooden chairs ",
        "A long table with a flower arrangement in the middle for meetings",
        "A table is adorned with wooden chairs with blue accents."]),
    ("test", "val2014", 391895, [
        "A man with a red helmet on a small moped on a dirt road. ",
        "Man riding a motor bike on a dirt road on the countryside.",
        "A man riding on the back of a motorcycle.",
        "A dirt path with a young person on a motor bike rests to the foreground. ",
        "A man in a red shirt and a red hat is on a motorcycle on a hill side."]),
    ("val", "val2014", 318219, [
        "A young boy standing in front of a computer keyboard.",
        "a little boy wearing headphones and looking at a computer monitor",
        "He is listening intently to the computer at school.",
        "A young boy stares up at the computer monitor.",
        "a young kid with head phones on using a computer "]),
    ("test", "val2014", 522418, [
        "A woman wearing a net on her head cutting a cake. ",
        "A woman cutting a large white sheet cake.",
        "A woman wearing a hair net cutting a large sheet cake.",
        "there is a woman that is cutting a white cake",
        "A woman marking a cake with the back of a chef's knife. "]),
    ("restval", "val2014", 397133, [
        "A man is in a kitchen making pizzas.",
        "Man in apron standing on front of oven with pans and bakeware",
        "A baker is working in the kitchen rolling dough.",
        "A person standing by a stove in a kitchen.",
        "A table with pies being made and a person standing near a wall with pots and pans hanging on the wall."]),
    ("train", "train2014", 384029, [
        "A man preparing desserts in a kitchen covered in frosting.",
        "A chef is preparing and decorating many small pastries.",
        "A baker prepares various types of baked goods.",
        "a close up of a person grabbing a pastry in a container",
        "Close up of a hand touching various pastries."]),
    ("test", "val2014", 184613, [
        "A child holding a flowered umbrella and petting a yak.",
        "A young man holding an umbrella next to a herd of cattle.",
        "a young boy barefoot holding an umbrella touching the horn of a cow",
        "A young boy with an umbrella who is touching the horn of a cow.",
        "A boy holding an umbrella while standing next to livestock."]),
    ("val", "val2014", 554625, [
        "A child holding a brush up to his teeth. ",
        "A little boy brushing his teeth in the bathroom",
        "A small child holds a toothbrush in his mouth.",
        "a little boy that is brushing his teeth",
        "A baby is holding onto a toothbrush and putting it in his mouth."]),
]


def filename(filepath: str, cocoid: int) -> str:
    return f"COCO_{filepath}_{cocoid:012d}.jpg"


def karpathy_json(entries=ENTRIES) -> dict:
    images = []
    for imgid, (split, filepath, cocoid, raws) in enumerate(entries):
        sentids = [imgid * 5 + k for k in range(len(raws))]
        images.append({
            "filepath": filepath,
            "sentids": sentids,
            "filename": filename(filepath, cocoid),
            "imgid": imgid,
            "split": split,
            "sentences": [
                {"tokens": raw.lower().replace(".", "").split(), "raw": raw, "imgid": imgid,
                 "sentid": sentid} for raw, sentid in zip(raws, sentids)],
            "cocoid": cocoid,
        })
    return {"images": images, "dataset": "coco"}


@pytest.fixture(scope="module")
def small_photos() -> list[Image.Image]:
    """Eight real photographs; photo i is resized to 64 x (40 + i) so it can be recognised."""
    from vlrm_plugins.bundled_photos import bundled_photos

    folder = bundled_photos()
    return [folder.load(folder.paths[i]).convert("RGB").resize((64, 40 + i)) for i in range(8)]


@pytest.fixture
def coco(tmp_path, small_photos):
    """(annotations path, image root, {cocoid: image path}) of the eight-image dataset."""
    root = tmp_path / "coco"
    paths = {}
    for (split, filepath, cocoid, _), photo in zip(ENTRIES, small_photos):
        path = root / filepath / filename(filepath, cocoid)
        path.parent.mkdir(parents=True, exist_ok=True)
        photo.save(path, format="JPEG", quality=90)
        paths[cocoid] = path
    ann = tmp_path / "dataset_coco.json"
    ann.write_text(json.dumps(karpathy_json()))
    return ann, root, paths


def ids_of(paths: dict[int, Path], *cocoids: int) -> list[str]:
    return [str(paths[c]) for c in cocoids]


# ---------------------------------------------------------------- splits


def test_test_split_in_file_order_with_stripped_references(coco):
    ann, root, paths = coco
    data = KarpathyCoco(str(ann), str(root), split="test")
    assert isinstance(data, ImageFolder)
    assert data.split == "test"
    assert len(data) == 3
    assert data.ids() == ids_of(paths, 391895, 522418, 184613)
    assert data.ids()[0] == str(root / "val2014" / "COCO_val2014_000000391895.jpg")
    assert data.references(str(paths[391895])) == [
        "A man with a red helmet on a small moped on a dirt road.",
        "Man riding a motor bike on a dirt road on the countryside.",
        "A man riding on the back of a motorcycle.",
        "A dirt path with a young person on a motor bike rests to the foreground.",
        "A man in a red shirt and a red hat is on a motorcycle on a hill side."]
    assert data.references(str(paths[522418]))[4] == \
        "A woman marking a cake with the back of a chef's knife."
    assert data.references(str(paths[184613]))[0] == \
        "A child holding a flowered umbrella and petting a yak."
    # Images of other splits are not part of this one.
    with pytest.raises(KeyError):
        data.references(str(paths[318219]))


def test_default_split_is_test(coco):
    ann, root, paths = coco
    assert KarpathyCoco(str(ann), str(root)).ids() == ids_of(paths, 391895, 522418, 184613)


def test_train_includes_restval_by_default(coco):
    ann, root, paths = coco
    data = KarpathyCoco(str(ann), str(root), split="train")
    assert data.ids() == ids_of(paths, 57870, 397133, 384029)  # file order: train, restval, train
    assert data.references(str(paths[397133]))[0] == "A man is in a kitchen making pizzas."


def test_train_without_restval(coco):
    ann, root, paths = coco
    data = KarpathyCoco(str(ann), str(root), split="train", train_includes_restval=False)
    assert data.ids() == ids_of(paths, 57870, 384029)
    assert data.references(str(paths[57870]))[2] == \
        "a long table with a plant on top of it surrounded with wooden chairs"


def test_val_and_restval_splits(coco):
    ann, root, paths = coco
    assert KarpathyCoco(str(ann), str(root), split="val").ids() == ids_of(paths, 318219, 554625)
    # restval alone does not pull in train, and train_includes_restval does not affect it.
    assert KarpathyCoco(str(ann), str(root), split="restval").ids() == ids_of(paths, 397133)


# ---------------------------------------------------------------- images


def test_load_image_returns_the_listed_file_in_rgb(coco):
    ann, root, paths = coco
    data = KarpathyCoco(str(ann), str(root), split="test")
    # ENTRIES index of 391895 is 1, of 522418 is 3, of 184613 is 6: photo i is 64 x (40 + i).
    for image_id, height in zip(data.ids(), (41, 43, 46)):
        image = data.load_image(image_id)
        assert image is not None
        assert image.mode == "RGB"
        assert image.size == (64, height)
    assert data.skipped == set()


def test_missing_and_corrupt_files_are_skipped_warned_and_counted(coco, caplog):
    ann, root, paths = coco
    missing, corrupt, good = paths[391895], paths[522418], paths[184613]
    missing.unlink()
    corrupt.write_bytes(b"\x00garbage, not a JPEG\xff" * 10)
    data = KarpathyCoco(str(ann), str(root), split="test")
    assert len(data) == 3  # listed files are kept; they are skipped when loaded

    with caplog.at_level(logging.WARNING, logger="vlrm.data"):
        assert data.load_image(str(missing)) is None
        assert data.load_image(str(corrupt)) is None
        assert data.load_image(str(good)).size == (64, 46)
    assert data.skipped == {missing, corrupt}
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 2
    assert "COCO_val2014_000000391895.jpg" in warned[0]
    assert "COCO_val2014_000000522418.jpg" in warned[1]


def test_batches_yield_only_readable_images(coco, caplog):
    ann, root, paths = coco
    paths[391895].unlink()
    paths[522418].write_bytes(b"not an image at all")
    data = KarpathyCoco(str(ann), str(root), split="test")
    with caplog.at_level(logging.WARNING, logger="vlrm.data"):
        batches = list(itertools.islice(data.batches(batch_size=2, seed=0), 3))
    for batch in batches:
        assert [image_id for image_id, _ in batch] == [str(paths[184613])] * 2
        assert all(image.mode == "RGB" and image.size == (64, 46) for _, image in batch)
    assert data.skipped == {paths[391895], paths[522418]}
    # Each bad file is tried once, then never again.
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2


def test_batches_of_train_cover_train_and_restval(coco):
    ann, root, paths = coco
    paths[57870].unlink()
    data = KarpathyCoco(str(ann), str(root), split="train")
    first = next(data.batches(batch_size=2, seed=3))
    assert sorted(image_id for image_id, _ in first) == sorted(ids_of(paths, 397133, 384029))
    assert data.skipped == {paths[57870]}


def test_batches_with_no_readable_image_raise(coco):
    ann, root, paths = coco
    paths[318219].unlink()
    paths[554625].write_bytes(b"")
    data = KarpathyCoco(str(ann), str(root), split="val")
    with pytest.raises(ConfigError, match="no readable image"):
        next(data.batches(batch_size=1))


# ---------------------------------------------------------------- errors


def test_unknown_split(coco):
    ann, root, _ = coco
    with pytest.raises(ConfigError) as err:
        KarpathyCoco(str(ann), str(root), split="dev")
    assert "'dev'" in str(err.value)
    assert "train, restval, val, test" in str(err.value)


def test_missing_annotations_file(tmp_path, coco):
    _, root, _ = coco
    ann = tmp_path / "nowhere" / "dataset_coco.json"
    with pytest.raises(ConfigError, match="no such file") as err:
        KarpathyCoco(str(ann), str(root))
    assert str(ann) in str(err.value)


def test_annotations_path_that_is_a_folder(tmp_path, coco):
    _, root, _ = coco
    with pytest.raises(ConfigError, match="no such file"):
        KarpathyCoco(str(tmp_path), str(root))


@pytest.mark.parametrize("content, reason", [
    ('{"images": [', "JSONDecodeError"),
    ("", "JSONDecodeError"),
    ('{"dataset": "coco"}', "KeyError: 'images'"),
    ('[{"split": "test"}]', "TypeError"),
])
def test_annotations_that_are_not_a_karpathy_file(tmp_path, coco, content, reason):
    _, root, _ = coco
    ann = tmp_path / "broken.json"
    ann.write_text(content)
    with pytest.raises(ConfigError, match="not a Karpathy split file") as err:
        KarpathyCoco(str(ann), str(root))
    assert str(ann) in str(err.value)
    assert reason in str(err.value)


@pytest.mark.parametrize("key", ["sentences", "split", "filename"])
def test_entry_lacking_a_key(tmp_path, coco, key):
    _, root, _ = coco
    doc = karpathy_json()
    del doc["images"][1][key]  # the first test image
    ann = tmp_path / "lacking.json"
    ann.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="lacks") as err:
        KarpathyCoco(str(ann), str(root), split="test")
    assert str(ann) in str(err.value)
    assert f"'{key}'" in str(err.value)


def test_sentence_without_raw(tmp_path, coco):
    _, root, _ = coco
    doc = karpathy_json()
    del doc["images"][1]["sentences"][2]["raw"]
    ann = tmp_path / "noraw.json"
    ann.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="lacks 'raw'"):
        KarpathyCoco(str(ann), str(root), split="test")


def test_missing_image_root(coco, tmp_path):
    ann, _, _ = coco
    root = tmp_path / "no_images_here"
    with pytest.raises(ConfigError, match="image_root") as err:
        KarpathyCoco(str(ann), str(root))
    assert str(root) in str(err.value)


def test_image_root_that_is_a_file(coco):
    ann, _, _ = coco
    with pytest.raises(ConfigError, match="image_root"):
        KarpathyCoco(str(ann), str(ann))


def test_split_with_no_images(tmp_path, coco):
    _, root, _ = coco
    ann = tmp_path / "train_only.json"
    ann.write_text(json.dumps(karpathy_json([e for e in ENTRIES if e[0] == "train"])))
    with pytest.raises(ConfigError, match="list no 'test' images") as err:
        KarpathyCoco(str(ann), str(root), split="test")
    assert str(ann) in str(err.value)
    # restval is only pulled into train, never the other way round.
    with pytest.raises(ConfigError, match="list no 'restval' images"):
        KarpathyCoco(str(ann), str(root), split="restval")


def test_empty_image_list(tmp_path, coco):
    _, root, _ = coco
    ann = tmp_path / "empty.json"
    ann.write_text(json.dumps({"images": [], "dataset": "coco"}))
    with pytest.raises(ConfigError, match="list no 'test' images"):
        KarpathyCoco(str(ann), str(root))
