"""Token sampling for rollouts: logits processing and the shared-prefill decode loop.

Pure tensor functions (no model state) plus ``decode_shared_prefix``, which runs a
transformers causal LM with a KV cache. Shape letters: N prompts, K samples per prompt,
B = N * K rows, P prompt positions, V vocabulary, T generated tokens.

The processing order is transformers' for sampling: suppressed tokens, then temperature,
then top-k, then top-p; so with the same random state the loop draws the same tokens as
``generate(do_sample=True, num_return_sequences=K)``, while computing the prompt once per
prompt instead of once per sample.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.profiler import record_function


def process_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0, suppressed: Sequence[int] = ()) -> torch.Tensor:
    """Sampling scores from raw next-token logits.

    Args:
        logits: Shape: (B, V), float32.
        temperature: Divides the logits (1.0 = unchanged).
        top_k: Keep the k highest scores (0 = off).
        top_p: Keep the smallest set of tokens whose probability reaches top_p (1.0 = off).
        suppressed: Token ids that can never be drawn.

    Returns:
        Shape: (B, V); removed tokens are -inf.
    """
    scores = logits.clone()
    if suppressed:
        scores[:, list(suppressed)] = -float("inf")
    if temperature != 1.0:
        scores = scores / temperature
    if top_k > 0:
        kth = torch.topk(scores, min(top_k, scores.shape[-1])).values[:, -1:]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if top_p < 1.0:
        ascending, order = torch.sort(scores, dim=-1)
        cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= 1.0 - top_p
        drop[:, -1] = False  # the most likely token always stays
        scores = scores.masked_fill(drop.scatter(1, order, drop), -float("inf"))
    return scores


def policy_log_softmax(logits: torch.Tensor, temperature: float = 1.0,
                       suppressed: Sequence[int] = ()) -> torch.Tensor:
    """log pi(. | state) of the policy that samples at ``temperature`` (no top-k / top-p cut).

    Args:
        logits: Shape: (..., V).

    Returns:
        Shape: (..., V), float32 (float64 for float64 logits); suppressed tokens get the
        smallest finite log-prob.
    """
    scaled = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if temperature != 1.0:
        scaled = scaled / temperature
    if suppressed:
        if scaled is logits:  # never write into the caller's tensor; otherwise one copy only
            scaled = scaled.clone()
        scaled[..., list(suppressed)] = torch.finfo(scaled.dtype).min
    return torch.log_softmax(scaled, dim=-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                   suppressed: Sequence[int] = ()) -> torch.Tensor:
    """log pi(token) under ``policy_log_softmax``.

    Args:
        logits: Shape: (..., V).
        tokens: Shape: (...), long.

    Returns:
        Shape: (...), float32.
    """
    logp = policy_log_softmax(logits, temperature, suppressed)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def score_tokens(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                 suppressed: Sequence[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and entropy of the policy at each scored position (``policy_log_softmax``),
    with gradients: what a policy's ``evaluate`` returns besides its hidden states.

    Args:
        logits: Shape: (B, T, V), the states that emit each token.
        tokens: Shape: (B, T), long.

    Returns:
        logprobs: Shape: (B, T). log pi(tokens).
        entropy: Shape: (B, T). -sum_v pi(v) log pi(v).
    """
    logp = policy_log_softmax(logits, temperature, suppressed)
    logprobs = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return logprobs, -(logp.exp() * logp).sum(-1)


def draw(probs: torch.Tensor, num_samples: int,
         generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
    """One token per row from ``probs``.

    Args:
        probs: Shape: (B, V), B = N * K, prompt-major.
        num_samples: K.
        generators: N generators, the n-th drawing rows n*K .. n*K + K - 1; None = the
            global random state (one draw for the whole batch).

    Returns:
        Shape: (B,), long.
    """
    if generators is None:
        return torch.multinomial(probs, num_samples=1).squeeze(1)
    if len(generators) * num_samples != probs.shape[0]:
        raise ValueError(f"{len(generators)} generators for {probs.shape[0]} rows "
                         f"of {num_samples} samples each")
    rows = probs.split(num_samples)
    return torch.cat([torch.multinomial(r, 1, generator=g).squeeze(1)
                      for r, g in zip(rows, generators)])


def is_end(tokens: torch.Tensor, eos_token_id: int | Sequence[int]) -> torch.Tensor:
    """True where a token ends a caption. ``eos_token_id`` may be one id or several."""
    if isinstance(eos_token_id, int):
        return tokens == eos_token_id
    return torch.isin(tokens, torch.as_tensor(list(eos_token_id), device=tokens.device))


def generated_mask(tokens: torch.Tensor, eos_token_id: int | Sequence[int]) -> torch.Tensor:
    """Shape: (B, T) bool: True up to and including each row's first end token."""
    ends = is_end(tokens, eos_token_id).long()
    return (torch.cumsum(ends, dim=1) - ends) == 0


@torch.no_grad()
def decode(first_logits: torch.Tensor, step: Callable[[torch.Tensor, int], torch.Tensor],
           num_samples: int, max_new_tokens: int, eos_token_id: int | Sequence[int],
           pad_token_id: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           suppressed: Sequence[int] = (), generators: Sequence[torch.Generator] | None = None,
           greedy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampling loop after a prefill: draw, then ask ``step`` for the next logits.

    Args:
        first_logits: Shape: (B, V), B = N * K prompt-major: the next-token logits after
            each row's prompt (the prefill's, repeated K times).
        step: ``step(drawn, t)`` feeds the drawn tokens (B,) of step ``t`` (0-based) to the
            model and returns the next logits (B, V); it owns the model and its cache.
        num_samples: K.
        max_new_tokens: Longest continuation.
        eos_token_id: Ends a caption (one id or several); rows that ended get
            ``pad_token_id`` afterwards.
        pad_token_id: Filler after the end.
        temperature, top_k, top_p, suppressed: See ``process_logits``.
        generators: See ``draw``; None = the global random state, as ``generate`` uses it.
        greedy: Take the most likely token (after suppression) instead of drawing; no
            random state is used.

    Returns:
        tokens: Shape: (B, T); T <= max_new_tokens (the loop stops when every row ended).
        logprobs: Shape: (B, T), float32. log pi(token) of the sampling policy
            (``token_logprobs`` at ``temperature``, before top-k / top-p); padding after the
            end included, so callers mask it. The (B, T, V) logits are never kept.
    """
    logits = first_logits.float()
    finished = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    tokens, logprobs = [], []
    for t in range(max_new_tokens):
        scores = process_logits(logits, temperature, top_k, top_p, suppressed)
        drawn = scores.argmax(dim=-1) if greedy else draw(scores.softmax(dim=-1), num_samples,
                                                          generators)
        drawn = torch.where(finished, torch.full_like(drawn, pad_token_id), drawn)
        tokens.append(drawn)
        logprobs.append(token_logprobs(logits, drawn, temperature, suppressed))
        finished |= is_end(drawn, eos_token_id)
        if bool(finished.all()) or t + 1 == max_new_tokens:
            break
        logits = step(drawn, t).float()
    return torch.stack(tokens, dim=1), torch.stack(logprobs, dim=1)


@torch.no_grad()
def decode_shared_prefix(lm: Any, prefix: torch.Tensor, num_samples: int, max_new_tokens: int,
                         eos_token_id: int | Sequence[int], pad_token_id: int,
                         temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                         suppressed: Sequence[int] = (),
                         generators: Sequence[torch.Generator] | None = None,
                         greedy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample K continuations of each prompt given as input embeddings; each prompt is
    prefilled once.

    The prompt's keys and values are computed for the N prompts, then the cache is repeated
    K times along the batch, so only the generated tokens run per sample.

    Args:
        lm: A transformers causal LM (``AutoModelForCausalLM``-like, with a KV cache).
        prefix: Shape: (N, P, H). Prompt input embeddings.
        num_samples, max_new_tokens, eos_token_id, pad_token_id, temperature, top_k, top_p,
        suppressed, generators, greedy: See ``decode``.

    Returns:
        tokens and logprobs, shapes (B, T), B = N * K prompt-major; see ``decode``.
    """
    n, p = prefix.shape[:2]
    device = prefix.device
    with record_function("vlrm.prefill"):
        out = lm(inputs_embeds=prefix, attention_mask=torch.ones((n, p), dtype=torch.long,
                                                                 device=device),
                 use_cache=True, logits_to_keep=1)
    cache = out.cache
    cache.batch_repeat_interleave(num_samples)
    b = n * num_samples

    def step(drawn: torch.Tensor, t: int) -> torch.Tensor:
        nonlocal cache
        attention = torch.ones((b, p + t + 1), dtype=torch.long, device=device)
        out = lm(input_ids=drawn.unsqueeze(1), attention_mask=attention, cache=cache,
                 use_cache=True)
        cache = out.cache
        return out.logits[:, -1]

    first = out.logits[:, -1].float().repeat_interleave(num_samples, dim=0)  # (B, V)
    with record_function("vlrm.decode"):
        return decode(first, step, num_samples, max_new_tokens, eos_token_id, pad_token_id,
                      temperature, top_k, top_p, suppressed, generators, greedy)
