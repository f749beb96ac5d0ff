"""``vlrm-shapes sweep --objectives ...`` / ``--rewards ...``: every estimator (or reward) x
every seed of the shapes demo, side by side, written as a markdown report
(``docs/estimators.md``, ``docs/rewards.md``).

Each run is a ``vlrm-shapes demo`` process (``--jobs`` of them at once, the CPU threads split
between them) with the base config, then ``configs/shapes/objectives/<name>.yaml`` (or
``configs/shapes/rewards/<name>.yaml``, or a fragment file given by path), then the command
line's overrides. Per run it keeps the demo's
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

CONFIGS = Path("configs") / "shapes"
#: The same folder in the source checkout this module runs from (when run elsewhere).
CHECKOUT_CONFIGS = Path(__file__).resolve().parents[3] / CONFIGS
#: Columns of the report: (label, how to read it from a run's record).
TRAILING = 50  # steps averaged for the training reward at a wall-clock time
LATE = 5  # late judgements averaged in the late-checkpoints table
LATE_KEYS = ("clip_recall/r1", "caption/invented_objects", "caption/repetition_rate")
JUDGE_KEY = "eval/clip_recall/r1"  # the judge during training (vlrm-shapes demo --demo.judge_every)


def fragment(name: str, kind: str = "objectives") -> Path:
    """A variant's config fragment: a file path, or a name in configs/shapes/<kind>."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    folders = (CONFIGS / kind, CHECKOUT_CONFIGS / kind)
    for folder in folders:
        if (folder / f"{name}.yaml").is_file():
            return folder / f"{name}.yaml"
    known = sorted({p.stem for folder in folders for p in folder.glob("*.yaml")})
    raise ConfigError(f"no {kind.removesuffix('s')} {name!r}: give a fragment file or one of "
                      f"{', '.join(known) or f'the files of {folders[0]} (run from the repository)'}")


def variant_name(name: str) -> str:
    """A variant's name in the report: the name, or a fragment file's stem."""
    return Path(name).stem if Path(name).suffix in (".yaml", ".yml") else name


def objective_fragment(name: str) -> Path:
    """The config fragment of an estimator: a file path, or a name in configs/shapes/objectives."""
    return fragment(name, "objectives")


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
    every = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in every if "time/step_s" in r]
    judgements = [r for r in every if JUDGE_KEY in r]  # demo.judge_every
    judged = [(r["step"], r[JUDGE_KEY]) for r in judgements]
    late = [{key: r[f"eval/{key}"] for key in LATE_KEYS} for r in judgements[-LATE:]]
    clock = sum(row["time/step_s"] for row in rows)
    curve = [(row["step"], row.get("reward/clip", row["reward/total"])) for row in rows]
    return {"summary": summary, "steps": len(rows), "train_s": clock,
            "s_per_step": clock / max(len(rows), 1), "wall_s": seconds, "peak_mib": peak_mib,
            "reward_curve": curve, "judge_curve": judged, "late": late}


def reward_at(curve: Sequence[Sequence[float]], step: float) -> float:
    """Mean training reward (the reward CLIP's score) of the ``TRAILING`` steps up to ``step``."""
    points = [r for s, r in curve if s <= step] or [curve[0][1]]
    return statistics.mean(points[-TRAILING:])


def judge_at(curve: Sequence[Sequence[float]], step: float) -> float | None:
    """Judge R@1 of the last judgement at or before ``step`` (None: not judged by then)."""
    points = [r for s, r in curve if s <= step]
    return points[-1] if points else None


def gap_share(summary: dict[str, dict[str, float]], key: str = "clip_recall/r1",
              value: float | None = None) -> float:
    """Share of the baseline-to-ceiling gap that RL closed (at ``value``, a judgement of
    ``key`` during the run; default the final one)."""
    base, ceiling = summary["baseline"][key], summary["ceiling"][key]
    value = summary["final"][key] if value is None else value
    return (value - base) / (ceiling - base) if ceiling != base else 0.0


def _cell(values: Sequence[float], digits: int = 3, higher_is_better: bool = True) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    worst = min(values) if higher_is_better else max(values)
    return (f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f} "
            f"(worst {worst:.{digits}f})")


def estimator_table(results: dict[str, dict[str, dict[str, Any]]],
                    timing: dict[str, dict[str, float]] | None = None) -> str:
    """The markdown table of a sweep: estimator -> seed -> run record.

    Args:
        results: The sweep's run records.
        timing: Estimator -> ``s_per_step`` and ``peak_mib`` measured apart, one run at a time
            (runs of a sweep share the CPU, so their own timings are not comparable); None =
            the sweep's own.

    The last columns compare at equal wall-clock: each estimator's training reward, and its
    judge R@1 (the last judgement by then, from runs with ``--demo.judge_every``; "-" when
    a run has none), after as many steps as it runs in the time the fastest one needs for
    all of its steps.
    """
    def speed(name: str, key: str, runs: list[dict[str, Any]]) -> float:
        if timing and name in timing:
            return timing[name][key]
        return (statistics.mean if key == "s_per_step" else max)(r[key] for r in runs)

    budget = min(speed(n, "s_per_step", list(runs.values())) * max(r["steps"] for r in runs.values())
                 for n, runs in results.items())
    header = ("| estimator | seeds | judge R@1 | share of gap | reward R@1 | grammar | "
              "n-gram repetition | invented objects | s / step | peak RSS (MiB) | "
              f"train reward at {budget:.0f} s | judge R@1 at {budget:.0f} s (step) |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for name, runs in results.items():
        rs = list(runs.values())
        final = [r["summary"]["final"] for r in rs]
        s_per_step = speed(name, "s_per_step", rs)
        lines.append(
            f"| {name} | {', '.join(s.removeprefix('seed') for s in runs)} | "
            f"{_cell([f['clip_recall/r1'] for f in final])} | "
            f"{_cell([gap_share(r['summary']) for r in rs], 2)} | "
            f"{_cell([f['reward_clip/r1'] for f in final])} | "
            f"{_cell([f['caption/grammar_rate'] for f in final])} | "
            f"{_cell([f['caption/repetition_rate'] for f in final], higher_is_better=False)} | "
            f"{_cell([f['caption/invented_objects'] for f in final], higher_is_better=False)} | "
            f"{s_per_step:.3f} | {speed(name, 'peak_mib', rs):.0f} | "
            f"{_cell([reward_at(r['reward_curve'], budget / s_per_step) for r in rs])} | "
            f"{_judged_cell(rs, budget / s_per_step)} |")
    first = next(iter(next(iter(results.values())).values()))["summary"]
    refs = []
    for ref in ("baseline", "ceiling", "oracle"):
        m = first[ref]
        refs.append(f"| ({ref}) | | {m['clip_recall/r1']:.3f} | | {m['reward_clip/r1']:.3f} | "
                    f"{m['caption/grammar_rate']:.3f} | {m['caption/repetition_rate']:.3f} | "
                    f"{m['caption/invented_objects']:.3f} | | | | |")
    return header + "\n".join(lines + refs) + "\n"


def late_table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    """Per seed and over the last ``LATE`` judgements (runs with ``--demo.judge_every``):
    the final checkpoint is one draw of a policy that still moves, so a bound that holds
    there may not hold one judgement earlier. "" when a run has fewer judgements."""
    if any(len(r.get("late", [])) < LATE for runs in results.values() for r in runs.values()):
        return ""

    def late(r: dict[str, Any], key: str) -> float:
        values = [row[key] for row in r["late"]]
        if key == "clip_recall/r1":
            values = [gap_share(r["summary"], key, v) for v in values]
        return statistics.mean(values)

    header = (f"| setting | share of gap per seed | share of gap, last {LATE} judgements | "
              f"invented objects per seed | invented objects, last {LATE} | "
              f"n-gram repetition, last {LATE} |\n|---|---|---|---|---|---|\n")
    lines = []
    for name, runs in results.items():
        rs = list(runs.values())
        shares = " / ".join(f"{gap_share(r['summary']):.2f}" for r in rs)
        invented = " / ".join(f"{r['summary']['final']['caption/invented_objects']:.3f}" for r in rs)
        lines.append(
            f"| {name} | {shares} | {_cell([late(r, 'clip_recall/r1') for r in rs], 2)} | "
            f"{invented} | "
            f"{_cell([late(r, 'caption/invented_objects') for r in rs], higher_is_better=False)} | "
            f"{_cell([late(r, 'caption/repetition_rate') for r in rs], higher_is_better=False)} |")
    return header + "\n".join(lines) + "\n"


def _judged_cell(runs: list[dict[str, Any]], steps: float) -> str:
    """Judge R@1 at ``steps`` over the runs, with the step it was judged at; "-" if unjudged."""
    values = [judge_at(r.get("judge_curve", []), steps) for r in runs]
    if any(v is None for v in values):
        return "-"
    at = {max(s for s, _ in r["judge_curve"] if s <= steps) for r in runs}
    return f"{_cell(values)} ({', '.join(str(s) for s in sorted(at))})"


def sweep_objectives(objectives: Sequence[str], seeds: Sequence[int], demo_args: Sequence[str],
                     out: Path, jobs: int = 1, kind: str = "objectives",
                     ) -> dict[str, dict[str, dict[str, Any]]]:
    """Run the demo for every variant (objective, or reward with ``kind="rewards"``) x seed
    (``jobs`` at once); the run records by variant and seed. Finished runs (with a
    ``sweep_run.json``) are not run again."""
    fragments = {variant_name(name): fragment(name, kind) for name in objectives}
    objectives = list(fragments)
    out.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // max(jobs, 1))
    work = [(name, seed) for seed in seeds for name in objectives]

    def one(item: tuple[str, int]) -> tuple[str, int, dict[str, Any]]:
        name, seed = item
        run_dir = out / name / f"seed{seed}"
        done = run_dir / "sweep_run.json"
        if done.is_file():  # measured before: read its outputs again (the format may be newer)
            kept = json.loads(done.read_text())
            return name, seed, run_record(run_dir, kept["wall_s"], kept["peak_mib"])
        run_dir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "vlrm_shapes.demo", "demo", *demo_args,
                   "--config", str(fragments[name]), f"--seed={seed}",
                   f"--output_dir={run_dir}", "--trainer.progress=false"]
        sys.stderr.write(f"vlrm-shapes sweep: {name} seed {seed} ({threads} thread(s))\n")
        code, seconds, peak = _run(command, run_dir / "demo.log", threads)
        if code != 0:
            raise RuntimeError(f"{name} seed {seed} exited {code}; see {run_dir / 'demo.log'}")
        record = run_record(run_dir, seconds, peak)
        done.write_text(json.dumps({k: v for k, v in record.items() if k != "reward_curve"}) + "\n")
        return name, seed, record

    results: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in objectives}
    with ThreadPoolExecutor(max_workers=max(jobs, 1)) as pool:
        for name, seed, record in pool.map(one, work):
            results[name][f"seed{seed}"] = record
    for name in objectives:  # seeds in the order given
        results[name] = {f"seed{s}": results[name][f"seed{s}"] for s in seeds}
    return results


def reward_table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    """The markdown table of a reward sweep: reward -> seed -> run record. The world's own
    hallucination measures beside the judge: attribute accuracy (stated attributes that are
    right), invented objects, repeats beyond the scene."""
    header = ("| reward | seeds | judge R@1 | share of gap | attribute accuracy | invented objects | "
              "repeats beyond scene | grammar | n-gram repetition | words | s / step |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for name, runs in results.items():
        rs = list(runs.values())
        final = [r["summary"]["final"] for r in rs]
        lines.append(
            f"| {name} | {', '.join(s.removeprefix('seed') for s in runs)} | "
            f"{_cell([f['clip_recall/r1'] for f in final])} | "
            f"{_cell([gap_share(r['summary']) for r in rs], 2)} | "
            f"{_cell([f['caption/attribute_accuracy'] for f in final])} | "
            f"{_cell([f['caption/invented_objects'] for f in final], higher_is_better=False)} | "
            f"{_cell([f['caption/repeats_beyond_scene'] for f in final], higher_is_better=False)} | "
            f"{_cell([f['caption/grammar_rate'] for f in final])} | "
            f"{_cell([f['caption/repetition_rate'] for f in final], higher_is_better=False)} | "
            f"{statistics.mean(f['caption/length'] for f in final):.1f} | "
            f"{statistics.mean(r['s_per_step'] for r in rs):.3f} |")
    first = next(iter(next(iter(results.values())).values()))["summary"]
    refs = [f"| ({ref}) | | {m['clip_recall/r1']:.3f} | | {m['caption/attribute_accuracy']:.3f} | "
            f"{m['caption/invented_objects']:.3f} | {m['caption/repeats_beyond_scene']:.3f} | "
            f"{m['caption/grammar_rate']:.3f} | {m['caption/repetition_rate']:.3f} | "
            f"{m['caption/length']:.1f} | |"
            for ref, m in ((r, first[r]) for r in ("baseline", "ceiling", "oracle"))]
    return header + "\n".join(lines + refs) + "\n"


def write_doc(path: Path, table: str, command: str, section: str = "",
              title: str = "Estimators side by side in the shapes world") -> None:
    """Put the table between the doc's markers ``<!-- sweep[:section]:begin -->`` and
    ``...:end -->`` (the prose around them stays), or start the doc."""
    name = f"sweep:{section}:" if section else "sweep:"
    begin, end = f"<!-- {name}begin -->", f"<!-- {name}end -->"
    block = (f"{begin}\nWritten by `{command}`.\n\n{table}{end}")
    if path.is_file() and begin in path.read_text() and end in path.read_text():
        text = path.read_text()
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = f"# {title}\n\n{block}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
