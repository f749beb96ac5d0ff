"""VLM-judge reward (VQAScore-style): a generative image-text model is asked whether the image
shows the caption, and the caption scores the probability of "yes".

Any ``AutoModelForImageTextToText`` model (LLaVA, SmolVLM, Qwen2-VL, PaliGemma, BLIP-2,
InstructBLIP, Florence-2, ...) loads through the same loader as the ``hf_captioner`` policy.
The prompt is a string or chat messages with ``{caption}`` where the caption goes; chat
messages are rendered with the processor's chat template, generation prompt added, so the
model's next token is its answer.

Scores (``score``):

- ``yes_no`` [ours: default]: P(yes) / (P(yes) + P(no)), in [0, 1]; the two answers' mass
  renormalised, so a judge that spreads mass over other tokens still ranks captions.
- ``logprob``: log P(yes) over the whole vocabulary (VQAScore's raw score, in log space).

An answer word counts in each of its spellings the tokenizer has as a first token (``yes``,
`` yes``, ``Yes``, `` Yes``); their probabilities add up.

The image part runs once per image: for decoder-only models the prompt up to ``{caption}``
(image tokens included) is prefilled once per image and every caption of that image continues
from its cache (``vlrm_plugins.hf_inputs.prefill``), as the policy samples. The text before
the caption and the caption are tokenised apart, so a tokenizer that would merge across that
boundary sees a slightly different split than in one string. Encoder-decoder models (BLIP-2
T5, Florence-2) encode each (image, prompt) pair and read the decoder's first step.

    reward:
      terms:
        judge:
          reward:
            class_path: vlm_judge
            init_args: {model: llava-hf/llava-onevision-qwen2-0.5b-ov-hf, dtype: bfloat16}
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vlrm import hookimpl
from vlrm.errors import ConfigError
from vlrm.structs import RewardOutput, Rollout
from vlrm_plugins.hf_common import load_image_text_to_text, looks_local, quiet_transformers
from vlrm_plugins.hf_inputs import (DROPPED_KEYS, Prompt, extend, first_set, left_pad_cat,
                                    prefill, render_prompt)

QUESTION = 'Does this image show "{caption}"? Answer yes or no.'
SCORES = ("yes_no", "logprob")
PLACEHOLDER = "{caption}"


def default_prompt(processor: Any) -> Prompt:
    """The question as one user turn with the image when the processor has a chat template,
    else ``Question: ... Answer:`` as plain text."""
    if getattr(processor, "chat_template", None):
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    return f"Question: {QUESTION} Answer:"


def answer_ids(tokenizer: Any, word: str) -> list[int]:
    """The first token of each spelling of ``word`` (as is, capitalised, after a space);
    a spelling whose first token is unknown or blank (a lone space) is dropped."""
    found = []
    for spelling in dict.fromkeys((word, " " + word, word.capitalize(), " " + word.capitalize())):
        ids = tokenizer(spelling, add_special_tokens=False)["input_ids"]
        if ids and ids[0] != tokenizer.unk_token_id and tokenizer.decode(ids[:1]).strip() \
                and ids[0] not in found:
            found.append(int(ids[0]))
    return found


class VLMJudgeReward:
    """Probability that a generative image-text model answers "yes" to a question about the
    caption (see the module docstring).

    Args:
        model: An ``AutoModelForImageTextToText`` model.
        processor: Its processor.
        prompt: A string or chat messages with ``{caption}`` in the text; None = a default
            question (``QUESTION``) as chat messages or plain text.
        score: ``yes_no`` or ``logprob`` (see the module docstring).
        answers: The "yes" and "no" words.
        batch_size: Images judged at once (with all their captions).
        scale: Multiplies the score.
    """

    def __init__(self, model: Any, processor: Any, prompt: Prompt = None, score: str = "yes_no",
                 answers: Sequence[str] = ("yes", "no"), batch_size: int = 16,
                 scale: float = 1.0) -> None:
        if score not in SCORES:
            raise ConfigError(f"vlm_judge: score must be one of {SCORES}, got {score!r}")
        if len(answers) != 2 or batch_size < 1:
            raise ConfigError(f"vlm_judge: answers must be two words (yes, no), got {list(answers)}; "
                              f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval()
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        text = render_prompt(processor, default_prompt(processor) if prompt is None else prompt)
        if text is None or text.count(PLACEHOLDER) != 1:
            raise ConfigError(f"vlm_judge: the prompt must hold {PLACEHOLDER} exactly once; "
                              f"rendered it reads {text!r}")
        self.head, self.tail = text.split(PLACEHOLDER)
        self.score, self.batch_size, self.scale = score, batch_size, scale
        self.yes, self.no = (answer_ids(self.tokenizer, w) for w in answers)
        if not self.yes or not self.no or set(self.yes) & set(self.no):
            raise ConfigError(f"vlm_judge: the tokenizer cannot tell the answers {list(answers)} "
                              f"apart (first tokens {self.yes} and {self.no})")
        config = model.config
        self.encoder_decoder = bool(config.is_encoder_decoder or
                                    getattr(config.get_text_config(), "is_encoder_decoder", False))
        generation = model.generation_config
        self.pad_token_id = first_set(generation.pad_token_id, self.tokenizer.pad_token_id,
                                      self.tokenizer.eos_token_id, 0)
        if isinstance(self.pad_token_id, list):
            self.pad_token_id = self.pad_token_id[0]
        self.decoder_start_token_id = first_set(generation.decoder_start_token_id,
                                                getattr(config.get_text_config(),
                                                        "decoder_start_token_id", None),
                                                self.pad_token_id)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _inputs(self, image: Any, text: str) -> dict[str, torch.Tensor]:
        """The processor's inputs for one image and text, on the device."""
        dtype = next(self.model.parameters()).dtype
        try:
            out = self.processor(images=[[image]], text=[text], return_tensors="pt")
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"vlm_judge: {type(self.processor).__name__} cannot prepare an image "
                              f"with the prompt {text!r}: {exc}") from exc
        return {k: v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device)
                for k, v in out.items() if isinstance(v, torch.Tensor) and k not in DROPPED_KEYS}

    def answer_logits(self, images: Sequence[Any], rows: torch.Tensor,
                      captions: Sequence[str]) -> torch.Tensor:
        """The next-token logits after each caption's question. Shape: (B, V).

        Args:
            images: The N images.
            rows: Shape: (B,). The image of each caption.
            captions: The B captions.
        """
        if self.encoder_decoder:
            inputs = left_pad_cat([self._inputs(images[r], self.head + c + self.tail)
                                   for r, c in zip(rows.tolist(), captions)], self.pad_token_id)
            start = torch.full((len(captions), 1), self.decoder_start_token_id, device=self.device)
            return self.model(**inputs, decoder_input_ids=start).logits[:, -1]
        prefix = prefill(self.model, left_pad_cat([self._inputs(im, self.head) for im in images],
                                                  self.pad_token_id), rows.to(self.device))
        tails = [self.tokenizer(c + self.tail, add_special_tokens=False)["input_ids"] for c in captions]
        width = max(map(len, tails))
        tokens = torch.tensor([t + [self.pad_token_id] * (width - len(t)) for t in tails],
                              device=self.device)
        logits = extend(self.model, prefix, tokens).logits  # right padding: causal, never read
        last = torch.tensor([len(t) - 1 for t in tails], device=self.device)
        return logits[torch.arange(len(tails), device=self.device), last]

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """The caption scores from the answer logits (B, V). Shape: (B,)."""
        logp = torch.log_softmax(logits.float(), dim=-1)
        yes = torch.logsumexp(logp[:, self.yes], dim=-1)
        if self.score == "logprob":
            return yes
        return torch.exp(yes - torch.logaddexp(yes, torch.logsumexp(logp[:, self.no], dim=-1)))

    @torch.no_grad()
    def __call__(self, rollout: Rollout) -> RewardOutput:
        group = rollout.group.cpu()
        scores = torch.empty(rollout.batch_size)
        for start in range(0, len(rollout.images), self.batch_size):
            images = rollout.images[start:start + self.batch_size]
            chosen = ((group >= start) & (group < start + len(images))).nonzero().squeeze(1)
            if len(chosen) == 0:
                continue
            logits = self.answer_logits(images, group[chosen] - start,
                                        [rollout.captions[i] for i in chosen.tolist()])
            scores[chosen] = self.scores(logits).cpu()
        yes = scores if self.score == "yes_no" else scores.exp()
        return RewardOutput(sequence=scores * self.scale,
                            metrics={"p_yes": float(yes.mean()),
                                     "yes_share": float((yes > 0.5).float().mean())})


def vlm_judge(model: str, prompt: Prompt = None, score: str = "yes_no",
              answers: Sequence[str] = ("yes", "no"), dtype: str = "float32", device: str = "cpu",
              batch_size: int = 16, scale: float = 1.0) -> VLMJudgeReward:
    """Load an image-text-to-text model from the hub or a folder as a VLM judge.

    Args:
        model: Hub name (e.g. ``HuggingFaceTB/SmolVLM-256M-Instruct``) or local folder.
        prompt, score, answers, batch_size, scale: See ``VLMJudgeReward``.
        dtype: float32, bfloat16 or float16.
        device: Torch device.
    """
    if looks_local(model) and not Path(model).expanduser().is_dir():
        raise ConfigError(f"vlm_judge: model folder {model!r} does not exist; give a directory "
                          "written by save_pretrained or a hub name")
    processor, net = load_image_text_to_text(model, dtype, "vlm_judge: model")
    return VLMJudgeReward(net.to(device), processor, prompt=prompt, score=score, answers=answers,
                          batch_size=batch_size, scale=scale)


def tiny_vlm_judge(family: str = "llava", seed: int = 0, prompt: Prompt | str = "family",
                   score: str = "yes_no", scale: float = 1.0) -> VLMJudgeReward:
    """A random-weight judge of one family's real classes (``vlrm_plugins.hf_tiny``), written
    and loaded back through ``vlm_judge``; ``prompt="family"`` puts the family's image
    placeholder before the default question when it takes plain text."""
    from vlrm_plugins.hf_tiny import save_tiny_captioner

    with tempfile.TemporaryDirectory() as folder, quiet_transformers():
        spec = save_tiny_captioner(family, folder, seed=seed)
        if prompt == "family":  # chat families: the default; plain text: keep its <image>
            image = "<image>" if "<image>" in (spec.prompt or "") else ""
            prompt = None if isinstance(spec.prompt, list) else f"{image}Question: {QUESTION} Answer:"
        return vlm_judge(folder, prompt=prompt, score=score, scale=scale)


@hookimpl
def vlrm_register_rewards() -> dict[str, Any]:
    return {"vlm_judge": vlm_judge, "tiny_vlm_judge": tiny_vlm_judge}
