"""Whole-step throughput of vlrm (GRPO and A2C) and of TRL's GRPO trainer, for RESULTS.md.

    python -m benchmarks.throughput --preset paper --md benchmarks/results/gpu.md    # a GPU
    python -m benchmarks.throughput --preset small --images 16 --steps 2            # CPU check

Per implementation: images/s and generated tokens/s of the whole step (rollout, rewards,
update; median of ``--steps`` steps after one warm-up), the peak memory (CUDA
``max_memory_allocated`` on a GPU, else the process's peak RSS, which includes every model
held so far), and for vlrm the model FLOPs of one step (``torch.profiler``'s count of every
matmul and convolution the step runs, forward and backward) with the model-FLOPs utilisation
against ``--peak_tflops`` (default: 989, an H100's / H200's dense bf16 peak, on a GPU; none on
a CPU). The ``paper`` preset is BLIP-2 OPT-2.7B + BLIP-2 ITM ViT-g (ITM reward and penalties,
as ``benchmarks/test_peer.py``) with random weights in bf16; it needs a GPU.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.presets import PRESETS, build_preset, with_images
from benchmarks.steps import vlrm_grpo_step, vlrm_step
from benchmarks.timing import emit, sync

H100_BF16_TFLOPS = 989.0  # dense bf16 peak of an H100 / H200 SXM


def peak_mib() -> float:
    """CUDA peak allocated memory on a GPU, else the process's peak resident memory (MiB)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def step_flops(step: Callable[[], Any]) -> int:
    """Floating-point operations of one call of ``step``: ``torch.profiler``'s count of every
    matrix multiply and convolution (forward and backward)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, with_flops=True) as prof:
        step()
    return int(sum(event.flops or 0 for event in prof.key_averages()))


def measure(preset: Any, impl: str, steps: int, peak_tflops: float | None) -> dict[str, Any]:
    """One implementation's row."""
    n, k = len(preset.images), preset.samples_per_image
    row: dict[str, Any] = {"impl": impl, "images": n, "captions": n * k}
    with tempfile.TemporaryDirectory() as tmp:
        if impl == "trl_grpo":
            from benchmarks.trl_peer import TrlGrpoPeer

            peer = TrlGrpoPeer(preset, tmp)
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            trl_s, _ = peer.run(steps)
            row["step_s"] = statistics.median(trl_s)
            row["tokens_per_s"] = None  # TRL's own metrics hold it; not read back here
        else:
            build = vlrm_grpo_step if impl == "vlrm_grpo" else vlrm_step
            step = build(preset, tmp)
            step()  # warm-up
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            seconds, tokens = [], []
            for _ in range(steps):
                sync()
                start = time.perf_counter()
                metrics = step()
                sync()
                seconds.append(time.perf_counter() - start)
                tokens.append(metrics["caption/tokens"] * n * k)
            row["step_s"] = statistics.median(seconds)
            row["tokens_per_s"] = statistics.median(tokens) / row["step_s"]
            flops = step_flops(step)
            row["tflops_per_step"] = flops / 1e12
            row["achieved_tflops"] = flops / 1e12 / row["step_s"]
            if peak_tflops:
                row["mfu"] = row["achieved_tflops"] / peak_tflops
    row["images_per_s"] = n / row["step_s"]
    row["peak_mib"] = peak_mib()
    return row


def markdown(rows: list[dict[str, Any]], preset: str, device: str) -> str:
    memory = ("CUDA peak allocated" if torch.cuda.is_available()
              else "peak RSS of the process so far, each row including the rows above it")
    lines = [f"Preset `{preset}`, {device}; median of timed steps after one warm-up; peak "
             f"memory: {memory}.", "",
             "| implementation | images x captions | step (s) | images/s | generated tokens/s | "
             "peak memory (MiB) | TFLOP / step | achieved TFLOP/s | MFU |",
             "|---|---|---|---|---|---|---|---|---|"]

    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for r in rows:
        lines.append(f"| {r['impl']} | {r['images']} x {r['captions'] // r['images']} | "
                     f"{r['step_s']:.3f} | {r['images_per_s']:.2f} | "
                     f"{fmt(r.get('tokens_per_s'), '.1f')} | {r['peak_mib']:.0f} | "
                     f"{fmt(r.get('tflops_per_step'), '.3f')} | "
                     f"{fmt(r.get('achieved_tflops'), '.3f')} | {fmt(r.get('mfu'), '.1%')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=PRESETS, default="paper")
    parser.add_argument("--images", type=int, default=16, help="N images a step [16]")
    parser.add_argument("--steps", type=int, default=5, help="timed steps [5]")
    parser.add_argument("--impl", nargs="+", default=["vlrm_grpo", "vlrm_a2c", "trl_grpo"],
                        choices=("vlrm_grpo", "vlrm_a2c", "trl_grpo"))
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="the device's peak TFLOP/s for MFU [989 on a GPU; none on a CPU]")
    parser.add_argument("--md", default=None, help="write the table here")
    args = parser.parse_args(argv)
    peak = args.peak_tflops or (H100_BF16_TFLOPS if torch.cuda.is_available() else None)
    torch.manual_seed(0)
    preset = with_images(build_preset(args.preset), args.images)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"CPU ({torch.get_num_threads()} threads)"
    rows = [measure(preset, impl, args.steps, peak) for impl in args.impl]
    emit(markdown(rows, args.preset, device), args.md)
    return rows


if __name__ == "__main__":
    main()
