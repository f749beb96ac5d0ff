"""Runs a few steps (A2C, or another estimator) of the real tiny models under torchrun (or alone) and saves, on
rank 0, each step's loss, gradients and captions for tests/test_distributed.py.

    torchrun --standalone --nproc_per_node=2 tests/distributed/worker.py OUT.safetensors [ddp|fsdp] [uneven] [OBJECTIVE]
    python tests/distributed/worker.py OUT.safetensors      # one process

OBJECTIVE is a key of OBJECTIVES (default a2c).
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from vlrm.distributed import from_environment, shutdown
from vlrm.objective import A2C
from vlrm.rewards import CompositeReward, RewardTerm
from vlrm.trainer import Trainer, TrainerConfig
from vlrm_plugins.blip2_opt import tiny_blip2_opt
from vlrm_plugins.bundled_photos import bundled_photos
from vlrm_plugins.clip_reward import tiny_clip_reward
from vlrm_plugins.estimators import GRPO, RLOO, SCST, DrGRPO, PPOClip
from vlrm_plugins.text_penalties import RepetitionPenalty

STEPS = 3
OBJECTIVES = {
    "a2c": lambda: A2C(value_lr=1e-4, whiten_advantages=True),
    "rloo": RLOO,
    "grpo": lambda: GRPO(scale_rewards="batch"),  # batch scaling: statistics over the ranks
    "dr_grpo": DrGRPO,
    "scst": SCST,
    "ppo_clip": lambda: PPOClip(A2C(whiten_advantages=True), epochs=2, minibatches=2, kl_coef=0.1),
}


def main(out: str, parallel: str = "ddp", uneven: str = "", objectives: str = "a2c") -> None:
    """``objectives``: comma-separated keys of OBJECTIVES, each trained from the same start
    (record keys of all but the first are prefixed with the objective's name)."""
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # as torchrun sets it: the same summation order in every run
    names = objectives.split(",")
    # Models first, as vlrm-run does: once the process group exists, transformers'
    # save_pretrained (which the tiny builders go through) writes on rank 0 only.
    policies = [tiny_blip2_opt(seed=0, max_new_tokens=8, init_std=0.5) for _ in names]
    # float64: float32 rounding differs between one batch of B and two of B/2 by ~1e-7 of
    # each gradient term, and the terms of a gradient cancel to far less than their size.
    for policy in policies:
        policy.model.double()
    clip = tiny_clip_reward(seed=1)
    world = from_environment()
    record, meta = {}, {"world": world.size}
    for i, (name, policy) in enumerate(zip(names, policies)):
        prefix = f"{name}/" if i else ""
        # A normalised term checks that every rank keeps the whole batch's running
        # statistics; the plain one keeps the mean return away from 0, where Adam's first
        # step (lr * sign of the gradient) would turn float rounding in the value head's
        # bias gradient into +-lr.
        reward = CompositeReward({
            "clip": RewardTerm(clip, weight=1.0),
            "clip_normalized": RewardTerm(clip, weight=0.5, normalize=True),
            "repeat": RewardTerm(RepetitionPenalty(), weight=1.0)})
        config = TrainerConfig(max_steps=STEPS, images_per_step=4, samples_per_image=2,
                               policy_lr=1e-5, sample_seeding="per_image", parallel=parallel,
                               save_every=0, progress=False)
        trainer = Trainer(policy, reward, bundled_photos(), config,
                          Path(out).parent / f"run-{name}", world=world,
                          objective=OBJECTIVES[name]())
        if uneven:  # ranks sample different numbers of tokens (as ranks whose captions end apart do)
            policy.max_new_tokens = 3 + 4 * world.rank
        captions = _train(trainer, policy, world, record, prefix)
        meta[f"{prefix}captions"] = captions
        meta[f"{prefix}reads_shares"] = trainer._reads_shares()
    if world.is_main:
        save_file({k: v.contiguous() for k, v in record.items()}, out)
        Path(out).with_suffix(".json").write_text(json.dumps(meta))
    shutdown(world)


def _train(trainer: Trainer, policy, world, record: dict, prefix: str) -> list:
    batches, shares = trainer._batches(), trainer._reads_shares()
    captions = []
    for step in range(STEPS):
        metrics = trainer.train_step(next(batches), is_share=shares)
        trainer.step += 1
        record[f"{prefix}loss/{step}"] = torch.tensor(metrics["loss/total"], dtype=torch.float64)
        named = trainer.named_trainable()
        for name, param in policy.named_parameters():
            if param.requires_grad:
                record[f"{prefix}grad/{step}/{name}"] = _grad(param)
        critic = trainer.objective.critic
        for name, param in (critic.value_head.named_parameters() if critic is not None else ()):
            record[f"{prefix}grad/{step}/value_head.{name}"] = _grad(param)
        for name, value in named.items():
            record[f"{prefix}weight/{step}/{name}"] = value.clone()
        for name, value in trainer.objective.state_dict().items():
            record[f"{prefix}weight/{step}/value_head.{name}"] = value.clone()
        captions.append([c for per_rank in world.all_gather_object(list(trainer.last_captions))
                         for c in per_rank])
    return captions


def _grad(param: torch.Tensor) -> torch.Tensor:
    grad = param.grad
    grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
    return grad.detach().clone()


if __name__ == "__main__":
    main(*sys.argv[1:])
