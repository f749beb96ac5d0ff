"""Finding and loading plugins through the ``vlrm`` entry-point group.

Built-in plugins ship in the ``vlrm`` distribution and load through the same group as
third-party ones. Loading is lazy (nothing happens at import) and idempotent (the
registry is built once per process; ``reset_registry`` rebuilds it).

We read entry points ourselves instead of pluggy's ``load_setuptools_entrypoints``, which
silently skips a name that another distribution already took, loads a plugin twice when a
stale ``*.egg-info`` sits beside the install, and lets one broken plugin fail every run.

Environment:
    VLRM_DISABLE_PLUGIN_AUTOLOAD=1: load only vlrm's own plugins.
    VLRM_TRACE_HOOKS=1: print every hook call to stderr.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import sys
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import pluggy
from attrs import evolve, field, frozen

from vlrm import hookspecs

ENTRY_POINT_GROUP = "vlrm"
FIRST_PARTY_DISTRIBUTION = "vlrm"
KINDS = {
    "policies": "vlrm_register_policies",
    "rewards": "vlrm_register_rewards",
    "evaluators": "vlrm_register_evaluators",
    "datasets": "vlrm_register_datasets",
    "objectives": "vlrm_register_objectives",
}


class PluginError(RuntimeError):
    """A plugin cannot be used as installed (a name clash, a bad registration)."""


@frozen
class PluginInfo:
    """One loaded (or failed) plugin, as ``vlrm-plugins`` lists it."""

    name: str
    distribution: str
    version: str
    target: str
    components: dict[str, list[str]] = field(factory=dict)
    error: str | None = None


@frozen
class Component:
    """A registered factory (class or builder function) of one kind."""

    kind: str
    name: str
    factory: Callable[..., Any]
    plugin: str
    distribution: str

    @property
    def path(self) -> str:
        """Dotted path to use as ``class_path`` in a config."""
        return f"{self.factory.__module__}.{self.factory.__qualname__}"


@frozen
class PluginRegistry:
    """Every loaded plugin and the components it registered, by kind and name."""

    plugins: list[PluginInfo]
    components: dict[str, dict[str, Component]]

    def get(self, kind: str, name: str) -> Component:
        """Look up a component; the error lists what is available."""
        try:
            return self.components[kind][name]
        except KeyError:
            known = ", ".join(sorted(self.components.get(kind, {}))) or "none"
            raise KeyError(f"no {kind[:-1]} named {name!r} is registered (known: {known})") from None

    def to_json(self) -> list[dict[str, Any]]:
        """Plain data for ``vlrm-plugins --json``."""
        out = []
        for p in self.plugins:
            row = {"name": p.name, "distribution": p.distribution, "version": p.version,
                   "target": p.target, "components": p.components}
            if p.error:
                row["error"] = p.error
            for kind, names in p.components.items():
                row.setdefault("paths", {})[kind] = {
                    n: self.components[kind][n].path for n in names}
            out.append(row)
        return out


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _entry_points(autoload: bool) -> list[tuple[md.EntryPoint, str, str]]:
    """The group's entry points, each once, as (entry point, distribution, version)."""
    seen, names, out = set(), {}, []
    for ep in md.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist is not None else "<unknown>"
        version = ep.dist.version if ep.dist is not None else "?"
        if not autoload and dist != FIRST_PARTY_DISTRIBUTION:
            continue
        key = (dist, ep.name, ep.value)
        if key in seen:  # the same install seen twice (stale metadata beside it)
            continue
        seen.add(key)
        if ep.name in names and names[ep.name] != dist:
            raise PluginError(
                f"the vlrm plugin name {ep.name!r} is used by two distributions: "
                f"{names[ep.name]!r} and {dist!r}; uninstall or rename one of them")
        names[ep.name] = dist
        out.append((ep, dist, version))
    return out


def _register_components(
    pm: pluggy.PluginManager, infos: dict[str, PluginInfo]
) -> dict[str, dict[str, Component]]:
    components: dict[str, dict[str, Component]] = {kind: {} for kind in KINDS}
    for kind, hook_name in KINDS.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            info = infos[impl.plugin_name]
            try:
                registered = impl.function() or {}
                items = list(registered.items())
            except Exception as exc:  # a broken plugin must not take the others down
                _report_failure(info.name, info.distribution, f"{hook_name} raised {exc!r}")
                infos[impl.plugin_name] = evolve(info, error=f"{hook_name} raised {exc!r}")
                continue
            for name, factory in items:
                if name in components[kind]:
                    other = components[kind][name]
                    raise PluginError(
                        f"two {kind} are named {name!r}: one from plugin {other.plugin!r} "
                        f"(distribution {other.distribution!r}), one from plugin "
                        f"{info.name!r} (distribution {info.distribution!r}); "
                        "uninstall one, or set VLRM_DISABLE_PLUGIN_AUTOLOAD=1")
                components[kind][name] = Component(
                    kind, name, factory, info.name, info.distribution)
                info.components.setdefault(kind, []).append(name)
    return components


def _report_failure(name: str, dist: str, message: str) -> None:
    warnings.warn(
        f"vlrm plugin {name!r} (distribution {dist!r}) could not be loaded and is skipped: "
        f"{message}", RuntimeWarning, stacklevel=3)


def load_plugins(
    autoload: bool | None = None, extra: Iterable[tuple[str, Any]] = ()
) -> PluginRegistry:
    """Load every plugin and collect the components they register.

    Args:
        autoload: Load third-party entry points; default: unless
            ``VLRM_DISABLE_PLUGIN_AUTOLOAD`` is set.
        extra: ``(name, plugin object)`` pairs registered directly, e.g. in tests.

    Raises:
        PluginError: Two plugins or two components of one kind share a name.
    """
    if autoload is None:
        autoload = not _env_flag("VLRM_DISABLE_PLUGIN_AUTOLOAD")
    pm = pluggy.PluginManager("vlrm")
    pm.add_hookspecs(hookspecs)
    if _env_flag("VLRM_TRACE_HOOKS"):
        pm.trace.root.setwriter(sys.stderr.write)
        pm.enable_tracing()
    infos: dict[str, PluginInfo] = {}
    failed: list[PluginInfo] = []
    for ep, dist, version in _entry_points(autoload):
        info = PluginInfo(ep.name, dist, version, ep.value)
        try:
            plugin = ep.load()
        except Exception as exc:
            _report_failure(ep.name, dist, f"importing {ep.value} raised {exc!r}")
            failed.append(PluginInfo(ep.name, dist, version, ep.value, error=repr(exc)))
            continue
        pm.register(plugin, name=ep.name)
        infos[ep.name] = info
    for name, plugin in extra:
        pm.register(plugin, name=name)
        infos[name] = PluginInfo(name, "<in-process>", "-", repr(plugin))
    components = _register_components(pm, infos)
    return PluginRegistry(plugins=list(infos.values()) + failed, components=components)


_registry: PluginRegistry | None = None


def get_registry() -> PluginRegistry:
    """The process-wide registry, loaded on first use."""
    global _registry
    if _registry is None:
        _registry = load_plugins()
    return _registry


def reset_registry() -> None:
    """Forget the loaded registry; the next ``get_registry`` loads plugins again."""
    global _registry
    _registry = None
