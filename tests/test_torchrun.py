"""torchrun on CPU (gloo) through the vlrm-run command: two processes train the tiny config,
rank 0 alone writes the outputs, and a run killed mid-way resumes to the uninterrupted weights.
(The exact 1-rank = 2-rank equivalence of the training step is tests/test_distributed.py.)"""

import json

import pytest
import torch
from safetensors.torch import load_file

from test_distributed import torchrun

pytestmark = pytest.mark.slow


# DDP's run, kill and resume is the dataset-source test below (the default `parallel`).
@pytest.mark.parametrize("parallel", ["fsdp"])
def test_torchrun_run_killed_and_resumed_ends_with_the_uninterrupted_weights(tmp_path, parallel):
    def launch(out, *extra, kill_at=None):
        return torchrun(2, "-m", "vlrm.cli", "--config", "configs/tiny.yaml",
                        "--trainer.max_steps", "4", "--trainer.save_every", "2",
                        "--trainer.parallel", parallel, "--trainer.progress", "false",
                        "--output_dir", str(out), *extra,
                        extra_env={"VLRM_KILL_AT": kill_at} if kill_at else None)

    reference = launch(tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-3000:]
    # The uninterrupted run: rank 0 alone reports and writes, every step trained.
    assert reference.stdout.count("4 steps done") == 1
    out = tmp_path / "reference"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["reward/nonfinite"] == 0 and r["step/skipped"] == 0 for r in rows)
    meta = json.loads((out / "checkpoints" / "last" / "trainer_state.json").read_text())
    assert meta["step"] == 4 and meta["world_size"] == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last", "step-2", "step-4"]

    killed = launch(tmp_path / "run", kill_at="step:3")  # every rank dies at step 3
    assert killed.returncode != 0
    resumed = launch(tmp_path / "run", "--resume", "true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after step 2" in resumed.stdout
    for name in ("trainable.safetensors", "value_head.safetensors", "policy/model.safetensors"):
        expected = load_file(str(tmp_path / "reference" / "checkpoints" / "last" / name))
        got = load_file(str(tmp_path / "run" / "checkpoints" / "last" / name))
        assert set(got) == set(expected)
        assert all(torch.equal(got[k], expected[k]) for k in expected), name


@pytest.mark.parametrize("source", ["parquet-streamed", "webdataset"])
def test_a_dataset_source_trains_on_two_ranks_and_resumes_exactly_after_sigkill(tmp_path, source):
    # Real photos with a corrupt record among them, as a streamed parquet dataset or as
    # WebDataset shards; two ranks; killed at step 3 (after the step-2 checkpoint), resumed.
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from image_records import photo_records, write_parquet, write_shards

    if source == "webdataset":
        root = write_shards(tmp_path / "data", photo_records())
        data = {"class_path": "webdataset",
                "init_args": {"shards": str(root / "shard-*.tar"), "shuffle_buffer": 4}}
    else:
        root = write_parquet(tmp_path / "data", photo_records())
        data = {"class_path": "hf_dataset",
                "init_args": {"path": "parquet", "data_files": str(root / "*.parquet"),
                              "image_column": "img", "id_column": "name", "streaming": True,
                              "shuffle_buffer": 4}}

    def launch(out, *extra, kill_at=None):
        return torchrun(2, "-m", "vlrm.cli", "--config", "configs/tiny.yaml",
                        f"--data={json.dumps(data)}",
                        "--trainer.max_steps", "4", "--trainer.save_every", "2",
                        "--trainer.progress", "false", "--output_dir", str(out), *extra,
                        extra_env={"VLRM_KILL_AT": kill_at} if kill_at else None)

    reference = launch(tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-3000:]
    # DDP (the default): rank 0 alone reports and writes
    assert reference.stdout.count("4 steps done") == 1
    meta = json.loads((tmp_path / "reference" / "checkpoints" / "last" / "trainer_state.json")
                      .read_text())
    assert meta["step"] == 4 and meta["world_size"] == 2 and meta["parallel"] == "ddp"
    assert sorted(p.name for p in (tmp_path / "reference" / "checkpoints").iterdir()) == [
        "last", "step-2", "step-4"]
    killed = launch(tmp_path / "run", kill_at="step:3")
    assert killed.returncode != 0
    resumed = launch(tmp_path / "run", "--resume", "true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after step 2" in resumed.stdout
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(line) for line in
                (tmp_path / "reference" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # 8 good photos, 4 a step: the corrupt record is met (and counted) in the first epoch.
    assert ref_rows[-1]["data/skipped"] == 1 and rows[-1]["data/skipped"] == 1
    for row, ref in zip(rows, ref_rows):
        assert row["reward/total"] == ref["reward/total"] and row["loss/total"] == ref["loss/total"]
    for name in ("trainable.safetensors", "value_head.safetensors", "policy/model.safetensors"):
        expected = load_file(str(tmp_path / "reference" / "checkpoints" / "last" / name))
        got = load_file(str(tmp_path / "run" / "checkpoints" / "last" / name))
        assert set(got) == set(expected)
        assert all(torch.equal(got[k], expected[k]) for k in expected), name
