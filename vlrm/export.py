"""``vlrm-export``: a run's BLIP-2 policy as the authors' delta file and/or a merged directory.

The delta is what the paper's authors released (``vlrm-blip2-opt-2.7b.pt``): the state dict
of the Q-Former, the query tokens and the language projection, fp16 by default, with the
key names of transformers' ``Blip2ForConditionalGeneration``, so that::

    model = Blip2ForConditionalGeneration.from_pretrained("Salesforce/blip2-opt-2.7b")
    model.load_state_dict(torch.load("delta.pt", weights_only=True), strict=False)

gives the tuned captioner. The merged directory is a plain transformers folder with any
LoRA adapters folded into OPT (a delta cannot carry them).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from vlrm.checkpoint import find_policy_dir
from vlrm.errors import ConfigError

EXIT_CONFIG = 2
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def write_delta(state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Save a delta atomically: a crash never leaves a half-written file under ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        torch.save(state, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def export(checkpoint: str | Path, delta: str | Path | None = None,
           merged: str | Path | None = None, dtype: str = "float16") -> dict[str, object]:
    """Write the delta and/or the merged directory of a run's policy; returns a summary."""
    from vlrm_plugins.blip2_opt import blip2_opt, without_adapters

    if delta is None and merged is None:
        raise ConfigError("nothing to write: give --delta FILE, --merged DIR, or both")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    source = find_policy_dir(checkpoint)
    policy = blip2_opt(str(source))
    summary: dict[str, object] = {"source": str(source), "lora": policy.lora is not None}
    if delta is not None:
        state = policy.delta_state_dict(DTYPES[dtype])
        write_delta(state, delta)
        summary.update(delta=str(delta), delta_tensors=len(state),
                       delta_parameters=sum(v.numel() for v in state.values()))
    if merged is not None:
        policy.merge_adapters()
        policy.model.save_pretrained(str(merged), state_dict=without_adapters(policy.model.state_dict()))
        policy.processor.save_pretrained(str(merged))
        summary["merged"] = str(merged)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vlrm-export",
        description="Export a vlrm run's BLIP-2 policy as the VLRM authors' delta format "
                    "(Q-Former + query tokens + language projection) and/or a merged "
                    "transformers directory with LoRA folded in.")
    parser.add_argument("checkpoint", help="A run's output_dir (uses checkpoints/last), a "
                        "checkpoints/step-<N> folder, or a policy directory.")
    parser.add_argument("--delta", help="Write the delta state dict here (e.g. vlrm-delta.pt).")
    parser.add_argument("--merged", help="Write a full transformers directory here.")
    parser.add_argument("--dtype", default="float16", choices=sorted(DTYPES),
                        help="Dtype of the delta's tensors (default float16, as released).")
    args = parser.parse_args(argv)
    try:
        summary = export(args.checkpoint, args.delta, args.merged, args.dtype)
    except ConfigError as exc:
        sys.stderr.write(f"vlrm-export: error: {exc}\n")
        return EXIT_CONFIG
    if "delta" in summary:
        print(f"vlrm-export: delta with {summary['delta_tensors']} tensors "
              f"({summary['delta_parameters']:,} parameters, {args.dtype}) -> {summary['delta']}")
        if summary["lora"]:
            print("vlrm-export: warning: the run trained LoRA adapters, which a delta cannot "
                  "carry; use --merged for the full tuned model", file=sys.stderr)
    if "merged" in summary:
        print(f"vlrm-export: merged transformers directory -> {summary['merged']}")
    return 0


def main_entry() -> None:
    """Console script ``vlrm-export``."""
    raise SystemExit(main())
