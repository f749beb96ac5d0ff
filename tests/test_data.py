"""ImageFolder and load_rgb on real image files written into tmp_path."""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from vlrm.data import ImageFolder, load_rgb
from vlrm.errors import ConfigError


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    """A real RGB photograph, shrunk so that tests stay fast."""
    return Image.fromarray(skimage.data.astronaut()).resize((64, 64))


def _save(image: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def _solid(size: tuple[int, int], color: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", size, color)


def _folder_of(tmp_path: Path, n: int) -> Path:
    """``n`` distinct small PNGs, image i of size (8 + i, 6)."""
    root = tmp_path / "imgs"
    for i in range(n):
        _save(_solid((8 + i, 6), (i * 20, 255 - i * 20, 7)), root / f"img{i:02d}.png")
    return root


def _ids(batch: list[tuple[str, Image.Image]]) -> list[str]:
    return [image_id for image_id, _ in batch]


def _take(folder: ImageFolder, batch_size: int, seed: int, n_batches: int):
    return list(itertools.islice(folder.batches(batch_size, seed=seed), n_batches))


# ---------------------------------------------------------------- discovery


def test_finds_images_recursively_ignores_other_files_sorted(tmp_path, astronaut):
    root = tmp_path / "data"
    expected = [
        _save(astronaut, root / "b.jpg"),
        _save(astronaut, root / "a.PNG"),  # extension match is case-insensitive
        _save(astronaut, root / "sub" / "c.png"),
        _save(astronaut, root / "sub" / "deeper" / "d.bmp"),
        _save(astronaut, root / "other" / "e.webp"),
    ]
    (root / "notes.txt").write_text("not an image")
    (root / "sub" / "labels.csv").write_text("a,b\n")
    (root / "sub" / "folder.png").mkdir()  # a directory with an image name is no image

    folder = ImageFolder(str(root))

    assert folder.paths == sorted(expected)
    assert len(folder) == 5
    assert all(p.suffix.lower() != ".txt" for p in folder.paths)
    # deterministic: a second scan of the same folder gives the same list
    assert ImageFolder(str(root)).paths == folder.paths


def test_patterns_restrict_files(tmp_path, astronaut):
    root = tmp_path / "data"
    _save(astronaut, root / "apple.png")
    _save(astronaut, root / "avocado.png")
    _save(astronaut, root / "banana.png")
    _save(astronaut, root / "apricot.jpg")
    _save(astronaut, root / "sub" / "almond.png")  # not matched: pattern is not recursive

    folder = ImageFolder(str(root), patterns=("a*.png",))

    assert [p.name for p in folder.paths] == ["apple.png", "avocado.png"]


def test_several_patterns_do_not_duplicate(tmp_path, astronaut):
    root = tmp_path / "data"
    _save(astronaut, root / "apple.png")
    _save(astronaut, root / "banana.png")

    folder = ImageFolder(str(root), patterns=("a*.png", "*.png", "**/*"))

    assert [p.name for p in folder.paths] == ["apple.png", "banana.png"]


def test_expanduser_on_root(tmp_path, astronaut, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    _save(astronaut, tmp_path / "pics" / "x.png")

    folder = ImageFolder("~/pics")

    assert folder.paths == [tmp_path / "pics" / "x.png"]


# ---------------------------------------------------------------- errors


def test_missing_folder_raises_config_error_with_path_and_hint(tmp_path):
    missing = tmp_path / "nope"
    hint = "put the training photos here (see README)"

    with pytest.raises(ConfigError) as info:
        ImageFolder(str(missing), hint=hint)

    message = str(info.value)
    assert str(missing) in message
    assert hint in message


def test_file_instead_of_folder_raises_config_error(tmp_path, astronaut):
    path = _save(astronaut, tmp_path / "one.png")

    with pytest.raises(ConfigError, match="not a folder"):
        ImageFolder(str(path))


def test_empty_folder_raises_no_images(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()

    with pytest.raises(ConfigError, match="no images") as info:
        ImageFolder(str(root))
    assert str(root) in str(info.value)


def test_folder_with_only_text_raises_no_images(tmp_path):
    root = tmp_path / "texts"
    root.mkdir()
    (root / "notes.txt").write_text("hello")

    with pytest.raises(ConfigError, match="no images"):
        ImageFolder(str(root))


def test_folder_with_only_unreadable_images_raises_when_drawn(tmp_path, caplog):
    root = tmp_path / "bad"
    root.mkdir()
    (root / "empty.png").write_bytes(b"")
    (root / "text.jpg").write_text("this is not a jpeg")

    folder = ImageFolder(str(root))  # construction only lists names
    assert len(folder) == 2

    caplog.set_level(logging.WARNING, logger="vlrm.data")
    with pytest.raises(ConfigError, match="no readable image") as info:
        next(folder.batches(1))
    assert str(root) in str(info.value)
    assert folder.skipped == set(folder.paths)


# ---------------------------------------------------------------- bad files


def _bad_files(root: Path, astronaut: Image.Image) -> dict[str, Path]:
    full = root / "truncated.jpg"
    _save(astronaut, full, quality=95)
    data = full.read_bytes()
    full.write_bytes(data[: len(data) // 2])
    zero = root / "sub" / "zero.png"
    zero.parent.mkdir(parents=True, exist_ok=True)
    zero.write_bytes(b"")
    text = root / "text.jpg"
    text.write_text("definitely not JFIF data\n" * 10)
    return {"truncated": full, "zero": zero, "text": text}


def test_bad_files_skipped_logged_counted_once_never_retried(tmp_path, astronaut, caplog):
    root = tmp_path / "mixed"
    good = [
        _save(astronaut, root / "good0.jpg"),
        _save(astronaut.convert("L"), root / "good1.png"),
        _save(astronaut, root / "sub" / "good2.png"),
    ]
    bad = _bad_files(root, astronaut)

    # each bad file really is unreadable on its own
    for path in bad.values():
        with pytest.raises((OSError, ValueError, SyntaxError)):
            load_rgb(path)

    folder = ImageFolder(str(root))
    assert len(folder) == 6
    caplog.set_level(logging.WARNING, logger="vlrm.data")

    epochs = 4
    batches = _take(folder, batch_size=3, seed=0, n_batches=epochs)  # 3 good per epoch
    seen = Counter(image_id for batch in batches for image_id in _ids(batch))

    assert seen == Counter({str(p): epochs for p in good})
    for batch in batches:
        assert len(batch) == 3
        for _, image in batch:
            assert image.mode == "RGB"
            assert image.size == (64, 64)

    assert folder.skipped == set(bad.values())
    records = [r for r in caplog.records if r.name == "vlrm.data"]
    assert len(records) == len(bad)  # once each, never retried in later epochs
    for path in bad.values():
        hits = [r for r in records if str(path) in r.getMessage()]
        assert len(hits) == 1, f"{path} logged {len(hits)} times"
        assert hits[0].levelno == logging.WARNING


def test_load_returns_none_and_counts_bad_file(tmp_path, astronaut, caplog):
    root = tmp_path / "d"
    _save(astronaut, root / "ok.png")
    bad = _bad_files(root, astronaut)["truncated"]
    folder = ImageFolder(str(root))
    caplog.set_level(logging.WARNING, logger="vlrm.data")

    assert folder.load(bad) is None
    assert folder.skipped == {bad}
    assert any(str(bad) in r.getMessage() for r in caplog.records)
    assert folder.load(root / "ok.png").size == (64, 64)


# ---------------------------------------------------------------- modes


@pytest.mark.parametrize(
    ("mode", "filename", "kwargs"),
    [
        ("RGBA", "x.png", {}),
        ("L", "x.png", {}),
        ("P", "x.png", {}),
        ("P", "x.gif", {}),
        ("CMYK", "x.jpg", {"quality": 95}),
        ("LA", "x.png", {}),
        ("1", "x.bmp", {}),
        ("RGB", "x.tif", {}),
        ("RGB", "x.webp", {"lossless": True}),
    ],
)
def test_modes_load_as_rgb_with_right_size(tmp_path, astronaut, mode, filename, kwargs):
    source = astronaut.resize((40, 30))
    image = source.convert("RGBA") if mode in ("RGBA", "LA") else source.convert(mode)
    if mode == "LA":
        image = image.convert("LA")
    path = _save(image, tmp_path / filename, **kwargs)
    with Image.open(path) as raw:  # the file on disk really has that mode
        assert raw.mode == mode

    rgb = load_rgb(path)

    assert rgb.mode == "RGB"
    assert rgb.size == (40, 30)
    # content survives: close to the original photo (greyscale/bilevel compared in L)
    got = np.asarray(rgb, dtype=np.float64)
    if mode in ("L", "LA", "1"):
        want = np.asarray(image.convert("L").convert("RGB"), dtype=np.float64)
    else:
        want = np.asarray(source, dtype=np.float64)
    tolerance = 40 if mode in ("P", "CMYK") else 2
    assert np.abs(got - want).mean() < tolerance


def test_cmyk_jpeg_colours(tmp_path):
    red = _solid((16, 16), (255, 0, 0)).convert("CMYK")
    path = _save(red, tmp_path / "red.jpg", quality=100)

    rgb = load_rgb(path)

    r, g, b = np.asarray(rgb, dtype=np.int64).reshape(-1, 3).mean(axis=0)
    assert r > 200 and g < 60 and b < 60


def test_16_bit_png_loads_as_rgb(tmp_path):
    values = (np.arange(30 * 40, dtype=np.uint32).reshape(30, 40) * 50 % 65536).astype(np.uint16)
    path = _save(Image.fromarray(values), tmp_path / "deep.png")
    with Image.open(path) as raw:
        assert raw.mode == "I;16"

    rgb = load_rgb(path)

    assert rgb.mode == "RGB"
    assert rgb.size == (40, 30)


def test_16_bit_png_keeps_its_tones(tmp_path, astronaut):
    grey8 = np.asarray(astronaut.convert("L"), dtype=np.uint16)
    path = _save(Image.fromarray(grey8 * 257), tmp_path / "deep.png")  # 0..65535

    rgb = np.asarray(load_rgb(path), dtype=np.float64)[..., 0]

    assert np.abs(rgb - grey8).mean() < 2


def test_transparent_rgba_pixel_becomes_white(tmp_path):
    image = Image.new("RGBA", (4, 3), (10, 20, 30, 255))
    image.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black
    image.putpixel((1, 0), (200, 0, 0, 0))  # fully transparent red
    image.putpixel((2, 0), (0, 0, 0, 128))  # half transparent black
    path = _save(image, tmp_path / "alpha.png")

    rgb = load_rgb(path)

    assert rgb.getpixel((0, 0)) == (255, 255, 255)
    assert rgb.getpixel((1, 0)) == (255, 255, 255)
    assert all(120 <= c <= 135 for c in rgb.getpixel((2, 0)))
    assert rgb.getpixel((3, 2)) == (10, 20, 30)  # opaque pixels untouched


def test_transparent_palette_pixel_becomes_white(tmp_path):
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0, 0, 0] * 254)
    image.putpixel((0, 0), 0)
    path = _save(image, tmp_path / "pal.png", transparency=0)
    with Image.open(path) as raw:
        assert raw.mode == "P" and "transparency" in raw.info

    rgb = load_rgb(path)

    assert rgb.getpixel((0, 0)) == (255, 255, 255)
    assert rgb.getpixel((3, 3)) == (10, 200, 30)


# ---------------------------------------------------------------- batches


def test_batches_yield_id_image_lists_of_right_size(tmp_path):
    root = _folder_of(tmp_path, 8)
    folder = ImageFolder(str(root))

    batches = _take(folder, batch_size=3, seed=0, n_batches=5)

    for batch in batches:
        assert isinstance(batch, list)
        assert len(batch) == 3
        for image_id, image in batch:
            assert isinstance(image_id, str)
            assert isinstance(image, Image.Image)
            assert image.mode == "RGB"
            # the image really is the file named by its id
            assert image.size == Image.open(image_id).size
            assert Path(image_id) in folder.paths


def test_same_seed_same_order_different_seed_differs(tmp_path):
    root = _folder_of(tmp_path, 8)

    def order(seed: int) -> list[str]:
        folder = ImageFolder(str(root))
        return [i for batch in _take(folder, 4, seed, 6) for i in _ids(batch)]  # 3 epochs

    assert order(0) == order(0)
    assert order(7) == order(7)
    assert order(0) != order(7)
    assert order(0) != order(1)


def test_every_image_once_per_epoch_and_epochs_reshuffle(tmp_path):
    n = 8
    root = _folder_of(tmp_path, n)
    folder = ImageFolder(str(root))
    everything = sorted(str(p) for p in folder.paths)

    ids = [i for batch in _take(folder, 4, 3, 2 * 5) for i in _ids(batch)]  # 5 epochs
    epochs = [ids[k:k + n] for k in range(0, len(ids), n)]

    assert len(epochs) == 5
    for epoch in epochs:
        assert sorted(epoch) == everything
    assert len({tuple(e) for e in epochs}) > 1  # each epoch is a fresh shuffle


def test_batch_size_not_dividing_epoch_still_covers_every_image(tmp_path):
    n = 8
    root = _folder_of(tmp_path, n)
    folder = ImageFolder(str(root))

    ids = [i for batch in _take(folder, 3, 0, 8) for i in _ids(batch)]  # 24 ids = 3 epochs

    assert Counter(ids) == Counter({str(p): 3 for p in folder.paths})
    for k in range(0, len(ids), n):
        assert len(set(ids[k:k + n])) == n


def test_batch_larger_than_folder_spans_epochs(tmp_path):
    root = _folder_of(tmp_path, 3)
    folder = ImageFolder(str(root))

    (batch,) = _take(folder, 7, 0, 1)

    assert len(batch) == 7
    # two whole epochs and one image of the third
    assert sorted(Counter(_ids(batch)).values()) == [2, 2, 3]


# ---------------------------------------------------------------- decompression bombs


def test_image_over_twice_pixel_limit_is_skipped(tmp_path, monkeypatch, caplog):
    root = tmp_path / "d"
    _save(_solid((10, 10), (1, 2, 3)), root / "small.png")
    huge = _save(_solid((200, 200), (1, 2, 3)), root / "huge.png")  # 40000 > 2 * 6000
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)
    caplog.set_level(logging.WARNING, logger="vlrm.data")
    folder = ImageFolder(str(root))

    (batch,) = _take(folder, 2, 0, 1)

    assert _ids(batch) == [str(root / "small.png")] * 2
    assert folder.skipped == {huge}
    assert any(str(huge) in r.getMessage() for r in caplog.records)


def test_load_rgb_refuses_image_over_pixel_limit(tmp_path, monkeypatch):
    big = _save(_solid((100, 100), (1, 2, 3)), tmp_path / "big.png")  # 10000: over 6000, under 2x
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)

    with pytest.raises((Image.DecompressionBombError, Image.DecompressionBombWarning)):
        load_rgb(big)


def test_image_between_one_and_two_pixel_limits_is_skipped(tmp_path, monkeypatch):
    root = tmp_path / "d"
    _save(_solid((10, 10), (1, 2, 3)), root / "small.png")
    big = _save(_solid((100, 100), (1, 2, 3)), root / "big.png")  # 10000: over 6000, under 2x
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)
    folder = ImageFolder(str(root))

    (batch,) = _take(folder, 2, 0, 1)

    assert _ids(batch) == [str(root / "small.png")] * 2
    assert folder.skipped == {big}


# ---------------------------------------------------------------- each rank reads its share


def _reading(folder: ImageFolder) -> list[Path]:
    """Record the files ``folder`` opens (then opens them as before)."""
    opened: list[Path] = []
    load = folder.load
    folder.load = lambda path: (opened.append(path), load(path))[1]
    return opened


def test_each_rank_opens_only_its_share_which_is_its_slice_of_the_one_process_batch(tmp_path):
    root = _folder_of(tmp_path, 7)  # epochs of 7 against batches of 4: batches span epochs
    whole = _take(ImageFolder(str(root)), 4, seed=3, n_batches=6)
    shares, opened = [], []
    for rank in (0, 1):
        folder = ImageFolder(str(root))
        opened.append(_reading(folder))
        shares.append(list(itertools.islice(folder.batches(4, seed=3, rank=rank, world_size=2), 6)))
    for step, batch in enumerate(whole):  # rank r's share is World.shard's r-th half
        assert _ids(shares[0][step]) == _ids(batch)[:2] and _ids(shares[1][step]) == _ids(batch)[2:]
    assert len(opened[0]) == len(opened[1]) == 12  # each opened only its own 12 of the 24
    assert sorted(map(str, opened[0] + opened[1])) == sorted(i for b in whole for i in _ids(b))


def test_an_unreadable_file_is_met_by_one_rank_and_replaced_from_its_own_records(tmp_path, caplog):
    root = _folder_of(tmp_path, 7)
    (root / "img03.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    shares, folders, opened = [], [], []
    with caplog.at_level(logging.WARNING):
        for rank in (0, 1):
            folder = ImageFolder(str(root))
            folders.append(folder)
            opened.append(_reading(folder))
            shares.append(list(itertools.islice(folder.batches(4, seed=3, rank=rank,
                                                              world_size=2), 6)))
    # Found by the rank it was dealt to, once (epochs of 7 deal it to each rank in turn; the
    # trainer shares what each rank found after every step)
    assert [len(f.skipped) for f in folders] in ([1, 0], [0, 1], [1, 1])
    assert len(caplog.records) == sum(len(f.skipped) for f in folders)
    for rank in (0, 1):  # full shares, the bad file left out, nothing opened in vain
        assert all(len(b) == 2 and all("img03" not in i for i in _ids(b)) for b in shares[rank])
        assert len(opened[rank]) == 12 + len(folders[rank].skipped)
    # A resumed rank (every rank's skipped files restored) passes over its first 4 batches.
    for rank in (0, 1):
        resumed = ImageFolder(str(root))
        for f in folders:
            resumed.load_state_dict(f.state_dict())
        opened = _reading(resumed)
        again = list(itertools.islice(resumed.batches(4, seed=3, start=4, rank=rank,
                                                      world_size=2), 2))
        assert [_ids(x) for x in again] == [_ids(x) for x in shares[rank][4:6]]
        assert len(opened) == 4  # only the images it returns


def test_a_batch_that_does_not_split_over_the_ranks_is_a_config_error(tmp_path):
    folder = ImageFolder(str(_folder_of(tmp_path, 4)))
    with pytest.raises(ConfigError, match="3 images a batch cannot be split evenly over 2"):
        next(folder.batches(3, rank=0, world_size=2))
