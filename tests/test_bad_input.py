"""A training run on a folder of real image files, good and broken: every good image is
used, every bad one is skipped, named in a warning and counted, and the run completes."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image
from policy_wrappers import PolicyWrapper

from vlrm.data import ImageFolder
from vlrm.trainer import Trainer, TrainerConfig


def write_folder(root: Path) -> tuple[set[str], set[str]]:
    """The issue's test folder. Returns the good and the bad file paths."""
    root.mkdir()
    photo = Image.fromarray(skimage.data.astronaut()).resize((48, 48))
    good = {
        "rgb.jpg": lambda p: photo.save(p, quality=90),
        "cmyk.jpg": lambda p: photo.convert("CMYK").save(p),
        "sixteen_bit.png": lambda p: Image.fromarray(
            np.asarray(photo.convert("L"), dtype=np.uint16) * 257).save(p),
        "rgba.png": lambda p: photo.convert("RGBA").save(p),
        "gray.png": lambda p: photo.convert("L").save(p),
        "palette.gif": lambda p: photo.convert("P", palette=Image.Palette.ADAPTIVE).save(p),
        "one_pixel.png": lambda p: Image.new("RGB", (1, 1), (200, 30, 30)).save(p),
    }
    jpeg = io.BytesIO()
    photo.save(jpeg, format="JPEG")
    # Over twice PIL's pixel limit (a decompression bomb): 1-bit, so the file stays small.
    side = int((2 * Image.MAX_IMAGE_PIXELS) ** 0.5) + 100
    bad = {
        "truncated.jpg": lambda p: p.write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2]),
        "empty.jpg": lambda p: p.write_bytes(b""),
        "text.jpg": lambda p: p.write_text("this is not an image\n"),
        "bomb.png": lambda p: Image.new("1", (side, side)).save(p),
    }
    for name, write in {**good, **bad}.items():
        write(root / name)
    return {str(root / n) for n in good}, {str(root / n) for n in bad}


class Recording(PolicyWrapper):
    """The real policy; records the image ids each rollout was sampled for."""

    def __init__(self, policy) -> None:
        super().__init__(policy)
        self.seen = []

    def sample(self, images, image_ids, num_samples):
        self.seen.append(list(image_ids))
        return self.inner.sample(images, image_ids, num_samples)


@pytest.mark.slow
def test_a_run_on_broken_files_uses_every_good_image_and_skips_every_bad_one(
        tiny_policy_factory, tiny_clip, tmp_path, caplog):
    good, bad = write_folder(tmp_path / "images")
    modes = {Path(p).name: Image.open(p).mode for p in good}
    assert modes == {"rgb.jpg": "RGB", "cmyk.jpg": "CMYK", "sixteen_bit.png": "I;16",
                     "rgba.png": "RGBA", "gray.png": "L", "palette.gif": "P", "one_pixel.png": "RGB"}
    data = ImageFolder(str(tmp_path / "images"))
    assert len(data) == len(good) + len(bad)
    policy = Recording(tiny_policy_factory(seed=0, max_new_tokens=4))
    # One step is one epoch of the good images; the second step starts the next epoch.
    config = TrainerConfig(max_steps=2, images_per_step=len(good), samples_per_image=1,
                           save_every=0, progress=False)
    with caplog.at_level(logging.WARNING, logger="vlrm.data"):
        history = Trainer(policy, tiny_clip, data, config, tmp_path / "run").train()

    assert [len(ids) for ids in policy.seen] == [len(good)] * 2
    assert set(policy.seen[0]) == good and set(policy.seen[1]) == good
    assert {str(p) for p in data.skipped} == bad
    warned = " ".join(r.getMessage() for r in caplog.records)
    for path in bad:
        assert path in warned
    assert sum(path in r.getMessage() for r in caplog.records for path in bad) == len(bad)  # once each
    assert [h["data/skipped"] for h in history] == [len(bad)] * 2
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["data/skipped"] == len(bad)
    assert (tmp_path / "run" / "checkpoints" / "last" / "trainer_state.json").is_file()
