"""Hook specifications: the plugin author's manual.

A plugin is a module (or object) listed under the ``vlrm`` entry-point group of its
distribution, for example in its ``pyproject.toml``::

    [project.entry-points.vlrm]
    my_rewards = "my_package.vlrm_plugin"

and implementing any of the hooks below with ``@vlrm.hookimpl``. vlrm's own policies and
rewards are registered exactly this way. Each registration hook returns a mapping from a
component name to the class or builder function that makes the component; configs refer to
it by its registered name (``class_path: my_reward``) or its dotted path
(``class_path: my_package.rewards.MyReward``); see ``vlrm.names``. Component names are
unique per kind across all installed plugins: a clash is an error naming both plugins.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("vlrm")
hookimpl = pluggy.HookimplMarker("vlrm")


@hookspec
def vlrm_register_policies() -> dict[str, Callable[..., Any]]:
    """Register captioning policies.

    Returns:
        ``{name: factory}``; the factory is a class or builder function whose result
        satisfies ``vlrm.protocols.Policy``.
    """


@hookspec
def vlrm_register_rewards() -> dict[str, Callable[..., Any]]:
    """Register reward models.

    Returns:
        ``{name: factory}``; the factory's result satisfies ``vlrm.protocols.Reward`` and
        should pass ``vlrm.testing.check_reward``.
    """


@hookspec
def vlrm_register_evaluators() -> dict[str, Callable[..., Any]]:
    """Register evaluators.

    Returns:
        ``{name: factory}``; the factory's result satisfies ``vlrm.protocols.Evaluator``.
    """


@hookspec
def vlrm_register_datasets() -> dict[str, Callable[..., Any]]:
    """Register image sources for training and evaluation.

    Returns:
        ``{name: factory}``; the factory's result is a ``vlrm.data.ImageFolder`` or any
        object with the same ``batches`` method.
    """


@hookspec
def vlrm_register_objectives() -> dict[str, Callable[..., Any]]:
    """Register objectives: advantage estimators and their losses (A2C, GRPO, ...).

    Returns:
        ``{name: factory}``; the factory's result satisfies ``vlrm.protocols.Objective``
        (``vlrm.objective.Estimator`` is a base class to start from).
    """


@hookspec
def vlrm_register_loggers() -> dict[str, Callable[..., Any]]:
    """Register experiment trackers, chosen under ``loggers:`` in a config.

    Returns:
        ``{name: factory}``; the factory's result satisfies ``vlrm.protocols.Logger``.
    """


@hookspec
def vlrm_register_commands() -> dict[str, Callable[..., Any]]:
    """Register subcommands of the ``vlrm`` command (``vlrm NAME args...``).

    Returns:
        ``{name: main}``; ``main(argv: list[str]) -> int`` parses the arguments after the
        name and returns the exit status (2 for a bad config or bad arguments, with one
        paragraph on stderr). Its docstring's first line is the command's help line.
        Import heavy modules inside ``main``: the hook runs for every vlrm command.
    """
