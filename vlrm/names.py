"""Registered names in configs, and blocked plugins' paths refused, for every vlrm command.

A component can be named in a config by the name its plugin registered it under
(``class_path: clip``, as ``vlrm-plugins`` lists it) or by its dotted path
(``class_path: vlrm_plugins.clip_reward.clip_reward``); the resolved config a run saves
always holds the dotted path. A name is looked up among the kind the setting takes (a
``policy:`` among policies, a reward term's ``reward:`` among rewards, ...), or among every
kind where the setting's type says nothing.

jsonargparse resolves a ``class_path`` without a dot by class name among the known
subclasses of the setting's type, which neither a protocol nor a builder function has;
``install`` puts the registry in front of that lookup (one function of jsonargparse, version
pinned in pyproject.toml; tests/test_names.py trains from a config of names, so a change
there fails the tests). It also puts the import paths of blocked plugins on jsonargparse's
import-path denylist, which is checked before anything is imported.
"""

from __future__ import annotations

from typing import Any

_KIND_OF_TYPE = {  # the protocol or base class a setting is typed with -> registry kind
    "Policy": "policies",
    "Reward": "rewards",
    "Objective": "objectives",
    "Evaluator": "evaluators",
    "ImageFolder": "datasets",
    "ImageSource": "datasets",
    "Logger": "loggers",
}
_installed: dict[str, Any] = {}


def kinds_of(typehint: Any) -> list[str] | None:
    """Registry kinds a setting of this type takes; None when the type does not say."""
    hints = typehint if isinstance(typehint, tuple) else (typehint,)
    kinds = []
    for hint in hints:
        for arg in (hint, *getattr(hint, "__args__", ())):  # Optional[X], Union[...]
            kind = _KIND_OF_TYPE.get(getattr(arg, "__name__", ""))
            if kind and kind not in kinds:
                kinds.append(kind)
    return kinds or None


def resolve_name(name: str, typehint: Any = None) -> str | None:
    """The dotted path registered as ``name`` for a setting of ``typehint``; None if no
    component of that kind is registered under the name."""
    from vlrm.plugins import get_registry

    component = get_registry().resolve(name, kinds_of(typehint))
    return component.path if component is not None else None


def unknown_name_hint(name: str) -> str:
    """The sentence an error adds when ``name`` is neither registered nor a dotted path."""
    from vlrm.plugins import get_registry

    registry = get_registry()
    blocked = [p.name for p in registry.blocked]
    hint = (f" {name!r} is neither a registered name nor a dotted path; registered names: "
            f"{', '.join(registry.names())} (`vlrm-plugins` lists them by kind).")
    if blocked:
        hint += f" Blocked plugins, whose names are not registered: {', '.join(blocked)}."
    return hint


def install() -> None:
    """Make jsonargparse resolve registered names and refuse blocked plugins' paths (for
    the registry as loaded now; idempotent; called by every vlrm command's parser)."""
    from jsonargparse import _typehints, set_parsing_settings

    from vlrm.plugins import get_registry

    if "resolve" not in _installed:
        original = _typehints.resolve_class_path_by_name

        def resolve_class_path_by_name(cls: Any, name: str) -> str:
            if isinstance(name, str) and name and "." not in name:
                path = resolve_name(name, cls)
                if path is not None:
                    return path
            return original(cls, name)

        _typehints.resolve_class_path_by_name = resolve_class_path_by_name
        _installed["resolve"] = original
    denied = set(get_registry().denied)
    before = _installed.get("denied", set())
    if denied != before:  # a registry loaded again with another selection
        set_parsing_settings(import_path_denylist=sorted(denied) or None,
                             import_path_allowlist=sorted(before - denied) or None)
        _installed["denied"] = denied
