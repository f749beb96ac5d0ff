"""CHAIR: how many of the objects a caption mentions are not in the image (COCO).

CHAIR-i is the share of object mentions whose COCO category is absent from the image's
instance annotations; CHAIR-s is the share of captions with at least one such mention
(Rohrbach et al., 2018). Mentions are found with a synonym list written for vlrm
(``SYNONYMS``: each of COCO's 80 categories with the words captions use for it, singular;
plurals are matched by rule, multi-word names before their parts), and counted once per
category per caption.

Metrics: ``chair_i``, ``chair_s``, ``objects_mentioned`` (categories per caption),
``object_recall`` (share of the image's annotated categories the caption mentions),
``unannotated`` (captions whose image has no annotations in the file: left out of the rest).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from vlrm import hookimpl
from vlrm.errors import ConfigError
from vlrm.evaluation import CaptionSet, Metric

#: COCO category -> the words captions use for it (singular). [ours]
SYNONYMS: dict[str, tuple[str, ...]] = {
    "person": ("person", "man", "woman", "boy", "girl", "child", "kid", "baby", "people",
               "player", "guy", "lady", "skier", "surfer", "skateboarder", "snowboarder",
               "rider", "pedestrian", "adult", "teenager", "toddler", "gentleman", "batter",
               "catcher", "pitcher", "umpire", "chef", "cook", "soldier", "officer", "worker",
               "crowd", "family", "couple", "tourist", "biker", "cyclist", "student"),
    "bicycle": ("bicycle", "bike", "cycle"),
    "car": ("car", "taxi", "sedan", "suv", "jeep", "cab", "automobile"),
    "motorcycle": ("motorcycle", "motorbike", "scooter", "moped", "dirt bike"),
    "airplane": ("airplane", "plane", "jet", "aircraft", "airliner", "jetliner"),
    "bus": ("bus", "trolley", "double decker"),
    "train": ("train", "locomotive", "tram", "subway", "railcar"),
    "truck": ("truck", "pickup", "lorry", "van", "fire truck"),
    "boat": ("boat", "ship", "sailboat", "kayak", "canoe", "yacht", "ferry", "raft"),
    "traffic light": ("traffic light", "stoplight", "traffic signal", "street light"),
    "fire hydrant": ("fire hydrant", "hydrant"),
    "stop sign": ("stop sign",),
    "parking meter": ("parking meter", "meter"),
    "bench": ("bench",),
    "bird": ("bird", "pigeon", "seagull", "gull", "duck", "goose", "parrot", "owl", "eagle",
             "crow", "swan", "chicken", "hen", "sparrow"),
    "cat": ("cat", "kitten", "kitty"),
    "dog": ("dog", "puppy", "pup", "terrier", "poodle", "retriever", "labrador"),
    "horse": ("horse", "pony", "foal", "stallion"),
    "sheep": ("sheep", "lamb", "ram"),
    "cow": ("cow", "cattle", "bull", "calf", "ox", "oxen"),
    "elephant": ("elephant",),
    "bear": ("bear", "grizzly"),
    "zebra": ("zebra",),
    "giraffe": ("giraffe",),
    "backpack": ("backpack", "rucksack"),
    "umbrella": ("umbrella", "parasol"),
    "handbag": ("handbag", "purse", "bag"),
    "tie": ("tie", "necktie", "bow tie"),
    "suitcase": ("suitcase", "luggage", "baggage"),
    "frisbee": ("frisbee",),
    "skis": ("ski", "skis"),
    "snowboard": ("snowboard",),
    "sports ball": ("ball", "football", "soccer ball", "baseball", "basketball", "tennis ball",
                    "volleyball"),
    "kite": ("kite",),
    "baseball bat": ("baseball bat", "bat"),
    "baseball glove": ("baseball glove", "glove", "mitt"),
    "skateboard": ("skateboard",),
    "surfboard": ("surfboard", "surf board"),
    "tennis racket": ("tennis racket", "racket", "racquet"),
    "bottle": ("bottle",),
    "wine glass": ("wine glass",),
    "cup": ("cup", "mug", "coffee cup"),
    "fork": ("fork",),
    "knife": ("knife",),
    "spoon": ("spoon",),
    "bowl": ("bowl",),
    "banana": ("banana",),
    "apple": ("apple",),
    "sandwich": ("sandwich", "burger", "hamburger", "sub"),
    "orange": ("orange",),
    "broccoli": ("broccoli",),
    "carrot": ("carrot",),
    "hot dog": ("hot dog", "hotdog"),
    "pizza": ("pizza",),
    "donut": ("donut", "doughnut"),
    "cake": ("cake", "cupcake"),
    "chair": ("chair", "stool"),
    "couch": ("couch", "sofa"),
    "potted plant": ("potted plant", "houseplant", "plant"),
    "bed": ("bed",),
    "dining table": ("dining table", "table"),
    "toilet": ("toilet",),
    "tv": ("tv", "television"),
    "laptop": ("laptop", "notebook computer"),
    "mouse": ("computer mouse", "mouse"),
    "remote": ("remote", "remote control", "controller"),
    "keyboard": ("keyboard",),
    "cell phone": ("cell phone", "cellphone", "phone", "smartphone", "mobile phone"),
    "microwave": ("microwave",),
    "oven": ("oven", "stove"),
    "toaster": ("toaster",),
    "sink": ("sink",),
    "refrigerator": ("refrigerator", "fridge"),
    "book": ("book",),
    "clock": ("clock",),
    "vase": ("vase",),
    "scissors": ("scissors",),
    "teddy bear": ("teddy bear", "teddy", "stuffed animal"),
    "hair drier": ("hair drier", "hair dryer", "blow dryer"),
    "toothbrush": ("toothbrush",),
}

#: Plurals that no suffix rule makes.
IRREGULAR = {"people": "person", "men": "man", "women": "woman", "children": "child",
             "mice": "mouse", "knives": "knife", "oxen": "ox", "geese": "goose",
             "teeth": "tooth", "calves": "calf", "skis": "skis", "scissors": "scissors",
             "gentlemen": "gentleman", "sheep": "sheep", "buses": "bus", "benches": "bench",
             "sandwiches": "sandwich", "couches": "couch", "glasses": "glass",
             "boxes": "box", "ponies": "pony", "puppies": "puppy", "kitties": "kitty",
             "ladies": "lady", "families": "family", "taxis": "taxi", "skies": "sky",
             "ties": "tie", "pies": "pie", "bowties": "bowtie"}


#: Category words that are also colours: "an orange cat" mentions no orange; "two oranges",
#: "an orange" at the end of a caption do.
COLOUR_NOUNS = frozenset({"orange"})


def singular(word: str) -> str:
    """The singular of a lower-case English noun, by ``IRREGULAR`` or the ``-s`` rules."""
    if word in IRREGULAR:
        return IRREGULAR[word]
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "xes", "sses")):
        return word[:-2]
    if word.endswith("s") and not word.endswith(("ss", "us")) and len(word) > 3:
        return word[:-1]
    return word


class ObjectMentions:
    """Finds the COCO categories a text mentions (longest phrase first, each word once)."""

    def __init__(self, synonyms: Mapping[str, Sequence[str]] = SYNONYMS) -> None:
        self.phrases: dict[tuple[str, ...], str] = {}
        for category, words in synonyms.items():
            for phrase in words:
                self.phrases[tuple(phrase.lower().split())] = category
        self.longest = max(len(p) for p in self.phrases)

    def __call__(self, text: str) -> set[str]:
        raw = re.findall(r"[a-z]+", text.lower())
        words = [singular(w) for w in raw]
        found, i = set(), 0
        while i < len(words):
            for n in range(min(self.longest, len(words) - i), 0, -1):
                category = self.phrases.get(tuple(words[i:i + n]))
                if category is not None:
                    if not (n == 1 and raw[i] in COLOUR_NOUNS and i + 1 < len(words)):
                        found.add(category)  # (a colour word before a noun names no fruit)
                    i += n
                    break
            else:
                i += 1
        return found


def coco_image_number(image_id: str) -> int | None:
    """The COCO image number in an id (``.../COCO_val2014_000000391895.jpg`` -> 391895)."""
    digits = re.findall(r"(\d+)", Path(str(image_id)).stem)
    return int(digits[-1]) if digits else None


class Chair:
    """CHAIR-i and CHAIR-s against COCO instance annotations (see the module docstring).

    Args:
        annotations: COCO's ``instances_*.json`` (images, annotations, categories).
        synonyms: A JSON file ``{category: [words]}`` replacing ``SYNONYMS``.
    """

    def __init__(self, annotations: str, synonyms: str | None = None) -> None:
        path = Path(annotations).expanduser()
        try:
            data = json.loads(path.read_text())
            names = {c["id"]: c["name"] for c in data["categories"]}
            self.present: dict[int, set[str]] = {int(i["id"]): set() for i in data["images"]}
            for a in data["annotations"]:
                self.present.setdefault(int(a["image_id"]), set()).add(names[a["category_id"]])
        except FileNotFoundError as exc:
            raise ConfigError(f"chair: annotation file {str(path)!r} does not exist") from exc
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ConfigError(f"chair: {str(path)!r} is not a COCO instances file "
                              f"({type(exc).__name__}: {exc})") from exc
        if synonyms is None:  # the file's categories (COCO's instances files have all 80)
            table = {k: v for k, v in SYNONYMS.items() if k in set(names.values())}
        else:
            try:
                table = json.loads(Path(synonyms).expanduser().read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise ConfigError(f"chair: cannot read synonyms {synonyms!r}: {exc}") from exc
            unknown = sorted(set(table) - set(names.values()))
            if unknown:
                raise ConfigError(f"chair: synonyms name categories {path.name} does not have: "
                                  f"{', '.join(unknown)}")
        self.mentions = ObjectMentions(table)

    def __call__(self, captions: CaptionSet) -> Mapping[str, Metric]:
        return chair_metrics(self.mentions, self._present(captions.image_ids), captions.captions)

    def _present(self, image_ids: Iterable[str]) -> list[set[str] | None]:
        return [self.present.get(n) if (n := coco_image_number(i)) is not None else None
                for i in image_ids]


def chair_metrics(mentions: ObjectMentions, present: Sequence[set[str] | None],
                  captions: Sequence[str]) -> dict[str, float]:
    """CHAIR over captions whose images' annotated categories are known (None: unknown)."""
    mentioned = hallucinated = bad_captions = judged = 0
    recall, per_caption = [], []
    for truth, caption in zip(present, captions):
        if truth is None:
            continue
        judged += 1
        found = mentions(caption)
        wrong = found - truth
        mentioned += len(found)
        hallucinated += len(wrong)
        bad_captions += bool(wrong)
        per_caption.append(len(found))
        if truth:
            recall.append(len(found & truth) / len(truth))
    return {"chair_i": hallucinated / mentioned if mentioned else 0.0,
            "chair_s": bad_captions / judged if judged else 0.0,
            "objects_mentioned": sum(per_caption) / judged if judged else 0.0,
            "object_recall": sum(recall) / len(recall) if recall else 0.0,
            "unannotated": float(len(captions) - judged)}


@hookimpl
def vlrm_register_evaluators() -> dict[str, Any]:
    return {"chair": Chair}
