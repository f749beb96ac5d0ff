"""The A2C regression reference: metrics rows of a short run of configs/tiny.yaml.

``tests/data/a2c_tiny_metrics.jsonl`` was written by this script from the trainer before
the estimators became components (commit "Trainer: seed the value head ..."); the test in
tests/test_objectives.py runs the same command on today's code and compares every row.

    python tests/a2c_reference.py            # rewrite the reference (only on purpose)
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = Path(__file__).resolve().parent / "data" / "a2c_tiny_metrics.jsonl"
#: Metrics that measure the machine, not the run.
UNTIMED = ("time/step_s",)
ARGS = ("--config", "configs/tiny.yaml", "--trainer.max_steps", "5", "--trainer.save_every", "0",
        "--objective.init_args.whiten_advantages", "true", "--objective.init_args.ent_coef", "0.01",
        "--trainer.progress", "false")


def a2c_rows(output_dir: Path) -> list[dict]:
    """Run the reference command in this process; its metrics rows, without timings."""
    import os

    from vlrm.cli import run

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        assert run([*ARGS, "--output_dir", str(output_dir)]) == 0
    finally:
        os.chdir(cwd)
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in UNTIMED} for row in rows]


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        rows = a2c_rows(Path(tmp) / "run")
    REFERENCE.parent.mkdir(exist_ok=True)
    REFERENCE.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    print(f"wrote {len(rows)} rows to {REFERENCE}", file=sys.stderr)
