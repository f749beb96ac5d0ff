"""Command-line entry points: ``vlrm-run`` (train) and ``vlrm-plugins`` (list plugins)."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, Optional

from vlrm.errors import ConfigError

EXIT_CONFIG = 2


def _short_error(message: str, limit: int = 6) -> str:
    """jsonargparse explains nested failures at length; keep the first lines that matter."""
    lines = [ln.rstrip() for ln in str(message).splitlines() if ln.strip()]
    kept = lines[:limit]
    if len(lines) > limit:
        kept.append("  ...")
    return "\n".join(kept)


def _protocol_reasons(message: str) -> str:
    """Why a class does not fit the protocol jsonargparse refused it for (it gives none)."""
    import importlib
    import inspect
    import re

    from vlrm import protocols

    found = re.search(r"Import path (\S+) does not implement protocol (\w+)", message)
    protocol = getattr(protocols, found.group(2), None) if found else None
    if protocol is None:
        return ""
    module, _, name = found.group(1).rpartition(".")
    try:
        target = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return ""
    if inspect.isfunction(target):
        return (f" {found.group(1)} is a function: a builder must annotate its return type with "
                f"the class it builds (e.g. `-> MyPolicy`) so that it can be checked against "
                f"vlrm.protocols.{protocol.__name__}.")
    problems = protocols.explain(target, protocol)
    return f" It does not fit vlrm.protocols.{protocol.__name__}: {'; '.join(problems)}." if problems else ""


def _moved_keys(message: str) -> str:
    """Where a trainer setting that moved to the objective lives now."""
    from vlrm.trainer import MOVED_TO_OBJECTIVE

    moved = [k for k in MOVED_TO_OBJECTIVE if f"trainer.{k}" in message]
    if not moved:
        return ""
    return (f" trainer.{moved[0]} is now a setting of the objective (the estimator): set "
            f"objective.init_args.{moved[0]} with objective.class_path vlrm.objective.A2C "
            "(A2C's value-head settings), see configs/vlrm.yaml.")


def _name_reasons(message: str) -> str:
    """Why a class_path did not resolve: an unknown name, or a blocked plugin's path."""
    import re

    from vlrm.plugins import PluginError, get_registry

    try:
        registry = get_registry()
    except PluginError:
        return ""
    found = re.search(r"Expected a dot import path string: (\w+)", message)
    if found:
        from vlrm.names import unknown_name_hint

        return unknown_name_hint(found.group(1))
    found = re.search(r"Importing '([\w.]+)' is not allowed, denied by the '([\w.]+)' entry", message)
    if found:
        owners = [p for p in registry.blocked if p.module == found.group(2)
                  or p.module.startswith(found.group(2) + ".")]
        why = "; ".join(f"plugin {p.name!r} ({p.distribution}) is left out by {p.blocked}"
                        for p in owners) or f"{found.group(2)} is on the import-path denylist"
        return f" {found.group(1)} belongs to a blocked plugin: {why}."
    return ""


def config_files(argv: list[str]) -> list[str]:
    """The files given with --config, to name them in error messages."""
    files = [b for a, b in zip(argv, argv[1:]) if a == "--config"]
    return files + [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]


def plain_parser(prog: str, description: str | None = None) -> argparse.ArgumentParser:
    """An ``argparse`` parser (for the commands without a config) that fails as the config
    commands do: one paragraph on stderr, exit 2."""

    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> NoReturn:
            sys.stderr.write(f"{self.prog}: error: {message}\n"
                             f"Run `{self.prog} --help` for the options.\n")
            raise SystemExit(EXIT_CONFIG)

    return Parser(prog=prog, description=description)


def new_parser(prog: str, description: str) -> Any:
    """A jsonargparse parser whose errors are one short paragraph (exit 2), naming the
    config files given with --config (set ``parser.config_files``)."""
    from jsonargparse import ArgumentParser

    files: list[str] = []  # shared with the nested parsers jsonargparse makes for subgroups

    class Parser(ArgumentParser):
        @property
        def config_files(self) -> list[str]:
            return files

        @config_files.setter
        def config_files(self, value: list[str]) -> None:
            files[:] = value

        def error(self, message: str, ex: Exception | None = None) -> None:  # type: ignore[override]
            where = f" (config file: {', '.join(files)})" if files else ""
            reasons = (_protocol_reasons(str(message)) + _moved_keys(str(message))
                       + _name_reasons(str(message)))
            sys.stderr.write(f"{prog}: error: {_short_error(message)}{where}{reasons}\n"
                             f"Run `{prog} --help` for the options, or "
                             f"`{prog} --config FILE --print_config` to see a resolved config.\n")
            raise SystemExit(EXIT_CONFIG)

    from vlrm.names import install

    install()  # registered names resolve; blocked plugins' paths are refused
    return Parser(prog=prog, description=description)


def parse_command(prog: str, build: Callable[[], Any], argv: list[str] | None,
                  ) -> tuple[Any, Any, list[str]] | int:
    """The start of every config command: ``--plugins`` / ``--block-plugins`` taken, the
    plugins loaded (a broken or clashing one: exit status 2, returned), then ``build()``'s
    parser parses ``argv`` (a bad config exits 2 from inside). Returns the parser, the parsed
    config and the config files given."""
    from vlrm.plugins import PluginError, get_registry, take_plugin_flags

    try:
        argv = take_plugin_flags(sys.argv[1:] if argv is None else list(argv))
        get_registry()  # report broken or clashing plugins before anything is built
    except PluginError as exc:
        sys.stderr.write(f"{prog}: error: {exc}\n")
        return EXIT_CONFIG
    parser = build()
    files = config_files(argv)
    parser.config_files = files
    return parser, parser.parse_args(argv), files


def build_parser() -> Any:
    """The ``vlrm-run`` parser: policy, reward terms, data, trainer settings, output folder."""
    from jsonargparse import ActionConfigFile

    from vlrm.evaluation import PeriodicEval
    from jsonargparse import lazy_instance

    from vlrm.objective import A2C
    from vlrm.protocols import ImageSource, Logger, Objective, Policy
    from vlrm.rewards import CompositeReward
    from vlrm.trainer import TrainerConfig

    parser = new_parser("vlrm-run", (
        "Fine-tune an image captioner with reinforcement learning (the paper's A2C, or "
        "GRPO, RLOO, ...) against vision-language reward models (VLRM). Options can come from a YAML file (--config) and be overridden after it "
        "on the command line with dotted names, e.g. --trainer.max_steps 3."))
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config file.")
    # Data first: a wrong folder is reported before any model is loaded.
    parser.add_argument("--data", type=ImageSource, required=True,
                        help="Unlabelled training images: class_path and init_args (an image "
                             "folder, a Hugging Face dataset, WebDataset shards, ...).")
    parser.add_argument("--policy", type=Policy, required=True,
                        help="Captioning policy: class_path (a class or builder) and init_args.")
    parser.add_class_arguments(CompositeReward, "reward", help="Weighted reward terms by name.")
    parser.add_argument("--objective", type=Objective, default=lazy_instance(A2C),
                        help="The estimator and its loss: class_path and init_args "
                             "(default the paper's A2C; `vlrm-plugins` lists the registered "
                             "ones: a2c, rloo, grpo, dr_grpo, scst, ppo_clip).")
    parser.add_class_arguments(TrainerConfig, "trainer", help="Training loop settings.")
    parser.add_argument("--eval", type=Optional[PeriodicEval], default=None,
                        help="Evaluation on held-out images before training and every N "
                             "steps (vlrm.evaluation.PeriodicEval); default none.")
    parser.add_argument("--loggers", type=Optional[dict[str, Logger]], default=None,
                        help="Experiment trackers by name, each a class_path and init_args "
                             "(`vlrm-plugins` lists them: tensorboard, ...); scalars every step, "
                             "a sample table every trainer.samples_every steps.")
    parser.add_argument("--output_dir", type=str, default="runs/vlrm",
                        help="Receives config.yaml, metrics.jsonl and checkpoints/.")
    parser.add_argument("--resume", type=bool, default=False,
                        help="Continue the run in output_dir from checkpoints/last (weights, "
                             "optimiser, random states, data order); starts at step 0 when "
                             "there is no checkpoint yet, so a requeued job can always pass it.")
    return parser


def run(argv: list[str] | None = None) -> int:
    """Parse, build, train. Returns the process exit status: 0 done, 1 the run stopped
    (out of memory, non-finite updates; the message says what to change), 2 a bad config.

    Under ``torchrun`` every process runs this; each trains on its share of every step and
    rank 0 alone writes the outputs.
    """
    parsed = parse_command("vlrm-run", build_parser, argv)
    if isinstance(parsed, int):
        return parsed
    parser, cfg, files = parsed
    output_dir = Path(cfg.output_dir)
    from vlrm.distributed import from_environment, shutdown, use_local_device

    use_local_device()  # under torchrun, `device: cuda` is this rank's GPU
    try:
        init = parser.instantiate(cfg)
    except Exception as exc:  # building the configured objects: whatever fails is the config's
        return config_failure(exc, files)
    from vlrm.errors import TrainingError
    from vlrm.trainer import Trainer

    world, ok = None, False
    try:
        world = from_environment()
        import yaml

        trainer = Trainer(init.policy, init.reward, init.data, init.trainer, output_dir,
                          evaluation=init.get("eval"), world=world, objective=init.objective,
                          loggers=init.get("loggers"), run_config=yaml.safe_load(parser.dump(cfg)))
        if cfg.resume:
            _resume(trainer, world, output_dir)
        if world.is_main:
            output_dir.mkdir(parents=True, exist_ok=True)
            (output_dir / "config.yaml").write_text(parser.dump(cfg))
        trainer.train()
        ok = True
    except ConfigError as exc:
        _error(f"vlrm-run: error: {exc}")
        return EXIT_CONFIG
    except TrainingError as exc:
        _error(f"vlrm-run: stopped: {exc}")
        return 1
    finally:
        if world is not None:
            shutdown(world, ok)
    _say(world, f"vlrm-run: {trainer.step} steps done; outputs in {output_dir}, "
                f"newest checkpoint {output_dir / 'checkpoints' / 'last'}")
    return 0


def _resume(trainer: Any, world: Any, output_dir: Path) -> None:
    """--resume: continue from checkpoints/last, or start at step 0 when there is none.
    Rank 0's view decides; a rank that cannot see that checkpoint is an error."""
    from vlrm.checkpoint import clean_leftovers

    last = output_dir / "checkpoints" / "last"
    if world.is_main and last.parent.is_dir():
        clean_leftovers(last.parent)  # e.g. puts back a step whose re-save was killed
    if last.is_symlink() and not last.exists():
        raise ConfigError(f"{str(last)!r} points at {str(last.readlink())!r}, which is missing: "
                          f"resume from one of the checkpoints/step-<N> folders with "
                          "--resume true after pointing `last` at it, or start a new output_dir")
    found = world.all_gather_object(last.exists())
    if found[0] and not all(found):
        raise ConfigError(f"{str(last)!r} exists on rank 0 but not on ranks "
                          f"{[r for r, f in enumerate(found) if not f]}: put output_dir on a "
                          "filesystem every process sees")
    if found[0]:
        step = trainer.resume()
        _say(world, f"vlrm-run: resuming after step {step} from {last}")
    else:
        trainer.truncate_log = True  # rows a killed run wrote before its first checkpoint
        _say(world, f"vlrm-run: --resume: no checkpoint in {output_dir / 'checkpoints'} yet; "
                    "starting at step 0")


def _error(message: str) -> None:
    """An error message, from rank 0 only under torchrun (every rank hits the same one)."""
    from vlrm.distributed import is_main_process

    if is_main_process():
        sys.stderr.write(message + "\n")


def _say(world: Any, message: str) -> None:
    if world is None or world.is_main:
        print(message)


def config_failure(exc: Exception, files: list[str], prog: str = "vlrm-run") -> int:
    """Exit status 2 and one paragraph for a config whose objects cannot be built; the
    traceback only with VLRM_DEBUG=1."""
    import os
    import traceback

    from vlrm.distributed import is_main_process

    if not is_main_process():
        return EXIT_CONFIG
    where = f" (config file: {', '.join(files)})" if files else ""
    if isinstance(exc, ConfigError):
        message = str(exc)
    else:
        message = (f"the config could not be built: {type(exc).__name__}: "
                   f"{_short_error(str(exc) or repr(exc), 4)}")
    sys.stderr.write(f"{prog}: error: {message}{where}\n")
    if os.environ.get("VLRM_DEBUG"):
        traceback.print_exception(exc)
    else:
        sys.stderr.write("Set VLRM_DEBUG=1 to see the traceback.\n")
    return EXIT_CONFIG


def run_main() -> None:
    """Console script ``vlrm-run``."""
    raise SystemExit(run())


def plugins(argv: list[str] | None = None) -> int:
    """List the loaded plugins, the components they register (the name a config can use
    as class_path, its dotted path) and the plugins left out; with component names, each
    one's init arguments."""
    from vlrm.plugins import KINDS, PluginError, get_registry, init_arguments, take_plugin_flags

    parser = plain_parser("vlrm-plugins", plugins.__doc__)
    parser.add_argument("names", nargs="*", help="Components to show with their init arguments.")
    parser.add_argument("--json", action="store_true", help="Print JSON instead of a table.")
    parser.add_argument("--plugins", help="Load only these plugins (comma-separated; VLRM_PLUGINS).")
    parser.add_argument("--block-plugins", help="Load all but these (VLRM_BLOCK_PLUGINS).")
    with warnings.catch_warnings(record=True):  # failures are shown in the listing itself
        warnings.simplefilter("always")
        try:
            args = parser.parse_args(take_plugin_flags(sys.argv[1:] if argv is None else list(argv)))
            registry = get_registry()
        except PluginError as exc:
            sys.stderr.write(f"vlrm-plugins: error: {exc}\n")
            return EXIT_CONFIG
    if args.names:
        shown = []
        for name in args.names:
            found = [registry.components[kind][name] for kind in KINDS
                     if name in registry.components[kind]]
            if not found:
                from vlrm.names import unknown_name_hint

                sys.stderr.write(f"vlrm-plugins: error:{unknown_name_hint(name)}\n")
                return EXIT_CONFIG
            shown += [{"kind": c.kind, "name": c.name, "class_path": c.path, "plugin": c.plugin,
                       "distribution": c.distribution, "init_args": init_arguments(c.factory)}
                      for c in found]
        if args.json:
            print(json.dumps(shown, indent=2))
            return 0
        for c in shown:
            print(f"{c['name']}  ({c['kind'][:-1]}, plugin {c['plugin']}, {c['distribution']})")
            print(f"    class_path: {c['name']}    # or {c['class_path']}")
            print("    init_args:" + ("" if c["init_args"] else " none"))
            for arg, note in c["init_args"].items():
                print(f"      {arg}: {note}")
        return 0
    rows = registry.to_json()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        print(f"{row['name']}  ({row['distribution']} {row['version']})  {row['target']}")
        if "blocked" in row:
            print(f"    BLOCKED by {row['blocked']}")
        if "error" in row:
            print(f"    FAILED TO LOAD: {row['error']}")
        for kind, names in row["components"].items():
            paths = row["paths"][kind]
            print(f"    {kind}: " + ", ".join(f"{n} ({paths[n]})" for n in names))
    print("\nUse a name as `class_path: NAME` in a config, or the dotted path in brackets; "
          "`vlrm-plugins NAME` shows its init arguments.")
    return 0


def plugins_main() -> None:
    """Console script ``vlrm-plugins``."""
    raise SystemExit(plugins())


if __name__ == "__main__":
    run_main()
