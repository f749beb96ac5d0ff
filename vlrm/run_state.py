"""A training run's bookkeeping: checkpoints of the trainer, resuming from them, random
states and the metrics log. The update itself lives in ``vlrm.trainer``.

A checkpoint folder (written atomically by ``vlrm.checkpoint.write_checkpoint``) holds::

    policy/                    the policy's own format (save_pretrained)
    trainable.safetensors      the trained parameters by name
    value_head.safetensors     the objective's state (A2C's value head); absent when it has none
    trainer_state.pt           optimiser, scheduler, every rank's random states, reward
                               normalisation, data order (tensors and plain containers only)
    trainer_state.json         step and the settings a resume must find unchanged
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from vlrm.checkpoint import LAST, load_state, save_state, write_checkpoint
from vlrm.errors import ConfigError
from vlrm.faults import fault_point
from vlrm.objective import STATE_FILE, copy_into
from vlrm.rewards import CompositeReward

if TYPE_CHECKING:
    from vlrm.trainer import Trainer

#: trainer_state.json keys a resumed run must share with its checkpoint.
FIXED = ("images_per_step", "samples_per_image", "seed")


def save(trainer: Trainer) -> Path | None:
    """Write a checkpoint of the trainer's current step. Every rank must call it (the states
    are gathered); rank 0 writes. Returns the checkpoint folder on rank 0."""
    world = trainer.world
    rng = world.all_gather_object(rng_state())
    optimizer = _optimizer_state(trainer)  # collective under FSDP
    objective = trainer.objective.state_dict()  # whole tensors (collective under FSDP)
    if trainer.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(trainer.model, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))  # whole tensors on rank 0 only
        policy_state = {k.removeprefix("policy."): v for k, v in full.items()
                        if k.startswith("policy.")}
        trainable = {n: policy_state[n] for n in trainer.trainable()} if full else {}
    else:
        policy_state, trainable = None, trainer.named_trainable()
    final = None
    if world.is_main:
        final = _write(trainer, trainable, objective, optimizer, rng, policy_state)
    world.barrier()
    return final


def _write(trainer: Trainer, trainable: dict[str, torch.Tensor],
           objective: dict[str, torch.Tensor], optimizer: dict[str, Any],
           rng: list[dict[str, Any]], policy_state: dict[str, torch.Tensor] | None) -> Path:
    cfg, world = trainer.config, trainer.world

    def write(path: Path) -> None:
        if policy_state is None:
            trainer.policy.save_pretrained(str(path / "policy"))
        else:  # FSDP: the parameters are sharded; write the gathered whole tensors
            trainer.policy.save_pretrained(str(path / "policy"), state_dict=policy_state)
        fault_point("save", trainer.step)  # tests kill the run here, mid-checkpoint
        save_file({k: v.contiguous() for k, v in trainable.items()},
                  str(path / "trainable.safetensors"))
        if objective:
            save_file({k: v.contiguous() for k, v in objective.items()}, str(path / STATE_FILE))
        state = {"optimizer": optimizer, "scheduler": trainer.scheduler.state_dict(),
                 "rng": rng, "nonfinite_in_a_row": trainer.nonfinite_in_a_row}
        if isinstance(trainer.reward, CompositeReward):  # running reward normalisation
            state["reward"] = trainer.reward.state_dict()
        if hasattr(trainer.data, "state_dict"):
            state["data"] = trainer.data.state_dict()
        save_state(path, state, {
            "step": trainer.step, "hidden_size": trainer.policy.hidden_size,
            "objective": type(trainer.objective).__name__, **trainer.objective.describe(),
            "world_size": world.size,
            "parallel": cfg.parallel if world.distributed else "none",
            **{key: getattr(cfg, key) for key in FIXED}})

    return write_checkpoint(trainer.output_dir / "checkpoints", trainer.step, write,
                            keep_last=cfg.keep_last)


def resume(trainer: Trainer, checkpoint: str | Path | None = None) -> int:
    """Put the trainer back where a checkpoint left it (default ``<output_dir>/checkpoints/last``):
    policy weights, the objective's state, optimiser, scheduler, every rank's random state,
    data order and reward normalisation. Returns the step it continues after."""
    path = Path(checkpoint) if checkpoint else trainer.output_dir / "checkpoints" / LAST
    meta = _check_meta(trainer, path)
    if not (path / "trainable.safetensors").is_file():
        raise ConfigError(f"cannot resume from {str(path)!r}: no trainable.safetensors "
                          "(written by an older vlrm); start a new run from its policy")
    try:
        state = load_state(path)
    except FileNotFoundError as exc:
        raise ConfigError(f"cannot resume from {str(path)!r}: {exc}") from exc
    _load_trainable(trainer, load_file(str(path / "trainable.safetensors")), path)
    objective_file = path / STATE_FILE
    trainer.objective.load_state_dict(load_file(str(objective_file)) if objective_file.is_file()
                                      else {})
    _load_optimizer(trainer, state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    if isinstance(trainer.reward, CompositeReward) and "reward" in state:
        trainer.reward.load_state_dict(state["reward"])
    if "data" in state and hasattr(trainer.data, "load_state_dict"):
        trainer.data.load_state_dict(state["data"])
    rng = state.get("rng", [])
    trainer.resumed_rng = rng[trainer.world.rank] if trainer.world.rank < len(rng) else None
    trainer.nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))
    trainer.step = int(meta["step"])
    trainer.truncate_log = True
    return trainer.step


def _check_meta(trainer: Trainer, path: Path) -> dict[str, Any]:
    """The checkpoint's trainer_state.json, if the run's settings allow resuming from it."""
    cfg, world = trainer.config, trainer.world
    if not (path / "trainer_state.json").is_file():
        raise ConfigError(f"cannot resume: {str(path)!r} is not a complete checkpoint "
                          "(no trainer_state.json); start without --resume, or give a "
                          "checkpoints/step-<N> folder")
    meta = json.loads((path / "trainer_state.json").read_text())
    fixed = {f"trainer.{key}": getattr(cfg, key) for key in FIXED}
    fixed.update({f"objective.{k}": v for k, v in trainer.objective.describe().items()})
    fixed["objective"] = type(trainer.objective).__name__
    for key, value in fixed.items():
        saved = meta.get(key.split(".", 1)[-1], value if key != "objective" else "A2C")
        if saved != value:
            raise ConfigError(f"cannot resume from {str(path)!r}: it was written with {key} "
                              f"{saved}, the config says {value}; resume with the run's own config")
    if meta.get("hidden_size", trainer.policy.hidden_size) != trainer.policy.hidden_size:
        raise ConfigError(f"cannot resume from {str(path)!r}: its policy has hidden size "
                          f"{meta['hidden_size']}, the configured one {trainer.policy.hidden_size}")
    parallel = cfg.parallel if world.distributed else "none"
    if "fsdp" in (parallel, meta.get("parallel", "none")) and meta.get("parallel") != parallel:
        raise ConfigError(f"cannot resume from {str(path)!r}: written with parallel "
                          f"{meta.get('parallel')!r}, now {parallel!r}; the optimiser state of "
                          "FSDP and of DDP or one process are stored differently")
    if meta.get("world_size", 1) != world.size and cfg.sample_seeding == "global":
        trainer.say(f"vlrm: resuming on {world.size} processes a run written on "
                    f"{meta.get('world_size', 1)}: with sample_seeding global the captions "
                    "drawn from here on differ from the uninterrupted run's")
    return meta


def _load_trainable(trainer: Trainer, saved: dict[str, torch.Tensor], path: Path) -> None:
    params = trainer.trainable()
    if set(saved) != set(params):
        raise ConfigError(f"cannot resume from {str(path)!r}: its trainable parameters are not "
                          "the policy's (was policy.trainable or lora changed?); missing "
                          f"{sorted(set(params) - set(saved))[:3]}, unexpected "
                          f"{sorted(set(saved) - set(params))[:3]}")
    with torch.no_grad():
        for name, value in saved.items():
            copy_into(params[name], value)


def _optimizer_state(trainer: Trainer) -> dict[str, Any]:
    if trainer.fsdp:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_optimizer_state_dict)

        return get_optimizer_state_dict(trainer.model, trainer.optimizer, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))
    return trainer.optimizer.state_dict()


def _load_optimizer(trainer: Trainer, state: dict[str, Any]) -> None:
    if trainer.fsdp:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             set_optimizer_state_dict)

        set_optimizer_state_dict(trainer.model, trainer.optimizer, state,
                                 options=StateDictOptions(full_state_dict=True))
    else:
        trainer.optimizer.load_state_dict(state)


def open_log(trainer: Trainer) -> Any:
    """``metrics.jsonl`` for appending (rank 0), without rows past ``trainer.step`` that a
    run killed after its last checkpoint wrote; other ranks log nowhere."""
    if not trainer.world.is_main:
        return open(os.devnull, "w")
    path = trainer.output_dir / "metrics.jsonl"
    step = trainer.step
    if trainer.truncate_log and path.is_file():
        # Rows up to the checkpoint stay (its step's evaluation ran before its save); at
        # step 0 the baseline evaluation runs again, so nothing stays.
        rows = [ln for ln in path.read_text().splitlines(keepends=True)
                if 0 <= _row_step(ln) <= step and step > 0]
        tmp = path.with_name(".metrics.jsonl.partial")
        tmp.write_text("".join(rows))
        tmp.replace(path)
    return open(path, "a")


def rng_state() -> dict[str, Any]:
    """This process's random states, as tensors and plain containers (loads with
    ``weights_only=True``)."""
    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                             "numpy": [kind, torch.from_numpy(keys.astype("int64")), int(pos),
                                       int(has_gauss), float(gauss)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _row_step(line: str) -> int:
    """The step of a metrics.jsonl row; -1 for a line a killed run left half-written."""
    try:
        return int(json.loads(line)["step"]) if line.endswith("\n") else -1
    except (ValueError, KeyError, TypeError, AttributeError):
        return -1
