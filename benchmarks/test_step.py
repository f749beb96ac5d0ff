"""The full VLRM A2C step (images/s): rollout, ITM + reference-LM + penalty rewards, update."""

from __future__ import annotations

import tempfile

import pytest

from benchmarks.steps import naive_step, vlrm_step

TARGETS = {"small": 1.5}  # vs the TRL-style step, CPU (issue 6)


@pytest.fixture
def output_dir():
    with tempfile.TemporaryDirectory() as tmp:
        yield tmp


def test_a2c_step_vs_naive(compare, preset, output_dir):
    ours, naive = vlrm_step(preset, output_dir), naive_step(preset)
    compare(ours, naive, units=len(preset.images), unit="images", target=TARGETS.get(preset.name))
