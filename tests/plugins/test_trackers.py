"""Trackers: what a run logs is read back with the tracker's own library."""

import json
import warnings
from pathlib import Path

import pytest

from vlrm.cli import run
from vlrm.trackers import Trackers

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("objective", ["a2c", "grpo"])
def test_tensorboard_holds_every_steps_scalars_and_the_sample_table(tmp_path, objective):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert run(["--config", TINY, f"--objective.class_path={objective}",
                "--trainer.max_steps=3", "--trainer.save_every=0", "--trainer.progress=false",
                "--trainer.samples_every=2", '--loggers={"tb": {"class_path": "tensorboard"}}',
                f"--output_dir={out}"]) == 0
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    rows = _rows(out)
    for key in ("reward/total", "loss/total", "reward/clip"):
        logged = events.Scalars(key)
        assert [e.step for e in logged] == [1, 2, 3], key
        assert [e.value for e in logged] == pytest.approx([r[key] for r in rows], rel=1e-6), key
    # The sample table at step 2: one picture per image, a markdown row per caption.
    images = [t for t in events.Tags()["images"] if t.startswith("samples/")]
    assert len(images) == 4  # 4 images a step, 2 captions each
    assert {e.step for t in images for e in events.Images(t)} == {2}
    assert events.Images(images[0])[0].width > 0
    (table,) = [e for e in events.Tensors("samples/text_summary") if e.step == 2]
    text = table.tensor_proto.string_val[0].decode()
    assert "| row | image | caption | reward | clip | advantage |" in text
    assert text.count("\n") == 2 + 8 - 1  # header, rule, 8 captions
    advantages = [line.rsplit("|", 2)[-2].strip() for line in text.splitlines()[2:]]
    if objective == "grpo":  # group advantages are known before the loss
        assert all(a and abs(float(a)) < 10 for a in advantages)
    else:  # A2C's need the critic's values of the loss's forward
        assert all(a == "" for a in advantages)
    assert "config" in "".join(events.Tags()["tensors"])


def test_a_failing_tracker_is_dropped_with_a_warning_and_the_others_go_on():
    class Broken:
        def open(self, output_dir, config, step): ...
        def log_metrics(self, step, metrics): raise OSError("disk full")
        def log_samples(self, step, samples): ...
        def close(self): ...

    class Recorder:
        def __init__(self): self.steps = []
        def open(self, output_dir, config, step): ...
        def log_metrics(self, step, metrics): self.steps.append(step)
        def log_samples(self, step, samples): ...
        def close(self): ...

    good = Recorder()
    trackers = Trackers({"broken": Broken(), "good": good})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in (1, 2):
            trackers.log_metrics(step, {"x": 1.0})
    assert good.steps == [1, 2] and list(trackers.loggers) == ["good"]
    assert any("'broken'" in str(w.message) and "disk full" in str(w.message) for w in caught)


def test_mlflow_local_store_holds_the_scalars_images_and_sample_table_and_resume_continues(tmp_path):
    from mlflow import MlflowClient

    out = tmp_path / "run"
    common = ["--config", TINY, "--objective.class_path=grpo", "--trainer.save_every=2",
              "--trainer.progress=false", "--trainer.samples_every=2",
              '--loggers={"ml": {"class_path": "mlflow"}}', f"--output_dir={out}"]
    assert run([*common, "--trainer.max_steps=2"]) == 0
    assert run([*common, "--trainer.max_steps=4", "--resume=true"]) == 0  # the same MLflow run
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "vlrm"]
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.run_id == (out / "mlflow_run_id").read_text().strip()
    rows = _rows(out)
    history = client.get_metric_history(found.info.run_id, "reward.total")  # "/" -> "." in a file store
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert [m.value for m in history] == pytest.approx([r["reward/total"] for r in rows], rel=1e-6)
    table = json.loads(Path(client.download_artifacts(found.info.run_id, "samples.json",
                                                      str(tmp_path / "dl"))).read_text())
    columns = table["columns"]
    assert {"step", "image_id", "caption", "reward", "reward/clip", "advantage"} <= set(columns)
    steps = [row[columns.index("step")] for row in table["data"]]
    assert steps == [2] * 8 + [4] * 8  # both sample tables, the second after the resume
    images = [a.path for a in client.list_artifacts(found.info.run_id, "images")]
    assert images  # the sampled pictures, one per image of the table


def _wandb_records(path: Path):
    """The records of a W&B run file (``run-<id>.wandb``), decoded with W&B's own protobuf
    schema. The file is a 7-byte header (``:W&B``, magic, version) and then LevelDB's log
    format: 32 KiB blocks of chunks, each a 7-byte header (CRC32, length, kind: 1 full,
    2 first, 3 middle, 4 last) and its bytes."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, block, pos, parts = path.read_bytes(), 32768, 7, []
    assert data[:4] == b":W&B", path
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        parts.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


def test_wandb_offline_run_holds_the_scalars_and_sample_table_and_resume_continues(tmp_path,
                                                                                  monkeypatch):
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    common = ["--config", TINY, "--objective.class_path=grpo", "--trainer.save_every=2",
              "--trainer.progress=false", "--trainer.samples_every=2",
              '--loggers={"wb": {"class_path": "wandb", "init_args": {"mode": "offline"}}}',
              f"--output_dir={out}"]
    assert run([*common, "--trainer.max_steps=2"]) == 0
    assert run([*common, "--trainer.max_steps=4", "--resume=true"]) == 0  # the same W&B run
    run_id = (out / "wandb_run_id").read_text().strip()
    folders = sorted((out / "wandb").glob("offline-run-*"))
    assert [f.name.rsplit("-", 1)[1] for f in folders] == [run_id, run_id]
    logged: dict[int, dict] = {}
    for folder in folders:
        for record in _wandb_records(folder / f"run-{run_id}.wandb"):
            if record.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                         for i in record.history.item}
                logged.setdefault(record.history.step.num, {}).update(items)
    rows = _rows(out)
    assert sorted(logged) == [1, 2, 3, 4]
    for key in ("reward/total", "loss/total", "reward/clip"):
        assert [logged[s][key] for s in (1, 2, 3, 4)] == pytest.approx([r[key] for r in rows],
                                                                       rel=1e-6), key
    # the sample tables of steps 2 and 4, one row per caption (4 images x 2 captions)
    tables = sorted(p for f in folders for p in (f / "files" / "media" / "table").glob("*.json"))
    assert len(tables) == 2
    for path, step in zip(tables, (2, 4)):
        table = json.loads(path.read_text())
        columns = table["columns"]
        assert columns[:3] == ["step", "image_id", "image"]
        assert {"caption", "reward", "reward/clip", "advantage"} <= set(columns)
        assert [row[0] for row in table["data"]] == [step] * 8
        assert all(row[columns.index("caption")] for row in table["data"])
        assert logged[step]["samples/_type"] == "table-file"  # nested keys flattened
    pictures = [p for f in folders for p in (f / "files" / "media" / "images").rglob("*.png")]
    assert len(pictures) == 2 * 4  # each table's four pictures


READ_TRACKIO = """
import json, sys
from trackio.sqlite_storage import SQLiteStorage
project, name = sys.argv[1:3]
print(json.dumps({"runs": SQLiteStorage.get_runs(project),
                  "logs": SQLiteStorage.get_logs(project, name)}, default=str))
"""


def test_trackio_local_store_holds_the_scalars_and_sample_table_and_resume_continues(tmp_path):
    """Trackio fixes its store's folder (TRACKIO_DIR) when imported: the run and the reading
    back each go in a process of their own."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "run"
    common = [sys.executable, "-m", "vlrm.cli", "--config", TINY, "--objective.class_path=grpo",
              "--trainer.save_every=2", "--trainer.progress=false", "--trainer.samples_every=2",
              '--loggers={"tr": {"class_path": "trackio", "init_args": {"project": "captions"}}}',
              f"--output_dir={out}"]
    for extra in (["--trainer.max_steps=2"], ["--trainer.max_steps=4", "--resume=true"]):
        done = subprocess.run([*common, *extra], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
    name = (out / "trackio_run").read_text().strip()
    assert name == "run"
    read = subprocess.run([sys.executable, "-c", READ_TRACKIO, "captions", name], env=env,
                          capture_output=True, text=True)
    assert read.returncode == 0, read.stderr[-2000:]
    store = json.loads(read.stdout.strip().splitlines()[-1])
    assert store["runs"] == [name]  # the resumed run continued, no second run
    logged = {}
    for entry in store["logs"]:
        logged.setdefault(entry["step"], {}).update(entry)
    rows = _rows(out)
    assert sorted(logged) == [1, 2, 3, 4]
    for key in ("reward/total", "loss/total", "reward/clip"):
        assert [logged[s][key] for s in (1, 2, 3, 4)] == pytest.approx([r[key] for r in rows],
                                                                       rel=1e-6), key
    for step in (2, 4):  # the sample tables, one row per caption (4 images x 2 captions)
        table = logged[step]["samples"]
        assert table["_type"] == "trackio.table"
        data = table["_value"]
        assert len(data) == 8 and [r["step"] for r in data] == [step] * 8
        assert {"image_id", "image", "caption", "reward", "reward/clip", "advantage"} <= set(data[0])
        assert all(r["caption"] for r in data)
