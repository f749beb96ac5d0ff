"""Runs a few A2C steps of the real tiny models under torchrun (or alone) and saves, on
rank 0, each step's loss, gradients and captions for tests/test_distributed.py.

    torchrun --standalone --nproc_per_node=2 tests/distributed/worker.py OUT.safetensors
    python tests/distributed/worker.py OUT.safetensors      # one process
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from vlrm.distributed import from_environment, shutdown
from vlrm.rewards import CompositeReward, RewardTerm
from vlrm.trainer import Trainer, TrainerConfig
from vlrm_plugins.blip2_opt import tiny_blip2_opt
from vlrm_plugins.bundled_photos import bundled_photos
from vlrm_plugins.clip_reward import tiny_clip_reward
from vlrm_plugins.text_penalties import RepetitionPenalty

STEPS = 3


def main(out: str, parallel: str = "ddp", uneven: str = "") -> None:
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # as torchrun sets it: the same summation order in every run
    # Models first, as vlrm-run does: once the process group exists, transformers'
    # save_pretrained (which the tiny builders go through) writes on rank 0 only.
    policy = tiny_blip2_opt(seed=0, max_new_tokens=8, init_std=0.5)
    # float64: float32 rounding differs between one batch of B and two of B/2 by ~1e-7 of
    # each gradient term, and the terms of a gradient cancel to far less than their size.
    policy.model.double()
    clip = tiny_clip_reward(seed=1)
    # A normalised term checks that every rank keeps the whole batch's running statistics;
    # the plain one keeps the mean return away from 0, where Adam's first step (lr * sign of
    # the gradient) would turn float rounding in the value head's bias gradient into +-lr.
    reward = CompositeReward({
        "clip": RewardTerm(clip, weight=1.0),
        "clip_normalized": RewardTerm(clip, weight=0.5, normalize=True),
        "repeat": RewardTerm(RepetitionPenalty(), weight=1.0)})
    world = from_environment()
    config = TrainerConfig(max_steps=STEPS, images_per_step=4, samples_per_image=2,
                           policy_lr=1e-5, value_lr=1e-4, whiten_advantages=True,
                           sample_seeding="per_image", parallel=parallel, save_every=0,
                           progress=False)
    trainer = Trainer(policy, reward, bundled_photos(), config, Path(out).parent / "run",
                      world=world)
    if uneven:  # ranks sample different numbers of tokens (as ranks whose captions end apart do)
        policy.max_new_tokens = 3 + 4 * world.rank
    batches = trainer._batches()
    record, captions = {}, []
    for step in range(STEPS):
        metrics = trainer.train_step(next(batches))
        trainer.step += 1
        record[f"loss/{step}"] = torch.tensor(metrics["loss/total"], dtype=torch.float64)
        named = trainer._named_trainable()
        for name, param in policy.named_parameters():
            if param.requires_grad:
                record[f"grad/{step}/{name}"] = _grad(param)
        for name, param in trainer.value_head.named_parameters():
            record[f"grad/{step}/value_head.{name}"] = _grad(param)
        for name, value in named.items():
            record[f"weight/{step}/{name}"] = value.clone()
        for name, value in trainer.value_head_state().items():
            record[f"weight/{step}/value_head.{name}"] = value.clone()
        captions.append(world.all_gather_object(list(trainer.last_captions)))
    if world.is_main:
        save_file({k: v.contiguous() for k, v in record.items()}, out)
        Path(out).with_suffix(".json").write_text(json.dumps(
            {"captions": [sum(per_rank, []) for per_rank in captions], "world": world.size}))
    shutdown(world)


def _grad(param: torch.Tensor) -> torch.Tensor:
    grad = param.grad
    grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
    return grad.detach().clone()


if __name__ == "__main__":
    main(*sys.argv[1:])
