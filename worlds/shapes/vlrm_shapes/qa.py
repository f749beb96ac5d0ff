"""The shapes world's QA utility: questions from each scene, and a reader that answers them
from a caption by parsing it with the world's grammar (``vlrm_plugins.qa_utility``).

Questions about scene ``shapes/<split>/<index>``: how many objects there are, and for each
object (first, second, third from the left) its shape, colour and size. The reader parses the
caption; a caption outside the grammar answers nothing; the k-th stated object answers the
questions about the k-th object from the left (the grammar states objects left to right); an
attribute the caption leaves out is not answered. So a caption that names every object with
its colour and size answers everything, a shapes-only caption answers the count and the
shapes, and a caption that invents or misplaces objects answers wrong.

With ``ask_absent`` (the default) a scene of fewer than three objects is also asked the shape
of each position it leaves empty, with "none" among the choices: the reader answers "none"
when the caption states no object there, so each invented object costs a question of its own,
not only the count.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vlrm import hookimpl
from vlrm_plugins.qa_utility import QAUtilityReward, Question
from vlrm_shapes.world import COLOURS, SHAPES, SIZES, ShapesWorld, parse, parse_image_id

ORDINALS = ("first", "second", "third")
COUNTS = ("one", "two", "three")
NONE = "none"
ATTRIBUTES = {"shape": SHAPES, "colour": tuple(COLOURS), "size": tuple(SIZES)}


class ShapesQuestions:
    """The questions of a scene (see the module docstring).

    Args:
        seed: The world's seed.
        ask_absent: Also ask the shape of each empty position ("none") [ours: on].
    """

    def __init__(self, seed: int = 0, ask_absent: bool = True) -> None:
        self.world = ShapesWorld(seed)
        self.ask_absent = ask_absent

    def questions(self, image_id: str) -> list[Question]:
        split, index = parse_image_id(image_id)
        scene = self.world.scene(split, index)
        asked = [Question("How many objects are there?", COUNTS, len(scene) - 1)]
        for k, thing in enumerate(scene):
            for name, values in ATTRIBUTES.items():
                asked.append(Question(f"What is the {name} of the {ORDINALS[k]} object from the "
                                      "left?", values, values.index(getattr(thing, name))))
        if self.ask_absent:
            for k in range(len(scene), len(ORDINALS)):
                asked.append(Question(f"What is the shape of the {ORDINALS[k]} object from the "
                                      "left?", (*SHAPES, NONE), len(SHAPES)))
        return asked


class ShapesReader:
    """Answers a scene's questions from a caption alone, through the world's grammar."""

    def answer(self, caption: str, questions: Sequence[Question]) -> list[int]:
        parsed = parse(caption)
        if not parsed.grammatical:
            return [-1] * len(questions)
        stated = parsed.objects
        answers = []
        for q in questions:
            if q.text.startswith("How many"):
                n = len(stated)
                answers.append(n - 1 if 1 <= n <= len(COUNTS) else -1)
                continue
            name = next(a for a in ATTRIBUTES if f"the {a} of" in q.text)
            k = next(i for i, o in enumerate(ORDINALS) if f"the {name} of the {o} object" in q.text)
            value = getattr(stated[k], name) if k < len(stated) else NONE
            answers.append(q.choices.index(value) if value in q.choices else -1)
        return answers


def shapes_qa_utility(seed: int = 0, scale: float = 1.0, ask_absent: bool = True
                      ) -> QAUtilityReward:
    """The QA utility reward on the shapes world: its questions (``ask_absent`` as
    ``ShapesQuestions``), its grammar reader."""
    return QAUtilityReward(ShapesQuestions(seed, ask_absent), ShapesReader(), scale)


@hookimpl
def vlrm_register_rewards() -> dict[str, Any]:
    return {"shapes_qa_utility": shapes_qa_utility}
