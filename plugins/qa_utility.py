"""QA utility reward (CapRL-style): how much a caption tells a reader who never sees the image.

For each caption a reader answers multiple-choice questions about the caption's image from
the caption alone; the reward is the share it answers correctly (0 to 1, times ``scale``).
A caption that states what the questions ask about scores high; one that states wrong
things scores low, whatever its similarity to the image.

Two parts, each a plugin of its own (any object with the method works):

- a question source, ``questions(image_id) -> [Question]``: ``JsonlQuestions`` reads one JSON
  object per line, ``{"image_id": ..., "questions": [{"question": ..., "choices": [...],
  "answer": <index or the choice's text>}]}`` (the shapes world brings its own, from the
  scene);
- a reader, ``answer(caption, questions) -> [choice index, or -1 for no answer]``:
  ``LMReader`` asks a causal language model with a multiple-choice prompt and takes the
  letter it scores highest (the shapes world brings a reader that parses the caption with the
  world's grammar).

    reward:
      terms:
        qa:
          reward:
            class_path: qa_utility
            init_args:
              questions: {class_path: vlrm_plugins.qa_utility.JsonlQuestions,
                          init_args: {path: data/questions.jsonl}}
              reader: {class_path: vlrm_plugins.qa_utility.LMReader,
                       init_args: {model: Qwen/Qwen2.5-0.5B-Instruct}}
"""

from __future__ import annotations

import json
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from attrs import frozen

from vlrm import hookimpl
from vlrm.errors import ConfigError
from vlrm.structs import RewardOutput, Rollout


@frozen
class Question:
    """A multiple-choice question about one image.

    Attributes:
        text: The question.
        choices: The possible answers.
        answer: The index of the right one in ``choices``.
    """

    text: str
    choices: tuple[str, ...]
    answer: int


@runtime_checkable
class QuestionSource(Protocol):
    def questions(self, image_id: str) -> Sequence[Question]:
        """The questions about this image (at least one)."""


@runtime_checkable
class Reader(Protocol):
    def answer(self, caption: str, questions: Sequence[Question]) -> list[int]:
        """For each question, the index of the chosen answer, or -1 for none, reading only
        the caption."""


class QAUtilityReward:
    """Share of the image's questions a reader answers right from the caption alone.

    Args:
        questions: A question source (``questions(image_id)``).
        reader: A reader (``answer(caption, questions)``).
        scale: Multiplies the share.
    """

    def __init__(self, questions: QuestionSource, reader: Reader, scale: float = 1.0) -> None:
        for name, part, kind in (("questions", questions, QuestionSource), ("reader", reader, Reader)):
            if not isinstance(part, kind):
                raise ConfigError(f"qa_utility: {name} {type(part).__name__} has no "
                                  f"{'questions(image_id)' if kind is QuestionSource else 'answer(caption, questions)'} method")
        self.questions, self.reader, self.scale = questions, reader, scale

    @torch.no_grad()
    def __call__(self, rollout: Rollout) -> RewardOutput:
        asked: dict[str, Sequence[Question]] = {}
        scores, answered = [], []
        for b, caption in enumerate(rollout.captions):
            image_id = str(rollout.image_ids[int(rollout.group[b])])
            if image_id not in asked:
                asked[image_id] = self.questions.questions(image_id)
                if not asked[image_id]:
                    raise ConfigError(f"qa_utility: no questions for image {image_id!r} "
                                      f"({type(self.questions).__name__})")
            questions = asked[image_id]
            answers = self.reader.answer(caption, questions)
            if len(answers) != len(questions):
                raise ValueError(f"qa_utility: the reader gave {len(answers)} answers to "
                                 f"{len(questions)} questions")
            scores.append(sum(a == q.answer for a, q in zip(answers, questions)) / len(questions))
            answered.append(sum(a >= 0 for a in answers) / len(questions))
        sequence = torch.tensor(scores, dtype=torch.float32) * self.scale
        return RewardOutput(sequence=sequence,
                            metrics={"answered": sum(answered) / max(len(answered), 1)})


class JsonlQuestions:
    """Questions from a JSONL file: one ``{"image_id", "questions": [...]}`` object a line.

    Args:
        path: The file. Each question is ``{"question", "choices", "answer"}``; ``answer``
            is the right choice's index or its text.
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise ConfigError(f"qa_utility: question file {str(self.path)!r} does not exist")
        self._by_id: dict[str, list[Question]] = {}
        for number, line in enumerate(self.path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            where = f"{self.path}:{number}"
            try:
                record = json.loads(line)
                image_id = str(record["image_id"])
                questions = [self._question(q, where) for q in record["questions"]]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ConfigError(f"qa_utility: {where}: not a question record "
                                  f"({type(exc).__name__}: {exc})") from exc
            self._by_id.setdefault(image_id, []).extend(questions)

    @staticmethod
    def _question(q: dict[str, Any], where: str) -> Question:
        choices = tuple(str(c) for c in q["choices"])
        answer = q["answer"]
        index = choices.index(str(answer)) if str(answer) in choices and not isinstance(answer, int) \
            else answer
        if not isinstance(index, int) or not 0 <= index < len(choices) or len(choices) < 2:
            raise ConfigError(f"qa_utility: {where}: answer {answer!r} is not one of the "
                              f"{len(choices)} choices of {q['question']!r}")
        return Question(str(q["question"]), choices, index)

    def questions(self, image_id: str) -> list[Question]:
        if image_id not in self._by_id:
            raise ConfigError(f"qa_utility: {self.path} has no questions for image {image_id!r}")
        return self._by_id[image_id]


PROMPT = "Caption: {caption}\nQuestion: {question}\n{choices}Answer:"


class LMReader:
    """A causal language model answering from the caption: the prompt lists the choices as
    ``A. ...``, ``B. ...`` and ends in ``Answer:``; the answer is the letter whose token
    (`` A``, `` B``, ...) the model scores highest next. It always answers.

    Args:
        model: A hub name or local folder (``AutoModelForCausalLM``), or a loaded model.
        tokenizer: Its tokenizer (default: loaded from ``model``).
        device: Torch device.
        dtype: float32, bfloat16 or float16.
        batch_size: Prompts a forward pass.
    """

    def __init__(self, model: Any, tokenizer: Any = None, device: str = "cpu",
                 dtype: str = "float32", batch_size: int = 32) -> None:
        from vlrm_plugins.hf_common import quiet_transformers, torch_dtype

        if isinstance(model, str):
            from transformers import AutoModelForCausalLM, AutoTokenizer

            try:
                with quiet_transformers():
                    tokenizer = tokenizer or AutoTokenizer.from_pretrained(model)
                    model = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype(dtype))
            except OSError as exc:
                raise ConfigError(f"qa_utility: cannot load the reader {model!r}: {exc}") from exc
        if tokenizer is None:
            raise ConfigError("qa_utility: LMReader needs a tokenizer with a loaded model")
        self.model = model.to(device).eval()
        self.tokenizer, self.batch_size = tokenizer, batch_size
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def prompt(self, caption: str, question: Question) -> str:
        choices = "".join(f"{string.ascii_uppercase[i]}. {c}\n" for i, c in enumerate(question.choices))
        return PROMPT.format(caption=caption, question=question.text, choices=choices)

    def letter_ids(self, n: int) -> list[int]:
        """The token of `` A``, `` B``, ... (one token each in BPE vocabularies)."""
        ids = [self.tokenizer.encode(" " + string.ascii_uppercase[i], add_special_tokens=False)
               for i in range(n)]
        if any(len(i) != 1 for i in ids):
            raise ConfigError("qa_utility: the reader's tokenizer splits the answer letters")
        return [i[0] for i in ids]

    @torch.no_grad()
    def letter_logits(self, prompts: Sequence[str]) -> torch.Tensor:
        """Next-token logits after each prompt. Shape: (P, V)."""
        out = []
        for start in range(0, len(prompts), self.batch_size):
            batch = self.tokenizer(list(prompts[start:start + self.batch_size]), return_tensors="pt",
                                   padding=True).to(self.model.device)
            out.append(self.model(**batch).logits[:, -1].float())  # left padding: last = next
        return torch.cat(out)

    def answer(self, caption: str, questions: Sequence[Question]) -> list[int]:
        logits = self.letter_logits([self.prompt(caption, q) for q in questions])
        letters = self.letter_ids(max(len(q.choices) for q in questions))  # tokenised once
        return [int(row[letters[:len(q.choices)]].argmax()) for row, q in zip(logits, questions)]


def qa_utility(questions: QuestionSource, reader: Reader, scale: float = 1.0) -> QAUtilityReward:
    """The QA utility reward (see the module docstring)."""
    return QAUtilityReward(questions, reader, scale)


@hookimpl
def vlrm_register_rewards() -> dict[str, Any]:
    return {"qa_utility": qa_utility}
