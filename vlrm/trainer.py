"""The A2C training loop: rollout -> rewards -> returns and advantages -> loss -> update."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from attrs import frozen
from safetensors.torch import save_file

from vlrm import rl
from vlrm.checkpoint import save_state, write_checkpoint
from vlrm.data import ImageFolder
from vlrm.evaluation import PeriodicEval, numeric
from vlrm.protocols import Policy, Reward
from vlrm.rewards import CompositeReward, bind_if_policy_aware
from vlrm.sharing import share_frozen_towers
from vlrm.value_head import ValueHead


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
    progress: bool = True


class Trainer:
    """Trains a policy and a value head with A2C against a reward.

    Args:
        policy: The captioner.
        reward: Usually a ``CompositeReward``; its metrics are logged as ``reward/<key>``.
        data: Source of unlabelled images.
        config: Loop settings.
        output_dir: Receives ``metrics.jsonl``, ``checkpoints/`` and ``eval/``.
        evaluation: Periodic evaluation on held-out images; None = none.
    """

    def __init__(self, policy: Policy, reward: Reward, data: ImageFolder,
                 config: TrainerConfig, output_dir: str | Path,
                 evaluation: PeriodicEval | None = None) -> None:
        self.policy, self.reward, self.data, self.config = policy, reward, data, config
        self.evaluation = evaluation
        self.output_dir = Path(output_dir)
        device = next(iter(policy.trainable_parameters())).device
        self.value_head = ValueHead(policy.hidden_size, config.value_hidden).to(device)
        self.policy_params = list(policy.trainable_parameters())
        if not self.policy_params:
            raise ValueError("the policy has no trainable parameters")
        self.optimizer = torch.optim.AdamW(
            [{"params": self.policy_params, "lr": config.policy_lr},
             {"params": list(self.value_head.parameters()), "lr": config.value_lr}],
            weight_decay=config.weight_decay)
        warmup = max(config.warmup_steps, 0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
        bind_if_policy_aware(reward, policy)
        self.shared_towers = share_frozen_towers(policy, reward)
        for name, size in self.shared_towers.items():
            print(f"vlrm: reward {name} is the policy's frozen copy (identical weights): "
                  f"{size / 2**20:.1f} MiB not held twice", file=sys.stderr)
        self.step = 0

    def train_step(self, batch: list[tuple[str, Any]]) -> dict[str, float]:
        """One A2C update on a batch of ``(image_id, image)``; returns the step's metrics."""
        cfg = self.config
        ids, images = [b[0] for b in batch], [b[1] for b in batch]
        rollout = self.policy.sample(images, ids, cfg.samples_per_image)
        rewards = self.reward(rollout)
        mask = rollout.mask
        token_rewards = rewards.token if rewards.token is not None else \
            rl.place_on_last_token(rewards.sequence, mask)
        returns = rl.discounted_returns(token_rewards.to(mask.device), mask, cfg.gamma)

        out = self.policy.evaluate(rollout)
        values = self.values(out)
        advantages = rl.advantages(returns, values, mask, cfg.whiten_advantages)
        loss, stats = rl.a2c_loss(out.logprobs, values, out.entropy, returns, advantages, mask,
                                  cfg.vf_coef, cfg.ent_coef)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # Clipped apart: the value loss (squared returns) must not shrink the policy's step.
        policy_norm = torch.nn.utils.clip_grad_norm_(self.policy_params, cfg.max_grad_norm)
        value_norm = torch.nn.utils.clip_grad_norm_(self.value_head.parameters(), cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()

        metrics = {k: v.item() for k, v in stats.items()}
        metrics.update({f"reward/{k}": v for k, v in rewards.metrics.items()})
        metrics.setdefault("reward/total", token_rewards.sum(1).mean().item())
        metrics["return/mean"] = rl.masked_mean(returns, mask).item()
        metrics["grad/policy_norm"] = policy_norm.item()
        metrics["grad/value_norm"] = value_norm.item()
        metrics["caption/length"] = sum(len(c.split()) for c in rollout.captions) / len(rollout.captions)
        metrics["caption/tokens"] = rollout.lengths.float().mean().item()
        metrics["lr/policy"] = self.optimizer.param_groups[0]["lr"]
        return metrics

    def values(self, out: Any) -> torch.Tensor:
        """V(s_k) of a scored rollout. Shape: (B, T); with ``value_detach`` no gradient reaches
        the policy through it."""
        return self.value_head(out.hidden.detach() if self.config.value_detach else out.hidden)

    def _batches(self) -> Iterator[list[tuple[str, Any]]]:
        return self.data.batches(self.config.images_per_step, seed=self.config.seed)

    def save(self) -> Path:
        """Write a checkpoint of the current step."""
        def write(path: Path) -> None:
            self.policy.save_pretrained(str(path / "policy"))
            save_file({k: v.contiguous() for k, v in self.value_head.state_dict().items()},
                      str(path / "value_head.safetensors"))
            state = {"optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(),
                     "torch_rng": torch.get_rng_state()}
            if isinstance(self.reward, CompositeReward):  # running reward normalisation
                state["reward"] = self.reward.state_dict()
            save_state(path, state, {"step": self.step, "hidden_size": self.policy.hidden_size,
                                     "value_hidden": self.config.value_hidden})

        return write_checkpoint(self.output_dir / "checkpoints", self.step, write,
                                keep_last=self.config.keep_last)

    def _evaluate(self, log: Any) -> None:
        """Run the periodic evaluation; its numbers go to metrics.jsonl as ``eval/...``."""
        metrics = self.evaluation(self.policy, self.step, self.output_dir)
        row = {"step": self.step, **{f"eval/{k}": v for k, v in numeric(metrics).items()}}
        log.write(json.dumps(row) + "\n")
        log.flush()

    def train(self) -> list[dict[str, float]]:
        """Run ``max_steps`` updates, logging to ``metrics.jsonl``; returns every step's metrics."""
        from tqdm.auto import tqdm

        cfg = self.config
        torch.manual_seed(cfg.seed)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        history = []
        batches = self._batches()
        bar = tqdm(total=cfg.max_steps, desc="vlrm", file=sys.stderr, disable=not cfg.progress,
                   dynamic_ncols=True)
        with open(self.output_dir / "metrics.jsonl", "a") as log:
            if self.evaluation is not None and self.step == 0:
                self._evaluate(log)  # the baseline, before any update
            while self.step < cfg.max_steps:
                start = time.perf_counter()
                metrics = self.train_step(next(batches))
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
                if self.evaluation is not None and self.evaluation.due(
                        self.step, last=self.step == cfg.max_steps):
                    self._evaluate(log)
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.max_steps:
                    self.save()
        bar.close()
        self.save()
        return history
