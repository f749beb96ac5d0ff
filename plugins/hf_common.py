"""Pieces shared by the transformers-based policies (``blip2_opt``, ``hf_captioner``) and
rewards: dtype names, LoRA adapters through ``peft``, the frozen reference snapshot,
layer-wise gradient checkpointing and quiet saving.

A public module on purpose: third-party policy plugins may use it too. Nothing heavy is
imported at import time (``peft`` and ``transformers`` load inside the functions).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from attrs import frozen
from safetensors.torch import load_file, save_file
from torch import nn

from vlrm.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LORA_WEIGHTS, LORA_CONFIG = "lora.safetensors", "lora.json"


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a config name (float32, bfloat16, float16)."""
    if name not in DTYPES:
        raise ConfigError(f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


@frozen
class LoraSpec:
    """LoRA adapters [ours: the paper trains none by default].

    Args:
        rank: Rank r of each adapter.
        alpha: Scale numerator; the update is (alpha / r) * B A.
        targets: Names of the linear layers that get adapters (module-name suffixes such as
            ``q_proj``, or ``fnmatch`` patterns over full module names).
    """

    rank: int
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")


def add_lora(module: nn.Module, spec: LoraSpec, targets: Sequence[str] | None = None) -> None:
    """Inject LoRA adapters into ``module`` in place (no wrapper model is kept).

    Args:
        module: The model (or part of it) that receives adapters.
        spec: Rank, scale and target names.
        targets: Full module names to adapt, overriding ``spec.targets`` (already resolved
            by the caller, e.g. from patterns).
    """
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ModuleNotFoundError as exc:
        raise ConfigError("policy lora_rank > 0 needs peft: pip install 'vlrm[lora]'") from exc
    if spec.rank <= 0:
        raise ConfigError(f"policy lora rank must be positive, got {spec.rank}")
    names = list(targets) if targets is not None else list(spec.targets)
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=names,
                        lora_dropout=0.0, bias="none")
    try:
        inject_adapter_in_model(config, module)
    except ValueError as exc:
        raise ConfigError(f"policy lora_targets {list(spec.targets)}: {exc}") from exc


def lora_layers(module: nn.Module) -> list[nn.Module]:
    """The peft adapter layers inside ``module`` (empty without peft or adapters)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ModuleNotFoundError:
        return []
    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def adapters_disabled(module: nn.Module) -> Iterator[None]:
    """``module`` without its LoRA adapters for the block (a no-op without any)."""
    layers = lora_layers(module)
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def without_adapters(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with LoRA removed and peft's wrapped names restored to the base names."""
    return {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}


def save_adapters(path: str | Path, state: dict[str, torch.Tensor], spec: LoraSpec) -> None:
    """Write the adapters of ``state`` as ``lora.safetensors`` and their spec as ``lora.json``."""
    save_file({k: v.detach().contiguous() for k, v in state.items() if ".lora_" in k},
              str(Path(path) / LORA_WEIGHTS))
    (Path(path) / LORA_CONFIG).write_text(json.dumps(attrs.asdict(spec), indent=2) + "\n")


def save_folder(path: str | Path, model: nn.Module, processor: Any,
                state: dict[str, torch.Tensor] | None = None, lora: LoraSpec | None = None) -> None:
    """A transformers folder of ``model`` (adapters left out, so plain ``from_pretrained``
    loads it) and ``processor``; with ``lora``, the adapters of ``state`` beside it.

    Args:
        state: The model's state to write; default its current one.
    """
    state = model.state_dict() if state is None else state
    with quiet_transformers():  # the trainer's own progress bar is on screen
        model.save_pretrained(path, state_dict=without_adapters(state))
        processor.save_pretrained(path)
    if lora is not None:
        save_adapters(path, state, lora)


def save_merged_folder(path: str | Path, model: nn.Module, processor: Any) -> None:
    """Fold ``model``'s LoRA adapters into its weights (irreversible) and write a plain folder."""
    for layer in lora_layers(model):
        layer.merge()
    save_folder(path, model, processor)


def saved_lora_spec(path: str | Path) -> LoraSpec | None:
    """The ``LoraSpec`` a policy folder was saved with, or None when it has no adapters."""
    file = Path(path, LORA_CONFIG)
    if not file.is_file():
        return None
    return LoraSpec(**{k: tuple(v) if isinstance(v, list) else v
                       for k, v in json.loads(file.read_text()).items()})


def resolve_lora(path: str | Path, asked: LoraSpec | None) -> LoraSpec | None:
    """The adapters a policy loaded from ``path`` gets: the saved ones, or the asked ones.

    A folder saved with adapters continues with them; asking for different ones is an error.
    """
    saved = saved_lora_spec(path)
    if saved is not None and asked is not None and asked != saved:
        raise ConfigError(f"policy: {str(path)!r} holds LoRA adapters {saved}, but the config "
                          f"asks for {asked}; drop the lora_* settings to continue with them")
    return saved if saved is not None else asked


def load_adapters(model: nn.Module, path: str | Path) -> None:
    """Load ``lora.safetensors`` of a policy folder into ``model`` (adapters already injected)."""
    file = Path(path, LORA_WEIGHTS)
    missing = model.load_state_dict(load_file(str(file)), strict=False)
    if any(".lora_" in k for k in missing.missing_keys):
        raise ConfigError(f"policy: {file} lacks some adapter weights")


class ReferenceSnapshot:
    """The initial policy without a second model: a frozen copy of only the parameters that
    train (LoRA weights excepted: the reference has its adapters disabled), swapped in place
    of the live ones for a block."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] | None = None

    def take(self, named: Iterable[tuple[str, nn.Parameter]]) -> int:
        """Copy the trainable parameters of ``named``. Idempotent: the first call fixes the
        reference. Returns the number of parameters copied."""
        if self.tensors is None:
            self.tensors = {name: p.detach().clone() for name, p in named
                            if p.requires_grad and ".lora_" not in name}
        return sum(t.numel() for t in self.tensors.values())

    @contextlib.contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[None]:
        """Within this block ``model`` is the reference (snapshot in, adapters off).

        The snapshot's tensors replace the parameters' data and are swapped back on exit;
        nothing is copied. Use under ``torch.no_grad()``.
        """
        if self.tensors is None:
            raise RuntimeError("no reference snapshot: call snapshot_reference() first")
        params = dict(model.named_parameters())
        current = {name: params[name].data for name in self.tensors}
        try:
            for name, ref in self.tensors.items():
                params[name].data = ref
            with adapters_disabled(model):
                yield
        finally:
            for name, data in current.items():
                params[name].data = data


def checkpoint_layers(layers: Iterable[nn.Module]) -> int:
    """Make each layer recompute its activations in the backward pass.

    transformers' own switch only acts in training mode, and policies stay in eval mode (no
    dropout), so the layers' ``forward`` is wrapped instead; parameter names, and so
    checkpoints, do not change. Returns the number of layers wrapped.
    """
    from torch.utils.checkpoint import checkpoint

    count = 0
    for layer in layers:
        inner = layer.forward

        def forward(*args: Any, _inner: Any = inner, **kwargs: Any) -> Any:
            if torch.is_grad_enabled():
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)

        layer.forward = forward
        count += 1
    return count


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No transformers progress bars while a model is written and read back (the trainer's
    own progress bar is on screen)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def match_names(names: Iterable[str], patterns: Sequence[str], what: str) -> list[str]:
    """The names matching any ``fnmatch`` pattern (a plain name also matches its children,
    ``qformer`` matching ``qformer.layer.0.weight``); a pattern that matches nothing is a
    ``ConfigError`` naming it and ``what`` it was for."""
    names = list(names)
    chosen: set[str] = set()
    for pattern in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)
                or n.startswith(pattern + ".")]
        if not hits:
            raise ConfigError(f"{what} pattern {pattern!r} matches nothing; e.g. "
                              f"{', '.join(names[:4])} ... are there")
        chosen.update(hits)
    return [n for n in names if n in chosen]


def looks_local(name: str) -> bool:
    """True when a model name is meant as a folder rather than a hub name."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def load_image_text_to_text(model: str, dtype: str, key: str) -> tuple[Any, Any]:
    """``AutoProcessor`` and ``AutoModelForImageTextToText`` of a hub name or folder; a
    failure is a ``ConfigError`` naming the config ``key``."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        with quiet_transformers():
            processor = AutoProcessor.from_pretrained(model)
            net = AutoModelForImageTextToText.from_pretrained(model, dtype=torch_dtype(dtype))
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(
            f"{key}: cannot load an image-text-to-text model from {model!r} "
            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}). Give a hub name "
            "reachable from this machine or a folder written by save_pretrained.") from exc
    return processor, net
