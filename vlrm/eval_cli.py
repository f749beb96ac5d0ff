"""``vlrm-eval``: caption a dataset with one or more policies, evaluate, and report.

Writes to ``output_dir``: ``captions.jsonl`` (one line per policy and image),
``eval.json`` (per policy, flat metrics such as ``clip_recall/r1`` and ``caption/length``,
plus the data and generation settings used) and ``report.html`` (metrics side by side, a
gallery of images with each policy's caption, and training curves when ``run`` is given).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

from attrs import frozen

from vlrm.cli import EXIT_CONFIG, new_parser, parse_command
from vlrm.errors import ConfigError


@frozen
class Generation:
    """How captions are generated for evaluation [paper: the model card's settings].

    Args:
        max_new_tokens: Longest caption [paper: 60].
        num_beams: 1 = greedy [paper: greedy].
        batch_size: Images per generation call [ours: 16].
    """

    max_new_tokens: int = 60
    num_beams: int = 1
    batch_size: int = 16


def build_parser() -> Any:
    """The ``vlrm-eval`` parser."""
    from jsonargparse import ActionConfigFile

    from vlrm.data import ImageFolder
    from vlrm.protocols import Evaluator, Policy

    parser = new_parser("vlrm-eval", (
        "Caption a dataset with one or more policies (a run's output_dir or checkpoint, a "
        "transformers directory, or a hub name), run the evaluators, and write "
        "captions.jsonl, eval.json and report.html."))
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config file.")
    parser.add_argument("--data", type=ImageFolder, required=True,
                        help="Images to caption: an ImageFolder, or vlrm.coco.KarpathyCoco for "
                             "data with reference captions.")
    parser.add_argument("--policies", type=dict[str, Policy], required=True,
                        help="Policies keyed by the name shown in the report (e.g. baseline, tuned).")
    parser.add_argument("--evaluators", type=dict[str, Evaluator], required=True,
                        help="Evaluators keyed by the prefix of their metrics (e.g. clip_recall).")
    parser.add_class_arguments(Generation, "generation", help="Caption generation settings.")
    parser.add_argument("--num_images", type=Optional[int], default=None,
                        help="Evaluate only the first N images of the data (default: all).")
    parser.add_argument("--gallery_size", type=int, default=24,
                        help="Images shown in the report's gallery.")
    parser.add_argument("--run", type=Optional[str], default=None,
                        help="A training run's output_dir: its metrics.jsonl curves go in the report.")
    parser.add_argument("--output_dir", type=str, default="runs/eval",
                        help="Receives captions.jsonl, eval.json and report.html.")
    return parser


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def evaluate(init: Any, output_dir: Path) -> dict[str, Any]:
    """Caption, evaluate and write the three outputs; returns what eval.json holds."""
    from vlrm.evaluation import caption_images, run_evaluators
    from vlrm.report import GalleryItem, write_report

    data, gen = init.data, init.generation
    ids = data.ids()[:init.num_images] if init.num_images else data.ids()
    metrics_jsonl = None
    if init.run:
        metrics_jsonl = Path(init.run) / "metrics.jsonl"
        if not metrics_jsonl.is_file():
            raise ConfigError(f"run {init.run!r} has no metrics.jsonl")
    results: dict[str, dict[str, Any]] = {}
    sets = {}
    for name, policy in init.policies.items():
        captions = caption_images(policy, data, ids, gen.batch_size, desc=f"captioning ({name})",
                                  max_new_tokens=gen.max_new_tokens, num_beams=gen.num_beams)
        sets[name] = captions
        results[name] = run_evaluators(init.evaluators, captions)
    output_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"policy": name, "image_id": i, "caption": c, "num_tokens": n})
             for name, s in sets.items()
             for i, c, n in zip(s.image_ids, s.captions, s.num_tokens or [None] * len(s))]
    _write_atomic(output_dir / "captions.jsonl", "\n".join(lines) + "\n")
    record = {"policies": results,
              "num_images": {name: len(s) for name, s in sets.items()},
              "skipped_images": len(data.skipped),
              "data": {"class": type(data).__name__, "root": str(data.root),
                       "split": getattr(data, "split", None)},
              "generation": {"max_new_tokens": gen.max_new_tokens, "num_beams": gen.num_beams,
                             "greedy": gen.num_beams == 1}}
    _write_atomic(output_dir / "eval.json", json.dumps(record, indent=2) + "\n")
    first = next(iter(sets.values()))
    shown = [i for i in first.image_ids if all(i in s.image_ids for s in sets.values())]
    gallery = []
    for image_id in shown[:init.gallery_size]:
        image = data.load_image(image_id)
        if image is None:
            continue
        gallery.append(GalleryItem(
            image_id=image_id, image=image,
            captions={name: s.captions[list(s.image_ids).index(image_id)] for name, s in sets.items()},
            references=data.references(image_id)))
    write_report(output_dir / "report.html", results, gallery, metrics_jsonl=metrics_jsonl,
                 title=f"vlrm evaluation: {', '.join(sets)}")
    return record


def main(argv: list[str] | None = None) -> int:
    """Parse, build, evaluate. Returns the process exit status."""
    parsed = parse_command("vlrm-eval", build_parser, argv)
    if isinstance(parsed, int):
        return parsed
    parser, cfg, _ = parsed
    output_dir = Path(cfg.output_dir)
    try:
        init = parser.instantiate(cfg)
        record = evaluate(init, output_dir)
    except ConfigError as exc:
        sys.stderr.write(f"vlrm-eval: error: {exc}\n")
        return EXIT_CONFIG
    for name, metrics in record["policies"].items():
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                          if isinstance(v, float) and k.split("/")[-1] in ("r1", "length", "cider", "clip_s"))
        print(f"vlrm-eval: {name}: {shown}")
    print(f"vlrm-eval: wrote captions.jsonl, eval.json and report.html to {output_dir}")
    return 0


def main_entry() -> None:
    """Console script ``vlrm-eval``."""
    raise SystemExit(main())


if __name__ == "__main__":
    main_entry()
