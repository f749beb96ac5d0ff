"""The shapes world's VLM judge: a LLaVA-style model that answers "does the image show ...?".

The reward side of ``vlrm_plugins.vlm_judge`` in the world: a ``LlavaForConditionalGeneration``
asked ``does the image show <caption> ? answer yes or no :`` and scored by P(yes) over yes +
no. It starts from the world's LLaVA-style captioner (its frozen vision tower, projector and
language model; the word embeddings grow by the question's words) and learns to answer with
the 2-way cross-entropy of the yes and no logits at the answer position, on the reward's own
``answer_logits`` layout: patches, ``<s>``, the question with the caption, the answer next.

Each training image gives three questions: its true caption (full 70% of the time, else
partial: colours or sizes left out; answer yes), a hard negative stated alike (one colour,
size or shape changed, or two objects swapped; no), and either another image's caption
stated alike or the true caption with one invented object added (no). A true caption that
leaves objects out is never asked, so the judge was not taught whether to pay for saying
more (``full_over_partial`` in the build record says what it does).

It is a reward model like ``reward_clip`` and ``itm``: the sweep's judge (``judge_clip``) and
the world's own measures (attribute accuracy, invented objects) stay held out from it.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vlrm import hookimpl
from vlrm.errors import ConfigError
from vlrm_plugins.vlm_judge import VLMJudgeReward, vlm_judge
from vlrm_shapes.build import optimise, pixels, word_tokenizer
from vlrm_shapes.itm import hard_negative, other_caption, perturb, stated_attributes
from vlrm_shapes.llava import FOLDER as CAPTIONER, patch_features
from vlrm_shapes.world import COLOURS, SHAPES, SIZES, ShapesWorld, Thing, describe, weights_dir

FOLDER = "vlm_judge"
PROMPT = "<image> <s> does the image show {caption} ? answer yes or no :"
WORDS = ("does", "the", "show", "?", "answer", "yes", "or", "no", ":")
FULL_SHARE = 0.7


def invented(scene: tuple[Thing, ...], rng: np.random.Generator, colour: bool, size: bool) -> str:
    """The scene's caption with one more object, drawn at random, listed last."""
    extra = Thing(SHAPES[int(rng.integers(len(SHAPES)))], tuple(COLOURS)[int(rng.integers(len(COLOURS)))],
                  tuple(SIZES)[int(rng.integers(len(SIZES)))], 0, 0)
    return describe([*scene, extra], colour, size)


def _grown(captioner: Any, tokenizer: Any) -> Any:
    """A LLaVA model for ``tokenizer`` with the captioner's weights; the word rows the
    captioner has are copied, the new words' rows keep their random start."""
    from transformers import LlavaForConditionalGeneration

    from vlrm_shapes.llava import llava_config

    model = LlavaForConditionalGeneration(llava_config(tokenizer))
    state = captioner.state_dict()
    own = model.state_dict()
    with torch.no_grad():
        for name, value in own.items():
            old = state[name]
            if old.shape == value.shape:
                value.copy_(old)
            else:  # the embeddings and the output head: one row per word
                rows = min(len(old), len(value)) - 1  # the captioner's <image> row is last
                value[:rows].copy_(old[:rows])
    return model


@torch.no_grad()
def evaluate_judge(reward: VLMJudgeReward, world: ShapesWorld, images: list[Any], split: str = "test",
                   seed: int = 0) -> dict[str, float]:
    """Held-out behaviour of the judge on images 0..N-1 of ``split``: ``match_rate`` (true
    full captions with P(yes) > 0.5), ``hard_negative_accuracy`` (true full caption scored
    above its hard negative), ``random_negative_accuracy`` (above the next image's caption),
    ``invented_accuracy`` (above itself with one invented object), ``full_over_partial``
    (full above partial, where partial leaves something out)."""
    n, rng = len(images), np.random.default_rng([seed, 78])
    full = [world.full_caption(split, i) for i in range(n)]
    asked = {"hard": [hard_negative(world, split, i, rng) for i in range(n)],
             "random": [full[(i + 1) % n] for i in range(n)],
             "invented": [invented(world.scene(split, i), rng, True, True) for i in range(n)],
             "partial": [world.partial_caption(split, i) for i in range(n)]}
    rows = torch.arange(n)

    def score(captions: list[str]) -> torch.Tensor:
        return torch.cat([reward.scores(reward.answer_logits(images[i:i + 64], rows[i:i + 64] - i,
                                                             captions[i:i + 64]))
                          for i in range(0, n, 64)])

    keys = {"hard": "hard_negative_accuracy", "random": "random_negative_accuracy",
            "invented": "invented_accuracy", "partial": "full_over_partial"}
    true = score(full)
    out = {"match_rate": (true > 0.5).double().mean().item(), "eval_images": n}
    for name, captions in asked.items():
        keep = torch.tensor([c != f for c, f in zip(captions, full)])
        out[keys[name]] = (true > score(captions))[keep].double().mean().item()
    return out


def yes_no_logits(model: Any, tokenizer: Any, features: torch.Tensor,
                  captions: list[str]) -> torch.Tensor:
    """The yes and no logits of each caption's question, from fixed vision features: the
    layout the reward scores (patches, then ``PROMPT`` with the caption), in one batch.

    Args:
        model: The judge's ``LlavaForConditionalGeneration``.
        features: ``patch_features`` of each caption's image. Shape: (B, P, Hv).
        captions: B captions.

    Returns:
        Shape: (B, 2), float32: the yes logit, then the no logit.
    """
    projector, lm, head = model.model.multi_modal_projector, model.model.language_model, model.lm_head
    before, after = PROMPT.split("{caption}")
    start = tokenizer(before.replace("<image>", ""), add_special_tokens=False)["input_ids"]
    ids = [start + tokenizer(c + after, add_special_tokens=False)["input_ids"] for c in captions]
    width = max(map(len, ids))
    tokens = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in ids])
    embeds = torch.cat([projector(features), lm.get_input_embeddings()(tokens)], dim=1)
    hidden = lm(inputs_embeds=embeds).last_hidden_state
    last = torch.tensor([features.shape[1] + len(r) - 1 for r in ids])  # right padding: unread
    return head(hidden[torch.arange(len(ids)), last])[:, tokenizer.convert_tokens_to_ids(["yes", "no"])].float()


def train_judge(model: Any, tokenizer: Any, world: ShapesWorld, features: torch.Tensor,
                steps: int, batch_size: int = 32, lr: float = 1e-3, seed: int = 31,
                full_share: float = FULL_SHARE, progress: bool = True) -> dict[str, Any]:
    """Yes/no cross-entropy on three questions per image (see the module docstring): the
    projector, language model and head train, the vision features stay fixed.

    Args:
        model: A ``LlavaForConditionalGeneration`` for ``tokenizer``.
        features: ``patch_features`` of training images 0..N-1. Shape: (N, P, Hv).
    """
    rng = np.random.default_rng([seed, 2])

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        captions = []
        for i in idx.tolist():
            scene = world.scene("train", i)
            true = describe(scene) if rng.random() < full_share else world.partial_caption("train", i)
            colour, size = stated_attributes(true)
            third = (other_caption(world, scene, true, colour, size, len(features), rng)
                     if rng.random() < 0.5 else invented(scene, rng, colour, size))
            captions += [true, describe(perturb(scene, rng, colour, size), colour, size), third]
        labels = torch.tensor([0, 1, 1] * len(idx))  # index 0 = yes
        logits = yes_no_logits(model, tokenizer, features[idx].repeat_interleave(3, dim=0), captions)
        return F.cross_entropy(logits, labels)

    params = [*model.model.multi_modal_projector.parameters(),
              *model.model.language_model.parameters(), *model.lm_head.parameters()]
    for param in params:
        param.requires_grad_(True)
    model.train()
    fit = optimise(batch_loss, params, len(features), steps, batch_size, lr, 0.01, seed,
                   "vlm judge", progress)
    model.eval()
    return {**fit, "full_share": full_share}


def build_vlm_judge(weights: str = "worlds/shapes/vlrm_shapes/weights", steps: int = 2000,
                    lr: float = 1e-3, seed: int = 31, batch_size: int = 32,
                    train_images: int = 12000, eval_images: int = 300,
                    progress: bool = True) -> dict[str, Any]:
    """Train the world's VLM judge into ``<weights>/vlm_judge`` from its LLaVA-style
    captioner, and record it in ``build.json``.

    Args:
        weights: A built world with ``llava_captioner/``.
        steps: Optimiser steps.
        lr: Peak learning rate.
        seed: Seed of the new word rows, batches and negatives.
        batch_size: Images per step (three questions each).
        train_images: Training images rendered (the train split's first ones).
        eval_images: Test images of the held-out accuracies (0 = skip).
        progress: Show a progress bar.
    """
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    from vlrm_plugins.hf_common import quiet_transformers

    started = time.perf_counter()
    folder = weights_dir(weights)
    if not (folder / CAPTIONER).is_dir():
        raise ConfigError(f"the built shapes world {str(folder)!r} has no {CAPTIONER}/: build it "
                          "with `vlrm-shapes llava` first")
    record = json.loads((folder / "build.json").read_text())
    world = ShapesWorld(record["seed"])
    with quiet_transformers():
        captioner = LlavaForConditionalGeneration.from_pretrained(str(folder / CAPTIONER))
        old = LlavaProcessor.from_pretrained(str(folder / CAPTIONER))
    tokenizer = word_tokenizer(world, extra_words=WORDS)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    processor = LlavaProcessor(image_processor=old.image_processor, tokenizer=tokenizer,
                               patch_size=8, num_additional_image_tokens=1,
                               vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = _grown(captioner, tokenizer)
    images = pixels([world.image("train", i) for i in range(train_images)])
    features = patch_features(model.model.vision_tower.eval(), images)
    fit = train_judge(model, tokenizer, world, features, steps, batch_size, lr, seed,
                      progress=progress)
    out = folder / FOLDER
    with quiet_transformers():
        model.save_pretrained(str(out))
        processor.save_pretrained(str(out))
    entry: dict[str, Any] = {**fit, "lr": lr, "seed": seed, "batch_size": batch_size,
                             "train_images": train_images, "init": CAPTIONER}
    if eval_images > 0:
        reward = shapes_vlm_judge(str(folder))
        entry.update(evaluate_judge(reward, world, [world.image("test", i) for i in range(eval_images)],
                                    seed=seed))
    entry["seconds"] = round(time.perf_counter() - started, 1)
    record[FOLDER] = entry
    (folder / "build.json").write_text(json.dumps(record, indent=2) + "\n")
    return entry


def shapes_vlm_judge(weights: str | None = None, score: str = "yes_no",
                     scale: float = 1.0) -> VLMJudgeReward:
    """The world's VLM judge as a ``vlm_judge`` reward (its prompt, P(yes) over yes + no)."""
    folder = weights_dir(weights) / FOLDER
    if not folder.is_dir():
        raise ConfigError(f"the built shapes world {str(folder.parent)!r} has no {FOLDER}/ model; "
                          "train one with `vlrm-shapes vlm_judge`")
    return vlm_judge(str(folder), prompt=PROMPT, score=score, scale=scale)


@hookimpl
def vlrm_register_rewards() -> dict[str, Any]:
    return {"shapes_vlm_judge": shapes_vlm_judge}
