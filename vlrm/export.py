"""``vlrm-export``: a run's policy as a delta on its base model (for BLIP-2: the authors' format) and/or a merged directory.

The delta is what the paper's authors released (``vlrm-blip2-opt-2.7b.pt``): the state dict
of the Q-Former, the query tokens and the language projection, fp16 by default, with the
key names of transformers' ``Blip2ForConditionalGeneration``, so that::

    model = Blip2ForConditionalGeneration.from_pretrained("Salesforce/blip2-opt-2.7b")
    model.load_state_dict(torch.load("delta.pt", weights_only=True), strict=False)

gives the tuned captioner. The merged directory is a plain transformers folder with any
LoRA adapters folded into OPT (a delta cannot carry them).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch

from vlrm.checkpoint import POLICY_FILE, find_policy_dir, read_policy_file
from vlrm.errors import ConfigError
from vlrm.protocols import DeltaExport, require

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


def load_policy(source: Path, policy: str | None = None) -> Any:
    """Build the policy saved in ``source`` with the registered builder that wrote it (its
    ``vlrm_policy.json``), or with the builder named ``policy``."""
    from vlrm.plugins import get_registry

    name = policy or read_policy_file(source).get("builder")
    if not name:
        raise ConfigError(f"{str(source)!r} does not say which policy wrote it (no "
                          f"{POLICY_FILE}): name the registered policy builder with --policy, "
                          "e.g. --policy blip2_opt (vlrm-plugins lists them)")
    try:
        builder = get_registry().get("policies", name).factory
    except KeyError as exc:
        raise ConfigError(f"{exc.args[0]} (from {str(source / POLICY_FILE)!r} or --policy)") from exc
    return builder(model=str(source))


def export(checkpoint: str | Path, delta: str | Path | None = None,
           merged: str | Path | None = None, dtype: str = "float16",
           policy: str | None = None) -> dict[str, object]:
    """Write the delta and/or the merged directory of a run's policy; returns a summary.

    Both are capabilities of the policy (``vlrm.protocols.DeltaExport``); the policy is
    rebuilt by the registered builder that saved it, so vlrm imports no plugin here.
    """
    if delta is None and merged is None:
        raise ConfigError("nothing to write: give --delta FILE, --merged DIR, or both")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    source = find_policy_dir(checkpoint)
    loaded = load_policy(source, policy)
    require(loaded, DeltaExport, f"vlrm-export {str(source)!r}")
    summary: dict[str, object] = {"source": str(source),
                                  "lora": getattr(loaded, "lora", None) is not None}
    if delta is not None:
        state = loaded.delta_state_dict(DTYPES[dtype])
        write_delta(state, delta)
        summary.update(delta=str(delta), delta_tensors=len(state),
                       delta_parameters=sum(v.numel() for v in state.values()))
    if merged is not None:
        loaded.save_merged(str(merged))
        summary["merged"] = str(merged)
    return summary


def main(argv: list[str] | None = None) -> int:
    from vlrm.cli import plain_parser

    parser = plain_parser(
        "vlrm-export",
        "Export a vlrm run's BLIP-2 policy as the VLRM authors' delta format "
                    "(Q-Former + query tokens + language projection) and/or a merged "
                    "transformers directory with LoRA folded in.")
    parser.add_argument("checkpoint", help="A run's output_dir (uses checkpoints/last), a "
                        "checkpoints/step-<N> folder, or a policy directory.")
    parser.add_argument("--delta", help="Write the delta state dict here (e.g. vlrm-delta.pt).")
    parser.add_argument("--merged", help="Write a full transformers directory here.")
    parser.add_argument("--dtype", default="float16", choices=sorted(DTYPES),
                        help="Dtype of the delta's tensors (default float16, as released).")
    parser.add_argument("--policy", help="Registered policy builder that loads the folder "
                        "(default: the one named in its vlrm_policy.json).")
    args = parser.parse_args(argv)
    try:
        summary = export(args.checkpoint, args.delta, args.merged, args.dtype, args.policy)
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
