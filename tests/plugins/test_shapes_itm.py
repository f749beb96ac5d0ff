"""The shapes world's ITM reward: hard negatives, and a reduced training run end to end."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from vlrm.errors import ConfigError
from vlrm.testing import check_reward, make_rollout
from vlrm_shapes.itm import hard_negative, shapes_reward_itm
from vlrm_shapes.world import ShapesWorld, describe, parse

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "worlds" / "shapes" / "vlrm_shapes" / "weights"


def one_change(true: str, negative: str) -> str:
    """The single change from ``true`` to ``negative``: an attribute name or "swap"."""
    a, b = parse(true), parse(negative)
    assert a.grammatical and b.grammatical, (true, negative)
    assert len(a.objects) == len(b.objects), (true, negative)
    moved = [k for k, (x, y) in enumerate(zip(a.objects, b.objects)) if x != y]
    if len(moved) == 2:
        i, j = moved
        assert (a.objects[i], a.objects[j]) == (b.objects[j], b.objects[i]), (true, negative)
        return "swap"
    assert len(moved) == 1, (true, negative)
    x, y = a.objects[moved[0]], b.objects[moved[0]]
    diff = [attr for attr in ("shape", "colour", "size") if getattr(x, attr) != getattr(y, attr)]
    assert len(diff) == 1 and getattr(y, diff[0]) is not None, (true, negative)
    return diff[0]


def test_hard_negatives_change_exactly_one_thing():
    world = ShapesWorld(0)
    rng = np.random.default_rng(1)
    kinds = set()
    for i in range(400):
        true = world.full_caption("test", i)
        negative = hard_negative(world, "test", i, rng)
        assert negative != true
        assert all(o.colour and o.size for o in parse(negative).objects), negative
        kinds.add(one_change(true, negative))
    assert kinds == {"shape", "colour", "size", "swap"}


def test_hard_negatives_are_deterministic_given_the_rng():
    world = ShapesWorld(3)
    first = [hard_negative(world, "val", i, np.random.default_rng(i)) for i in range(30)]
    again = [hard_negative(world, "val", i, np.random.default_rng(i)) for i in range(30)]
    assert first == again
    scene = world.scene("val", 0)
    assert describe(scene) == world.full_caption("val", 0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from transformers import Blip2ForConditionalGeneration

    from vlrm_shapes.build import pixels
    from vlrm_shapes.itm import train_itm

    world = ShapesWorld(0)
    captioner = Blip2ForConditionalGeneration.from_pretrained(str(SHIPPED / "captioner"))
    state = {k: v.clone() for k, v in captioner.vision_model.state_dict().items()}
    images = pixels([world.image("train", i) for i in range(256)])
    out = tmp_path_factory.mktemp("itm")
    record = train_itm(world, images, state, out, steps=30, batch_size=32, progress=False,
                       eval_images=40, recall_images=10, init_qformer=captioner)
    return out, state, record


def test_training_writes_a_folder_the_itm_loader_reads(trained):
    from vlrm_plugins.blip2_itm_reward import blip2_itm_reward

    out, state, record = trained
    assert record["steps"] == 30 and record["seed"] == 5
    assert np.isfinite(record["final_loss"])
    for key in ("hard_negative_accuracy", "recall_r1", "random_negative_accuracy"):
        assert 0.0 <= record[key] <= 1.0
    reward = blip2_itm_reward(str(out))
    # the frozen vision encoder is the captioner's, unchanged by training
    loaded = reward.model.vision_model.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    world = ShapesWorld(0)
    rollout = make_rollout([[world.full_caption("test", 0), "a small red circle"],
                            [world.full_caption("test", 1)]],
                           images=[world.image("test", 0), world.image("test", 1)])
    out_ = check_reward(reward, rollout)
    assert out_.sequence.shape == (3,)
    # every word of the world's captions is in the vocabulary
    ids = reward.tokenizer(world.full_caption("test", 0))["input_ids"]
    assert reward.tokenizer.unk_token_id not in ids


def test_shapes_reward_itm_loads_a_built_world(trained, tmp_path):
    out, _, _ = trained
    world = tmp_path / "world"
    world.mkdir()
    (world / "build.json").write_text(json.dumps({"seed": 0}))
    from vlrm.errors import ConfigError

    with pytest.raises(ConfigError, match="itm"):
        shapes_reward_itm(str(world))
    shutil.copytree(out, world / "itm")
    reward = shapes_reward_itm(str(world), scale=2.0)
    assert reward.mode == "itm" and reward.scale == 2.0


def test_registered_as_a_reward():
    from vlrm_shapes import itm as shapes_itm

    assert shapes_itm.vlrm_register_rewards() == {"shapes_itm": shapes_reward_itm}


def test_build_itm_from_random_weights_records_itself_in_build_json(tmp_path):
    from vlrm_shapes.itm import build_itm

    world = tmp_path / "world"
    world.mkdir()
    (world / "build.json").write_text(json.dumps({"seed": 0, "train_images": 64}))
    shutil.copytree(SHIPPED / "captioner", world / "captioner")
    record = build_itm(str(world), steps=2, train_images=64, init_from_captioner=False,
                       progress=False, batch_size=8, eval_images=0)
    saved = json.loads((world / "build.json").read_text())
    assert saved == record and saved["train_images"] == 64
    assert saved["itm"]["steps"] == 2 and saved["itm"]["init_from_captioner"] is False
    assert "hard_negative_accuracy" not in saved["itm"]
    reward = shapes_reward_itm(str(world))
    assert reward.model.query_tokens.std() > 0  # initialised, not transformers' zeros


def test_the_shipped_itm_pays_for_saying_more():
    from vlrm_shapes.build import pixels, vision_features
    from vlrm_shapes.itm import evaluate_itm

    reward = shapes_reward_itm()
    world = ShapesWorld(0)
    features = vision_features(reward.model.vision_model,
                               pixels([world.image("test", i) for i in range(60)]))
    metrics = evaluate_itm(reward, world, features, recall_images=0, seed=5)
    # measured on 300 test images: 0.965 and 0.013
    assert metrics["full_over_partial"] > 0.8
    assert metrics["shapes_over_full"] < 0.2


def test_train_itm_rejects_a_share_outside_zero_one(tmp_path):
    from vlrm_shapes.build import pixels
    from vlrm_shapes.itm import train_itm

    world = ShapesWorld(0)
    images = pixels([world.image("train", i) for i in range(4)])
    with pytest.raises(ConfigError, match="full_share"):
        train_itm(world, images, {}, tmp_path, full_share=1.5)
