"""Image sources at scale: Hugging Face ``datasets`` and WebDataset tar shards.

Both serve ``(image_id, RGB image)`` batches as ``vlrm.data.ImageFolder`` does (the
``vlrm.protocols.ImageSource`` contract): an order fixed by the seed, a new one each epoch;
an unreadable record is skipped with a warning that names it, counted (``data/skipped``) and
never tried again; ``start`` passes over a resumed run's first batches without decoding
them, so ``--resume`` sees exactly the images the first run would have seen.

- ``hf_dataset``: ``datasets.load_dataset`` on a local folder of parquet / arrow files, an
  ``imagefolder``, or a hub name (offline: whatever the local cache holds), streamed
  (``streaming: true``: an ``IterableDataset``, shuffled with a seeded buffer) or not (a
  seeded permutation of the rows). The image column and an optional id column are named
  in the config; the images are decoded by vlrm (``Image(decode=False)``), so a corrupt one
  is skipped instead of failing the run.
- ``webdataset``: tar shards in the WebDataset layout (files grouped by the key before the
  first dot: ``000123.jpg``, ``000123.txt``, ...), read with Python's ``tarfile``; each
  epoch visits the shards in a seeded order, and a seeded buffer shuffles the records.

Under torchrun every rank walks the same order and reads only its own share of each batch
(``vlrm.data.seeded_batches``): the rows of a map-style dataset and the image bytes of a tar
shard are read only by the rank that decodes them; a streamed dataset is iterated by every
rank, each decoding its share (as ``datasets.distributed.split_dataset_by_node`` does when
the shards do not divide among the ranks).
"""

from __future__ import annotations

import functools
import io
import logging
import random
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlrm import hookimpl
from vlrm.data import load_rgb, seeded_batches
from vlrm.errors import ConfigError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
_UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class RecordSource:
    """Seeded, resumable batches over records that an epoch yields as ``(id, raw)``.

    Subclasses implement ``_epoch(epoch, seed)`` (the records of one epoch in order, raw:
    not decoded) and ``_decode(raw)`` (an RGB image; raises on an unreadable record).
    """

    name = "source"

    def __init__(self) -> None:
        self.skipped: set[str] = set()

    def _epoch(self, epoch: int, seed: int) -> Iterator[tuple[str, Any]]:
        raise NotImplementedError

    def _decode(self, raw: Any) -> Image.Image:
        raise NotImplementedError

    def decode(self, image_id: str, raw: Any) -> Image.Image | None:
        """The record's image, or None (warned, named and counted) if it is unreadable. A
        callable ``raw`` reads the record's bytes when called (only the rank that decodes the
        record reads them)."""
        try:
            return self._decode(raw() if callable(raw) else raw)
        except _UNREADABLE as exc:
            log.warning("skipping unreadable image %s in %s: %s", image_id, self.name, exc)
            self.skipped.add(image_id)
            return None

    def state_dict(self) -> dict[str, list[str]]:
        """What a resumed run needs: the records found unreadable so far."""
        return {"skipped": sorted(self.skipped)}

    def load_state_dict(self, state: dict[str, list[str]]) -> None:
        self.skipped |= set(state.get("skipped", []))

    def batches(self, batch_size: int, seed: int = 0, start: int = 0, rank: int = 0,
                world_size: int = 1) -> Iterator[list[tuple[str, Image.Image]]]:
        """Yield lists of ``(image_id, image)`` forever (see the module docstring); under
        torchrun only this rank's share of each batch (``vlrm.data.seeded_batches``)."""
        return seeded_batches(lambda e: self._epoch(e, seed), self.decode, batch_size, start,
                              where=self.name, skipped=lambda: len(self.skipped),
                              known_bad=lambda image_id, _: image_id in self.skipped,
                              rank=rank, world_size=world_size)


def _read_bytes(path: Path, offset: int, size: int) -> bytes:
    """``size`` bytes of the file at ``offset`` (a tar member's data)."""
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise OSError(f"{path.name} ends {size - len(data)} bytes early")
    return data


def _buffer_shuffle(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """A seeded shuffle through a buffer of ``size`` items (1: the order as read)."""
    if size <= 1:
        yield from items
        return
    buffer: list[Any] = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= size:
            yield buffer.pop(rng.randrange(len(buffer)))
    rng.shuffle(buffer)
    yield from buffer


class HFImages(RecordSource):
    """Images from a Hugging Face ``datasets`` dataset.

    Args:
        path: A builder (``parquet``, ``arrow``, ``imagefolder``) or a dataset name / local
            dataset folder, as ``datasets.load_dataset``'s first argument.
        data_files: Files (globs) for the ``parquet`` / ``arrow`` builders.
        data_dir: The folder for ``imagefolder``.
        split: The split to read.
        image_column: The column holding the images (an ``Image`` feature, or bytes).
        id_column: A column whose values name the images; default the row number.
        streaming: Read as an ``IterableDataset`` (nothing loaded up front).
        shuffle_buffer: Records in the seeded shuffle buffer when streaming.
    """

    def __init__(self, path: str, data_files: str | list[str] | None = None,
                 data_dir: str | None = None, split: str = "train", image_column: str = "image",
                 id_column: str | None = None, streaming: bool = False,
                 shuffle_buffer: int = 1000) -> None:
        super().__init__()
        try:
            import datasets
        except ModuleNotFoundError as exc:
            raise ConfigError("data: hf_dataset needs the `datasets` library: "
                              "pip install 'vlrm[datasets]'") from exc
        self.name = f"dataset {path!r}" + (f" ({data_files or data_dir})" if data_files or data_dir else "")
        self.streaming, self.shuffle_buffer = streaming, shuffle_buffer
        self.image_column, self.id_column = image_column, id_column
        try:
            ds = datasets.load_dataset(path, data_files=data_files, data_dir=data_dir,
                                       split=split, streaming=streaming)
        except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as exc:
            raise ConfigError(f"data: cannot load {self.name}, split {split!r}: {exc}") from exc
        columns = list(ds.features or {}) if ds.features is not None else None
        if columns is not None:
            for key, column in (("image_column", image_column), ("id_column", id_column)):
                if column is not None and column not in columns:
                    raise ConfigError(f"data.{key}: {self.name} has no column {column!r} "
                                      f"(columns: {', '.join(columns)})")
            if isinstance(ds.features[image_column], datasets.Image):
                ds = ds.cast_column(image_column, datasets.Image(decode=False))
        keep = [c for c in (image_column, id_column) if c]
        self.ds = ds.select_columns(keep)
        if not streaming:
            if len(self.ds) == 0:
                raise ConfigError(f"data: {self.name} has no rows in split {split!r}")
            self._ids = ([str(v) for v in self.ds[id_column]] if id_column
                         else [str(i) for i in range(len(self.ds))])
            self._index = {image_id: i for i, image_id in enumerate(self._ids)}
            if len(self._index) != len(self._ids):
                raise ConfigError(f"data.id_column: {id_column!r} repeats ids in {self.name}")

    def __len__(self) -> int:
        if self.streaming:
            raise TypeError("a streamed dataset has no length")
        return len(self._ids)

    def _id(self, row: dict[str, Any], number: int) -> str:
        return str(row[self.id_column]) if self.id_column else str(number)

    def _epoch(self, epoch: int, seed: int) -> Iterator[tuple[str, Any]]:
        if self.streaming:
            # Row numbers name the rows in file order; the shuffle then reorders them.
            numbered = ((self._id(row, n), row[self.image_column])
                        for n, row in enumerate(self.ds))
            yield from _buffer_shuffle(numbered, self.shuffle_buffer,
                                       random.Random(f"{seed}/{epoch}"))
            return
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        for i in torch.randperm(len(self._ids), generator=generator).tolist():
            yield self._ids[i], functools.partial(self._cell, i)  # read when decoded

    def _cell(self, row: int) -> Any:
        return self.ds[row][self.image_column]

    def _decode(self, raw: Any) -> Image.Image:
        if isinstance(raw, dict):  # an Image feature, undecoded: {"bytes": ..., "path": ...}
            if raw.get("bytes") is not None:
                return load_rgb(io.BytesIO(raw["bytes"]))
            if raw.get("path"):
                return load_rgb(Path(raw["path"]))
            raise ValueError("the image record holds neither bytes nor a path")
        if isinstance(raw, (bytes, bytearray)):
            return load_rgb(io.BytesIO(raw))
        if isinstance(raw, Image.Image):
            return raw.convert("RGB")
        raise ValueError(f"the image column holds a {type(raw).__name__}, not an image")

    # Evaluation reads images by id (not for a streamed dataset).
    def ids(self) -> list[str]:
        if self.streaming:
            raise ConfigError(f"{self.name} is streamed: evaluation needs a dataset it can "
                              "index (streaming: false)")
        return list(self._ids)

    def load_image(self, image_id: str) -> Image.Image | None:
        return self.decode(image_id, self.ds[self._index[image_id]][self.image_column])

    def references(self, image_id: str) -> None:
        return None


class WebDatasetImages(RecordSource):
    """Images from WebDataset tar shards.

    Args:
        shards: Tar files or globs (``data/shards/*.tar``), read in a seeded order each epoch.
        shuffle_buffer: Records in the seeded shuffle buffer (1: each shard's own order).
        image_keys: File suffixes taken as the image of a record, first found wins.
    """

    def __init__(self, shards: str | Sequence[str], shuffle_buffer: int = 1000,
                 image_keys: Sequence[str] = IMAGE_SUFFIXES) -> None:
        super().__init__()
        patterns = [shards] if isinstance(shards, str) else list(shards)
        found: list[Path] = []
        for pattern in patterns:
            path = Path(pattern).expanduser()
            matches = sorted(path.parent.glob(path.name)) if any(c in path.name for c in "*?[") \
                else ([path] if path.is_file() else [])
            if not matches:
                raise ConfigError(f"data.shards: no tar shard matches {pattern!r}")
            found += matches
        self.shards = found
        self.name = f"WebDataset shards {', '.join(patterns)}"
        self.shuffle_buffer = shuffle_buffer
        self.image_keys = tuple(k.lower() for k in image_keys)

    def _records(self, shard: Path) -> Iterator[tuple[str, Any]]:
        """``(shard:key, a callable reading the image's bytes)`` per record with an image (a
        rank reads only the headers of other ranks' records); a shard that cannot be read is
        one unreadable record (named by the shard)."""
        try:
            with tarfile.open(shard) as tar:
                current, files = None, {}
                for member in tar:
                    if not member.isfile():
                        continue
                    base = member.name.rsplit("/", 1)[-1]
                    key, _, suffix = base.partition(".")
                    key = member.name[: len(member.name) - len(base)] + key
                    if key != current:
                        if current is not None:
                            yield from self._record(shard, current, files)
                        current, files = key, {}
                    if isinstance(tar.fileobj, io.BufferedReader):  # an uncompressed shard:
                        # read when decoded, by the rank whose record it is
                        files[suffix.lower()] = functools.partial(
                            _read_bytes, shard, member.offset_data, member.size)
                    else:  # compressed: the offsets are in the decompressed stream
                        files[suffix.lower()] = tar.extractfile(member).read()
                if current is not None:
                    yield from self._record(shard, current, files)
        except (tarfile.TarError, OSError) as exc:
            yield f"{shard.name}", exc

    def _record(self, shard: Path, key: str, files: dict[str, bytes]) -> Iterator[tuple[str, Any]]:
        for suffix in self.image_keys:
            if suffix in files:
                yield f"{shard.name}:{key}", files[suffix]
                return

    def _epoch(self, epoch: int, seed: int) -> Iterator[tuple[str, Any]]:
        rng = random.Random(f"{seed}/{epoch}")
        order = list(self.shards)
        rng.shuffle(order)
        records = (r for shard in order for r in self._records(shard))
        yield from _buffer_shuffle(records, self.shuffle_buffer, rng)

    def _decode(self, raw: Any) -> Image.Image:
        if isinstance(raw, Exception):
            raise OSError(f"the shard cannot be read: {raw}")
        return load_rgb(io.BytesIO(raw))


@hookimpl
def vlrm_register_datasets() -> dict[str, Any]:
    return {"hf_dataset": HFImages, "webdataset": WebDatasetImages}
