"""Real photos as encoded records (one corrupt among them), written as a parquet file and as
WebDataset tar shards: the inputs of the image-source tests."""

import io
import tarfile
from pathlib import Path

CORRUPT = b"\x89PNG\r\n\x1a\n this is not a png"


def photo_records(count: int = 8, size: tuple[int, int] = (48, 40)) -> list[tuple[str, bytes]]:
    """``count`` of scikit-image's bundled photos as (name, PNG or JPEG bytes), resized,
    with a corrupt record named ``broken`` fourth."""
    from vlrm_plugins.bundled_photos import bundled_photos

    folder = bundled_photos()
    out = []
    for i, path in enumerate(folder.paths[:count]):
        buf = io.BytesIO()
        folder.load(path).resize(size).save(buf, format="PNG" if i % 2 else "JPEG")
        out.append((f"photo{i}", buf.getvalue()))
    out.insert(3, ("broken", CORRUPT))
    return out


def write_parquet(root: Path, records: list[tuple[str, bytes]]) -> Path:
    """One parquet file with columns ``name`` and ``img`` (an Image feature)."""
    import datasets

    features = datasets.Features({"name": datasets.Value("string"), "img": datasets.Image()})
    ds = datasets.Dataset.from_dict(
        {"name": [n for n, _ in records], "img": [{"bytes": b, "path": None} for _, b in records]},
        features=features)
    root.mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(root / "part-0.parquet"))
    return root


def write_shards(root: Path, records: list[tuple[str, bytes]], shards: int = 3) -> Path:
    """WebDataset shards ``shard-NNN.tar``: each record as ``<name>.jpg`` + ``<name>.txt``."""
    root.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with tarfile.open(root / f"shard-{s:03d}.tar", "w") as tar:
            for name, data in records[s::shards]:
                for suffix, payload in (("jpg", data), ("txt", name.encode())):
                    info = tarfile.TarInfo(f"{name}.{suffix}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return root
