"""MS-COCO in Karpathy's split format (``dataset_coco.json``), the paper's evaluation data.

The file lists every image once with its split (``train``, ``restval``, ``val``, ``test``),
its folder (``filepath``, e.g. ``val2014``), ``filename``, ``cocoid`` and its reference
``sentences`` (usually five, each with a ``raw`` string). The paper reports CLIP Recall on
the 5,000 ``test`` images.
"""

from __future__ import annotations

import json
from pathlib import Path

from vlrm.data import ImageFolder
from vlrm.errors import ConfigError

SPLITS = ("train", "restval", "val", "test")


class KarpathyCoco(ImageFolder):
    """The images of one Karpathy split, with their reference captions.

    Image ids are the image paths (as for ``ImageFolder``). Listed files that are missing
    or unreadable are skipped with a warning and counted, like any bad image.

    Args:
        annotations: Path of ``dataset_coco.json``.
        image_root: Folder holding the ``filepath`` folders (``train2014/``, ``val2014/``).
        split: ``test`` [paper: 5,000 images], ``val``, ``train`` or ``restval``.
        train_includes_restval: ``train`` also takes ``restval`` (the usual 113k training
            images) [ours: on, as in common practice].
    """

    def __init__(self, annotations: str, image_root: str, split: str = "test",
                 train_includes_restval: bool = True) -> None:
        if split not in SPLITS:
            raise ConfigError(f"KarpathyCoco split {split!r} is not one of {', '.join(SPLITS)}")
        ann = Path(annotations).expanduser()
        if not ann.is_file():
            raise ConfigError(f"KarpathyCoco annotations {str(ann)!r}: no such file (expected "
                              "Karpathy's dataset_coco.json)")
        try:
            entries = json.loads(ann.read_text())["images"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"KarpathyCoco annotations {str(ann)!r}: not a Karpathy split "
                              f"file ({type(exc).__name__}: {exc})") from exc
        self.root = Path(image_root).expanduser()
        if not self.root.is_dir():
            raise ConfigError(f"KarpathyCoco image_root {str(self.root)!r} does not exist or is "
                              "not a folder")
        wanted = {split} | ({"restval"} if split == "train" and train_includes_restval else set())
        self._references: dict[str, list[str]] = {}
        paths = []
        if not isinstance(entries, list):
            raise ConfigError(f"KarpathyCoco annotations {str(ann)!r}: \"images\" must be a list")
        for n, entry in enumerate(entries):
            try:
                if entry["split"] not in wanted:
                    continue
                path = self.root / entry.get("filepath", "") / entry["filename"]
                refs = [s["raw"].strip() for s in entry["sentences"]]
            except (KeyError, TypeError, AttributeError) as exc:
                what = f"lacks {exc}" if isinstance(exc, KeyError) else f"is malformed ({exc})"
                raise ConfigError(f"KarpathyCoco annotations {str(ann)!r}: image entry {n} {what}; "
                                  "each needs split, filename and sentences with raw strings") from exc
            paths.append(path)
            self._references[str(path)] = refs
        if not paths:
            raise ConfigError(f"KarpathyCoco annotations {str(ann)!r} list no {split!r} images")
        self.paths = paths
        self.split = split
        self.skipped: set[Path] = set()

    def references(self, image_id: str) -> list[str]:
        """The reference captions of an image."""
        return self._references[image_id]
