"""The A2C training loop: rollout -> rewards -> returns and advantages -> loss -> update."""

from __future__ import annotations

import contextlib
import inspect
import itertools
import json
import os
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from attrs import frozen
from safetensors.torch import load_file, save_file
from torch import nn

from vlrm import rl
from vlrm.checkpoint import LAST, load_state, save_state, write_checkpoint
from vlrm.data import ImageFolder
from vlrm.distributed import World, sample_seeds
from vlrm.errors import ConfigError, TrainingError, is_real
from vlrm.evaluation import PeriodicEval, numeric
from vlrm.faults import fault_point
from vlrm.protocols import Policy, Reward, SeededSampler, Shardable, implements, require
from vlrm.rewards import CompositeReward, bind_if_policy_aware
from vlrm.sharing import share_frozen_towers
from vlrm.value_head import ValueHead

#: Step metrics that are a process's share of a whole-batch mean: added over processes.
SUMMED = ("loss/policy", "loss/value", "loss/entropy", "loss/total", "value/mean",
          "advantage/mean", "reward/nonfinite")
SEEDINGS = ("global", "per_image")
PARALLEL = ("ddp", "fsdp")


@frozen
class TrainerConfig:
    """Settings of the A2C loop. Values marked [ours] are not stated by the paper.

    Args:
        max_steps: Number of updates.
        images_per_step: N, images sampled per update.
        samples_per_image: K, captions sampled per image [ours].
        policy_lr: AdamW learning rate of the policy's trainable parts [ours: 1e-5].
        value_lr: AdamW learning rate of the value head [ours: 1e-4].
        weight_decay: AdamW weight decay [ours: 0].
        warmup_steps: Linear learning-rate warm-up [ours: 0].
        max_grad_norm: Gradient clipping norm [ours: 1.0].
        vf_coef: Value-loss weight c_v [ours: 0.5].
        ent_coef: Entropy-bonus weight c_e [ours: 0].
        gamma: Discount of the per-token returns [paper: 1].
        whiten_advantages: Normalise advantages over each batch [ours: off].
        value_detach: Train the value head on detached hidden states, so the value loss
            never moves the policy [ours: on; off = a shared trunk, as in TRL's value head].
        value_hidden: Width H' of the value head's hidden layer [ours: 256].
        save_every: Write a checkpoint every this many steps (and at the end); 0 = only at the end.
        keep_last: Keep only this many newest checkpoints; 0 = keep all.
        seed: Seeds sampling and data order.
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
    """

    max_steps: int = 1000
    images_per_step: int = 8
    samples_per_image: int = 4
    policy_lr: float = 1e-5
    value_lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    vf_coef: float = 0.5
    ent_coef: float = 0.0
    gamma: float = 1.0
    whiten_advantages: bool = False
    value_detach: bool = True
    value_hidden: int = 256
    save_every: int = 100
    keep_last: int = 3
    seed: int = 0
    sample_seeding: str = "global"
    max_nonfinite_steps: int = 10
    parallel: str = "ddp"
    progress: bool = True

    def __attrs_post_init__(self) -> None:
        at_least = {"max_steps": 1, "images_per_step": 1, "samples_per_image": 1,
                    "value_hidden": 1, "max_nonfinite_steps": 1, "policy_lr": 0.0,
                    "value_lr": 0.0, "weight_decay": 0.0, "warmup_steps": 0,
                    "max_grad_norm": 0.0, "vf_coef": 0.0, "ent_coef": 0.0, "save_every": 0,
                    "keep_last": 0}
        for key, low in at_least.items():
            value = getattr(self, key)
            if not is_real(value) or not value >= low:  # also catches NaN and null
                raise ConfigError(f"trainer.{key} must be a number >= {low}, got {value!r}")
        if not is_real(self.gamma) or not 0.0 <= self.gamma <= 1.0:
            raise ConfigError(f"trainer.gamma must be in [0, 1], got {self.gamma!r}")
        for key, allowed in (("sample_seeding", SEEDINGS), ("parallel", PARALLEL)):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"trainer.{key} must be one of {', '.join(allowed)}, "
                                  f"got {getattr(self, key)!r}")


class ActorCritic(nn.Module):
    """The policy and the value head as one module: its forward is what the A2C loss
    differentiates, so ``DistributedDataParallel`` / ``fully_shard`` can wrap it.

    Args:
        policy: The captioner (an ``nn.Module`` when wrapped for several processes).
        value_head: V(s_k).
        value_detach: Feed the value head detached hidden states.
    """

    def __init__(self, policy: Policy, value_head: ValueHead, value_detach: bool) -> None:
        super().__init__()
        self.policy, self.value_head, self.value_detach = policy, value_head, value_detach

    def forward(self, rollout: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Log-probs, entropy and values of the rollout's tokens. Shapes: (B, T) each."""
        out = self.policy.evaluate(rollout)
        return out.logprobs, out.entropy, self.values(out)

    def values(self, out: Any) -> torch.Tensor:
        """V(s_k) of a scored rollout. Shape: (B, T); with ``value_detach`` no gradient reaches
        the policy through it."""
        return self.value_head(out.hidden.detach() if self.value_detach else out.hidden)


class Trainer:
    """Trains a policy and a value head with A2C against a reward.

    Args:
        policy: The captioner.
        reward: Usually a ``CompositeReward``; its metrics are logged as ``reward/<key>``.
        data: Source of unlabelled images.
        config: Loop settings.
        output_dir: Receives ``metrics.jsonl``, ``checkpoints/`` and ``eval/``.
        evaluation: Periodic evaluation on held-out images; None = none.
        world: The processes this run spans (``vlrm.distributed.from_environment()``);
            default one process. Each rank trains on its share of every step's images.
    """

    def __init__(self, policy: Policy, reward: Reward, data: ImageFolder,
                 config: TrainerConfig, output_dir: str | Path,
                 evaluation: PeriodicEval | None = None, world: World | None = None) -> None:
        self.policy, self.reward, self.data, self.config = policy, reward, data, config
        self.evaluation = evaluation
        self.world = world or World()
        self.output_dir = Path(output_dir)
        require(policy, Policy, "policy")
        require(reward, Reward, "reward")
        self.policy_params = list(policy.trainable_parameters())
        if not self.policy_params:
            raise ConfigError(f"the policy {type(policy).__name__} has no trainable parameters: "
                              "check its `trainable` setting")
        device, dtype = self.policy_params[0].device, self.policy_params[0].dtype
        # Seeded from trainer.seed, apart from the global stream: the head starts the same
        # in every run of a config, whether or not the policy's builder seeded torch.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.value_head = ValueHead(policy.hidden_size, config.value_hidden).to(
                device, torch.float64 if dtype == torch.float64 else torch.float32)
        self.world.shard(range(config.images_per_step))  # fails early if it does not split
        if config.sample_seeding == "per_image" and not implements(policy, SeededSampler):
            raise ConfigError(f"trainer.sample_seeding per_image needs a policy whose sample() "
                              f"takes seeds (vlrm.protocols.SeededSampler); "
                              f"{type(policy).__name__}'s does not")
        bind_if_policy_aware(reward, policy)  # before wrapping: a snapshot of the initial policy
        if isinstance(reward, CompositeReward):
            reward.gather_statistics_with(self.world.all_gather)
        # Before wrapping too: FSDP turns the towers' weights into shards that cannot be hashed.
        self.shared_towers = share_frozen_towers(policy, reward)
        self.actor_critic = ActorCritic(policy, self.value_head, config.value_detach)
        self.model = self._wrap(self.actor_critic)
        self.policy_params = list(policy.trainable_parameters())  # FSDP replaces parameters
        self.optimizer = torch.optim.AdamW(
            [{"params": self.policy_params, "lr": config.policy_lr},
             {"params": list(self.value_head.parameters()), "lr": config.value_lr}],
            weight_decay=config.weight_decay)
        warmup = max(config.warmup_steps, 0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
        for name, size in self.shared_towers.items():
            self._say(f"vlrm: reward {name} is the policy's frozen copy (identical weights): "
                      f"{size / 2**20:.1f} MiB not held twice")
        self.step = 0
        self.nonfinite_in_a_row = 0
        self._resumed_rng: dict[str, Any] | None = None
        self.last_captions: list[str] = []
        self.truncate_log = False  # set by resume: drop metrics rows after the checkpoint

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
        if not self._fsdp:
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

    def _say(self, message: str) -> None:
        if self.world.is_main:
            print(message, file=sys.stderr)

    def _wrap(self, model: ActorCritic) -> nn.Module:
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

    def train_step(self, batch: list[tuple[str, Any]]) -> dict[str, float]:
        """One A2C update on the step's batch of ``(image_id, image)`` (every rank gets the
        whole batch and trains on its share); returns the step's metrics over all ranks.

        Captions whose reward is NaN or infinite are left out of the update and counted
        (``reward/nonfinite``); an update whose loss or gradient is not finite is skipped
        (``step/skipped``), and ``max_nonfinite_steps`` of them in a row stop the run.
        """
        cfg, world = self.config, self.world
        share = world.shard(batch)
        ids, images = [b[0] for b in share], [b[1] for b in share]
        with self._gathered():
            if cfg.sample_seeding == "per_image":
                first = world.rank * len(share)
                seeds = sample_seeds(cfg.seed, self.step, first, len(share))
                rollout = self.policy.sample(images, ids, cfg.samples_per_image, seeds=seeds)
            else:
                rollout = self.policy.sample(images, ids, cfg.samples_per_image)
            self.last_captions = list(rollout.captions)  # this rank's, for logging and tests
            rewards = self.reward(rollout)
        token_rewards = rewards.token if rewards.token is not None else \
            rl.place_on_last_token(rewards.sequence, rollout.mask)
        token_rewards, mask, nonfinite = rl.drop_nonfinite(token_rewards.to(rollout.mask.device),
                                                           rollout.mask)
        returns = rl.discounted_returns(token_rewards, mask, cfg.gamma)

        logprobs, entropy, values = self.model(rollout)
        num_tokens = world.all_reduce(mask.sum())
        advantages = rl.advantages(returns, values, mask, cfg.whiten_advantages,
                                   reduce=world.all_reduce)
        loss, stats = rl.a2c_loss(logprobs, values, entropy, returns, advantages, mask,
                                  cfg.vf_coef, cfg.ent_coef, num_tokens=num_tokens)
        self.optimizer.zero_grad(set_to_none=True)
        # Each rank's loss is its share of the batch mean; DDP averages gradients over the
        # ranks, so scaling by their number makes the update the whole batch's.
        (loss * world.size).backward()
        # Clipped apart: the value loss (squared returns) must not shrink the policy's step.
        policy_norm = torch.nn.utils.clip_grad_norm_(self.policy_params, cfg.max_grad_norm)
        value_norm = torch.nn.utils.clip_grad_norm_(self.value_head.parameters(), cfg.max_grad_norm)
        policy_norm, value_norm = _full(policy_norm), _full(value_norm)
        total_loss = world.all_reduce(loss.detach())
        finite = bool(torch.isfinite(total_loss) & torch.isfinite(policy_norm)
                      & torch.isfinite(value_norm))
        if finite:
            self.optimizer.step()
            self.scheduler.step()
            self.nonfinite_in_a_row = 0
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_in_a_row += 1

        kept = ~nonfinite
        metrics = {k: v.item() for k, v in stats.items()}
        metrics.update({f"reward/{k}": v for k, v in rewards.metrics.items()})
        metrics["reward/total"] = (token_rewards.sum(1)[kept].mean().item() if kept.any()
                                   else 0.0)
        metrics["reward/nonfinite"] = float(nonfinite.sum().item())
        metrics["return/mean"] = rl.masked_mean(returns, mask).item()
        metrics["grad/policy_norm"] = policy_norm.item()
        metrics["grad/value_norm"] = value_norm.item()
        metrics["caption/length"] = sum(len(c.split()) for c in rollout.captions) / len(rollout.captions)
        metrics["caption/tokens"] = rollout.lengths.float().mean().item()
        metrics["lr/policy"] = self.optimizer.param_groups[0]["lr"]
        metrics = world.reduce_metrics(metrics, summed=SUMMED)
        metrics["step/skipped"] = 0.0 if finite else 1.0
        if not finite:
            self._say(f"vlrm: step {self.step + 1} skipped: the loss or a gradient is not finite "
                      f"(loss {total_loss.item()}, policy grad norm {metrics['grad/policy_norm']}, "
                      f"value grad norm {metrics['grad/value_norm']})")
        if self.nonfinite_in_a_row >= cfg.max_nonfinite_steps:
            raise TrainingError(
                f"{self.nonfinite_in_a_row} updates in a row were skipped for a non-finite loss "
                f"or gradient (last at step {self.step + 1}); the weights are unchanged since "
                "the last good step. Lower trainer.policy_lr or trainer.max_grad_norm, give the "
                "reward terms `normalize: true` or a `clip`, or check the reward plugins "
                "(reward/* in metrics.jsonl); with policy autocast float16, try bfloat16. "
                "trainer.max_nonfinite_steps sets how many skips are allowed.")
        return metrics

    def values(self, out: Any) -> torch.Tensor:
        """V(s_k) of a scored rollout (``ActorCritic.values``). Shape: (B, T)."""
        return self.actor_critic.values(out)

    def _batches(self) -> Iterator[list[tuple[str, Any]]]:
        """The step's image batches, continuing after ``self.step`` batches (on resume)."""
        n, seed = self.config.images_per_step, self.config.seed
        if self.step and "start" in inspect.signature(self.data.batches).parameters:
            return self.data.batches(n, seed=seed, start=self.step)
        return itertools.islice(self.data.batches(n, seed=seed), self.step, None)

    def _trainable(self) -> dict[str, torch.Tensor]:
        """The policy's trainable parameters by name (``param.<i>`` for a non-module policy)."""
        if isinstance(self.policy, nn.Module):
            return {n: p for n, p in self.policy.named_parameters() if p.requires_grad}
        return {f"param.{i}": p for i, p in enumerate(self.policy_params)}

    def _named_trainable(self) -> dict[str, torch.Tensor]:
        """The policy's trainable tensors by name, whole (a collective call under FSDP)."""
        return {n: _full(p.detach()) for n, p in self._trainable().items()}

    def value_head_state(self) -> dict[str, torch.Tensor]:
        """The value head's weights as plain tensors (whole, also under FSDP)."""
        return {k: _full(v.detach()) for k, v in self.value_head.state_dict().items()}

    def save(self) -> Path | None:
        """Write a checkpoint of the current step (rank 0 writes; every rank must call it)."""
        rng = self.world.all_gather_object(_rng_state())
        optimizer = self._optimizer_state()  # collective under FSDP
        if self._fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(self.model, options=StateDictOptions(
                full_state_dict=True, cpu_offload=True))  # whole tensors on rank 0 only
            policy_state = {k.removeprefix("policy."): v for k, v in full.items()
                            if k.startswith("policy.")}
            value_head = {k.removeprefix("value_head."): v for k, v in full.items()
                          if k.startswith("value_head.")}
            trainable = {n: policy_state[n] for n in self._trainable()} if full else {}
        else:
            policy_state, value_head = None, self.value_head_state()
            trainable = self._named_trainable()
        final = None
        if self.world.is_main:
            final = self._write(trainable, value_head, optimizer, rng, policy_state)
        self.world.barrier()
        return final

    @property
    def _fsdp(self) -> bool:
        return self.world.distributed and self.config.parallel == "fsdp"

    def _write(self, trainable: dict[str, torch.Tensor], value_head: dict[str, torch.Tensor],
               optimizer: dict[str, Any], rng: list[dict[str, Any]],
               policy_state: dict[str, torch.Tensor] | None) -> Path:
        """Write the checkpoint folder atomically (rank 0) from the states gathered by ``save``."""
        def write(path: Path) -> None:
            if policy_state is None:
                self.policy.save_pretrained(str(path / "policy"))
            else:  # FSDP: the parameters are sharded; write the gathered whole tensors
                self.policy.save_pretrained(str(path / "policy"), state_dict=policy_state)
            fault_point("save", self.step)  # tests kill the run here, mid-checkpoint
            save_file({k: v.contiguous() for k, v in trainable.items()},
                      str(path / "trainable.safetensors"))
            save_file({k: v.contiguous() for k, v in value_head.items()},
                      str(path / "value_head.safetensors"))
            state = {"optimizer": optimizer, "scheduler": self.scheduler.state_dict(),
                     "rng": rng, "nonfinite_in_a_row": self.nonfinite_in_a_row}
            if isinstance(self.reward, CompositeReward):  # running reward normalisation
                state["reward"] = self.reward.state_dict()
            if hasattr(self.data, "state_dict"):
                state["data"] = self.data.state_dict()
            save_state(path, state, {"step": self.step, "hidden_size": self.policy.hidden_size,
                                     "value_hidden": self.config.value_hidden,
                                     "world_size": self.world.size,
                                     "parallel": self.config.parallel if self.world.distributed
                                     else "none",
                                     "images_per_step": self.config.images_per_step,
                                     "samples_per_image": self.config.samples_per_image,
                                     "seed": self.config.seed})

        return write_checkpoint(self.output_dir / "checkpoints", self.step, write,
                                keep_last=self.config.keep_last)

    def _optimizer_state(self) -> dict[str, Any]:
        if self._fsdp:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                                 get_optimizer_state_dict)

            return get_optimizer_state_dict(self.model, self.optimizer, options=StateDictOptions(
                full_state_dict=True, cpu_offload=True))
        return self.optimizer.state_dict()

    def resume(self, checkpoint: str | Path | None = None) -> int:
        """Continue from a checkpoint (default ``<output_dir>/checkpoints/last``): policy and
        value-head weights, optimiser, scheduler, every rank's random state, data order and
        reward normalisation. Returns the step it continues after.
        """
        path = Path(checkpoint) if checkpoint else self.output_dir / "checkpoints" / LAST
        if not (path / "trainer_state.json").is_file():
            raise ConfigError(f"cannot resume: {str(path)!r} is not a complete checkpoint "
                              "(no trainer_state.json); start without --resume, or give a "
                              "checkpoints/step-<N> folder")
        meta = json.loads((path / "trainer_state.json").read_text())
        for key in ("images_per_step", "samples_per_image", "seed", "value_hidden"):
            if key in meta and meta[key] != getattr(self.config, key):
                raise ConfigError(f"cannot resume from {str(path)!r}: it was written with "
                                  f"trainer.{key} {meta[key]}, the config says "
                                  f"{getattr(self.config, key)}; resume with the run's own config")
        if meta.get("hidden_size", self.policy.hidden_size) != self.policy.hidden_size:
            raise ConfigError(f"cannot resume from {str(path)!r}: its policy has hidden size "
                              f"{meta['hidden_size']}, the configured one {self.policy.hidden_size}")
        parallel = self.config.parallel if self.world.distributed else "none"
        if "fsdp" in (parallel, meta.get("parallel", "none")) and meta.get("parallel") != parallel:
            raise ConfigError(f"cannot resume from {str(path)!r}: written with parallel "
                              f"{meta.get('parallel')!r}, now {parallel!r}; the optimiser state of "
                              "FSDP and of DDP or one process are stored differently")
        if meta.get("world_size", 1) != self.world.size and self.config.sample_seeding == "global":
            self._say(f"vlrm: resuming on {self.world.size} processes a run written on "
                      f"{meta.get('world_size', 1)}: with sample_seeding global the captions "
                      "drawn from here on differ from the uninterrupted run's")
        if not (path / "trainable.safetensors").is_file():
            raise ConfigError(f"cannot resume from {str(path)!r}: no trainable.safetensors "
                              "(written by an older vlrm); start a new run from its policy")
        try:
            state = load_state(path)
        except FileNotFoundError as exc:
            raise ConfigError(f"cannot resume from {str(path)!r}: {exc}") from exc
        self._load_trainable(load_file(str(path / "trainable.safetensors")), path)
        self._load_value_head(load_file(str(path / "value_head.safetensors")))
        self._load_optimizer(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if isinstance(self.reward, CompositeReward) and "reward" in state:
            self.reward.load_state_dict(state["reward"])
        if "data" in state and hasattr(self.data, "load_state_dict"):
            self.data.load_state_dict(state["data"])
        rng = state.get("rng", [])
        self._resumed_rng = rng[self.world.rank] if self.world.rank < len(rng) else None
        self.nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))
        self.step = int(meta["step"])
        self.truncate_log = True
        return self.step

    def _load_trainable(self, saved: dict[str, torch.Tensor], path: Path) -> None:
        mine = set(self._trainable())
        if set(saved) != mine:
            raise ConfigError(f"cannot resume from {str(path)!r}: its trainable parameters are not "
                              "the policy's (was policy.trainable or lora changed?); missing "
                              f"{sorted(set(mine) - set(saved))[:3]}, unexpected "
                              f"{sorted(set(saved) - set(mine))[:3]}")
        params = self._trainable()
        with torch.no_grad():
            for name, value in saved.items():
                _copy_into(params[name], value)

    def _load_value_head(self, saved: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, param in self.value_head.state_dict(keep_vars=True).items():
                _copy_into(param, saved[name])

    def _load_optimizer(self, state: dict[str, Any]) -> None:
        if self._fsdp:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                                 set_optimizer_state_dict)

            set_optimizer_state_dict(self.model, self.optimizer, state,
                                     options=StateDictOptions(full_state_dict=True))
        else:
            self.optimizer.load_state_dict(state)

    def _evaluate(self, log: Any) -> None:
        """Run the periodic evaluation on rank 0; its numbers go to metrics.jsonl as ``eval/...``."""
        with self._gathered():
            if self.world.is_main:
                metrics = self.evaluation(self.policy, self.step, self.output_dir)
                row = {"step": self.step, **{f"eval/{k}": v for k, v in numeric(metrics).items()}}
                log.write(json.dumps(row) + "\n")
                log.flush()
            self.world.barrier()

    def _open_log(self) -> Any:
        """``metrics.jsonl`` for appending (rank 0), without rows past ``self.step`` that a
        run killed after its last checkpoint wrote; other ranks log nowhere."""
        if not self.world.is_main:
            return open(os.devnull, "w")
        path = self.output_dir / "metrics.jsonl"
        if self.truncate_log and path.is_file():
            # Rows up to the checkpoint stay (its step's evaluation ran before its save); at
            # step 0 the baseline evaluation runs again, so nothing stays.
            rows = [ln for ln in path.read_text().splitlines(keepends=True)
                    if 0 <= _row_step(ln) <= self.step and self.step > 0]
            tmp = path.with_name(".metrics.jsonl.partial")
            tmp.write_text("".join(rows))
            tmp.replace(path)
        return open(path, "a")

    def train(self) -> list[dict[str, float]]:
        """Run updates up to ``max_steps`` (from ``self.step``, after a resume), logging to
        ``metrics.jsonl``; returns the metrics of the steps run."""
        from tqdm.auto import tqdm

        cfg = self.config
        if self._resumed_rng is not None:
            _set_rng_state(self._resumed_rng)
        else:  # "global" sampling: each rank draws its own captions
            torch.manual_seed(cfg.seed + self.world.rank)
            random.seed(cfg.seed + self.world.rank)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        history = []
        batches = self._batches()
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="vlrm", file=sys.stderr,
                   disable=not cfg.progress or not self.world.is_main, dynamic_ncols=True)
        with self._open_log() as log:
            if self.evaluation is not None and self.step == 0:
                self._evaluate(log)  # the baseline, before any update
            while self.step < cfg.max_steps:
                start = time.perf_counter()
                try:
                    metrics = self.train_step(next(batches))
                except torch.OutOfMemoryError as exc:
                    raise TrainingError(out_of_memory_message(cfg, exc, self.world)) from exc
                self.step += 1
                metrics = {"step": self.step, **metrics,
                           "time/step_s": time.perf_counter() - start,
                           "data/skipped": len(self.data.skipped)}
                log.write(json.dumps(metrics) + "\n")
                log.flush()
                history.append(metrics)
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


def _copy_into(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a whole saved tensor into a parameter, or into this rank's FSDP2 shard of it."""
    value = value.to(param.device, param.dtype)
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value, param.device_mesh, param.placements)
    param.copy_(value)


def _full(x: torch.Tensor) -> torch.Tensor:
    """A plain tensor from an FSDP2 DTensor (itself otherwise)."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def _rng_state() -> dict[str, Any]:
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


def _set_rng_state(state: dict[str, Any]) -> None:
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

