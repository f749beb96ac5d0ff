"""Where one training step's time goes: ``torch.profiler`` over vlrm's step, by phase.

    python -m benchmarks.profile --preset small --images 16 --objective grpo
    python -m benchmarks.profile --preset small --objective a2c --md profile.md
    python -m benchmarks.profile --preset small --captioner llava --images 8

The trainer and sampler mark their phases with ``record_function`` (``vlrm.sample`` =
``vlrm.prefill`` + ``vlrm.decode`` + the vision tower and caption decoding, ``vlrm.reward``
and one ``vlrm.reward.<term>`` per term, ``vlrm.prepare`` (advantages, and A2C's values),
``vlrm.score`` (the policy's forward with gradients and the loss), ``vlrm.backward``
(backward and gradient clipping), ``vlrm.optimizer``); "rest of the step" is the step's wall
time not inside any of them (metrics, Python). One warm-up step, then the median of
``--steps`` profiled steps; the heaviest operators of the last one follow.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any

import attrs
import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.presets import PRESETS, build_preset, long_prompt_captioner, with_images
from benchmarks.steps import vlrm_grpo_step, vlrm_step
from benchmarks.timing import emit

#: Phases in the order a step runs them; nested ones are indented in the table.
PHASES = ("vlrm.sample", "  vlrm.prefill", "  vlrm.decode", "vlrm.reward", "vlrm.prepare",
          "vlrm.score", "vlrm.backward", "vlrm.optimizer")
TOP_LEVEL = tuple(p for p in PHASES if not p.startswith(" "))


def phase_seconds(events: Any) -> dict[str, float]:
    """Wall seconds of each ``record_function`` range named ``vlrm.*`` in a profile (summed
    over its calls)."""
    out: dict[str, float] = {}
    for event in events:
        if event.name.startswith("vlrm."):
            out[event.name] = out.get(event.name, 0.0) + event.time_range.elapsed_us() / 1e6
    return out


def profile_steps(step: Any, steps: int) -> tuple[list[float], list[dict[str, float]], Any]:
    """Wall time and phase times of ``steps`` profiled calls of ``step``, and the last profile."""
    walls, phases, last = [], [], None
    for _ in range(steps):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            step()
            walls.append(time.perf_counter() - start)
        phases.append(phase_seconds(prof.events()))
        last = prof
    return walls, phases, last


def markdown(title: str, walls: list[float], phases: list[dict[str, float]], prof: Any,
             top: int = 12) -> str:
    wall = statistics.median(walls)
    names = sorted({n for p in phases for n in p} - {p.strip() for p in PHASES})
    rows = [p for p in PHASES] + [f"  {n}" for n in names if n.startswith("vlrm.reward.")]
    lines = [f"### {title}", "", f"Median of {len(walls)} profiled steps: **{wall:.2f} s** a step.", "",
             "| phase | seconds | share |", "|---|---|---|"]
    order = []
    for row in PHASES:
        order.append(row)
        if row == "vlrm.reward":
            order += [r for r in rows if r.startswith("  vlrm.reward.")]
    for row in order:
        name = row.strip()
        if row.startswith(" ") and not any(name in p for p in phases):
            continue  # a sub-phase this policy does not mark (generate-based sampling)
        seconds = statistics.median(p.get(name, 0.0) for p in phases)
        label = ("&nbsp;&nbsp;" if row.startswith(" ") else "") + f"`{name}`"
        lines.append(f"| {label} | {seconds:.3f} | {seconds / wall:.0%} |")
    rest = statistics.median(w - sum(p.get(n, 0.0) for n in TOP_LEVEL) for w, p in zip(walls, phases))
    lines.append(f"| rest of the step (median of each step's own) | {rest:.3f} | {rest / wall:.0%} |")
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top,
                                      max_name_column_width=48)
    lines += ["", "Heaviest operators (self CPU time, last step):", "", "```", table.strip(), "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=PRESETS, default="tiny")
    parser.add_argument("--objective", choices=("grpo", "a2c"), default="grpo")
    parser.add_argument("--captioner", choices=("blip2", "llava"), default="blip2",
                        help="the preset's BLIP-2 OPT, or the LLaVA-style long-prompt captioner "
                             "(presets.long_prompt_captioner) [blip2]")
    parser.add_argument("--images", type=int, default=None, help="N images a step [the preset's]")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps [3]")
    parser.add_argument("--md", default=None, help="also write the table here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    preset = with_images(build_preset(args.preset), args.images)
    if args.captioner == "llava":
        preset = attrs.evolve(preset, policy=long_prompt_captioner(args.preset))
    with tempfile.TemporaryDirectory() as tmp:
        step = (vlrm_grpo_step if args.objective == "grpo" else vlrm_step)(preset, tmp)
        step()  # warm-up
        walls, phases, prof = profile_steps(step, args.steps)
    title = (f"{args.objective.upper()} step, `{args.preset}` preset ({args.captioner}), "
             f"{len(preset.images)} images x "
             f"{preset.samples_per_image} captions, torch threads {torch.get_num_threads()}")
    return emit(markdown(title, walls, phases, prof), args.md)


if __name__ == "__main__":
    main()
