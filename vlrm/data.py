"""Unlabelled images for RL: the paper trains on images alone, no captions needed."""

from __future__ import annotations

import itertools
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlrm.errors import ConfigError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def load_rgb(path: Path) -> Image.Image:
    """Decode an image fully and convert it to RGB.

    Raises:
        OSError, ValueError, SyntaxError, Image.DecompressionBombError: unreadable file.
    """
    with warnings.catch_warnings():
        # An image over PIL's pixel limit is refused, never decoded into memory.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(path)
        except Image.DecompressionBombWarning as exc:
            raise Image.DecompressionBombError(str(exc)) from exc
        with image:
            image.load()
            if image.mode in ("I", "F") or image.mode.startswith("I;16"):
                # PIL clips wide integers at 255 when converting; rescale to 8 bits instead.
                image = _to_8bit(image)
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                image = image.convert("RGBA")
                background = Image.new("RGBA", image.size, (255, 255, 255, 255))
                return Image.alpha_composite(background, image).convert("RGB")
            return image.convert("RGB")


def _to_8bit(image: Image.Image) -> Image.Image:
    """A 16/32-bit integer or float grayscale image as 8-bit "L", using its full range."""
    import numpy as np

    values = np.asarray(image, dtype=np.float64)
    high = 65535.0 if image.mode.startswith("I;16") else max(float(values.max()), 1.0)
    return Image.fromarray(np.clip(values / high * 255.0, 0, 255).astype(np.uint8), mode="L")


class ImageFolder:
    """All images under a folder, served in shuffled batches forever.

    A file that cannot be decoded is skipped with a warning that names it, counted in
    ``skipped`` (logged as ``data/skipped``) and never tried again.

    Args:
        root: The folder. Searched recursively.
        patterns: Glob patterns relative to ``root``; default every file.
        extensions: File endings counted as images (case-insensitive).
        hint: Appended to the error when the folder is missing, to say what belongs there.
    """

    def __init__(
        self,
        root: str,
        patterns: Sequence[str] = ("**/*",),
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        hint: str = "",
    ) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise ConfigError(
                f"image folder {str(self.root)!r} does not exist or is not a folder"
                + (f": {hint}" if hint else ""))
        exts = tuple(e.lower() for e in extensions)
        found = {p for pattern in patterns for p in self.root.glob(pattern)}
        self.paths = sorted(p for p in found if p.is_file() and p.suffix.lower() in exts)
        if not self.paths:
            raise ConfigError(
                f"image folder {str(self.root)!r} holds no images (looked for {', '.join(exts)})")
        self.skipped: set[Path] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, path: Path) -> Image.Image | None:
        """The image at ``path`` in RGB, or None (warned and counted) if it is unreadable."""
        try:
            return load_rgb(path)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            log.warning("skipping unreadable image %s: %s", path, exc)
            self.skipped.add(path)
            return None

    def ids(self) -> list[str]:
        """Image ids: the file paths, as strings."""
        return [str(p) for p in self.paths]

    def load_image(self, image_id: str) -> Image.Image | None:
        """The image with this id (see ``load``)."""
        return self.load(Path(image_id))

    def references(self, image_id: str) -> None:
        """A folder of images has no reference captions."""
        return None

    def state_dict(self) -> dict[str, list[str]]:
        """What a resumed run needs: the files found unreadable so far."""
        return {"skipped": sorted(str(p) for p in self.skipped)}

    def load_state_dict(self, state: dict[str, list[str]]) -> None:
        self.skipped |= {Path(p) for p in state.get("skipped", [])}

    def batches(self, batch_size: int, seed: int = 0, start: int = 0, rank: int = 0,
                world_size: int = 1) -> Iterator[list[tuple[str, Image.Image]]]:
        """Yield lists of ``(image_id, image)``; each epoch is a fresh seeded shuffle.

        Args:
            batch_size: Images per batch (over all ranks).
            seed: Seeds the shuffles.
            start: Skip this many batches first, without decoding them (a resumed run: the
                files in ``skipped`` are passed over as the first run passed them over).
            rank, world_size: Under torchrun: yield only this rank's share of each batch,
                opening only its own files (``seeded_batches``).
        """
        generator = torch.Generator().manual_seed(seed)  # one stream over the epochs

        def epoch(_: int) -> Iterator[tuple[str, Path]]:
            order = torch.randperm(len(self.paths), generator=generator).tolist()
            return ((str(p), p) for p in (self.paths[i] for i in order))

        return seeded_batches(epoch, lambda _, path: self.load(path), batch_size, start,
                              where=repr(str(self.root)), skipped=lambda: len(self.skipped),
                              known_bad=lambda _, path: path in self.skipped,
                              rank=rank, world_size=world_size)


def seeded_batches(
    epochs: Callable[[int], Iterable[tuple[str, Any]]],
    decode: Callable[[str, Any], Image.Image | None],
    batch_size: int,
    start: int = 0,
    where: str = "the image source",
    skipped: Callable[[], int] = lambda: 0,
    known_bad: Callable[[str, Any], bool] = lambda image_id, raw: False,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[list[tuple[str, Image.Image]]]:
    """Batches of ``(image_id, image)`` over epochs of records, for every image source.

    With ``world_size`` > 1 each rank reads and decodes only its own share: the records,
    counted over every epoch in order (readable or not), are dealt out in runs of
    ``batch_size // world_size``, the first run to rank 0, the next to rank 1, and so on, and
    each rank batches the readable ones of its runs. With no unreadable record, rank r's k-th
    batch is exactly the r-th contiguous share of the single-process run's k-th batch (what
    ``World.shard`` would cut); an unreadable record is replaced from its own rank's next
    records, so the ranks never read the same record.

    Args:
        epochs: ``epochs(e)`` yields epoch ``e``'s records in order as ``(id, raw)``, every
            record, readable or not; ``raw`` may be read lazily by ``decode``.
        decode: ``decode(id, raw)``: the RGB image, or None for an unreadable record (the
            source warns, names and counts it).
        batch_size: Images per batch, over all ranks.
        start: Pass over this many batches first without decoding them (a resumed run: the
            records found unreadable before are left out as the first run left them out).
        where: Names the source in the error when an epoch has no readable image.
        skipped: How many records were found unreadable (for that error).
        known_bad: ``known_bad(id, raw)``: the record was found unreadable before (it is
            passed over, not read again).
        rank, world_size: This process's share (torchrun); ``batch_size`` must divide evenly.
    """
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    if batch_size % world_size:
        raise ConfigError(f"{batch_size} images a batch cannot be split evenly over {world_size} "
                          "processes: make trainer.images_per_step a multiple of the number of "
                          "processes")
    per = batch_size // world_size
    to_skip = start * per  # good images the first ``start`` batches held
    batch: list[tuple[str, Image.Image]] = []
    position = 0  # records dealt so far, over every epoch
    barren = 0  # epochs in a row with no readable record of this rank's
    for e in itertools.count():
        seen = mine = good = 0
        for image_id, raw in epochs(e):
            seen += 1
            position += 1
            if (position - 1) // per % world_size != rank:
                continue  # another rank's record: not read here
            mine += 1
            if known_bad(image_id, raw):
                continue
            if to_skip:
                to_skip -= 1
                good += 1
                continue
            image = decode(image_id, raw)
            if image is None:
                continue
            good += 1
            batch.append((image_id, image))
            if len(batch) == per:
                yield batch
                batch = []
        barren = barren + 1 if good == 0 else 0
        # A share's records shift from epoch to epoch when the epoch's length is no multiple of
        # the batch; after ``world_size * per`` epochs every record has been this rank's.
        if seen == 0 or barren > (world_size * per if world_size > 1 else 0):
            raise ConfigError(f"no readable image in {where} ({skipped()} unreadable records skipped)")
