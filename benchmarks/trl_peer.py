"""The peer: TRL's ``GRPOTrainer`` on a preset's captioner (BLIP-2 OPT, or a LLaVA-style model
through the generic ``hf_captioner`` policy), as a user would run it instead of vlrm.

Both sides get the same model weights (a copy), the same trainable parts (Q-Former, query
tokens, language projection), the same images, N images x K captions a step, the same
new-token limit and suppressed tokens, the same rewards (BLIP-2 ITM match logit + bad-phrase
+ repetition penalties, computed by the same reward model, its image features recomputed
every step on both sides) and the same estimator: GRPO, group-std scaling, the token mean
over the batch (TRL's ``loss_type="dapo"``, vlrm's ``aggregation: token``), no KL, one update
per rollout, AdamW at the same learning rate, gradient norm clipped at 1.

TRL 1.16 needs these workarounds for BLIP-2 OPT (``WORKAROUNDS``, printed with the results):
TRL's trainer is otherwise used as documented (its own loop, data loader, generation,
reward calls, loss and optimiser step).

Timing: ``TrlGrpoPeer.run(rounds, between)`` runs TRL's own ``train()`` for ``rounds + 1``
steps; a callback brackets each TRL step (``on_step_begin`` to ``on_step_end``: generation,
rewards, loss, backward, optimiser) and, after it, runs ``between()`` (vlrm's step, timed
apart), so the two alternate in one process. The first round of each is a warm-up.
"""

from __future__ import annotations

import copy
import logging
import time
import types
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

WORKAROUNDS = (
    "the BLIP-2 processor has no chat template: set to '{{ bos_token }}' (the query tokens + BOS "
    "prefix that BLIP-2 captions from)",
    "prompts must be conversational ([{'role': 'user', 'content': ''}], images in an 'image' "
    "column); completions come back as assistant messages",
    "GRPOTrainer calls the model with fused_lm_head=True and reads log_probs from the output, which "
    "BLIP-2's forward does not return: the forward is wrapped to compute them from the logits",
    "beta > 0 (a KL term) reloads a second full model from the model's path, impossible for an "
    "in-memory model: beta = 0 on both sides",
    "disable_dropout=True, else TRL samples and scores with dropout on",
)


#: What TRL needs for a LLaVA-style ``LlavaForConditionalGeneration`` (the generic
#: ``hf_captioner`` policy): its own chat template and processor work as they are.
LLAVA_WORKAROUNDS = (
    "prompts must be conversational ([{'role': 'user', 'content': [image, text]}], images in an "
    "'image' column); completions come back as assistant messages",
    "beta > 0 (a KL term) reloads a second full model from the model's path, impossible for an "
    "in-memory model: beta = 0 on both sides",
    "disable_dropout=True, else TRL samples and scores with dropout on",
)


#: For a processor without a chat template (encoder-decoder captioners): the prompt's text.
TEXT_ONLY_TEMPLATE = ("{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }}"
                      "{% else %}{% for item in m['content'] %}{% if item['type'] == 'text' %}"
                      "{{ item['text'] }}{% endif %}{% endfor %}{% endif %}{% endfor %}")


def workarounds(policy: Any) -> tuple[str, ...]:
    """The workarounds TRL needs for this policy's model family."""
    return WORKAROUNDS if _is_blip2(policy) else LLAVA_WORKAROUNDS


def _is_blip2(policy: Any) -> bool:
    from vlrm_plugins.blip2_opt import Blip2OptPolicy

    return isinstance(policy, Blip2OptPolicy)


def trl_available() -> str | None:
    """TRL's version, or None when the ``bench`` extra is not installed."""
    try:
        import trl
    except ImportError:
        return None
    return trl.__version__


def penalty_scores(penalty: Any, captions: Sequence[str]) -> list[float]:
    """A vlrm text penalty as TRL's per-caption reward: minus its penalty per event."""
    return [-penalty.penalty * len(penalty.events(c)) for c in captions]


def _callback(times: list[float], between: Callable[[], Any] | None,
              between_times: list[float]) -> Any:
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            times.append(time.perf_counter() - self.start)
            if between is not None:
                start = time.perf_counter()
                between()
                between_times.append(time.perf_counter() - start)

    return StepTimer()


def _with_log_probs(model: Any) -> None:
    """Workaround 3: when TRL asks for ``fused_lm_head``, return per-token log-probs (and the
    entropy) computed from the logits at the sampling temperature, which is 1 here."""
    forward = model.forward

    def patched(self: Any, *args: Any, fused_lm_head: bool = False, labels: Any = None,
                **kwargs: Any) -> Any:
        if not fused_lm_head:
            return forward(*args, labels=labels, **kwargs)
        out = forward(*args, **kwargs)
        logits = out.logits[:, -labels.shape[1]:].float()  # BLIP-2 prepends the query tokens
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        target = labels[:, 1:].clamp(min=0)
        picked = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        pad = torch.zeros_like(picked[:, :1])
        out.log_probs = torch.cat([pad, picked], dim=1)
        out.entropy = torch.cat([pad, -(logp.exp() * logp).sum(-1)], dim=1)
        return out

    model.forward = types.MethodType(patched, model)


class TrlGrpoPeer:
    """TRL's GRPO trainer set up on a preset's policy (see the module docstring).

    Args:
        preset: A ``benchmarks.presets.Preset``.
        output_dir: TRL's output folder (nothing is saved there).
        learning_rate: AdamW's, as vlrm's ``policy_lr``.
        seed: TRL's seed.
    """

    def __init__(self, preset: Any, output_dir: str, learning_rate: float = 1e-5,
                 seed: int = 0) -> None:
        from datasets import Dataset
        from trl import GRPOConfig, GRPOTrainer

        from vlrm.cache import EmbeddingCache
        from vlrm_plugins.text_penalties import BadPhrasePenalty, RepetitionPenalty

        logging.getLogger("transformers").setLevel(logging.ERROR)
        policy = preset.policy
        blip2 = _is_blip2(policy)
        self.workarounds = workarounds(policy)
        n, k = len(preset.images), preset.samples_per_image
        self.model = copy.deepcopy(policy.model)  # its requires_grad flags: the trained parts
        processor = copy.deepcopy(policy.processor)
        if blip2:
            processor.chat_template = "{{ bos_token }}"  # workaround 1
            prompt: list[dict[str, Any]] = [{"role": "user", "content": ""}]  # workaround 2
        else:  # the captioner's own prompt after the image, through its own chat template
            prompt = [{"role": "user", "content": [{"type": "image"},
                                                   {"type": "text", "text": policy.prompt or ""}]}]
            if not getattr(processor, "chat_template", None):  # (encoder-decoder captioners)
                processor.chat_template = TEXT_ONLY_TEMPLATE
        itm, bad, repeat = preset.itm, BadPhrasePenalty(), RepetitionPenalty()

        def itm_reward(completions: list[Any], image: list[Any], image_id: list[str],
                       **_: Any) -> list[float]:
            captions = [c[0]["content"] for c in completions]
            unique = list(dict.fromkeys(image_id))
            itm._cache = EmbeddingCache(itm._cache.size)  # computed afresh, as in vlrm's step
            with torch.no_grad():
                feats = itm.image_embeds([image[image_id.index(i)] for i in unique], unique)
                index = torch.tensor([unique.index(i) for i in image_id], device=feats.device)
                score = itm.itm_logits(feats[index], captions)[:, 1] * itm.scale
            return score.float().tolist()

        def bad_phrase(completions: list[Any], **_: Any) -> list[float]:
            return penalty_scores(bad, [c[0]["content"] for c in completions])

        def repetition(completions: list[Any], **_: Any) -> list[float]:
            return penalty_scores(repeat, [c[0]["content"] for c in completions])

        data = Dataset.from_dict({
            "prompt": [prompt for _ in range(n)],
            "image": list(preset.images), "image_id": list(preset.image_ids)})
        self.config = GRPOConfig(
            output_dir=output_dir, per_device_train_batch_size=n * k, num_generations=k,
            max_completion_length=policy.max_new_tokens, temperature=policy.temperature,
            top_p=1.0, top_k=0, learning_rate=learning_rate, lr_scheduler_type="constant",
            warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, beta=0.0,  # workaround 4
            loss_type="dapo", scale_rewards="group", num_iterations=1, disable_dropout=True,  # 5
            generation_kwargs={"suppress_tokens": list(policy.suppressed)},
            report_to="none", save_strategy="no", logging_strategy="no", use_cpu=not torch.cuda.is_available(),
            bf16=False, seed=seed, shuffle_dataset=False, dataloader_num_workers=0,
            disable_tqdm=True, log_completions=False, max_steps=1)
        with warnings.catch_warnings():  # transformers' renames, raised from TRL's calls
            warnings.simplefilter("ignore", FutureWarning)
            self.trainer = GRPOTrainer(model=self.model, args=self.config, train_dataset=data,
                                       reward_funcs=[itm_reward, bad_phrase, repetition],
                                       processing_class=processor)
        if blip2:
            _with_log_probs(self.trainer.model)  # workaround 3, after the trainer is built

    def run(self, rounds: int, between: Callable[[], Any] | None = None
            ) -> tuple[list[float], list[float]]:
        """TRL's ``train()`` for ``rounds + 1`` steps, ``between()`` after each; the step times of
        both, the warm-up round dropped."""
        trl_s: list[float] = []
        ours_s: list[float] = []
        self.trainer.args.max_steps = rounds + 1
        timer = _callback(trl_s, between, ours_s)
        self.trainer.add_callback(timer)
        try:
            with warnings.catch_warnings():  # transformers' renames, raised from TRL's calls
                warnings.simplefilter("ignore", FutureWarning)
                self.trainer.train()
        finally:
            self.trainer.remove_callback(timer)
        return trl_s[1:], ours_s[1:]
