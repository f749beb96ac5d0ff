"""The ``vlrm`` command: ``vlrm run | eval | export | plugins | serve-reward | <plugin command> ...``.

Each subcommand is the same function as its own console script (``vlrm run --config X`` is
``vlrm-run --config X``, argument for argument), so the scripts keep working. Plugins add
subcommands through the ``vlrm_register_commands`` hook (the shapes world adds ``vlrm
shapes``). ``--plugins`` / ``--block-plugins`` may come before the subcommand or among its
arguments. Bad arguments and bad configs exit 2 with one paragraph on stderr, as in every
subcommand.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

EXIT_CONFIG = 2


def _run(argv: list[str]) -> int:
    """Train: policy, reward terms, estimator, data and trainer from --config (vlrm-run)."""
    from vlrm.cli import run

    return run(argv)


def _eval(argv: list[str]) -> int:
    """Evaluate policies on held-out images: captions, metrics, report (vlrm-eval)."""
    from vlrm.eval_cli import main

    return main(argv)


def _export(argv: list[str]) -> int:
    """Export a run's policy: the authors' delta format or a merged folder (vlrm-export)."""
    from vlrm.export import main

    return main(argv)


def _plugins(argv: list[str]) -> int:
    """List plugins, component names and paths; a component's init arguments (vlrm-plugins)."""
    from vlrm.cli import plugins

    return plugins(argv)


def _serve_reward(argv: list[str]) -> int:
    """Serve a reward plugin over HTTP to remote trainers (vlrm-serve-reward)."""
    from vlrm.reward_server import main

    return main(argv)


BUILTIN: dict[str, Callable[[list[str]], int]] = {
    "run": _run, "eval": _eval, "export": _export, "plugins": _plugins,
    "serve-reward": _serve_reward}


def commands() -> dict[str, Callable[[list[str]], int]]:
    """Built-in subcommands, then those plugins register (a plugin cannot replace one)."""
    from vlrm.plugins import get_registry

    found = dict(BUILTIN)
    for name, component in get_registry().components.get("commands", {}).items():
        if name in BUILTIN:
            raise ValueError(f"plugin {component.plugin!r} ({component.distribution}) registers "
                             f"the command {name!r}, which is vlrm's own; rename it")
        found[name] = component.factory
    return found


def _usage(found: dict[str, Callable[[list[str]], int]]) -> str:
    width = max(map(len, found))
    lines = [f"  {name:<{width}}  {(fn.__doc__ or '').strip().splitlines()[0] if fn.__doc__ else ''}"
             for name, fn in found.items()]
    return ("usage: vlrm [--plugins A,B] [--block-plugins C] COMMAND [ARGS...]\n\n"
            "Fine-tune image captioners with RL against vision-language reward models.\n\n"
            "commands:\n" + "\n".join(lines) +
            "\n\n`vlrm COMMAND --help` shows a command's options.\n")


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``vlrm COMMAND ARGS...``; returns the command's exit status."""
    from vlrm.plugins import PluginError, take_plugin_flags

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        head = []  # --plugins / --block-plugins given before the command
        while argv and argv[0].split("=", 1)[0] in ("--plugins", "--block-plugins"):
            take = 1 if "=" in argv[0] else 2
            head, argv = head + argv[:take], argv[take:]
        take_plugin_flags(head)
        found = commands()
    except (PluginError, ValueError) as exc:
        sys.stderr.write(f"vlrm: error: {exc}\n")
        return EXIT_CONFIG
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(_usage(found))
        return 0 if argv else EXIT_CONFIG
    name, rest = argv[0], argv[1:]
    if name not in found:
        sys.stderr.write(f"vlrm: error: no command {name!r}; the commands are "
                         f"{', '.join(found)} (plugins add more; `vlrm --help` lists them).\n")
        return EXIT_CONFIG
    return found[name](rest)


def main_entry() -> None:
    """Console script ``vlrm``."""
    raise SystemExit(main())
