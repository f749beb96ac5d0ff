"""The straightforward implementations vlrm is measured against.

Each does the same work as vlrm's own path, the way a first, hand-written loop does it:
``generate`` per sample with the image re-encoded, rewards scored one image-caption pair
at a time, and an A2C update with separate forward passes for log-probs, values and a
second full model as the reference (as a TRL-style loop does). They reuse vlrm's tensor
math where the work is the same, so a ratio measures only the difference in method.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from transformers import GenerationConfig

from vlrm import rl
from vlrm.sampling import token_logprobs
from vlrm.structs import Rollout
from vlrm.value_head import ValueHead


def _generation_config(policy: Any, num_samples: int) -> GenerationConfig:
    return GenerationConfig(
        do_sample=True, num_return_sequences=num_samples, max_new_tokens=policy.max_new_tokens,
        temperature=policy.temperature, top_p=policy.top_p, top_k=policy.top_k,
        bos_token_id=policy.bos_token_id, eos_token_id=policy.eos_token_id,
        pad_token_id=policy.pad_token_id, suppress_tokens=policy.suppressed or None,
        output_logits=True, return_dict_in_generate=True)


@torch.no_grad()
def _generate(policy: Any, prefix: torch.Tensor, num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' generate from prompt embeddings: tokens (B, T) and their log-probs (B, T)."""
    out = policy.model.language_model.generate(
        inputs_embeds=prefix,
        attention_mask=torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device),
        generation_config=_generation_config(policy, num_samples))
    tokens = out.sequences[:, -len(out.logits):]
    logits = torch.stack(out.logits, dim=1)
    return tokens, token_logprobs(logits, tokens, policy.temperature, policy.suppressed)


def _rollout(policy: Any, images: Sequence[Any], image_ids: Sequence[str], num_samples: int,
             tokens: list[torch.Tensor], logprobs: list[torch.Tensor]) -> Rollout:
    width = max(t.shape[1] for t in tokens)
    pad = policy.pad_token_id
    tokens_bt = torch.cat([F.pad(t, (0, width - t.shape[1]), value=pad) for t in tokens])
    logprobs_bt = torch.cat([F.pad(lp, (0, width - lp.shape[1])) for lp in logprobs])
    mask = policy.generated_mask(tokens_bt)
    rows = [row[keep].tolist() for row, keep in zip(tokens_bt, mask)]
    group = torch.arange(len(images), device=tokens_bt.device).repeat_interleave(num_samples)
    return Rollout(images=list(images), image_ids=list(image_ids), group=group, tokens=tokens_bt,
                   mask=mask, logprobs=(logprobs_bt * mask).float(), captions=policy.decode(rows))


def per_sample_rollout(policy: Any, images: Sequence[Any], image_ids: Sequence[str],
                       num_samples: int) -> Rollout:
    """K separate ``generate`` calls per image, each encoding the image again."""
    tokens, logprobs = [], []
    for image in images:
        for _ in range(num_samples):
            prefix = policy.prefix_embeds(policy.encode_images([image]))
            t, lp = _generate(policy, prefix, 1)
            tokens.append(t)
            logprobs.append(lp)
    return _rollout(policy, images, image_ids, num_samples, tokens, logprobs)


def generate_rollout(policy: Any, images: Sequence[Any], image_ids: Sequence[str],
                     num_samples: int) -> Rollout:
    """One batched ``generate(num_return_sequences=K)``: images encoded once, but the prompt
    is prefilled once per sample (vlrm's rollout before the shared-prefill sampler)."""
    prefix = torch.no_grad()(policy.prefix_embeds)(policy.encode_images(images))
    t, lp = _generate(policy, prefix, num_samples)
    return _rollout(policy, images, image_ids, num_samples, [t], [lp])


@torch.no_grad()
def per_pair_clip(reward: Any, rollout: Rollout) -> torch.Tensor:
    """CLIP cosine similarity of each (image, caption) pair on its own, no cache. Shape: (B,)."""
    model, scores = reward.model, []
    dtype = next(model.visual.parameters()).dtype
    for b, caption in enumerate(rollout.captions):
        image = rollout.images[int(rollout.group[b])]
        pixels = reward.preprocess(image).unsqueeze(0).to(reward.device, dtype)
        image_emb = F.normalize(model.encode_image(pixels).float(), dim=-1)
        text_emb = F.normalize(model.encode_text(reward.tokenizer([caption]).to(reward.device)).float(), dim=-1)
        scores.append((image_emb * text_emb).sum(-1) * reward.scale)
    return torch.cat(scores).cpu()


@torch.no_grad()
def per_pair_itm(reward: Any, rollout: Rollout) -> torch.Tensor:
    """BLIP-2 ITM match logit of each pair on its own: ViT-g and Q-Former per pair. Shape: (B,)."""
    vision, scores = reward.model.vision_model, []
    for b, caption in enumerate(rollout.captions):
        image = rollout.images[int(rollout.group[b])]
        pixels = reward.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
        feats = vision(pixel_values=pixels.to(reward.device, next(vision.parameters()).dtype)).last_hidden_state
        scores.append(reward.itm_logits(feats, [caption])[:, 1].float() * reward.scale)
    return torch.cat(scores).cpu()


class NaiveA2C:
    """The A2C step written the obvious way, with the same rewards and loss as vlrm's.

    Rollout by per-sample ``generate``; ITM scored per pair; the reference LM is a second,
    deep-copied full model; log-probs (with entropy) and values come from two separate
    forward passes of the policy, each re-encoding the images.

    Args:
        policy: A ``Blip2OptPolicy`` (its trainable parts train here).
        itm: A ``Blip2ItmReward``.
        penalties: Text penalty rewards (bad phrases, repetition), weight 1 each.
        ref_weight: Weight of the reference-LM mean log-prob.
        lr: AdamW learning rate of the policy and the value head.
        value_hidden: Width of the value head.
    """

    def __init__(self, policy: Any, itm: Any, penalties: Sequence[Any], ref_weight: float = 0.1,
                 lr: float = 1e-5, value_hidden: int = 64) -> None:
        self.policy, self.itm, self.penalties, self.ref_weight = policy, itm, list(penalties), ref_weight
        self.reference = copy.deepcopy(policy.model).eval().requires_grad_(False)
        self.value_head = ValueHead(policy.hidden_size, value_hidden).to(policy.device)
        params = list(policy.trainable_parameters()) + list(self.value_head.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=lr)

    @torch.no_grad()
    def reference_mean_logprob(self, rollout: Rollout) -> torch.Tensor:
        """Mean log-prob of each caption under the copied LM. Shape: (B,)."""
        lm = self.reference.language_model
        bos = torch.full((rollout.batch_size, 1), self.policy.bos_token_id, device=rollout.tokens.device)
        inputs = torch.cat([bos, rollout.tokens], dim=1)
        attention = torch.cat([torch.ones_like(bos), rollout.mask.long()], dim=1)
        logits = lm(input_ids=inputs, attention_mask=attention).logits[:, :-1]
        logp = token_logprobs(logits, rollout.tokens) * rollout.mask
        return logp.sum(1) / rollout.mask.sum(1).clamp(min=1)

    def step(self, images: Sequence[Any], image_ids: Sequence[str], num_samples: int) -> float:
        """One update; returns the loss."""
        policy = self.policy
        rollout = per_sample_rollout(policy, images, image_ids, num_samples)
        mask = rollout.mask
        sequence = per_pair_itm(self.itm, rollout) + self.ref_weight * self.reference_mean_logprob(rollout).cpu()
        rewards = rl.place_on_last_token(sequence.to(mask.device), mask)
        for penalty in self.penalties:
            rewards = rewards + penalty(rollout).token.to(mask.device)
        returns = rl.discounted_returns(rewards, mask)
        uncached = attrs.evolve(rollout, policy_state=None)
        scored = policy.evaluate(uncached)  # pass 1: log-probs and entropy
        values = self.value_head(policy.evaluate(uncached).hidden.detach())  # pass 2: values
        adv = rl.advantages(returns, values, mask, whiten=True)
        loss, _ = rl.a2c_loss(scored.logprobs, values, scored.entropy, returns, adv, mask)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach().item()
