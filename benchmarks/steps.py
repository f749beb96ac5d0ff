"""The full A2C step of VLRM (ITM reward + reference LM + penalties), vlrm's and naive; and
vlrm's GRPO step as set up against TRL's (``benchmarks.trl_peer``)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from benchmarks.naive import NaiveA2C
from vlrm.cache import EmbeddingCache
from vlrm.rewards import CompositeReward, RewardTerm
from vlrm.objective import A2C
from vlrm.trainer import Trainer, TrainerConfig
from vlrm_plugins.reference_lm import ReferenceLMReward
from vlrm_plugins.text_penalties import BadPhrasePenalty, RepetitionPenalty

REF_WEIGHT = 0.1


def penalties() -> list[Any]:
    return [BadPhrasePenalty(), RepetitionPenalty()]


def vlrm_step(preset: Any, output_dir: str) -> Callable[[], dict[str, float]]:
    """vlrm's ``Trainer.train_step`` on the preset's images. The ITM image cache is emptied
    before each step, so no step is faster for having seen the images before."""
    itm = preset.itm
    bad, repeat = penalties()
    reward = CompositeReward({"itm": RewardTerm(itm), "ref": RewardTerm(ReferenceLMReward(), REF_WEIGHT),
                              "bad": RewardTerm(bad), "repeat": RewardTerm(repeat)})
    config = TrainerConfig(samples_per_image=preset.samples_per_image, progress=False)
    trainer = Trainer(preset.policy, reward, data=None, config=config, output_dir=output_dir,
                      objective=A2C(whiten_advantages=True, value_hidden=64))
    batch = list(zip(preset.image_ids, preset.images))

    def step() -> dict[str, float]:
        itm._cache = EmbeddingCache(itm._cache.size)
        return trainer.train_step(batch)

    return step


def vlrm_grpo_step(preset: Any, output_dir: str, learning_rate: float = 1e-5
                   ) -> Callable[[], dict[str, float]]:
    """vlrm's GRPO step set up as ``benchmarks.trl_peer.TrlGrpoPeer``: ITM + bad-phrase +
    repetition rewards, group-std scaling, token-mean loss, no KL, the ITM image features
    recomputed every step."""
    from vlrm_plugins.estimators import GRPO

    itm = preset.itm
    bad, repeat = penalties()
    reward = CompositeReward({"itm": RewardTerm(itm), "bad": RewardTerm(bad),
                              "repeat": RewardTerm(repeat)})
    config = TrainerConfig(samples_per_image=preset.samples_per_image, policy_lr=learning_rate,
                           progress=False)
    trainer = Trainer(preset.policy, reward, data=None, config=config, output_dir=output_dir,
                      objective=GRPO(scale_rewards="group", aggregation="token"))
    batch = list(zip(preset.image_ids, preset.images))

    def step() -> dict[str, float]:
        itm._cache = EmbeddingCache(itm._cache.size)
        return trainer.train_step(batch)

    return step


def naive_step(preset: Any) -> Callable[[], float]:
    """``NaiveA2C.step`` on a copy of the preset's policy (its own reference copy inside)."""
    naive = NaiveA2C(copy.deepcopy(preset.policy), preset.itm, penalties(), ref_weight=REF_WEIGHT,
                     value_hidden=64)
    return lambda: naive.step(preset.images, preset.image_ids, preset.samples_per_image)
