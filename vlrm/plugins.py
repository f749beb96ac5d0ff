"""Finding and loading plugins through the ``vlrm`` entry-point group.

Built-in plugins ship in the ``vlrm`` distribution and load through the same group as
third-party ones. Loading is lazy (nothing happens at import) and idempotent (the
registry is built once per process; ``reset_registry`` rebuilds it).

We read entry points ourselves instead of pluggy's ``load_setuptools_entrypoints``, which
silently skips a name that another distribution already took, loads a plugin twice when a
stale ``*.egg-info`` sits beside the install, and lets one broken plugin fail every run.

Choosing plugins (environment, or the same-named flags of the commands):
    VLRM_PLUGINS=a,b: load only these plugins (entry-point or distribution names).
    VLRM_BLOCK_PLUGINS=c,d: load all but these.
    VLRM_DISABLE_PLUGIN_AUTOLOAD=1: load only vlrm's own plugins.
A plugin left out is *blocked*: its components have no name in the registry, and the
modules it would have loaded are on jsonargparse's import-path denylist (``vlrm.names``),
so a config cannot build them by dotted path either.

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
    "loggers": "vlrm_register_loggers",
    "commands": "vlrm_register_commands",
}
CONFIG_KINDS = ("policies", "rewards", "evaluators", "datasets", "objectives", "loggers")


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
    blocked: str | None = None  # why it was not loaded: the setting that left it out

    @property
    def module(self) -> str:
        """The module the entry point names (``pkg.mod`` of ``pkg.mod:obj``)."""
        return self.target.split(":", 1)[0].strip()


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
    denied: tuple[str, ...] = ()  # import paths a blocked plugin owns (vlrm.names)

    @property
    def blocked(self) -> list[PluginInfo]:
        return [p for p in self.plugins if p.blocked]

    def resolve(self, name: str, kinds: Iterable[str] | None = None) -> Component | None:
        """The component registered as ``name`` among ``kinds`` (default every kind);
        None when none is. Raises PluginError when the name is taken in two of the kinds
        by different factories (the config must give the dotted path then)."""
        found = {c.path: c for kind in (kinds or CONFIG_KINDS)
                 if (c := self.components.get(kind, {}).get(name)) is not None}
        if len(found) > 1:
            where = "; ".join(f"a {c.kind[:-1]} ({c.path})" for c in found.values())
            raise PluginError(f"the name {name!r} is registered twice: {where}; "
                              "give the dotted path in the config instead")
        return next(iter(found.values()), None)

    def names(self, kinds: Iterable[str] | None = None) -> list[str]:
        """Every registered name among ``kinds`` (default every kind), sorted."""
        return sorted({n for kind in (kinds or CONFIG_KINDS)
                       for n in self.components.get(kind, {})})

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
            if p.blocked:
                row["blocked"] = p.blocked
            for kind, names in p.components.items():
                row.setdefault("paths", {})[kind] = {
                    n: self.components[kind][n].path for n in names}
                row.setdefault("init_args", {})[kind] = {
                    n: init_arguments(self.components[kind][n].factory) for n in names}
            out.append(row)
        return out


def init_arguments(factory: Callable[..., Any]) -> dict[str, str]:
    """A factory's parameters as ``{name: "type = default"}`` for listings."""
    import inspect

    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return {}
    out = {}
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name == "self":
            continue
        note = p.annotation if isinstance(p.annotation, str) else getattr(
            p.annotation, "__name__", "" if p.annotation is p.empty else str(p.annotation))
        if p.default is not p.empty:
            note = f"{note} = {p.default!r}" if note else f"= {p.default!r}"
        out[p.name] = note or "(required)"
    return out


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _env_names(name: str) -> frozenset[str] | None:
    value = os.environ.get(name, "").strip()
    return frozenset(n.strip() for n in value.split(",") if n.strip()) if value else None


@frozen
class Selection:
    """Which plugins load: ``only`` (None: every one) minus ``block``; ``autoload`` false
    keeps to vlrm's own distribution."""

    autoload: bool = True
    only: frozenset[str] | None = None
    block: frozenset[str] = frozenset()

    @classmethod
    def from_environment(cls, autoload: bool | None = None) -> "Selection":
        if autoload is None:
            autoload = not _env_flag("VLRM_DISABLE_PLUGIN_AUTOLOAD")
        return cls(autoload, _env_names("VLRM_PLUGINS"), _env_names("VLRM_BLOCK_PLUGINS") or frozenset())

    def why_left_out(self, name: str, dist: str) -> str | None:
        if not self.autoload and dist != FIRST_PARTY_DISTRIBUTION:
            return "VLRM_DISABLE_PLUGIN_AUTOLOAD (only vlrm's own plugins load)"
        if self.only is not None and not ({name, dist} & self.only):
            return f"VLRM_PLUGINS / --plugins ({', '.join(sorted(self.only))})"
        if {name, dist} & self.block:
            return f"VLRM_BLOCK_PLUGINS / --block-plugins ({', '.join(sorted(self.block))})"
        return None


def _entry_points(
    selection: Selection,
) -> tuple[list[tuple[md.EntryPoint, str, str]], list[PluginInfo]]:
    """The group's entry points, each once, as (entry point, distribution, version), and
    the plugins the selection leaves out."""
    seen, names, out, left_out = set(), {}, [], []
    for ep in md.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist is not None else "<unknown>"
        version = ep.dist.version if ep.dist is not None else "?"
        why = selection.why_left_out(ep.name, dist)
        if why is not None:
            if (dist, ep.name, ep.value) not in seen:
                seen.add((dist, ep.name, ep.value))
                left_out.append(PluginInfo(ep.name, dist, version, ep.value, blocked=why))
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
    if selection.only is not None or selection.block:
        known = {n for ep, d, _ in out for n in (ep.name, d)}
        known |= {n for p in left_out for n in (p.name, p.distribution)}
        unknown = sorted((selection.only or frozenset()) | selection.block)
        unknown = [n for n in unknown if n not in known]
        if unknown:
            raise PluginError(
                f"no vlrm plugin or distribution is named {', '.join(map(repr, unknown))} "
                f"(VLRM_PLUGINS / VLRM_BLOCK_PLUGINS); installed: {', '.join(sorted(known))}")
    return out, left_out


def _denied_paths(loaded: list[PluginInfo], left_out: list[PluginInfo]) -> tuple[str, ...]:
    """Import paths that belong to a left-out plugin: its entry point's module, and for a
    distribution left out whole (every one of its plugins) its top-level packages, except
    any a loaded plugin lives in."""
    denied = {p.module for p in left_out}
    whole = {p.distribution for p in left_out} - {p.distribution for p in loaded}
    whole.discard(FIRST_PARTY_DISTRIBUTION)
    if whole:
        for package, dists in md.packages_distributions().items():
            if set(dists) & whole:
                denied.add(package)
    keep = {p.module for p in loaded} | {"vlrm"}
    return tuple(sorted(d for d in denied if not any(
        k == d or k.startswith(d + ".") for k in keep)))


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
    autoload: bool | None = None, extra: Iterable[tuple[str, Any]] = (),
    selection: Selection | None = None,
) -> PluginRegistry:
    """Load every selected plugin and collect the components they register.

    Args:
        autoload: Load third-party entry points; default: unless
            ``VLRM_DISABLE_PLUGIN_AUTOLOAD`` is set.
        extra: ``(name, plugin object)`` pairs registered directly, e.g. in tests.
        selection: Which plugins load; default from the environment (module docstring).

    Raises:
        PluginError: Two plugins or two components of one kind share a name, or the
            selection names a plugin that is not installed.
    """
    selection = selection or Selection.from_environment(autoload)
    pm = pluggy.PluginManager("vlrm")
    pm.add_hookspecs(hookspecs)
    if _env_flag("VLRM_TRACE_HOOKS"):
        pm.trace.root.setwriter(sys.stderr.write)
        pm.enable_tracing()
    infos: dict[str, PluginInfo] = {}
    failed: list[PluginInfo] = []
    selected, left_out = _entry_points(selection)
    for ep, dist, version in selected:
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
    denied = _denied_paths(list(infos.values()) + failed, left_out)
    return PluginRegistry(plugins=list(infos.values()) + failed + left_out,
                          components=components, denied=denied)


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


PLUGIN_FLAGS = {"--plugins": "VLRM_PLUGINS", "--block-plugins": "VLRM_BLOCK_PLUGINS"}


def take_plugin_flags(argv: list[str]) -> list[str]:
    """Apply ``--plugins a,b`` / ``--block-plugins c`` (every vlrm command takes them) by
    setting ``VLRM_PLUGINS`` / ``VLRM_BLOCK_PLUGINS``, so that processes the command starts
    (torchrun ranks, sweep runs) choose the same plugins; returns argv without them."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        flag, eq, value = arg.partition("=")
        if flag in PLUGIN_FLAGS:
            if not eq:
                if i + 1 >= len(argv):
                    raise PluginError(f"{flag} needs a comma-separated list of plugin names")
                value, i = argv[i + 1], i + 1
            os.environ[PLUGIN_FLAGS[flag]] = value
            reset_registry()
        else:
            out.append(arg)
        i += 1
    return out
