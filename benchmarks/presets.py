"""Model presets for the benchmarks: real transformers / open_clip classes, random weights.

- ``tiny``: the test-suite sizes (well under a million parameters per tower, 32 px).
- ``small``: tens of millions of parameters per model, 96 px images; CPU-friendly.
- ``paper``: the paper's architectures built from their configs (BLIP-2 OPT-2.7B, BLIP-2
  ITM ViT-g, CLIP ViT-L-14), bf16, random weights, nothing downloaded. Its parameter
  counts come from the meta device anywhere; running it needs a GPU.

The tokenizers are real: GPT-2 BPE for OPT (the vocabulary OPT uses) and for the ITM
Q-Former (the released ITM model uses BERT's, which cannot be fetched here; the embedding
table is 50k rows instead of 30k), CLIP's own BPE for open_clip.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import attrs
import torch
from attrs import frozen

PRESETS = ("tiny", "small", "paper")


@frozen
class Preset:
    """Everything a benchmark needs: a policy, two reward models and real images.

    Attributes:
        name: tiny, small or paper.
        policy: A ``Blip2OptPolicy``.
        clip: A ``ClipReward``.
        itm: A ``Blip2ItmReward``.
        images: N real photographs (PIL), the images of one step.
        image_ids: Their ids (file paths).
        samples_per_image: K.
    """

    name: str
    policy: Any
    clip: Any
    itm: Any
    images: list[Any]
    image_ids: list[str]
    samples_per_image: int = 4


# Sizes of the CPU presets: policy, CLIP and ITM factory arguments, and N images per step.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(policy=dict(max_new_tokens=20), clip=dict(), itm=dict(), images=4),
    "small": dict(
        policy=dict(image_size=96, vision_hidden=384, qformer_hidden=384, text_hidden=512,
                    num_layers=4, num_query_tokens=32, max_new_tokens=20),
        clip=dict(embed_dim=256, width=384, layers=4, image_size=96, context_length=77),
        itm=dict(image_size=96, hidden=384, num_layers=4, num_query_tokens=32),
        images=8),
}


def photos(n: int) -> tuple[list[Any], list[str]]:
    """The first ``n`` of scikit-image's bundled photographs (real image files), cycled."""
    from vlrm_plugins.bundled_photos import bundled_photos

    folder = bundled_photos()
    paths = [folder.paths[i % len(folder.paths)] for i in range(n)]
    return [folder.load(p) for p in paths], [f"{p}#{i}" for i, p in enumerate(paths)]


def with_images(preset: Preset, n: int | None) -> Preset:
    """The preset with ``n`` images a step instead of its own (None or 0: unchanged)."""
    if not n:
        return preset
    images, ids = photos(n)
    return attrs.evolve(preset, images=images, image_ids=ids)


def build_preset(name: str, seed: int = 0) -> Preset:
    """Build the ``tiny`` or ``small`` preset on the CPU, or ``paper`` on the GPU."""
    if name == "paper":
        return build_paper_preset()
    if name not in SIZES:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    from vlrm_plugins.blip2_itm_reward import tiny_blip2_itm_reward
    from vlrm_plugins.blip2_opt import tiny_blip2_opt
    from vlrm_plugins.clip_reward import tiny_clip_reward

    size = SIZES[name]
    images, ids = photos(size["images"])
    return Preset(name, tiny_blip2_opt(seed=seed, **size["policy"]),
                  tiny_clip_reward(seed=seed + 1, **size["clip"]),
                  tiny_blip2_itm_reward(seed=seed + 2, **size["itm"]), images, ids)


# The long-prompt captioner (LLaVA layout, 128 px images in 8 px patches: 256 image tokens
# plus the chat template's, as LLaVA-family prompts run to hundreds of tokens): tower widths.
LONG_PROMPT: dict[str, dict[str, int]] = {
    "tiny": dict(vision=32, text=32, layers=2),
    "small": dict(vision=256, text=512, layers=4),
}


def long_prompt_captioner(name: str, max_new_tokens: int = 20, shared_prefill: bool = True,
                          seed: int = 0) -> Any:
    """An ``HFCaptionerPolicy`` on a random-weight ``LlavaForConditionalGeneration`` whose
    prompt is 256 image tokens + the template's; the processor and tokenizer are
    ``vlrm_plugins.hf_tiny``'s LLaVA ones (real classes), the towers sized by ``LONG_PROMPT``.
    ``shared_prefill=False`` samples with one ``generate(num_return_sequences=K)``."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from vlrm_plugins.hf_captioner import HFCaptionerPolicy
    from vlrm_plugins.hf_tiny import build_tiny_captioner

    size = LONG_PROMPT["small" if name == "paper" else name]
    tiny, processor, spec = build_tiny_captioner("llava", seed=seed, image_size=128)
    base = tiny.config
    vision = dict(base.vision_config.to_dict(), hidden_size=size["vision"],
                  intermediate_size=4 * size["vision"], num_hidden_layers=size["layers"],
                  num_attention_heads=max(2, size["vision"] // 64), projection_dim=size["vision"])
    text = dict(base.text_config.to_dict(), hidden_size=size["text"],
                intermediate_size=4 * size["text"], num_hidden_layers=size["layers"],
                num_attention_heads=max(4, size["text"] // 64),
                num_key_value_heads=max(2, size["text"] // 128), max_position_embeddings=1024)
    torch.manual_seed(seed)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=base.image_token_index,
                         vision_feature_select_strategy="default", vision_feature_layer=-1,
                         projector_hidden_act="gelu")
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.suppress_tokens = tiny.generation_config.suppress_tokens
    return HFCaptionerPolicy(model, processor, trainable=list(spec.trainable), prompt=spec.prompt,
                             max_new_tokens=max_new_tokens, shared_prefill=shared_prefill)


def paper_configs(vocab_size: int = 50272, itm_vocab_size: int = 30523) -> dict[str, Any]:
    """transformers configs of BLIP-2 OPT-2.7B and BLIP-2 ITM ViT-g, from the released
    models' published sizes (ViT-g: 1408 wide, 39 layers, 224 px / 14 px patches;
    Q-Former: BERT-base, 32 queries; OPT-2.7B: 2560 wide, 32 layers)."""
    from transformers import Blip2Config

    vision = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39,
                  num_attention_heads=16, image_size=224, patch_size=14)
    qformer = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, encoder_hidden_size=1408)
    opt = dict(model_type="opt", hidden_size=2560, ffn_dim=10240, num_hidden_layers=32,
               num_attention_heads=32, vocab_size=vocab_size, max_position_embeddings=2048,
               word_embed_proj_dim=2560, bos_token_id=2, eos_token_id=2, pad_token_id=1)
    policy = Blip2Config(vision_config=vision, qformer_config=qformer, text_config=opt,
                         num_query_tokens=32)
    itm = Blip2Config(vision_config=vision,
                      qformer_config=dict(qformer, vocab_size=itm_vocab_size,
                                          use_qformer_text_input=True),
                      num_query_tokens=32, image_text_hidden_size=256)
    return {"policy": policy, "itm": itm}


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def paper_parameter_bytes() -> dict[str, int]:
    """Parameter bytes (bf16) of the paper's models and towers, counted on the meta device.

    Keys: ``policy``, ``policy.vision_model``, ``policy.language_model``, ``itm``,
    ``itm.vision_model``, ``clip`` (open_clip ViT-L-14).
    """
    import open_clip
    from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

    from vlrm.sharing import parameter_bytes

    configs = paper_configs()
    with torch.device("meta"), _default_dtype(torch.bfloat16):
        policy = Blip2ForConditionalGeneration(configs["policy"])
        itm = Blip2ForImageTextRetrieval(configs["itm"])
        clip = open_clip.create_model("ViT-L-14", pretrained=None, device="meta")
    half = 2 / 4 if next(clip.parameters()).dtype == torch.float32 else 1  # bf16 bytes
    return {
        "policy": parameter_bytes(policy),
        "policy.vision_model": parameter_bytes(policy.vision_model),
        "policy.language_model": parameter_bytes(policy.language_model),
        "itm": parameter_bytes(itm),
        "itm.vision_model": parameter_bytes(itm.vision_model),
        "clip": int(parameter_bytes(clip) * half),
    }


def build_paper_preset(images: int = 32) -> Preset:
    """The paper's architectures with random weights in bf16 on the GPU (the trainable
    Q-Former, queries and projection in fp32, as ``blip2_opt`` keeps them), the ITM ViT-g
    sharing the policy's frozen ViT-g, and open_clip's ViT-L-14."""
    if not torch.cuda.is_available():
        raise RuntimeError("the paper preset needs a CUDA GPU (its parameter counts do not: "
                           "see paper_parameter_bytes)")
    import open_clip
    from transformers import (Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval,
                              Blip2Processor, BlipImageProcessor)

    from vlrm_plugins.blip2_itm_reward import Blip2ItmReward
    from vlrm_plugins.blip2_opt import PAPER_TRAINABLE, Blip2OptPolicy, cast_part, gpt2_tokenizer
    from vlrm_plugins.clip_reward import ClipReward

    tokenizer = gpt2_tokenizer()
    processor = Blip2Processor(BlipImageProcessor(size={"height": 224, "width": 224}), tokenizer,
                               num_query_tokens=32)
    configs = paper_configs(itm_vocab_size=len(tokenizer))
    configs["policy"].image_token_index = tokenizer.convert_tokens_to_ids(processor.image_token.content)
    device = torch.device("cuda")
    torch.manual_seed(0)
    with device, _default_dtype(torch.bfloat16):
        model = Blip2ForConditionalGeneration(configs["policy"])
        itm_model = Blip2ForImageTextRetrieval(configs["itm"])
        clip = open_clip.create_model("ViT-L-14", pretrained=None, precision="bf16", device=device)
    for part in PAPER_TRAINABLE:
        cast_part(model, part, torch.float32)
    with torch.no_grad():
        model.query_tokens.normal_(0.0, 0.02)
        itm_model.query_tokens.normal_(0.0, 0.02)
    itm_model.vision_model.load_state_dict(model.vision_model.state_dict())  # as released
    policy = Blip2OptPolicy(model, processor, max_new_tokens=30, autocast="bfloat16")
    preprocess = open_clip.image_transform(224, is_train=False)
    pics, ids = photos(images)
    return Preset("paper", policy, ClipReward(clip, preprocess, open_clip.get_tokenizer("ViT-L-14")),
                  Blip2ItmReward(itm_model, processor), pics, ids)
