"""``vlrm-shapes``: build the shapes world, and run the demo that shows VLRM's effect on it.

``vlrm-shapes demo --config configs/shapes/vlrm_rs.yaml`` takes an ordinary ``vlrm-run``
config (policy, reward terms, data, trainer) plus a ``demo`` section, and:

1. evaluates the cross-entropy captioner (``baseline``), the same captioner forced into
   full-grammar captions (``ceiling``: what it could say if it said everything), and the true
   full captions (``oracle``), on the world's test images;
2. runs VLRM's RL training (the paper's A2C, or the config's ``objective``);
3. evaluates the tuned captioner (``final``);
4. writes ``summary.json`` (the four, each a flat dict), ``captions.jsonl``, ``report.html`` (images with the
   captions before and after, training curves) and prints a before/after table.

CLIP Recall is the judge's: a CLIP that shares no weights with the reward or the captioner.
``reward_clip/*`` is the reward CLIP's own recall, so a gap between the two shows reward
hacking.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from attrs import frozen

from vlrm.errors import ConfigError
from vlrm_shapes.world import COLOURS, SHAPES, SIZES, ShapesImages

SUMMARY_KEYS = ("clip_recall/r1", "clip_recall/r5", "clip_recall/mrr", "reward_clip/r1",
                "caption/length", "caption/colour_words", "caption/grammar_rate",
                "caption/attribute_accuracy", "caption/invented_objects",
                "caption/bad_phrase_rate", "caption/repetition_rate", "caption/repeats_beyond_scene")


@frozen
class DemoSettings:
    """What the demo evaluates, and on what.

    Args:
        test_images: Test images the judge ranks [issue: at least 1,000].
        weights: A built world's folder; default the build shipped with vlrm.
        world_seed: The world's seed (scenes of the test split).
        max_new_tokens: Caption length limit for evaluation.
        gallery_size: Images shown in the report.
        judge_every: Also judge the test images every this many RL steps (0 = only before
            and after RL); each judgement is a row of ``eval/...`` keys in ``metrics.jsonl``
            and ``eval/step-<N>.json``. Greedy captions draw no random numbers, so the
            training itself is unchanged.
    """

    test_images: int = 1000
    weights: str | None = None
    world_seed: int = 0
    max_new_tokens: int = 20
    gallery_size: int = 24
    judge_every: int = 0

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.judge_every, int) or self.judge_every < 0:
            raise ConfigError(f"demo.judge_every must be an integer >= 0, got {self.judge_every!r}")


def full_grammar(tokenizer: Any) -> Any:
    """A ``prefix_allowed_tokens_fn`` that admits only full-grammar captions.

    "a SIZE COLOUR SHAPE (and a SIZE COLOUR SHAPE)*" then the end token; which size, colour,
    shape and how many objects are left to the model.
    """
    def ids(words: Sequence[str]) -> list[int]:
        return tokenizer.convert_tokens_to_ids(list(words))

    article, conj, eos = ids(["a"]), ids(["and"]), [tokenizer.eos_token_id]
    sizes, colours, shapes = ids(list(SIZES)), ids(list(COLOURS)), ids(list(SHAPES))
    cycle = [article, sizes, colours, shapes]  # then "and" (back to the article) or the end

    def allowed(batch_id: int, generated: torch.Tensor) -> list[int]:
        n = len(generated)
        if n and generated[-1].item() == eos[0]:
            return eos  # finished: pad with the end token
        position = n % 5
        if position == 4:
            return conj + eos
        return cycle[position]

    return allowed


def _evaluate(policy: Any, images: ShapesImages, ids: list[str], evaluators: dict[str, Any],
              settings: DemoSettings, desc: str, allowed: Any = None) -> tuple[dict[str, Any], Any]:
    from vlrm.evaluation import caption_images, run_evaluators

    generation = {"max_new_tokens": settings.max_new_tokens}
    if allowed is not None:
        generation["allowed_tokens"] = allowed
    captions = caption_images(policy, images, ids, batch_size=100, desc=desc, **generation)
    return run_evaluators(evaluators, captions), captions


def run_demo(policy: Any, reward: Any, data: Any, trainer_config: Any, output_dir: Path,
             settings: DemoSettings, objective: Any = None) -> dict[str, Any]:
    """Baseline, ceiling, oracle, RL, final; writes summary.json and report.html."""
    from vlrm.evaluation import CaptionSet, run_evaluators
    from vlrm.report import GalleryItem, write_report
    from vlrm.trainer import Trainer
    from vlrm_shapes.world import ShapesCaptionStats, shapes_clip_recall

    output_dir.mkdir(parents=True, exist_ok=True)
    test = ShapesImages("test", seed=settings.world_seed, num_images=settings.test_images)
    ids = test.ids()
    evaluators = {"clip_recall": shapes_clip_recall(settings.weights, "judge"),
                  "reward_clip": shapes_clip_recall(settings.weights, "reward"),
                  "caption": ShapesCaptionStats(settings.world_seed)}
    summary: dict[str, Any] = {}
    captions: dict[str, Any] = {}
    summary["baseline"], captions["baseline"] = _evaluate(policy, test, ids, evaluators, settings,
                                                          "baseline")
    summary["ceiling"], captions["ceiling"] = _evaluate(
        policy, test, ids, evaluators, settings, "ceiling", full_grammar(policy.tokenizer))
    oracle = CaptionSet(image_ids=ids, captions=[test.references(i)[0] for i in ids],
                        load_image=test.load_image)
    summary["oracle"] = run_evaluators(evaluators, oracle)
    captions["oracle"] = oracle
    during = None
    if settings.judge_every:
        from vlrm.evaluation import PeriodicEval

        during = PeriodicEval({"clip_recall": evaluators["clip_recall"], "caption": evaluators["caption"]},
                              test, every=settings.judge_every, num_images=len(ids),
                              max_new_tokens=settings.max_new_tokens, batch_size=100)
    trainer = Trainer(policy, reward, data, trainer_config, output_dir, objective=objective,
                      evaluation=during)
    trainer.train()
    summary["final"], captions["final"] = _evaluate(policy, test, ids, evaluators, settings, "final")
    summary = {name: {k: v for k, v in m.items() if not isinstance(v, str)}
               for name, m in summary.items()}
    tmp = output_dir / ".summary.json.partial"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, output_dir / "summary.json")
    lines = [json.dumps({"image_id": i, "reference": captions["oracle"].captions[k],
                         **{name: captions[name].captions[k] for name in ("baseline", "final", "ceiling")}})
             for k, i in enumerate(ids)]
    (output_dir / "captions.jsonl").write_text("\n".join(lines) + "\n")
    gallery = [GalleryItem(image_id=i, image=test.load_image(i),
                           captions={name: captions[name].captions[k]
                                     for name in ("baseline", "final", "ceiling")},
                           references=test.references(i))
               for k, i in enumerate(ids[:settings.gallery_size])]
    write_report(output_dir / "report.html", summary, gallery,
                 metrics_jsonl=output_dir / "metrics.jsonl", title="vlrm shapes world: before and after RL")
    return summary


def format_table(summary: dict[str, dict[str, Any]], keys: Sequence[str] = SUMMARY_KEYS) -> str:
    """The before/after table printed at the end of the demo."""
    columns = [c for c in ("baseline", "final", "ceiling", "oracle") if c in summary]
    lines = [f"{'metric':<28}" + "".join(f"{c:>10}" for c in columns)]
    for key in keys:
        cells = [summary[c].get(key) for c in columns]
        lines.append(f"{key:<28}" + "".join(f"{v:>10.3f}" if isinstance(v, (int, float)) else f"{'-':>10}"
                                            for v in cells))
    return "\n".join(lines)


def _demo_parser() -> Any:
    from vlrm.cli import build_parser

    parser = build_parser()
    parser.prog = "vlrm-shapes demo"
    parser.add_class_arguments(DemoSettings, "demo", help="What the demo evaluates.")
    parser.add_argument("--seed", type=int | None, default=None,
                        help="RL seed (sampling and data order); overrides trainer.seed.")
    return parser


def demo_main(argv: list[str]) -> int:
    from attrs import evolve

    from vlrm.cli import EXIT_CONFIG, config_files

    parser = _demo_parser()
    parser.config_files = config_files(argv)
    cfg = parser.parse_args(argv)
    try:
        init = parser.instantiate(cfg)
        trainer_config = init.trainer if cfg.seed is None else evolve(init.trainer, seed=cfg.seed)
        output_dir = Path(cfg.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(parser.dump(cfg))
        summary = run_demo(init.policy, init.reward, init.data, trainer_config, output_dir,
                           init.demo, objective=init.objective)
    except ConfigError as exc:
        sys.stderr.write(f"vlrm-shapes: error: {exc}\n")
        return EXIT_CONFIG
    print(format_table(summary))
    print(f"vlrm-shapes: wrote summary.json and report.html to {output_dir}")
    return 0


# Each ablation is a list of command-line overrides of the demo config.
ABLATIONS: dict[str, list[str]] = {
    "no_bad": ["--reward.terms.bad.weight=0"],
    "no_repeat": ["--reward.terms.repeat.weight=0"],
    "no_ref": ["--reward.terms.ref.weight=0"],
    "opt_unfrozen": ["--policy.init_args.trainable=[qformer,query_tokens,language_projection,"
                     "language_model]"],
}
SWEEP_KEYS = ("clip_recall/r1", "reward_clip/r1", "caption/colour_words", "caption/length",
              "caption/grammar_rate", "caption/attribute_accuracy", "caption/invented_objects",
              "caption/bad_phrase_rate", "caption/repetition_rate", "caption/repeats_beyond_scene")


def sweep_variants(seeds: Sequence[int], ablations: Sequence[str]) -> dict[str, list[str]]:
    """Run name -> overrides: one run per seed, then each ablation at the first seed."""
    unknown = [a for a in ablations if a not in ABLATIONS]
    if unknown:
        raise ConfigError(f"unknown ablation(s) {unknown}; known: {', '.join(ABLATIONS)}")
    runs = {f"seed{s}": [f"--seed={s}"] for s in seeds}
    runs.update({a: [f"--seed={seeds[0]}", *ABLATIONS[a]] for a in ablations})
    return runs


def sweep_table(results: dict[str, dict[str, Any]], keys: Sequence[str] = SWEEP_KEYS) -> str:
    """A markdown table of each run's final metrics, with the seeds' mean and spread.

    Args:
        results: Run name -> that run's summary.json (baseline, final, ceiling, oracle).
    """
    import statistics

    header = "| run | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys) + "\n"
    rows = [f"| {name} | " + " | ".join(f"{r['final'][k]:.3f}" for k in keys) + " |"
            for name, r in results.items()]
    seeds = [r for name, r in results.items() if name.startswith("seed")]
    if len(seeds) > 1:
        cells = [f"{statistics.mean(r['final'][k] for r in seeds):.3f} ± "
                 f"{statistics.stdev(r['final'][k] for r in seeds):.3f}" for k in keys]
        rows.append(f"| seeds: mean ± sd | " + " | ".join(cells) + " |")
    first = next(iter(results.values()))
    for ref in ("baseline", "ceiling"):
        rows.append(f"| ({ref}) | " + " | ".join(f"{first[ref][k]:.3f}" for k in keys) + " |")
    return header + "\n".join(rows) + "\n"


def sweep_main(argv: list[str]) -> int:
    """``vlrm-shapes sweep --config C [--seeds 0 1 2] [--ablations ...] --output_dir D [overrides]``,
    or with ``--objectives a2c grpo ...``: every estimator x seed (``vlrm_shapes.sweep``)."""
    from vlrm.cli import EXIT_CONFIG, plain_parser

    parser = plain_parser("vlrm-shapes sweep", (
        "Run the demo once per seed and once per ablation; write sweep.json and sweep.md. "
        "With --objectives: once per estimator and seed, side by side (estimators.md)."))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ablations", nargs="*", default=list(ABLATIONS),
                        help=f"from: {', '.join(ABLATIONS)}")
    parser.add_argument("--objectives", nargs="*", default=None,
                        help="estimators: names in configs/shapes/objectives (a2c, rloo, grpo, "
                             "dr_grpo, scst, ppo_clip) or fragment files; no ablations then")
    parser.add_argument("--rewards", nargs="*", default=None,
                        help="reward settings: names in configs/shapes/rewards (clip, itm, "
                             "vlm_judge, qa, clip_qa) or fragment files; no ablations then")
    parser.add_argument("--jobs", type=int, default=1,
                        help="with --objectives: runs at once (the CPU threads split between them)")
    parser.add_argument("--doc", default=None,
                        help="with --objectives: also write the tables into this markdown file "
                             "(between its sweep markers, or as a new file)")
    parser.add_argument("--doc_section", default="",
                        help="with --doc: which marked block of the file to replace "
                             "(<!-- sweep:NAME:begin -->); default the unnamed one")
    parser.add_argument("--timing", default=None,
                        help="with --objectives: the sweep.json of a timing sweep (one run at a "
                             "time) to take seconds per step and memory from")
    parser.add_argument("--output_dir", default="runs/shapes_sweep")
    args, demo_args = parser.parse_known_args(argv)
    if args.objectives or args.rewards:
        return _objective_sweep(args, demo_args)
    try:
        runs = sweep_variants(args.seeds, args.ablations)
    except ConfigError as exc:
        sys.stderr.write(f"vlrm-shapes: error: {exc}\n")
        return EXIT_CONFIG
    out = Path(args.output_dir)
    results: dict[str, dict[str, Any]] = {}
    for name, overrides in runs.items():
        sys.stderr.write(f"vlrm-shapes sweep: run {name} ({' '.join(overrides)})\n")
        code = demo_main([*demo_args, *overrides, f"--output_dir={out / name}"])
        if code != 0:
            return code
        results[name] = json.loads((out / name / "summary.json").read_text())
        (out / "sweep.json").write_text(json.dumps(results, indent=2) + "\n")
        (out / "sweep.md").write_text(sweep_table(results))
    print(sweep_table(results))
    return 0


def _objective_sweep(args: Any, demo_args: list[str]) -> int:
    from vlrm.cli import EXIT_CONFIG
    from vlrm_shapes.sweep import (estimator_table, late_table, reward_table, sweep_objectives,
                                    write_doc)

    out = Path(args.output_dir)
    kind, names = ("rewards", args.rewards) if args.rewards else ("objectives", args.objectives)
    try:
        results = sweep_objectives(names, args.seeds, demo_args, out, args.jobs, kind)
    except ConfigError as exc:
        sys.stderr.write(f"vlrm-shapes: error: {exc}\n")
        return EXIT_CONFIG
    timing = None
    if args.timing:
        timed = json.loads(Path(args.timing).read_text())
        timing = {name: {"s_per_step": sum(r["s_per_step"] for r in runs.values()) / len(runs),
                         "peak_mib": max(r["peak_mib"] for r in runs.values())}
                  for name, runs in timed.items()}
    table = reward_table(results) if kind == "rewards" else estimator_table(results, timing)
    late = late_table(results)  # runs with --demo.judge_every
    table += f"\n{late}" if late else ""
    (out / "sweep.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "sweep.md").write_text(table)
    if args.doc:
        command = " ".join(["vlrm-shapes sweep", f"--{kind}", *names, "--seeds",
                            *map(str, args.seeds), *(["--timing", args.timing] if args.timing else []),
                            *demo_args])
        write_doc(Path(args.doc), table, command, args.doc_section,
                  "Rewards side by side in the shapes world" if kind == "rewards"
                  else "Estimators side by side in the shapes world")
    print(table)
    return 0


def build_main(argv: list[str], command: str = "build") -> int:
    from jsonargparse import ActionConfigFile

    from vlrm.cli import EXIT_CONFIG, config_files, new_parser
    from vlrm_shapes.build import build_world, continue_captioner
    from vlrm_shapes.itm import build_itm
    from vlrm_shapes.judge_vlm import build_vlm_judge
    from vlrm_shapes.llava import build_llava

    function, about = {
        "build": (build_world, "Train the shapes world's models from scratch."),
        "continue": (continue_captioner, "More cross-entropy rounds for a built captioner."),
        "itm": (build_itm, "Train the ITM reward model of a built world."),
        "llava": (build_llava, "Train the LLaVA-style captioner of a built world."),
        "vlm_judge": (build_vlm_judge, "Train the VLM judge reward model of a built world."),
    }[command]
    parser = new_parser(f"vlrm-shapes {command}", about)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config file.")
    parser.add_function_arguments(function)
    parser.config_files = config_files(argv)
    cfg = parser.parse_args(argv)
    try:
        args = cfg.as_dict()
        args.pop("config", None)
        record = function(**args)
    except ConfigError as exc:
        sys.stderr.write(f"vlrm-shapes: error: {exc}\n")
        return EXIT_CONFIG
    print(json.dumps(record, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"build": build_main, "demo": demo_main, "sweep": sweep_main,
                "continue": lambda args: build_main(args, "continue"),
                "itm": lambda args: build_main(args, "itm"),
                "llava": lambda args: build_main(args, "llava"),
                "vlm_judge": lambda args: build_main(args, "vlm_judge")}
    if not argv or argv[0] not in commands:
        sys.stderr.write("usage: vlrm-shapes {build,continue,itm,llava,vlm_judge,demo,sweep} --config FILE [overrides]\n"
                         "  build  train the world's models from scratch (configs/shapes/build.yaml)\n"
                         "  continue  more cross-entropy rounds for a built captioner\n"
                         "  itm    train the ITM reward model of a built world\n"
                         "  llava  train the LLaVA-style captioner of a built world\n"
                         "  vlm_judge  train the VLM judge reward model of a built world\n"
                         "  demo   baseline -> VLRM RL -> final, with summary.json and report.html\n"
                         "         (configs/shapes/vlrm_rs.yaml)\n"
                         "  sweep  the demo for several seeds and each ablation: sweep.md\n")
        return 2
    return commands[argv[0]](argv[1:])


def main_entry() -> None:
    """Console script ``vlrm-shapes``."""
    raise SystemExit(main())


if __name__ == "__main__":
    main_entry()
