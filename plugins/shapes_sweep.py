"""``vlrm-shapes sweep --objectives ...``: every estimator x every seed of the shapes demo,
side by side, written as a markdown report (``docs/estimators.md``).

Each run is a ``vlrm-shapes demo`` process (``--jobs`` of them at once, the CPU threads split
between them) with the base config, then ``configs/shapes/objectives/<name>.yaml`` (or a
fragment file given by path), then the command line's overrides. Per run it keeps the demo's
``summary.json``, the seconds per step from ``metrics.jsonl``, and the process's peak
resident memory.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from vlrm.errors import ConfigError

FRAGMENTS = Path("configs") / "shapes" / "objectives"
#: The same folder in the source checkout this module runs from (when run elsewhere).
CHECKOUT_FRAGMENTS = Path(__file__).resolve().parent.parent / FRAGMENTS
#: Columns of the report: (label, how to read it from a run's record).
TRAILING = 50  # steps averaged for the training reward at a wall-clock time


def objective_fragment(name: str) -> Path:
    """The config fragment of an estimator: a file path, or a name in configs/shapes/objectives."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    for folder in (FRAGMENTS, CHECKOUT_FRAGMENTS):
        if (folder / f"{name}.yaml").is_file():
            return folder / f"{name}.yaml"
    known = sorted({p.stem for folder in (FRAGMENTS, CHECKOUT_FRAGMENTS) for p in folder.glob("*.yaml")})
    raise ConfigError(f"no objective {name!r}: give a fragment file or one of "
                      f"{', '.join(known) or f'the files of {FRAGMENTS} (run from the repository)'}")


def _run(command: list[str], log: Path, threads: int) -> tuple[int, float, float]:
    """Run one demo process; its exit status, wall-clock seconds and peak RSS in MiB."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    peak = usage.ru_maxrss / 1024 if sys.platform != "darwin" else usage.ru_maxrss / 2**20
    return proc.returncode, time.perf_counter() - start, peak


def run_record(run_dir: Path, seconds: float, peak_mib: float) -> dict[str, Any]:
    """What the report needs of one finished run."""
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time/step_s" in r]
    clock, curve = 0.0, []
    for row in rows:
        clock += row["time/step_s"]
        curve.append((clock, row.get("reward/clip", row["reward/total"])))
    return {"summary": summary, "steps": len(rows), "train_s": clock,
            "s_per_step": clock / max(len(rows), 1), "wall_s": seconds, "peak_mib": peak_mib,
            "reward_curve": curve[::10] + curve[-1:]}


def reward_at(curve: Sequence[Sequence[float]], seconds: float) -> float:
    """Mean training reward of the last logged points up to ``seconds`` of training."""
    points = [r for t, r in curve if t <= seconds] or [curve[0][1]]
    return statistics.mean(points[-max(TRAILING // 10, 1):])


def gap_share(summary: dict[str, dict[str, float]], key: str = "clip_recall/r1") -> float:
    """Share of the baseline-to-ceiling gap that RL closed."""
    base, ceiling = summary["baseline"][key], summary["ceiling"][key]
    return (summary["final"][key] - base) / (ceiling - base) if ceiling != base else 0.0


def _cell(values: Sequence[float], digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return (f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f} "
            f"(worst {min(values):.{digits}f})")


def estimator_table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    """The markdown tables of a sweep: estimator -> seed -> run record."""
    finished = [r for runs in results.values() for r in runs.values()]
    equal_clock = min(r["train_s"] for r in finished)
    header = ("| estimator | seeds | judge R@1 | share of gap | reward R@1 | grammar | "
              "n-gram repetition | invented objects | s / step | peak RSS (MiB) | "
              f"train reward at {equal_clock:.0f} s |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for name, runs in results.items():
        rs = list(runs.values())
        final = [r["summary"]["final"] for r in rs]
        lines.append(
            f"| {name} | {', '.join(s.removeprefix('seed') for s in runs)} | "
            f"{_cell([f['clip_recall/r1'] for f in final])} | "
            f"{_cell([gap_share(r['summary']) for r in rs], 2)} | "
            f"{_cell([f['reward_clip/r1'] for f in final])} | "
            f"{_cell([f['caption/grammar_rate'] for f in final])} | "
            f"{_cell([f['caption/repetition_rate'] for f in final])} | "
            f"{_cell([f['caption/invented_objects'] for f in final])} | "
            f"{statistics.mean(r['s_per_step'] for r in rs):.3f} | "
            f"{max(r['peak_mib'] for r in rs):.0f} | "
            f"{_cell([reward_at(r['reward_curve'], equal_clock) for r in rs])} |")
    first = finished[0]["summary"]
    refs = []
    for ref in ("baseline", "ceiling", "oracle"):
        m = first[ref]
        refs.append(f"| ({ref}) | | {m['clip_recall/r1']:.3f} | | {m['reward_clip/r1']:.3f} | "
                    f"{m['caption/grammar_rate']:.3f} | {m['caption/repetition_rate']:.3f} | "
                    f"{m['caption/invented_objects']:.3f} | | | |")
    return header + "\n".join(lines + refs) + "\n"


def sweep_objectives(objectives: Sequence[str], seeds: Sequence[int], demo_args: Sequence[str],
                     out: Path, jobs: int = 1) -> dict[str, dict[str, dict[str, Any]]]:
    """Run the demo for every objective x seed (``jobs`` at once); the run records by
    objective and seed. Finished runs (with a summary.json) are not run again."""
    fragments = {name: objective_fragment(name) for name in objectives}
    out.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // max(jobs, 1))
    work = [(name, seed) for seed in seeds for name in objectives]

    def one(item: tuple[str, int]) -> tuple[str, int, dict[str, Any]]:
        name, seed = item
        run_dir = out / name / f"seed{seed}"
        done = run_dir / "sweep_run.json"
        if done.is_file():
            return name, seed, json.loads(done.read_text())
        run_dir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "vlrm_plugins.shapes_demo", "demo", *demo_args,
                   "--config", str(fragments[name]), f"--seed={seed}",
                   f"--output_dir={run_dir}", "--trainer.progress=false"]
        sys.stderr.write(f"vlrm-shapes sweep: {name} seed {seed} ({threads} thread(s))\n")
        code, seconds, peak = _run(command, run_dir / "demo.log", threads)
        if code != 0:
            raise RuntimeError(f"{name} seed {seed} exited {code}; see {run_dir / 'demo.log'}")
        record = run_record(run_dir, seconds, peak)
        done.write_text(json.dumps(record) + "\n")
        return name, seed, record

    results: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in objectives}
    with ThreadPoolExecutor(max_workers=max(jobs, 1)) as pool:
        for name, seed, record in pool.map(one, work):
            results[name][f"seed{seed}"] = record
    for name in objectives:  # seeds in the order given
        results[name] = {f"seed{s}": results[name][f"seed{s}"] for s in seeds}
    return results


BEGIN, END = "<!-- sweep:begin -->", "<!-- sweep:end -->"


def write_doc(path: Path, table: str, command: str) -> None:
    """Put the tables between the doc's sweep markers (the prose around them stays), or
    start the doc."""
    block = (f"{BEGIN}\nWritten by `{command}`.\n\n{table}{END}")
    if path.is_file() and BEGIN in path.read_text() and END in path.read_text():
        text = path.read_text()
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = f"# Estimators side by side in the shapes world\n\n{block}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
