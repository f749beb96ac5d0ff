"""BLIP-2 image-text matching reward on transformers' ``Blip2ForImageTextRetrieval``.

sim(image, caption) is the ITM head's "match" logit before softmax [paper]: the head's two
logits averaged over the query outputs, index 1 = match. An ITC mode (cosine similarity of
the projected query and text features, max over queries) is an option [ours]. The frozen
vision encoder runs once per image and its output is cached by image id.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vlrm import hookimpl
from vlrm.cache import EmbeddingCache
from vlrm.errors import ConfigError
from vlrm.structs import RewardOutput, Rollout

MODES = ("itm", "itc")


class Blip2ItmReward:
    """Image-caption similarity from BLIP-2's matching heads.

    Args:
        model: A ``Blip2ForImageTextRetrieval`` (built with ``use_qformer_text_input``).
        processor: Its ``Blip2Processor`` (image processor and tokenizer).
        mode: "itm" for the match logit [paper], "itc" for cosine similarity [ours].
        scale: Multiplies the score [ours: 1.0].
        max_length: Caption tokens kept (BLIP-2 ITM: 32 in LAVIS) [ours: 32].
        cache_size: Image features kept between steps (0 = no cache).
    """

    def __init__(self, model: Any, processor: Any, mode: str = "itm", scale: float = 1.0,
                 max_length: int = 32, cache_size: int = 10_000) -> None:
        if mode not in MODES:
            raise ConfigError(f"Blip2ItmReward.mode must be one of {MODES}, got {mode!r}")
        self.model = model.eval()
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.processor, self.tokenizer = processor, processor.tokenizer
        self.mode, self.scale, self.max_length = mode, scale, max_length
        self._cache = EmbeddingCache(cache_size)

    @property
    def device(self) -> torch.device:
        return self.model.query_tokens.device

    def image_embeds(self, images: Sequence[Any], image_ids: Sequence[str]) -> torch.Tensor:
        """Frozen vision features, cached by image id. Shape: (N, P, Hv)."""
        def compute(missing: list[int]) -> torch.Tensor:
            pixels = self.processor.image_processor(images=[images[i] for i in missing],
                                                    return_tensors="pt")["pixel_values"]
            vision = self.model.vision_model
            pixels = pixels.to(self.device, next(vision.parameters()).dtype)
            return vision(pixel_values=pixels).last_hidden_state

        return self._cache.get(image_ids, compute)

    def _text(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(list(captions), padding=True, truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def itm_logits(self, image_embeds: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        """ITM logits (B, 2) for each caption against its own image features (B, P, Hv)."""
        m = self.model
        ids, mask = self._text(captions)
        queries = m.query_tokens.expand(len(captions), -1, -1)
        q = queries.shape[1]
        embeds = m.embeddings(input_ids=ids, query_embeds=queries)
        attention = torch.cat([torch.ones((len(captions), q), dtype=mask.dtype,
                                          device=mask.device), mask], dim=1)
        hidden = m.qformer(query_embeds=embeds, query_length=q, attention_mask=attention,
                           encoder_hidden_states=image_embeds.to(queries.dtype),
                           encoder_attention_mask=torch.ones(image_embeds.shape[:-1],
                                                             dtype=torch.long, device=self.device),
                           return_dict=True).last_hidden_state
        return m.itm_head(hidden[:, :q].to(m.itm_head.weight.dtype)).mean(dim=1)

    def itc_similarity(self, image_embeds: torch.Tensor, group: torch.Tensor,
                       captions: Sequence[str]) -> torch.Tensor:
        """Cosine similarity (B,), max over the query features of each caption's image."""
        m = self.model
        queries = m.query_tokens.expand(image_embeds.shape[0], -1, -1)
        query_out = m.qformer(query_embeds=queries, encoder_hidden_states=image_embeds.to(queries.dtype),
                              encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long,
                                                                device=self.device),
                              return_dict=True).last_hidden_state
        image_feats = F.normalize(m.vision_projection(query_out), dim=-1)  # (N, Q, D)
        ids, mask = self._text(captions)
        text_out = m.qformer(query_embeds=m.embeddings(input_ids=ids), query_length=0,
                             attention_mask=mask, return_dict=True).last_hidden_state
        text_feats = F.normalize(m.text_projection(text_out[:, 0]), dim=-1)  # (B, D)
        return torch.einsum("bqd,bd->bq", image_feats[group], text_feats).amax(dim=1)

    @torch.no_grad()
    def __call__(self, rollout: Rollout) -> RewardOutput:
        image_embeds = self.image_embeds(rollout.images, rollout.image_ids)
        group = rollout.group.to(self.device)
        if self.mode == "itm":
            score = self.itm_logits(image_embeds[group], rollout.captions)[:, 1]
        else:
            score = self.itc_similarity(image_embeds, group, rollout.captions)
        return RewardOutput(sequence=(score.float() * self.scale).cpu())


def blip2_itm_reward(
    model: str = "Salesforce/blip2-itm-vit-g",
    mode: str = "itm",
    dtype: str = "float32",
    device: str = "cpu",
    scale: float = 1.0,
    max_length: int = 32,
) -> Blip2ItmReward:
    """Load a BLIP-2 ITM reward from the hub or a local transformers directory.

    Args:
        model: Hub name [paper: Salesforce/blip2-itm-vit-g] or local directory.
        mode: "itm" (match logit) [paper] or "itc" (cosine similarity) [ours].
        dtype: float32, bfloat16 or float16 for the vision encoder.
        device: Torch device.
        scale: Multiplies the score [ours: 1.0].
        max_length: Caption tokens kept [ours: 32].
    """
    from transformers import Blip2ForImageTextRetrieval, Blip2Processor

    from vlrm_plugins.hf_common import torch_dtype as _dtype

    if model.startswith((".", "/", "~")) and not Path(model).expanduser().is_dir():
        raise ConfigError(f"ITM reward: the folder {model!r} does not exist")
    try:
        processor = Blip2Processor.from_pretrained(model)
        net = Blip2ForImageTextRetrieval.from_pretrained(model, dtype=_dtype(dtype))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"ITM reward: cannot load {model!r}: {exc}") from exc
    return Blip2ItmReward(net.to(device), processor, mode=mode, scale=scale, max_length=max_length)


def tiny_blip2_itm_reward(seed: int = 0, mode: str = "itm", image_size: int = 32,
                          hidden: int = 32, num_layers: int = 2, num_query_tokens: int = 4,
                          scale: float = 1.0) -> Blip2ItmReward:
    """A random-weight ``Blip2ForImageTextRetrieval`` with the real GPT-2 BPE tokenizer,
    written and read back through the same loading code as ``blip2_itm_reward``.

    Args:
        seed: Seed of the random weights.
        mode: "itm" or "itc".
        image_size: Input resolution.
        hidden: Width of the vision encoder and Q-Former.
        num_layers: Layers of both.
        num_query_tokens: Learned queries.
        scale: Multiplies the score.
    """
    from transformers import (Blip2Config, Blip2ForImageTextRetrieval, Blip2Processor,
                              BlipImageProcessor)

    from vlrm_plugins.blip2_opt import gpt2_tokenizer
    from vlrm_plugins.hf_common import quiet_transformers

    tokenizer = gpt2_tokenizer()
    processor = Blip2Processor(BlipImageProcessor(size={"height": image_size, "width": image_size}),
                               tokenizer)
    config = Blip2Config(
        vision_config=dict(hidden_size=hidden, intermediate_size=2 * hidden,
                           num_hidden_layers=num_layers, num_attention_heads=2,
                           image_size=image_size, patch_size=8),
        qformer_config=dict(hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=num_layers, num_attention_heads=2,
                            vocab_size=len(tokenizer), max_position_embeddings=64,
                            use_qformer_text_input=True, pad_token_id=tokenizer.pad_token_id),
        num_query_tokens=num_query_tokens, image_text_hidden_size=hidden)
    torch.manual_seed(seed)
    model = Blip2ForImageTextRetrieval(config)
    with torch.no_grad():  # as in BLIP-2's own code; transformers starts them at zero
        model.query_tokens.normal_(0.0, 0.02)
    with tempfile.TemporaryDirectory() as tmp, quiet_transformers():
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        return blip2_itm_reward(tmp, mode=mode, scale=scale)


@hookimpl
def vlrm_register_rewards() -> dict[str, Any]:
    return {"blip2_itm": blip2_itm_reward, "tiny_blip2_itm": tiny_blip2_itm_reward}
