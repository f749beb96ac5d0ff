"""The interfaces every policy, reward and evaluator plugin implements, and the optional
capabilities a policy may declare.

They are Protocols: a plugin class matches them by shape and never inherits code from
vlrm. Their parameters carry no type annotation, so an implementation may annotate them as
it likes, or not at all: ``def __call__(self, rollout)`` is a reward. Names matter (as in
the Protocol: ``rollout``, ``captions``, ...), except where a Protocol marks a parameter
positional-only with ``/``; extra parameters must have defaults. ``explain(obj, protocol)`` says what an object lacks, ``vlrm.testing``
checks a component's behaviour against its contract, and ``vlrm-run`` refuses a component
that does not fit with the same reasons.

Capabilities (``Captioner``, ``GreedySampler``, ``SeededSampler``, ``ReferenceScorer``, ``TextScorer``,
``Shardable``, ``FrozenTowers``, ``DeltaExport``) are small Protocols a policy implements when
it can: the engine and the rewards ask ``implements(policy, Capability)`` instead of looking
for attributes one by one.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

# Docstrings below use the shape letters of ``vlrm.structs`` (N images, B captions, T tokens).


@runtime_checkable
class Policy(Protocol):
    """A captioner that samples captions and scores its own samples with gradients.

    Attributes:
        hidden_size: H, the size of ``PolicyOutput.hidden`` (the value head's input).
    """

    hidden_size: int

    def sample(self, images: Any, image_ids: Any, num_samples: Any) -> Any:
        """Sample ``num_samples`` (K) captions per image, without gradients.

        Args: images (N PIL images), image_ids (N strings), num_samples (K).
        Returns: a ``vlrm.structs.Rollout`` of B = N * K captions, image-major.
        """

    def evaluate(self, rollout: Any) -> Any:
        """Log-probs, entropy and hidden states of the rollout's tokens, with gradients:
        a ``vlrm.structs.PolicyOutput``."""

    def trainable_parameters(self) -> Any:
        """The parameters the optimiser updates (an iterable); everything else stays frozen."""

    def save_pretrained(self, path: Any) -> Any:
        """Write the policy so that its native library loads it back (e.g. transformers)."""


@runtime_checkable
class Reward(Protocol):
    """Scores the captions of a rollout. Runs without gradients."""

    def __call__(self, rollout: Any) -> Any:
        """Given a ``Rollout``, return a ``vlrm.structs.RewardOutput``: per-caption (B,)
        and/or per-token (B, T) rewards."""


@runtime_checkable
class ImageSource(Protocol):
    """Training images: ``vlrm.data.ImageFolder``, or any source with the same methods
    (``vlrm_plugins.hf_datasets``: Hugging Face ``datasets``, WebDataset shards). It also
    keeps ``skipped``, a sized collection of the records found unreadable so far (logged as
    ``data/skipped``)."""

    def batches(self, batch_size, seed=0, start=0):
        """Yield lists of ``(image_id, RGB image)`` forever, in an order fixed by ``seed``
        (each epoch a new one); ``start`` skips that many batches first without decoding
        them, so a resumed run sees exactly what the first run would have.

        A source that also takes ``rank`` and ``world_size`` (the shipped ones, through
        ``vlrm.data.seeded_batches``) yields only that rank's share of each batch under
        torchrun, reading only its own records; otherwise every rank gets the whole batch
        and keeps its share."""

    def state_dict(self):
        """What a resumed run needs (the records found unreadable so far), as plain data."""

    def load_state_dict(self, state):
        """Restore ``state_dict``'s output."""


@runtime_checkable
class Logger(Protocol):
    """An experiment tracker (``vlrm_plugins.trackers``: TensorBoard, ...), chosen under
    ``loggers:``. Only rank 0 calls it; metrics.jsonl stays the record of the run."""

    def open(self, output_dir, config, step):
        """Start logging the run in ``output_dir``, or continue it after ``--resume``
        (``step``: the steps already done, 0 for a new run); ``config`` is the resolved
        config as plain data."""

    def log_metrics(self, step, metrics):
        """One step's metrics, the rows metrics.jsonl gets (``{name: number}``)."""

    def log_samples(self, step, samples):
        """A table of ``vlrm.structs.Sample``: images, captions, per-term rewards, advantages."""

    def close(self):
        """Flush and finish."""


@runtime_checkable
class Evaluator(Protocol):
    """Measures one policy's captions (a ``vlrm.evaluation.CaptionSet``: one caption per
    image, image loader, optional references); returns flat metric names, without a prefix,
    and values (numbers, or strings recording the protocol used, e.g. the CLIP backbone)."""

    def __call__(self, captions: Any) -> Any:
        """Return metrics such as ``{"r1": 0.42, "backbone": "ViT-g-14"}``."""


@runtime_checkable
class PolicyAware(Protocol):
    """Optional for rewards: a reward that needs the policy (e.g. to reuse its frozen
    language model as the reference LM) implements this; the trainer calls it once."""

    def bind_policy(self, policy: Any) -> Any:
        """Keep a reference to the policy being trained."""


@runtime_checkable
class Objective(Protocol):
    """How a step's per-token rewards become the loss (the advantage estimator and its
    loss): A2C, RLOO, GRPO, ... The trainer calls ``setup`` once, then each step
    ``prepare`` once and ``loss`` once per minibatch of each epoch (see ``vlrm.objective``).

    Attributes:
        epochs: Passes over each rollout (1 for on-policy estimators; PPO-clip more).
        minibatches: Parts of each process's images per pass (their count must divide it).
        critic: The ``nn.Module`` the objective trains beside the policy, fed the policy's
            ``PolicyOutput`` (A2C's value head), or None.
    """

    epochs: int
    minibatches: int
    critic: Any

    def setup(self, policy: Any, reward: Any, world: Any, seed: Any) -> Any:
        """Build owned state (e.g. the critic, seeded from ``seed``) for this policy; keep
        ``world.all_reduce`` for whole-batch statistics."""

    def param_groups(self) -> Any:
        """Optimiser groups (dicts with ``params``, ``lr``, ``name``) of the critic."""

    def prepare(self, batch: Any) -> Any:
        """From a ``vlrm.objective.StepBatch``, the step's ``Targets`` (no gradient)."""

    def loss(self, targets: Any, out: Any, values: Any) -> Any:
        """``(loss, stats)`` of some rows: their ``Targets``, the policy's ``PolicyOutput``
        and the critic's values (B, T) or None. Stats are detached scalars, each this
        process's share of the whole batch's value."""

    def state_dict(self) -> Any:
        """Tensors to checkpoint (empty when the objective keeps none)."""

    def load_state_dict(self, state: Any) -> Any:
        """Restore what ``state_dict`` returned (on resume)."""

    def describe(self) -> Any:
        """Settings that a resumed run must share with its checkpoint (a dict)."""


# -- Policy capabilities ---------------------------------------------------------------


@runtime_checkable
class Captioner(Protocol):
    """Deterministic captions for evaluation (``vlrm-eval``, in-training evaluation)."""

    def caption(self, images: Any, /, max_new_tokens: int = 60, num_beams: int = 1) -> Any:
        """Greedy (``num_beams`` 1) or beam-search captions of N images.

        Returns: ``(captions, lengths)``: N strings and their lengths in tokens (the end
        token included).
        """


@runtime_checkable
class GreedySampler(Protocol):
    """A policy that can return its greedy captions as a rollout (SCST's baseline)."""

    def sample(self, images: Any, image_ids: Any, num_samples: Any, /, *,
               greedy: bool = False) -> Any:
        """As ``Policy.sample``; ``greedy`` takes the most likely token at every step."""


@runtime_checkable
class SeededSampler(Protocol):
    """A policy that draws each image's samples from its own seeded generator, so a batch
    split over processes samples what one process would (``sample_seeding: per_image``)."""

    def sample(self, images: Any, image_ids: Any, num_samples: Any, /,
               seeds: Sequence[int] | None = None) -> Any:
        """As ``Policy.sample``; ``seeds`` (N ints) seed each image's generator."""


@runtime_checkable
class ReferenceScorer(Protocol):
    """A policy that can score tokens under its initial self (for a KL penalty) without a
    second copy of the model."""

    def snapshot_reference(self) -> int:
        """Fix the current policy as the reference (idempotent); return the number of
        parameters the snapshot holds."""

    def reference_logprobs(self, rollout: Any, /) -> torch.Tensor:
        """log pi_ref(t_k | image, t_<k). Shape: (B, T), zero on padding, no gradient."""


@runtime_checkable
class TextScorer(Protocol):
    """A policy whose language model scores text alone: the paper's reference LM."""

    def prepare_text_reference(self) -> None:
        """Called once before the first update by a reward that will use ``text_logprobs``:
        a policy whose language model trains snapshots its initial self here (the reference
        LM is the initial one); otherwise nothing to do."""

    def text_logprobs(self, tokens: Any, mask: Any, /) -> torch.Tensor:
        """log p(t_k | t_<k) without the image. Shapes: tokens, mask (B, T); result (B, T),
        zero on padding, no gradient."""


@runtime_checkable
class Shardable(Protocol):
    """A policy that FSDP2 can shard layer by layer (``trainer.parallel: fsdp``)."""

    def fsdp_units(self) -> list[torch.nn.Module]:
        """Modules sharded (and gathered) one at a time, innermost first."""

    def save_pretrained(self, path: Any, /, state_dict: Any = None) -> Any:
        """As ``Policy.save_pretrained``; ``state_dict`` is the policy's whole state when
        its own parameters are shards."""


@runtime_checkable
class FrozenTowers(Protocol):
    """A policy whose frozen towers (e.g. BLIP-2's ViT) a reward model may share."""

    def frozen_towers(self) -> Mapping[str, torch.nn.Module]:
        """Frozen sub-modules by attribute name (e.g. ``{"vision_model": ...}``); a reward
        whose ``model`` has an identical frozen module under the same name uses this one."""


@runtime_checkable
class DeltaExport(Protocol):
    """A policy that can write the weights it trained as a delta on its base model (the
    VLRM authors' release format) and fold adapters into a plain folder (``vlrm-export``)."""

    def delta_state_dict(self, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
        """The trained parts' state dict, loadable onto the base model with
        ``load_state_dict(delta, strict=False)``."""

    def save_merged(self, path: Any, /) -> Any:
        """Write a native folder with any adapters merged into the weights."""


# -- Matching by shape ------------------------------------------------------------------


def _members(protocol: type) -> dict[str, Any]:
    """The methods and attributes a protocol requires, by name."""
    members: dict[str, Any] = {}
    for klass in reversed(protocol.__mro__):
        if klass in (object, Protocol) or not getattr(klass, "_is_protocol", False):
            continue
        for name in getattr(klass, "__annotations__", {}):
            members[name] = None
        for name, value in vars(klass).items():
            if inspect.isfunction(value) and (name == "__call__" or not name.startswith("_")):
                members[name] = value
    return members


def _signature_problems(name: str, want: Any, have: Any, is_class: bool) -> list[str]:
    """How a method's signature differs from what vlrm calls it with."""
    try:
        sig = inspect.signature(have)
    except (TypeError, ValueError):
        return []  # builtins: trust them
    params = list(sig.parameters.values())
    if is_class and params and params[0].name in ("self", "cls"):
        params = params[1:]
    kinds = inspect.Parameter
    positional = [p for p in params if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)]
    star_args = any(p.kind is kinds.VAR_POSITIONAL for p in params)
    star_kwargs = any(p.kind is kinds.VAR_KEYWORD for p in params)
    wanted = list(inspect.signature(want).parameters.values())[1:]
    by_position = [p for p in wanted if p.kind is kinds.POSITIONAL_ONLY]
    by_keyword = [p for p in wanted if p.kind is not kinds.POSITIONAL_ONLY]
    problems = []
    if len(positional) < len(by_position) and not star_args:
        problems.append(f"{name}() takes {len(positional)} argument(s), vlrm passes "
                        f"{len(by_position)} ({', '.join(p.name for p in by_position)})")
    names = {p.name for p in params if p.kind is not kinds.POSITIONAL_ONLY}
    for i, p in enumerate(by_keyword):
        if p.kind is kinds.POSITIONAL_OR_KEYWORD and len(by_position) + i < len(positional) \
                and positional[len(by_position) + i].name != p.name:
            problems.append(f"{name}()'s parameter {positional[len(by_position) + i].name!r} must "
                            f"be named {p.name!r}")
        elif p.name not in names and not star_kwargs:
            problems.append(f"{name}() has no parameter {p.name!r}")
    known = {q.name for q in by_keyword}
    for p in positional[len(by_position):]:
        if p.default is inspect.Parameter.empty and p.name not in known:
            problems.append(f"{name}() requires {p.name!r}, which vlrm never passes")
    return problems


def _class_attribute(klass: type, name: str) -> Any:
    """An attribute defined by a class or its bases (not by its metaclass, whose
    ``__call__`` makes every class callable)."""
    return next((vars(k)[name] for k in klass.__mro__ if name in vars(k)), None)


def explain(obj: Any, protocol: type) -> list[str]:
    """What ``obj`` (an instance, or a class) lacks to implement ``protocol``.

    Checks that every method exists, is callable and can be called the way vlrm calls it
    (positional arguments by count, keyword arguments by name), and, for instances, that
    the protocol's attributes exist. Annotations are never compared.

    Returns:
        One line per problem; empty when ``obj`` fits.
    """
    is_class = inspect.isclass(obj)
    problems: list[str] = []
    for name, want in _members(protocol).items():
        if want is None:  # a data attribute, set in __init__: only instances can show it
            if not is_class and not hasattr(obj, name):
                problems.append(f"no attribute {name!r}")
            continue
        have = _class_attribute(obj, name) if is_class else getattr(obj, name, None)
        if name == "__call__" and have is None:
            problems.append("it is not callable (no __call__ method)")
        elif have is None:
            problems.append(f"no method {name}()")
        elif not callable(have) and not isinstance(have, (staticmethod, classmethod)):
            problems.append(f"{name} is not a method")
        else:
            problems += _signature_problems(name, want, getattr(obj, name), is_class)
    return problems


def implements(obj: Any, protocol: type) -> bool:
    """True when ``explain(obj, protocol)`` finds nothing missing."""
    return not explain(obj, protocol)


def require(obj: Any, protocol: type, where: str) -> None:
    """Raise a ``ConfigError`` naming ``where`` (a config key) and what ``obj`` lacks."""
    problems = explain(obj, protocol)
    if problems:
        from vlrm.errors import ConfigError

        raise ConfigError(f"{where}: {type(obj).__name__} is not a {protocol.__name__}: "
                          f"{'; '.join(problems)} (see vlrm.protocols.{protocol.__name__})")


__all__ = ["Policy", "Reward", "Evaluator", "PolicyAware", "Objective", "Captioner",
           "GreedySampler", "SeededSampler",
           "ReferenceScorer", "TextScorer", "Shardable", "FrozenTowers", "DeltaExport",
           "explain", "implements", "require"]
