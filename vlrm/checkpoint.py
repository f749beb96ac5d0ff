"""Checkpoints that a crash can never leave half-written.

Layout of ``<output_dir>/checkpoints``::

    step-<N>/policy/                  the policy's own format (a transformers directory)
    step-<N>/value_head.safetensors
    step-<N>/trainer_state.pt         optimiser, scheduler and RNG states (tensors and
                                      plain containers only: loads with weights_only=True)
    step-<N>/trainer_state.json       step and metadata, human-readable
    last -> step-<N>                  symlink to the newest complete checkpoint

A checkpoint is written under a temporary name, flushed to disk, then renamed; ``last``
is replaced by an atomic rename of a new symlink. A process killed mid-save leaves only a
``.step-<N>.partial-<pid>`` folder, which the next successful save removes.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vlrm.errors import ConfigError

LAST = "last"


def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def step_dir(checkpoints: Path, step: int) -> Path:
    return checkpoints / f"step-{step}"


def write_checkpoint(checkpoints: Path, step: int, write: Callable[[Path], None],
                     keep_last: int = 0) -> Path:
    """Write one checkpoint atomically and point ``last`` at it.

    Args:
        checkpoints: The checkpoints folder.
        step: Training step; names the folder ``step-<step>``.
        write: Fills the (temporary) folder it is given.
        keep_last: Keep only this many newest checkpoints (0 = keep all).

    Returns:
        The final checkpoint folder.
    """
    checkpoints.mkdir(parents=True, exist_ok=True)
    final = step_dir(checkpoints, step)
    tmp = checkpoints / f".step-{step}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write(tmp)
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # the same step saved again: move the old copy aside, never delete first
        stale = checkpoints / f".step-{step}.stale-{os.getpid()}"
        os.replace(final, stale)
        os.replace(tmp, final)
        shutil.rmtree(stale)
    else:
        os.replace(tmp, final)
    link_tmp = checkpoints / f".{LAST}.partial-{os.getpid()}"
    if link_tmp.is_symlink() or link_tmp.exists():
        link_tmp.unlink()
    link_tmp.symlink_to(final.name)
    os.replace(link_tmp, checkpoints / LAST)
    clean_leftovers(checkpoints)
    if keep_last > 0:
        # Never prune the checkpoint just written, even when an earlier run in this folder
        # left checkpoints of higher step numbers.
        others = [p for p in list_checkpoints(checkpoints) if p != final]
        for old in others[:max(0, len(others) - (keep_last - 1))]:
            shutil.rmtree(old)
    return final


def clean_leftovers(checkpoints: Path) -> None:
    """Tidy what killed saves left: ``.step-<N>.partial-*`` folders (never named by ``last``)
    are removed; a ``.step-<N>.stale-*`` folder is the complete old copy of a step whose
    re-save was killed between two renames: put back if ``step-<N>`` is missing, else removed.
    Only rank 0 of one run writes a checkpoints folder, so nothing here is in progress."""
    for leftover in sorted(checkpoints.glob(".step-*")):
        step, _, kind = leftover.name[len(".step-"):].partition(".")
        if kind.startswith("stale-") and step.isdigit() and not step_dir(checkpoints, int(step)).exists():
            os.replace(leftover, step_dir(checkpoints, int(step)))
        elif kind.startswith(("partial-", "stale-")):
            shutil.rmtree(leftover, ignore_errors=True)


def list_checkpoints(checkpoints: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    found = [p for p in checkpoints.glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


#: Written into a policy folder by the policy's ``save_pretrained``: the registered name of
#: the builder that loads it back (``vlrm-export`` uses it) and settings the folder alone
#: does not hold (e.g. the prompt).
POLICY_FILE = "vlrm_policy.json"


def write_policy_file(path: str | Path, builder: str, **settings: Any) -> None:
    """Record in a policy folder which registered policy builder loads it."""
    record = {"builder": builder, **settings}
    (Path(path) / POLICY_FILE).write_text(json.dumps(record, indent=2) + "\n")


def read_policy_file(path: str | Path) -> dict[str, Any]:
    """The record ``write_policy_file`` left in a policy folder (empty when there is none)."""
    file = Path(path) / POLICY_FILE
    if not file.is_file():
        return {}
    try:
        record = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{str(file)!r} is not valid JSON: {exc}") from exc
    if not isinstance(record, dict):
        raise ConfigError(f"{str(file)!r} must hold a JSON object")
    return record


def find_policy_dir(path: str | Path) -> Path:
    """The policy folder inside a run directory, a checkpoint, or the folder itself."""
    path = Path(path)
    for candidate in (path / "checkpoints" / LAST / "policy", path / "policy", path):
        if (candidate / "config.json").is_file():
            return candidate
    raise ConfigError(f"{str(path)!r} holds no policy: give a run's output_dir, one of its "
                      "checkpoints/step-<N> folders, or a transformers directory")


def save_state(path: Path, state: dict[str, Any], meta: dict[str, Any]) -> None:
    """Save trainer state (tensors and plain containers) and a readable JSON summary."""
    torch.save(state, path / "trainer_state.pt")
    (path / "trainer_state.json").write_text(json.dumps(meta, indent=2) + "\n")


def load_state(path: Path) -> dict[str, Any]:
    """Load trainer state without unpickling code (``weights_only=True``)."""
    file = path / "trainer_state.pt"
    if not file.is_file():
        raise FileNotFoundError(f"no trainer state at {file}")
    return safe_load(file, "trainer state")


def safe_load(path: str | Path, what: str) -> Any:
    """``torch.load(weights_only=True)`` with errors that name the file and say what to do.

    A file that would need Python code to be unpickled is refused (``ConfigError``), as is
    one that is not a torch file at all; nothing in the file is ever executed.

    Args:
        path: The file.
        what: What the file is meant to be, for messages (e.g. "policy delta").
    """
    import pickle
    import re

    where = f"{what} {str(path)!r}"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch words it "Unsupported global: GLOBAL x" or "unsupported GLOBAL x whose module
        # ... is blocked", depending on the module.
        code = re.search(r"[Uu]nsupported (?:global: )?GLOBAL (\S+)", str(exc))
        if code:
            raise ConfigError(
                f"{where} was refused: loading it would unpickle Python code ({code.group(1)}). "
                "vlrm reads checkpoints only with torch.load(weights_only=True) and never runs "
                "code from a file; re-save it as a plain dict of tensors "
                "(torch.save(model.state_dict(), path)) from a source you trust.") from exc
        raise ConfigError(f"{where}: not a readable torch file (the unpickler stopped: "
                          f"{_last_detail(str(exc))})") from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise ConfigError(f"{where}: not a readable torch file ({exc})") from exc


def _last_detail(message: str) -> str:
    lines = [ln.strip() for ln in message.splitlines() if ln.strip() and "WeightsUnpickler" not in ln
             and "documentation" not in ln and "weights_only" not in ln]
    return lines[-1] if lines else "unknown error"
