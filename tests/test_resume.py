"""Kill a run with SIGKILL (between checkpoints and inside a save), resume it with
``vlrm-run --resume``, and get bit-for-bit the weights of a run that was never interrupted.

The runs are real ``vlrm-run`` processes on configs/tiny.yaml; ``VLRM_KILL_AT`` makes the
process SIGKILL itself at a named point (``vlrm.faults``), with no chance to clean up.
"""

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
STEPS, SAVE_EVERY = 8, 2
pytestmark = pytest.mark.slow


def vlrm_run(out: Path, *extra: str, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("VLRM_KILL_AT", None)
    if kill_at:
        env["VLRM_KILL_AT"] = kill_at
    cmd = [sys.executable, "-m", "vlrm.cli", "--config", "configs/tiny.yaml",
           "--trainer.max_steps", str(STEPS), "--trainer.save_every", str(SAVE_EVERY),
           "--trainer.keep_last", "2", "--trainer.progress", "false",
           "--output_dir", str(out), *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    last = out / "checkpoints" / "last"
    weights = {f"trainable/{k}": v for k, v in load_file(str(last / "trainable.safetensors")).items()}
    weights.update({f"value/{k}": v for k, v in load_file(str(last / "value_head.safetensors")).items()})
    weights.update({f"policy/{k}": v for k, v in load_file(str(last / "policy" / "model.safetensors")).items()})
    return weights


def metric_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_after_sigkill_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    reference = tmp_path / "reference"
    assert vlrm_run(reference).returncode == 0

    # Kill points drawn at random (seeded, so a failure can be replayed): one between
    # checkpoints, one inside a save, one more between checkpoints later on.
    rng = random.Random(0)
    between = [s for s in range(1, STEPS) if s % SAVE_EVERY]
    saves = [s for s in range(SAVE_EVERY, STEPS, SAVE_EVERY)]
    first, in_save = rng.choice(between[:2]), rng.choice(saves[1:])
    later = rng.choice([s for s in between if s > in_save])
    kills = [f"step:{first}", f"save:{in_save}", f"step:{later}"]

    run = tmp_path / "killed"
    for i, kill in enumerate(kills):
        proc = vlrm_run(run, *(["--resume", "true"] if i else []), kill_at=kill)
        assert proc.returncode == -signal.SIGKILL, (kill, proc.stderr[-2000:])
        checkpoints = run / "checkpoints"
        last = (checkpoints / "last").resolve()
        # `last` always names a complete checkpoint, never the one being written.
        assert (last / "trainer_state.json").is_file() and (last / "trainable.safetensors").is_file()
        if kill.startswith("save:"):
            step = int(kill.split(":")[1])
            assert last.name == f"step-{step - SAVE_EVERY}"
            assert any(p.name.startswith(f".step-{step}.partial") for p in checkpoints.iterdir())
    proc = vlrm_run(run, "--resume", "true")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resuming after step" in proc.stdout

    expected, got = final_weights(reference), final_weights(run)
    assert set(got) == set(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    # metrics.jsonl holds every step once, with the uninterrupted run's values.
    rows, ref_rows = metric_rows(run), metric_rows(reference)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for row, ref in zip(rows, ref_rows):
        assert row["reward/total"] == ref["reward/total"] and row["loss/total"] == ref["loss/total"]
    # Stale partial folders of killed saves are cleared once a later save succeeds.
    assert not [p for p in (run / "checkpoints").iterdir() if ".partial" in p.name]


def in_process(out: Path, *extra: str) -> int:
    """``vlrm-run`` as ``vlrm_run`` runs it, in this process (for the tests that kill nothing)."""
    from vlrm.cli import run

    return run(["--config", str(ROOT / "configs" / "tiny.yaml"), "--trainer.max_steps", str(STEPS),
                "--trainer.save_every", str(SAVE_EVERY), "--trainer.keep_last", "2",
                "--trainer.progress", "false", "--output_dir", str(out), *extra])


def test_resume_without_a_checkpoint_starts_at_step_zero(tmp_path, capsys):
    # What a run killed before its first checkpoint leaves: rows, the last one half-written.
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "metrics.jsonl").write_text('{"step": 1, "loss/total": 9}\n{"step": 2, "lo')
    assert in_process(tmp_path / "fresh", "--resume", "true", "--trainer.max_steps", "1") == 0
    assert "no checkpoint" in capsys.readouterr().out
    assert [r["step"] for r in metric_rows(tmp_path / "fresh")] == [1]


class Exploit:
    """Unpickling this runs a shell command: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_resume_refuses_a_changed_batch_size_and_a_checkpoint_that_unpickles_code(tmp_path, capsys):
    out = tmp_path / "run"
    assert in_process(out, "--trainer.max_steps", "2") == 0
    assert in_process(out, "--resume", "true", "--trainer.images_per_step", "2") == 2
    err = capsys.readouterr().err
    assert "images_per_step" in err and "Traceback" not in err

    marker = tmp_path / "pwned"
    state = out / "checkpoints" / "last" / "trainer_state.pt"
    torch.save({"optimizer": Exploit(marker)}, state)
    assert in_process(out, "--resume", "true") == 2
    err = capsys.readouterr().err
    assert "refused" in err and "trainer_state.pt" in err and "Traceback" not in err
    assert not marker.exists()  # nothing in the file ran


PPO_CLIP = """\
objective:
  class_path: vlrm_plugins.estimators.PPOClip
  init_args:
    estimator:
      class_path: vlrm.objective.A2C
      init_args: {value_lr: 1.0e-3, whiten_advantages: true}
    epochs: 2
    minibatches: 2
    kl_coef: 0.05
"""


def test_a_ppo_clip_run_resumed_after_sigkill_is_bit_identical(tmp_path):
    """PPO-clip over A2C: several updates per step over strided minibatches, the value
    head, the k3 penalty's reference snapshot; killed inside the step-4 save, so the resumed
    run goes on from step 2 across a checkpoint it writes itself."""
    objective = tmp_path / "ppo_clip.yaml"
    objective.write_text(PPO_CLIP)
    # No image-embedding cache: images met again after the resume would otherwise be
    # embedded in other batches than the uninterrupted run embedded them in (last-bit float
    # differences; see the README's resume section).
    steps = ("--config", str(objective), "--trainer.max_steps", "5",
             "--reward.terms.clip.reward.init_args.cache_size", "0")
    reference = tmp_path / "reference"
    assert vlrm_run(reference, *steps).returncode == 0
    run = tmp_path / "killed"
    proc = vlrm_run(run, *steps, kill_at="save:4")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    proc = vlrm_run(run, *steps, "--resume", "true")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resuming after step 2" in proc.stdout
    expected, got = final_weights(reference), final_weights(run)
    assert set(got) == set(expected) and any(k.startswith("value/") for k in got)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    rows, ref_rows = metric_rows(run), metric_rows(reference)
    assert [r["step"] for r in rows] == list(range(1, 6))
    for row, ref in zip(rows, ref_rows):
        for key in ("loss/total", "ppo/clip_fraction", "ppo/approx_kl", "loss/kl"):
            assert row[key] == ref[key], key
    assert json.loads((run / "checkpoints" / "last" / "trainer_state.json").read_text())[
        "objective"] == "PPOClip"

    # ... and the checkpoint refuses to resume under another estimator.
    proc = vlrm_run(run, "--trainer.max_steps", "6", "--resume", "true")
    assert proc.returncode == 2 and "objective PPOClip" in proc.stderr, proc.stderr[-2000:]
