"""Image sources at scale: Hugging Face `datasets` (parquet, imagefolder; streamed or not)
and WebDataset tar shards, on real photos and a corrupt record each."""

import io
import itertools
import logging
import sys
from pathlib import Path

import pytest
from PIL import Image

from vlrm.errors import ConfigError
from vlrm_plugins.hf_datasets import HFImages, WebDatasetImages

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from image_records import photo_records, write_parquet, write_shards  # noqa: E402



@pytest.fixture(scope="module")
def parquet(tmp_path_factory):
    return write_parquet(tmp_path_factory.mktemp("parquet"), photo_records())


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("wds"), photo_records())


def _sources(parquet, shards):
    files = str(parquet / "*.parquet")
    return {
        "parquet": lambda: HFImages("parquet", data_files=files, image_column="img", id_column="name"),
        "parquet-streamed": lambda: HFImages("parquet", data_files=files, image_column="img",
                                             id_column="name", streaming=True, shuffle_buffer=4),
        "webdataset": lambda: WebDatasetImages(str(shards / "shard-*.tar"), shuffle_buffer=4),
    }


@pytest.mark.parametrize("kind", ["parquet", "parquet-streamed", "webdataset"])
def test_batches_skip_and_name_the_corrupt_record_and_resume_exactly(kind, parquet, shards, caplog):
    make = _sources(parquet, shards)[kind]
    source = make()
    with caplog.at_level(logging.WARNING):
        run = list(itertools.islice(source.batches(3, seed=7), 8))  # three epochs of 8 good
    ids = [i for batch in run for i, _ in batch]
    assert all(isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (48, 40)
               for batch in run for _, img in batch)
    assert len(source.skipped) == 1 and "broken" in next(iter(source.skipped))
    assert any("broken" in r.getMessage() and "skipping unreadable image" in r.getMessage()
               for r in caplog.records)
    # Every good photo once per epoch; epochs in different orders.
    assert sorted(ids[:8]) == sorted(ids[8:16]) == sorted(ids[16:24])
    assert sorted(i.rsplit(":", 1)[-1] for i in ids[:8]) == [f"photo{n}" for n in range(8)]
    assert len(set(ids[:8])) == 8 and ids[:8] != ids[8:16]
    # A resumed source (state restored, first 5 batches passed over) continues identically.
    resumed = make()
    resumed.load_state_dict(source.state_dict())
    again = list(itertools.islice(resumed.batches(3, seed=7, start=5), 3))
    assert [[i for i, _ in b] for b in again] == [[i for i, _ in b] for b in run[5:8]]
    assert all(a.tobytes() == b.tobytes() for x, y in zip(again, run[5:8])
               for (_, a), (_, b) in zip(x, y))
    # Another seed, another order.
    other = [i for b in itertools.islice(make().batches(3, seed=8), 2) for i, _ in b]
    assert other != ids[:6]


def test_imagefolder_through_datasets_with_row_numbers_as_ids(tmp_path):
    for name, data in photo_records():
        if name != "broken":
            Image.open(io.BytesIO(data)).save(tmp_path / f"{name}.png")
    source = HFImages("imagefolder", data_dir=str(tmp_path))
    assert len(source) == 8 and source.ids() == [str(i) for i in range(8)]
    batch = next(source.batches(4))
    assert len(batch) == 4 and all(img.mode == "RGB" for _, img in batch)
    assert source.load_image("0").size == (48, 40)


def test_bad_settings_are_config_errors_naming_what_is_wrong(parquet, tmp_path):
    files = str(parquet / "*.parquet")
    with pytest.raises(ConfigError, match="data.image_column: .* no column 'image'"):
        HFImages("parquet", data_files=files)
    with pytest.raises(ConfigError, match="data.id_column: .* no column 'id'"):
        HFImages("parquet", data_files=files, image_column="img", id_column="id")
    with pytest.raises(ConfigError, match="cannot load dataset 'parquet'"):
        HFImages("parquet", data_files=str(tmp_path / "none-*.parquet"))
    with pytest.raises(ConfigError, match="no tar shard matches"):
        WebDatasetImages(str(tmp_path / "*.tar"))
    streamed = HFImages("parquet", data_files=files, image_column="img", streaming=True)
    with pytest.raises(ConfigError, match="streamed"):
        streamed.ids()


@pytest.mark.parametrize("kind", ["parquet", "parquet-streamed", "webdataset"])
def test_each_rank_decodes_only_its_share_of_each_batch(kind, parquet, shards):
    make = _sources(parquet, shards)[kind]
    whole = [[i for i, _ in b] for b in itertools.islice(make().batches(4, seed=14), 4)]
    decoded, shares = [], []
    for rank in (0, 1):
        source = make()
        seen: list[str] = []
        decode = source.decode
        source.decode = lambda image_id, raw, d=decode, s=seen: (s.append(image_id), d(image_id, raw))[1]
        shares.append([[i for i, _ in b] for b in itertools.islice(
            source.batches(4, seed=14, rank=rank, world_size=2), 4)])
        decoded.append(seen)
    for rank in (0, 1):  # full shares; nothing decoded but what is returned and the corrupt one
        assert all(len(b) == 2 for b in shares[rank])
        assert len(decoded[rank]) == 8 + sum("broken" in i for i in decoded[rank])
    # Dealt in runs of 2: with the corrupt record not among the first four, the first shares
    # are the halves of the one-process batch.
    first = [i for i, _ in itertools.islice(make()._epoch(0, 14), 4)]
    assert not any("broken" in i for i in first)  # (seed 14 deals it later)
    assert shares[0][0] + shares[1][0] == whole[0] == first


def test_a_tar_shard_record_is_read_only_when_decoded(shards):
    source = WebDatasetImages(str(shards / "shard-*.tar"), shuffle_buffer=1)
    records = list(source._epoch(0, seed=0))
    assert all(callable(raw) for _, raw in records)  # nothing read yet but the tar headers
    (name, raw), = [r for r in records if r[0].endswith(":photo0")]
    assert raw() == dict(photo_records())["photo0"]
