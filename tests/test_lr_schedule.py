"""Learning-rate schedules: warm-up, then constant, linear or cosine decay (trainer.lr_schedule)."""

import json
import math
from pathlib import Path

import pytest

from vlrm.errors import ConfigError
from vlrm.trainer import TrainerConfig, lr_factor

ROOT = Path(__file__).resolve().parent.parent


def test_lr_factor_by_hand():
    # warm-up of 2 then decay over the 8 remaining updates of 10
    assert [lr_factor(s, 2, 10, "constant") for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    assert [lr_factor(s, 2, 10, "linear") for s in (0, 1, 2, 6, 9)] == [0.5, 1.0, 1.0, 0.5, 0.125]
    cosine = [lr_factor(s, 2, 10, "cosine") for s in (2, 4, 6, 8, 9)]
    want = [1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4)),
            0.5 * (1 + math.cos(7 * math.pi / 8))]
    assert cosine == pytest.approx(want)
    # no warm-up: the first update runs at the full rate; past max_steps (a resumed run that
    # was extended) the decay stays at 0 instead of turning negative or back up
    assert lr_factor(0, 0, 4, "linear") == 1.0 and lr_factor(7, 0, 4, "linear") == 0.0
    assert lr_factor(7, 0, 4, "cosine") == pytest.approx(0.0)


def test_unknown_schedule_is_named():
    with pytest.raises(ConfigError, match="trainer.lr_schedule must be one of constant, linear, cosine"):
        TrainerConfig(lr_schedule="step")


def test_a_run_logs_the_decayed_rate_every_step(tmp_path, monkeypatch):
    from vlrm.cli import run

    monkeypatch.chdir(ROOT)
    assert run(["--config", "configs/tiny.yaml", "--trainer.max_steps", "4",
                "--trainer.save_every", "0", "--trainer.progress", "false",
                "--trainer.lr_schedule", "linear", "--output_dir", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    base = rows[0]["lr/policy"]
    # the rate each update ran at: 1, 3/4, 1/2, 1/4 of the configured one
    assert [row["lr/policy"] / base for row in rows] == pytest.approx([1.0, 0.75, 0.5, 0.25])
