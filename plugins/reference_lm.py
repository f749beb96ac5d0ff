"""The paper's naturalness term: ref(text) = mean token log-probability under a reference LM.

ref(t_1..t_n) = (1/n) sum_k log p(t_k | t_<k) = -log perplexity; higher = more natural
[paper]. By default the reference is the policy's own frozen language model (BLIP-2 OPT's
OPT-2.7B is the paper's reference LM), reused, never loaded twice; a separate causal LM can
be named instead.
"""

from __future__ import annotations

from typing import Any

import torch

from vlrm import hookimpl
from vlrm.errors import ConfigError
from vlrm.protocols import TextScorer, explain
from vlrm.structs import RewardOutput, Rollout


class ReferenceLMReward:
    """Mean log-probability of each caption under a reference causal LM.

    Args:
        model: A transformers causal LM (hub name or local directory) to load as the
            reference; None = the policy's own frozen LM [paper: OPT-2.7B, the same LM].
        dtype: Dtype of a loaded reference model.
        device: Device of a loaded reference model.
    """

    def __init__(self, model: str | None = None, dtype: str = "float32", device: str = "cpu") -> None:
        self.model_name = model
        self.lm: Any = None
        self.tokenizer: Any = None
        self.policy: Any = None
        if model is not None:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            from vlrm_plugins.hf_common import torch_dtype as _dtype

            try:
                self.tokenizer = AutoTokenizer.from_pretrained(model)
                self.lm = AutoModelForCausalLM.from_pretrained(model, dtype=_dtype(dtype)).to(device).eval()
            except (OSError, ValueError) as exc:
                raise ConfigError(f"reference LM: cannot load {model!r}: {exc}") from exc
            for param in self.lm.parameters():
                param.requires_grad_(False)

    def bind_policy(self, policy: Any) -> None:
        """Called by the trainer: with no model of its own, score with the policy's LM.

        If the policy's LM trains, the initial policy is snapshotted now (before any update)
        and its LM is the reference.
        """
        if self.lm is not None:
            return
        problems = explain(policy, TextScorer)
        if problems:
            raise ConfigError(f"ReferenceLMReward without its own `model` needs a policy that "
                              f"implements vlrm.protocols.TextScorer; {type(policy).__name__}: "
                              f"{'; '.join(problems)}. Give the reward a `model` (a causal LM)")
        self.policy = policy
        policy.prepare_text_reference()

    def _own_lm_logprobs(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(captions, return_tensors="pt", padding=True)
        ids = enc["input_ids"].to(self.lm.device)
        bos = torch.full((len(captions), 1), self.tokenizer.bos_token_id, device=ids.device)
        inputs = torch.cat([bos, ids], dim=1)
        attention = torch.cat([torch.ones_like(bos), enc["attention_mask"].to(ids.device)], dim=1)
        logits = self.lm(input_ids=inputs, attention_mask=attention).logits[:, :-1].float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        mask = enc["attention_mask"].bool().to(ids.device)
        return logp * mask, mask

    @torch.no_grad()
    def __call__(self, rollout: Rollout) -> RewardOutput:
        if self.lm is not None:
            logp, mask = self._own_lm_logprobs(list(rollout.captions))
        elif self.policy is not None:
            mask = rollout.mask
            logp = self.policy.text_logprobs(rollout.tokens, mask)
        else:
            raise ConfigError("ReferenceLMReward has no model and was not bound to a policy "
                              "(the trainer binds it; in your own code call bind_policy)")
        mask = mask.to(logp.device)
        mean = logp.sum(1) / mask.sum(1).clamp(min=1)
        return RewardOutput(sequence=mean.float().cpu())


@hookimpl
def vlrm_register_rewards() -> dict[str, Any]:
    return {"reference_lm": ReferenceLMReward}
