"""pytest-benchmark fixtures: presets, and side-by-side timing against the naive baselines.

    pytest benchmarks/                       # tiny and small presets (and paper on a GPU)
    pytest benchmarks/ --quick               # tiny preset, one round: the CI smoke run
    pytest benchmarks/ --preset small --benchmark-json out.json --results-md table.md

Every comparison alternates: each timed round of vlrm's path is preceded by one round of
the baseline (pytest-benchmark's ``setup`` hook), so both see the same machine state.
Ratios (baseline time / vlrm time) are printed at the end and stored in ``extra_info``.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from benchmarks.presets import PRESETS, build_preset  # noqa: E402
from benchmarks.timing import sync  # noqa: E402

RESULTS: list[dict[str, Any]] = []


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("vlrm benchmarks")
    group.addoption("--quick", action="store_true",
                    help="tiny preset, one round per benchmark: checks the suite runs")
    group.addoption("--preset", action="append", choices=PRESETS,
                    help="preset(s) to run [default: tiny and small; paper too on a GPU]")
    group.addoption("--rounds", type=int, default=5, help="timed rounds per benchmark [5]")
    group.addoption("--results-md", default=None, help="write the ratio table here as markdown")


def selected_presets(config: pytest.Config) -> list[str]:
    if config.getoption("--quick"):
        return ["tiny"]
    chosen = config.getoption("--preset")
    if chosen:
        return chosen
    return ["tiny", "small"] + (["paper"] if torch.cuda.is_available() else [])


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "preset_name" in metafunc.fixturenames:
        metafunc.parametrize("preset_name", selected_presets(metafunc.config), scope="session")


_BUILT: dict[str, Any] = {}


@pytest.fixture(scope="session")
def preset(preset_name: str) -> Any:
    """The models of one preset, built once per session."""
    if preset_name not in _BUILT:
        _BUILT.clear()  # one preset in memory at a time
        torch.manual_seed(0)
        _BUILT[preset_name] = build_preset(preset_name)
    return _BUILT[preset_name]


def _timed(fn: Callable[[], Any], into: list[float]) -> Callable[[], Any]:
    def run() -> Any:
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        into.append(time.perf_counter() - start)
        return out
    return run


@pytest.fixture
def compare(benchmark: Any, request: pytest.FixtureRequest) -> Callable[..., float]:
    """``compare(ours, baseline, units=..., unit=..., target=...)`` -> speed-up ratio.

    Runs one untimed warm-up of each, then ``--rounds`` rounds alternating baseline and
    vlrm; pytest-benchmark records vlrm's rounds, the baseline's medians go to
    ``extra_info``. ``extra(vlrm_median_s)`` adds figures to the row (e.g. tokens/s). With
    ``target`` set, the benchmark fails when the ratio is below it.
    """
    rounds = rounds_of(request.config)

    def run(ours: Callable[[], Any], baseline: Callable[[], Any], *, units: int, unit: str,
            target: float | None = None, baseline_name: str = "naive",
            extra: Callable[[float], dict[str, Any]] | None = None) -> float:
        ours_s: list[float] = []
        base_s: list[float] = []
        baseline()
        ours()
        timed_baseline = _timed(baseline, base_s)

        def setup() -> None:  # pytest-benchmark reads a returned value as arguments
            timed_baseline()

        benchmark.pedantic(_timed(ours, ours_s), setup=setup, rounds=rounds, iterations=1)
        row = ratio_row(request.node.name, ours_s, base_s, units=units, unit=unit, target=target,
                        baseline_name=baseline_name, extra=extra)
        benchmark.extra_info.update(row)
        return row["ratio"]

    return run


def rounds_of(config: pytest.Config) -> int:
    """Timed rounds per benchmark: one with ``--quick``, else ``--rounds``."""
    return 1 if config.getoption("--quick") else config.getoption("--rounds")


def ratio_row(name: str, ours_s: list[float], base_s: list[float], *, units: int, unit: str,
              target: float | None = None, baseline_name: str = "naive",
              extra: Callable[[float], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Median times of alternating rounds -> one row of the results table (stored); with
    ``target`` set, fails when vlrm is less than that many times faster."""
    ours_med, base_med = statistics.median(ours_s), statistics.median(base_s)
    ratio = base_med / ours_med
    row = {"benchmark": name, "baseline": baseline_name,
           "vlrm_s": ours_med, "baseline_s": base_med, "ratio": ratio, "target": target,
           "unit": unit, "vlrm_per_s": units / ours_med, "baseline_per_s": units / base_med,
           "rounds": len(ours_s), **(extra(ours_med) if extra else {})}
    RESULTS.append(row)
    if target is not None:
        assert ratio >= target, f"{name}: {ratio:.2f}x the {baseline_name} baseline, target {target}x"
    return row


@pytest.fixture
def record(request: pytest.FixtureRequest) -> Callable[..., None]:
    """Store measured figures that are not timings (e.g. memory) in the results table."""
    def run(**figures: Any) -> None:
        RESULTS.append({"benchmark": request.node.name, **figures})
    return run


def machine() -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
            f"(torch threads {torch.get_num_threads()}), {gpu}; torch {torch.__version__}")


_COLUMNS = {"benchmark", "baseline", "vlrm_s", "baseline_s", "ratio", "target", "unit",
            "vlrm_per_s", "baseline_per_s", "rounds"}


def results_markdown() -> str:
    lines = [f"Machine: {machine()}. Date: {time.strftime('%Y-%m-%d')}.", "",
             "| benchmark | baseline | vlrm | baseline time | ratio | target | throughput (vlrm / baseline) | other |",
             "|---|---|---|---|---|---|---|---|"]
    other = []
    for r in RESULTS:
        if "ratio" not in r:
            other.append(r)
            continue
        target = f">= {r['target']}x" if r["target"] else "-"
        met = "" if not r["target"] else (" (met)" if r["ratio"] >= r["target"] else " (MISSED)")
        lines.append(f"| {r['benchmark']} | {r['baseline']} | {r['vlrm_s'] * 1e3:.1f} ms | "
                     f"{r['baseline_s'] * 1e3:.1f} ms | {r['ratio']:.2f}x{met} | {target} | "
                     f"{r['vlrm_per_s']:.1f} / {r['baseline_per_s']:.1f} {r['unit']}/s | "
                     + ", ".join(f"{k}: {r[k]}" for k in r if k not in _COLUMNS) + " |")
    if other:
        lines += ["", "| benchmark | figures |", "|---|---|"]
        lines += [f"| {r['benchmark']} | " + ", ".join(f"{k}: {v}" for k, v in r.items()
                                                        if k != "benchmark") + " |" for r in other]
    return "\n".join(lines) + "\n"


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    if not RESULTS:
        return
    table = results_markdown()
    terminalreporter.write_sep("=", "vlrm: speed-ups against the baselines")
    terminalreporter.write(table)
    path = config.getoption("--results-md")
    if path:
        with open(path, "w") as f:
            f.write(table)
