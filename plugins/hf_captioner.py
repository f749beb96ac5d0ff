"""Any Hugging Face image-text-to-text captioner as an RL policy.

``HFCaptionerPolicy`` wraps a model of ``AutoModelForImageTextToText`` (LLaVA, SmolVLM /
Idefics3, Qwen2-VL, PaliGemma, Gemma 3, InstructBLIP, BLIP-2 OPT or Flan-T5, Florence-2,
GIT, ...) and its ``AutoProcessor``. The processor does what each family needs to the prompt
(image placeholder tokens expanded, Qwen's grid sizes, InstructBLIP's Q-Former text); the
policy never looks inside the model beyond transformers' common interfaces:

- Sampling: decoder-only models prefill each image's prompt once and continue its K samples
  from one repeated KV cache (``vlrm.sampling.decode``, the loop the BLIP-2 policy uses);
  encoder-decoder models (and ``shared_prefill: false``) call ``generate`` with
  ``num_return_sequences=K``, which encodes each image once. The sampled tokens' log-probs
  come from the raw logits at the sampling temperature.
- Scoring: one teacher-forced forward of prompt + caption (decoder-only: the logits aligned to
  the sequence's end; encoder-decoder: the decoder's), which reproduces the sampled
  log-probs; the value head reads the language model's last hidden state.
- Training: ``trainable`` names parameters by pattern (e.g. ``model.multi_modal_projector.*``);
  the rest is frozen. Optional LoRA adapters (``peft``) on named modules. The reference policy
  (KL penalty, reference LM) is a frozen copy of the trainable parts with adapters disabled.
"""

from __future__ import annotations

import contextlib
import functools
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

from vlrm import hookimpl
from vlrm.checkpoint import find_policy_dir, read_policy_file, write_policy_file
from vlrm.errors import ConfigError, is_real
from vlrm.sampling import decode, generated_mask, score_tokens, token_logprobs
from vlrm.structs import PolicyOutput, Rollout
from vlrm.text import token_char_ends
from vlrm_plugins.hf_inputs import (DROPPED_KEYS, GENERATED_TOKEN_TYPE, SEQUENCE_KEYS, Prefix,
                                    Prompt, extend, first_set, last_hidden, left_pad_cat,
                                    position_kwargs, positions, prefill, render_prompt, text_model)
from vlrm_plugins.hf_common import (LoraSpec, ReferenceSnapshot, add_lora, adapters_disabled,
                                    load_adapters, load_image_text_to_text, looks_local,
                                    match_names, quiet_transformers, resolve_lora, save_folder,
                                    save_merged_folder, torch_dtype)

def _in_compute_dtype(method: Any) -> Any:
    """Run a policy method under the policy's ``_autocast``."""
    @functools.wraps(method)
    def wrapper(self: HFCaptionerPolicy, *args: Any, **kwargs: Any) -> Any:
        with self._autocast():
            return method(self, *args, **kwargs)

    return wrapper


@attrs.frozen
class State:
    """What a rollout keeps for scoring: the images' processor inputs, and whether the
    prompts were prefilled once per image (then scoring does the same)."""

    inputs: list[dict[str, torch.Tensor]]
    shared: bool


class HFCaptionerPolicy(nn.Module):
    """An image-text-to-text model of transformers as an RL policy.

    Args:
        model: An ``AutoModelForImageTextToText`` model (decoder-only or encoder-decoder).
        processor: Its ``AutoProcessor``.
        trainable: ``fnmatch`` patterns over parameter names (a plain module name also
            selects its parameters) that train; the rest is frozen. Each must match.
        prompt: None (no text), a string, or chat messages for the chat template.
        max_new_tokens: Longest caption sampled.
        temperature: Sampling temperature; log-probs are computed at the same temperature.
        top_p: Nucleus sampling threshold (1.0 = off).
        top_k: Top-k sampling (0 = off).
        suppress_tokens: Token ids never sampled, besides the padding and image tokens.
        lora: LoRA adapters on the modules its ``targets`` patterns name; None = none.
        shared_prefill: Decoder-only models sample K captions from one prompt prefill per
            image; False uses ``generate(num_return_sequences=K)`` [ours: on].
    """

    def __init__(self, model: Any, processor: Any, trainable: Sequence[str], prompt: Prompt = None,
                 max_new_tokens: int = 60, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, suppress_tokens: Sequence[int] = (), lora: LoraSpec | None = None,
                 shared_prefill: bool = True) -> None:
        super().__init__()
        numbers = (max_new_tokens, temperature, top_p, top_k)
        if not all(map(is_real, numbers)) or not max_new_tokens >= 1 or not temperature > 0 \
                or not 0 < top_p <= 1 or not top_k >= 0:
            raise ConfigError(
                f"policy sampling settings out of range: max_new_tokens {max_new_tokens} (>= 1), "
                f"temperature {temperature} (> 0), top_p {top_p} (in (0, 1]), top_k {top_k} (>= 0)")
        if not trainable:
            raise ConfigError("policy.trainable is empty: name the parts that train, e.g. "
                              "['model.multi_modal_projector'] (top-level modules: "
                              f"{', '.join(n for n, _ in model.named_children())})")
        self.model = model.eval()  # eval mode throughout: dropout would make scoring differ
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.prompt = prompt
        self.prompt_text = render_prompt(processor, prompt)
        self.encoder_decoder = bool(model.config.is_encoder_decoder or
                                    getattr(model.config.get_text_config(), "is_encoder_decoder", False))
        self.max_new_tokens, self.temperature, self.top_p, self.top_k = numbers
        self.shared_prefill = shared_prefill and not self.encoder_decoder
        self.lora = lora
        if lora is not None:
            modules = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
            add_lora(model, lora, match_names(modules, lora.targets, "policy lora_targets"))
        names = [n for n, _ in model.named_parameters() if ".lora_" not in n]
        self.trainable = tuple(trainable)
        chosen = set(match_names(names, self.trainable, "policy.trainable"))
        for name, param in model.named_parameters():
            param.requires_grad_(name in chosen or ".lora_" in name)
        self._reference = ReferenceSnapshot()
        generation = model.generation_config
        text = model.config.get_text_config()
        self.eos_token_id = first_set(generation.eos_token_id, text.eos_token_id, self.tokenizer.eos_token_id)
        self.pad_token_id = first_set(generation.pad_token_id, text.pad_token_id,
                                       self.tokenizer.pad_token_id, self.eos_token_id)
        if isinstance(self.pad_token_id, list):
            self.pad_token_id = self.pad_token_id[0]
        if self.eos_token_id is None:
            raise ConfigError("policy: the model names no end-of-sequence token "
                              "(generation_config.eos_token_id)")
        ends = self.eos_token_id if isinstance(self.eos_token_id, list) else [self.eos_token_id]
        image_tokens = {getattr(model.config, k, None) for k in ("image_token_id", "image_token_index")}
        own = generation.suppress_tokens or ()
        never = {self.pad_token_id, *image_tokens, *own, *suppress_tokens} - {None, *ends}
        self.suppressed = sorted(int(t) for t in never)
        self.hidden_size = model.get_output_embeddings().in_features
        self.decoder_start_token_id = first_set(generation.decoder_start_token_id,
                                                 getattr(text, "decoder_start_token_id", None),
                                                 self.pad_token_id)
        self.text_model = text_model(model)
        if self.prompt_text is None:
            self._check_no_prompt()

    @_in_compute_dtype
    def _check_no_prompt(self) -> None:
        """A model that needs a prompt (its image placeholders live in the text) fails its
        first caption without one: find out now, with one token on a blank image."""
        from PIL import Image

        try:
            with torch.no_grad():
                self.model.generate(**self.batch(self.encode([Image.new("RGB", (32, 32))])),
                                    generation_config=self.generation_config(max_new_tokens=1))
        except (ValueError, TypeError, RuntimeError, AttributeError) as exc:
            name = self.model.config._name_or_path or type(self.model).__name__
            raise ConfigError(
                f"policy.init_args.prompt: {name!r} ({type(self.model).__name__}) cannot caption "
                f"without a prompt ({str(exc).splitlines()[0][:160]}); give one, e.g. chat "
                "messages with an image part, or a string with the image placeholder") from exc

    def _autocast(self) -> Any:
        """Mixed dtypes (frozen parts in bfloat16, trained parts in float32): run under
        ``torch.autocast`` in the lower precision, so that each part's inputs are cast (the
        models' own code does not cast between parts). A no-op for a single dtype."""
        kinds = {p.dtype for p in self.model.parameters() if p.is_floating_point()}
        if len(kinds) < 2:
            return contextlib.nullcontext()
        low = min(kinds, key=lambda d: torch.finfo(d).bits)
        return torch.autocast(self.device.type, dtype=low)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def fsdp_units(self) -> list[nn.Module]:
        """The model's own unsplittable blocks (transformers' ``_no_split_modules``: its
        vision, connector and language-model layers)."""
        kinds = set(getattr(self.model, "_no_split_modules", None) or ())
        return [m for m in self.model.modules() if type(m).__name__ in kinds]

    # -- inputs -----------------------------------------------------------------------

    def encode(self, images: Sequence[Any]) -> list[dict[str, torch.Tensor]]:
        """The processor's inputs for each image alone (prompt included), on the device."""
        dtype = next(self.model.parameters()).dtype
        rows = []
        for image in images:
            kwargs: dict[str, Any] = {"images": [[image]], "return_tensors": "pt"}
            if self.prompt_text is not None:
                kwargs["text"] = [self.prompt_text]
            try:
                out = self.processor(**kwargs)
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"policy: {type(self.processor).__name__} cannot prepare an "
                                  f"image with prompt {self.prompt!r}: {exc}") from exc
            rows.append({k: v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device)
                         for k, v in out.items() if isinstance(v, torch.Tensor) and k not in DROPPED_KEYS})
        return rows

    def batch(self, rows: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return left_pad_cat(rows, self.pad_token_id)

    # -- sampling ---------------------------------------------------------------------

    def generation_config(self, **settings: Any) -> Any:
        """A fresh ``GenerationConfig``: only the model's special tokens and ``settings``
        (none of a hub config's length or repetition constraints)."""
        from transformers import GenerationConfig

        own = self.model.generation_config
        return GenerationConfig(
            bos_token_id=own.bos_token_id, eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id, decoder_start_token_id=self.decoder_start_token_id,
            suppress_tokens=self.suppressed or None, output_logits=True,
            return_dict_in_generate=True, **settings)

    @_in_compute_dtype
    @torch.no_grad()
    def sample(self, images: Sequence[Any], image_ids: Sequence[str], num_samples: int,
               seeds: Sequence[int] | None = None, greedy: bool = False) -> Rollout:
        state = self.encode(images)
        if seeds is not None:
            if len(seeds) != len(images):
                raise ValueError(f"{len(seeds)} seeds for {len(images)} images")
            generators = [torch.Generator(self.device).manual_seed(int(s)) for s in seeds]
        else:
            generators = None
        shared = self.shared_prefill and "input_ids" in state[0]
        if shared:
            tokens, logprobs = self._decode_shared(state, num_samples, generators, greedy)
        else:
            tokens, logprobs, prompts = self._generate(state, num_samples, seeds, greedy)
            if "input_ids" not in state[0] and not self.encoder_decoder:
                # generate made the prompt itself (e.g. GIT's [CLS]): keep it for scoring
                for row, prompt in zip(state, prompts[::num_samples]):
                    row["input_ids"] = prompt.unsqueeze(0)
                    row["attention_mask"] = torch.ones_like(row["input_ids"])
        mask = generated_mask(tokens, self.eos_token_id)
        group = torch.arange(len(images), device=self.device).repeat_interleave(num_samples)
        rows = [row[keep].tolist() for row, keep in zip(tokens, mask)]
        captions = self.decode(rows)
        return Rollout(
            images=list(images), image_ids=list(image_ids), group=group, tokens=tokens,
            mask=mask, logprobs=logprobs * mask, captions=captions,
            token_ends=token_char_ends(self.tokenizer, rows, captions, tokens.shape[1]),
            policy_state=State(state, shared))

    def _prefill(self, state: list[dict[str, torch.Tensor]], rows: torch.Tensor,
                 hidden: bool = False) -> Prefix:
        """Each image's prompt once, every row given its image's cache (``prefill``)."""
        return prefill(self.model, self.batch(state), rows, hidden)

    def _continue(self, prefix: Prefix, tokens: torch.Tensor, hidden: bool = False) -> Any:
        """``tokens`` (B, L) after what the cache holds (``extend``)."""
        return extend(self.model, prefix, tokens, hidden)

    def _decode_shared(self, state: list[dict[str, torch.Tensor]], k: int,
                       generators: Sequence[torch.Generator] | None, greedy: bool = False,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder-only: one prefill of the N prompts, K samples from each image's cache."""
        from torch.profiler import record_function

        rows = torch.arange(len(state), device=self.device).repeat_interleave(k)
        with record_function("vlrm.prefill"):
            prefix = self._prefill(state, rows)

        def step(drawn: torch.Tensor, t: int) -> torch.Tensor:
            return self._continue(prefix, drawn.unsqueeze(1)).logits[:, -1]

        with record_function("vlrm.decode"):
            return decode(prefix.logits.float(), step, k, self.max_new_tokens, self.eos_token_id,
                          self.pad_token_id, self.temperature, self.top_k, self.top_p,
                          self.suppressed, generators, greedy)

    def _position_kwargs(self, positions: torch.Tensor, decoding: bool = False) -> dict[str, torch.Tensor]:
        return position_kwargs(self.model, positions, decoding)

    def _generate(self, state: list[dict[str, torch.Tensor]], k: int, seeds: Sequence[int] | None,
                  greedy: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``generate(num_return_sequences=K)``, per image with its own seed when given."""
        sampling = {} if greedy else {"temperature": self.temperature, "top_p": self.top_p,
                                      "top_k": self.top_k}
        config = self.generation_config(do_sample=not greedy, max_new_tokens=self.max_new_tokens,
                                        num_return_sequences=k, **sampling)
        if seeds is None:
            return self._generate_batch(self.batch(state), config)
        parts = []
        for seed, row in zip(seeds, state):
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(int(seed))
                parts.append(self._generate_batch(self.batch([row]), config))
        width = max(t.shape[1] for t, _, _ in parts)
        tokens = torch.cat([nn.functional.pad(t, (0, width - t.shape[1]), value=self.pad_token_id)
                            for t, _, _ in parts])
        logprobs = torch.cat([nn.functional.pad(lp, (0, width - lp.shape[1])) for _, lp, _ in parts])
        return tokens, logprobs, torch.cat([p for _, _, p in parts])

    def _generate_batch(self, inputs: dict[str, torch.Tensor], config: Any,
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens (B, T), their log-probs (B, T) and the prompt ids generate ran on (B, P)."""
        out = self.model.generate(**inputs, generation_config=config)
        logits = torch.stack(out.logits, dim=1)  # (B, T, V) raw logits
        t = logits.shape[1]
        tokens = out.sequences[:, -t:]
        logprobs = token_logprobs(logits, tokens, self.temperature, self.suppressed)
        return tokens, logprobs, out.sequences[:, :-t]

    # -- evaluation captions ----------------------------------------------------------

    @_in_compute_dtype
    @torch.no_grad()
    def caption(self, images: Sequence[Any], max_new_tokens: int = 60, num_beams: int = 1,
                allowed_tokens: Any = None) -> tuple[list[str], list[int]]:
        """Greedy (or beam-search) captions with the policy's prompt; see ``Captioner``.
        ``allowed_tokens(batch_id, caption_ids)`` may constrain each step (it receives the
        caption's tokens so far, without the prompt)."""
        config = self.generation_config(do_sample=False, num_beams=num_beams,
                                        max_new_tokens=max_new_tokens)
        inputs = self.batch(self.encode(images))
        out = self.model.generate(**inputs, generation_config=config,
                                  prefix_allowed_tokens_fn=_caption_only(allowed_tokens))
        tokens = out.sequences[:, -len(out.logits):]
        mask = generated_mask(tokens, self.eos_token_id)
        rows = [row[keep].tolist() for row, keep in zip(tokens, mask)]
        return self.decode(rows), [len(r) for r in rows]

    def decode(self, rows: Sequence[Sequence[int]]) -> list[str]:
        """Captions as text from their real token ids, special tokens dropped."""
        return [t.strip() for t in self.tokenizer.batch_decode(rows, skip_special_tokens=True)]

    # -- scoring ----------------------------------------------------------------------

    def _forward(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states (B, T, H) and logits (B, T, V) of the states that emit each token."""
        state = rollout.policy_state
        if state is None:
            inputs = self.encode(rollout.images)
            state = State(inputs, self.shared_prefill and "input_ids" in inputs[0])
        if state.shared:
            return self._forward_shared(state.inputs, rollout)
        inputs = self.batch([state.inputs[i] for i in rollout.group.tolist()])
        tokens = rollout.tokens.to(self.device)
        mask = rollout.mask.to(self.device).long()
        t = tokens.shape[1]
        if self.encoder_decoder:
            start = torch.full_like(tokens[:, :1], self.decoder_start_token_id)
            out = self.model(**inputs, decoder_input_ids=torch.cat([start, tokens[:, :-1]], dim=1),
                             decoder_attention_mask=torch.cat([torch.ones_like(start), mask[:, :-1]], dim=1),
                             output_hidden_states=True, use_cache=False)
            return last_hidden(out, decoder=True), out.logits
        attention = torch.cat([inputs["attention_mask"], mask], dim=1)
        inputs.update(input_ids=torch.cat([inputs["input_ids"], tokens], dim=1), attention_mask=attention)
        for key in SEQUENCE_KEYS[2:]:  # extra per-token inputs continue as generated text
            if key in inputs:
                kind = GENERATED_TOKEN_TYPE.get(self.model.config.model_type, 0) \
                    if key == "token_type_ids" else 0
                inputs[key] = torch.cat([inputs[key], torch.full_like(tokens, kind)], dim=1)
        out = self.model(**inputs, **self._position_kwargs(positions(attention)),
                         output_hidden_states=True, use_cache=False)
        # The state that emits t_k is the position before it: align to the sequence's end.
        hidden = last_hidden(out, decoder=False)[:, -(t + 1):-1]
        return hidden, out.logits[:, -(t + 1):-1]

    def _forward_shared(self, state: list[dict[str, torch.Tensor]], rollout: Rollout,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """As ``_forward``, with each image's prompt run once (with gradients) and its cache
        shared by the image's captions, as sampling did: the prompt's tokens (hundreds of
        image tokens for LLaVA-style models) are not recomputed per caption."""
        prefix = self._prefill(state, rollout.group.to(self.device), hidden=True)
        hidden, logits = [prefix.hidden.unsqueeze(1)], [prefix.logits.unsqueeze(1)]
        tokens = rollout.tokens.to(self.device)
        if tokens.shape[1] > 1:  # t_k for k >= 2 is emitted at t_{k-1}'s position
            out = self._continue(prefix, tokens[:, :-1], hidden=True)
            hidden.append(last_hidden(out, decoder=False))
            logits.append(out.logits)
        return torch.cat(hidden, dim=1), torch.cat(logits, dim=1)

    @_in_compute_dtype
    def evaluate(self, rollout: Rollout) -> PolicyOutput:
        hidden, logits = self._forward(rollout)
        logprobs, entropy = score_tokens(logits, rollout.tokens.to(self.device), self.temperature,
                                         self.suppressed)
        return PolicyOutput(logprobs=logprobs, entropy=entropy, hidden=hidden)

    # -- reference policy and reference LM --------------------------------------------

    def snapshot_reference(self) -> int:
        """Freeze the current trainable parts as the reference (idempotent)."""
        return self._reference.take(self.model.named_parameters())

    @_in_compute_dtype
    @torch.no_grad()
    def reference_logprobs(self, rollout: Rollout) -> torch.Tensor:
        """log pi_ref of the rollout's tokens (snapshot in, adapters off). Shape: (B, T)."""
        with self._reference.swapped_into(self.model):
            _, logits = self._forward(rollout)
        logprobs = token_logprobs(logits, rollout.tokens.to(self.device), self.temperature,
                                  self.suppressed)
        return logprobs.float() * rollout.mask.to(logprobs.device)

    def prepare_text_reference(self) -> None:
        """The reference LM is the initial language model: snapshot it when any of it trains
        (LoRA adapters excepted: the reference has them disabled)."""
        text = self.model.get_decoder()
        if any(p.requires_grad for n, p in text.named_parameters() if ".lora_" not in n) or \
                any(p.requires_grad for p in self.model.get_output_embeddings().parameters()):
            self.snapshot_reference()

    @_in_compute_dtype
    @torch.no_grad()
    def text_logprobs(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """log p(t_k | t_<k) under the language model alone, without the image (the
        reference LM); frozen parts as they are, trained ones as snapshotted. Shape: (B, T)."""
        tokens, mask = tokens.to(self.device), mask.to(self.device)
        reference = self._reference.swapped_into(self.model) if self._reference.tensors is not None \
            else adapters_disabled(self.model)
        with reference:
            logits = _text_only_logits(self, tokens, mask)
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        return logp * mask

    # -- saving and export ------------------------------------------------------------

    def save_pretrained(self, path: str, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """A transformers folder that ``AutoModelForImageTextToText`` and ``AutoProcessor``
        load as they are; LoRA adapters (un-merged) beside it, and ``vlrm_policy.json``."""
        state = self.model.state_dict() if state_dict is None else \
            {k.removeprefix("model."): v for k, v in state_dict.items()}
        save_folder(path, self.model, self.processor, state, self.lora)
        write_policy_file(path, "hf_captioner", prompt=self.prompt, trainable=list(self.trainable))

    def delta_state_dict(self, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
        """The trainable parts' weights (keys of the native model), in ``dtype``."""
        state = self.model.state_dict()
        names = [n for n, p in self.model.named_parameters() if p.requires_grad and ".lora_" not in n]
        return {n: state[n].detach().to(dtype).contiguous().clone() for n in names}

    def save_merged(self, path: str) -> None:
        """A plain transformers folder with LoRA adapters folded into the weights."""
        save_merged_folder(path, self.model, self.processor)


def _caption_only(allowed_tokens: Any) -> Any:
    """``allowed_tokens`` as transformers' ``prefix_allowed_tokens_fn``, given the caption's
    tokens only: the first call for a row sees its whole prompt, whose length is kept."""
    if allowed_tokens is None:
        return None
    starts: dict[int, int] = {}

    def constrain(batch_id: int, ids: torch.Tensor) -> list[int]:
        return allowed_tokens(batch_id, ids[starts.setdefault(batch_id, len(ids)):])

    return constrain


def _text_only_logits(policy: HFCaptionerPolicy, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V) of ``tokens`` under the language model with no image: decoder-only
    models continue the start token; encoder-decoder ones read an empty prompt."""
    lm, tokenizer, ones = policy.text_model, policy.tokenizer, torch.ones_like(tokens[:, :1])
    if policy.encoder_decoder:
        empty = torch.tensor([tokenizer("")["input_ids"] or [tokenizer.eos_token_id]],
                             device=tokens.device).expand(tokens.shape[0], -1)
        start = ones * policy.decoder_start_token_id
        return lm(input_ids=empty, attention_mask=torch.ones_like(empty),
                  decoder_input_ids=torch.cat([start, tokens[:, :-1]], dim=1),
                  decoder_attention_mask=torch.cat([ones, mask[:, :-1].long()], dim=1)).logits
    ends = policy.eos_token_id if isinstance(policy.eos_token_id, list) else [policy.eos_token_id]
    start = ones * first_set(policy.model.generation_config.bos_token_id, tokenizer.bos_token_id, ends[0])
    inputs = torch.cat([start, tokens], dim=1)
    attention = torch.cat([ones, mask.long()], dim=1)
    return lm(input_ids=inputs, attention_mask=attention).logits[:, :-1]


def hf_captioner(
    model: str,
    trainable: Sequence[str] | None = None,
    prompt: Prompt = None,
    dtype: str = "float32",
    trainable_dtype: str = "float32",
    device: str = "cpu",
    max_new_tokens: int = 60,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    suppress_tokens: Sequence[int] = (),
    lora_rank: int = 0,
    lora_alpha: float = 16.0,
    lora_targets: Sequence[str] = ("*language_model*.q_proj", "*language_model*.v_proj"),
    shared_prefill: bool = True,
) -> HFCaptionerPolicy:
    """Load any image-text-to-text captioner from the hub or a local folder as a policy.

    Args:
        model: Hub name (e.g. ``HuggingFaceTB/SmolVLM-256M-Instruct``) or local folder (also
            a run's output_dir or ``checkpoints/<step>``: LoRA adapters and the saved
            prompt and parts come along).
        trainable: ``fnmatch`` patterns of the parameters that train (e.g.
            ``["model.multi_modal_projector.*"]``); default: those a saved policy folder names.
        prompt: None, a plain string (with the image placeholder where the processor needs
            it), or chat messages rendered with the processor's chat template.
        dtype: Dtype of the frozen parts: float32, bfloat16 or float16.
        trainable_dtype: Dtype the trainable parts are kept in [ours: float32].
        device: Torch device.
        max_new_tokens: Longest sampled caption [ours: 60].
        temperature: Sampling temperature [ours: 1.0].
        top_p: Nucleus sampling [ours: off].
        top_k: Top-k sampling [ours: off].
        suppress_tokens: Extra token ids never sampled.
        lora_rank: Rank of LoRA adapters; 0 = none [ours: off].
        lora_alpha: LoRA scale numerator [ours: 16].
        lora_targets: ``fnmatch`` patterns of the linear layers that get adapters [ours: the
            language model's q_proj and v_proj].
        shared_prefill: One prompt prefill per image for decoder-only models [ours: on].
    """
    if looks_local(model) and not Path(model).expanduser().is_dir():
        raise ConfigError(f"policy.init_args.model: the folder {model!r} does not exist; give a "
                          "directory written by save_pretrained or a hub name")
    saved: dict[str, Any] = {}
    if Path(model).expanduser().is_dir():
        model = str(find_policy_dir(Path(model).expanduser()))
        saved = read_policy_file(model)
        if prompt is None:
            prompt = saved.get("prompt")
    trainable = trainable if trainable is not None else saved.get("trainable")
    if not trainable:
        raise ConfigError(f"policy.init_args.trainable: name the parts of {model!r} that train, "
                          "e.g. ['model.multi_modal_projector'] (see README: Bring your own captioner)")
    processor, net = load_image_text_to_text(model, dtype, "policy.init_args.model")
    lora = resolve_lora(model, LoraSpec(lora_rank, lora_alpha, tuple(lora_targets)) if lora_rank else None)
    policy = HFCaptionerPolicy(
        net, processor, trainable=trainable, prompt=prompt, max_new_tokens=max_new_tokens,
        temperature=temperature, top_p=top_p, top_k=top_k, suppress_tokens=suppress_tokens,
        lora=lora, shared_prefill=shared_prefill)
    if lora is not None and Path(model, "lora.json").is_file():
        load_adapters(policy.model, model)
    for param in policy.trainable_parameters():
        param.data = param.data.to(torch_dtype(trainable_dtype))
    return policy.to(device)


def tiny_hf_captioner(family: str = "llava", seed: int = 0, trainable: Sequence[str] | None = None,
                      prompt: Prompt | str = "family", max_new_tokens: int = 20,
                      temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                      lora_rank: int = 0, lora_targets: Sequence[str] | None = None,
                      shared_prefill: bool = True) -> HFCaptionerPolicy:
    """A random-weight captioner of one family's real classes (``vlrm_plugins.hf_tiny``),
    written and loaded back through ``hf_captioner``: the family configs' tiny stand-in.

    Args:
        family: One of ``vlrm_plugins.hf_tiny.FAMILIES`` (llava, idefics3, qwen2_vl,
            paligemma, gemma3, instructblip, blip2_t5, florence2, git).
        seed: Seed of the random weights.
        trainable: Patterns of the parts that train; default the family's connector.
        prompt: The prompt; ``"family"`` = the family's usual one (``hf_tiny``).
        max_new_tokens, temperature, top_p, top_k, shared_prefill: See ``hf_captioner``.
        lora_rank: LoRA rank (0 = none).
        lora_targets: Patterns of the adapted layers; default the family's LM q/v projections.
    """
    from vlrm_plugins.hf_tiny import save_tiny_captioner

    with tempfile.TemporaryDirectory() as folder, quiet_transformers():
        spec = save_tiny_captioner(family, folder, seed=seed)
        return hf_captioner(
            folder, trainable=list(trainable or spec.trainable),
            prompt=spec.prompt if prompt == "family" else prompt, max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, top_k=top_k, lora_rank=lora_rank,
            lora_targets=lora_targets or spec.lora_targets, shared_prefill=shared_prefill)


@hookimpl
def vlrm_register_policies() -> dict[str, Any]:
    return {"hf_captioner": hf_captioner, "tiny_hf_captioner": tiny_hf_captioner}
