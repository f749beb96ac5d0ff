"""Faults during training: NaN / inf rewards, non-finite updates, out of memory.

The policy and the CLIP reward are the real tiny models; the faulty rewards are test doubles
wrapped around the real CLIP reward (the engine's handling is under test, not a reward).
"""

import json

import pytest
import torch
from policy_wrappers import PolicyWrapper

from vlrm.cli import run
from vlrm.errors import TrainingError
from vlrm.rewards import CompositeReward, RewardTerm
from vlrm.objective import A2C
from vlrm.structs import RewardOutput
from vlrm.trainer import Trainer, TrainerConfig


class Corrupting:
    """The real CLIP reward, with NaN / inf put on chosen captions of chosen steps."""

    def __init__(self, clip, bad: dict[int, dict[int, float]]) -> None:
        self.clip, self.bad, self.calls = clip, bad, 0

    def __call__(self, rollout):
        scores = self.clip(rollout).sequence.clone()
        for row, value in self.bad.get(self.calls, {}).items():
            scores[row] = value
        self.calls += 1
        return RewardOutput(sequence=scores)


def trainer_for(policy, reward, tmp_path, **overrides):
    from vlrm_plugins.bundled_photos import bundled_photos

    config = TrainerConfig(**{"max_steps": 4, "images_per_step": 2, "samples_per_image": 2,
                              "policy_lr": 1e-3, "save_every": 0,
                              "progress": False, **overrides})
    return Trainer(policy, reward, bundled_photos(), config, tmp_path, objective=A2C(value_lr=1e-2))


def weights(trainer):
    return {k: v.clone() for k, v in {**trainer.named_trainable(),
                                      **trainer.objective.state_dict()}.items()}


def all_finite(tensors):
    return all(bool(torch.isfinite(t).all()) for t in tensors.values())


def test_nonfinite_rewards_are_masked_counted_and_never_reach_the_weights(
        tiny_policy_factory, tiny_clip, tmp_path):
    policy = tiny_policy_factory(seed=0, max_new_tokens=6)
    bad = {0: {0: float("nan")}, 1: {1: float("inf"), 3: float("-inf")}, 3: {2: float("nan")}}
    reward = CompositeReward({
        "clip": RewardTerm(Corrupting(tiny_clip, bad), weight=1.0, normalize=True)})
    trainer = trainer_for(policy, reward, tmp_path)
    before = weights(trainer)
    history = trainer.train()

    assert [h["reward/nonfinite"] for h in history] == [1, 2, 0, 1]
    assert all(h["step/skipped"] == 0 for h in history)  # the rest of each batch trained
    assert all(torch.isfinite(torch.tensor(h["reward/total"])) for h in history)
    assert all(torch.isfinite(torch.tensor(h["loss/total"])) for h in history)
    after = weights(trainer)
    assert all_finite(after) and any(not torch.equal(after[k], before[k]) for k in after)
    moments = reward.moments["clip"]  # the running normalisation never saw a NaN
    assert moments.count == 4 * 4 - 4 and all(map(lambda v: v == v, (moments.mean, moments.var)))
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward/nonfinite"] for r in logged] == [1, 2, 0, 1]


class Overflowing:
    """Finite per-token rewards whose sum overflows float32: the returns, and so the loss,
    become infinite on the chosen steps."""

    def __init__(self, clip, steps) -> None:
        self.clip, self.steps, self.calls = clip, set(steps), 0

    def __call__(self, rollout):
        token = torch.zeros(rollout.mask.shape)
        if self.calls in self.steps:
            token = torch.where(rollout.mask, torch.tensor(3e38), token)
        self.calls += 1
        return RewardOutput(sequence=self.clip(rollout).sequence, token=token)


def test_a_nonfinite_update_is_skipped_and_the_run_goes_on(tiny_policy_factory, tiny_clip, tmp_path):
    policy = tiny_policy_factory(seed=0, max_new_tokens=6)
    trainer = trainer_for(policy, Overflowing(tiny_clip, steps=[1]), tmp_path)
    batches = trainer._batches()
    trainer.train_step(next(batches))
    before = weights(trainer)
    metrics = trainer.train_step(next(batches))
    assert metrics["step/skipped"] == 1 and not torch.isfinite(torch.tensor(metrics["loss/total"]))
    after = weights(trainer)
    assert all(torch.equal(after[k], before[k]) for k in before)  # nothing moved
    assert trainer.nonfinite_in_a_row == 1
    metrics = trainer.train_step(next(batches))
    assert metrics["step/skipped"] == 0 and trainer.nonfinite_in_a_row == 0
    assert all_finite(weights(trainer))


def test_too_many_nonfinite_updates_in_a_row_stop_the_run_with_advice(
        tiny_policy_factory, tiny_clip, tmp_path):
    policy = tiny_policy_factory(seed=0, max_new_tokens=6)
    trainer = trainer_for(policy, Overflowing(tiny_clip, steps=range(100)), tmp_path,
                          max_steps=10, max_nonfinite_steps=3)
    before = weights(trainer)
    with pytest.raises(TrainingError) as info:
        trainer.train()
    message = str(info.value)
    assert "3 updates in a row" in message and "policy_lr" in message
    assert "max_nonfinite_steps" in message
    assert trainer.step == 2  # the third skipped update raised before it was counted
    after = weights(trainer)
    assert all(torch.equal(after[k], before[k]) for k in before)


class OutOfMemoryPolicy(PolicyWrapper):
    """The real policy, whose sampling raises the error a GPU raises when memory runs out."""

    def sample(self, images, image_ids, num_samples):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_names_the_knobs_to_lower(tiny_policy_factory, tiny_clip, tmp_path):
    policy = OutOfMemoryPolicy(tiny_policy_factory(seed=0, max_new_tokens=6))
    trainer = trainer_for(policy, tiny_clip, tmp_path)
    with pytest.raises(TrainingError) as info:
        trainer.train()
    message = str(info.value)
    for knob in ("images_per_step", "samples_per_image", "max_new_tokens", "gradient_checkpointing",
                 "autocast", "--resume", "Tried to allocate 2.00 GiB"):
        assert knob in message, knob


def test_a_stopped_run_exits_1_with_its_message_and_no_traceback(monkeypatch, capsys, tmp_path):
    def stop(self):
        raise TrainingError("out of memory during a training step (lower this)")

    monkeypatch.setattr(Trainer, "train", stop)
    status = run(["--config", "configs/tiny.yaml", "--output_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert status == 1
    assert "vlrm-run: stopped: out of memory during a training step" in err
    assert "Traceback" not in err
