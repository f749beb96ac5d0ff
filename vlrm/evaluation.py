"""Evaluation inputs and the loop that runs evaluators.

An evaluator sees a ``CaptionSet``: one caption per image from one policy, the image ids,
optional reference captions, and a way to load each image (so that 5,000 COCO images need
not sit in memory). It returns flat metrics (numbers, and strings for the protocol it used,
e.g. the CLIP backbone); ``run_evaluators`` prefixes them with the evaluator's configured
name, giving keys such as ``clip_recall/r1`` and ``caption/length``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attrs import field, frozen

from vlrm.errors import ConfigError

if TYPE_CHECKING:
    from vlrm.protocols import Evaluator

Metric = float | int | str


@frozen
class CaptionSet:
    """One caption per image, from one policy.

    Attributes:
        image_ids: N stable image ids (the data source's ids, e.g. file paths).
        captions: N captions, ``captions[i]`` describing ``image_ids[i]``.
        load_image: Loads an image (PIL, RGB) by id.
        references: Per image, its reference captions (COCO has 5); None for data without.
        num_tokens: Per caption, its length in the policy's tokens, when known.
    """

    image_ids: Sequence[str]
    captions: Sequence[str]
    load_image: Callable[[str], Any] = field(repr=False)
    references: Sequence[Sequence[str]] | None = None
    num_tokens: Sequence[int] | None = None

    def __attrs_post_init__(self) -> None:
        n = len(self.image_ids)
        if len(self.captions) != n:
            raise ValueError(f"{len(self.captions)} captions for {n} images")
        if self.references is not None and len(self.references) != n:
            raise ValueError(f"{len(self.references)} reference lists for {n} images")
        if self.num_tokens is not None and len(self.num_tokens) != n:
            raise ValueError(f"{len(self.num_tokens)} token counts for {n} captions")

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_batches(self, batch_size: int) -> Iterator[tuple[list[str], list[Any]]]:
        """Yield ``(ids, images)`` in order, ``batch_size`` at a time."""
        for start in range(0, len(self.image_ids), batch_size):
            ids = list(self.image_ids[start:start + batch_size])
            yield ids, [self.load_image(i) for i in ids]

    def require_references(self, who: str) -> Sequence[Sequence[str]]:
        """The references, or a ConfigError naming the evaluator that needs them."""
        if self.references is None:
            raise ConfigError(f"evaluator {who} needs reference captions, and this data has "
                              "none: use a dataset with references (e.g. vlrm.coco.KarpathyCoco) "
                              "or drop the evaluator")
        return self.references


def run_evaluators(evaluators: Mapping[str, "Evaluator"], captions: CaptionSet) -> dict[str, Metric]:
    """Run every evaluator and merge their metrics as ``<name>/<key>``."""
    results: dict[str, Metric] = {}
    for name, evaluator in evaluators.items():
        for key, value in evaluator(captions).items():
            results[f"{name}/{key}"] = value
    return results


def caption_images(policy: Any, data: Any, image_ids: Sequence[str], batch_size: int = 16,
                   progress: bool = True, desc: str = "captioning", **generation: Any) -> CaptionSet:
    """Greedy captions of ``image_ids`` by ``policy`` (its ``caption`` method), in batches.

    Unreadable images are skipped (the data source warns and counts them) and left out of
    the result.

    Args:
        policy: Has ``caption(images, **generation) -> (captions, num_tokens)``.
        data: Has ``load_image(image_id)`` (None when unreadable) and ``references(image_id)``.
        image_ids: The images to caption.
        batch_size: Images per ``caption`` call.
        progress: Show a progress bar on stderr.
        desc: The progress bar's label.
        generation: Passed to ``policy.caption`` (e.g. ``max_new_tokens``).
    """
    from tqdm.auto import tqdm

    from vlrm.protocols import Captioner, explain

    problems = explain(policy, Captioner)
    if problems:
        raise ConfigError(f"{type(policy).__name__} cannot caption for evaluation: "
                          f"{'; '.join(problems)} (vlrm.protocols.Captioner)")
    kept: list[str] = []
    captions: list[str] = []
    counts: list[int] = []
    bar = tqdm(total=len(image_ids), desc=desc, file=sys.stderr, disable=not progress,
               dynamic_ncols=True, leave=False)
    for start in range(0, len(image_ids), batch_size):
        batch = [(i, data.load_image(i)) for i in image_ids[start:start + batch_size]]
        batch = [(i, image) for i, image in batch if image is not None]
        if batch:
            texts, lengths = policy.caption([image for _, image in batch], **generation)
            kept += [i for i, _ in batch]
            captions += texts
            counts += lengths
        bar.update(min(batch_size, len(image_ids) - start))
    bar.close()
    refs = [data.references(i) for i in kept]
    references = None if any(r is None for r in refs) else refs
    return CaptionSet(image_ids=kept, captions=captions, load_image=data.load_image,
                      references=references, num_tokens=counts)


def numeric(metrics: Mapping[str, Metric]) -> dict[str, float]:
    """The numeric entries of a metrics mapping (strings record protocol, not results)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


class PeriodicEval:
    """Evaluation during training, on a fixed held-out set of images.

    The trainer calls it before the first update (the baseline) and then every ``every``
    steps and at the end; each call writes ``<output_dir>/eval/step-<N>.json`` and its
    numeric metrics are logged to ``metrics.jsonl`` as ``eval/<name>/<key>``.

    Args:
        evaluators: Evaluators keyed by name (the metric prefix).
        data: Held-out images (an ``ImageFolder``, or ``KarpathyCoco`` for references).
        every: Evaluate every this many steps [ours: 100].
        num_images: The first this many images of ``data`` form the held-out set [ours: 64].
        max_new_tokens: Caption length limit [paper: 60, the model card's].
        batch_size: Images per captioning call.
    """

    def __init__(self, evaluators: dict[str, "Evaluator"], data: Any, every: int = 100,
                 num_images: int = 64, max_new_tokens: int = 60, batch_size: int = 16) -> None:
        if every < 1 or num_images < 1:
            raise ConfigError(f"eval.every and eval.num_images must be >= 1, got {every} and "
                              f"{num_images}")
        if not evaluators:
            raise ConfigError("eval.evaluators is empty: configure at least one evaluator")
        self.evaluators, self.data, self.every = dict(evaluators), data, every
        self.image_ids = data.ids()[:num_images]
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    def due(self, step: int, last: bool = False) -> bool:
        return step == 0 or last or step % self.every == 0

    def __call__(self, policy: Any, step: int, output_dir: str | Path) -> dict[str, Metric]:
        """Caption the held-out set, evaluate, write ``eval/step-<step>.json``; return metrics."""
        captions = caption_images(policy, self.data, self.image_ids, self.batch_size,
                                  progress=False, max_new_tokens=self.max_new_tokens)
        metrics = run_evaluators(self.evaluators, captions)
        folder = Path(output_dir) / "eval"
        folder.mkdir(parents=True, exist_ok=True)
        record = {"step": step, "num_images": len(captions), "metrics": metrics,
                  "samples": [{"image_id": i, "caption": c}
                              for i, c in list(zip(captions.image_ids, captions.captions))[:8]]}
        tmp = folder / f".step-{step}.json.partial"
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, folder / f"step-{step}.json")
        return metrics
