"""What the families' processors and models need around a generic captioning policy:
prompts, batching of per-image inputs, positions, where the hidden states are, the text-only
part of a captioner, a prompt run once and shared by many continuations (``prefill``,
``extend``), and greedy captions as plain transformers gives them.

Shared by ``hf_captioner``, the VLM-judge reward and their tests; public so that third-party policies on
transformers can use it too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import torch
from torch import nn

from vlrm.checkpoint import read_policy_file
from vlrm.errors import ConfigError
from vlrm.sampling import generated_mask

#: Inputs that run along the prompt's tokens (left-padded when prompts differ in length).
SEQUENCE_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")
#: Inputs a processor may return that are not model inputs for captioning.
DROPPED_KEYS = ("labels",)
#: The token type of generated text where it is not 0: PaliGemma marks the suffix (the part
#: it generates, attended causally) with 1, its image + prompt prefix with 0.
GENERATED_TOKEN_TYPE = {"paligemma": 1}

Prompt = str | list[dict[str, Any]] | None


def render_prompt(processor: Any, prompt: Prompt) -> str | None:
    """The prompt text: None, a plain string as is, or chat messages rendered with the
    processor's chat template (generation prompt added)."""
    if prompt is None or isinstance(prompt, str):
        return prompt
    if not getattr(processor, "chat_template", None):
        raise ConfigError("policy.prompt: chat messages need a processor with a chat template; "
                          "this model's processor has none, so give the prompt as a plain string")
    return processor.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False)


def left_pad_cat(rows: Sequence[dict[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """One batch from per-image processor outputs: sequence inputs left-padded to the
    longest prompt, everything else concatenated along its first axis (which also suits
    inputs flattened over images, such as Qwen2-VL's patches)."""
    longest = max(r["input_ids"].shape[1] for r in rows) if "input_ids" in rows[0] else 0
    batch: dict[str, torch.Tensor] = {}
    for key in rows[0]:
        parts = [r[key] for r in rows]
        if key in SEQUENCE_KEYS:
            fill = pad_token_id if key == "input_ids" else 0
            parts = [torch.nn.functional.pad(p, (longest - p.shape[1], 0), value=fill) for p in parts]
        batch[key] = torch.cat(parts, dim=0)
    return batch


def first_set(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def positions(attention: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding. Shape: (B, L), long."""
    return (attention.long().cumsum(-1) - 1).clamp(min=0)


def select_rope_deltas(model: nn.Module, rows: torch.Tensor) -> None:
    """Qwen2-VL keeps per-prompt position offsets from the prefill; select each row's, as
    the cache's rows are selected. Shape of ``rows``: (B,)."""
    inner = getattr(model, "model", None)
    deltas = getattr(inner, "rope_deltas", None)
    if isinstance(deltas, torch.Tensor):
        inner.rope_deltas = deltas[rows]


def last_hidden(out: Any, decoder: bool) -> torch.Tensor:
    """The language model's last-layer hidden states from a model output."""
    states = getattr(out, "decoder_hidden_states" if decoder else "hidden_states", None)
    if states is None and getattr(out, "language_model_outputs", None) is not None:
        inner = out.language_model_outputs  # BLIP-2 / InstructBLIP
        states = inner.decoder_hidden_states if decoder else inner.hidden_states
    if states is None:
        raise RuntimeError("the model returned no hidden states with output_hidden_states=True")
    return states[-1]


def text_model(model: nn.Module) -> nn.Module:
    """The part that runs text without images: the inner language model with its own head
    where the captioner keeps one apart (BLIP-2, InstructBLIP), else the captioner itself
    (LLaVA-style and encoder-decoder models run on ``input_ids`` alone)."""
    inner = getattr(model, "language_model", None)
    if isinstance(inner, nn.Module) and hasattr(inner, "get_output_embeddings") \
            and inner.get_output_embeddings() is not None:
        return inner
    return model


@attrs.define
class Prefix:
    """Each row's prompt, run once per image: the language model's cache (rows selected),
    the attention mask so far (B, P'), the position of the next token (B, 1), and the logits
    (B, V) and hidden state (B, H) of the last position fed."""

    cache: Any
    attention: torch.Tensor
    next_position: torch.Tensor
    logits: torch.Tensor
    hidden: torch.Tensor | None = None


def position_kwargs(model: nn.Module, positions: torch.Tensor, decoding: bool = False,
                    ) -> dict[str, torch.Tensor]:
    """Explicit positions that skip left padding. Multimodal-rotary models (Qwen2-VL)
    compute 3-D positions from the whole prompt themselves; for a decoded token they are its
    text position plus the per-row offset the prefill left in ``rope_deltas``."""
    inner = getattr(model, "model", None)
    if not hasattr(inner, "rope_deltas"):
        return {"position_ids": positions}
    if decoding and inner.rope_deltas is not None:
        return {"position_ids": positions.unsqueeze(0) + inner.rope_deltas}
    return {}


def prefill(model: nn.Module, inputs: dict[str, torch.Tensor], rows: torch.Tensor,
            hidden: bool = False) -> Prefix:
    """Decoder-only models: run N prompts once, then give every row its prompt's cache.

    Args:
        model: The image-text-to-text model.
        inputs: The N prompts' batched processor inputs (``left_pad_cat``).
        rows: Shape: (B,). The prompt of each row (e.g. each image K times).
        hidden: Also return the last prompt position's hidden state.
    """
    attention = inputs["attention_mask"]
    prompt_positions = positions(attention)
    out = model(**inputs, **position_kwargs(model, prompt_positions), use_cache=True,
                output_hidden_states=hidden)
    # BLIP-2 / InstructBLIP keep the language model's output (and cache) apart
    cache = getattr(out, "cache", None) or out.language_model_outputs.cache
    cache.batch_select_indices(rows)
    select_rope_deltas(model, rows)
    return Prefix(cache=cache, attention=attention[rows],
                  next_position=prompt_positions[rows, -1:] + 1,
                  logits=out.logits[rows, -1],
                  hidden=last_hidden(out, decoder=False)[rows, -1] if hidden else None)


def extend(model: nn.Module, prefix: Prefix, tokens: torch.Tensor, hidden: bool = False) -> Any:
    """Feed ``tokens`` (B, L) after what ``prefix``'s cache holds, through the language model
    alone (the image is in the cache); updates ``prefix`` and returns the model output.
    Rows may be right-padded: a real token never attends to a later one."""
    length = tokens.shape[1]
    prefix.attention = torch.cat([prefix.attention, torch.ones_like(tokens)], dim=1)
    place = prefix.next_position + torch.arange(length, device=tokens.device)
    prefix.next_position = prefix.next_position + length
    return text_model(model)(input_ids=tokens, attention_mask=prefix.attention, cache=prefix.cache,
                             use_cache=True, output_hidden_states=hidden,
                             **position_kwargs(model, place, decoding=True))


def native_captions(folder: str, images: Sequence[Any], max_new_tokens: int = 20) -> list[str]:
    """Greedy captions as a user of plain transformers gets them from a saved policy folder:
    ``AutoModelForImageTextToText`` + ``AutoProcessor``, the saved prompt, the saved
    generation config's suppressed tokens. (For ``vlrm.testing.check_policy``.)"""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    text = render_prompt(processor, read_policy_file(folder).get("prompt"))
    kwargs: dict[str, Any] = {"images": [[image] for image in images], "return_tensors": "pt"}
    if text is not None:
        kwargs.update(text=[text] * len(images), padding=True)
    inputs = {k: v for k, v in processor(**kwargs).items() if k not in DROPPED_KEYS}
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens,
                             suppress_tokens=list(model.generation_config.suppress_tokens or []),
                             return_dict_in_generate=True, output_logits=True)
    new = out.sequences[:, -len(out.logits):]
    ends = model.generation_config.eos_token_id
    mask = generated_mask(new, ends)
    rows = [row[keep].tolist() for row, keep in zip(new, mask)]
    tokenizer = getattr(processor, "tokenizer", processor)
    return [t.strip() for t in tokenizer.batch_decode(rows, skip_special_tokens=True)]
