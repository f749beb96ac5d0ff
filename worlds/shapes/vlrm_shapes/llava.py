"""The shapes world's second captioner: a LLaVA-style decoder-only model.

``LlavaForConditionalGeneration`` of transformers: a vision tower, the multimodal projector
(two linear layers) and a small causal language model (Llama), with the real
``LlavaProcessor`` expanding the ``<image>`` placeholder into one token per patch. The vision
tower (``CLIPVisionModel``, 3 layers of width 64, 8-pixel patches) is pretrained
contrastively in the build against a throwaway text tower, as the BLIP-2 captioner's is, and
then frozen. The projector and the language model learn the world's biased captions by
cross-entropy; the RL demo then trains the projector alone
(``configs/shapes/llava_rs.yaml``) through the generic ``hf_captioner`` policy.

As for the BLIP-2 captioner (``vlrm_shapes.build.train_captioner``), on a random share of each
batch a learned vector of the caption's style is added to the projected image tokens, so the
language model learns to take the caption's style from its image prefix, which the
projector (all RL trains) can then steer.
"""

from __future__ import annotations

import json
import time
from typing import Any

import torch
from torch import nn

from vlrm import hookimpl
from vlrm.errors import ConfigError
from vlrm_plugins.hf_captioner import HFCaptionerPolicy, hf_captioner
from vlrm_shapes.build import (caption_kinds, optimise, pixels, pretrain_vision,
                                       word_tokenizer)
from vlrm_shapes.world import ShapesWorld, weights_dir

FOLDER = "llava_captioner"
PROMPT = "<image> <s>"  # the patches, then BOS: the caption follows
TRAINABLE = ("model.multi_modal_projector",)


def llava_config(tokenizer: Any, width: int = 64, layers: int = 2, image_size: int = 64) -> Any:
    """A tiny ``LlavaConfig``: a CLIP vision tower and a Llama, both of ``width``."""
    from transformers import LlavaConfig

    return LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=width,
                           intermediate_size=2 * width, num_hidden_layers=3, num_attention_heads=4,
                           image_size=image_size, patch_size=8, projection_dim=width),
        text_config=dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=width,
                         intermediate_size=4 * width, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default", vision_feature_layer=-1,
        projector_hidden_act="gelu")


def patch_features(vision: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """What LLaVA's projector reads: the tower's last hidden states, class token dropped
    (``vision_feature_layer -1``, strategy ``default``). Shape: (N, P, Hv)."""
    with torch.no_grad():
        return torch.cat([vision(pixel_values=images[i:i + 256], output_hidden_states=True)
                          .hidden_states[-1][:, 1:] for i in range(0, len(images), 256)])


def train_llava_captioner(model: Any, tokenizer: Any, world: ShapesWorld, features: torch.Tensor,
                          steps: int, batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
                          style_dropout: float = 0.5, progress: bool = True) -> dict[str, Any]:
    """Cross-entropy on the biased captions: projector and language model train, the vision
    features stay fixed. The layout is the policy's: patches, BOS, caption, end token.

    Args:
        model: A ``LlavaForConditionalGeneration``.
        features: ``patch_features`` of the training images. Shape: (N, P, Hv).
        style_dropout: Share of captions trained with their style vector (see module doc).
    """
    if not 0.0 <= style_dropout <= 1.0:
        raise ConfigError(f"llava captioner style_dropout must be in [0, 1], got {style_dropout}")
    projector, lm, head = model.model.multi_modal_projector, model.model.language_model, model.lm_head
    embed = lm.get_input_embeddings()
    eos, pad, bos = tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id
    torch.manual_seed(seed)
    style = nn.Embedding(4, embed.embedding_dim)
    nn.init.normal_(style.weight, 0.0, 0.5)
    kinds = caption_kinds(world, len(features))
    coin = torch.Generator().manual_seed(seed + 1)
    p = features.shape[1]

    # every caption tokenised once: (N, L) ids, end token included, padded
    rows = [tokenizer(world.biased_caption("train", i), add_special_tokens=False)["input_ids"] + [eos]
            for i in range(len(features))]
    longest = max(map(len, rows))
    all_tokens = torch.tensor([r + [pad] * (longest - len(r)) for r in rows])
    lengths = torch.tensor([len(r) for r in rows])

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        width = int(lengths[idx].max())
        tokens = all_tokens[idx, :width]
        mask = torch.arange(width)[None, :] < lengths[idx, None]
        on = (torch.rand(len(idx), generator=coin) < style_dropout).float()[:, None, None]
        patches = projector(features[idx]) + style(kinds[idx])[:, None, :] * on
        start = embed(torch.full((len(idx), 1), bos))
        inputs = torch.cat([patches, start, embed(tokens)], dim=1)
        # no attention mask: the padding comes after each caption, and causal attention never
        # lets a real token see a later one (the masked loss ignores the padding's outputs)
        hidden = lm(inputs_embeds=inputs).last_hidden_state
        logp = torch.log_softmax(head(hidden[:, p:p + width]).float(), dim=-1)  # BOS emits t_1
        logp = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        return -(logp * mask).sum() / mask.sum()

    params = [*projector.parameters(), *lm.parameters(), *head.parameters(), *style.parameters()]
    fit = optimise(batch_loss, params, len(features), steps, batch_size, lr, 0.01, seed,
                   "llava captioner", progress)
    return {**fit, "style_dropout": style_dropout}


def build_llava(weights: str = "worlds/shapes/vlrm_shapes/weights", vision_steps: int = 1000,
                steps: int = 4000, lr: float = 1e-3, seed: int = 21, style_dropout: float = 0.5,
                train_images: int = 12000, progress: bool = True) -> dict[str, Any]:
    """Build the LLaVA-style captioner into ``<weights>/llava_captioner`` and record it in
    ``build.json``.

    Args:
        weights: A built world (a folder with ``build.json``).
        vision_steps: Contrastive steps of the vision tower.
        steps: Cross-entropy steps.
        lr: Peak learning rate.
        seed: Seed of the language model's initial weights, batches and style vectors.
        style_dropout: Share of captions trained with their style vector.
        train_images: Training images rendered (the build's first ones).
        progress: Show a progress bar.
    """
    from transformers import BlipImageProcessor, LlavaForConditionalGeneration, LlavaProcessor

    from vlrm_plugins.hf_common import quiet_transformers

    start = time.perf_counter()
    folder = weights_dir(weights)
    record = json.loads((folder / "build.json").read_text())
    world = ShapesWorld(record["seed"])
    tokenizer = word_tokenizer(world)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    # the world's images are 64 x 64 already; BLIP's processor normalises as ``pixels`` does
    processor = LlavaProcessor(image_processor=BlipImageProcessor(size={"height": 64, "width": 64}),
                               tokenizer=tokenizer, patch_size=8, num_additional_image_tokens=1,
                               vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(llava_config(tokenizer))
    images = pixels([world.image("train", i) for i in range(train_images)])
    vision = model.model.vision_tower
    vision_fit = pretrain_vision(vision, tokenizer, world, images, seed + 1, vision_steps,
                                 progress=progress, desc="llava vision")
    features = patch_features(vision.eval(), images)
    fit = train_llava_captioner(model, tokenizer, world, features, steps, lr=lr, seed=seed,
                                style_dropout=style_dropout, progress=progress)
    model.generation_config.suppress_tokens = [tokenizer.pad_token_id, model.config.image_token_id]
    with quiet_transformers():
        model.eval().save_pretrained(str(folder / FOLDER))
        processor.save_pretrained(str(folder / FOLDER))
    from vlrm.checkpoint import write_policy_file

    write_policy_file(folder / FOLDER, "hf_captioner", prompt=PROMPT, trainable=list(TRAINABLE))
    record[FOLDER] = {**fit, "lr": lr, "seed": seed, "train_images": train_images,
                      "vision": vision_fit,
                      "seconds": round(time.perf_counter() - start, 1)}
    (folder / "build.json").write_text(json.dumps(record, indent=2) + "\n")
    return record[FOLDER]


def shapes_llava_captioner(weights: str | None = None, max_new_tokens: int = 20,
                           temperature: float = 1.0, trainable: tuple[str, ...] = TRAINABLE,
                           lora_rank: int = 0) -> HFCaptionerPolicy:
    """The world's LLaVA-style cross-entropy captioner as an ``hf_captioner`` policy.

    Args:
        weights: A built world; default the one shipped with vlrm.
        max_new_tokens: Longest sampled caption.
        temperature: Sampling temperature.
        trainable: Parts that train [ours: the projector alone].
        lora_rank: LoRA adapters on the language model's q/v projections (0 = none).
    """
    folder = weights_dir(weights) / FOLDER
    if not folder.is_dir():
        raise ConfigError(f"no LLaVA captioner in {str(folder.parent)!r}: build it with "
                          "`vlrm-shapes build --config configs/shapes/build.yaml`")
    return hf_captioner(str(folder), trainable=list(trainable), prompt=PROMPT,
                        max_new_tokens=max_new_tokens, temperature=temperature,
                        lora_rank=lora_rank,
                        lora_targets=("*layers.*.self_attn.q_proj", "*layers.*.self_attn.v_proj"))


@hookimpl
def vlrm_register_policies() -> dict[str, Any]:
    return {"shapes_llava_captioner": shapes_llava_captioner}
