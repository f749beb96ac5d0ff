"""The shapes world: a procedurally generated captioning task small enough for a CPU.

Scenes hold one to three objects (a shape, a colour and a size each) on a 64 x 64 canvas,
listed left to right. Everything is deterministic from a seed: scene ``i`` of a split is the
same on every machine. The world writes the full caption of a scene from a small grammar
("a small red circle and a large blue square") and parses any caption back, so it knows
whether a caption is grammatical, which stated attributes are true, and how many objects it
invents.

The training captions are biased the way the paper says real ones are: most name the shapes
only, some start with a meta-prefix ("an image of ..."), some state an invented year, and a
minority are full. A captioner trained on them describes shapes and omits colours and sizes;
VLRM's RL should make it say more.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from attrs import frozen
from PIL import Image, ImageDraw

from vlrm import hookimpl
from vlrm.data import ImageFolder
from vlrm.errors import ConfigError
from vlrm_plugins.blip2_opt import Blip2OptPolicy
from vlrm_plugins.clip_eval import ClipRecall
from vlrm_plugins.clip_reward import ClipReward

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {"red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 215),
           "yellow": (235, 200, 30), "purple": (140, 60, 180), "orange": (245, 130, 25)}
SIZES = {"small": 7, "large": 13}  # radius in pixels
META_PREFIXES = ("an image of", "a picture of", "a photo of")
SPLITS = {"train": 0, "val": 1, "test": 2}
CANVAS = 64
SLOTS = (11, 32, 53)  # x centres of the three left-to-right positions


@frozen
class Thing:
    """One object of a scene."""

    shape: str
    colour: str
    size: str
    x: int
    y: int


@frozen
class Stated:
    """One object as a caption states it; an attribute the caption omits is None."""

    shape: str
    colour: str | None = None
    size: str | None = None


@frozen
class Parsed:
    """A caption read back by the world's grammar.

    Attributes:
        grammatical: The caption is objects joined by "and", each "a|an [size] [colour] shape",
            optionally after a meta-prefix and before "in <year>".
        objects: The stated objects, left to right (empty when not grammatical).
        meta: It starts with a meta-prefix ("an image of").
        year: It states a year.
    """

    grammatical: bool
    objects: tuple[Stated, ...] = ()
    meta: bool = False
    year: bool = False


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def describe(things: Sequence[Stated | Thing], colour: bool = True, size: bool = True) -> str:
    """The grammar's caption of objects, with or without colours and sizes."""
    phrases = []
    for t in things:
        words = ([t.size] if size and t.size else []) + ([t.colour] if colour and t.colour else []) + [t.shape]
        phrases.append(f"{_article(words[0])} {' '.join(words)}")
    return " and ".join(phrases)


_OBJECT = re.compile(r"(?:a|an) (?:(small|large) )?(?:(%s) )?(%s)" % ("|".join(COLOURS), "|".join(SHAPES)))
_META = re.compile(r"^(?:%s) " % "|".join(META_PREFIXES))
_YEAR = re.compile(r" in ((?:18|19|20)\d\d)$")


def parse(caption: str) -> Parsed:
    """Read a caption back with the world's grammar (case and outer spaces ignored)."""
    text = " ".join(caption.lower().split())
    meta = bool(_META.match(text))
    text = _META.sub("", text)
    year = bool(_YEAR.search(text))
    text = _YEAR.sub("", text)
    objects = []
    for phrase in text.split(" and "):
        m = _OBJECT.fullmatch(phrase)
        if m is None:
            return Parsed(False, meta=meta, year=year)
        size, colour, shape = m.groups()
        first = size or colour or shape
        if not phrase.startswith(_article(first) + " "):
            return Parsed(False, meta=meta, year=year)
        objects.append(Stated(shape, colour, size))
    return Parsed(True, tuple(objects), meta, year)


@frozen
class Judgement:
    """How a caption compares with the scene it describes.

    Attributes:
        grammatical: As ``Parsed.grammatical``.
        correct: Stated attributes (shape, colour, size) that are true of the object in the
            same left-to-right position.
        stated: Attributes stated for objects that exist.
        invented: Objects stated beyond those in the scene.
        colours: Colours stated.
        repeated: One object stated more times than the scene holds objects that fit it
            (see ``repeats_beyond_scene``).
    """

    grammatical: bool
    correct: int = 0
    stated: int = 0
    invented: int = 0
    colours: int = 0
    repeated: bool = False


def _repeated(objects: Sequence[Stated], scene: Sequence[Thing]) -> bool:
    for said in set(objects):
        fits = sum(t.shape == said.shape and said.colour in (None, t.colour)
                   and said.size in (None, t.size) for t in scene)
        if objects.count(said) > max(fits, 1):
            return True
    return False


def judge(caption: str, scene: Sequence[Thing]) -> Judgement:
    """Check a caption against the scene, object by object, left to right."""
    parsed = parse(caption)
    if not parsed.grammatical:
        return Judgement(False)
    correct = stated = 0
    for said, true in zip(parsed.objects, scene):
        for attr in ("shape", "colour", "size"):
            value = getattr(said, attr)
            if value is not None:
                stated += 1
                correct += value == getattr(true, attr)
    return Judgement(True, correct, stated, max(0, len(parsed.objects) - len(scene)),
                     sum(o.colour is not None for o in parsed.objects),
                     _repeated(parsed.objects, scene))


def repeats_beyond_scene(caption: str, scene: Sequence[Thing]) -> bool | None:
    """Whether a caption states one object more times than the scene holds objects that fit it.

    "a square and a square" repeats itself on a scene with one square, not on a scene with two;
    an object fits a statement when its shape and every stated colour and size agree. None when
    the caption does not parse.
    """
    verdict = judge(caption, scene)
    return verdict.repeated if verdict.grammatical else None


class ShapesWorld:
    """Scenes, images and captions of the world, all from ``seed``.

    Args:
        seed: World seed: the same seed gives the same scenes everywhere.
        sizes: Images per split.
        mix: Shares of the biased training captions: shapes only, meta-prefix, invented year,
            full [ours, after the paper's description of web captions: 0.6, 0.15, 0.05, 0.2].
    """

    def __init__(self, seed: int = 0, sizes: dict[str, int] | None = None,
                 mix: Sequence[float] = (0.6, 0.15, 0.05, 0.2)) -> None:
        self.seed = seed
        self.sizes = {"train": 20000, "val": 500, "test": 1000, **(sizes or {})}
        if len(mix) != 4 or min(mix) < 0 or abs(sum(mix) - 1) > 1e-6:
            raise ConfigError(f"shapes world mix {list(mix)} must be four shares (shapes only, "
                              "meta-prefix, year, full) that sum to 1")
        self.mix = tuple(mix)

    def _rng(self, split: str, index: int, stream: int) -> np.random.Generator:
        if split not in SPLITS:
            raise KeyError(f"no split {split!r} (splits: {', '.join(SPLITS)})")
        return np.random.default_rng([self.seed, SPLITS[split], index, stream])

    def scene(self, split: str, index: int) -> tuple[Thing, ...]:
        """The objects of scene ``index``, left to right."""
        rng = self._rng(split, index, 0)
        n = int(rng.integers(1, 4))
        slots = sorted(rng.choice(len(SLOTS), size=n, replace=False).tolist())
        things = []
        for slot in slots:
            size = str(rng.choice(list(SIZES)))
            things.append(Thing(shape=str(rng.choice(SHAPES)), colour=str(rng.choice(list(COLOURS))),
                                size=size, x=SLOTS[slot] + int(rng.integers(-2, 3)),
                                y=int(rng.integers(18, CANVAS - 17))))
        return tuple(things)

    def render(self, scene: Sequence[Thing], noise_seed: int = 0) -> Image.Image:
        """The scene as a 64 x 64 RGB image on a lightly textured grey background."""
        rng = np.random.default_rng([self.seed, 99, noise_seed])
        base = rng.integers(205, 236, size=(CANVAS, CANVAS, 1)).repeat(3, axis=2).astype(np.uint8)
        image = Image.fromarray(base, "RGB")
        draw = ImageDraw.Draw(image)
        for t in scene:
            r, fill = SIZES[t.size], COLOURS[t.colour]
            box = (t.x - r, t.y - r, t.x + r, t.y + r)
            if t.shape == "circle":
                draw.ellipse(box, fill=fill)
            elif t.shape == "square":
                draw.rectangle((t.x - r * 0.85, t.y - r * 0.85, t.x + r * 0.85, t.y + r * 0.85), fill=fill)
            elif t.shape == "triangle":
                draw.polygon([(t.x, t.y - r), (t.x - r, t.y + r * 0.8), (t.x + r, t.y + r * 0.8)], fill=fill)
            else:  # diamond
                draw.polygon([(t.x, t.y - r), (t.x + r * 0.8, t.y), (t.x, t.y + r), (t.x - r * 0.8, t.y)],
                             fill=fill)
        return image

    def image(self, split: str, index: int) -> Image.Image:
        return self.render(self.scene(split, index), noise_seed=SPLITS[split] * 10_000_000 + index)

    def full_caption(self, split: str, index: int) -> str:
        return describe(self.scene(split, index))

    def _caption_draw(self, split: str, index: int) -> tuple[int, np.random.Generator]:
        """The biased caption's style and the stream that draws the rest of it."""
        rng = self._rng(split, index, 1)
        return int(rng.choice(4, p=self.mix)), rng

    def caption_kind(self, split: str, index: int) -> int:
        """The style of the image's biased caption: 0 shapes only, 1 meta-prefix, 2 year, 3 full."""
        return self._caption_draw(split, index)[0]

    def biased_caption(self, split: str, index: int) -> str:
        """A training caption drawn with the world's bias (deterministic per image)."""
        kind, rng = self._caption_draw(split, index)
        scene = self.scene(split, index)
        if kind == 3:
            return describe(scene)
        shapes = describe(scene, colour=False, size=False)
        if kind == 1:
            return f"{rng.choice(META_PREFIXES)} {shapes}"
        if kind == 2:
            return f"{shapes} in {int(rng.integers(1950, 2025))}"
        return shapes

    def partial_caption(self, split: str, index: int) -> str:
        """A true caption with a random subset of the attributes (colours or sizes dropped)."""
        rng = self._rng(split, index, 2)
        return describe(self.scene(split, index), colour=bool(rng.integers(2)), size=bool(rng.integers(2)))

    def vocabulary(self) -> list[str]:
        """Every word a caption of this world can hold (years included)."""
        words = {"a", "an", "and", "in", *SHAPES, *COLOURS, *SIZES}
        words |= {w for p in META_PREFIXES for w in p.split()}
        words |= {str(y) for y in range(1950, 2025)}
        return sorted(words)


def image_id(split: str, index: int) -> str:
    return f"shapes/{split}/{index:06d}"


def parse_image_id(value: str) -> tuple[str, int]:
    parts = str(value).split("/")
    if len(parts) != 3 or parts[0] != "shapes" or parts[1] not in SPLITS or not parts[2].isdigit():
        raise ValueError(f"{value!r} is not a shapes-world image id (shapes/<split>/<index>)")
    return parts[1], int(parts[2])


class ShapesImages(ImageFolder):
    """One split of the shapes world as an image source (training, evaluation, held-out).

    Image ids are ``shapes/<split>/<index>``; images are rendered on demand, so nothing is
    read from disk. References are the full captions.

    Args:
        split: train, val or test.
        seed: World seed.
        num_images: Use the first this many images of the split (default: all of it).
        split_sizes: Images per split (see ``ShapesWorld``).
    """

    def __init__(self, split: str = "train", seed: int = 0, num_images: int | None = None,
                 split_sizes: dict[str, int] | None = None) -> None:
        if split not in SPLITS:
            raise ConfigError(f"shapes split {split!r} is not one of {', '.join(SPLITS)}")
        self.world = ShapesWorld(seed, split_sizes)
        n = self.world.sizes[split] if num_images is None else min(num_images, self.world.sizes[split])
        self.split, self.root = split, Path("shapes")
        self.paths = [Path(image_id(split, i)) for i in range(n)]
        self.skipped: set[Path] = set()

    def load(self, path: Path) -> Image.Image:
        split, index = parse_image_id(str(path))
        return self.world.image(split, index)

    def references(self, image_id: str) -> list[str]:
        split, index = parse_image_id(image_id)
        return [self.world.full_caption(split, index)]


@hookimpl
def vlrm_register_datasets() -> dict[str, Any]:
    return {"shapes": ShapesImages}


WEIGHTS = Path(__file__).parent / "weights"


def weights_dir(path: str | None = None) -> Path:
    """The built world's models: ``path``, or the build shipped with vlrm."""
    folder = Path(path).expanduser() if path else WEIGHTS
    if not (folder / "build.json").is_file():
        raise ConfigError(f"no built shapes world in {str(folder)!r} (build.json missing); build "
                          "one with `vlrm-shapes build --config configs/shapes/build.yaml`")
    return folder


def shapes_captioner(weights: str | None = None, max_new_tokens: int = 20, temperature: float = 1.0,
                     trainable: Sequence[str] = ("qformer", "query_tokens", "language_projection"),
                     ) -> Blip2OptPolicy:
    """The world's cross-entropy captioner as a BLIP-2 OPT policy (the RL starting point)."""
    from vlrm_plugins.blip2_opt import blip2_opt

    return blip2_opt(str(weights_dir(weights) / "captioner"), trainable=trainable,
                     max_new_tokens=max_new_tokens, temperature=temperature)


def shapes_reward_clip(weights: str | None = None, scale: float = 1.0) -> ClipReward:
    """The world's reward CLIP, through the CLIP reward plugin's ``local-dir:`` loader."""
    from vlrm_plugins.clip_reward import clip_reward

    return clip_reward(f"local-dir:{weights_dir(weights) / 'reward_clip'}", scale=scale)


def shapes_clip_recall(weights: str | None = None, role: str = "judge") -> ClipRecall:
    """CLIP Recall with the world's judge CLIP (or, with role "reward", the reward CLIP)."""
    from vlrm_plugins.clip_reward import clip_reward

    if role not in ("judge", "reward"):
        raise ConfigError(f"shapes_clip_recall role {role!r} is not judge or reward")
    name = f"local-dir:{weights_dir(weights) / f'{role}_clip'}"
    return ClipRecall(clip_reward(name), f"shapes-{role}-clip", None, "fp32")


class ShapesCaptionStats:
    """``CaptionStats`` plus what only the world can check: grammar, truth, invention.

    Extra metrics: ``grammar_rate`` (captions the world's grammar parses),
    ``attribute_accuracy`` (stated shapes, colours and sizes that are true of the object in the
    same left-to-right position, over all stated), ``invented_objects`` (mean objects stated
    beyond the scene's).

    ``repeats_beyond_scene``: the share of captions that state one object more often than the
    image holds objects fitting it ("a square and a square" with one square in the scene);
    unlike ``repetition_rate`` (the repetition penalty's n-gram detector) it never fires on a
    true caption, and it also counts short repeats that are shape errors. The n-gram detector
    fires on 2.1% of the world's true full captions, e.g. "a large red diamond and a large
    blue diamond and a large blue square" ("diamond and a large blue" twice).

    Args:
        seed: The world's seed (the scenes behind the image ids).
        ngram: Repeated n-gram length for ``repetition_rate`` [ours: 5, as in the shapes
            configs: full captions of two objects share 3-grams such as "a small red"].
    """

    def __init__(self, seed: int = 0, ngram: int = 5) -> None:
        from vlrm_plugins.caption_stats import CaptionStats

        self.world = ShapesWorld(seed)
        self.stats = CaptionStats(ngram=ngram, objects=False)  # the world has no COCO objects

    def __call__(self, captions: Any) -> dict[str, Any]:
        out = dict(self.stats(captions))
        verdicts = [judge(c, self.world.scene(*parse_image_id(i)))
                    for i, c in zip(captions.image_ids, captions.captions)]
        n = max(len(verdicts), 1)
        stated = sum(v.stated for v in verdicts)
        out["grammar_rate"] = sum(v.grammatical for v in verdicts) / n
        out["attribute_accuracy"] = sum(v.correct for v in verdicts) / stated if stated else 0.0
        out["invented_objects"] = sum(v.invented for v in verdicts) / n
        out["repeats_beyond_scene"] = sum(v.repeated for v in verdicts) / n
        return out


@hookimpl
def vlrm_register_policies() -> dict[str, Any]:
    return {"shapes_captioner": shapes_captioner}


@hookimpl
def vlrm_register_rewards() -> dict[str, Any]:
    return {"shapes_reward_clip": shapes_reward_clip}


@hookimpl
def vlrm_register_evaluators() -> dict[str, Any]:
    return {"shapes_clip_recall": shapes_clip_recall, "shapes_caption_stats": ShapesCaptionStats}


def shapes_command(argv: list[str]) -> int:
    """The shapes world: build, demo, sweep, continue, itm, llava (vlrm-shapes)."""
    from vlrm_shapes.demo import main

    return main(argv)


@hookimpl
def vlrm_register_commands() -> dict[str, Any]:
    return {"shapes": shapes_command}
