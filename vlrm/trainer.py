"""The training loop: sample, reward, objective, update.

The estimator (A2C, GRPO, ...) is a component, ``vlrm.protocols.Objective``; checkpoints,
resuming and random states are kept by ``vlrm.run_state``.
"""

from __future__ import annotations

import contextlib
from contextlib import closing
import inspect
import itertools
import json
import math
import random
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from attrs import frozen
from torch import nn
from torch.profiler import record_function

from vlrm import rl, run_state
from vlrm.data import ImageFolder
from vlrm.distributed import World, sample_seeds
from vlrm.errors import ConfigError, TrainingError, is_real
from vlrm.evaluation import PeriodicEval, numeric
from vlrm.faults import fault_point
from vlrm.objective import (A2C, StepBatch, Targets, full_tensor, minibatch_images,
                            select_images)
from vlrm.protocols import (Logger, Objective, Policy, Reward, SeededSampler, Shardable,
                            implements, require)
from vlrm.rewards import CompositeReward, bind_if_policy_aware
from vlrm.sharing import share_frozen_towers
from vlrm.structs import PolicyOutput, RewardOutput, Rollout, Sample
from vlrm.trackers import Trackers, sample_rows

#: Step metrics that are a process's share of a whole batch's value: added over processes
#: (with every stat an objective's ``loss`` returns).
SUMMED = ("reward/nonfinite",)
SEEDINGS = ("global", "per_image")
PARALLEL = ("ddp", "fsdp")
SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(step: int, warmup: int, max_steps: int, schedule: str) -> float:
    """The learning rate of update ``step`` (0-based) as a share of the configured one:
    linear warm-up over ``warmup`` updates, then ``constant`` 1, or a ``linear`` / ``cosine``
    decay that would reach 0 at ``max_steps`` (the formulas of transformers'
    ``get_linear_schedule_with_warmup`` and ``get_cosine_schedule_with_warmup``)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min((step - warmup) / max(max_steps - warmup, 1), 1.0)
    return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


#: TrainerConfig fields that moved to the objective (A2C's init_args), for error messages.
MOVED_TO_OBJECTIVE = ("value_lr", "vf_coef", "ent_coef", "gamma", "whiten_advantages",
                      "value_detach", "value_hidden")


@frozen
class TrainerConfig:
    """Settings of the training loop. Values marked [ours] are not stated by the paper.
    The estimator's own settings (A2C's value head, GRPO's scaling, ...) are the objective's.

    Args:
        max_steps: Number of steps (a rollout and its updates each).
        images_per_step: N, images sampled per step.
        samples_per_image: K, captions sampled per image [ours].
        policy_lr: AdamW learning rate of the policy's trainable parts [ours: 1e-5].
        weight_decay: AdamW weight decay [ours: 0].
        warmup_steps: Linear learning-rate warm-up, in steps [ours: 0].
        lr_schedule: After the warm-up: ``constant``, or a ``linear`` or ``cosine`` decay
            towards 0 at ``max_steps`` (TRL's default is linear) [ours: constant]. Every
            parameter group (the critic's too) follows it.
        max_grad_norm: Gradient clipping norm, of the policy and of the objective's critic
            apart [ours: 1.0].
        save_every: Write a checkpoint every this many steps (and at the end); 0 = only at the end.
        keep_last: Keep only this many newest checkpoints; 0 = keep all.
        seed: Seeds sampling, data order and the critic's initial weights.
        sample_seeding: ``global``: captions are drawn from the global random state, as
            ``generate`` draws them; ``per_image``: each image of a step draws from its own
            generator, seeded from ``seed``, the step and the image's place in the step, so
            the run samples the same captions on any number of processes [ours: global].
        max_nonfinite_steps: Stop the run after this many updates in a row were skipped
            for a non-finite loss or gradient [ours: 10].
        parallel: With several processes (torchrun): ``ddp`` replicates the policy and
            all-reduces gradients; ``fsdp`` shards the policy's parameters over the
            processes with FSDP2 ``fully_shard`` (for a policy too big for one device).
        progress: Show a progress bar on stderr.
        samples_every: With trackers configured (``loggers:``), log a table of sampled
            images, captions, per-term rewards and advantages every this many steps
            (rank 0's share of the step, at most 16 captions); 0 = never [ours: 100].
    """

    max_steps: int = 1000
    images_per_step: int = 8
    samples_per_image: int = 4
    policy_lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    max_grad_norm: float = 1.0
    save_every: int = 100
    keep_last: int = 3
    seed: int = 0
    sample_seeding: str = "global"
    max_nonfinite_steps: int = 10
    parallel: str = "ddp"
    progress: bool = True
    samples_every: int = 100

    def __attrs_post_init__(self) -> None:
        at_least = {"max_steps": 1, "images_per_step": 1, "samples_per_image": 1,
                    "max_nonfinite_steps": 1, "policy_lr": 0.0, "weight_decay": 0.0,
                    "warmup_steps": 0, "max_grad_norm": 0.0, "save_every": 0, "keep_last": 0,
                    "samples_every": 0}
        for key, low in at_least.items():
            value = getattr(self, key)
            if not is_real(value) or not value >= low:  # also catches NaN and null
                raise ConfigError(f"trainer.{key} must be a number >= {low}, got {value!r}")
        for key, allowed in (("sample_seeding", SEEDINGS), ("parallel", PARALLEL),
                             ("lr_schedule", SCHEDULES)):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"trainer.{key} must be one of {', '.join(allowed)}, "
                                  f"got {getattr(self, key)!r}")


class Learner(nn.Module):
    """The policy and the objective's critic as one module: its forward is what the loss
    differentiates, so ``DistributedDataParallel`` / ``fully_shard`` can wrap it.

    Args:
        policy: The captioner (an ``nn.Module`` when wrapped for several processes).
        critic: The objective's critic (A2C's value head), or None.
    """

    def __init__(self, policy: Policy, critic: nn.Module | None) -> None:
        super().__init__()
        self.policy, self.critic = policy, critic

    def forward(self, rollout: Rollout) -> tuple[torch.Tensor, ...]:
        """Log-probs, entropy, hidden states and values (or None) of the rollout's tokens.
        Shapes: (B, T), (B, T), (B, T, H), (B, T)."""
        out = self.policy.evaluate(rollout)
        values = self.critic(out) if self.critic is not None else None
        return out.logprobs, out.entropy, out.hidden, values


class Trainer:
    """Trains a policy against a reward with an objective (default: the paper's A2C).

    Args:
        policy: The captioner.
        reward: Usually a ``CompositeReward``; its metrics are logged as ``reward/<key>``.
        data: Source of unlabelled images.
        config: Loop settings.
        output_dir: Receives ``metrics.jsonl``, ``checkpoints/`` and ``eval/``.
        evaluation: Periodic evaluation on held-out images; None = none.
        world: The processes this run spans (``vlrm.distributed.from_environment()``);
            default one process. Each rank trains on its share of every step's images.
        objective: The estimator and its loss (``vlrm.protocols.Objective``); default
            ``A2C()``.
        loggers: Experiment trackers by name (``vlrm.protocols.Logger``); rank 0 logs to
            them besides metrics.jsonl.
        run_config: The resolved config as plain data, handed to the trackers.
    """

    def __init__(self, policy: Policy, reward: Reward, data: ImageFolder,
                 config: TrainerConfig, output_dir: str | Path,
                 evaluation: PeriodicEval | None = None, world: World | None = None,
                 objective: Objective | None = None,
                 loggers: Mapping[str, Logger] | None = None,
                 run_config: dict[str, Any] | None = None) -> None:
        self.policy, self.reward, self.data, self.config = policy, reward, data, config
        self.run_config = run_config or {}
        self._samples: list[Sample] | None = None
        self.evaluation = evaluation
        self.world = world or World()
        self.trackers = Trackers(loggers if self.world.is_main else None)
        self.output_dir = Path(output_dir)
        self.objective = A2C() if objective is None else objective
        require(policy, Policy, "policy")
        require(reward, Reward, "reward")
        require(self.objective, Objective, "objective")
        if not list(policy.trainable_parameters()):
            raise ConfigError(f"the policy {type(policy).__name__} has no trainable parameters: "
                              "check its `trainable` setting")
        per_rank = len(self.world.shard(range(config.images_per_step)))  # fails early if uneven
        if per_rank % self.objective.minibatches:
            raise ConfigError(f"objective minibatches {self.objective.minibatches} must divide "
                              f"the {per_rank} images each process samples per step "
                              f"(trainer.images_per_step {config.images_per_step} over "
                              f"{self.world.size} process(es))")
        if config.sample_seeding == "per_image" and not implements(policy, SeededSampler):
            raise ConfigError(f"trainer.sample_seeding per_image needs a policy whose sample() "
                              f"takes seeds (vlrm.protocols.SeededSampler); "
                              f"{type(policy).__name__}'s does not")
        self.objective.setup(policy, reward, self.world, config.seed)
        bind_if_policy_aware(reward, policy)  # before wrapping: a snapshot of the initial policy
        if isinstance(reward, CompositeReward):
            reward.gather_statistics_with(self.world.all_gather)
        # Before wrapping too: FSDP turns the towers' weights into shards that cannot be hashed.
        self.shared_towers = share_frozen_towers(policy, reward)
        self.learner = Learner(policy, self.objective.critic)
        self.model = self._wrap(self.learner)
        self.policy_params = list(policy.trainable_parameters())  # FSDP replaces parameters
        self.objective_groups = self.objective.param_groups()
        self.optimizer = torch.optim.AdamW(
            [{"params": self.policy_params, "lr": config.policy_lr}, *self.objective_groups],
            weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, config.warmup_steps, config.max_steps,
                                                config.lr_schedule))
        self.step_lr = self.optimizer.param_groups[0]["lr"]
        for name, size in self.shared_towers.items():
            self.say(f"vlrm: reward {name} is the policy's frozen copy (identical weights): "
                     f"{size / 2**20:.1f} MiB not held twice")
        self.step = 0
        self.nonfinite_in_a_row = 0
        self.resumed_rng: dict[str, Any] | None = None
        self.last_captions: list[str] = []
        self.truncate_log = False  # set by resume: drop metrics rows after the checkpoint

    @property
    def value_head(self) -> nn.Module | None:
        """A2C's value head (None for an objective without one)."""
        return getattr(self.objective, "value_head", None)

    @contextlib.contextmanager
    def _gathered(self) -> Iterator[None]:
        """Whole parameters for sampling, scoring and evaluating outside the wrapped forward.

        FSDP2 keeps each rank's shard only and gathers a layer in its forward, a collective
        call; but ranks sample different numbers of tokens (each stops when its own captions
        end), so layer-by-layer gathering would pair mismatched calls. Every FSDP unit is
        gathered once for the block instead, with resharding after forward off, and resharded
        after it (the block then holds the whole policy, as one process would). A no-op
        without FSDP.
        """
        if not self.fsdp:
            yield
            return
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in self.model.modules() if isinstance(m, FSDPModule)]
        for unit in units:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()
        try:
            yield
        finally:
            for unit in units:
                unit.reshard()
                unit.set_reshard_after_forward(True, recurse=False)

    def say(self, message: str) -> None:
        """Print on rank 0 only."""
        if self.world.is_main:
            print(message, file=sys.stderr)

    @property
    def fsdp(self) -> bool:
        return self.world.distributed and self.config.parallel == "fsdp"

    def _wrap(self, model: Learner) -> nn.Module:
        """The module the loss differentiates: itself in one process, else DDP or FSDP2."""
        if not self.world.distributed:
            return model
        if not isinstance(self.policy, nn.Module):
            raise ConfigError(f"training on several processes needs a policy that is a "
                              f"torch.nn.Module; {type(self.policy).__name__} is not")
        if self.config.parallel == "fsdp":
            from torch.distributed.fsdp import fully_shard

            if not implements(self.policy, Shardable):
                raise ConfigError(f"trainer.parallel fsdp needs a policy that implements "
                                  f"vlrm.protocols.Shardable (fsdp_units(), save_pretrained(path, "
                                  f"state_dict=)); {type(self.policy).__name__} does not")
            for unit in self.policy.fsdp_units():
                fully_shard(unit)
            fully_shard(model)
            # Sampling calls the inner units outside the root's forward; the root must have
            # claimed them first, or each would make itself a root (FSDP2 has no public call
            # for this; its first forward does the same).
            model._get_fsdp_state()._lazy_init()
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.world.device] if self.world.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)

    # -- one step -----------------------------------------------------------------------

    def train_step(self, batch: list[tuple[str, Any]], is_share: bool = False) -> dict[str, float]:
        """One step on the step's batch of ``(image_id, image)`` (every rank gets the whole
        batch and trains on its share; ``is_share``: ``batch`` is already this rank's share,
        read by a source that reads shares): sample, reward, objective, update. Returns the
        step's metrics over all ranks.

        Captions whose reward is NaN or infinite are left out of the update and counted
        (``reward/nonfinite``); an update whose loss or gradient is not finite is skipped
        (``step/skipped``), and ``max_nonfinite_steps`` of them in a row stop the run.
        """
        share = list(batch) if is_share else self.world.shard(batch)
        with self._gathered():
            with record_function("vlrm.sample"):
                rollout = self._sample([b[1] for b in share], [b[0] for b in share])
            with record_function("vlrm.reward"):
                rewards = self.reward(rollout)
            with record_function("vlrm.prepare"):
                step = self._step_batch(rollout, rewards)
                targets = self.objective.prepare(step)
        every = self.config.samples_every
        if self.trackers and every and (self.step + 1) % every == 0:
            self._samples = sample_rows([b[0] for b in share], [b[1] for b in share], rollout,
                                        rewards, targets.advantages, limit=16)
        stats, norms, skipped = self._update(rollout, targets)
        return self._metrics(rollout, rewards, step, targets, stats, norms, skipped)

    def _sample(self, images: list[Any], ids: list[str]) -> Rollout:
        cfg, world = self.config, self.world
        if cfg.sample_seeding == "per_image":
            seeds = sample_seeds(cfg.seed, self.step, world.rank * len(images), len(images))
            rollout = self.policy.sample(images, ids, cfg.samples_per_image, seeds=seeds)
        else:
            rollout = self.policy.sample(images, ids, cfg.samples_per_image)
        self.last_captions = list(rollout.captions)  # this rank's, for logging and tests
        return rollout

    def _step_batch(self, rollout: Rollout, rewards: RewardOutput) -> StepBatch:
        """Per-token rewards with the non-finite captions left out."""
        token_rewards = rewards.token if rewards.token is not None else \
            rl.place_on_last_token(rewards.sequence, rollout.mask)
        token_rewards, mask, dropped = rl.drop_nonfinite(token_rewards.to(rollout.mask.device),
                                                         rollout.mask)

        @torch.no_grad()
        def values() -> torch.Tensor:
            return self.learner(rollout)[3]

        return StepBatch(rollout=rollout, rewards=token_rewards, mask=mask, valid=~dropped,
                         values=values if self.learner.critic is not None else None,
                         seed=(self.config.seed, self.step))

    def _update(self, rollout: Rollout, targets: Targets
                ) -> tuple[dict[str, float], dict[str, float], int]:
        """The objective's epochs x minibatches updates on one rollout.

        Returns the mean of each loss stat over the updates (each a process's share), the
        last update's gradient norms, and the number of updates skipped as non-finite.
        """
        obj, world, cfg = self.objective, self.world, self.config
        parts = [None] if obj.minibatches == 1 else minibatch_images(len(rollout.images),
                                                                     obj.minibatches)
        totals: dict[str, float] = {}
        updates = skipped = 0
        norms: dict[str, float] = {}
        for _ in range(obj.epochs):
            for images in parts:
                part, rows = (rollout, None) if images is None else select_images(rollout, images)
                with record_function("vlrm.score"):  # the policy's forward with gradients
                    logprobs, entropy, hidden, values = self.model(part)
                    out = PolicyOutput(logprobs=logprobs, entropy=entropy, hidden=hidden)
                    loss, stats = obj.loss(targets.select(rows), out, values)
                self.optimizer.zero_grad(set_to_none=True)
                # Each rank's loss is its share of the batch's; DDP averages gradients over
                # the ranks, so scaling by their number makes the update the whole batch's.
                with record_function("vlrm.backward"):
                    (loss * world.size).backward()
                    norms = self._clip_gradients()
                total_loss = world.all_reduce(loss.detach())
                if bool(torch.isfinite(total_loss)) and all(map(_finite, norms.values())):
                    with record_function("vlrm.optimizer"):
                        self.optimizer.step()
                    self.nonfinite_in_a_row = 0
                else:
                    self.optimizer.zero_grad(set_to_none=True)
                    self.nonfinite_in_a_row += 1
                    skipped += 1
                    self.say(f"vlrm: step {self.step + 1} skipped an update: the loss or a "
                             f"gradient is not finite (loss {total_loss.item()}, gradient norms "
                             f"{ {k: float(v) for k, v in norms.items()} })")
                updates += 1
                for key, value in stats.items():
                    totals[key] = totals.get(key, 0.0) + value.item()
        self.step_lr = self.optimizer.param_groups[0]["lr"]  # the rate this step ran at
        if skipped < updates:
            self.scheduler.step()
        if self.nonfinite_in_a_row >= cfg.max_nonfinite_steps:
            raise TrainingError(
                f"{self.nonfinite_in_a_row} updates in a row were skipped for a non-finite loss "
                f"or gradient (last at step {self.step + 1}); the weights are unchanged since "
                "the last good step. Lower trainer.policy_lr or trainer.max_grad_norm, give the "
                "reward terms `normalize: true` or a `clip`, or check the reward plugins "
                "(reward/* in metrics.jsonl); with policy autocast float16, try bfloat16. "
                "trainer.max_nonfinite_steps sets how many skips are allowed.")
        return {k: v / updates for k, v in totals.items()}, \
            {k: float(v) for k, v in norms.items()}, skipped

    def _clip_gradients(self) -> dict[str, torch.Tensor]:
        """Clip the policy's and each objective group's gradients apart (a critic's loss, on
        squared returns, must not shrink the policy's step); their norms by name."""
        limit = self.config.max_grad_norm
        norms = {"policy": torch.nn.utils.clip_grad_norm_(self.policy_params, limit)}
        for group in self.objective_groups:
            norms[group.get("name", "objective")] = torch.nn.utils.clip_grad_norm_(
                group["params"], limit)
        return {k: full_tensor(v) for k, v in norms.items()}

    def _metrics(self, rollout: Rollout, rewards: RewardOutput, step: StepBatch,
                 targets: Targets, stats: dict[str, float], norms: dict[str, float],
                 skipped: int) -> dict[str, float]:
        kept = step.valid
        token_rewards = step.rewards
        metrics = dict(stats)
        metrics.update({f"reward/{k}": v for k, v in rewards.metrics.items()})
        metrics["reward/total"] = (token_rewards.sum(1)[kept].mean().item() if kept.any()
                                   else 0.0)
        metrics["reward/nonfinite"] = float((~kept).sum().item())
        metrics["return/mean"] = rl.masked_mean(targets.returns, step.mask).item()
        metrics.update({f"grad/{name}_norm": value for name, value in norms.items()})
        metrics.update({f"objective/{k}": v for k, v in targets.stats.items()})
        metrics["caption/length"] = sum(len(c.split()) for c in rollout.captions) / len(rollout.captions)
        metrics["caption/tokens"] = rollout.lengths.float().mean().item()
        metrics["lr/policy"] = self.step_lr
        metrics = self.world.reduce_metrics(metrics, summed=(*SUMMED, *stats))
        metrics["step/skipped"] = float(skipped)
        return metrics

    def _reads_shares(self) -> bool:
        """Whether each rank reads only its own share of a batch (a source whose ``batches``
        takes ``rank`` and ``world_size``, under torchrun)."""
        params = inspect.signature(self.data.batches).parameters
        return (self.world.distributed and {"rank", "world_size", "start"} <= set(params)
                and hasattr(self.data, "state_dict") and hasattr(self.data, "load_state_dict"))

    def _batches(self) -> Iterator[list[tuple[str, Any]]]:
        """The step's image batches (this rank's share where the source reads shares),
        continuing after ``self.step`` batches (on resume)."""
        n, seed = self.config.images_per_step, self.config.seed
        if self._reads_shares():
            return self.data.batches(n, seed=seed, start=self.step, rank=self.world.rank,
                                     world_size=self.world.size)
        if self.step and "start" in inspect.signature(self.data.batches).parameters:
            return self.data.batches(n, seed=seed, start=self.step)
        return itertools.islice(self.data.batches(n, seed=seed), self.step, None)

    def _share_skipped(self) -> None:
        """Every rank learns the records the others found unreadable (each reads only its
        own), so ``data/skipped`` and the checkpoint count them all."""
        states = self.world.all_gather_object(self.data.state_dict())
        self.data.load_state_dict({"skipped": sorted({s for st in states
                                                      for s in st.get("skipped", [])})})

    def trainable(self) -> dict[str, torch.Tensor]:
        """The policy's trainable parameters by name (``param.<i>`` for a non-module policy)."""
        if isinstance(self.policy, nn.Module):
            return {n: p for n, p in self.policy.named_parameters() if p.requires_grad}
        return {f"param.{i}": p for i, p in enumerate(self.policy_params)}

    def named_trainable(self) -> dict[str, torch.Tensor]:
        """The policy's trainable tensors by name, whole (a collective call under FSDP)."""
        return {n: full_tensor(p.detach()) for n, p in self.trainable().items()}

    # -- checkpoints and the loop ---------------------------------------------------------

    def save(self) -> Path | None:
        """Write a checkpoint of the current step (rank 0 writes; every rank must call it)."""
        return run_state.save(self)

    def resume(self, checkpoint: str | Path | None = None) -> int:
        """Continue from a checkpoint (default ``<output_dir>/checkpoints/last``); returns
        the step it continues after. See ``vlrm.run_state.resume``."""
        return run_state.resume(self, checkpoint)

    def _evaluate(self, log: Any) -> None:
        """Run the periodic evaluation on rank 0; its numbers go to metrics.jsonl as ``eval/...``."""
        with self._gathered():
            if self.world.is_main:
                metrics = self.evaluation(self.policy, self.step, self.output_dir)
                row = {"step": self.step, **{f"eval/{k}": v for k, v in numeric(metrics).items()}}
                log.write(json.dumps(row) + "\n")
                log.flush()
            self.world.barrier()

    def train(self) -> list[dict[str, float]]:
        """Run steps up to ``max_steps`` (from ``self.step``, after a resume), logging to
        ``metrics.jsonl``; returns the metrics of the steps run."""
        from tqdm.auto import tqdm

        cfg = self.config
        if self.resumed_rng is not None:
            run_state.set_rng_state(self.resumed_rng)
        else:  # "global" sampling: each rank draws its own captions
            torch.manual_seed(cfg.seed + self.world.rank)
            random.seed(cfg.seed + self.world.rank)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        history = []
        batches, shares = self._batches(), self._reads_shares()
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="vlrm", file=sys.stderr,
                   disable=not cfg.progress or not self.world.is_main, dynamic_ncols=True)
        self.trackers.open(self.output_dir, self.run_config, self.step)
        with run_state.open_log(self) as log, closing(self.trackers):
            if self.evaluation is not None and self.step == 0:
                self._evaluate(log)  # the baseline, before any update
            while self.step < cfg.max_steps:
                start = time.perf_counter()
                try:
                    metrics = self.train_step(next(batches), is_share=shares)
                except torch.OutOfMemoryError as exc:
                    raise TrainingError(out_of_memory_message(cfg, exc, self.world)) from exc
                if shares:
                    self._share_skipped()
                self.step += 1
                metrics = {"step": self.step, **metrics,
                           "time/step_s": time.perf_counter() - start,
                           "data/skipped": len(self.data.skipped)}
                log.write(json.dumps(metrics) + "\n")
                log.flush()
                history.append(metrics)
                self.trackers.log_metrics(self.step, {k: v for k, v in metrics.items() if k != "step"})
                if self._samples is not None:
                    self.trackers.log_samples(self.step, self._samples)
                    self._samples = None
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['reward/total']:.3f}",
                                loss=f"{metrics['loss/total']:.3f}")
                fault_point("step", self.step)  # tests kill the run here, between checkpoints
                if self.evaluation is not None and self.evaluation.due(
                        self.step, last=self.step == cfg.max_steps):
                    self._evaluate(log)
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.max_steps:
                    self.save()
        bar.close()
        self.save()
        return history


def out_of_memory_message(cfg: TrainerConfig, exc: BaseException, world: World) -> str:
    """What to lower when a step runs out of device memory."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else "out of memory"
    per_rank = cfg.images_per_step // world.size
    return (f"out of memory during a training step ({first}). Each step samples "
            f"{per_rank} images x trainer.samples_per_image {cfg.samples_per_image} captions per "
            "process, each up to policy.init_args.max_new_tokens tokens. Without changing the run: "
            "set policy init_args autocast: bfloat16 and gradient_checkpointing: true, or lower "
            "max_new_tokens, and continue with --resume (the last checkpoint is intact). "
            "Otherwise start a new run with a lower trainer.images_per_step or "
            "trainer.samples_per_image, or, on several GPUs, trainer.parallel: fsdp to shard the "
            "policy (a run cannot resume with other batch settings or another parallel mode).")


def _finite(x: Any) -> bool:
    return bool(torch.isfinite(torch.as_tensor(x)))
