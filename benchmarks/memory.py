"""Peak memory of two training steps, in a fresh process (so the peak is this run's alone).

    python -m benchmarks.memory --preset small --impl vlrm        # A2C
    python -m benchmarks.memory --preset small --impl naive       # A2C, the naive loop
    python -m benchmarks.memory --preset small --impl vlrm_grpo --images 16
    python -m benchmarks.memory --preset small --impl trl_grpo --images 16   # TRL's GRPOTrainer

Prints one JSON line: ``peak_rss_mib`` (the process's peak resident memory, Linux),
``models_rss_mib`` (resident memory once the models are built) and, on a GPU,
``cuda_peak_mib`` (``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile

import torch

from benchmarks.presets import PRESETS, build_preset, with_images
from benchmarks.steps import naive_step, vlrm_grpo_step, vlrm_step


def rss_mib() -> float:
    """Current resident memory of this process, MiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=PRESETS, default="tiny")
    parser.add_argument("--impl", choices=("vlrm", "naive", "vlrm_grpo", "trl_grpo"), default="vlrm")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--images", type=int, default=None, help="N images a step [the preset's]")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    preset = with_images(build_preset(args.preset), args.images)
    models = rss_mib()
    with tempfile.TemporaryDirectory() as tmp:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        if args.impl == "trl_grpo":
            from benchmarks.trl_peer import TrlGrpoPeer

            TrlGrpoPeer(preset, tmp).run(args.steps - 1)  # rounds + the warm-up step
        else:
            step = {"vlrm": vlrm_step, "vlrm_grpo": vlrm_grpo_step}.get(args.impl)
            step = step(preset, tmp) if step else naive_step(preset)
            for _ in range(args.steps):
                step()
    out = {"preset": args.preset, "impl": args.impl, "models_rss_mib": round(models, 1),
           "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available():
        out["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
